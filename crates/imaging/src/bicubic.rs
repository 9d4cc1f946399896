//! The bicubic resize `Qwen2VLImageProcessor` runs on 8-bit pictures, bit-exact: transformers 5's image processor
//! is torchvision-backed and calls `torchvision.transforms.v2.functional.resize(uint8 tensor, BICUBIC,
//! antialias=True)`, which on the CPU keeps uint8 and runs PyTorch's separable antialiased kernel
//! (`aten/src/ATen/native/cpu/UpSampleKernel.cpp`: `HelperInterpCubic::aa_filter` with `a = -0.5`,
//! `_compute_indices_min_size_weights_aa`, `_compute_index_ranges_int16_weights`, `basic_loop_aa_horizontal<uint8_t>`
//! / `basic_loop_aa_vertical<uint8_t>`; horizontal pass first, then vertical, uint8 in between). It is PIL's
//! BICUBIC support and centring, but the weights are int16 at a precision chosen per axis, so results differ from
//! Pillow's 22-bit BICUBIC by a level here and there (checked: `tests/fixtures/imaging_bicubic`).

use crate::Image8;
use crate::resize::{Coeffs, separable_resize};

/// `interp_size` of `HelperInterpCubic` (4 taps before antialiasing widens the support).
const INTERP_SIZE: f64 = 4.0;
/// Upper bound of the int16 weight precision search in `_compute_index_ranges_int16_weights`.
const MAX_PRECISION: u32 = 22;

/// Keys' cubic convolution kernel with `a = -0.5` (`aa_filter<double, true>`; `cubic_convolution1/2` of
/// `UpSample.h`, in their operation order).
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// One axis: per output index the first input index and its int16 taps, at the precision shared by the axis.
fn axis(in_size: usize, out_size: usize) -> Coeffs {
    // area_pixel_compute_scale(align_corners=false, no scale factor) = in / out
    let scale = in_size as f64 / out_size as f64;
    let support = if scale >= 1.0 {
        INTERP_SIZE * 0.5 * scale
    } else {
        INTERP_SIZE * 0.5
    };
    let max_taps = support.ceil() as usize * 2 + 1;
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut rows = Vec::with_capacity(out_size);
    let mut wt_max = 0.0f64;
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        // static_cast<int64_t> truncates toward zero
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xsize = (((center + support + 0.5) as i64).min(in_size as i64) - xmin)
            .clamp(0, max_taps as i64);
        let mut w: Vec<f64> = (0..xsize)
            .map(|j| cubic((j as f64 + xmin as f64 - center + 0.5) * invscale))
            .collect();
        let total: f64 = w.iter().fold(0.0, |acc, v| acc + v);
        if total != 0.0 {
            for v in &mut w {
                *v /= total;
                wt_max = wt_max.max(*v);
            }
        }
        rows.push((xmin as usize, w));
    }
    // the largest precision for which 2 * wt_max still fits in int16
    let mut precision = 0;
    while precision < MAX_PRECISION {
        if (0.5 + wt_max * f64::from(1u32 << (precision + 1))) as i32 >= (1 << 15) {
            break;
        }
        precision += 1;
    }
    let scale_int = f64::from(1u32 << precision);
    let mut kk = vec![0i32; out_size * max_taps];
    let mut bounds = Vec::with_capacity(out_size);
    for (i, (xmin, w)) in rows.into_iter().enumerate() {
        for (k, v) in w.iter().enumerate() {
            let v = v * scale_int;
            // round half away from zero, then the int16 store
            kk[i * max_taps + k] = (if v < 0.0 {
                (-0.5 + v) as i32
            } else {
                (0.5 + v) as i32
            }) as i16 as i32;
        }
        bounds.push((xmin, w.len()));
    }
    Coeffs {
        ksize: max_taps,
        bounds,
        kk,
        precision,
    }
}

/// Resizes like `torchvision.transforms.v2.functional.resize(img, [height, width], BICUBIC, antialias=True)` on a
/// uint8 CPU tensor (horizontal pass first, uint8 in between, as ATen's separable kernel); same-size resizes
/// return a copy.
pub fn bicubic_resize(src: &Image8, width: usize, height: usize) -> Result<Image8, String> {
    separable_resize(src, width, height, axis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_normalised_and_symmetric() {
        // downscale 2x: 9 taps max, each row sums to 1 in fixed point (within rounding of each tap)
        let ax = axis(20, 10);
        let one = 1i32 << ax.precision;
        let taps = |c: &Coeffs, i: usize| c.kk[i * c.ksize..i * c.ksize + c.bounds[i].1].to_vec();
        for i in 1..9 {
            let w = taps(&ax, i);
            let s: i32 = w.iter().sum();
            assert!((s - one).abs() <= w.len() as i32, "{s} vs {one}");
        }
        // a same-size axis is the identity: one tap of weight 1 (kernel(0) = 1, neighbours 0)
        let id = axis(7, 7);
        for i in 0..7 {
            let w = taps(&id, i);
            let nz: Vec<_> = w.iter().enumerate().filter(|(_, v)| **v != 0).collect();
            assert_eq!(nz.len(), 1);
            assert_eq!(id.bounds[i].0 + nz[0].0, i);
        }
    }

    #[test]
    fn constant_picture_stays_constant() -> Result<(), String> {
        let src = Image8::new(13, 9, 3, vec![77; 13 * 9 * 3])?;
        for (w, h) in [(28, 28), (5, 3), (13, 20)] {
            let out = bicubic_resize(&src, w, h)?;
            assert!(out.data.iter().all(|&v| v == 77), "{w}x{h}");
        }
        assert!(bicubic_resize(&src, 0, 4).is_err());
        Ok(())
    }
}
