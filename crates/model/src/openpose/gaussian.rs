//! `scipy.ndimage.gaussian_filter(map, sigma)` on a float64 2-D map, as controlnet-aux's body.py smooths each heat
//! map (`gaussian_filter(map_ori, sigma=3)`).
//!
//! scipy (`ndimage/_filters.py`): `truncate = 4.0`, radius `int(truncate * sigma + 0.5)` (12 for sigma 3), kernel
//! `exp(-0.5 / sigma² · x²)` for x in -radius..=radius normalised by its sum, applied by `correlate1d` along axis 0
//! then axis 1, float64 throughout, `mode='reflect'` (`d c b a | a b c d | d c b a`).

/// The normalised 1-D kernel (`_gaussian_kernel1d(sigma, 0, radius)`).
fn kernel(sigma: f64) -> Vec<f64> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let s2 = sigma * sigma;
    let phi: Vec<f64> = (-radius..=radius)
        .map(|x| (-0.5 / s2 * (x * x) as f64).exp())
        .collect();
    let sum: f64 = phi.iter().sum();
    phi.iter().map(|v| v / sum).collect()
}

/// scipy's 'reflect' boundary: index `i` (may be out of range) of a line of length `n`.
fn reflect(i: i64, n: usize) -> usize {
    let n = n as i64;
    let m = i.rem_euclid(2 * n);
    (if m >= n { 2 * n - 1 - m } else { m }) as usize
}

/// Filters `map` (`h x w`, row-major) in place of a copy; returns the smoothed map.
pub fn gaussian_filter(map: &[f64], h: usize, w: usize, sigma: f64) -> Vec<f64> {
    assert_eq!(map.len(), h * w, "gaussian_filter: map is not {h}x{w}");
    let k = kernel(sigma);
    let r = (k.len() / 2) as i64;
    // axis 0 (down the columns)
    let mut tmp = vec![0f64; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0f64;
            for (j, kj) in k.iter().enumerate() {
                acc += kj * map[reflect(y as i64 + j as i64 - r, h) * w + x];
            }
            tmp[y * w + x] = acc;
        }
    }
    // axis 1 (along the rows)
    let mut out = vec![0f64; h * w];
    for y in 0..h {
        let row = &tmp[y * w..(y + 1) * w];
        for x in 0..w {
            let mut acc = 0f64;
            for (j, kj) in k.iter().enumerate() {
                acc += kj * row[reflect(x as i64 + j as i64 - r, w)];
            }
            out[y * w + x] = acc;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_has_radius_12_for_sigma_3_and_sums_to_one() {
        let k = kernel(3.0);
        assert_eq!(k.len(), 25);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn reflect_mirrors_with_the_edge_repeated() {
        let idx: Vec<usize> = (-3..7).map(|i| reflect(i, 4)).collect();
        assert_eq!(idx, vec![2, 1, 0, 0, 1, 2, 3, 3, 2, 1]);
    }

    #[test]
    fn a_constant_map_stays_constant() {
        let m = vec![0.5f64; 7 * 5];
        assert!(
            gaussian_filter(&m, 7, 5, 3.0)
                .iter()
                .all(|v| (v - 0.5).abs() < 1e-12)
        );
    }
}
