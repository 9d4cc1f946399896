//! Qwen-Image 3-axis RoPE (`QwenEmbedRope`, diffusers `transformer_qwenimage.py`, `scale_rope=True`).
//!
//! Each token gets `sum(axes_dim)/2` rotation angles: frame, row and column axes, each with
//! `inv_freq_k = 1 / theta^(2k/axis_dim)` (the exponent uses the axis dimension, not the head dimension).
//! Image rows/columns are centred: `-(n - n/2) .. n/2 - 1`. Text token `j` sits at position `m + j` on all
//! three axes, with `m = max(h'/2, w'/2)` over the images. Angles are computed in f32 as `pos * inv_freq`
//! (what `torch.outer` does in f32), then applied to interleaved pairs (`rope_i`).

use candle_core::{Device, Result, Tensor};

/// RoPE theta of Qwen-Image (`QwenEmbedRope(theta=10000, ...)` in `QwenImageTransformer2DModel.__init__`).
pub const ROPE_THETA: f32 = 10000.0;

/// Size of diffusers' precomputed position tables (`torch.arange(4096)`); positions beyond it do not exist there.
pub const ROPE_TABLE_LEN: usize = 4096;

/// Per-image grid in packed tokens: `(frames, h/2, w/2)`.
pub type ImgShape = (usize, usize, usize);

fn inv_freqs(axis_dim: usize, theta: f32) -> Vec<f32> {
    // 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(float32).div(dim))
    (0..axis_dim)
        .step_by(2)
        .map(|k| 1.0f32 / theta.powf(k as f32 / axis_dim as f32))
        .collect()
}

/// Centred positions of one spatial axis of length `n` (`scale_rope=True`).
fn centred(n: usize) -> impl Iterator<Item = i64> {
    let neg = (n - n / 2) as i64;
    (0..n as i64).map(move |i| i - neg)
}

/// cos/sin tables `[tokens, head_dim/2]` for the image tokens and the text tokens.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub img_cos: Tensor,
    pub img_sin: Tensor,
    pub txt_cos: Tensor,
    pub txt_sin: Tensor,
}

/// Builds the RoPE tables for `img_shapes` (in order; image `idx` uses frame positions `idx..idx+F`) and a
/// padded text length `txt_len`.
pub fn rope_tables(
    axes_dim: &[usize],
    img_shapes: &[ImgShape],
    txt_len: usize,
    device: &Device,
) -> Result<RopeTables> {
    if axes_dim.len() != 3 || axes_dim.iter().any(|d| d % 2 != 0) {
        candle_core::bail!("axes_dims_rope must be three even numbers, got {axes_dim:?}");
    }
    let inv: Vec<Vec<f32>> = axes_dim.iter().map(|&d| inv_freqs(d, ROPE_THETA)).collect();
    let half: usize = axes_dim.iter().sum::<usize>() / 2;
    let angles = |pos: [i64; 3], out: &mut Vec<f32>| {
        for (axis, p) in pos.iter().enumerate() {
            for f in &inv[axis] {
                out.push(*p as f32 * f);
            }
        }
    };
    let mut img = Vec::new();
    let mut max_vid_index = 0usize;
    for (idx, &(frames, h, w)) in img_shapes.iter().enumerate() {
        for f in 0..frames {
            for y in centred(h) {
                for x in centred(w) {
                    angles([(idx + f) as i64, y, x], &mut img);
                }
            }
        }
        max_vid_index = max_vid_index.max(h / 2).max(w / 2);
    }
    if max_vid_index + txt_len > ROPE_TABLE_LEN {
        candle_core::bail!(
            "text length {txt_len} at offset {max_vid_index} exceeds the RoPE table ({ROPE_TABLE_LEN} positions)"
        );
    }
    let mut txt = Vec::with_capacity(txt_len * half);
    for j in 0..txt_len {
        let p = (max_vid_index + j) as i64;
        angles([p, p, p], &mut txt);
    }
    let n_img = img.len() / half;
    let to_tables = |a: &[f32], n: usize| -> Result<(Tensor, Tensor)> {
        let cos: Vec<f32> = a.iter().map(|v| v.cos()).collect();
        let sin: Vec<f32> = a.iter().map(|v| v.sin()).collect();
        Ok((
            Tensor::from_vec(cos, (n, half), device)?,
            Tensor::from_vec(sin, (n, half), device)?,
        ))
    };
    let (img_cos, img_sin) = to_tables(&img, n_img)?;
    let (txt_cos, txt_sin) = to_tables(&txt, txt_len)?;
    Ok(RopeTables {
        img_cos,
        img_sin,
        txt_cos,
        txt_sin,
    })
}

/// Applies the rotation to `x` `[B, H, S, D]` with tables `[S, D/2]` (interleaved pairs, in f32).
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(candle_core::DType::F32)?.contiguous()?;
    candle_nn::rotary_emb::rope_i(&x32, cos, sin)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centred_positions_match_reference() {
        // denoiser-and-pipelines.md §11: h'=3 gives rows -2..0, w'=5 gives cols -3..1.
        assert_eq!(centred(3).collect::<Vec<_>>(), vec![-2, -1, 0]);
        assert_eq!(centred(5).collect::<Vec<_>>(), vec![-3, -2, -1, 0, 1]);
        assert_eq!(centred(64).next(), Some(-32));
        assert_eq!(centred(83).next(), Some(-42));
        assert_eq!(centred(83).last(), Some(40));
    }

    #[test]
    fn text_starts_after_the_largest_half_grid() -> Result<()> {
        // h'=3, w'=5, L=4: text positions 2,3,4,5 on all axes.
        let t = rope_tables(&[4, 6, 6], &[(1, 3, 5)], 4, &Device::Cpu)?;
        let cos = t.txt_cos.to_vec2::<f32>()?;
        // first frequency of every axis is 1.0, so the angle equals the position.
        assert!((cos[0][0] - 2f32.cos()).abs() < 1e-6);
        assert!((cos[3][2] - 5f32.cos()).abs() < 1e-6);
        assert_eq!(t.img_cos.dims(), &[15, 8]);
        Ok(())
    }
}
