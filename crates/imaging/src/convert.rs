//! Pillow's mode conversions used by the pipelines.

use crate::Image8;

/// `Image.convert("L")` from RGB: ITU-R 601-2 luma in Pillow's fixed point,
/// `(R·19595 + G·38470 + B·7471 + 0x8000) >> 16` (`libImaging/Convert.c`, `L24`).
pub fn rgb_to_l(src: &Image8) -> Result<Image8, String> {
    match src.channels {
        1 => Ok(src.clone()),
        3 => {
            let data = src
                .data
                .chunks_exact(3)
                .map(|p| {
                    ((u32::from(p[0]) * 19595
                        + u32::from(p[1]) * 38470
                        + u32::from(p[2]) * 7471
                        + 0x8000)
                        >> 16) as u8
                })
                .collect();
            Ok(Image8 {
                width: src.width,
                height: src.height,
                channels: 1,
                data,
            })
        }
        c => Err(format!("cannot convert a {c}-channel image to L")),
    }
}

/// Drops alpha (or expands gray) to RGB, as `Image.convert("RGB")` does for RGBA (alpha ignored) and L.
pub fn to_rgb(src: &Image8) -> Result<Image8, String> {
    let data: Vec<u8> = match src.channels {
        3 => return Ok(src.clone()),
        1 => src.data.iter().flat_map(|&v| [v, v, v]).collect(),
        2 => src
            .data
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        4 => src
            .data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        c => return Err(format!("cannot convert a {c}-channel image to RGB")),
    };
    Ok(Image8 {
        width: src.width,
        height: src.height,
        channels: 3,
        data,
    })
}
