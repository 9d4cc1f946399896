//! `AutoencoderKLQwenImage` (the Wan-2.1 causal 3-D VAE) specialised to single images, in pure candle.
//!
//! Reference: diffusers 0.42.1 `models/autoencoders/autoencoder_kl_qwenimage.py`; the spec with the
//! one-frame reductions is `shared/reference/vae-text-encoder-tokenizer.md` §1. For one frame (T = 1):
//! - a `CausalConv3d` with a 3x3x3 kernel pads time with two zero frames in FRONT, so only the LAST temporal
//!   tap (`weight[:, :, 2]`) meets the real frame: it is exactly a 3x3 conv2d with that slice (pitfall 1);
//!   1x1x1 convs are 1x1 conv2ds with `weight[:, :, 0]`;
//! - `time_conv` never runs on the first chunk (pitfall 4), so its weights are not loaded;
//! - `RMS_norm` is `F.normalize(x, dim=C) * sqrt(C) * gamma` (L2 norm clamped at 1e-12, pitfall 3);
//! - upsampling is 2x nearest + conv halving the channels, downsampling pads right/bottom by one then runs a
//!   stride-2 conv (pitfalls 2 and 5); the mid-block attention is single-head over all pixels.
//!
//! Every image of a batch runs on its own (every op is per image), and inside an image the 3x3 convs run in
//! bands of output rows: the RMS norm + SiLU before a conv, or the 2x upsample before a conv, is applied to
//! each band's input rows only. The full-resolution normalised or upsampled activations therefore never
//! exist, which bounds the peak memory of a 2048x2048 decode to a few copies of the largest feature map.

use candle_core::{DType, Device, Result, Tensor, bail};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::snapshot::Snapshot;

/// `vae/config.json` of `AutoencoderKLQwenImage`; defaults are the `__init__` defaults of diffusers 0.42.1
/// (which are also the released Qwen/Qwen-Image values). Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub base_dim: usize,
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    /// Encoder scales (1, 1/2, 1/4, ...) that get an attention block after each residual block.
    pub attn_scales: Vec<f64>,
    /// (sic, the diffusers spelling) one flag per downsampling level; its length sets the spatial factor.
    pub temperal_downsample: Vec<bool>,
    /// Unused at inference (dropout is a no-op in eval mode).
    pub dropout: f64,
    pub input_channels: usize,
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            base_dim: 96,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: vec![false, true, true],
            dropout: 0.0,
            input_channels: 3,
            latents_mean: vec![
                -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
            ],
            latents_std: vec![
                2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
                2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
            ],
        }
    }
}

impl VaeConfig {
    /// Spatial compression `2^len(temperal_downsample)` (diffusers `spatial_compression_ratio`; 8 for Qwen-Image).
    pub fn scale_factor(&self) -> usize {
        1 << self.temperal_downsample.len()
    }

    fn validate(&self) -> Result<()> {
        if self.dim_mult.is_empty()
            || self.dim_mult.contains(&0)
            || self.base_dim == 0
            || self.z_dim == 0
        {
            bail!(
                "vae config: base_dim, z_dim and dim_mult must be non-empty and positive, got {self:?}"
            );
        }
        if self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            bail!(
                "vae config: temperal_downsample has {} entries, expected len(dim_mult) - 1 = {}",
                self.temperal_downsample.len(),
                self.dim_mult.len() - 1
            );
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            bail!(
                "vae config: latents_mean/latents_std have {}/{} entries, expected z_dim = {}",
                self.latents_mean.len(),
                self.latents_std.len(),
                self.z_dim
            );
        }
        Ok(())
    }
}

/// Tiled decode parameters in image pixels (diffusers `enable_tiling` defaults: tiles of 256 px every 192 px,
/// blended over the 64 px overlap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileConfig {
    pub sample_min_height: usize,
    pub sample_min_width: usize,
    pub sample_stride_height: usize,
    pub sample_stride_width: usize,
}

impl Default for TileConfig {
    fn default() -> Self {
        Self {
            sample_min_height: 256,
            sample_min_width: 256,
            sample_stride_height: 192,
            sample_stride_width: 192,
        }
    }
}

/// Elements of the im2col matrix of one conv band (64 MiB in f32): bounds the conv scratch memory.
const CONV_BAND_ELEMS: usize = 1 << 24;
/// Elements of one attention score block (64 MiB in f32): the query rows per block are this / keys.
const ATTN_SCORE_ELEMS: usize = 1 << 24;
/// `F.normalize` eps (clamp on the L2 norm), diffusers `QwenImageRMS_norm`.
const NORM_EPS: f64 = 1e-12;
/// `DiagonalGaussianDistribution` logvar clamp (diffusers `models/autoencoders/vae.py`).
const LOGVAR_MIN: f64 = -30.0;
const LOGVAR_MAX: f64 = 20.0;

// ------------------------------------------------------------------------------------------------------------
// building blocks (all on one image: [C, H, W])
// ------------------------------------------------------------------------------------------------------------

/// Channel RMS norm (`QwenImageRMS_norm`): `x / max(‖x‖₂ over C, 1e-12) * sqrt(C) * gamma`.
#[derive(Debug, Clone)]
struct RmsNorm {
    /// `[C, 1, 1]`
    gamma: Tensor,
    scale: f64,
}

impl RmsNorm {
    /// `gamma` is `[C,1,1,1]` in resnets / `norm_out` (images=False) and `[C,1,1]` in attention (images=True).
    fn new(dim: usize, images: bool, vb: VarBuilder) -> Result<Self> {
        let gamma = if images {
            vb.get((dim, 1, 1), "gamma")?
        } else {
            vb.get((dim, 1, 1, 1), "gamma")?.reshape((dim, 1, 1))?
        };
        Ok(Self {
            gamma,
            scale: (dim as f64).sqrt(),
        })
    }

    /// `x`: `[C, H, W]` (any number of rows).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        // bf16/f16 inputs are normalised in f32 and cast back before the scale and gamma (diffusers order).
        let x32 = if dtype == DType::F32 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let norm = x32
            .sqr()?
            .sum_keepdim(0)?
            .sqrt()?
            .clamp(NORM_EPS, f64::INFINITY)?; // [1, H, W]
        let normalized = x32.broadcast_div(&norm)?.to_dtype(dtype)?;
        (normalized * self.scale)?.broadcast_mul(&self.gamma)
    }
}

/// What is applied to a conv's input rows before zero padding (fused per band, see the module docs).
#[derive(Clone, Copy)]
enum Prologue<'a> {
    None,
    /// `silu(norm(x))`: the residual blocks and the output heads.
    NormSilu(&'a RmsNorm),
    /// 2x nearest upsampling (`QwenImageUpsample`, "nearest-exact" equals nearest at exactly 2x).
    Upsample2x,
}

/// A conv2d from a causal conv3d (last temporal tap) or a plain `nn.Conv2d`.
#[derive(Debug, Clone)]
struct Conv {
    /// 3x3: `[O, 9·I]` with columns ordered (ky, kx, c) for the banded im2col; 1x1: `[O, I]`.
    weight: Tensor,
    /// 3x3 stride-2 (downsample) keeps the `[O, I, 3, 3]` layout for candle's conv2d.
    weight_4d: Option<Tensor>,
    /// `[O, 1]`
    bias: Tensor,
    out_dim: usize,
}

impl Conv {
    /// `QwenImageCausalConv3d(in, out, k)`: loads `weight [O, I, k, k, k]` and keeps the last temporal tap.
    fn causal(in_dim: usize, out_dim: usize, kernel: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((out_dim, in_dim, kernel, kernel, kernel), "weight")?;
        let w = w.narrow(2, kernel - 1, 1)?.squeeze(2)?; // [O, I, k, k]
        Self::from_4d(w, vb.get(out_dim, "bias")?, false)
    }

    /// `nn.Conv2d(in, out, k)` (the resample convs and the attention projections).
    fn plain(
        in_dim: usize,
        out_dim: usize,
        kernel: usize,
        strided: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let w = vb.get((out_dim, in_dim, kernel, kernel), "weight")?;
        Self::from_4d(w, vb.get(out_dim, "bias")?, strided)
    }

    fn from_4d(w: Tensor, bias: Tensor, strided: bool) -> Result<Self> {
        let (o, i, k, _) = w.dims4()?;
        let bias = bias.reshape((o, 1))?;
        if strided {
            return Ok(Self {
                weight: w.clone(),
                weight_4d: Some(w.contiguous()?),
                bias,
                out_dim: o,
            });
        }
        let weight = match k {
            1 => w.reshape((o, i))?,
            // [O, I, 3, 3] -> [O, 3, 3, I] -> [O, 9·I]: column (ky·3 + kx)·I + c
            3 => w.permute((0, 2, 3, 1))?.reshape((o, 9 * i))?,
            _ => bail!("vae: unsupported conv kernel size {k}"),
        };
        Ok(Self {
            weight: weight.contiguous()?,
            weight_4d: None,
            bias,
            out_dim: o,
        })
    }

    /// 1x1 conv on `[C, H, W]`.
    fn forward_1x1(&self, x: &Tensor) -> Result<Tensor> {
        let (c, h, w) = x.dims3()?;
        let y = self
            .weight
            .matmul(&x.reshape((c, h * w))?)?
            .broadcast_add(&self.bias)?; // [O, H·W]
        y.reshape((self.out_dim, h, w))
    }

    /// 3x3, stride 1, zero padding 1 on `prologue(x)`; `x`: `[C, H, W]` → `[O, H', W']` (H' = 2H when
    /// upsampling). Runs in bands of output rows: each band's input rows (with a one-row halo) go through the
    /// prologue, get zero padded, and are flattened with the padded width `W'+2` so that tap (dy, dx) of
    /// every output pixel is one contiguous slice at offset `dy·(W'+2) + dx`; the 9 slices stacked are the
    /// band's im2col matrix `[9C, rows·(W'+2)]`, one GEMM gives the band, and the 2 wrap-around columns per
    /// row are dropped.
    fn forward_3x3(&self, x: &Tensor, prologue: Prologue) -> Result<Tensor> {
        let (c, h_in, w_in) = x.dims3()?;
        let up = matches!(prologue, Prologue::Upsample2x);
        let (h, w) = if up {
            (2 * h_in, 2 * w_in)
        } else {
            (h_in, w_in)
        };
        let wp = w + 2;
        let rows_per_band = (CONV_BAND_ELEMS / (9 * c * wp)).clamp(1, h);
        let out = Tensor::zeros((self.out_dim, h, w), x.dtype(), x.device())?;
        let mut y0 = 0;
        while y0 < h {
            let rows = rows_per_band.min(h - y0);
            // conv input rows [lo, hi) of the (upsampled) image, zero rows beyond its edges
            let lo = y0.saturating_sub(1);
            let hi = (y0 + rows + 1).min(h);
            let band = match prologue {
                Prologue::None => x.narrow(1, lo, hi - lo)?,
                Prologue::NormSilu(norm) => {
                    candle_nn::ops::silu(&norm.forward(&x.narrow(1, lo, hi - lo)?)?)?
                }
                Prologue::Upsample2x => {
                    let (s0, s1) = (lo / 2, (hi - 1) / 2 + 1); // source rows covering [lo, hi)
                    let src = x.narrow(1, s0, s1 - s0)?; // [C, s, W]
                    let s = s1 - s0;
                    // out[i, j] = in[i // 2, j // 2]: [C, s, 1, W, 1] -> [C, s, 2, W, 2] -> [C, 2s, 2W]
                    let upsampled = src
                        .reshape((c, s, 1, w_in, 1))?
                        .broadcast_as((c, s, 2, w_in, 2))?
                        .reshape((c, 2 * s, w))?;
                    upsampled.narrow(1, lo - 2 * s0, hi - lo)?
                }
            };
            let top = usize::from(y0 == 0);
            // one extra zero row at the bottom keeps the last tap's flat slice inside the buffer
            let bottom = (y0 + rows + 1 - hi) + 1;
            let padded = band
                .pad_with_zeros(2, 1, 1)?
                .pad_with_zeros(1, top, bottom)?; // [C, rows+3, W+2]
            let flat = padded.reshape((c, (rows + 3) * wp))?;
            let n = rows * wp;
            let taps = (0..9)
                .map(|t| flat.narrow(1, (t / 3) * wp + t % 3, n))
                .collect::<Result<Vec<_>>>()?;
            let cols = Tensor::cat(&taps, 0)?; // [9C, rows·(W+2)]
            drop(taps);
            drop(flat);
            let y = self.weight.matmul(&cols)?.broadcast_add(&self.bias)?; // [O, rows·(W+2)]
            drop(cols);
            let y = y
                .reshape((self.out_dim, rows, wp))?
                .narrow(2, 0, w)?
                .contiguous()?; // [O, rows, W]
            out.slice_set(&y, 1, y0)?;
            y0 += rows;
        }
        Ok(out)
    }

    /// `ZeroPad2d((0, 1, 0, 1))` then a 3x3 stride-2 conv without padding (pitfall 2); `[C, H, W]` →
    /// `[O, floor(H/2), floor(W/2)]`.
    fn forward_down(&self, x: &Tensor) -> Result<Tensor> {
        let w4 = self
            .weight_4d
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("vae: not a strided conv".into()))?;
        let (c, h, w) = x.dims3()?;
        let padded = x
            .pad_with_zeros(2, 0, 1)?
            .pad_with_zeros(1, 0, 1)?
            .reshape((1, c, h + 1, w + 1))?;
        let y = padded.conv2d(w4, 0, 2, 1, 1)?.squeeze(0)?; // [O, H/2, W/2]
        y.broadcast_add(&self.bias.unsqueeze(2)?)
    }
}

/// `QwenImageResidualBlock`: `conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)`.
#[derive(Debug, Clone)]
struct ResidualBlock {
    norm1: RmsNorm,
    conv1: Conv,
    norm2: RmsNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResidualBlock {
    fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: RmsNorm::new(in_dim, false, vb.pp("norm1"))?,
            conv1: Conv::causal(in_dim, out_dim, 3, vb.pp("conv1"))?,
            norm2: RmsNorm::new(out_dim, false, vb.pp("norm2"))?,
            conv2: Conv::causal(out_dim, out_dim, 3, vb.pp("conv2"))?,
            shortcut: if in_dim != out_dim {
                Some(Conv::causal(in_dim, out_dim, 1, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward_3x3(x, Prologue::NormSilu(&self.norm1))?;
        let h = self
            .conv2
            .forward_3x3(&h, Prologue::NormSilu(&self.norm2))?;
        match &self.shortcut {
            Some(s) => h + s.forward_1x1(x)?,
            None => h + x,
        }
    }
}

/// `QwenImageAttentionBlock`: single-head self-attention over all pixels with head dim C, plus the input.
#[derive(Debug, Clone)]
struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: Conv,
    proj: Conv,
    dim: usize,
}

impl AttentionBlock {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: RmsNorm::new(dim, true, vb.pp("norm"))?,
            to_qkv: Conv::plain(dim, 3 * dim, 1, false, vb.pp("to_qkv"))?,
            proj: Conv::plain(dim, dim, 1, false, vb.pp("proj"))?,
            dim,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_chunked(x, None)
    }

    /// `query_rows`: rows per score block; `None` sizes them from [`ATTN_SCORE_ELEMS`].
    fn forward_chunked(&self, x: &Tensor, query_rows: Option<usize>) -> Result<Tensor> {
        let (c, h, w) = x.dims3()?;
        let qkv = self
            .to_qkv
            .forward_1x1(&self.norm.forward(x)?)?
            .reshape((3 * c, h * w))?; // [3C, HW]
        // q | k | v along the channels (pitfall 6); tokens in row-major h·W + w order
        let q = qkv.narrow(0, 0, c)?.t()?.contiguous()?; // [HW, C]
        let kt = qkv.narrow(0, c, c)?.contiguous()?; // [C, HW] = kᵀ
        let v = qkv.narrow(0, 2 * c, c)?.t()?.contiguous()?; // [HW, C]
        drop(qkv);
        let scale = 1.0 / (self.dim as f64).sqrt(); // SDPA default scale
        let rows = query_rows
            .unwrap_or(ATTN_SCORE_ELEMS / (h * w))
            .clamp(1, h * w);
        let out = single_head_attention(&q, &kt, &v, scale, rows)?; // [HW, C]
        let out = out.t()?.reshape((c, h, w))?; // [C, H, W]
        self.proj.forward_1x1(&out)? + x
    }
}

/// `softmax(q kᵀ · scale) v` for one head, `rows` queries at a time (exact: query rows are independent).
/// `q`: `[S, D]`, `kt`: `[D, S]`, `v`: `[S, D]` → `[S, D]`.
fn single_head_attention(
    q: &Tensor,
    kt: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> Result<Tensor> {
    let s = q.dim(0)?;
    let mut outs = Vec::with_capacity(s.div_ceil(rows));
    let mut start = 0;
    while start < s {
        let len = rows.min(s - start);
        let scores = (q.narrow(0, start, len)?.matmul(kt)? * scale)?; // [len, S]
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        drop(scores);
        outs.push(probs.matmul(v)?); // [len, D]
        start += len;
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else {
        Tensor::cat(&outs, 0)
    }
}

/// `QwenImageMidBlock` with `num_layers=1`: resnet, attention, resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    res0: ResidualBlock,
    attn: AttentionBlock,
    res1: ResidualBlock,
}

impl MidBlock {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            res0: ResidualBlock::new(dim, dim, vb.pp("resnets.0"))?,
            attn: AttentionBlock::new(dim, vb.pp("attentions.0"))?,
            res1: ResidualBlock::new(dim, dim, vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.res0.forward(x)?;
        let x = self.attn.forward(&x)?;
        self.res1.forward(&x)
    }
}

/// One entry of the encoder's flat `down_blocks` list.
#[derive(Debug, Clone)]
enum DownLayer {
    Res(ResidualBlock),
    Attn(AttentionBlock),
    /// `QwenImageResample` downsample2d / downsample3d (the conv is `resample.1`; time_conv skipped).
    Down(Conv),
}

/// `QwenImageEncoder3d` for one frame.
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv,
    down: Vec<DownLayer>,
    mid: MidBlock,
    norm_out: RmsNorm,
    conv_out: Conv,
}

impl Encoder {
    /// Mirrors the constructor loop of `QwenImageEncoder3d.__init__`; `z2` is `2·z_dim` (mean | logvar).
    fn new(cfg: &VaeConfig, z2: usize, vb: VarBuilder) -> Result<Self> {
        // dims = [dim * u for u in [1] + dim_mult]
        let dims: Vec<usize> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|u| cfg.base_dim * u)
            .collect();
        let conv_in = Conv::causal(cfg.input_channels, dims[0], 3, vb.pp("conv_in"))?;
        let vbd = vb.pp("down_blocks");
        let mut down = Vec::new();
        let mut scale = 1.0f64;
        for i in 0..cfg.dim_mult.len() {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            for _ in 0..cfg.num_res_blocks {
                down.push(DownLayer::Res(ResidualBlock::new(
                    in_dim,
                    out_dim,
                    vbd.pp(down.len()),
                )?));
                if cfg.attn_scales.contains(&scale) {
                    down.push(DownLayer::Attn(AttentionBlock::new(
                        out_dim,
                        vbd.pp(down.len()),
                    )?));
                }
                in_dim = out_dim;
            }
            if i != cfg.dim_mult.len() - 1 {
                let vbr = vbd.pp(down.len()).pp("resample.1");
                down.push(DownLayer::Down(Conv::plain(
                    out_dim, out_dim, 3, true, vbr,
                )?));
                scale /= 2.0;
            }
        }
        let top = *dims.last().unwrap_or(&cfg.base_dim);
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::new(top, vb.pp("mid_block"))?,
            norm_out: RmsNorm::new(top, false, vb.pp("norm_out"))?,
            conv_out: Conv::causal(top, z2, 3, vb.pp("conv_out"))?,
        })
    }

    /// `[C_in, H, W]` → `[2z, H/f, W/f]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward_3x3(x, Prologue::None)?;
        for layer in &self.down {
            x = match layer {
                DownLayer::Res(r) => r.forward(&x)?,
                DownLayer::Attn(a) => a.forward(&x)?,
                DownLayer::Down(d) => d.forward_down(&x)?,
            };
        }
        let x = self.mid.forward(&x)?;
        self.conv_out
            .forward_3x3(&x, Prologue::NormSilu(&self.norm_out))
    }
}

/// `QwenImageUpBlock`: `num_res_blocks + 1` residual blocks, then an optional upsampler.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    /// `upsamplers.0.resample.1` (upsample2d or upsample3d: same spatial path; time_conv skipped).
    upsample: Option<Conv>,
}

/// `QwenImageDecoder3d` for one frame.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv,
    mid: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: Conv,
}

impl Decoder {
    /// Mirrors the constructor loop of `QwenImageDecoder3d.__init__`.
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        // dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
        let last = *cfg.dim_mult.last().unwrap_or(&1);
        let dims: Vec<usize> = std::iter::once(last)
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|u| cfg.base_dim * u)
            .collect();
        let conv_in = Conv::causal(cfg.z_dim, dims[0], 3, vb.pp("conv_in"))?;
        let mid = MidBlock::new(dims[0], vb.pp("mid_block"))?;
        let mut up_blocks = Vec::new();
        for i in 0..cfg.dim_mult.len() {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            // the previous block's upsampler halved the channels
            if i > 0 {
                in_dim /= 2;
            }
            let vbu = vb.pp("up_blocks").pp(i);
            let mut resnets = Vec::new();
            for j in 0..=cfg.num_res_blocks {
                resnets.push(ResidualBlock::new(
                    in_dim,
                    out_dim,
                    vbu.pp("resnets").pp(j),
                )?);
                in_dim = out_dim;
            }
            let upsample = if i != cfg.dim_mult.len() - 1 {
                Some(Conv::plain(
                    out_dim,
                    out_dim / 2,
                    3,
                    false,
                    vbu.pp("upsamplers.0.resample.1"),
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
        }
        let out_dim = *dims.last().unwrap_or(&cfg.base_dim);
        Ok(Self {
            conv_in,
            mid,
            up_blocks,
            norm_out: RmsNorm::new(out_dim, false, vb.pp("norm_out"))?,
            conv_out: Conv::causal(out_dim, cfg.input_channels, 3, vb.pp("conv_out"))?,
        })
    }

    /// `[z, h, w]` (after post_quant_conv) → `[C_in, h·f, w·f]`, not clamped.
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward_3x3(z, Prologue::None)?;
        let mut x = self.mid.forward(&x)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(&x)?;
            }
            if let Some(up) = &block.upsample {
                x = up.forward_3x3(&x, Prologue::Upsample2x)?;
            }
        }
        self.conv_out
            .forward_3x3(&x, Prologue::NormSilu(&self.norm_out))
    }
}

// ------------------------------------------------------------------------------------------------------------
// public model
// ------------------------------------------------------------------------------------------------------------

/// The diagonal Gaussian posterior of [`AutoencoderKLQwenImage::encode`]; tensors are `[B, z, 1, h, w]` like
/// diffusers' `latent_dist`.
#[derive(Debug, Clone)]
pub struct Posterior {
    pub mean: Tensor,
    /// Clamped to [-30, 20].
    pub logvar: Tensor,
}

impl Posterior {
    /// `mean + exp(0.5·logvar) · eps` (`DiagonalGaussianDistribution.sample` with the caller's noise;
    /// img2img / inpaint use this, with `eps` drawn from the request generator).
    pub fn sample(&self, eps: &Tensor) -> Result<Tensor> {
        if eps.dims() != self.mean.dims() {
            bail!(
                "posterior sample: eps has shape {:?}, expected {:?}",
                eps.dims(),
                self.mean.dims()
            );
        }
        let std = (&self.logvar * 0.5)?.exp()?;
        &self.mean + std.mul(&eps.to_dtype(self.mean.dtype())?)?
    }

    /// The mean (`sample_mode="argmax"` in Edit / EditPlus / Layered).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// `exp(0.5·logvar)`.
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }
}

/// `AutoencoderKLQwenImage` for single images.
#[derive(Debug, Clone)]
pub struct AutoencoderKLQwenImage {
    cfg: VaeConfig,
    encoder: Encoder,
    quant_conv: Conv,
    post_quant_conv: Conv,
    decoder: Decoder,
    dtype: DType,
    device: Device,
}

impl AutoencoderKLQwenImage {
    /// Loads `vae/config.json` and `vae/*.safetensors` of a snapshot. CPU runs need `F32` (or `F16`): candle
    /// 0.11's CPU conv/matmul path has no bf16 GEMM for this layout.
    pub fn load(snapshot: &Snapshot, dtype: DType, device: &Device) -> Result<Self> {
        if device.is_cpu() && dtype == DType::BF16 {
            bail!(
                "vae: bf16 is not supported on the CPU (candle has no bf16 conv there); load it in F32 or F16"
            );
        }
        let cfg: VaeConfig = snapshot.config("vae", "config.json")?;
        let vb = snapshot.weights("vae", dtype, device)?;
        Self::new(&cfg, vb)
    }

    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let z = cfg.z_dim;
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Encoder::new(cfg, 2 * z, vb.pp("encoder"))?,
            quant_conv: Conv::causal(2 * z, 2 * z, 1, vb.pp("quant_conv"))?,
            post_quant_conv: Conv::causal(z, z, 1, vb.pp("post_quant_conv"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `[B, C, 1, H, W]` or `[B, C, H, W]` with `C = channels` → `[B, C, H, W]` in the model dtype.
    fn frames(&self, x: &Tensor, channels: usize, what: &str) -> Result<Tensor> {
        let x = match x.rank() {
            4 => x.clone(),
            5 => {
                let (b, c, t, h, w) = x.dims5()?;
                if t != 1 {
                    bail!(
                        "vae {what}: only single images are supported, got {t} frames in shape {:?}",
                        x.dims()
                    );
                }
                x.reshape((b, c, h, w))?
            }
            r => bail!(
                "vae {what}: expected [B, {channels}, H, W] or [B, {channels}, 1, H, W], got rank {r} {:?}",
                x.dims()
            ),
        };
        let (b, c, h, w) = x.dims4()?;
        if c != channels || b == 0 || h == 0 || w == 0 {
            bail!(
                "vae {what}: expected [B, {channels}, H, W] with B, H, W > 0, got {:?}",
                x.dims()
            );
        }
        x.to_device(&self.device)?.to_dtype(self.dtype)
    }

    /// Raw latents `[B, z, 1, h, w]` or `[B, z, h, w]` (NOT normalised; see [`Self::denormalize`]) → image
    /// `[B, 3, 8h, 8w]` clamped to [-1, 1] (`_decode`, untiled).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = self.frames(z, self.cfg.z_dim, "decode")?;
        let images = (0..z.dim(0)?)
            .map(|b| self.decode_one(&z.get(b)?)?.clamp(-1.0, 1.0))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&images, 0)
    }

    /// `[z, h, w]` → `[3, H, W]`, not clamped.
    fn decode_one(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.post_quant_conv.forward_1x1(z)?;
        self.decoder.forward(&x)
    }

    /// Image `[B, 3, H, W]` or `[B, 3, 1, H, W]` in [-1, 1] → posterior over `[B, z, 1, H/8, W/8]`
    /// (H and W are floored by each stride-2 level, as in diffusers).
    pub fn encode(&self, x: &Tensor) -> Result<Posterior> {
        let x = self.frames(x, self.cfg.input_channels, "encode")?;
        let z = self.cfg.z_dim;
        let hs = (0..x.dim(0)?)
            .map(|b| {
                self.quant_conv
                    .forward_1x1(&self.encoder.forward(&x.get(b)?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let h = Tensor::stack(&hs, 0)?.unsqueeze(2)?; // [B, 2z, 1, h, w]
        let mean = h.narrow(1, 0, z)?.contiguous()?;
        let logvar = h.narrow(1, z, z)?.clamp(LOGVAR_MIN, LOGVAR_MAX)?;
        Ok(Posterior { mean, logvar })
    }

    /// Per-channel `latents_mean` and `1/latents_std` as `[1, z, 1, 1]` (`torch.tensor(list)` is f32; the
    /// reciprocal is taken in f32 like the pipelines do), then cast to `dtype`.
    fn stats(&self, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let z = self.cfg.z_dim;
        let mean: Vec<f32> = self.cfg.latents_mean.iter().map(|&v| v as f32).collect();
        let inv_std: Vec<f32> = self
            .cfg
            .latents_std
            .iter()
            .map(|&v| 1.0 / v as f32)
            .collect();
        let mean = Tensor::from_vec(mean, (1, z, 1, 1), device)?.to_dtype(dtype)?;
        let inv_std = Tensor::from_vec(inv_std, (1, z, 1, 1), device)?.to_dtype(dtype)?;
        Ok((mean, inv_std))
    }

    /// Applies `f(x4, mean, inv_std)` on a `[B, z, 1, h, w]` or `[B, z, h, w]` tensor, keeping its rank.
    fn per_channel(
        &self,
        z: &Tensor,
        what: &str,
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let dims = z.dims().to_vec();
        let zc = self.cfg.z_dim;
        let x4 = match dims.as_slice() {
            [b, c, h, w] if *c == zc => z.reshape((*b, *c, *h, *w))?,
            [b, c, 1, h, w] if *c == zc => z.reshape((*b, *c, *h, *w))?,
            _ => bail!("vae {what}: expected [B, {zc}, h, w] or [B, {zc}, 1, h, w], got {dims:?}"),
        };
        let (mean, inv_std) = self.stats(z.dtype(), z.device())?;
        f(&x4, &mean, &inv_std)?.reshape(dims)
    }

    /// Decode direction, exactly as the pipelines compute it: `z / (1/latents_std) + latents_mean`.
    pub fn denormalize(&self, z: &Tensor) -> Result<Tensor> {
        self.per_channel(z, "denormalize", |x, mean, inv_std| {
            x.broadcast_div(inv_std)?.broadcast_add(mean)
        })
    }

    /// Encode direction, as img2img/inpaint compute it: `(z - latents_mean) * (1/latents_std)`.
    pub fn normalize(&self, z: &Tensor) -> Result<Tensor> {
        self.per_channel(z, "normalize", |x, mean, inv_std| {
            x.broadcast_sub(mean)?.broadcast_mul(inv_std)
        })
    }

    /// Tiled decode (diffusers `tiled_decode`): latent tiles of `sample_min / f` every `sample_stride / f`,
    /// each decoded alone, blended linearly over `sample_min - sample_stride` pixels with the tile above and
    /// the one to the left, and cropped to the stride. Not identical to [`Self::decode`]; never used by the
    /// pipelines. Like diffusers, falls back to the untiled (clamped) decode when the latent fits one tile,
    /// and does not clamp the tiled result.
    pub fn decode_tiled(&self, z: &Tensor, tile: TileConfig) -> Result<Tensor> {
        let f = self.cfg.scale_factor();
        let (min_h, min_w) = (tile.sample_min_height / f, tile.sample_min_width / f);
        let (stride_h, stride_w) = (tile.sample_stride_height / f, tile.sample_stride_width / f);
        if min_h == 0 || min_w == 0 || stride_h == 0 || stride_w == 0 {
            bail!("vae decode_tiled: tile sizes {tile:?} are smaller than the scale factor {f}");
        }
        if tile.sample_stride_height > tile.sample_min_height
            || tile.sample_stride_width > tile.sample_min_width
        {
            bail!("vae decode_tiled: tile strides must not exceed the tile sizes, got {tile:?}");
        }
        let z = self.frames(z, self.cfg.z_dim, "decode_tiled")?;
        let (_, _, h, w) = z.dims4()?;
        if h <= min_h && w <= min_w {
            return self.decode(&z);
        }
        let blend_h = tile.sample_min_height - tile.sample_stride_height;
        let blend_w = tile.sample_min_width - tile.sample_stride_width;
        let mut images = Vec::new();
        for b in 0..z.dim(0)? {
            let zb = z.get(b)?; // [z, h, w]
            let mut rows: Vec<Vec<Tensor>> = Vec::new();
            for i in (0..h).step_by(stride_h) {
                let mut row: Vec<Tensor> = Vec::new();
                for j in (0..w).step_by(stride_w) {
                    let t = zb
                        .narrow(1, i, min_h.min(h - i))?
                        .narrow(2, j, min_w.min(w - j))?;
                    let mut tile_img = self.decode_one(&t)?; // [3, th, tw]
                    // blend with the (already blended) tile above and the one to the left, as diffusers does in place
                    if let Some(above) = rows.last() {
                        tile_img = blend(&above[row.len()], &tile_img, blend_h, 1)?;
                    }
                    if let Some(left) = row.last() {
                        tile_img = blend(left, &tile_img, blend_w, 2)?;
                    }
                    row.push(tile_img);
                }
                rows.push(row);
            }
            let mut out_rows = Vec::with_capacity(rows.len());
            for row in &rows {
                let cropped = row
                    .iter()
                    .map(|t| {
                        let (_, th, tw) = t.dims3()?;
                        t.narrow(1, 0, tile.sample_stride_height.min(th))?.narrow(
                            2,
                            0,
                            tile.sample_stride_width.min(tw),
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                out_rows.push(Tensor::cat(&cropped, 2)?);
            }
            let img = Tensor::cat(&out_rows, 1)?;
            images.push(img.narrow(1, 0, (h * f).min(img.dim(1)?))?.narrow(
                2,
                0,
                (w * f).min(img.dim(2)?),
            )?);
        }
        Tensor::stack(&images, 0)
    }
}

/// diffusers `blend_v` (dim 1) / `blend_h` (dim 2) on `[C, H, W]`: the first `extent` rows (columns) of `b`
/// become `a[-extent + y]·(1 - y/extent) + b[y]·(y/extent)`.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let ramp: Vec<f32> = (0..extent).map(|y| y as f32 / extent as f32).collect();
    let shape = if dim == 1 {
        (1, extent, 1)
    } else {
        (1, 1, extent)
    };
    let wb = Tensor::from_vec(ramp, shape, b.device())?.to_dtype(b.dtype())?;
    let wa = (1.0 - &wb)?;
    let a_tail = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let head = (a_tail.broadcast_mul(&wa)? + b.narrow(dim, 0, extent)?.broadcast_mul(&wb)?)?;
    let rest = b.dim(dim)? - extent;
    if rest == 0 {
        Ok(head)
    } else {
        Tensor::cat(&[&head, &b.narrow(dim, extent, rest)?], dim)
    }
}

/// `[B, 3, H, W]` (or `[B, 3, 1, H, W]`) in [-1, 1] → RGB8 HWC bytes per image, rounded as diffusers'
/// `postprocess(output_type="pil")`: `clamp(x·0.5 + 0.5, 0, 1)` in f32, then numpy `(x·255).round()`
/// (round half to even) and `uint8`.
pub fn to_rgb8(image: &Tensor) -> Result<Vec<Vec<u8>>> {
    let image = match image.rank() {
        4 => image.clone(),
        5 if image.dim(2)? == 1 => image.squeeze(2)?,
        _ => bail!(
            "to_rgb8: expected [B, 3, H, W] or [B, 3, 1, H, W], got {:?}",
            image.dims()
        ),
    };
    let (b, c, h, w) = image.dims4()?;
    if c != 3 {
        bail!("to_rgb8: expected 3 channels, got {:?}", image.dims());
    }
    let x = image.to_dtype(DType::F32)?;
    let x = ((x * 0.5)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?; // [B, H, W, 3]
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let v = x.get(i)?.flatten_all()?.to_vec1::<f32>()?;
        debug_assert_eq!(v.len(), h * w * 3);
        out.push(
            v.into_iter()
                .map(|p| (p * 255.0).round_ties_even() as u8)
                .collect(),
        );
    }
    Ok(out)
}

/// RGB8 HWC bytes → `[1, 3, H, W]` f32 in [-1, 1]: `2·(v/255) - 1` in f32, as `VaeImageProcessor.preprocess`
/// computes it after resizing (`pil_to_numpy` then `normalize`).
pub fn from_rgb8(rgb: &[u8], width: usize, height: usize, device: &Device) -> Result<Tensor> {
    if width == 0 || height == 0 || rgb.len() != width * height * 3 {
        bail!(
            "from_rgb8: {} bytes do not hold a {width}x{height} RGB8 image",
            rgb.len()
        );
    }
    let v: Vec<f32> = rgb
        .iter()
        .map(|&p| 2.0 * (p as f32 / 255.0) - 1.0)
        .collect();
    Tensor::from_vec(v, (1, height, width, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

#[cfg(test)]
mod tests;
