//! Pillow's `Image.resize(size, Image.Resampling.LANCZOS)` for 8-bit images, bit-exact: separable
//! convolution (horizontal pass, then vertical), filter support scaled by the downscale factor, coefficients
//! normalised in f64 and then turned into fixed point with 22 fractional bits, rounding and clipping per pass
//! (Pillow `libImaging/Resample.c`: `precompute_coeffs`, `normalize_coeffs_8bpc`,
//! `ImagingResampleHorizontal_8bpc`, `ImagingResampleVertical_8bpc`). Same-size resizes return a copy, as
//! `Image.resize` does.

use crate::Image8;

/// `PRECISION_BITS = 32 - 8 - 2` in Pillow's Resample.c.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Support of Pillow's LANCZOS filter (`lanczos_filter`, a = 3).
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Per output pixel: first input index, tap count and fixed-point coefficients (`kk[i·ksize..][..n]`) with
/// `precision` fractional bits. Shared with [`crate::bicubic`].
pub(crate) struct Coeffs {
    pub ksize: usize,
    pub bounds: Vec<(usize, usize)>,
    pub kk: Vec<i32>,
    pub precision: u32,
}

fn precompute(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // Pillow: xmin = (int)(center - support + 0.5), clamped at 0 (C truncation toward zero)
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = lanczos((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(n) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            // normalize_coeffs_8bpc: round half away from zero into fixed point
            let f = v * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        ksize,
        bounds,
        kk,
        precision: PRECISION_BITS,
    }
}

/// `clip8`: the fixed-point sum shifted down and clamped to 0..=255.
fn clip8(v: i32, precision: u32) -> u8 {
    (v >> precision).clamp(0, 255) as u8
}

/// One separable pass along x (`horizontal`) or y over an interleaved 8-bit image: per output value
/// `clip8(2^(precision-1) + Σ k·v)`.
fn pass(src: &Image8, out_w: usize, out_h: usize, horizontal: bool, coeffs: &Coeffs) -> Image8 {
    let c = src.channels;
    let mut out = vec![0u8; out_w * out_h * c];
    for yy in 0..out_h {
        for xx in 0..out_w {
            let (idx, fixed) = if horizontal { (xx, yy) } else { (yy, xx) };
            let (min, n) = coeffs.bounds[idx];
            let k = &coeffs.kk[idx * coeffs.ksize..idx * coeffs.ksize + n];
            for ch in 0..c {
                let mut ss: i32 = 1 << coeffs.precision.saturating_sub(1);
                for (t, kt) in k.iter().enumerate() {
                    let (sx, sy) = if horizontal {
                        (min + t, fixed)
                    } else {
                        (fixed, min + t)
                    };
                    ss = ss.wrapping_add(
                        i32::from(src.data[(sy * src.width + sx) * c + ch]).wrapping_mul(*kt),
                    );
                }
                out[(yy * out_w + xx) * c + ch] = clip8(ss, coeffs.precision);
            }
        }
    }
    Image8 {
        width: out_w,
        height: out_h,
        channels: c,
        data: out,
    }
}

/// A separable 8-bit resize: the horizontal pass first, then the vertical one (each only when that side
/// changes), rounding to 8 bits in between; `coeffs(in, out)` gives one axis's coefficients. Same-size resizes
/// return a copy.
pub(crate) fn separable_resize(
    src: &Image8,
    width: usize,
    height: usize,
    coeffs: impl Fn(usize, usize) -> Coeffs,
) -> Result<Image8, String> {
    if width == 0 || height == 0 || src.width == 0 || src.height == 0 {
        return Err(format!(
            "cannot resize {}x{} to {width}x{height}",
            src.width, src.height
        ));
    }
    let mut img = src.clone();
    if img.width != width {
        img = pass(&img, width, img.height, true, &coeffs(img.width, width));
    }
    if img.height != height {
        img = pass(&img, width, height, false, &coeffs(img.height, height));
    }
    Ok(img)
}

/// Resizes like Pillow's `resize((width, height), LANCZOS)`.
pub fn lanczos_resize(src: &Image8, width: usize, height: usize) -> Result<Image8, String> {
    separable_resize(src, width, height, precompute)
}
