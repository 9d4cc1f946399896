//! Small building blocks shared by the model components: one linear-layer type, embeddings, norms, attention.
//!
//! Every model file loads its linears through [`linear`] / [`linear_no_bias`] / [`linear_fused`]: the weight is
//! dense (f32/bf16/f16) or kept as stored in the file (ggml blocks from GGUF, fp8 e4m3fn from ComfyUI files),
//! whichever the [`VarBuilder`] finds, and [`Linear::forward`] is the one place it is applied.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{D, DType, Device, Module, Result, Tensor};

use crate::cpu_kernels::{self, AttentionOut, WeightLayout};
use crate::lora::LoraTerm;
use crate::weights::{EmbeddingTable, LinearWeight, PackedWeight, Part, QuantMatmul, VarBuilder};

/// How a [`Linear`] holds its weight.
#[derive(Debug, Clone)]
enum Weight {
    /// `[out, in]` in the stage dtype (candle's Linear: `x · Wᵀ` through a transposed view).
    Dense(candle_nn::Linear),
    /// `Wᵀ` stored contiguous `[in, out]` ([`Linear::from_tensors`]): the CPU matmul then reads the weight
    /// row-major, ~15% faster for the text encoder's small-M matmuls. Same memory.
    DenseT(Tensor),
    /// Quantized (ggml) or fp8 row parts, turned into the activation dtype at each forward.
    Packed(Arc<PackedWeight>),
}

/// A linear layer `y = x Wᵀ + b` with PyTorch's `[out, in]` weight layout, plus the LoRA terms attached to
/// this copy of the layer ([`Linear::with_lora`]; the base weight is shared, never copied).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    lora: Vec<LoraTerm>,
}

impl Linear {
    /// From a `[out, in]` weight and optional `[out]` bias already loaded (e.g. fused projections); the
    /// weight is stored transposed (one copy at load time).
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let wt = weight.t()?.contiguous()?; // [in, out]
        Ok(Self {
            weight: Weight::DenseT(wt),
            bias,
            lora: Vec::new(),
        })
    }

    /// From a loaded [`LinearWeight`] (dense weights keep candle's layout, as [`linear`] always did).
    fn from_weight(
        w: LinearWeight,
        in_dim: usize,
        bias: Option<Tensor>,
        matmul: QuantMatmul,
    ) -> Result<Self> {
        let weight = match w {
            // On the CPU, f32 weights are stored transposed (one copy at load): `gemm` then reads them
            // row-major and packs them faster (see `Linear::forward`'s figures in the README).
            LinearWeight::Dense(w) if w.device().is_cpu() && w.dtype() == DType::F32 => {
                Weight::DenseT(w.t()?.contiguous()?)
            }
            LinearWeight::Dense(w) => Weight::Dense(candle_nn::Linear::new(w, None)),
            LinearWeight::Packed(parts) => {
                Weight::Packed(Arc::new(PackedWeight::new(parts, in_dim, matmul)?))
            }
        };
        Ok(Self {
            weight,
            bias,
            lora: Vec::new(),
        })
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match &self.weight {
            Weight::Dense(l) => {
                let (out, inp) = l.weight().dims2()?;
                (inp, out)
            }
            Weight::DenseT(wt) => wt.dims2()?,
            Weight::Packed(p) => (p.in_dim(), p.out_dim()),
        })
    }

    /// This layer with `terms` added to its LoRA terms (the base weight and bias are shared with `self`).
    pub fn with_lora(&self, terms: impl IntoIterator<Item = LoraTerm>) -> Self {
        let mut out = self.clone();
        out.lora.extend(terms);
        out
    }

    /// The LoRA terms attached to this layer.
    pub fn lora_terms(&self) -> &[LoraTerm] {
        &self.lora
    }

    /// The packed weight when this layer is quantized or fp8.
    pub fn packed(&self) -> Option<&PackedWeight> {
        match &self.weight {
            Weight::Packed(p) => Some(p),
            _ => None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = match &self.weight {
            // CPU f32 (kept transposed, see `from_weight`): one GEMM that also adds the bias
            Weight::DenseT(wt) => {
                match cpu_kernels::linear(x, wt, WeightLayout::InOut, self.bias.as_ref())? {
                    Some(y) => y,
                    None => self.add_bias(x.broadcast_matmul(wt)?)?, // [.., in] x [in, out]
                }
            }
            Weight::Dense(l) => self.add_bias(l.forward(x)?)?,
            Weight::Packed(p) => self.add_bias(p.matmul(x)?)?,
        };
        // PEFT's LoRA Linear: `result = base_layer(x)`, then `result += lora_B(lora_A(x)) · scaling` per adapter
        for term in &self.lora {
            y = (y + term.delta(x)?)?;
        }
        Ok(y)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
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
    let w = vb.linear_weight(out_dim, in_dim, "weight")?;
    let b = vb.get(out_dim, "bias")?;
    Linear::from_weight(w, in_dim, Some(b), vb.quant_matmul())
}

/// Loads `vb.weight [out, in]` only.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.linear_weight(out_dim, in_dim, "weight")?;
    Linear::from_weight(w, in_dim, None, vb.quant_matmul())
}

/// One linear made of several checkpoint projections stacked along the output (e.g. q|k|v): `parts` are
/// `(out_dim, builder)` in order, each with `weight [out_dim, in_dim]` and, when `bias`, `bias [out_dim]`.
/// Dense weights are concatenated and stored transposed ([`Linear::from_tensors`]); when any part is quantized
/// or fp8 the parts stay as stored, side by side.
pub fn linear_fused(in_dim: usize, parts: &[(usize, VarBuilder)], bias: bool) -> Result<Linear> {
    let Some((_, first)) = parts.first() else {
        candle_core::bail!("linear_fused: no parts");
    };
    let mut weights = Vec::with_capacity(parts.len());
    let mut biases = Vec::with_capacity(parts.len());
    for (out, vb) in parts {
        weights.push(vb.linear_weight(*out, in_dim, "weight")?);
        if bias {
            biases.push(vb.get(*out, "bias")?);
        }
    }
    let bias = if bias {
        Some(Tensor::cat(&biases, 0)?)
    } else {
        None
    };
    if weights.iter().all(|w| matches!(w, LinearWeight::Dense(_))) {
        let dense: Vec<Tensor> = weights
            .into_iter()
            .filter_map(|w| match w {
                LinearWeight::Dense(t) => Some(t),
                LinearWeight::Packed(_) => None,
            })
            .collect();
        return Linear::from_tensors(Tensor::cat(&dense, 0)?, bias);
    }
    let mut all = Vec::new();
    for w in weights {
        match w {
            LinearWeight::Dense(t) => all.push(Part::Dense(t)),
            LinearWeight::Packed(p) => all.extend(p),
        }
    }
    Linear::from_weight(
        LinearWeight::Packed(all),
        in_dim,
        bias,
        first.quant_matmul(),
    )
}

/// A token embedding table: dense, or ggml blocks whose rows are dequantized on lookup (a llama.cpp text
/// encoder's `token_embd` stays quantized: 545M values for Qwen2.5-VL-7B).
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Table,
    hidden: usize,
}

#[derive(Debug, Clone)]
enum Table {
    Dense(Tensor),
    Ggml(Arc<QTensor>),
}

impl Embedding {
    /// Loads `vb.weight [vocab, hidden]`.
    pub fn new(vocab: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let table = match vb.embedding_table(vocab, hidden, "weight")? {
            EmbeddingTable::Dense(t) => Table::Dense(t),
            EmbeddingTable::Ggml(q) => Table::Ggml(q),
        };
        Ok(Self { table, hidden })
    }

    /// `ids` `[..]` (u32) → `[.., hidden]` in `dtype`.
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.hidden);
        let flat = ids.flatten_all()?;
        let rows = match &self.table {
            Table::Dense(t) => t.index_select(&flat, 0)?,
            Table::Ggml(q) => q.embedding(&flat)?,
        };
        rows.reshape(dims)?.to_dtype(dtype)
    }
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

    /// The gain `[dim]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f32 {
        self.eps
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
    attention_in(q, k, v, key_bias, scale, AttentionOut::Heads)
}

/// [`attention`] with the heads merged back: `[B, Sq, H·D]`, ready for the output projection (on the CPU
/// the kernel writes this layout directly, saving the transposing copy).
pub fn attention_merged(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    attention_in(q, k, v, key_bias, scale, AttentionOut::Merged)
}

fn attention_in(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    scale: f64,
    layout: AttentionOut,
) -> Result<Tensor> {
    let (b, _h, sq, _d) = q.dims4()?;
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        let bias = match key_bias {
            None => None,
            Some(t) if t.dims().len() == 4 && t.dim(2)? == 1 => Some(t.reshape((b, 1, ()))?),
            Some(t) => Some(t.reshape((b, sq, ()))?),
        };
        if let Some(out) = crate::cpu_kernels::attention(q, k, v, bias.as_ref(), scale, layout)? {
            return Ok(out);
        }
    }
    let kt = k.transpose(2, 3)?.contiguous()?; // [B, H, D, Sk]
    let v = v.contiguous()?;
    let mut outs = Vec::with_capacity(sq.div_ceil(QUERY_CHUNK));
    let mut start = 0;
    while start < sq {
        crate::interrupt::check()?;
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
    let out = if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(&outs, 2)?
    };
    match layout {
        AttentionOut::Heads => Ok(out),
        AttentionOut::Merged => {
            let (b, h, sq, d) = out.dims4()?;
            out.transpose(1, 2)?.reshape((b, sq, h * d))
        }
    }
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

/// True when every element of `t` is finite (its f32 sum is: NaN and infinities propagate; a sum that
/// overflows counts as non-finite too, which only values near f32::MAX can cause).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?
        .is_finite())
}
