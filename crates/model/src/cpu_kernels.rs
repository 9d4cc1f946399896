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

/// Work below which a kernel runs on the calling thread alone, in multiply-adds (the row kernels count an
/// estimate of theirs per element). Forking a kernel wakes the pool's other thread, which has gone to sleep
/// between kernels, and the sleep after it costs as much again: on the 2-vCPU machine that was a quarter of
/// the default model's denoiser samples at 8 clients (futex wake-ups, `sched_yield`, context switches), more
/// than a small kernel gains from a second thread. `QWEN_IMAGE_PARALLEL_MIN_WORK` overrides it.
const PARALLEL_MIN_WORK: usize = 1 << 21;

/// [`PARALLEL_MIN_WORK`], or the `QWEN_IMAGE_PARALLEL_MIN_WORK` override (read once).
fn parallel_min_work() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("QWEN_IMAGE_PARALLEL_MIN_WORK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(PARALLEL_MIN_WORK)
    })
}

thread_local! {
    /// Set while a thread runs its part of a batch split by [`on_own_threads`]: its kernels stay on it.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a kernel of `work` multiply-adds forks into the calling thread's rayon pool.
pub(crate) fn runs_parallel(work: usize) -> bool {
    !SERIAL.get() && rayon::current_num_threads() > 1 && work >= parallel_min_work()
}

/// Into how many parts a forward pass over `rows` independent batch rows of a CPU f32 model splits, one
/// per thread of the calling thread's pool (see [`on_own_threads`]); 1 = no split: another device or
/// dtype, one thread, already inside a part, or rows that do not divide evenly (an idle thread would cost
/// more than the kernels' own forks).
pub fn batch_parts(device: &candle_core::Device, dtype: candle_core::DType, rows: usize) -> usize {
    let threads = rayon::current_num_threads();
    if !device.is_cpu() || dtype != candle_core::DType::F32 || threads < 2 || SERIAL.get() {
        return 1;
    }
    let parts = threads.min(rows);
    if parts < 2 || !rows.is_multiple_of(parts) {
        1
    } else {
        parts
    }
}

/// Runs `f` on every part on the calling thread's rayon pool, one fork for all, each part's kernels on
/// the thread that runs it (no fork per kernel: on a small model the wake-ups of the pool's other thread
/// cost more than they save) and with the calling thread's interrupt installed. Results in order.
pub fn on_own_threads<T: Send, R: Send>(
    parts: Vec<T>,
    f: impl Fn(T) -> Result<R> + Sync + Send,
) -> Result<Vec<R>> {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.set(self.0);
        }
    }
    let interrupt = crate::interrupt::current();
    parts
        .into_par_iter()
        .map(|part| {
            let _restore = Restore(SERIAL.replace(true));
            match &interrupt {
                Some(i) => crate::interrupt::scoped(i.clone(), || f(part)),
                None => f(part),
            }
        })
        .collect()
}

/// `with_min_len` for a parallel iterator doing `work` in all: one task per split when [`runs_parallel`],
/// else no split at all (every task on the calling thread, no fork).
fn min_len(work: usize) -> usize {
    if runs_parallel(work) { 1 } else { usize::MAX }
}

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
    let Some(data) = with_f32(&x, |src| {
        let mut out: Vec<f32> = Vec::with_capacity(src.len());
        out.spare_capacity_mut()[..src.len()]
            .par_chunks_mut(ELEMWISE_CHUNK)
            .zip(src.par_chunks(ELEMWISE_CHUNK))
            .with_min_len(min_len(src.len() * 8))
            .for_each(|(dst, src)| {
                // copied a chunk at a time (in cache), then transformed in place
                for (d, s) in dst.iter_mut().zip(src) {
                    d.write(*s);
                }
                // SAFETY: every value of `dst` was written just above.
                #[allow(unsafe_code)]
                let dst = unsafe { &mut *(dst as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
                gelu_slice(dst);
            });
        // SAFETY: the chunks cover all src.len() values, each written above.
        #[allow(unsafe_code)]
        unsafe {
            out.set_len(src.len())
        };
        out
    }) else {
        return Ok(None);
    };
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
            .with_min_len(min_len(xd.len() * 4))
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
                .with_min_len(min_len(xd.len() * 2))
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

/// The data of a contiguous CPU f32 tensor, borrowed for as long as the view lives (for kernels taking a
/// variable number of tensors, where [`with_f32`]'s closures cannot nest).
struct F32View<G> {
    storage: G,
    start: usize,
    end: usize,
}

/// `None` unless `t` is a contiguous CPU f32 tensor.
fn f32_view(t: &Tensor) -> Option<F32View<impl std::ops::Deref<Target = Storage> + '_>> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))).then_some(F32View {
        storage,
        start,
        end,
    })
}

impl<G: std::ops::Deref<Target = Storage>> F32View<G> {
    fn data(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(d)) => &d[self.start..self.end],
            _ => &[], // not reached: `f32_view` admits CPU f32 storage only
        }
    }
}

/// One part of [`joint_heads`]: a projection `[B, S, H·D]` (contiguous CPU f32), its optional per-head
/// RMSNorm (gain `[D]`, epsilon) and its optional interleaved rotary tables (cos, sin `[S, D/2]`).
pub struct HeadsPart<'a> {
    pub x: &'a Tensor,
    pub norm: Option<(&'a Tensor, f32)>,
    pub rope: Option<(&'a Tensor, &'a Tensor)>,
}

/// [`HeadsPart`] as slices.
struct HeadsSlices<'a> {
    x: &'a [f32],
    norm: Option<(&'a [f32], f32)>,
    rope: Option<(&'a [f32], &'a [f32])>,
    seq: usize,
}

/// The attention heads of several projections joined along the sequence, `[B, H, ΣS, D]`, in one parallel
/// pass: per head, candle's `rms_norm` (`x / sqrt(mean(x²) + eps) · gain`), then candle's `rope_i` (pairs
/// `(x₀, x₁)` → `(x₀·cos − x₁·sin, x₀·sin + x₁·cos)`), each head row written straight into its place in
/// the joined tensor. Replaces, per projection, the norm, a transposing copy, the rotary pass and the
/// concatenation's copy. `None` when a part is not contiguous CPU f32 of those shapes.
pub fn joint_heads(parts: &[HeadsPart], heads: usize) -> Result<Option<Tensor>> {
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    let (b, _, hd) = first.x.dims3()?;
    if heads == 0 || hd % heads != 0 {
        return Ok(None);
    }
    let d = hd / heads;
    let half = d / 2;
    let mut views = Vec::with_capacity(parts.len());
    for p in parts {
        let (pb, seq, phd) = p.x.dims3()?;
        let fits = pb == b
            && phd == hd
            && p.norm.is_none_or(|(g, _)| g.dims() == [d])
            && p.rope.is_none_or(|(c, s)| {
                d % 2 == 0 && c.dims() == [seq, half] && s.dims() == [seq, half]
            });
        if !fits {
            return Ok(None);
        }
        let Some(x) = f32_view(p.x) else {
            return Ok(None);
        };
        let norm = match p.norm {
            None => None,
            Some((g, eps)) => match f32_view(g) {
                Some(g) => Some((g, eps)),
                None => return Ok(None),
            },
        };
        let rope = match p.rope {
            None => None,
            Some((c, s)) => match (f32_view(c), f32_view(s)) {
                (Some(c), Some(s)) => Some((c, s)),
                _ => return Ok(None),
            },
        };
        views.push((x, norm, rope, seq));
    }
    let slices: Vec<HeadsSlices> = views
        .iter()
        .map(|(x, norm, rope, seq)| HeadsSlices {
            x: x.data(),
            norm: norm.as_ref().map(|(g, eps)| (g.data(), *eps)),
            rope: rope.as_ref().map(|(c, s)| (c.data(), s.data())),
            seq: *seq,
        })
        .collect();
    let total: usize = slices.iter().map(|p| p.seq).sum();
    let len = b * heads * total * d;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(total * d)
        .enumerate()
        .with_min_len(min_len(len * 4))
        .for_each(|(bh, slab)| {
            let (bi, hi) = (bh / heads, bh % heads);
            let mut t0 = 0;
            for p in &slices {
                for si in 0..p.seq {
                    let src = &p.x[(bi * p.seq + si) * hd + hi * d..][..d];
                    let row = &mut slab[(t0 + si) * d..][..d];
                    let rope = p
                        .rope
                        .map(|(c, s)| (&c[si * half..][..half], &s[si * half..][..half]));
                    head_row(row, src, p.norm, rope);
                }
                t0 += p.seq;
            }
        });
    // SAFETY: the slabs cover the `len` values and `head_row` writes every value of every row.
    #[allow(unsafe_code)]
    unsafe {
        out.set_len(len)
    };
    Ok(Some(Tensor::from_vec(
        out,
        (b, heads, total, d),
        first.x.device(),
    )?))
}

/// One head row of [`joint_heads`]: writes all of `row` from `src`.
fn head_row(
    row: &mut [std::mem::MaybeUninit<f32>],
    src: &[f32],
    norm: Option<(&[f32], f32)>,
    rope: Option<(&[f32], &[f32])>,
) {
    // candle's rms_norm: the root mean square with eps, then `x / rms · gain`
    let norm = norm.map(|(gain, eps)| {
        let sum2 = src.iter().map(|v| v * v).sum::<f32>();
        ((sum2 / src.len() as f32 + eps).sqrt(), gain)
    });
    let value = |j: usize| match norm {
        Some((rms, gain)) => src[j] / rms * gain[j],
        None => src[j],
    };
    match rope {
        Some((cos, sin)) => {
            for (i, (c, s)) in cos.iter().zip(sin).enumerate() {
                let (x0, x1) = (value(2 * i), value(2 * i + 1));
                row[2 * i].write(x0 * c - x1 * s);
                row[2 * i + 1].write(x0 * s + x1 * c);
            }
        }
        None => {
            for (j, o) in row.iter_mut().enumerate() {
                o.write(value(j));
            }
        }
    }
}

/// How [`linear`]'s weight is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// PyTorch's `[out, in]` (candle's `Linear`).
    OutIn,
    /// Transposed, `[in, out]`.
    InOut,
}

/// The thread setting of a GEMM of `work` multiply-adds: the calling thread's rayon pool (as candle's
/// matmul) when [`runs_parallel`], else the calling thread alone.
fn gemm_parallelism(work: usize) -> gemm::Parallelism {
    if runs_parallel(work) {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    }
}

/// `x · Wᵀ + bias` for CPU f32 tensors, one GEMM per batch of rows: `x` `[.., in]` (contiguous, or `[B, S,
/// in]` with contiguous rows per batch element, such as a narrowed sequence), `w` `[out, in]` or `[in, out]`
/// (`layout`), `bias` `[out]`. The output rows start as the bias and the GEMM adds the product to them, so
/// there is neither candle's zero fill of the output nor a separate bias pass; without a bias the GEMM
/// writes the output without reading it. Parallel on the calling thread's rayon pool. `None` when the
/// tensors are not CPU f32 of those shapes (the caller then takes candle's path).
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    layout: WeightLayout,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (n, k) = match layout {
        WeightLayout::OutIn => w.dims2()?,
        WeightLayout::InOut => {
            let (k, n) = w.dims2()?;
            (n, k)
        }
    };
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !cpu_f32(x)
        || !cpu_f32(w)
        || x.dims().last() != Some(&k)
        || k == 0
        || n == 0
        || x.elem_count() == 0
    {
        return Ok(None);
    }
    // batches of rows: (count, rows each, distance between batches in elements); one batch when contiguous
    let x = match x.dims() {
        _ if x.is_contiguous() => x.clone(),
        [_, _, _] if x.stride()[2] == 1 && x.stride()[1] == k => x.clone(),
        _ => x.contiguous()?,
    };
    let (batches, rows, batch_stride) = if x.is_contiguous() {
        (1, x.elem_count() / k, 0)
    } else {
        let (b, s, _) = x.dims3()?;
        (b, s, x.stride()[0])
    };
    let m = batches * rows;
    let w = w.contiguous()?;
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    if bias.as_ref().is_some_and(|b| b.elem_count() != n) {
        return Ok(None);
    }
    let (rhs_cs, rhs_rs) = match layout {
        WeightLayout::OutIn => (k as isize, 1),
        WeightLayout::InOut => (1, n as isize),
    };
    let (x_storage, x_layout) = x.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(xd)) = &*x_storage else {
        return Ok(None);
    };
    let xd = &xd[x_layout.start_offset()..];
    let run = |wd: &[f32], bd: Option<&[f32]>| -> Vec<f32> {
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        let dst = &mut out.spare_capacity_mut()[..m * n];
        let work = m * n * k;
        if let Some(bd) = bd {
            dst.par_chunks_mut(n * ROWS_PER_TASK)
                .with_min_len(min_len(work))
                .for_each(|chunk| {
                    for row in chunk.chunks_mut(n) {
                        for (o, b) in row.iter_mut().zip(bd) {
                            o.write(*b);
                        }
                    }
                });
        }
        let parallelism = gemm_parallelism(work);
        for batch in 0..batches {
            let lhs = &xd[batch * batch_stride..];
            assert!(lhs.len() >= rows * k && wd.len() >= n * k);
            // SAFETY: `lhs` holds `rows` rows of `k` values and `wd` `n·k` values read with the strides of
            // `layout` (asserted above); `dst` has room for this batch's rows·n output values (capacity
            // reserved above); without a bias the GEMM only writes them (read_dst false), with one it reads
            // the bias rows written above.
            #[allow(unsafe_code)]
            unsafe {
                gemm::gemm(
                    rows,
                    n,
                    k,
                    dst[batch * rows * n..].as_mut_ptr().cast::<f32>(),
                    1,
                    n as isize,
                    bd.is_some(),
                    lhs.as_ptr(),
                    1,
                    k as isize,
                    wd.as_ptr(),
                    rhs_cs,
                    rhs_rs,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
        // SAFETY: every one of the m·n values was written: by the GEMM (each batch's rows·n block), on top
        // of the bias rows when there is a bias.
        #[allow(unsafe_code)]
        unsafe {
            out.set_len(m * n)
        };
        out
    };
    let out = with_f32(&w, |wd| match &bias {
        None => Some(run(wd, None)),
        Some(b) => with_f32(b, |bd| run(wd, Some(bd))),
    });
    let Some(Some(out)) = out else {
        return Ok(None);
    };
    let mut dims = x.dims().to_vec();
    dims.pop();
    dims.push(n);
    Ok(Some(Tensor::from_vec(out, dims, x.device())?))
}

/// `C[m×n] = scale · A[m×k] · B` with row-major `A`, `B` given as `[n×k]` (transposed) or `[k×n]`, and
/// `C`'s rows `c_rs` apart; `C` is written, never read.
///
/// # Safety
/// `c` must be valid for writes of `m` rows of `n` values, `c_rs` apart, that no other thread touches
/// during the call.
#[allow(clippy::too_many_arguments, unsafe_code)]
unsafe fn gemm_rm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    a: &[f32],
    b: &[f32],
    b_is_nk: bool,
    scale: f32,
) {
    assert!(a.len() >= m * k && b.len() >= n * k);
    let (b_cs, b_rs) = if b_is_nk {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    // SAFETY: `a` and `b` hold m·k and k·n elements with the given strides (asserted above); `c` is the
    // caller's promise.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_rs as isize,
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

/// Where [`attention`] writes its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionOut {
    /// `[B, H, Sq, D]`, as the inputs.
    Heads,
    /// `[B, Sq, H·D]`: the heads merged back, ready for the output projection (saves the transposing copy).
    Merged,
}

/// The output buffer of [`attention`], shared by its tasks, each of which writes rows no other touches.
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint rows (one (batch·head, query block) each) and nothing reads the buffer
// until every task has ended.
#[allow(unsafe_code)]
unsafe impl Send for SharedOut {}
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut {}

/// Attention over contiguous CPU f32 tensors: `q` `[B, H, Sq, D]`, `k`/`v` `[B, H, Sk, D]`, optional additive
/// bias `[B, 1, Sk]` (per key) or `[B, Sq, Sk]` (per query row, e.g. causal); the output laid out as `out`
/// says. Parallel over (batch·head, query block); each task keeps a `QUERY_BLOCK × Sk` score block, so
/// memory stays bounded at any image size. `None` when the inputs are not CPU f32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    scale: f64,
    out_layout: AttentionOut,
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
    let len = b * h * sq * d;
    // (offset of head `bh`'s first row, distance between its rows)
    let place = |bh: usize| match out_layout {
        AttentionOut::Heads => (bh * sq * d, d),
        AttentionOut::Merged => (((bh / h) * sq * h + bh % h) * d, h * d),
    };
    let blocks = sq.div_ceil(QUERY_BLOCK);
    let skipped = std::sync::atomic::AtomicBool::new(false);
    let run = |qd: &[f32], kd: &[f32], vd: &[f32], bias: Option<&[f32]>| {
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let shared = SharedOut(out.as_mut_ptr());
        let work = b * h * sq * sk * d * 2;
        (0..b * h * blocks)
            .into_par_iter()
            .with_min_len(min_len(work))
            .for_each(|task| {
                let shared = &shared;
                if stopped() {
                    skipped.store(true, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                let (bh, qb) = (task / blocks, task % blocks);
                let q0 = qb * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(sq - q0);
                let qh = &qd[(bh * sq + q0) * d..(bh * sq + q0 + rows) * d];
                let kh = &kd[bh * sk * d..(bh + 1) * sk * d];
                let vh = &vd[bh * sk * d..(bh + 1) * sk * d];
                let bias_b =
                    bias.map(|bv| &bv[(bh / h) * bias_rows * sk..(bh / h + 1) * bias_rows * sk]);
                let mut scores: Vec<f32> = Vec::with_capacity(rows * sk);
                // SAFETY: `scores` has room for rows·sk values, written (not read) by the GEMM, which writes
                // all of them; the length is set after.
                #[allow(unsafe_code)]
                unsafe {
                    gemm_rm(rows, sk, d, scores.as_mut_ptr(), sk, qh, kh, true, scale);
                    scores.set_len(rows * sk);
                }
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
                let (first, row_stride) = place(bh);
                // SAFETY: this task's rows q0..q0+rows of head `bh` lie inside the `len` values reserved for
                // `out` (`place` maps every (head, row) of [B, H, Sq, D] to a distinct row of D values), and no
                // other task writes them.
                #[allow(unsafe_code)]
                unsafe {
                    let c = shared.0.add(first + q0 * row_stride);
                    gemm_rm(rows, d, sk, c, row_stride, &scores, vh, false, 1.0);
                }
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
    // a stopped request's output has rows never written: it ends here, before they could be read
    crate::interrupt::check()?;
    if skipped.into_inner() {
        candle_core::bail!("attention: stopped part-way, yet the interrupt no longer says so");
    }
    let Some(mut out) = out.flatten().flatten().flatten() else {
        return Ok(None);
    };
    // SAFETY: every task ran to its end (no interrupt, checked above), so all b·h·sq·d values were written.
    #[allow(unsafe_code)]
    unsafe {
        out.set_len(len)
    };
    let out = match out_layout {
        AttentionOut::Heads => Tensor::from_vec(out, (b, h, sq, d), q.device())?,
        AttentionOut::Merged => Tensor::from_vec(out, (b, sq, h * d), q.device())?,
    };
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The largest absolute difference between two tensors of one shape.
    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

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
            let diff = max_diff(&ours, &theirs)?;
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
            let diff = max_diff(&ours, &theirs)?;
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
    fn joint_heads_match_candle_norm_rope_and_cat() -> Result<()> {
        let dev = Device::Cpu;
        let (b, heads, d) = (2, 3, 8);
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
        let txt = randn(&[b, 5, heads * d])?;
        let img = randn(&[b, 7, heads * d])?;
        let gains = [randn(&[d])?, randn(&[d])?];
        let tables = [
            (randn(&[5, d / 2])?, randn(&[5, d / 2])?),
            (randn(&[7, d / 2])?, randn(&[7, d / 2])?),
        ];
        // candle's way: per part, reshape + rms_norm + transpose copy + rope_i, then cat along the sequence
        let candle = |norm: bool, rope: bool| -> Result<Tensor> {
            let mut parts = Vec::new();
            for (i, x) in [&txt, &img].into_iter().enumerate() {
                let s = x.dim(1)?;
                let mut h = x.reshape((b, s, heads, d))?;
                if norm {
                    h = candle_nn::ops::rms_norm(&h, &gains[i], 1e-6)?;
                }
                let mut h = h.transpose(1, 2)?.contiguous()?;
                if rope {
                    h = candle_nn::rotary_emb::rope_i(&h, &tables[i].0, &tables[i].1)?;
                }
                parts.push(h);
            }
            Tensor::cat(&parts, 2)
        };
        for (norm, rope) in [(true, true), (false, false), (true, false), (false, true)] {
            let parts: Vec<HeadsPart> = [&txt, &img]
                .into_iter()
                .enumerate()
                .map(|(i, x)| HeadsPart {
                    x,
                    norm: norm.then_some((&gains[i], 1e-6)),
                    rope: rope.then_some((&tables[i].0, &tables[i].1)),
                })
                .collect();
            let ours = joint_heads(&parts, heads)?.expect("cpu f32");
            let want = candle(norm, rope)?;
            assert_eq!(ours.dims(), [b, heads, 12, d]);
            let err = max_diff(&ours, &want)?;
            assert!(err < 1e-6, "norm {norm} rope {rope}: max abs error {err}");
        }
        // a table of the wrong length, or another dtype: not taken
        let wrong = [HeadsPart {
            x: &txt,
            norm: None,
            rope: Some((&tables[1].0, &tables[1].1)),
        }];
        assert!(joint_heads(&wrong, heads)?.is_none());
        let f64_txt = txt.to_dtype(DType::F64)?;
        let other = [HeadsPart {
            x: &f64_txt,
            norm: None,
            rope: None,
        }];
        assert!(joint_heads(&other, heads)?.is_none());
        Ok(())
    }

    #[test]
    fn linear_matches_candle_matmul_plus_bias() -> Result<()> {
        let dev = Device::Cpu;
        let (k, n) = (37, 29);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?; // [out, in]
        let bias = Tensor::randn(0f32, 1.0, n, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 23, k), &dev)?;
        // a narrowed sequence: rows contiguous within each batch element, batches apart
        let narrowed = x.narrow(1, 5, 11)?;
        assert!(!narrowed.is_contiguous());
        let transposed = x.transpose(0, 1)?; // neither layout: copied first
        for x in [&x, &narrowed, &transposed, &x.get(0)?.narrow(0, 3, 1)?] {
            let want = x.broadcast_matmul(&w.t()?)?;
            let want_b = want.broadcast_add(&bias)?;
            let wt = w.t()?.contiguous()?;
            for (got, want) in [
                (linear(x, &w, WeightLayout::OutIn, None)?, &want),
                (linear(x, &w, WeightLayout::OutIn, Some(&bias))?, &want_b),
                (linear(x, &wt, WeightLayout::InOut, None)?, &want),
                (linear(x, &wt, WeightLayout::InOut, Some(&bias))?, &want_b),
            ] {
                let got = got.expect("cpu f32");
                assert_eq!(got.dims(), want.dims());
                let err = max_diff(&got, want)?;
                assert!(err < 1e-4, "max abs error {err}");
            }
        }
        // another dtype or a wrong bias length: not taken
        assert!(linear(&x.to_dtype(DType::F64)?, &w, WeightLayout::OutIn, None)?.is_none());
        assert!(linear(&x, &w, WeightLayout::OutIn, Some(&bias.narrow(0, 0, 3)?))?.is_none());
        Ok(())
    }

    #[test]
    fn gelu_matches_candle() -> Result<()> {
        // several chunks and a tail
        let x = Tensor::randn(0f32, 3f32, (3, 2 * ELEMWISE_CHUNK / 3 + 7), &Device::Cpu)?;
        let ours = gelu_tanh(&x)?.expect("cpu f32");
        let theirs = x.gelu()?;
        let d = max_diff(&ours, &theirs)?;
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
        let ours = attention(&q, &q, &q, Some(&bias), 0.3, AttentionOut::Heads)?.expect("cpu f32");
        let scores =
            (q.matmul(&q.transpose(2, 3)?)? * 0.3)?.broadcast_add(&bias.reshape((b, 1, s, s))?)?;
        let naive = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&q)?;
        let diff = max_diff(&ours, &naive)?;
        assert!(diff < 1e-5, "max diff {diff}");
        // the heads merged back: [B, Sq, H·D], two query blocks per head
        let merged =
            attention(&q, &q, &q, Some(&bias), 0.3, AttentionOut::Merged)?.expect("cpu f32");
        let want = naive.transpose(1, 2)?.reshape((b, s, h * d))?;
        let diff = max_diff(&merged, &want)?;
        assert!(diff < 1e-5, "merged: max diff {diff}");
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
        let ours = attention(&q, &k, &v, Some(&bias), 0.25, AttentionOut::Heads)?.expect("cpu f32");
        let scores = (q.matmul(&k.transpose(2, 3)?)? * 0.25)?
            .broadcast_add(&bias.reshape((b, 1, 1, sk))?)?;
        let naive = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        let diff = max_diff(&ours, &naive)?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }
}
