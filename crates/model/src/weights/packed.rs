//! Linear weights kept as the file stores them (ggml blocks, fp8) and turned into the activation dtype at
//! forward time.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// Values per stored part: a weight is split into row blocks of about this size at load, so that its
/// dequantization runs in parallel on the CPU (and a fused projection is a list of parts).
pub const PART_ELEMS: usize = 1 << 20;

/// How a packed (quantized or fp8) weight is multiplied on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantMatmul {
    /// `Dequantize` on the CPU, `Native` on GPUs.
    #[default]
    Auto,
    /// Dequantize the layer's weight into the activation dtype, then a dense matmul: the arithmetic of
    /// diffusers' GGUF path (`GGUFLinear.forward_native`) and of ComfyUI's fp8 cast path, and no repacked copy.
    Dequantize,
    /// candle's quantized matmul (`QMatMul`): activations are quantized to 8 bits per block (less exact; on
    /// x86 candle keeps a repacked copy of Q4_K/Q6_K/Q8_0 weights after the first call). fp8 parts are always
    /// dequantized.
    Native,
}

impl QuantMatmul {
    /// `Auto` resolved for `device`.
    pub fn resolve(self, device: &Device) -> Self {
        match self {
            Self::Auto if device.is_cpu() => Self::Dequantize,
            Self::Auto => Self::Native,
            other => other,
        }
    }
}

/// One block of rows `[rows, in]` of a weight.
#[derive(Debug, Clone)]
pub enum Part {
    /// ggml blocks from a GGUF file.
    Ggml(Arc<QTensor>),
    /// fp8 e4m3fn values; the weight is `w · scale` (ComfyUI `scale_weight` / `weight_scale`, absent = 1).
    Fp8 { weight: Tensor, scale: Option<f64> },
    /// Plain values in the stage dtype (a dense projection fused with packed ones).
    Dense(Tensor),
}

impl Part {
    pub fn rows(&self) -> Result<usize> {
        match self {
            Part::Ggml(q) => q.shape().dims2().map(|d| d.0),
            Part::Fp8 { weight, .. } | Part::Dense(weight) => weight.dim(0),
        }
    }

    /// The `[rows, in]` values in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        match self {
            // ggml dequantizes to f32 (`dequantize_row_*`), diffusers then casts to compute_dtype
            Part::Ggml(q) => q.dequantize(&q.device())?.to_dtype(dtype),
            // ComfyUI TensorCoreFP8Layout.dequantize: `qdata.to(orig_dtype)` then `mul_(scale)`
            Part::Fp8 { weight, scale } => {
                let w = weight.to_dtype(dtype)?;
                match scale {
                    Some(s) => w.affine(*s, 0.0),
                    None => Ok(w),
                }
            }
            Part::Dense(w) => w.to_dtype(dtype),
        }
    }
}

/// A linear weight `[out, in]` stored as row parts.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    parts: Vec<Part>,
    in_dim: usize,
    out_dim: usize,
    matmul: QuantMatmul,
}

impl PackedWeight {
    /// `parts` stacked along the rows; `matmul` already resolved for the device.
    pub fn new(parts: Vec<Part>, in_dim: usize, matmul: QuantMatmul) -> Result<Self> {
        let mut out_dim = 0;
        for p in &parts {
            out_dim += p.rows()?;
        }
        Ok(Self {
            parts,
            in_dim,
            out_dim,
            matmul,
        })
    }

    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The whole weight `[out, in]` in `dtype` (parts dequantized in parallel on the CPU).
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let on_cpu = self.parts.first().is_some_and(|p| match p {
            Part::Ggml(q) => q.device().is_cpu(),
            Part::Fp8 { weight, .. } | Part::Dense(weight) => weight.device().is_cpu(),
        });
        let parts: Vec<Tensor> = if on_cpu && self.parts.len() > 1 {
            self.parts
                .par_iter()
                .map(|p| p.dequantize(dtype))
                .collect::<Result<_>>()?
        } else {
            self.parts
                .iter()
                .map(|p| p.dequantize(dtype))
                .collect::<Result<_>>()?
        };
        let mut parts = parts;
        if parts.len() == 1 {
            return Ok(parts.swap_remove(0));
        }
        Tensor::cat(&parts, 0)
    }

    /// `x Wᵀ`: `[.., in]` → `[.., out]` in `x`'s dtype.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("linear input must have at least one dimension");
        };
        if k != self.in_dim {
            candle_core::bail!(
                "linear input has {k} features, the weight [{}, {}] expects {}",
                self.out_dim,
                self.in_dim,
                self.in_dim
            );
        }
        let m: usize = lead.iter().product();
        let x2 = x.reshape((m, k))?; // [M, in]
        let y = match self.matmul {
            QuantMatmul::Native => {
                let x2 = x2.contiguous()?;
                let mut cols = Vec::with_capacity(self.parts.len());
                for p in &self.parts {
                    cols.push(match p {
                        Part::Ggml(q) => x2.apply_op1_no_bwd(q.as_ref())?, // [M, rows]
                        other => x2.matmul(&other.dequantize(x.dtype())?.t()?)?,
                    });
                }
                if cols.len() == 1 {
                    cols.remove(0)
                } else {
                    Tensor::cat(&cols, 1)?
                }
            }
            _ => x2.matmul(&self.dequantize(x.dtype())?.t()?)?, // [M, in] x [in, out]
        };
        let mut out = lead.to_vec();
        out.push(self.out_dim);
        y.reshape(out)
    }
}
