//! The Qwen2.5-VL vision tower (transformers 5.23 `models/qwen2_5_vl/modeling_qwen2_5_vl.py`,
//! `Qwen2_5_VisionTransformerPretrainedModel`, with `vision_utils.get_vision_position_ids` /
//! `get_vision_window_index` / `get_vision_cu_seqlens`):
//!
//! 1. patch embedding: a `Conv3d` whose kernel equals its stride `(temporal, P, P)` over rows that the processor
//!    already cut to exactly one kernel each, i.e. one matmul with the weight flattened to `[hidden, C·T·P·P]`
//!    (candle-transformers' `conv3d_temporal_2` splits the kernel into two conv2d over the frames; here no
//!    convolution is left to do, so that crate is not needed);
//! 2. the patches are regrouped window by window (`window_size / merge / patch` merged units a side, 4x4 for the
//!    released 112/2/14; the last windows of a row/column are partial) and so are the 2-D rotary tables;
//! 3. `depth` blocks `x + attn(rms(x))`, `x + mlp(rms(x))`: blocks listed in `fullatt_block_indexes` attend over
//!    each whole picture, the others within each window; no mask, no causality; rotate-half RoPE on q and k in
//!    f32 whose first half rotates with the patch row and the second half with the column;
//! 4. the patch merger: RMSNorm, `merge²` neighbouring patches concatenated, `Linear → GELU (erf) → Linear` to
//!    the text hidden size; then back to the picture's row-major merged order.
//!
//! Weights: `visual.*` (released snapshot) or `model.visual.*` (transformers 5 native names) in `text_encoder/`.

use candle_core::{DType, Device, Result, Tensor};

use super::config::VisionConfig;
use crate::nn::{Linear, RmsNorm, attention, linear};
use crate::snapshot::{Snapshot, Weights};
use crate::weights::VarBuilder;

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// eps of every RMSNorm of the tower (`Qwen2_5_VLRMSNorm(hidden_size, eps=1e-6)` in `Qwen2_5_VLVisionBlock` and
/// `Qwen2_5_VLPatchMerger`).
pub const VISION_NORM_EPS: f32 = 1e-6;

/// Which prefix the vision weights use: `visual` or `model.visual`.
pub fn detect_prefix(weights: &Weights) -> Option<&'static str> {
    ["visual", "model.visual"]
        .into_iter()
        .find(|p| weights.contains(&format!("{p}.patch_embed.proj.weight")))
}

/// Per patch, in the processor's row order, its (row, column) in the picture's patch grid
/// (`get_vision_position_ids`: merge blocks of `m x m` patches, block-major; repeated per frame).
pub fn patch_positions(grids: &[(usize, usize, usize)], m: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &(t, h, w) in grids {
        for _ in 0..t {
            for bh in 0..h / m {
                for bw in 0..w / m {
                    for ih in 0..m {
                        for iw in 0..m {
                            out.push((bh * m + ih, bw * m + iw));
                        }
                    }
                }
            }
        }
    }
    out
}

/// `get_vision_window_index`: the order of merged units window by window, and the window boundaries in patches
/// (`cu_window_seqlens`, duplicates removed as `unique_consecutive` does).
pub fn window_index(
    grids: &[(usize, usize, usize)],
    m: usize,
    window: usize,
) -> (Vec<usize>, Vec<usize>) {
    let unit = m * m;
    let mut index = Vec::new();
    let mut cu = vec![0usize];
    let mut offset = 0;
    for &(t, h, w) in grids {
        let (lh, lw) = (h / m, w / m);
        // pad = window - len % window (a whole extra window when it divides; its windows are empty)
        let nh = (lh + window - lh % window) / window;
        let nw = (lw + window - lw % window) / window;
        for ti in 0..t {
            for wy in 0..nh {
                for wx in 0..nw {
                    let mut n = 0;
                    for y in wy * window..((wy + 1) * window).min(lh) {
                        for x in wx * window..((wx + 1) * window).min(lw) {
                            index.push(offset + (ti * lh + y) * lw + x);
                            n += 1;
                        }
                    }
                    let last = *cu.last().unwrap_or(&0);
                    if n > 0 {
                        cu.push(last + n * unit);
                    }
                }
            }
        }
        offset += t * lh * lw;
    }
    (index, cu)
}

/// `get_vision_cu_seqlens`: one attention segment per picture frame (`h·w` patches each).
pub fn frame_seqlens(grids: &[(usize, usize, usize)]) -> Vec<usize> {
    let mut cu = vec![0usize];
    for &(t, h, w) in grids {
        for _ in 0..t {
            let last = *cu.last().unwrap_or(&0);
            cu.push(last + h * w);
        }
    }
    cu
}

/// `Qwen2_5_VLVisionBlock`.
#[derive(Debug, Clone)]
struct VisionBlock {
    norm1: RmsNorm,
    norm2: RmsNorm,
    qkv: Linear,
    proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl VisionBlock {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (e, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            norm1: RmsNorm::new(e, VISION_NORM_EPS, vb.pp("norm1"))?,
            norm2: RmsNorm::new(e, VISION_NORM_EPS, vb.pp("norm2"))?,
            qkv: linear(e, 3 * e, vb.pp("attn.qkv"))?,
            proj: linear(e, e, vb.pp("attn.proj"))?,
            gate_proj: linear(e, i, vb.pp("mlp.gate_proj"))?,
            up_proj: linear(e, i, vb.pp("mlp.up_proj"))?,
            down_proj: linear(i, e, vb.pp("mlp.down_proj"))?,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `x`: `[N, E]` (window order); `cos`/`sin`: `[N, hd/2]` f32; `segments`: attention boundaries.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[usize],
    ) -> Result<Tensor> {
        let (n, e) = x.dims2()?;
        let (h, d) = (self.heads, self.head_dim);
        let dtype = x.dtype();
        let qkv = self.qkv.forward(&self.norm1.forward(x)?)?; // [N, 3E]
        // [N, 3, H, d] -> [3, H, N, d]
        let qkv = qkv.reshape((n, 3, h, d))?.permute((1, 2, 0, 3))?;
        // apply_rotary_pos_emb_vision: rotate-half in f32, then back to the activation dtype
        let qk = qkv.narrow(0, 0, 2)?.reshape((1, 2 * h, n, d))?;
        let qk = candle_nn::rotary_emb::rope(&qk.to_dtype(DType::F32)?.contiguous()?, cos, sin)?
            .to_dtype(dtype)?;
        let q = qk.narrow(1, 0, h)?; // [1, H, N, d]
        let k = qk.narrow(1, h, h)?;
        let v = qkv.narrow(0, 2, 1)?.contiguous()?; // [1, H, N, d]
        let scale = 1.0 / (d as f64).sqrt();
        let mut outs = Vec::with_capacity(segments.len().saturating_sub(1));
        for pair in segments.windows(2) {
            let (s, len) = (pair[0], pair[1] - pair[0]);
            let narrow = |t: &Tensor| t.narrow(2, s, len)?.contiguous();
            outs.push(attention(
                &narrow(&q)?,
                &narrow(&k)?,
                &narrow(&v)?,
                None,
                scale,
            )?);
        }
        let o = Tensor::cat(&outs, 2)?; // [1, H, N, d]
        let o = o.squeeze(0)?.transpose(0, 1)?.reshape((n, e))?; // [N, E]
        let x = (x + self.proj.forward(&o)?)?;
        let m = self.norm2.forward(&x)?;
        let act =
            (candle_nn::ops::silu(&self.gate_proj.forward(&m)?)? * self.up_proj.forward(&m)?)?;
        &x + self.down_proj.forward(&act)?
    }
}

/// `Qwen2_5_VLPatchMerger`: `mlp(ln_q(x).view(-1, E·m²))` with `mlp = Linear → GELU → Linear`.
#[derive(Debug, Clone)]
struct PatchMerger {
    ln_q: RmsNorm,
    fc1: Linear,
    fc2: Linear,
    merged: usize,
}

impl PatchMerger {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let merged = cfg.hidden_size * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            ln_q: RmsNorm::new(cfg.hidden_size, VISION_NORM_EPS, vb.pp("ln_q"))?,
            fc1: linear(merged, merged, vb.pp("mlp.0"))?,
            fc2: linear(merged, cfg.out_hidden_size, vb.pp("mlp.2"))?,
            merged,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.ln_q.forward(x)?.reshape(((), self.merged))?; // [N/m², E·m²]
        // nn.GELU() is the exact (erf) GELU
        self.fc2.forward(&self.fc1.forward(&x)?.gelu_erf()?)
    }
}

/// `Qwen2_5_VisionTransformerPretrainedModel`.
#[derive(Debug, Clone)]
pub struct VisionTower {
    cfg: VisionConfig,
    patch_embed: Linear,
    blocks: Vec<VisionBlock>,
    merger: PatchMerger,
    dtype: DType,
    device: Device,
}

impl VisionTower {
    /// From `vb` rooted at the tower's prefix (`visual` or `model.visual`).
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (e, c, t, p) = (
            cfg.hidden_size,
            cfg.in_channels(),
            cfg.temporal_patch_size,
            cfg.patch_size,
        );
        // Conv3d weight [E, C, T, P, P]; kernel == stride over one-kernel rows: a matmul with [E, C·T·P·P]
        let w = vb
            .pp("patch_embed.proj")
            .get((e, c, t, p, p), "weight")?
            .reshape((e, cfg.patch_len()))?;
        let blocks = (0..cfg.depth)
            .map(|i| VisionBlock::new(cfg, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed: Linear::from_tensors(w, None)?,
            blocks,
            merger: PatchMerger::new(cfg, vb.pp("merger"))?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Loads the vision tower from a snapshot's `text_encoder/` (config `vision_config`, weights `visual.*` or
    /// `model.visual.*`).
    pub fn load(snapshot: &Snapshot, dtype: DType, device: &Device) -> Result<Self> {
        let raw: serde_json::Value = snapshot.config("text_encoder", "config.json")?;
        let cfg = VisionConfig::from_text_encoder_config(&raw)?;
        let dir = snapshot.component_dir("text_encoder")?;
        let weights = Weights::open_dir(&dir)?;
        let prefix = detect_prefix(&weights).ok_or_else(|| {
            err(format!(
                "{}: no vision tower weights (`visual.patch_embed.proj.weight` or \
                 `model.visual.patch_embed.proj.weight`); an Edit model needs the full Qwen2.5-VL text encoder",
                dir.display()
            ))
        })?;
        let vb = VarBuilder::from_store(weights, dtype, device);
        Self::new(&cfg, vb.pp(prefix))
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// 2-D rotary tables `[N, hd/2]` (f32) for patches at `positions`: the first half of the frequencies turns
    /// with the row, the second with the column (`Qwen2_5_VLVisionRotaryEmbedding.recomposition_frequencies`).
    fn rotary(&self, positions: &[(usize, usize)]) -> Result<(Tensor, Tensor)> {
        let sd = self.cfg.head_dim() / 2;
        let theta = self.cfg.rope_theta() as f32;
        // inv_freq = 1 / theta^(arange(0, sd, 2) / sd), in f32
        let inv: Vec<f32> = (0..sd)
            .step_by(2)
            .map(|k| 1.0 / theta.powf(k as f32 / sd as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * sd);
        let mut sin = Vec::with_capacity(positions.len() * sd);
        for &(r, c) in positions {
            for p in [r, c] {
                for f in &inv {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let n = positions.len();
        Ok((
            Tensor::from_vec(cos, (n, sd), &self.device)?,
            Tensor::from_vec(sin, (n, sd), &self.device)?,
        ))
    }

    /// `pixel_values [Σ t·h·w, C·T·P·P]` of pictures with these grids → merged embeddings
    /// `[Σ t·h·w / merge², out_hidden_size]`, pictures in order, each in row-major merged order.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        grids: &[(usize, usize, usize)],
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let m = cfg.spatial_merge_size;
        let unit = m * m;
        let (n, len) = pixel_values.dims2()?;
        let expect: usize = grids.iter().map(|(t, h, w)| t * h * w).sum();
        if grids.is_empty() || n != expect || len != cfg.patch_len() {
            return Err(err(format!(
                "vision tower: pixel_values has shape [{n}, {len}], the grids {grids:?} need [{expect}, {}]",
                cfg.patch_len()
            )));
        }
        if let Some(g) = grids
            .iter()
            .find(|(t, h, w)| *t == 0 || h % m != 0 || w % m != 0)
        {
            return Err(err(format!(
                "vision tower: grid {g:?} is not a whole number of {m}x{m} merge blocks"
            )));
        }
        let x = self
            .patch_embed
            .forward(&pixel_values.to_dtype(self.dtype)?)?; // [N, E]
        // window order: merged unit u moves as its `unit` consecutive patches
        let (win, cu_window) = window_index(grids, m, cfg.merger_window());
        let perm: Vec<u32> = win
            .iter()
            .flat_map(|&u| (0..unit).map(move |j| (u * unit + j) as u32))
            .collect();
        let perm = Tensor::from_vec(perm, n, &self.device)?;
        let mut x = x.index_select(&perm, 0)?;
        let (cos, sin) = self.rotary(&patch_positions(grids, m))?;
        let (cos, sin) = (cos.index_select(&perm, 0)?, sin.index_select(&perm, 0)?);
        let cu_full = frame_seqlens(grids);
        for (i, block) in self.blocks.iter().enumerate() {
            crate::interrupt::check()?;
            let segments = if cfg.fullatt_block_indexes.contains(&i) {
                &cu_full
            } else {
                &cu_window
            };
            x = block.forward(&x, &cos, &sin, segments)?;
        }
        let merged = self.merger.forward(&x)?; // [N/m², out] in window order
        // reverse_indices = argsort(window_index)
        let mut rev = vec![0u32; win.len()];
        for (pos, &u) in win.iter().enumerate() {
            rev[u] = pos as u32;
        }
        let rev = Tensor::from_vec(rev, win.len(), &self.device)?;
        merged.index_select(&rev, 0)?.contiguous()
    }

    /// Hidden size of the merged output (the text model's hidden size).
    pub fn out_hidden_size(&self) -> usize {
        self.cfg.out_hidden_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_index_matches_transformers() {
        // grid 1 x 10 x 14 patches -> merged 5 x 7, window 4: windows (0,0) 4x4, (0,1) 4x3, (1,0) 1x4, (1,1) 1x3
        let (idx, cu) = window_index(&[(1, 10, 14)], 2, 4);
        assert_eq!(idx.len(), 35);
        assert_eq!(&idx[..5], &[0, 1, 2, 3, 7]);
        assert_eq!(&idx[16..19], &[4, 5, 6]);
        assert_eq!(cu, vec![0, 64, 112, 128, 140]);
        // an exact multiple gets padding windows that stay empty: 8x8 merged -> 4 windows of 16
        let (idx, cu) = window_index(&[(1, 16, 16)], 2, 4);
        assert_eq!(idx.len(), 64);
        assert_eq!(cu, vec![0, 64, 128, 192, 256]);
        // two pictures: the second one's units follow the first's
        let (idx, cu) = window_index(&[(1, 4, 4), (1, 2, 4)], 2, 4);
        assert_eq!(idx, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(cu, vec![0, 16, 24]);
        assert_eq!(frame_seqlens(&[(1, 4, 4), (1, 2, 4)]), vec![0, 16, 24]);
    }

    #[test]
    fn patch_positions_are_block_major() {
        let p = patch_positions(&[(1, 2, 4)], 2);
        assert_eq!(
            p,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
    }
}
