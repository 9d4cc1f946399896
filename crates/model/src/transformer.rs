//! `QwenImageTransformer2DModel` (diffusers `models/transformers/transformer_qwenimage.py`, 0.42.1): the
//! dual-stream MMDiT. Equations and tensor names: `shared/reference/denoiser-and-pipelines.md` §2-3.

use crate::cpu_kernels::{self, HeadsPart};
use crate::weights::VarBuilder;
use candle_core::{D, DType, Device, Result, Tensor};
use serde::Deserialize;

use crate::nn::{
    LayerNormNoAffine, Linear, RmsNorm, attention_merged, gelu_tanh, key_bias_from_mask, linear,
};
use crate::rope::{self, ImgShape, RopeTables};

/// eps of every norm in the model (`eps=1e-6` throughout `transformer_qwenimage.py`).
pub const NORM_EPS: f32 = 1e-6;
/// Channels of the sinusoidal timestep projection (`Timesteps(num_channels=256, ...)`).
pub const TIMESTEP_CHANNELS: usize = 256;

fn default_patch_size() -> usize {
    2
}
fn default_in_channels() -> usize {
    64
}
fn default_num_layers() -> usize {
    60
}
fn default_head_dim() -> usize {
    128
}
fn default_heads() -> usize {
    24
}
fn default_joint_dim() -> usize {
    3584
}
fn default_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

/// `transformer/config.json`; field names and defaults of `QwenImageTransformer2DModel.__init__`.
/// Unknown keys (e.g. `pooled_projection_dim`) are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct TransformerConfig {
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// `None` means `in_channels` (diffusers: `out_channels or in_channels`).
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_joint_dim")]
    pub joint_attention_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "default_axes")]
    pub axes_dims_rope: Vec<usize>,
    /// Qwen-Image-Edit-2511: the image tokens after the first picture of `img_shapes` (the reference latents)
    /// are modulated as at timestep 0 (`QwenImageTransformerBlock._modulate` with `modulate_index`).
    #[serde(default)]
    pub zero_cond_t: bool,
    /// Qwen-Image-Layered only; not supported here.
    #[serde(default)]
    pub use_additional_t_cond: bool,
    /// Qwen-Image-Layered only; not supported here.
    #[serde(default)]
    pub use_layer3d_rope: bool,
}

impl TransformerConfig {
    /// The released Qwen/Qwen-Image `transformer/config.json` (= the `QwenImageTransformer2DModel` defaults):
    /// `{"attention_head_dim":128,"axes_dims_rope":[16,56,56],"guidance_embeds":false,"in_channels":64,
    /// "joint_attention_dim":3584,"num_attention_heads":24,"num_layers":60,"out_channels":16,"patch_size":2,
    /// "pooled_projection_dim":768}` (shared/reference/denoiser-and-pipelines.md §1.1).
    pub fn qwen_image() -> Self {
        Self {
            patch_size: default_patch_size(),
            in_channels: default_in_channels(),
            out_channels: Some(16),
            num_layers: default_num_layers(),
            attention_head_dim: default_head_dim(),
            num_attention_heads: default_heads(),
            joint_attention_dim: default_joint_dim(),
            guidance_embeds: false,
            axes_dims_rope: default_axes(),
            zero_cond_t: false,
            use_additional_t_cond: false,
            use_layer3d_rope: false,
        }
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Packed output channels: `patch_size² · out_channels`.
    pub fn out_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.out_channels.unwrap_or(self.in_channels)
    }

    /// Latent channels of the VAE this transformer denoises (`out_channels`).
    pub fn latent_channels(&self) -> usize {
        self.out_channels
            .unwrap_or(self.in_channels / (self.patch_size * self.patch_size))
    }

    /// Rejects configurations this implementation does not compute.
    pub fn validate(&self) -> Result<()> {
        if self.use_additional_t_cond || self.use_layer3d_rope {
            candle_core::bail!(
                "transformer config uses use_additional_t_cond / use_layer3d_rope (Qwen-Image-Layered), which this \
                 server does not support"
            );
        }
        if self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim {
            candle_core::bail!(
                "axes_dims_rope {:?} must sum to attention_head_dim {}",
                self.axes_dims_rope,
                self.attention_head_dim
            );
        }
        if self.patch_size != 2 {
            candle_core::bail!(
                "patch_size {} is not supported (Qwen-Image packs 2x2 patches)",
                self.patch_size
            );
        }
        Ok(())
    }
}

/// Sinusoidal timestep embedding, diffusers `get_timestep_embedding(t, 256, flip_sin_to_cos=True,
/// downscale_freq_shift=0, scale=1000)`, computed in f32: `[cos(1000·t·f_k), sin(1000·t·f_k)]`,
/// `f_k = exp(-ln(10000)·k/128)`.
pub fn timestep_projection(t: &Tensor, channels: usize) -> Result<Tensor> {
    let half = channels / 2;
    let device = t.device();
    // exponent = -math.log(10000) * arange(half, f32) / (half - 0); emb = exp(exponent)
    let ln = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|k| ((ln * k as f32) / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), device)?;
    let t = t.to_dtype(DType::F32)?.unsqueeze(1)?; // [B, 1]
    let args = (t.broadcast_mul(&freqs)? * 1000.0)?; // scale applied after t·freq
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1) // [B, channels], cos first (flip_sin_to_cos)
}

/// `QwenTimestepProjEmbeddings`: sinusoid → `linear_1` → SiLU → `linear_2`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedder {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedder {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("timestep_embedder");
        Ok(Self {
            linear_1: linear(TIMESTEP_CHANNELS, dim, vb.pp("linear_1"))?,
            linear_2: linear(dim, dim, vb.pp("linear_2"))?,
        })
    }

    /// `t`: `[B]` (already divided by 1000) → `[B, dim]`.
    pub fn forward(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        let proj = timestep_projection(t, TIMESTEP_CHANNELS)?.to_dtype(dtype)?;
        self.linear_2
            .forward(&self.linear_1.forward(&proj)?.silu()?)
    }
}

/// Feed-forward `Linear(D, 4D) → GELU(tanh) → Linear(4D, D)` (`img_mlp` / `txt_mlp`).
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj_in: linear(dim, dim * 4, vb.pp("net.0.proj"))?,
            proj_out: linear(dim * 4, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_out
            .forward(&gelu_tanh(&self.proj_in.forward(x)?)?)
    }

    fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 2] {
        [
            ("net.0.proj", &mut self.proj_in),
            ("net.2", &mut self.proj_out),
        ]
    }
}

/// `x · (1 + scale) + shift` with `[B, D]` modulation broadcast over tokens.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale + 1.0)?.unsqueeze(1)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// `modulate(LayerNorm(x), shift, scale)`: one fused parallel pass on the CPU in f32
/// ([`crate::cpu_kernels::layer_norm_modulate`]), candle's ops elsewhere.
fn norm_modulate(
    ln: &LayerNormNoAffine,
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        if let Some(y) = crate::cpu_kernels::layer_norm_modulate(x, shift, scale, NORM_EPS)? {
            return Ok(y);
        }
    }
    modulate(&ln.forward(x)?, shift, scale)
}

/// The gated residual `x + y · gate` with a `[B, D]` gate broadcast over tokens: one fused parallel pass on the
/// CPU in f32 ([`crate::cpu_kernels::gated_residual`]), candle's ops elsewhere.
fn gated(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        if let Some(out) = crate::cpu_kernels::gated_residual(x, y, gate)? {
            return Ok(out);
        }
    }
    x + y.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// One `QwenImageTransformerBlock`: joint attention over `[text, image]` and per-stream MLPs, both
/// modulated by the timestep embedding.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    img_mod: Linear,
    txt_mod: Linear,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    add_q: Linear,
    add_k: Linear,
    add_v: Linear,
    to_out: Linear,
    to_add_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    norm_added_q: RmsNorm,
    norm_added_k: RmsNorm,
    img_mlp: FeedForward,
    txt_mlp: FeedForward,
    ln: LayerNormNoAffine,
    heads: usize,
    head_dim: usize,
}

/// Per-forward context shared by every block.
pub struct BlockInputs<'a> {
    /// Timestep embedding `[B, D]`.
    pub temb: &'a Tensor,
    /// RoPE tables for `[image tokens]` and `[padded text tokens]`.
    pub rope: &'a RopeTables,
    /// Additive key bias `[B, 1, 1, L + S]` or `None` when no key is masked.
    pub key_bias: Option<&'a Tensor>,
    /// `zero_cond_t` (Edit-2511): the timestep-0 embedding for the image tokens from `start` on.
    pub zero_cond: Option<ZeroCond<'a>>,
}

/// The condition-token half of a `zero_cond_t` forward.
#[derive(Clone, Copy)]
pub struct ZeroCond<'a> {
    /// Timestep embedding at t = 0, `[B, D]`.
    pub temb: &'a Tensor,
    /// First image token that belongs to a condition picture (the noise tokens of `img_shapes[0]` come first).
    pub start: usize,
}

/// Image-stream modulation vectors (`[shift1 | scale1 | gate1 | shift2 | scale2 | gate2]`, each `[B, D]`): one set
/// for every token, or with `zero_cond_t` a second set for the tokens from `start` on (`modulate_index == 1`).
struct ImgModulation {
    main: Vec<Tensor>,
    cond: Option<(Vec<Tensor>, usize)>,
}

impl ImgModulation {
    /// Applies `f(tokens, params)` to the noise tokens with the main set and to the condition tokens with the
    /// timestep-0 set, and joins them again.
    fn apply(
        &self,
        x: &Tensor,
        f: impl Fn(&Tensor, &[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match &self.cond {
            Some((cond, start)) if *start < x.dim(1)? => {
                let s = x.dim(1)?;
                let a = f(&x.narrow(1, 0, *start)?, &self.main)?;
                let b = f(&x.narrow(1, *start, s - start)?, cond)?;
                Tensor::cat(&[&a, &b], 1)
            }
            _ => f(x, &self.main),
        }
    }

    /// `x + y · gate`, the gate being parameter `idx` of each token's set.
    fn residual(&self, x: &Tensor, y: &Tensor, idx: usize) -> Result<Tensor> {
        match &self.cond {
            Some((_, start)) if *start < x.dim(1)? => {
                x + self.apply(y, |t, p| t.broadcast_mul(&p[idx].unsqueeze(1)?))?
            }
            _ => gated(x, y, &self.main[idx]),
        }
    }
}

impl TransformerBlock {
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.inner_dim();
        let hd = cfg.attention_head_dim;
        let a = vb.pp("attn");
        Ok(Self {
            img_mod: linear(dim, 6 * dim, vb.pp("img_mod.1"))?,
            txt_mod: linear(dim, 6 * dim, vb.pp("txt_mod.1"))?,
            to_q: linear(dim, dim, a.pp("to_q"))?,
            to_k: linear(dim, dim, a.pp("to_k"))?,
            to_v: linear(dim, dim, a.pp("to_v"))?,
            add_q: linear(dim, dim, a.pp("add_q_proj"))?,
            add_k: linear(dim, dim, a.pp("add_k_proj"))?,
            add_v: linear(dim, dim, a.pp("add_v_proj"))?,
            to_out: linear(dim, dim, a.pp("to_out.0"))?,
            to_add_out: linear(dim, dim, a.pp("to_add_out"))?,
            norm_q: RmsNorm::new(hd, NORM_EPS, a.pp("norm_q"))?,
            norm_k: RmsNorm::new(hd, NORM_EPS, a.pp("norm_k"))?,
            norm_added_q: RmsNorm::new(hd, NORM_EPS, a.pp("norm_added_q"))?,
            norm_added_k: RmsNorm::new(hd, NORM_EPS, a.pp("norm_added_k"))?,
            img_mlp: FeedForward::new(dim, vb.pp("img_mlp"))?,
            txt_mlp: FeedForward::new(dim, vb.pp("txt_mlp"))?,
            ln: LayerNormNoAffine::new(dim, NORM_EPS, vb.dtype(), vb.device())?,
            heads: cfg.num_attention_heads,
            head_dim: hd,
        })
    }

    /// Every linear with its diffusers module name relative to the block (`attn.to_q`, `img_mlp.net.2`, ...).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out: Vec<(String, &mut Linear)> = vec![
            ("img_mod.1".into(), &mut self.img_mod),
            ("txt_mod.1".into(), &mut self.txt_mod),
            ("attn.to_q".into(), &mut self.to_q),
            ("attn.to_k".into(), &mut self.to_k),
            ("attn.to_v".into(), &mut self.to_v),
            ("attn.add_q_proj".into(), &mut self.add_q),
            ("attn.add_k_proj".into(), &mut self.add_k),
            ("attn.add_v_proj".into(), &mut self.add_v),
            ("attn.to_out.0".into(), &mut self.to_out),
            ("attn.to_add_out".into(), &mut self.to_add_out),
        ];
        for (prefix, ff) in [
            ("img_mlp", &mut self.img_mlp),
            ("txt_mlp", &mut self.txt_mlp),
        ] {
            for (name, l) in ff.linears_mut() {
                out.push((format!("{prefix}.{name}"), l));
            }
        }
        out
    }

    /// `[B, S, H·D]` → `[B, H, S, D]` after the per-head RMSNorm.
    fn heads_of(&self, x: &Tensor, norm: Option<&RmsNorm>) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let x = x.reshape((b, s, self.heads, self.head_dim))?;
        let x = match norm {
            Some(n) => n.forward(&x)?,
            None => x,
        };
        x.transpose(1, 2)?.contiguous()
    }

    /// The heads of the text and image projections `[B, L|S, H·D]` joined, text first: `[B, H, L+S, D]`,
    /// after the per-head RMSNorms and the rotary embedding when given. One fused pass on the CPU
    /// ([`cpu_kernels::joint_heads`]); candle's ops otherwise.
    fn joint_heads(
        &self,
        [txt, img]: [&Tensor; 2],
        norms: Option<[&RmsNorm; 2]>,
        rope: Option<&RopeTables>,
    ) -> Result<Tensor> {
        let tables = rope.map(|r| [(&r.txt_cos, &r.txt_sin), (&r.img_cos, &r.img_sin)]);
        let parts: Vec<HeadsPart> = [txt, img]
            .into_iter()
            .enumerate()
            .map(|(i, x)| HeadsPart {
                x,
                norm: norms.map(|n| (n[i].weight(), n[i].eps())),
                rope: tables.map(|t| t[i]),
            })
            .collect();
        if let Some(joined) = cpu_kernels::joint_heads(&parts, self.heads)? {
            return Ok(joined);
        }
        let heads: Vec<Tensor> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let h = self.heads_of(p.x, norms.map(|n| n[i]))?;
                match p.rope {
                    Some((cos, sin)) => rope::apply(&h, cos, sin),
                    None => Ok(h),
                }
            })
            .collect::<Result<_>>()?;
        Tensor::cat(&heads, 2)
    }

    /// `x`: image stream `[B, S, D]`, `c`: text stream `[B, L, D]` → updated `(c, x)`.
    pub fn forward(&self, x: &Tensor, c: &Tensor, inp: &BlockInputs) -> Result<(Tensor, Tensor)> {
        let l = c.dim(1)?;
        let silu_t = inp.temb.silu()?;
        // 6D modulation vector: [shift1 | scale1 | gate1 | shift2 | scale2 | gate2]
        let im = ImgModulation {
            main: self.img_mod.forward(&silu_t)?.chunk(6, D::Minus1)?,
            cond: match &inp.zero_cond {
                Some(z) => Some((
                    self.img_mod.forward(&z.temb.silu()?)?.chunk(6, D::Minus1)?,
                    z.start,
                )),
                None => None,
            },
        };
        let tm = self.txt_mod.forward(&silu_t)?.chunk(6, D::Minus1)?;

        let xm = im.apply(x, |t, p| norm_modulate(&self.ln, t, &p[0], &p[1]))?;
        let cm = norm_modulate(&self.ln, c, &tm[0], &tm[1])?;

        // joint attention, text first
        let r = inp.rope;
        let q = self.joint_heads(
            [&self.add_q.forward(&cm)?, &self.to_q.forward(&xm)?],
            Some([&self.norm_added_q, &self.norm_q]),
            Some(r),
        )?;
        let k = self.joint_heads(
            [&self.add_k.forward(&cm)?, &self.to_k.forward(&xm)?],
            Some([&self.norm_added_k, &self.norm_k]),
            Some(r),
        )?;
        let v = self.joint_heads(
            [&self.add_v.forward(&cm)?, &self.to_v.forward(&xm)?],
            None,
            None,
        )?;
        let o = attention_merged(
            &q,
            &k,
            &v,
            inp.key_bias,
            1.0 / (self.head_dim as f64).sqrt(),
        )?; // [B, L+S, D]
        let s = o.dim(1)? - l;
        let txt_attn = self.to_add_out.forward(&o.narrow(1, 0, l)?)?;
        let img_attn = self.to_out.forward(&o.narrow(1, l, s)?)?;

        let x = im.residual(x, &img_attn, 2)?;
        let c = gated(c, &txt_attn, &tm[2])?;

        let xm2 = im.apply(&x, |t, p| norm_modulate(&self.ln, t, &p[3], &p[4]))?;
        let x = im.residual(&x, &self.img_mlp.forward(&xm2)?, 5)?;
        let cm2 = norm_modulate(&self.ln, &c, &tm[3], &tm[4])?;
        let c = gated(&c, &self.txt_mlp.forward(&cm2)?, &tm[5])?;
        Ok((c, x))
    }
}

/// The parts of the model that turn raw inputs into block inputs (shared with the ControlNet).
#[derive(Debug, Clone)]
pub struct Embedders {
    pub img_in: Linear,
    pub txt_norm: RmsNorm,
    pub txt_in: Linear,
    pub time_text_embed: TimestepEmbedder,
}

impl Embedders {
    pub fn new(cfg: &TransformerConfig, vb: &VarBuilder) -> Result<Self> {
        let dim = cfg.inner_dim();
        Ok(Self {
            img_in: linear(cfg.in_channels, dim, vb.pp("img_in"))?,
            txt_norm: RmsNorm::new(cfg.joint_attention_dim, NORM_EPS, vb.pp("txt_norm"))?,
            txt_in: linear(cfg.joint_attention_dim, dim, vb.pp("txt_in"))?,
            time_text_embed: TimestepEmbedder::new(dim, vb.pp("time_text_embed"))?,
        })
    }
}

/// Validated transformer inputs.
pub struct TransformerInputs<'a> {
    /// Packed latents `[B, S, in_channels]`.
    pub hidden_states: &'a Tensor,
    /// Text embeddings `[B, L, joint_attention_dim]` (right-padded when batched).
    pub encoder_hidden_states: &'a Tensor,
    /// Text mask `[B, L]` (1 = token, 0 = padding), or `None` when every token is valid.
    pub encoder_mask: Option<&'a Tensor>,
    /// `t / 1000` per batch element, `[B]`.
    pub timestep: &'a Tensor,
    /// Token grids of the images in `hidden_states`, in order (`(1, h/2, w/2)` for text-to-image).
    pub img_shapes: &'a [ImgShape],
    /// ControlNet residual lists (one list per ControlNet, each `[B, S, D]` per ControlNet block, already
    /// scaled); list `k` adds `list[i / ceil(num_layers / len)]` to the image stream after block `i`.
    pub controlnet_residuals: &'a [Vec<Tensor>],
}

/// The text positions `[0, n)` that some row of `mask` (`[B, L]`, 1 = token) uses: from `n` on, every row
/// is padding.
fn text_in_use(mask: &Tensor) -> Result<usize> {
    let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .filter_map(|r| r.iter().rposition(|&v| v != 0.0))
        .max()
        .map_or(0, |last| last + 1))
}

/// Shared preparation of block inputs (text projection, timestep embedding, RoPE, key mask).
pub struct Prepared {
    pub x: Tensor,
    pub c: Tensor,
    pub temb: Tensor,
    /// `zero_cond_t`: the timestep-0 embedding and the first condition token (`None` otherwise).
    pub zero_cond: Option<(Tensor, usize)>,
    pub rope: RopeTables,
    pub key_bias: Option<Tensor>,
}

/// Checks shapes and computes what every block needs.
pub fn prepare(
    cfg: &TransformerConfig,
    emb: &Embedders,
    x: Tensor,
    inp: &TransformerInputs,
    device: &Device,
) -> Result<Prepared> {
    let (b, s, _) = x.dims3()?;
    let (bt, l, dt) = inp.encoder_hidden_states.dims3()?;
    if bt != b || dt != cfg.joint_attention_dim {
        candle_core::bail!(
            "encoder_hidden_states has shape [{bt}, {l}, {dt}], expected [{b}, L, {}]",
            cfg.joint_attention_dim
        );
    }
    let tokens: usize = inp.img_shapes.iter().map(|(f, h, w)| f * h * w).sum();
    if tokens != s {
        candle_core::bail!(
            "img_shapes {:?} describe {tokens} tokens, hidden_states has {s}",
            inp.img_shapes
        );
    }
    if inp.timestep.dims() != [b] {
        candle_core::bail!(
            "timestep has shape {:?}, expected [{b}]",
            inp.timestep.dims()
        );
    }
    let dtype = x.dtype();
    let c = emb
        .txt_in
        .forward(&emb.txt_norm.forward(inp.encoder_hidden_states)?)?;
    let temb = emb.time_text_embed.forward(inp.timestep, dtype)?;
    // transformer_qwenimage.py: timestep = cat([timestep, timestep * 0]); modulate_index 0 for the tokens of
    // img_shapes[0], 1 for the rest
    let zero_cond = if cfg.zero_cond_t {
        let start = inp.img_shapes.first().map_or(0, |(f, h, w)| f * h * w);
        let t0 = inp.timestep.zeros_like()?;
        Some((emb.time_text_embed.forward(&t0, dtype)?, start))
    } else {
        None
    };
    let rope = rope::rope_tables(&cfg.axes_dims_rope, inp.img_shapes, l, device)?;
    let key_bias = match inp.encoder_mask {
        None => None,
        Some(m) => {
            if m.dims() != [b, l] {
                candle_core::bail!("encoder mask has shape {:?}, expected [{b}, {l}]", m.dims());
            }
            // keys are [text, image]; image keys are always attended
            let full = Tensor::cat(
                &[
                    &m.to_dtype(DType::F32)?,
                    &Tensor::ones((b, s), DType::F32, device)?,
                ],
                1,
            )?;
            Some(key_bias_from_mask(&full, dtype)?)
        }
    };
    Ok(Prepared {
        x,
        c,
        temb,
        zero_cond,
        rope,
        key_bias,
    })
}

/// `QwenImageTransformer2DModel`.
#[derive(Debug, Clone)]
pub struct QwenImageTransformer {
    cfg: TransformerConfig,
    emb: Embedders,
    blocks: Vec<TransformerBlock>,
    norm_out_linear: Linear,
    norm_out: LayerNormNoAffine,
    proj_out: Linear,
    device: Device,
    dtype: DType,
}

impl QwenImageTransformer {
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let dim = cfg.inner_dim();
        let emb = Embedders::new(cfg, &vb)?;
        let blocks = (0..cfg.num_layers)
            .map(|i| TransformerBlock::new(cfg, vb.pp("transformer_blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            emb,
            blocks,
            norm_out_linear: linear(dim, 2 * dim, vb.pp("norm_out.linear"))?,
            norm_out: LayerNormNoAffine::new(dim, NORM_EPS, vb.dtype(), vb.device())?,
            proj_out: linear(dim, cfg.out_dim(), vb.pp("proj_out"))?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// Every linear with its diffusers module name (`transformer_blocks.3.attn.to_q`, `proj_out`, ...): what
    /// LoRA adapters target ([`crate::lora`]).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out: Vec<(String, &mut Linear)> = vec![
            ("img_in".into(), &mut self.emb.img_in),
            ("txt_in".into(), &mut self.emb.txt_in),
            (
                "time_text_embed.timestep_embedder.linear_1".into(),
                &mut self.emb.time_text_embed.linear_1,
            ),
            (
                "time_text_embed.timestep_embedder.linear_2".into(),
                &mut self.emb.time_text_embed.linear_2,
            ),
            ("norm_out.linear".into(), &mut self.norm_out_linear),
            ("proj_out".into(), &mut self.proj_out),
        ];
        for (i, block) in self.blocks.iter_mut().enumerate() {
            for (name, l) in block.linears_mut() {
                out.push((format!("transformer_blocks.{i}.{name}"), l));
            }
        }
        out
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Velocity prediction `[B, S, out_dim]` in packed layout. On a CPU with several threads an even batch
    /// (true CFG's prompt pairs, a denoiser batch) splits into one part per thread, each run whole on its
    /// thread ([`cpu_kernels::on_own_threads`]); batch rows are independent, so the numbers are the same.
    pub fn forward(&self, inp: &TransformerInputs) -> Result<Tensor> {
        let b = inp.hidden_states.dim(0)?;
        let parts = cpu_kernels::batch_parts(&self.device, self.dtype, b);
        if parts < 2 {
            return self.forward_trimmed(inp);
        }
        let per = b / parts;
        let outs = cpu_kernels::on_own_threads((0..parts).collect(), |i| {
            let rows = |t: &Tensor| t.narrow(0, i * per, per);
            let residuals = inp
                .controlnet_residuals
                .iter()
                .map(|list| list.iter().map(rows).collect::<Result<Vec<_>>>())
                .collect::<Result<Vec<_>>>()?;
            self.forward_trimmed(&TransformerInputs {
                hidden_states: &rows(inp.hidden_states)?,
                encoder_hidden_states: &rows(inp.encoder_hidden_states)?,
                encoder_mask: inp.encoder_mask.map(rows).transpose()?.as_ref(),
                timestep: &rows(inp.timestep)?,
                img_shapes: inp.img_shapes,
                controlnet_residuals: &residuals,
            })
        })?;
        Tensor::cat(&outs, 0)
    }

    /// [`Self::forward_rows`] without the text positions that are padding in every row, on the CPU: their
    /// keys are masked out and their outputs never read (the model returns the image stream), so only
    /// rounding changes. A batch of prompts pads every row to the longest; true CFG's negative rows, run
    /// apart from the positive ones by the batch split, then cost only their own length, as diffusers
    /// runs them (`QwenImagePipeline` calls the transformer once per prompt, unpadded).
    fn forward_trimmed(&self, inp: &TransformerInputs) -> Result<Tensor> {
        let Some(mask) = inp.encoder_mask.filter(|_| self.device.is_cpu()) else {
            return self.forward_rows(inp);
        };
        let (_, l) = mask.dims2()?;
        let used = text_in_use(mask)?;
        if used == 0 || used == l {
            return self.forward_rows(inp);
        }
        self.forward_rows(&TransformerInputs {
            encoder_hidden_states: &inp.encoder_hidden_states.narrow(1, 0, used)?.contiguous()?,
            encoder_mask: Some(&mask.narrow(1, 0, used)?.contiguous()?),
            ..*inp
        })
    }

    /// [`Self::forward`] on the calling thread (its kernels may still fork).
    fn forward_rows(&self, inp: &TransformerInputs) -> Result<Tensor> {
        let (_, _, cin) = inp.hidden_states.dims3()?;
        if cin != self.cfg.in_channels {
            candle_core::bail!(
                "hidden_states has {cin} channels, the transformer expects {}",
                self.cfg.in_channels
            );
        }
        let x = self
            .emb
            .img_in
            .forward(&inp.hidden_states.to_dtype(self.dtype)?)?;
        let p = prepare(&self.cfg, &self.emb, x, inp, &self.device)?;
        let block_inp = BlockInputs {
            temb: &p.temb,
            rope: &p.rope,
            key_bias: p.key_bias.as_ref(),
            zero_cond: p.zero_cond.as_ref().map(|(temb, start)| ZeroCond {
                temb,
                start: *start,
            }),
        };
        let (mut x, mut c) = (p.x, p.c);
        for res in inp.controlnet_residuals {
            if res.iter().any(|r| r.dims() != x.dims()) {
                candle_core::bail!(
                    "controlnet residuals must have the image stream's shape {:?}",
                    x.dims()
                );
            }
        }
        for (i, block) in self.blocks.iter().enumerate() {
            crate::interrupt::check()?;
            (c, x) = block.forward(&x, &c, &block_inp)?;
            for res in inp.controlnet_residuals.iter().filter(|r| !r.is_empty()) {
                // transformer_qwenimage.py: interval_control = ceil(len(transformer_blocks) / len(samples))
                let interval = self.blocks.len().div_ceil(res.len());
                x = (x + res[i / interval].to_dtype(self.dtype)?)?;
            }
        }
        // AdaLayerNormContinuous: [scale | shift] (scale first, unlike the blocks)
        let mods = self
            .norm_out_linear
            .forward(&p.temb.silu()?)?
            .chunk(2, D::Minus1)?;
        let x = modulate(&self.norm_out.forward(&x)?, &mods[1], &mods[0])?;
        self.proj_out.forward(&x)
    }
}
