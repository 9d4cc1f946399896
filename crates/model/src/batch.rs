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
/// rows of every item, then the negative rows of the items with true CFG active). A single item takes
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
    // every item's positive rows, then the negative rows of the items with true CFG: the batch split across
    // the CPU threads then puts the short negative prompts apart from the long positive ones, and each part
    // drops the text padding none of its rows needs
    let mut latents = Vec::new();
    let mut prompts: Vec<&Conditioning> = Vec::new();
    let mut timesteps = Vec::new();
    // per item: its first positive row, its rows per prompt, and its first negative row under true CFG
    let mut layout: Vec<(usize, usize, Option<usize>)> = Vec::with_capacity(items.len());
    let mut row = 0;
    for item in items {
        let b = item.latents.dim(0)?;
        latents.push(item.latents.clone());
        prompts.push(item.positive);
        timesteps.extend(std::iter::repeat_n(item.t_model, b));
        layout.push((row, b, None));
        row += b;
    }
    for (item, (_, b, negative_row)) in items.iter().zip(layout.iter_mut()) {
        let Some(neg) = item
            .negative
            .filter(|_| cfg_active(item.negative, item.true_cfg_scale))
        else {
            continue;
        };
        *negative_row = Some(row);
        latents.push(item.latents.clone());
        prompts.push(neg);
        timesteps.extend(std::iter::repeat_n(item.t_model, *b));
        row += *b;
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
        .map(|(&(start, b, negative_row), item)| {
            let cond = out.narrow(0, start, b)?;
            match negative_row {
                Some(neg) => true_cfg(&cond, &out.narrow(0, neg, b)?, item.true_cfg_scale),
                None => Ok(cond),
            }
        })
        .collect()
}
