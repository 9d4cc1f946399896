//! `QwenImageControlNetModel` (diffusers `models/controlnets/controlnet_qwenimage.py`, 0.42.1): a copy of the
//! transformer's first blocks whose image-stream outputs, projected by zero-initialised linears and scaled,
//! become residuals added to the transformer's blocks (denoiser-and-pipelines.md §3.6, §8).

use crate::weights::VarBuilder;
use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;

use crate::nn::{Linear, linear};
use crate::rope::ImgShape;
use crate::snapshot;
use crate::transformer::{
    BlockInputs, Embedders, TransformerBlock, TransformerConfig, TransformerInputs, prepare,
};

/// `controlnet/config.json`: the transformer's fields plus `extra_condition_channels` (4 for the
/// ControlNet-Inpainting model, whose condition carries an inverted mask channel per 2x2 patch).
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    #[serde(flatten)]
    pub base: TransformerConfig,
    #[serde(default)]
    pub extra_condition_channels: usize,
}

/// One ControlNet.
#[derive(Debug, Clone)]
pub struct QwenImageControlNet {
    cfg: ControlNetConfig,
    emb: Embedders,
    blocks: Vec<TransformerBlock>,
    controlnet_blocks: Vec<Linear>,
    x_embedder: Linear,
    device: Device,
    dtype: DType,
}

impl QwenImageControlNet {
    pub fn new(cfg: &ControlNetConfig, vb: VarBuilder) -> Result<Self> {
        let base = &cfg.base;
        if base.patch_size != 2 {
            candle_core::bail!("controlnet patch_size {} is not supported", base.patch_size);
        }
        if base.axes_dims_rope.iter().sum::<usize>() != base.attention_head_dim {
            candle_core::bail!("controlnet axes_dims_rope must sum to attention_head_dim");
        }
        let dim = base.inner_dim();
        let emb = Embedders::new(base, &vb)?;
        let blocks = (0..base.num_layers)
            .map(|i| TransformerBlock::new(base, vb.pp("transformer_blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let controlnet_blocks = (0..base.num_layers)
            .map(|i| linear(dim, dim, vb.pp("controlnet_blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let x_embedder = linear(
            base.in_channels + cfg.extra_condition_channels,
            dim,
            vb.pp("controlnet_x_embedder"),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            emb,
            blocks,
            controlnet_blocks,
            x_embedder,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads a standalone diffusers ControlNet folder (`config.json` + safetensors), e.g. InstantX's.
    pub fn load(dir: &std::path::Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg: ControlNetConfig = snapshot::read_json(&dir.join("config.json"))?;
        let vb = snapshot::load_weights(dir, dtype, device)?;
        Self::new(&cfg, vb)
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.cfg
    }

    /// Channels of the packed control condition (`in_channels + extra_condition_channels`).
    pub fn cond_channels(&self) -> usize {
        self.cfg.base.in_channels + self.cfg.extra_condition_channels
    }

    /// Residuals `[B, S, D]`, one per ControlNet block, already multiplied by `scale`.
    ///
    /// `inp` carries the latents, the (positive) prompt, the timestep and the image shapes exactly as the
    /// transformer receives them; `cond` is the packed control latents `[B, S, cond_channels]`.
    pub fn forward(
        &self,
        inp: &TransformerInputs,
        cond: &Tensor,
        scale: f64,
    ) -> Result<Vec<Tensor>> {
        let (b, s, c) = cond.dims3()?;
        if c != self.cond_channels()
            || s != inp.hidden_states.dim(1)?
            || b != inp.hidden_states.dim(0)?
        {
            candle_core::bail!(
                "control condition has shape [{b}, {s}, {c}], expected [{}, {}, {}]",
                inp.hidden_states.dim(0)?,
                inp.hidden_states.dim(1)?,
                self.cond_channels()
            );
        }
        let x = (self
            .emb
            .img_in
            .forward(&inp.hidden_states.to_dtype(self.dtype)?)?
            + self.x_embedder.forward(&cond.to_dtype(self.dtype)?)?)?;
        let p = prepare(&self.cfg.base, &self.emb, x, inp, &self.device)?;
        let block_inp = BlockInputs {
            temb: &p.temb,
            rope: &p.rope,
            key_bias: p.key_bias.as_ref(),
            zero_cond: None,
        };
        let (mut x, mut c) = (p.x, p.c);
        let mut out = Vec::with_capacity(self.blocks.len());
        for (block, proj) in self.blocks.iter().zip(&self.controlnet_blocks) {
            crate::interrupt::check()?;
            (c, x) = block.forward(&x, &c, &block_inp)?;
            out.push((proj.forward(&x)? * scale)?);
        }
        Ok(out)
    }
}

/// `controlnet_keep[i]` of `QwenImageControlNetPipeline`: 1 when step `i` of `n` lies inside the
/// `[start, end]` guidance window, else 0.
pub fn keep(i: usize, n: usize, start: f64, end: f64) -> f64 {
    let (a, b) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
    if a < start || b > end { 0.0 } else { 1.0 }
}

/// A ControlNet with its condition and guidance for one request.
pub struct ControlUnit<'a> {
    pub net: &'a QwenImageControlNet,
    /// Packed control latents `[B, S, cond_channels]`.
    pub cond: Tensor,
    pub scale: f64,
    /// Guidance window as fractions of the schedule (`control_guidance_start`/`end`, default 0 and 1).
    pub start: f64,
    pub end: f64,
}

/// Residual lists of all active units at step `i` of `n` (with the positive prompt, as the pipeline does).
/// Units of the same net are summed element-wise as `QwenImageMultiControlNetModel` does; units whose
/// window excludes the step contribute nothing (identical to zero residuals).
pub fn residuals(
    units: &[ControlUnit],
    inp: &TransformerInputs,
    i: usize,
    n: usize,
) -> Result<Vec<Vec<Tensor>>> {
    let mut lists: Vec<(&QwenImageControlNet, Vec<Tensor>)> = Vec::new();
    for u in units {
        let k = keep(i, n, u.start, u.end);
        if k == 0.0 {
            continue;
        }
        let r = u.net.forward(inp, &u.cond, u.scale * k)?;
        match lists.iter_mut().find(|(p, _)| std::ptr::eq(*p, u.net)) {
            Some((_, acc)) => {
                for (a, b) in acc.iter_mut().zip(r) {
                    *a = (&*a + b)?;
                }
            }
            None => lists.push((u.net, r)),
        }
    }
    Ok(lists.into_iter().map(|(_, r)| r).collect())
}

/// Image shapes helper for callers that only know the latent grid.
pub fn img_shapes(latent_h: usize, latent_w: usize) -> Vec<ImgShape> {
    vec![(1, latent_h / 2, latent_w / 2)]
}

#[cfg(test)]
mod tests {
    use super::keep;

    #[test]
    fn keep_window_matches_pipeline() {
        // controlnet_keep = 1 - float(i/n < start or (i+1)/n > end)
        assert_eq!(
            (0..4).map(|i| keep(i, 4, 0.0, 1.0)).collect::<Vec<_>>(),
            vec![1.0; 4]
        );
        assert_eq!(
            (0..4).map(|i| keep(i, 4, 0.25, 0.75)).collect::<Vec<_>>(),
            vec![0.0, 1.0, 1.0, 0.0]
        );
    }
}
