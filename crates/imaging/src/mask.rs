//! Inpaint masks as the Qwen pipelines prepare them (diffusers `VaeImageProcessor` with
//! `do_binarize=True, do_convert_grayscale=True`, and `F.interpolate(mask, size=(h, w))` in nearest mode).

use crate::Image8;

/// `m / 255 >= 0.5 ? 1 : 0` per pixel of an L image (white = repaint).
pub fn binarize(l: &Image8) -> Result<Vec<u8>, String> {
    if l.channels != 1 {
        return Err("mask must be single-channel (convert to L first)".into());
    }
    Ok(l.data
        .iter()
        .map(|&v| u8::from(f32::from(v) / 255.0 >= 0.5))
        .collect())
}

/// Nearest downsampling of a `width x height` {0,1} mask to the latent grid `lat_w x lat_h`:
/// PyTorch `nearest` picks source index `floor(dst · in/out)`, the top-left pixel of each cell.
pub fn to_latent_grid(
    mask: &[u8],
    width: usize,
    height: usize,
    lat_w: usize,
    lat_h: usize,
) -> Result<Vec<u8>, String> {
    if mask.len() != width * height || lat_w == 0 || lat_h == 0 {
        return Err(format!(
            "mask of {} values cannot be a {width}x{height} grid",
            mask.len()
        ));
    }
    let sx = width as f32 / lat_w as f32;
    let sy = height as f32 / lat_h as f32;
    let mut out = Vec::with_capacity(lat_w * lat_h);
    for y in 0..lat_h {
        let src_y = ((y as f32 * sy) as usize).min(height - 1);
        for x in 0..lat_w {
            let src_x = ((x as f32 * sx) as usize).min(width - 1);
            out.push(mask[src_y * width + src_x]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binarize_at_half() {
        let l = Image8::new(4, 1, 1, vec![0, 127, 128, 255]).expect("image");
        // 127/255 = 0.498 < 0.5; 128/255 = 0.502
        assert_eq!(binarize(&l).expect("mask"), vec![0, 0, 1, 1]);
    }

    #[test]
    fn latent_grid_takes_top_left_of_each_cell() {
        // 4x4 mask, only pixel (1,1) set: the 2x2 grid picks (0,0),(2,0),(0,2),(2,2) -> all 0
        let mut m = vec![0u8; 16];
        m[5] = 1;
        assert_eq!(
            to_latent_grid(&m, 4, 4, 2, 2).expect("grid"),
            vec![0, 0, 0, 0]
        );
        m[0] = 1;
        m[10] = 1;
        assert_eq!(
            to_latent_grid(&m, 4, 4, 2, 2).expect("grid"),
            vec![1, 0, 0, 1]
        );
    }
}
