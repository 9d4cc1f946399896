//! The Qwen2.5-VL language model, text path only (transformers 5.23
//! `models/qwen2_5_vl/modeling_qwen2_5_vl.py` `Qwen2_5_VLTextModel`): token embeddings, decoder layers
//! (RMSNorm, GQA attention with q/k/v biases, rotate-half RoPE, SwiGLU MLP), final RMSNorm. The output is
//! `hidden_states[-1]`, which is the output AFTER the final norm (reference §2.2 and pitfall "post-norm").
//!
//! For text-only input the multimodal RoPE (mRoPE) reduces to ordinary 1-D RoPE with positions
//! `0..L` (reference §2.3). With pictures in the prompt (Qwen-Image-Edit), [`Qwen25VlTextModel::forward_embeds`]
//! takes the spliced embeddings and 3-D positions (temporal, row, column; `get_rope_index`, see
//! [`crate::edit_prompt`]), and the head dimension is split by `mrope_section` into the three axes
//! (`Qwen2_5_VLRotaryEmbedding.recomposition_frequencies`). The vision tower lives in [`crate::vision`];
//! `lm_head` is never loaded.

use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;

use crate::nn::{Embedding, Linear, RmsNorm, attention, linear_fused};
use crate::snapshot::Snapshot;
use crate::weights::VarBuilder;

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// `Qwen2_5_VLTextConfig.rms_norm_eps` default.
fn default_rms_norm_eps() -> f64 {
    1e-6
}
/// `Qwen2_5_VLTextConfig.default_theta` (1e6; also the released 7B config, reference §2.1).
const DEFAULT_ROPE_THETA: f64 = 1_000_000.0;
fn default_hidden_act() -> String {
    "silu".to_string()
}
/// `Qwen2_5_VLRotaryEmbedding`: `config.rope_parameters.get("mrope_section", [16, 24, 24])`.
const DEFAULT_MROPE_SECTION: [usize; 3] = [16, 24, 24];

/// The text part of `text_encoder/config.json`, same field names as `Qwen2_5_VLTextConfig`. Unknown keys are
/// ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `None` means `num_attention_heads` (transformers' backward-compatibility default).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// transformers 4 style; transformers 5 moves it into `rope_parameters`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers 4 style (`{type: "mrope", mrope_section: [..]}`); wins over `rope_parameters` as in
    /// `Qwen2_5_VLTextConfig.convert_rope_params_to_dict`.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5 style (`{rope_type: "default", rope_theta: .., mrope_section: [..]}`).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub use_sliding_window: bool,
}

impl TextConfig {
    /// The text model of the released Qwen/Qwen-Image `text_encoder/config.json` (Qwen2.5-VL-7B-Instruct):
    /// hidden 3584, 28 layers, 28 heads / 4 kv heads, intermediate 18944, vocab 152064, rms eps 1e-6, rope theta
    /// 1e6, silu (shared/reference/vae-text-encoder-tokenizer.md §2.1).
    pub fn qwen25_vl_7b() -> Self {
        Self {
            vocab_size: 152_064,
            hidden_size: 3584,
            intermediate_size: 18_944,
            num_hidden_layers: 28,
            num_attention_heads: 28,
            num_key_value_heads: Some(4),
            rms_norm_eps: 1e-6,
            hidden_act: "silu".to_string(),
            rope_theta: Some(DEFAULT_ROPE_THETA),
            rope_scaling: None,
            rope_parameters: None,
            use_sliding_window: false,
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `hidden_size / num_attention_heads` (Qwen2_5_VLAttention has no separate head_dim).
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// RoPE theta: `rope_scaling`/`rope_parameters` `rope_theta`, else top-level `rope_theta`, else 1e6.
    pub fn rope_theta(&self) -> f64 {
        self.rope_params()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .or(self.rope_theta)
            .unwrap_or(DEFAULT_ROPE_THETA)
    }

    /// `mrope_section` (`rope_scaling` / `rope_parameters`), else `[16, 24, 24]`: how many of the `head_dim / 2`
    /// frequencies follow the temporal, row and column position.
    pub fn mrope_section(&self) -> Vec<usize> {
        self.rope_params()
            .and_then(|p| p.get("mrope_section"))
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .unwrap_or_else(|| DEFAULT_MROPE_SECTION.to_vec())
    }

    fn rope_params(&self) -> Option<&serde_json::Map<String, serde_json::Value>> {
        self.rope_scaling
            .as_ref()
            .and_then(|v| v.as_object())
            .filter(|o| !o.is_empty())
            .or_else(|| self.rope_parameters.as_ref().and_then(|v| v.as_object()))
    }

    /// Rejects what this implementation does not do (other RoPE types, sliding windows, other activations,
    /// inconsistent head counts).
    pub fn validate(&self) -> Result<()> {
        let h = self.num_attention_heads;
        let kv = self.num_kv_heads();
        if h == 0 || self.hidden_size % h != 0 {
            return Err(err(format!(
                "text_encoder config: hidden_size {} is not divisible by num_attention_heads {h}",
                self.hidden_size
            )));
        }
        if kv == 0 || h % kv != 0 {
            return Err(err(format!(
                "text_encoder config: num_attention_heads {h} is not a multiple of num_key_value_heads {kv}"
            )));
        }
        if self.head_dim() % 2 != 0 {
            return Err(err(format!(
                "text_encoder config: head_dim {} must be even for RoPE",
                self.head_dim()
            )));
        }
        if self.hidden_act != "silu" {
            return Err(err(format!(
                "text_encoder config: hidden_act `{}` is not supported (only silu)",
                self.hidden_act
            )));
        }
        if self.use_sliding_window {
            return Err(err(
                "text_encoder config: use_sliding_window=true is not supported",
            ));
        }
        if let Some(p) = self.rope_params() {
            let ty = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            // "mrope" becomes "default" in transformers 5; for text-only input both are plain RoPE (§2.3).
            if ty != "default" && ty != "mrope" {
                return Err(err(format!(
                    "text_encoder config: rope type `{ty}` is not supported (default/mrope only)"
                )));
            }
        }
        Ok(())
    }
}

/// `text_encoder/config.json`: transformers-4 style (text fields at the top level) or transformers-5 style
/// (nested `text_config`). `text_config` is used when it holds `hidden_size`; otherwise the top level.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "serde_json::Value")]
pub struct TextEncoderConfig {
    pub text: TextConfig,
}

impl TryFrom<serde_json::Value> for TextEncoderConfig {
    type Error = String;

    fn try_from(v: serde_json::Value) -> std::result::Result<Self, String> {
        let nested = v
            .get("text_config")
            .filter(|t| t.get("hidden_size").is_some());
        let (src, where_) = match nested {
            Some(t) => (t.clone(), "text_config"),
            None => (v, "top level"),
        };
        let text: TextConfig = serde_json::from_value(src)
            .map_err(|e| format!("text model fields ({where_}): {e}"))?;
        Ok(Self { text })
    }
}

/// RoPE cos/sin tables `[L, head_dim/2]` for positions `0..len` (`Qwen2_5_VLRotaryEmbedding`: inv_freq and
/// the angles in f32, then cast to the activation dtype).
pub fn rope_tables(
    theta: f64,
    head_dim: usize,
    len: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    // inv_freq[j] = 1 / theta^(2j / head_dim), computed in f32 like `torch.arange(0, dim, 2).float() / dim`.
    let inv_freq: Vec<f32> = (0..half)
        .map(|j| 1.0f32 / (theta as f32).powf((2 * j) as f32 / head_dim as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?; // [1, D/2]
    let pos = Tensor::arange(0u32, len as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((len, 1))?; // [L, 1]
    let freqs = pos.matmul(&inv_freq)?; // [L, D/2]
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

/// Multimodal RoPE position of one token: (temporal, row, column); text tokens have the same value thrice.
pub type MropePosition = [u32; 3];

/// mRoPE cos/sin tables `[B, L, head_dim/2]` for per-sample positions (`Qwen2_5_VLRotaryEmbedding.forward`):
/// frequency `j` turns with axis `a(j)`, the chunk of `mrope_section` it falls in (`freq.split(mrope_section)`,
/// chunk `i` taken from axis `i % 3`); angles `pos · inv_freq` in f32, then cast to the activation dtype.
pub fn mrope_tables(
    theta: f64,
    head_dim: usize,
    section: &[usize],
    positions: &[Vec<MropePosition>],
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    if section.iter().sum::<usize>() != half {
        return Err(err(format!(
            "text_encoder config: mrope_section {section:?} must sum to head_dim / 2 = {half}"
        )));
    }
    let b = positions.len();
    let l = positions.first().map_or(0, Vec::len);
    if positions.iter().any(|p| p.len() != l) {
        return Err(err("mrope positions: every sample needs the same length"));
    }
    let axis: Vec<usize> = section
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| std::iter::repeat_n(i % 3, n))
        .collect();
    let inv_freq: Vec<f32> = (0..half)
        .map(|j| 1.0f32 / (theta as f32).powf((2 * j) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(b * l * half);
    let mut sin = Vec::with_capacity(b * l * half);
    for sample in positions {
        for pos in sample {
            for j in 0..half {
                let a = pos[axis[j]] as f32 * inv_freq[j];
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (b, l, half), device)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (b, l, half), device)?.to_dtype(dtype)?,
    ))
}

/// Additive attention bias `[B, 1, L, L]`: 0 where key `j <= i` and key `j` is a real token, -inf otherwise.
pub fn causal_padding_bias(
    mask: Option<&Tensor>,
    b: usize,
    len: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let keys: Vec<u8> = match mask {
        Some(m) => {
            let m = m.to_dtype(DType::F32)?.ge(0.5)?.to_dtype(DType::U8)?; // [B, L]
            if m.dims() != [b, len] {
                return Err(err(format!(
                    "attention mask has shape {:?}, expected [{b}, {len}]",
                    m.dims()
                )));
            }
            m.flatten_all()?.to_vec1()?
        }
        None => vec![1; b * len],
    };
    let mut bias = vec![f32::NEG_INFINITY; b * len * len];
    for bi in 0..b {
        for i in 0..len {
            let row = &mut bias[(bi * len + i) * len..(bi * len + i + 1) * len];
            for (j, v) in row.iter_mut().enumerate().take(i + 1) {
                if keys[bi * len + j] != 0 {
                    *v = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, len, len), device)?.to_dtype(dtype)
}

/// `Qwen2_5_VLAttention` (text): q/k/v with biases, o_proj without.
#[derive(Debug, Clone)]
struct Attention {
    /// q_proj | k_proj | v_proj fused along the output dim: `[(H + 2 KV) D, hidden]` (one matmul).
    qkv_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, kv, d) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let hs = cfg.hidden_size;
        // Loaded under the checkpoint names, then fused: [H D | KV D | KV D, hidden] and [H D + 2 KV D].
        let qkv = [
            (h * d, vb.pp("q_proj")),
            (kv * d, vb.pp("k_proj")),
            (kv * d, vb.pp("v_proj")),
        ];
        Ok(Self {
            qkv_proj: linear_fused(hs, &qkv, true)?,
            o_proj: linear_fused(h * d, &[(hs, vb.pp("o_proj"))], false)?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        })
    }

    /// `x`: `[B, L, hidden]`, `cos`/`sin`: `[L, D/2]` or `[B, L, D/2]` (mRoPE), `bias`: `[B, 1, g L, L]` (the causal/padding bias tiled
    /// `g = H / KV` times along the query rows, see [`Qwen25VlTextModel::forward`]). Returns `[B, L, hidden]`.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let n = h + 2 * kv;
        let qkv = self.qkv_proj.forward(x)?; // [B, L, (H + 2 KV) D]
        // [B, L, N, D] -> [B, N, L, D] with heads q_0..q_H-1 | k_0..k_KV-1 | v_0..v_KV-1
        let qkv = qkv.reshape((b, l, n, d))?.transpose(1, 2)?.contiguous()?;
        // Rotate-half (NeoX) RoPE on q and k together, not the interleaved form (reference §2.3).
        let qk = candle_nn::rotary_emb::rope(&qkv.narrow(1, 0, h + kv)?.contiguous()?, cos, sin)?; // [B, H+KV, L, D]
        let k = qk.narrow(1, h, kv)?; // [B, KV, L, D]
        let v = qkv.narrow(1, h + kv, kv)?; // [B, KV, L, D]
        // GQA: kv head j serves q heads j*g .. j*g+g-1 (repeat_interleave, reference §2.2). Instead of repeating
        // k/v, the g query heads of a group are stacked along the rows: [B, H, L, D] -> [B, KV, g L, D].
        let group = h / kv;
        let q = qk
            .narrow(1, 0, h)?
            .contiguous()?
            .reshape((b, kv, group * l, d))?;
        let o = attention(&q, &k, &v, Some(bias), 1.0 / (d as f64).sqrt())?; // [B, KV, g L, D]
        // [B, KV, g L, D] -> [B, H, L, D] -> [B, L, H, D] -> [B, L, H D]
        let o = o
            .reshape((b, h, l, d))?
            .transpose(1, 2)?
            .reshape((b, l, h * d))?;
        self.o_proj.forward(&o)
    }
}

/// `Qwen2MLP`: `down(silu(gate(x)) * up(x))`, no biases.
#[derive(Debug, Clone)]
struct Mlp {
    /// gate_proj | up_proj fused along the output dim: `[2 I, hidden]` (one matmul).
    gate_up_proj: Linear,
    down_proj: Linear,
    intermediate: usize,
}

impl Mlp {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (hs, is) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up_proj: linear_fused(
                hs,
                &[(is, vb.pp("gate_proj")), (is, vb.pp("up_proj"))],
                false,
            )?,
            down_proj: linear_fused(is, &[(hs, vb.pp("down_proj"))], false)?,
            intermediate: is,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up_proj.forward(x)?; // [B, L, 2 I]
        let gate = candle_nn::ops::silu(&gu.narrow(2, 0, self.intermediate)?)?;
        let up = gu.narrow(2, self.intermediate, self.intermediate)?;
        self.down_proj.forward(&(gate * up)?)
    }
}

/// `Qwen2_5_VLDecoderLayer`.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let eps = cfg.rms_norm_eps as f32;
        Ok(Self {
            input_layernorm: RmsNorm::new(cfg.hidden_size, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, bias)?)?;
        &h + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?
    }
}

/// Which checkpoint naming the weights use (reference §2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightNaming {
    /// `model.language_model.{embed_tokens,layers.N,norm}` (transformers >= 4.52 / 5 native).
    LanguageModel,
    /// `model.{embed_tokens,layers.N,norm}` (the released Qwen/Qwen-Image `text_encoder/`).
    Legacy,
}

impl WeightNaming {
    /// The prefix of the text model's tensors.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::LanguageModel => "model.language_model",
            Self::Legacy => "model",
        }
    }
}

/// The Qwen2.5-VL text model. `forward` returns `hidden_states[-1]` (post final norm).
#[derive(Debug, Clone)]
pub struct Qwen25VlTextModel {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    cfg: TextConfig,
    dtype: DType,
    device: Device,
}

impl Qwen25VlTextModel {
    /// Builds the text model from `vb` rooted at the text model's prefix (see [`WeightNaming::prefix`]).
    pub fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let embed_tokens = Embedding::new(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps as f32, vb.pp("norm"))?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Loads the `text_encoder` component of a snapshot in `dtype` on `device`: reads the config (either
    /// style), detects the weight naming, and loads the text weights only (never `visual.*` or `lm_head`).
    pub fn load(snapshot: &Snapshot, dtype: DType, device: &Device) -> Result<Self> {
        let cfg: TextEncoderConfig = snapshot.config("text_encoder", "config.json")?;
        let dir = snapshot.component_dir("text_encoder")?;
        let weights = crate::snapshot::Weights::open_dir(&dir)?;
        let naming = detect_naming(&weights).ok_or_else(|| {
            err(format!(
                "{}: neither `model.language_model.embed_tokens.weight` nor `model.embed_tokens.weight` found; \
                 not a Qwen2.5-VL text encoder",
                dir.display()
            ))
        })?;
        let vb = VarBuilder::from_store(weights, dtype, device);
        Self::new(&cfg.text, vb.pp(naming.prefix()))
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token embeddings `[B, L, hidden]` of `input_ids [B, L]`; ids outside the vocabulary are an error.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, l) = input_ids.dims2()?;
        let ids = input_ids.to_dtype(DType::U32)?;
        let max_id = ids.max_all()?.to_scalar::<u32>()? as usize;
        if l > 0 && max_id >= self.cfg.vocab_size {
            return Err(err(format!(
                "token id {max_id} is outside the text encoder's vocabulary ({})",
                self.cfg.vocab_size
            )));
        }
        self.embed_tokens.forward(&ids, self.dtype)
    }

    /// `input_ids`: `[B, L]` (u32), `attention_mask`: optional `[B, L]` 0/1 (right padding only: positions
    /// are `0..L` as in transformers 5). Returns `hidden_states[-1]`, `[B, L, hidden]`, in the model dtype.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self.embed(input_ids)?; // [B, L, hidden]
        self.forward_embeds(h, attention_mask, None)
    }

    /// The decoder layers and final norm over given input embeddings `[B, L, hidden]` (e.g. with vision
    /// embeddings spliced in). `positions`: per-sample mRoPE positions (`[B][L]`), or `None` for `0..L` on all
    /// three axes (what transformers does when it gets no `position_ids`).
    pub fn forward_embeds(
        &self,
        mut h: Tensor,
        attention_mask: Option<&Tensor>,
        positions: Option<&[Vec<MropePosition>]>,
    ) -> Result<Tensor> {
        let (b, l, _) = h.dims3()?;
        let (cos, sin) = match positions {
            None => rope_tables(
                self.cfg.rope_theta(),
                self.cfg.head_dim(),
                l,
                self.dtype,
                &self.device,
            )?,
            Some(p) => {
                if p.len() != b || p.iter().any(|s| s.len() != l) {
                    return Err(err(format!(
                        "mrope positions must be [{b}][{l}] for embeddings [{b}, {l}, _]"
                    )));
                }
                mrope_tables(
                    self.cfg.rope_theta(),
                    self.cfg.head_dim(),
                    &self.cfg.mrope_section(),
                    p,
                    self.dtype,
                    &self.device,
                )?
            }
        };
        let bias = causal_padding_bias(attention_mask, b, l, self.dtype, &self.device)?; // [B, 1, L, L]
        // Tiled for the grouped query rows of `Attention::forward`: [B, 1, g L, L] (row r is query r mod L).
        let group = self.cfg.num_attention_heads / self.cfg.num_kv_heads();
        let bias = if group > 1 {
            Tensor::cat(&vec![&bias; group], 2)?
        } else {
            bias
        };
        for layer in &self.layers {
            crate::interrupt::check()?;
            h = layer.forward(&h, &cos, &sin, &bias)?;
        }
        self.norm.forward(&h)
    }
}

/// `model.language_model.embed_tokens.weight` first, then `model.embed_tokens.weight` (reference §2.5).
pub fn detect_naming(weights: &crate::snapshot::Weights) -> Option<WeightNaming> {
    [WeightNaming::LanguageModel, WeightNaming::Legacy]
        .into_iter()
        .find(|n| weights.contains(&format!("{}.embed_tokens.weight", n.prefix())))
}
