//! The fused "prologue + zero padding + im2col" step of the VAE's 3x3 convs, for f32 tensors on the CPU.
//!
//! Activations are channels-last (`[H, W, C]`). For a band of output rows `[y0, y0 + rows)` of a 3x3,
//! stride-1, padding-1 conv, [`band_cols`] writes the im2col matrix `[rows·(W+2), 9C + 1]` in one pass over
//! the band's input rows: the input is first written (through the prologue: RMS norm + SiLU, or 2x nearest
//! upsampling) into a zero-padded band buffer `[(rows+3)·(W+2), C]`, in which tap (dy, dx) of every output
//! pixel `p` (counted on the padded width) is pixel `p + dy·(W+2) + dx`; each row of the im2col matrix is
//! then 9 copies of C contiguous floats plus a 1 for the bias. Output pixels in the 2 padding columns of each
//! row are computed by the GEMM and dropped by the caller. Candle's elementwise ops would need ~12 passes
//! (and as many full-size temporaries) for the same work.

use candle_core::{Result, Storage, Tensor, bail};
use rayon::prelude::*;

/// What happens to the conv input before zero padding.
pub(super) enum Prologue<'a> {
    None,
    /// `silu(x / max(‖x‖₂, eps) · scale · gamma[c])` per pixel (`QwenImageRMS_norm` then SiLU).
    NormSilu {
        gamma: &'a [f32],
        scale: f32,
        eps: f32,
    },
    /// 2x nearest: conv-input pixel (y, x) is source pixel (y / 2, x / 2).
    Upsample2x,
}

/// Runs `f` on the contiguous f32 CPU data of `t`; errors for other dtypes / devices / layouts.
pub(super) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*guard else {
        bail!("vae im2col: expected a CPU tensor")
    };
    if !layout.is_contiguous() {
        bail!("vae im2col: expected a contiguous tensor");
    }
    let data = cpu.as_slice::<f32>()?;
    let start = layout.start_offset();
    Ok(f(&data[start..start + layout.shape().elem_count()]))
}

/// im2col values below which one thread builds a band: splitting a small band costs more in hand-offs than
/// it saves (a 64x64 decode of the default model took 9 ms on 2 threads against 7 ms on one).
const MIN_PARALLEL_VALUES: usize = 1 << 16;

/// `x`: source `[h_in, w_in, c]` (row-major slice); output rows `[y0, y0 + rows)` of an `h x w` conv output
/// (`h = 2·h_in` when upsampling). Returns the im2col matrix `[rows·(w+2), 9c + 1]`, row-major, built on up to
/// `threads` tasks of the calling thread's rayon pool, one per run of consecutive rows (one matrix per run,
/// in order); small bands are built on the calling thread alone.
pub(super) fn band_cols(
    x: &[f32],
    dims: (usize, usize, usize),
    out_hw: (usize, usize),
    y0: usize,
    rows: usize,
    prologue: &Prologue,
    threads: usize,
) -> Vec<(usize, Vec<f32>)> {
    let values = rows * (out_hw.1 + 2) * (9 * dims.2 + 1);
    let threads = if values < MIN_PARALLEL_VALUES {
        1
    } else {
        threads.clamp(1, rows)
    };
    if threads == 1 {
        return vec![(rows, sub_band_cols(x, dims, out_hw, y0, rows, prologue))];
    }
    let per = rows.div_ceil(threads);
    let starts: Vec<usize> = (0..rows).step_by(per).collect();
    starts
        .into_par_iter()
        .map(|r0| {
            let n = per.min(rows - r0);
            (n, sub_band_cols(x, dims, out_hw, y0 + r0, n, prologue))
        })
        .collect()
}

fn sub_band_cols(
    x: &[f32],
    (h_in, w_in, c): (usize, usize, usize),
    (h, w): (usize, usize),
    y0: usize,
    rows: usize,
    prologue: &Prologue,
) -> Vec<f32> {
    let wp = w + 2;
    // zero-padded band buffer: conv-input rows y0-1 .. y0+rows+1, plus one spare zero row for the last tap
    let mut band = vec![0f32; (rows + 3) * wp * c];
    for r in 0..rows + 2 {
        let Some(yy) = (y0 + r).checked_sub(1) else {
            continue;
        };
        if yy >= h {
            continue;
        }
        for xx in 0..w {
            let (sy, sx) = match prologue {
                Prologue::Upsample2x => (yy / 2, xx / 2),
                _ => (yy, xx),
            };
            debug_assert!(sy < h_in && sx < w_in);
            let src = &x[(sy * w_in + sx) * c..][..c];
            let dst = &mut band[(r * wp + xx + 1) * c..][..c];
            match prologue {
                Prologue::None | Prologue::Upsample2x => dst.copy_from_slice(src),
                Prologue::NormSilu { gamma, scale, eps } => {
                    crate::cpu_kernels::norm_silu(dst, src, gamma, *scale, *eps)
                }
            }
        }
    }
    // every element is written once, in order: no zero fill of the (large) matrix
    let n = rows * wp;
    let mut cols = Vec::with_capacity(n * (9 * c + 1));
    for p in 0..n {
        for t in 0..9 {
            let q = p + (t / 3) * wp + t % 3;
            cols.extend_from_slice(&band[q * c..(q + 1) * c]);
        }
        cols.push(1.0);
    }
    cols
}
