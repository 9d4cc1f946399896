//! f32 CPU kernels for the places where candle's generic CPU ops are slow for this model
//! (shared/reference/candle-notes.md §4): attention, whose full score matrix candle materialises and
//! soft-maxes with scalar `expf`, the tanh-GELU, a scalar `tanh` per element, and the VAE's RMS-norm + SiLU
//! conv prologue (scalar `expf`). All are exact to f32 rounding (a few ulp): the exponential is a Cephes-style
//! polynomial that the compiler vectorises, for AVX-512 or AVX2 as the CPU has.
//!
//! Used by [`crate::nn`] when a tensor is f32 on the CPU; other devices and dtypes use candle's ops.

use candle_core::{CpuStorage, Result, Storage, Tensor};
use rayon::prelude::*;

/// Query rows processed together by one attention task (its score block is `QUERY_BLOCK × keys` floats).
const QUERY_BLOCK: usize = 256;
/// Elements per parallel task of the elementwise kernels.
const ELEMWISE_CHUNK: usize = 1 << 14;

/// Below this, [`exp_f32`] is 0: `e^-69 ≈ 1e-30 ≈ 2^-99.5`. A masked key's softmax term (`e^-inf`) must not
/// come out as a tiny float that the normalisation then turns subnormal: a subnormal operand costs the FMA
/// units a microcode assist, and the attention GEMM that multiplies those probabilities by V ran 15x slower
/// (the text encoder's causal mask: 1 ms instead of 0.07 ms per call). Terms below 2^-99.5 of the row's
/// largest (which is 1) are below f32's resolution of any sum they join, so the softmax is unchanged.
const EXP_FLUSH_BELOW: f32 = -69.0;

/// `e^x` for f32 with about 1-2 ulp error (Cephes `expf`): `x = n·ln2 + r`, a degree-5 polynomial in `r`,
/// scaled by `2^n` through the exponent bits. Inputs are clamped to the finite range, and anything below
/// [`EXP_FLUSH_BELOW`] (`-inf` included) gives exactly 0, so no result is subnormal.
#[inline(always)]
pub fn exp_f32(x_in: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a high part exact in f32 and a low correction (Cephes)
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x_in.clamp(-87.3, 88.7);
    // round-to-nearest through the 1.5·2^23 magic constant (no libm call, vectorises)
    let n = (x * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    let e = y * f32::from_bits((((n as i32) + 127) as u32) << 23);
    // a select, not a branch: still vectorises; NaN compares false and stays NaN
    if x_in < EXP_FLUSH_BELOW { 0.0 } else { e }
}

/// tanh-approximated GELU (`GELU(approximate="tanh")`):
/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, written as `x·σ(2·√(2/π)·(x + 0.044715·x³))`.
#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    const TWO_SQRT_2_OVER_PI: f32 = 1.595_769_1; // 2·sqrt(2/π)
    let z = TWO_SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp_f32(-z))
}

/// Runs `f` on the data of a contiguous CPU f32 tensor without copying; `None` for anything else.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return None;
    };
    let (a, b) = layout.contiguous_offsets()?;
    Some(f(&data[a..b]))
}

/// GELU (tanh) of a CPU f32 tensor, in parallel. `None` when `x` is not a CPU f32 tensor.
pub fn gelu_tanh(x: &Tensor) -> Result<Option<Tensor>> {
    let x = x.contiguous()?;
    let Some(mut data) = with_f32(&x, |d| d.to_vec()) else {
        return Ok(None);
    };
    data.par_chunks_mut(ELEMWISE_CHUNK).for_each(gelu_slice);
    Ok(Some(Tensor::from_vec(data, x.shape(), x.device())?))
}

/// `[B, S, D]` contiguous CPU f32 tensor `x` and per-batch rows `[B, D]` `a`, `b`, as slices, or `None`.
fn rows_and_params<R>(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&[f32], &[f32], &[f32], usize, usize) -> R,
) -> Result<Option<R>> {
    let (batch, seq, d) = x.dims3()?;
    if a.dims() != [batch, d] || b.dims() != [batch, d] {
        return Ok(None);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    Ok(with_f32(x, |xd| {
        with_f32(&a, |ad| with_f32(&b, |bd| f(xd, ad, bd, seq, d)))
    })
    .flatten()
    .flatten())
}

/// `LayerNorm(x) · (1 + scale) + shift` (no affine LayerNorm, then the block's modulation) in one parallel pass:
/// `x` `[B, S, D]`, `shift`/`scale` `[B, D]`. Mean, then the variance of the centred row (two passes over
/// the row, in cache), as torch's LayerNorm. `None` when the inputs are not contiguous CPU f32 of those shapes.
pub fn layer_norm_modulate(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f32,
) -> Result<Option<Tensor>> {
    let x = x.contiguous()?;
    let out = rows_and_params(&x, shift, scale, |xd, sh, sc, seq, d| {
        let mut out = vec![0f32; xd.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(xd.par_chunks(d * ROWS_PER_TASK))
            .enumerate()
            .for_each(|(task, (o, xs))| {
                for (r, (orow, xrow)) in o.chunks_mut(d).zip(xs.chunks(d)).enumerate() {
                    let bi = (task * ROWS_PER_TASK + r) / seq;
                    let (sh, sc) = (&sh[bi * d..(bi + 1) * d], &sc[bi * d..(bi + 1) * d]);
                    norm_modulate_row(orow, xrow, sh, sc, eps);
                }
            });
        out
    })?;
    out.map(|o| Tensor::from_vec(o, x.shape(), x.device()))
        .transpose()
}

/// `x + y · gate` with `gate` `[B, D]` broadcast over the tokens of `x`/`y` `[B, S, D]` (the blocks' gated
/// residuals), in one parallel pass. `None` when the inputs are not contiguous CPU f32 of those shapes.
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Option<Tensor>> {
    if x.dims() != y.dims() {
        return Ok(None);
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let out = rows_and_params(&x, gate, gate, |xd, g, _, seq, d| {
        with_f32(&y, |yd| {
            let mut out = vec![0f32; xd.len()];
            out.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(xd.par_chunks(d * ROWS_PER_TASK))
                .zip(yd.par_chunks(d * ROWS_PER_TASK))
                .enumerate()
                .for_each(|(task, ((o, xs), ys))| {
                    for (r, ((orow, xrow), yrow)) in o
                        .chunks_mut(d)
                        .zip(xs.chunks(d))
                        .zip(ys.chunks(d))
                        .enumerate()
                    {
                        let bi = (task * ROWS_PER_TASK + r) / seq;
                        gated_add_row(orow, xrow, yrow, &g[bi * d..(bi + 1) * d]);
                    }
                });
            out
        })
    })?;
    out.flatten()
        .map(|o| Tensor::from_vec(o, x.shape(), x.device()))
        .transpose()
}

/// Token rows per parallel task of the row kernels above (64 rows of 3072 floats: 768 KiB).
const ROWS_PER_TASK: usize = 64;

#[inline(always)]
fn norm_modulate_row_generic(o: &mut [f32], x: &[f32], shift: &[f32], scale: &[f32], eps: f32) {
    let d = x.len() as f32;
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let mean = (acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()) / d;
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let v = c[i] - mean;
            acc[i] += v * v;
        }
    }
    let rem: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    let inv = 1.0 / ((acc.iter().sum::<f32>() + rem) / d + eps).sqrt();
    for (((o, x), sh), sc) in o.iter_mut().zip(x).zip(shift).zip(scale) {
        *o = (x - mean) * inv * (1.0 + sc) + sh;
    }
}

#[inline(always)]
fn gated_add_row_generic(o: &mut [f32], x: &[f32], y: &[f32], gate: &[f32]) {
    for (((o, x), y), g) in o.iter_mut().zip(x).zip(y).zip(gate) {
        *o = x + y * g;
    }
}

/// Lanes of the manual reductions below: lets the compiler keep 8 independent accumulators (vectorised)
/// where a single running max/sum would be a serial dependency chain.
const LANES: usize = 8;

#[inline(always)]
fn softmax_row_generic(row: &mut [f32]) {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            if c[i] > m[i] {
                m[i] = c[i];
            }
        }
    }
    let mut max = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in chunks.remainder() {
        max = max.max(v);
    }
    for v in row.iter_mut() {
        *v = exp_f32(*v - max);
    }
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let sum: f32 = acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[inline(always)]
fn gelu_slice_generic(c: &mut [f32]) {
    for v in c.iter_mut() {
        *v = gelu_one(*v);
    }
}

/// `silu(x / max(‖x‖₂, eps) · scale · gamma[c])` for one pixel's channels (`QwenImageRMS_norm` then SiLU, the
/// VAE's conv prologue), with the sum of squares in [`LANES`] partial sums and [`exp_f32`].
#[inline(always)]
fn norm_silu_generic(dst: &mut [f32], src: &[f32], gamma: &[f32], scale: f32, eps: f32) {
    let mut acc = [0f32; LANES];
    let mut chunks = src.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i] * c[i];
        }
    }
    let sq = acc.iter().sum::<f32>() + chunks.remainder().iter().map(|v| v * v).sum::<f32>();
    let norm = sq.sqrt().max(eps);
    for ((d, s), g) in dst.iter_mut().zip(src).zip(gamma) {
        let y = (s / norm) * scale * g;
        *d = y / (1.0 + exp_f32(-y));
    }
}

/// `$generic` compiled three ways, the best the CPU has picked at run time (std caches the check): AVX-512F,
/// AVX2+FMA, or the baseline. The loops are written for the compiler to vectorise (16 or 8 lanes). The
/// `@dispatch` form takes a hand-written AVX-512 function instead of compiling `$generic` for it.
macro_rules! multiversion {
    ($name:ident, $avx512:ident, $avx:ident, $generic:ident, ($($arg:ident : $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn $avx512($($arg: $ty),*) {
            $generic($($arg),*)
        }

        multiversion!(@dispatch $name, $avx512, $avx, $generic, ($($arg: $ty),*));
    };
    (@dispatch $name:ident, $avx512:path, $avx:ident, $generic:ident, ($($arg:ident : $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx($($arg: $ty),*) {
            $generic($($arg),*)
        }

        pub(crate) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, all `$avx512` needs (checked just above).
                    #[allow(unsafe_code)]
                    unsafe {
                        return $avx512($($arg),*);
                    }
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for `$avx`.
                    #[allow(unsafe_code)]
                    unsafe {
                        return $avx($($arg),*);
                    }
                }
            }
            $generic($($arg),*)
        }
    };
}

multiversion!(@dispatch softmax_row, avx512::softmax_row, softmax_row_avx2, softmax_row_generic, (x: &mut [f32]));
multiversion!(@dispatch gelu_slice, avx512::gelu_slice, gelu_slice_avx2, gelu_slice_generic, (x: &mut [f32]));
multiversion!(
    norm_modulate_row,
    norm_modulate_row_avx512,
    norm_modulate_row_avx2,
    norm_modulate_row_generic,
    (o: &mut [f32], x: &[f32], shift: &[f32], scale: &[f32], eps: f32)
);
multiversion!(
    gated_add_row,
    gated_add_row_avx512,
    gated_add_row_avx2,
    gated_add_row_generic,
    (o: &mut [f32], x: &[f32], y: &[f32], gate: &[f32])
);
multiversion!(
    norm_silu,
    norm_silu_avx512,
    norm_silu_avx2,
    norm_silu_generic,
    (dst: &mut [f32], src: &[f32], gamma: &[f32], scale: f32, eps: f32)
);

/// The softmax row and the GELU in AVX-512 intrinsics: the compiler does not vectorise [`exp_f32`]'s
/// float-to-int exponent step well; at 1024+ keys the softmax was a sixth of a denoising step, and the GELU a
/// tenth of a batched step on the default model.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::exp_f32`] on 16 lanes: the same clamp, Cephes reduction and polynomial, `2^n` by `scalef`,
    /// and 0 below [`super::EXP_FLUSH_BELOW`].
    #[target_feature(enable = "avx512f")]
    fn exp16(x_in: __m512) -> __m512 {
        // lanes not below the cut (NaN included: unordered counts as "not less than")
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x_in, _mm512_set1_ps(super::EXP_FLUSH_BELOW));
        let x = _mm512_min_ps(
            _mm512_max_ps(x_in, _mm512_set1_ps(-87.3)),
            _mm512_set1_ps(88.7),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5.000_000_1e-1,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r),
            _mm512_set1_ps(1.0),
        );
        _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, n))
    }

    /// `x ← x·σ(2·√(2/π)·(x + 0.044715·x³))`, as [`super::gelu_one`]; the tail through masked loads and
    /// stores.
    #[target_feature(enable = "avx512f")]
    pub(super) fn gelu_slice(x: &mut [f32]) {
        #[target_feature(enable = "avx512f")]
        fn gelu16(x: __m512) -> __m512 {
            let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
            let inner = _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044_715), x);
            // e^-z with z = 2·√(2/π)·inner
            let e = exp16(_mm512_mul_ps(inner, _mm512_set1_ps(-1.595_769_1)));
            _mm512_div_ps(x, _mm512_add_ps(e, _mm512_set1_ps(1.0)))
        }
        let n = x.len();
        let full = n / 16 * 16;
        let tail: __mmask16 = ((1u32 << (n - full)) - 1) as __mmask16;
        let p = x.as_mut_ptr();
        // SAFETY: offsets `i < full` read and write 16 floats inside `x`; the tail uses the mask of the
        // `n - full` floats left.
        for i in (0..full).step_by(16) {
            unsafe { _mm512_storeu_ps(p.add(i), gelu16(_mm512_loadu_ps(p.add(i)))) };
        }
        unsafe {
            let t = _mm512_maskz_loadu_ps(tail, p.add(full));
            _mm512_mask_storeu_ps(p.add(full), tail, gelu16(t));
        }
    }

    /// `row ← softmax(row)`; the tail of fewer than 16 elements through masked loads and stores.
    #[target_feature(enable = "avx512f")]
    pub(super) fn softmax_row(row: &mut [f32]) {
        let n = row.len();
        let full = n / 16 * 16;
        let tail: __mmask16 = ((1u32 << (n - full)) - 1) as __mmask16;
        let p = row.as_mut_ptr();
        // SAFETY (every block below): offsets `i < full` read or write 16 floats inside `row`; the tail uses
        // the mask of the `n - full` floats left.
        let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..full).step_by(16) {
            vmax = _mm512_max_ps(vmax, unsafe { _mm512_loadu_ps(p.add(i)) });
        }
        let t =
            unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail, p.add(full)) };
        let vmax = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(vmax, t)));
        let mut vsum = _mm512_setzero_ps();
        for i in (0..full).step_by(16) {
            let e = exp16(_mm512_sub_ps(unsafe { _mm512_loadu_ps(p.add(i)) }, vmax));
            unsafe { _mm512_storeu_ps(p.add(i), e) };
            vsum = _mm512_add_ps(vsum, e);
        }
        let e = exp16(_mm512_sub_ps(
            unsafe { _mm512_maskz_loadu_ps(tail, p.add(full)) },
            vmax,
        ));
        let e = _mm512_maskz_mov_ps(tail, e);
        unsafe { _mm512_mask_storeu_ps(p.add(full), tail, e) };
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(_mm512_add_ps(vsum, e)));
        for i in (0..full).step_by(16) {
            unsafe { _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv)) };
        }
        unsafe {
            _mm512_mask_storeu_ps(
                p.add(full),
                tail,
                _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p.add(full)), inv),
            )
        };
    }
}

/// `C[m×n] = scale · A[m×k] · B` with row-major `A` and `B` given as `[n×k]` (transposed) or `[k×n]`.
#[allow(clippy::too_many_arguments)]
fn gemm_rm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    b_is_nk: bool,
    scale: f32,
) {
    debug_assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= n * k);
    let (b_cs, b_rs) = if b_is_nk {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    // SAFETY: the slices outlive the call and hold at least m·n, m·k and k·n elements with the given
    // strides (checked above in debug builds, guaranteed by the callers' shape checks).
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Attention over contiguous CPU f32 tensors: `q` `[B, H, Sq, D]`, `k`/`v` `[B, H, Sk, D]`, optional additive
/// bias `[B, 1, Sk]` (per key) or `[B, Sq, Sk]` (per query row, e.g. causal). Parallel over (batch·head, query block); each task keeps a `QUERY_BLOCK × Sk` score
/// block, so memory stays bounded at any image size. `None` when the inputs are not CPU f32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let (b, h, sq, d) = q.dims4()?;
    let (_, _, sk, _) = k.dims4()?;
    if k.dims() != [b, h, sk, d] || v.dims() != [b, h, sk, d] {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let bias = key_bias.map(|t| t.contiguous()).transpose()?;
    // rows of the bias per batch element: 1 (per key) or Sq (per query)
    let bias_rows = match &bias {
        None => 0,
        Some(t) if t.elem_count() == b * sk => 1,
        Some(t) if t.elem_count() == b * sq * sk => sq,
        Some(t) => candle_core::bail!(
            "attention: bias of shape {:?} fits neither [B, 1, Sk] nor [B, Sq, Sk]",
            t.dims()
        ),
    };
    let scale = scale as f32;
    // polled from the rayon threads: a stopped request skips its remaining query blocks
    let interrupt = crate::interrupt::current();
    let stopped = || interrupt.as_ref().is_some_and(|i| i.stopped());
    let run = |qd: &[f32], kd: &[f32], vd: &[f32], bias: Option<&[f32]>| {
        let mut out = vec![0f32; b * h * sq * d];
        out.par_chunks_mut(sq * d).enumerate().for_each(|(bh, o)| {
            let qh = &qd[bh * sq * d..(bh + 1) * sq * d];
            let kh = &kd[bh * sk * d..(bh + 1) * sk * d];
            let vh = &vd[bh * sk * d..(bh + 1) * sk * d];
            let bias_b =
                bias.map(|bv| &bv[(bh / h) * bias_rows * sk..(bh / h + 1) * bias_rows * sk]);
            o.par_chunks_mut(QUERY_BLOCK * d)
                .enumerate()
                .for_each(|(qb, ob)| {
                    if stopped() {
                        return;
                    }
                    let rows = ob.len() / d;
                    let q0 = qb * QUERY_BLOCK;
                    let mut scores = vec![0f32; rows * sk];
                    gemm_rm(
                        rows,
                        sk,
                        d,
                        &mut scores,
                        &qh[q0 * d..(q0 + rows) * d],
                        kh,
                        true,
                        scale,
                    );
                    for (r, row) in scores.chunks_mut(sk).enumerate() {
                        let bias_row = bias_b.map(|bb| {
                            if bias_rows == 1 {
                                bb
                            } else {
                                &bb[(q0 + r) * sk..(q0 + r + 1) * sk]
                            }
                        });
                        if let Some(br) = bias_row {
                            for (s, bv) in row.iter_mut().zip(br) {
                                *s += bv;
                            }
                        }
                        softmax_row(row);
                    }
                    gemm_rm(rows, d, sk, ob, &scores, vh, false, 1.0);
                });
        });
        out
    };
    let out = with_f32(&q, |qd| {
        with_f32(&k, |kd| {
            with_f32(&v, |vd| match &bias {
                None => Some(run(qd, kd, vd, None)),
                Some(t) => with_f32(t, |bd| run(qd, kd, vd, Some(bd))),
            })
        })
    });
    crate::interrupt::check()?;
    match out.flatten().flatten().flatten() {
        Some(out) => Ok(Some(Tensor::from_vec(out, (b, h, sq, d), q.device())?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_is_accurate_and_never_subnormal() {
        let mut worst = 0f32;
        let mut x = EXP_FLUSH_BELOW;
        while x < 88.0 {
            let rel = ((exp_f32(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        let mut x = -120.0f32;
        while x < EXP_FLUSH_BELOW + 1.0 {
            let e = exp_f32(x);
            assert!(!e.is_subnormal(), "exp({x}) = {e:e} is subnormal");
            x += 0.0137;
        }
        assert_eq!(exp_f32(EXP_FLUSH_BELOW - 0.01), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn softmax_row_matches_the_f64_softmax() {
        // Lengths below, at and between multiples of 16 (the AVX-512 path's masked tail), masked keys (-inf).
        for n in [1usize, 5, 16, 17, 31, 32, 100, 1034] {
            let mut row: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 113) as f32 * 0.37 - 20.0)
                .collect();
            if n > 3 {
                row[2] = f32::NEG_INFINITY;
            }
            // The difference to the max is an f32 in the kernel too: the reference takes it from there.
            let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
            let e: Vec<f64> = row.iter().map(|v| f64::from(*v - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            softmax_row(&mut row);
            for (i, (got, want)) in row.iter().zip(&e).enumerate() {
                let want = want / sum;
                assert!(
                    (f64::from(*got) - want).abs() <= 1e-6 * want.max(1e-30) + 1e-37,
                    "n={n} i={i}: {got} vs {want}"
                );
                assert!(!got.is_subnormal(), "n={n} i={i}: {got:e} is subnormal");
            }
            if n > 3 {
                assert_eq!(row[2], 0.0, "n={n}: a masked key gets exactly 0");
            }
        }
        // A causal-mask-like row: f32::MIN and a term 80 below the max give 0, not a subnormal.
        for n in [4usize, 17, 40] {
            let mut row = vec![0f32; n];
            row[0] = f32::MIN;
            row[1] = -80.0;
            softmax_row(&mut row);
            assert_eq!((row[0], row[1]), (0.0, 0.0), "n={n}");
            assert!(row.iter().all(|v| !v.is_subnormal()), "n={n}: {row:?}");
        }
    }

    #[test]
    fn norm_silu_matches_the_scalar_form() -> Result<()> {
        // Channel counts with and without a remainder after the 8-lane chunks, large and tiny pixels.
        for c in [3usize, 16, 37, 128] {
            let src = Tensor::randn(0f32, 4f32, c, &Device::Cpu)?.to_vec1::<f32>()?;
            let gamma = Tensor::randn(1f32, 0.5f32, c, &Device::Cpu)?.to_vec1::<f32>()?;
            for (x, scale, eps) in [(1.0f32, (c as f32).sqrt(), 1e-12f32), (1e-14, 2.0, 1e-12)] {
                let src: Vec<f32> = src.iter().map(|v| v * x).collect();
                let mut ours = vec![0f32; c];
                norm_silu(&mut ours, &src, &gamma, scale, eps);
                let norm = (src
                    .iter()
                    .map(|v| f64::from(*v).powi(2))
                    .sum::<f64>()
                    .sqrt())
                .max(f64::from(eps));
                for i in 0..c {
                    let y = f64::from(src[i]) / norm * f64::from(scale) * f64::from(gamma[i]);
                    let want = y / (1.0 + (-y).exp());
                    let err = (f64::from(ours[i]) - want).abs() / want.abs().max(1e-6);
                    assert!(err < 1e-5, "c={c} x={x} i={i}: {} vs {want}", ours[i]);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gelu_slice_matches_the_scalar_form_at_every_tail() {
        for n in [1usize, 7, 16, 17, 33, 100] {
            let x: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.731).sin() * 6.0 - 1.0)
                .collect();
            let mut ours = x.clone();
            gelu_slice(&mut ours);
            for (i, (got, v)) in ours.iter().zip(&x).enumerate() {
                let want = gelu_one(*v);
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "n={n} i={i}: {got} vs {want}"
                );
            }
        }
        let mut extremes = [-1e4f32, -30.0, -8.0, 0.0, 8.0, 30.0, 1e4];
        gelu_slice(&mut extremes);
        assert_eq!(extremes[3], 0.0);
        assert_eq!((extremes[4], extremes[5], extremes[6]), (8.0, 30.0, 1e4));
        assert!(
            extremes[..3]
                .iter()
                .all(|v| v.abs() < 1e-6 && !v.is_subnormal()),
            "{extremes:?}"
        );
    }

    #[test]
    fn layer_norm_modulate_matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        // 70 rows: one full task of 64 rows and a short one; a batch boundary inside a task
        for (b, s, d) in [(2usize, 35usize, 24usize), (1, 3, 7)] {
            let x = (Tensor::randn(0f32, 2f32, (b, s, d), &dev)? + 3.0)?;
            let shift = Tensor::randn(0f32, 1f32, (b, d), &dev)?;
            let scale = Tensor::randn(0f32, 1f32, (b, d), &dev)?;
            let ours = layer_norm_modulate(&x, &shift, &scale, 1e-6)?.expect("cpu f32");
            let ln = candle_nn::ops::layer_norm(
                &x,
                &Tensor::ones(d, candle_core::DType::F32, &dev)?,
                &Tensor::zeros(d, candle_core::DType::F32, &dev)?,
                1e-6,
            )?;
            let theirs = ln
                .broadcast_mul(&(&scale + 1.0)?.unsqueeze(1)?)?
                .broadcast_add(&shift.unsqueeze(1)?)?;
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 2e-5, "b={b} s={s} d={d}: max diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn gated_residual_matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (b, s, d) in [(2usize, 70usize, 24usize), (3, 1, 5)] {
            let x = Tensor::randn(0f32, 1f32, (b, s, d), &dev)?;
            let y = Tensor::randn(0f32, 1f32, (b, s, d), &dev)?;
            let gate = Tensor::randn(0f32, 1f32, (b, d), &dev)?;
            let ours = gated_residual(&x, &y, &gate)?.expect("cpu f32");
            let theirs = (&x + y.broadcast_mul(&gate.unsqueeze(1)?)?)?;
            let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "b={b} s={s} d={d}: max diff {diff}");
        }
        // shapes the kernel does not take: no result, the caller uses candle's ops
        let x = Tensor::zeros((2, 3, 4), candle_core::DType::F32, &dev)?;
        assert!(
            gated_residual(
                &x,
                &x,
                &Tensor::zeros((2, 5), candle_core::DType::F32, &dev)?
            )?
            .is_none()
        );
        Ok(())
    }

    #[test]
    fn gelu_matches_candle() -> Result<()> {
        let x = Tensor::randn(0f32, 3f32, (3, 1000), &Device::Cpu)?;
        let ours = gelu_tanh(&x)?.expect("cpu f32");
        let theirs = x.gelu()?;
        let d = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 2e-6, "max diff {d}");
        Ok(())
    }

    #[test]
    fn attention_with_per_query_bias_matches_naive() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, s, d) = (2, 2, 300, 8);
        let q = Tensor::randn(0f32, 1f32, (b, h, s, d), &dev)?;
        let mut causal = vec![0f32; b * s * s];
        for bi in 0..b {
            for i in 0..s {
                for j in (i + 1)..s {
                    causal[(bi * s + i) * s + j] = f32::NEG_INFINITY;
                }
            }
        }
        let bias = Tensor::from_vec(causal, (b, s, s), &dev)?;
        let ours = attention(&q, &q, &q, Some(&bias), 0.3)?.expect("cpu f32");
        let scores =
            (q.matmul(&q.transpose(2, 3)?)? * 0.3)?.broadcast_add(&bias.reshape((b, 1, s, s))?)?;
        let naive = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&q)?;
        let diff = (ours - naive)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }

    #[test]
    fn attention_matches_naive_with_mask() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, sq, sk, d) = (2, 3, 150, 70, 16);
        let q = Tensor::randn(0f32, 1f32, (b, h, sq, d), &dev)?;
        let k = Tensor::randn(0f32, 1f32, (b, h, sk, d), &dev)?;
        let v = Tensor::randn(0f32, 1f32, (b, h, sk, d), &dev)?;
        let mut bias = vec![0f32; b * sk];
        for j in 60..70 {
            bias[sk + j] = f32::NEG_INFINITY; // mask the last keys of batch 1
        }
        let bias = Tensor::from_vec(bias, (b, 1, sk), &dev)?;
        let ours = attention(&q, &k, &v, Some(&bias), 0.25)?.expect("cpu f32");
        let scores = (q.matmul(&k.transpose(2, 3)?)? * 0.25)?
            .broadcast_add(&bias.reshape((b, 1, 1, sk))?)?;
        let naive = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        let diff = (ours - naive)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }
}
