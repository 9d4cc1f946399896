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
//! Layout and memory: every image of a batch runs on its own (every op is per image) in channels-last
//! `[H, W, C]` layout. The 3x3 convs run in bands of output rows; for f32 on the CPU one fused pass
//! (`im2col.rs`) applies the preceding RMS norm + SiLU, or the 2x upsample, to the band's input rows, pads
//! and writes the band's im2col matrix, then one GEMM computes the band. The full-resolution normalised or
//! upsampled activations never exist, so a decode holds about three copies of its largest feature map
//! (block input, conv output, residual sum) plus a bounded scratch. Other dtypes/devices take the same
//! computation through candle ops on the whole image. The mid-block attention runs in blocks of query rows
//! so the (H/8·W/8)² score matrix is never materialised.

use crate::weights::VarBuilder;
use candle_core::{D, DType, Device, Result, Tensor, bail};
use serde::Deserialize;

use crate::cpu_kernels::{self, WeightLayout};
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

/// Elements of the im2col matrix of one conv band (8 MiB in f32): bounds the conv scratch memory and stays
/// under glibc's 32 MiB dynamic mmap threshold, so band buffers are reused instead of mmapped and faulted in.
const CONV_BAND_ELEMS: usize = 1 << 21;
/// Elements of one attention score block (64 MiB in f32): the query rows per block are this / keys.
const ATTN_SCORE_ELEMS: usize = 1 << 24;
/// `F.normalize` eps (clamp on the L2 norm), diffusers `QwenImageRMS_norm`.
const NORM_EPS: f64 = 1e-12;
/// `DiagonalGaussianDistribution` logvar clamp (diffusers `models/autoencoders/vae.py`).
const LOGVAR_MIN: f64 = -30.0;
const LOGVAR_MAX: f64 = 20.0;

// ------------------------------------------------------------------------------------------------------------
// building blocks, on one image in channels-last layout: [H, W, C]
// ------------------------------------------------------------------------------------------------------------

/// Channel RMS norm (`QwenImageRMS_norm`): `x / max(‖x‖₂ over C, 1e-12) * sqrt(C) * gamma`.
#[derive(Debug, Clone)]
struct RmsNorm {
    /// `[C]`
    gamma: Tensor,
    /// `gamma` as f32 for the fused CPU kernel.
    gamma_f32: Vec<f32>,
    scale: f64,
}

impl RmsNorm {
    /// `gamma` is `[C,1,1,1]` in resnets / `norm_out` (images=False) and `[C,1,1]` in attention (images=True).
    fn new(dim: usize, images: bool, vb: VarBuilder) -> Result<Self> {
        let gamma = if images {
            vb.get((dim, 1, 1), "gamma")?
        } else {
            vb.get((dim, 1, 1, 1), "gamma")?
        }
        .reshape(dim)?;
        let gamma_f32 = gamma.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(Self {
            gamma,
            gamma_f32,
            scale: (dim as f64).sqrt(),
        })
    }

    /// `x`: `[H, W, C]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        // bf16/f16 inputs are normalised in f32 and cast back before the scale and gamma (diffusers order).
        let x32 = x.to_dtype(DType::F32)?;
        let norm = x32
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(NORM_EPS, f64::INFINITY)?; // [H, W, 1]
        let normalized = x32.broadcast_div(&norm)?.to_dtype(dtype)?;
        (normalized * self.scale)?.broadcast_mul(&self.gamma)
    }
}

/// What is applied to a 3x3 conv's input before its zero padding (fused into the conv, see the module docs).
#[derive(Clone, Copy)]
enum Prologue<'a> {
    None,
    /// `silu(norm(x))`: the residual blocks and the output heads.
    NormSilu(&'a RmsNorm),
    /// 2x nearest upsampling (`QwenImageUpsample`; "nearest-exact" equals nearest at exactly 2x).
    Upsample2x,
}

/// 2x nearest upsampling of `[H, W, C]`: `out[i, j] = in[i // 2, j // 2]`.
fn upsample2x(x: &Tensor) -> Result<Tensor> {
    let (h, w, c) = x.dims3()?;
    x.reshape((h, 1, w, 1, c))? // [H, 1, W, 1, C]
        .broadcast_as((h, 2, w, 2, c))? // [H, 2, W, 2, C]
        .reshape((2 * h, 2 * w, c))
}

/// A 3x3, stride-1, padding-1 conv2d: from a `CausalConv3d` (its last temporal tap, pitfall 1) or from the
/// `nn.Conv2d` of an upsampler.
#[derive(Debug, Clone)]
struct Conv3x3 {
    /// `[9·I + 1, O]`: row `(ky·3 + kx)·I + c` holds `weight[:, c, ky, kx]`, the last row is the bias.
    wt: Tensor,
    in_dim: usize,
    out_dim: usize,
}

impl Conv3x3 {
    /// `QwenImageCausalConv3d(in, out, 3, padding=1)`: `weight [O, I, 3, 3, 3]`, keeps `weight[:, :, 2]`.
    fn causal(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb
            .get((out_dim, in_dim, 3, 3, 3), "weight")?
            .narrow(2, 2, 1)?
            .squeeze(2)?;
        Self::from_weights(&w, &vb.get(out_dim, "bias")?)
    }

    /// `nn.Conv2d(in, out, 3, padding=1)`.
    fn plain(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::from_weights(
            &vb.get((out_dim, in_dim, 3, 3), "weight")?,
            &vb.get(out_dim, "bias")?,
        )
    }

    /// `w`: `[O, I, 3, 3]`, `b`: `[O]`.
    fn from_weights(w: &Tensor, b: &Tensor) -> Result<Self> {
        let (o, i, _, _) = w.dims4()?;
        let w = w.permute((2, 3, 1, 0))?.reshape((9 * i, o))?; // [3, 3, I, O] -> [9I, O]
        let wt = Tensor::cat(&[&w, &b.reshape((1, o))?], 0)?.contiguous()?; // [9I + 1, O]
        Ok(Self {
            wt,
            in_dim: i,
            out_dim: o,
        })
    }

    /// `prologue(x)` then the conv: `[H, W, I]` → `[H', W', O]` (H' = 2H, W' = 2W when upsampling).
    fn forward(&self, x: &Tensor, prologue: Prologue) -> Result<Tensor> {
        self.forward_add(x, prologue, None)
    }

    /// `conv(prologue(x)) + residual`: the residual sum is fused into the conv's output write, so a residual
    /// block never holds a separate full-size sum.
    fn forward_add(
        &self,
        x: &Tensor,
        prologue: Prologue,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, _, c) = x.dims3()?;
        if c != self.in_dim {
            bail!(
                "vae conv: input has {c} channels, the conv expects {}",
                self.in_dim
            );
        }
        if x.device().is_cpu()
            && x.dtype() == DType::F32
            && residual.is_none_or(|r| r.dtype() == DType::F32)
        {
            let residual = residual.map(|r| r.contiguous()).transpose()?;
            self.forward_cpu_f32(&x.contiguous()?, prologue, residual.as_ref())
        } else {
            let y = self.forward_tensor_ops(x, prologue)?;
            match residual {
                Some(r) => y + r,
                None => Ok(y),
            }
        }
    }

    /// Bands of output rows: fused prologue + padding + im2col (`im2col::band_cols`), then one GEMM per band
    /// `[rows·(W+2), 9I+1] x [9I+1, O]`; peak scratch is one band (≤ [`CONV_BAND_ELEMS`] floats + its output).
    fn forward_cpu_f32(
        &self,
        x: &Tensor,
        prologue: Prologue,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (h_in, w_in, c) = x.dims3()?;
        let up = matches!(prologue, Prologue::Upsample2x);
        let (h, w) = if up {
            (2 * h_in, 2 * w_in)
        } else {
            (h_in, w_in)
        };
        let (wp, k, o) = (w + 2, 9 * c + 1, self.out_dim);
        let kernel_prologue = match prologue {
            Prologue::None => im2col::Prologue::None,
            Prologue::Upsample2x => im2col::Prologue::Upsample2x,
            Prologue::NormSilu(norm) => im2col::Prologue::NormSilu {
                gamma: &norm.gamma_f32,
                scale: norm.scale as f32,
                eps: NORM_EPS as f32,
            },
        };
        if let Some(r) = residual
            && r.dims() != [h, w, o]
        {
            bail!(
                "vae conv: residual has shape {:?}, expected [{h}, {w}, {o}]",
                r.dims()
            );
        }
        let rows_per_band = (CONV_BAND_ELEMS / (k * wp)).clamp(1, h);
        let threads = rayon::current_num_threads();
        let mut out = vec![0f32; h * w * o];
        let mut y0 = 0;
        while y0 < h {
            crate::interrupt::check()?;
            let rows = rows_per_band.min(h - y0);
            let subs = im2col::with_f32(x, |xs| {
                im2col::band_cols(
                    xs,
                    (h_in, w_in, c),
                    (h, w),
                    y0,
                    rows,
                    &kernel_prologue,
                    threads,
                )
            })?;
            let mut r0 = y0;
            for (sub_rows, cols) in subs {
                let cols = Tensor::from_vec(cols, (sub_rows * wp, k), x.device())?;
                // [rows·(W+2), O]; `linear` skips candle's zero fill of the output
                let y = match cpu_kernels::linear(&cols, &self.wt, WeightLayout::InOut, None)? {
                    Some(y) => y,
                    None => cols.matmul(&self.wt)?,
                };
                drop(cols);
                let mut write = |ys: &[f32], res: Option<&[f32]>| {
                    // drop the 2 padding columns of each padded row; add the residual
                    for r in 0..sub_rows {
                        let src = &ys[r * wp * o..][..w * o];
                        let at = (r0 + r) * w * o;
                        let dst = &mut out[at..][..w * o];
                        match res {
                            Some(res) => {
                                for ((d, s), a) in dst.iter_mut().zip(src).zip(&res[at..][..w * o])
                                {
                                    *d = s + a;
                                }
                            }
                            None => dst.copy_from_slice(src),
                        }
                    }
                };
                match residual {
                    Some(res) => {
                        im2col::with_f32(&y, |ys| im2col::with_f32(res, |rs| write(ys, Some(rs))))??
                    }
                    None => im2col::with_f32(&y, |ys| write(ys, None))?,
                }
                r0 += sub_rows;
            }
            y0 += rows;
        }
        Tensor::from_vec(out, (h, w, o), x.device())
    }

    /// The same computation with candle ops (any dtype / device), on the whole image at once.
    fn forward_tensor_ops(&self, x: &Tensor, prologue: Prologue) -> Result<Tensor> {
        let x = match prologue {
            Prologue::None => x.clone(),
            Prologue::NormSilu(norm) => candle_nn::ops::silu(&norm.forward(x)?)?,
            Prologue::Upsample2x => upsample2x(x)?,
        };
        let (h, w, c) = x.dims3()?;
        let wp = w + 2;
        // zero padding 1 on each side, plus one spare row for the last tap's flat slice
        let flat = x
            .pad_with_zeros(1, 1, 1)?
            .pad_with_zeros(0, 1, 2)?
            .reshape(((h + 3) * wp, c))?;
        let n = h * wp;
        let mut taps = (0..9)
            .map(|t| flat.narrow(0, (t / 3) * wp + t % 3, n))
            .collect::<Result<Vec<_>>>()?;
        taps.push(Tensor::ones((n, 1), x.dtype(), x.device())?);
        let cols = Tensor::cat(&taps, 1)?; // [H·(W+2), 9C + 1]
        cols.matmul(&self.wt)?
            .reshape((h, wp, self.out_dim))?
            .narrow(1, 0, w)?
            .contiguous()
    }
}

/// A 1x1 conv (`CausalConv3d` with kernel 1, or the attention's `nn.Conv2d(.., 1)`): a matmul over pixels.
#[derive(Debug, Clone)]
struct Conv1x1 {
    /// `[I, O]`
    wt: Tensor,
    /// `[O]`
    bias: Tensor,
    out_dim: usize,
}

impl Conv1x1 {
    /// `QwenImageCausalConv3d(in, out, 1)`: `weight [O, I, 1, 1, 1]`.
    fn causal(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb
            .get((out_dim, in_dim, 1, 1, 1), "weight")?
            .reshape((out_dim, in_dim))?;
        Ok(Self {
            wt: w.t()?.contiguous()?,
            bias: vb.get(out_dim, "bias")?,
            out_dim,
        })
    }

    /// `nn.Conv2d(in, out, 1)`: `weight [O, I, 1, 1]`.
    fn plain(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb
            .get((out_dim, in_dim, 1, 1), "weight")?
            .reshape((out_dim, in_dim))?;
        Ok(Self {
            wt: w.t()?.contiguous()?,
            bias: vb.get(out_dim, "bias")?,
            out_dim,
        })
    }

    /// `[H, W, I]` → `[H, W, O]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (h, w, c) = x.dims3()?;
        let x = x.reshape((h * w, c))?;
        // [HW, O]; on the CPU one GEMM adds the bias too
        let y = match cpu_kernels::linear(&x, &self.wt, WeightLayout::InOut, Some(&self.bias))? {
            Some(y) => y,
            None => x.matmul(&self.wt)?.broadcast_add(&self.bias)?,
        };
        y.reshape((h, w, self.out_dim))
    }
}

/// The encoder's downsampling conv (`resample.1`): `ZeroPad2d((0, 1, 0, 1))` then a 3x3 stride-2 conv without
/// padding (pitfall 2): `[H, W, C]` → `[floor(H/2), floor(W/2), C]`.
#[derive(Debug, Clone)]
struct DownConv {
    /// `[C, C, 3, 3]`
    weight: Tensor,
    /// `[C, 1, 1]`
    bias: Tensor,
}

impl DownConv {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((dim, dim, 3, 3), "weight")?,
            bias: vb.get(dim, "bias")?.reshape((dim, 1, 1))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (h, w, c) = x.dims3()?;
        let chw = x.permute((2, 0, 1))?; // [C, H, W]
        let padded = chw
            .pad_with_zeros(2, 0, 1)?
            .pad_with_zeros(1, 0, 1)?
            .reshape((1, c, h + 1, w + 1))?;
        let y = padded
            .conv2d(&self.weight, 0, 2, 1, 1)?
            .squeeze(0)?
            .broadcast_add(&self.bias)?; // [C, H/2, W/2]
        y.permute((1, 2, 0))?.contiguous()
    }
}

/// `QwenImageResidualBlock`: `conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)`.
#[derive(Debug, Clone)]
struct ResidualBlock {
    norm1: RmsNorm,
    conv1: Conv3x3,
    norm2: RmsNorm,
    conv2: Conv3x3,
    /// `conv_shortcut` when in != out (applied to the raw input).
    shortcut: Option<Conv1x1>,
}

impl ResidualBlock {
    fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let shortcut = if in_dim != out_dim {
            Some(Conv1x1::causal(in_dim, out_dim, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: RmsNorm::new(in_dim, false, vb.pp("norm1"))?,
            conv1: Conv3x3::causal(in_dim, out_dim, vb.pp("conv1"))?,
            norm2: RmsNorm::new(out_dim, false, vb.pp("norm2"))?,
            conv2: Conv3x3::causal(out_dim, out_dim, vb.pp("conv2"))?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(x, Prologue::NormSilu(&self.norm1))?;
        match &self.shortcut {
            Some(s) => {
                self.conv2
                    .forward_add(&h, Prologue::NormSilu(&self.norm2), Some(&s.forward(x)?))
            }
            None => self
                .conv2
                .forward_add(&h, Prologue::NormSilu(&self.norm2), Some(x)),
        }
    }
}

/// `QwenImageAttentionBlock`: single-head self-attention over all pixels with head dim C, plus the input.
#[derive(Debug, Clone)]
struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: Conv1x1,
    proj: Conv1x1,
    dim: usize,
}

impl AttentionBlock {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: RmsNorm::new(dim, true, vb.pp("norm"))?,
            to_qkv: Conv1x1::plain(dim, 3 * dim, vb.pp("to_qkv"))?,
            proj: Conv1x1::plain(dim, dim, vb.pp("proj"))?,
            dim,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_chunked(x, None)
    }

    /// `query_rows`: queries per score block; `None` sizes them from [`ATTN_SCORE_ELEMS`].
    fn forward_chunked(&self, x: &Tensor, query_rows: Option<usize>) -> Result<Tensor> {
        let (h, w, c) = x.dims3()?;
        let qkv = self
            .to_qkv
            .forward(&self.norm.forward(x)?)?
            .reshape((h * w, 3 * c))?; // [HW, 3C]
        // q | k | v along the channels (pitfall 6); tokens in row-major h·W + w order
        let q = qkv.narrow(1, 0, c)?.contiguous()?; // [HW, C]
        let kt = qkv.narrow(1, c, c)?.t()?.contiguous()?; // [C, HW] = kᵀ
        let v = qkv.narrow(1, 2 * c, c)?.contiguous()?; // [HW, C]
        drop(qkv);
        let scale = 1.0 / (self.dim as f64).sqrt(); // SDPA's default scale
        let rows = query_rows
            .unwrap_or(ATTN_SCORE_ELEMS / (h * w))
            .clamp(1, h * w);
        let out = single_head_attention(&q, &kt, &v, scale, rows)?.reshape((h, w, c))?;
        self.proj.forward(&out)? + x
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
        crate::interrupt::check()?;
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
    /// `QwenImageResample` downsample2d / downsample3d (its `time_conv` is skipped for one frame).
    Down(DownConv),
}

/// `QwenImageEncoder3d` for one frame.
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv3x3,
    down: Vec<DownLayer>,
    mid: MidBlock,
    norm_out: RmsNorm,
    conv_out: Conv3x3,
}

impl Encoder {
    /// Mirrors the constructor loop of `QwenImageEncoder3d.__init__`; `z2` is `2·z_dim` (mean | logvar).
    fn new(cfg: &VaeConfig, z2: usize, vb: VarBuilder) -> Result<Self> {
        // dims = [dim * u for u in [1] + dim_mult]
        let dims: Vec<usize> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|u| cfg.base_dim * u)
            .collect();
        let conv_in = Conv3x3::causal(cfg.input_channels, dims[0], vb.pp("conv_in"))?;
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
                down.push(DownLayer::Down(DownConv::new(
                    out_dim,
                    vbd.pp(down.len()).pp("resample.1"),
                )?));
                scale /= 2.0;
            }
        }
        let top = dims[dims.len() - 1];
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::new(top, vb.pp("mid_block"))?,
            norm_out: RmsNorm::new(top, false, vb.pp("norm_out"))?,
            conv_out: Conv3x3::causal(top, z2, vb.pp("conv_out"))?,
        })
    }

    /// `[H, W, C_in]` → `[H/f, W/f, 2z]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x, Prologue::None)?;
        for layer in &self.down {
            crate::interrupt::check()?;
            x = match layer {
                DownLayer::Res(r) => r.forward(&x)?,
                DownLayer::Attn(a) => a.forward(&x)?,
                DownLayer::Down(d) => d.forward(&x)?,
            };
        }
        let x = self.mid.forward(&x)?;
        self.conv_out
            .forward(&x, Prologue::NormSilu(&self.norm_out))
    }
}

/// `QwenImageUpBlock`: `num_res_blocks + 1` residual blocks, then an optional upsampler.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    /// `upsamplers.0.resample.1`, halving the channels (upsample2d and upsample3d share this spatial path;
    /// upsample3d's `time_conv` is skipped for one frame).
    upsample: Option<Conv3x3>,
}

/// `QwenImageDecoder3d` for one frame.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv3x3,
    mid: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: Conv3x3,
}

impl Decoder {
    /// Mirrors the constructor loop of `QwenImageDecoder3d.__init__` (which takes `attn_scales` but adds no
    /// attention to the up blocks).
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        // dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
        let last = cfg.dim_mult[cfg.dim_mult.len() - 1];
        let dims: Vec<usize> = std::iter::once(last)
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|u| cfg.base_dim * u)
            .collect();
        let conv_in = Conv3x3::causal(cfg.z_dim, dims[0], vb.pp("conv_in"))?;
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
                Some(Conv3x3::plain(
                    out_dim,
                    out_dim / 2,
                    vbu.pp("upsamplers.0.resample.1"),
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
        }
        let out_dim = dims[dims.len() - 1];
        Ok(Self {
            conv_in,
            mid,
            up_blocks,
            norm_out: RmsNorm::new(out_dim, false, vb.pp("norm_out"))?,
            conv_out: Conv3x3::causal(out_dim, cfg.input_channels, vb.pp("conv_out"))?,
        })
    }

    /// `[h, w, z]` (after post_quant_conv) → `[h·f, w·f, C_in]`, not clamped.
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(z, Prologue::None)?;
        let mut x = self.mid.forward(&x)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                crate::interrupt::check()?;
                x = r.forward(&x)?;
            }
            if let Some(up) = &block.upsample {
                x = up.forward(&x, Prologue::Upsample2x)?;
            }
        }
        self.conv_out
            .forward(&x, Prologue::NormSilu(&self.norm_out))
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
    quant_conv: Conv1x1,
    post_quant_conv: Conv1x1,
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
            quant_conv: Conv1x1::causal(2 * z, 2 * z, vb.pp("quant_conv"))?,
            post_quant_conv: Conv1x1::causal(z, z, vb.pp("post_quant_conv"))?,
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
        let z = z.permute((1, 2, 0))?.contiguous()?; // [h, w, z]
        let x = self.post_quant_conv.forward(&z)?;
        self.decoder.forward(&x)?.permute((2, 0, 1))?.contiguous() // [H, W, 3] -> [3, H, W]
    }

    /// `[3, H, W]` → `[2z, h, w]` (after quant_conv).
    fn encode_one(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.permute((1, 2, 0))?.contiguous()?; // [H, W, 3]
        let h = self.quant_conv.forward(&self.encoder.forward(&x)?)?;
        h.permute((2, 0, 1))?.contiguous() // [h, w, 2z] -> [2z, h, w]
    }

    /// Image `[B, 3, H, W]` or `[B, 3, 1, H, W]` in [-1, 1] → posterior over `[B, z, 1, H/8, W/8]`
    /// (H and W are floored by each stride-2 level, as in diffusers).
    pub fn encode(&self, x: &Tensor) -> Result<Posterior> {
        let x = self.frames(x, self.cfg.input_channels, "encode")?;
        let z = self.cfg.z_dim;
        let hs = (0..x.dim(0)?)
            .map(|b| self.encode_one(&x.get(b)?))
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
                    crate::interrupt::check()?;
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

mod im2col;
#[cfg(test)]
mod tests;
