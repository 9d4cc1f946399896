//! One transformer pass for several denoising requests at once (continuous batching): each request brings
//! its own latents, timestep, prompts (of any length: right-padded with a mask, as diffusers batches
//! prompts) and true-CFG scale; the rows of all requests run as one batch and each gets back the guided
//! velocity it would get alone ([`crate::denoise::predict`]).
//!
//! Every row of a batch shares the latent grid (`img_shapes`): callers batch only requests of one shape.
//! ControlNet residuals and reference latents are not batched here (such requests run alone).

use candle_core::{Result, Tensor};

use crate::denoise::{Conditioning, cfg_active, predict, stack_conditioning};
use crate::latents::true_cfg;
use crate::rope::ImgShape;
use crate::transformer::{QwenImageTransformer, TransformerInputs};

/// One request's part of a batched pass.
pub struct BatchItem<'a> {
    /// Packed latents `[B, S, 4C]` in the model's dtype.
    pub latents: &'a Tensor,
    /// `t / 1000` of the request's current step.
    pub t_model: f32,
    pub positive: &'a Conditioning,
    pub negative: Option<&'a Conditioning>,
    pub true_cfg_scale: f64,
}

/// The guided velocity of every item, in order; one transformer pass over all their rows (the positive
/// rows of each item, then its negative rows when true CFG is active for it). A single item takes
/// [`predict`]'s path unchanged.
pub fn predict_batch(
    model: &QwenImageTransformer,
    items: &[BatchItem],
    img_shapes: &[ImgShape],
) -> Result<Vec<Tensor>> {
    if let [one] = items {
        let v = predict(
            model,
            one.latents,
            one.t_model,
            one.positive,
            one.negative,
            one.true_cfg_scale,
            img_shapes,
            &[],
        )?;
        return Ok(vec![v]);
    }
    let device = model.device();
    let mut latents = Vec::new();
    let mut prompts: Vec<&Conditioning> = Vec::new();
    let mut timesteps = Vec::new();
    // per item: its first row and whether its negative rows follow its positive ones
    let mut layout = Vec::with_capacity(items.len());
    let mut row = 0;
    for item in items {
        let b = item.latents.dim(0)?;
        let cfg = item
            .negative
            .filter(|_| cfg_active(item.negative, item.true_cfg_scale));
        layout.push((row, b, cfg.is_some()));
        latents.push(item.latents.clone());
        prompts.push(item.positive);
        if let Some(neg) = cfg {
            latents.push(item.latents.clone());
            prompts.push(neg);
        }
        let rows = if cfg.is_some() { 2 * b } else { b };
        timesteps.extend(std::iter::repeat_n(item.t_model, rows));
        row += rows;
    }
    let hidden = Tensor::cat(&latents, 0)?;
    let text = stack_conditioning(&prompts)?;
    let t = Tensor::from_vec(timesteps, row, device)?;
    let out = model.forward(&TransformerInputs {
        hidden_states: &hidden,
        encoder_hidden_states: &text.embeds,
        encoder_mask: text.mask.as_ref(),
        timestep: &t,
        img_shapes,
        controlnet_residuals: &[],
    })?;
    layout
        .iter()
        .zip(items)
        .map(|(&(start, b, cfg), item)| {
            let cond = out.narrow(0, start, b)?;
            if cfg {
                let uncond = out.narrow(0, start + b, b)?;
                true_cfg(&cond, &uncond, item.true_cfg_scale)
            } else {
                Ok(cond)
            }
        })
        .collect()
}
