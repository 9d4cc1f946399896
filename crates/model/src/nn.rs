//! Small building blocks shared by the model components: one linear-layer type, norms, attention.
//!
//! Every model file loads its linears through [`linear`] / [`linear_no_bias`] so that dense, quantized or
//! offloaded weights can later be swapped in one place.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A linear layer `y = x Wᵀ + b` with PyTorch's `[out, in]` weight layout.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    /// `Wᵀ` stored contiguous `[in, out]` ([`Linear::from_tensors`]): the CPU matmul then reads the weight
    /// row-major, ~15% faster for the text encoder's small-M matmuls. Same memory (replaces `inner`'s weight).
    wt: Option<Tensor>,
}

impl Linear {
    /// From a `[out, in]` weight and optional `[out]` bias already loaded (e.g. fused projections); the
    /// weight is stored transposed (one copy at load time).
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let wt = weight.t()?.contiguous()?; // [in, out]
        // `inner` keeps the bias and a [out, in] view of the same storage for `weight()` users.
        Ok(Self {
            inner: candle_nn::Linear::new(wt.t()?, bias),
            wt: Some(wt),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.wt {
            None => self.inner.forward(x),
            Some(wt) => {
                let y = x.broadcast_matmul(wt)?; // [.., in] x [in, out] -> [.., out]
                match self.inner.bias() {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Linear::forward(self, x)
    }
}

/// Loads `vb.weight [out, in]` and `vb.bias [out]`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        inner: candle_nn::linear(in_dim, out_dim, vb)?,
        wt: None,
    })
}

/// Loads `vb.weight [out, in]` only.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        inner: candle_nn::linear_no_bias(in_dim, out_dim, vb)?,
        wt: None,
    })
}

/// RMSNorm over the last dimension with a learned gain (diffusers/transformers `RMSNorm`, computed in f32).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f32, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if dtype == DType::F32 {
            return candle_nn::ops::rms_norm(x, &self.weight, self.eps);
        }
        // Reduced precision: statistics in f32, cast back, then the gain (diffusers' order).
        let x32 = x.to_dtype(DType::F32)?;
        let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x32.broadcast_mul(&(var + self.eps as f64)?.sqrt()?.recip()?)?;
        y.to_dtype(dtype)?
            .broadcast_mul(&self.weight.to_dtype(dtype)?)
    }
}

/// LayerNorm over the last dimension without affine parameters (`elementwise_affine=False`).
#[derive(Debug, Clone)]
pub struct LayerNormNoAffine {
    ones: Tensor,
    zeros: Tensor,
    eps: f32,
}

impl LayerNormNoAffine {
    pub fn new(dim: usize, eps: f32, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, dtype, device)?,
            zeros: Tensor::zeros(dim, dtype, device)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        if dtype == DType::F32 {
            return candle_nn::ops::layer_norm(x, &self.ones, &self.zeros, self.eps);
        }
        let y = candle_nn::ops::layer_norm(
            &x.to_dtype(DType::F32)?,
            &self.ones.to_dtype(DType::F32)?,
            &self.zeros.to_dtype(DType::F32)?,
            self.eps,
        )?;
        y.to_dtype(dtype)
    }
}

/// tanh-approximated GELU (`GELU(approximate="tanh")`), with a parallel f32 kernel on the CPU.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        if let Some(y) = crate::cpu_kernels::gelu_tanh(x)? {
            return Ok(y);
        }
    }
    // candle's `gelu` is the tanh approximation
    x.gelu()
}

/// Rows of queries processed at once by [`attention`]: bounds the score matrix to
/// `heads × QUERY_CHUNK × keys` elements whatever the image size.
pub const QUERY_CHUNK: usize = 1024;

/// Scaled dot-product attention, `softmax(q kᵀ · scale + bias) v`, chunked over the queries so the score
/// matrix never exceeds `heads × QUERY_CHUNK × keys` (exact: each query row is independent).
///
/// `q`: `[B, H, Sq, D]`, `k`/`v`: `[B, H, Sk, D]`; `key_bias`: optional additive bias `[B, 1, 1, Sk]`
/// (0 for keys to attend, -inf for masked keys) or `[B, 1, Sq, Sk]` (per query, e.g. causal). Returns
/// `[B, H, Sq, D]`. f32 on the CPU runs [`crate::cpu_kernels::attention`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, _h, sq, _d) = q.dims4()?;
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        let bias = match key_bias {
            None => None,
            Some(t) if t.dims().len() == 4 && t.dim(2)? == 1 => Some(t.reshape((b, 1, ()))?),
            Some(t) => Some(t.reshape((b, sq, ()))?),
        };
        if let Some(out) = crate::cpu_kernels::attention(q, k, v, bias.as_ref(), scale)? {
            return Ok(out);
        }
    }
    let kt = k.transpose(2, 3)?.contiguous()?; // [B, H, D, Sk]
    let v = v.contiguous()?;
    let mut outs = Vec::with_capacity(sq.div_ceil(QUERY_CHUNK));
    let mut start = 0;
    while start < sq {
        let len = QUERY_CHUNK.min(sq - start);
        let qc = q.narrow(2, start, len)?.contiguous()?; // [B, H, len, D]
        let mut scores = (qc.matmul(&kt)? * scale)?; // [B, H, len, Sk]
        if let Some(bias) = key_bias {
            // A per-query bias `[B, 1, Sq, Sk]` (e.g. causal) is cut to this chunk's rows.
            let bias = if bias.rank() == 4 && bias.dim(2)? == sq && sq > 1 {
                bias.narrow(2, start, len)?
            } else {
                bias.clone()
            };
            scores = scores.broadcast_add(&bias)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(probs.matmul(&v)?); // [B, H, len, D]
        start += len;
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    Tensor::cat(&outs, 2)
}

/// Additive key bias `[B, 1, 1, S]` from a 0/1 key mask `[B, S]`: 0 where 1, -inf where 0.
pub fn key_bias_from_mask(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?.ge(0.5)?;
    let zeros = Tensor::zeros((b, s), DType::F32, mask.device())?;
    let neg = Tensor::full(f32::NEG_INFINITY, (b, s), mask.device())?;
    keep.where_cond(&zeros, &neg)?
        .to_dtype(dtype)?
        .reshape((b, 1, 1, s))
}
