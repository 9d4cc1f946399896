//! OpenCV's `cv2.resize` with `INTER_AREA` and `INTER_LANCZOS4`, reproduced for what controlnet-aux's
//! `util.smart_resize` / `smart_resize_k` hand it: 8-bit pictures (1 or 3 channels) and single-channel float32 maps.
//!
//! Following OpenCV's `imgproc/src/resize.cpp`:
//! - the scale is `1 / (dst / src)` in f64 (`cv::resize` passes `inv_scale = dsize / ssize`, `hal::resize` inverts);
//! - `INTER_LANCZOS4` (`resizeGeneric_`): per output column `fx = (float)((dx + 0.5) * scale - 0.5)`,
//!   `sx = floor(fx)`, 8 taps `sx - 3 .. sx + 4` clamped to the border (`HResizeLanczos4`'s border loop and the
//!   clipped source rows), weights from `interpolateLanczos4`; 8-bit: weights as `short` x 2048
//!   (`INTER_RESIZE_COEF_BITS` 11), integer sums, `FixedPtCast` with 22 bits; float: f32 sums;
//! - `INTER_AREA` for shrinking (`scale >= 1` on both axes): `computeResizeAreaTab` cell weights and the
//!   `ResizeArea_Invoker` accumulation in f32, `saturate_cast` (round half to even) for 8-bit;
//! - same size: a copy.
//!
//! The integer-ratio `resizeAreaFast` path is served by the general area code (same maths; an 8-bit result may
//! differ by one level where OpenCV's fast path rounds differently).

/// The interpolation a resize uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interp {
    Area,
    Lanczos4,
}

/// `interpolateLanczos4(x, coeffs)`.
fn lanczos4_coeffs(x: f32) -> [f32; 8] {
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const CS: [[f64; 2]; 8] = [
        [1.0, 0.0],
        [-S45, -S45],
        [0.0, 1.0],
        [S45, -S45],
        [-1.0, 0.0],
        [S45, S45],
        [0.0, -1.0],
        [-S45, S45],
    ];
    let mut c = [0f32; 8];
    let mut sum = 0f32;
    let y0 = -((x + 3.0) as f64) * std::f64::consts::PI * 0.25;
    let (s0, c0) = (y0.sin(), y0.cos());
    for i in 0..8 {
        let y0_ = x + 3.0 - i as f32;
        c[i] = if y0_.abs() >= 1e-6 {
            let y = -(y0_ as f64) * std::f64::consts::PI * 0.25;
            ((CS[i][0] * s0 + CS[i][1] * c0) / (y * y)) as f32
        } else {
            1e30
        };
        sum += c[i];
    }
    let inv = 1.0 / sum;
    for v in &mut c {
        *v *= inv;
    }
    c
}

/// Per output index: first source index (before clamping) and the 8 weights.
fn lanczos_tab(src: usize, dst: usize) -> Vec<(i64, [f32; 8])> {
    let scale = 1.0 / (dst as f64 / src as f64);
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            (s as i64 - 3, lanczos4_coeffs(f - s))
        })
        .collect()
}

fn clamp_idx(i: i64, n: usize) -> usize {
    i.clamp(0, n as i64 - 1) as usize
}

/// `saturate_cast<short>(v * INTER_RESIZE_COEF_SCALE)` (cvRound: half to even).
fn fixed_coeffs(c: &[f32; 8]) -> [i32; 8] {
    c.map(|v| ((v * 2048.0).round_ties_even() as i32).clamp(i16::MIN as i32, i16::MAX as i32))
}

/// `computeResizeAreaTab`: (dst index, src index, weight) triples.
fn area_tab(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
    let scale = 1.0 / (dst as f64 / src as f64);
    let mut tab = Vec::new();
    for dx in 0..dst {
        let fsx1 = dx as f64 * scale;
        let fsx2 = fsx1 + scale;
        let cell = scale.min(src as f64 - fsx1);
        let mut sx2 = fsx2.floor() as i64;
        sx2 = sx2.min(src as i64 - 1);
        let sx1 = (fsx1.ceil() as i64).min(sx2);
        if sx1 as f64 - fsx1 > 1e-3 {
            tab.push((dx, (sx1 - 1) as usize, ((sx1 as f64 - fsx1) / cell) as f32));
        }
        for sx in sx1..sx2 {
            tab.push((dx, sx as usize, (1.0 / cell) as f32));
        }
        if fsx2 - sx2 as f64 > 1e-3 {
            tab.push((
                dx,
                sx2 as usize,
                ((fsx2 - sx2 as f64).min(1.0).min(cell) / cell) as f32,
            ));
        }
    }
    tab
}

/// `ResizeArea_Invoker` over interleaved `cn`-channel rows, f32 accumulation; `out` maps the sums to pixels.
fn area<T: Copy + Into<f64>, U>(
    src: &[T],
    (h, w, cn): (usize, usize, usize),
    (dh, dw): (usize, usize),
    to_f32: impl Fn(T) -> f32,
    out: impl Fn(f32) -> U,
) -> Vec<U> {
    let xtab = area_tab(w, dw);
    let ytab = area_tab(h, dh);
    let width = dw * cn;
    let mut dst: Vec<U> = Vec::with_capacity(dh * width);
    let mut buf = vec![0f32; width];
    let mut sum = vec![0f32; width];
    let mut prev_dy = ytab.first().map(|t| t.0).unwrap_or(0);
    for &(dy, sy, beta) in &ytab {
        buf.iter_mut().for_each(|v| *v = 0.0);
        let row = &src[sy * w * cn..(sy + 1) * w * cn];
        for &(dx, sx, alpha) in &xtab {
            for k in 0..cn {
                buf[dx * cn + k] += to_f32(row[sx * cn + k]) * alpha;
            }
        }
        if dy != prev_dy {
            debug_assert_eq!(dst.len(), prev_dy * width);
            for x in 0..width {
                dst.push(out(sum[x]));
                sum[x] = beta * buf[x];
            }
            prev_dy = dy;
        } else {
            for x in 0..width {
                sum[x] += beta * buf[x];
            }
        }
    }
    for &s in sum.iter().take(width) {
        dst.push(out(s));
    }
    dst
}

fn check(len: usize, (h, w, cn): (usize, usize, usize), (dh, dw): (usize, usize)) {
    assert_eq!(len, h * w * cn, "cv_resize: buffer is not {h}x{w}x{cn}");
    assert!(h > 0 && w > 0 && dh > 0 && dw > 0, "cv_resize: empty size");
}

/// `cv2.resize(src, (dw, dh), interpolation)` for an 8-bit `h x w x cn` picture (interleaved channels).
pub fn resize_u8(
    src: &[u8],
    shape: (usize, usize, usize),
    dsize: (usize, usize),
    interp: Interp,
) -> Vec<u8> {
    check(src.len(), shape, dsize);
    let (h, w, cn) = shape;
    let (dh, dw) = dsize;
    if (h, w) == (dh, dw) {
        return src.to_vec();
    }
    if interp == Interp::Area && dh <= h && dw <= w {
        return area(
            src,
            shape,
            dsize,
            |v| v as f32,
            |s| s.round_ties_even().clamp(0.0, 255.0) as u8,
        );
    }
    assert_eq!(
        interp,
        Interp::Lanczos4,
        "cv_resize: INTER_AREA enlarging is not reproduced"
    );
    let xt = lanczos_tab(w, dw);
    let yt = lanczos_tab(h, dh);
    let xa: Vec<[i32; 8]> = xt.iter().map(|t| fixed_coeffs(&t.1)).collect();
    // horizontal pass on every source row: i32 sums
    let mut rows = vec![0i32; h * dw * cn];
    for y in 0..h {
        let s = &src[y * w * cn..(y + 1) * w * cn];
        let d = &mut rows[y * dw * cn..(y + 1) * dw * cn];
        for (dx, ((sx0, _), a)) in xt.iter().zip(&xa).enumerate() {
            for k in 0..cn {
                let mut v = 0i32;
                for (j, aj) in a.iter().enumerate() {
                    v += s[clamp_idx(sx0 + j as i64, w) * cn + k] as i32 * aj;
                }
                d[dx * cn + k] = v;
            }
        }
    }
    let mut dst = vec![0u8; dh * dw * cn];
    for (dy, (sy0, c)) in yt.iter().enumerate() {
        let b = fixed_coeffs(c);
        let srcs: Vec<&[i32]> = (0..8)
            .map(|k| &rows[clamp_idx(sy0 + k as i64, h) * dw * cn..][..dw * cn])
            .collect();
        for x in 0..dw * cn {
            let mut v = 0i32;
            for k in 0..8 {
                v = v.wrapping_add(srcs[k][x].wrapping_mul(b[k]));
            }
            // FixedPtCast<int, uchar, 22>
            dst[dy * dw * cn + x] = ((v + (1 << 21)) >> 22).clamp(0, 255) as u8;
        }
    }
    dst
}

/// `cv2.resize(src, (dw, dh), interpolation)` for a single-channel float32 `h x w` map.
pub fn resize_f32(
    src: &[f32],
    (h, w): (usize, usize),
    dsize: (usize, usize),
    interp: Interp,
) -> Vec<f32> {
    check(src.len(), (h, w, 1), dsize);
    let (dh, dw) = dsize;
    if (h, w) == (dh, dw) {
        return src.to_vec();
    }
    if interp == Interp::Area && dh <= h && dw <= w {
        return area(src, (h, w, 1), dsize, |v| v, |s| s);
    }
    assert_eq!(
        interp,
        Interp::Lanczos4,
        "cv_resize: INTER_AREA enlarging is not reproduced"
    );
    let xt = lanczos_tab(w, dw);
    let yt = lanczos_tab(h, dh);
    let mut rows = vec![0f32; h * dw];
    for y in 0..h {
        let s = &src[y * w..(y + 1) * w];
        for (dx, (sx0, a)) in xt.iter().enumerate() {
            let mut v = 0f32;
            for (j, aj) in a.iter().enumerate() {
                v += s[clamp_idx(sx0 + j as i64, w)] * aj;
            }
            rows[y * dw + dx] = v;
        }
    }
    let mut dst = vec![0f32; dh * dw];
    for (dy, (sy0, b)) in yt.iter().enumerate() {
        let r: Vec<&[f32]> = (0..8)
            .map(|k| &rows[clamp_idx(sy0 + k as i64, h) * dw..][..dw])
            .collect();
        for x in 0..dw {
            // VResizeLanczos4Vec_32f's grouping
            let lo = b[0] * r[0][x] + b[1] * r[1][x] + b[2] * r[2][x] + b[3] * r[3][x];
            let hi = b[4] * r[4][x] + b[5] * r[5][x] + b[6] * r[6][x] + b[7] * r[7][x];
            dst[dy * dw + x] = lo + hi;
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanczos_weights_sum_to_one_and_interpolate_at_zero() {
        let c = lanczos4_coeffs(0.0);
        assert_eq!(c[3], 1.0);
        assert!(c.iter().enumerate().all(|(i, v)| i == 3 || v.abs() < 1e-29));
        let c = lanczos4_coeffs(0.3);
        assert!((c.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn area_of_a_constant_is_the_constant() {
        let src = vec![7u8; 10 * 13 * 3];
        assert!(
            resize_u8(&src, (10, 13, 3), (4, 5), Interp::Area)
                .iter()
                .all(|&v| v == 7)
        );
        let src = vec![0.25f32; 23 * 9];
        assert!(
            resize_f32(&src, (23, 9), (8, 4), Interp::Area)
                .iter()
                .all(|&v| (v - 0.25).abs() < 1e-6)
        );
    }
}
