//! The denoising loop of the Qwen-Image pipelines (diffusers `QwenImagePipeline.__call__` and the inpaint
//! variant's per-step blending) as a library function: schedule, true CFG (cond and uncond batched into one
//! transformer pass), Euler steps, a per-step callback that can stop the loop. Instruction editing
//! (`QwenImageEditPlusPipeline`) adds reference latents after the noise tokens ([`denoise_with_references`]).

use candle_core::{DType, Result, Tensor};

use crate::controlnet::{self, ControlUnit};
use crate::edit::ReferenceLatents;
use crate::latents::true_cfg;
use crate::rope::ImgShape;
use crate::scheduler::Schedule;
use crate::transformer::{QwenImageTransformer, TransformerInputs};

/// Prompt conditioning: embeddings `[B, L, D]` and a 0/1 mask `[B, L]` (`None` = all tokens valid).
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub embeds: Tensor,
    pub mask: Option<Tensor>,
}

/// Inpaint blending (`QwenImageInpaintPipeline`): after every step the unmasked region is replaced by the
/// original latents re-noised to the next sigma (clean after the last step).
#[derive(Debug, Clone)]
pub struct InpaintBlend {
    /// Normalised image latents, packed `[B, S, 4C]`.
    pub image_latents: Tensor,
    /// The noise used for the start latents, packed `[B, S, 4C]`.
    pub noise: Tensor,
    /// 1 = repaint, 0 = keep; packed `[B, S, 4C]`.
    pub mask: Tensor,
}

/// Everything one denoising run needs.
pub struct DenoiseParams<'a> {
    pub positive: &'a Conditioning,
    /// Negative prompt; true CFG runs when it is given and `true_cfg_scale > 1` (diffusers' rule).
    pub negative: Option<&'a Conditioning>,
    pub true_cfg_scale: f64,
    /// Packed start latents `[B, S, 4C]`.
    pub latents: Tensor,
    /// Token grid of the latents: `[(1, h/2, w/2)]`.
    pub img_shapes: &'a [ImgShape],
    pub schedule: &'a Schedule,
    /// First step to run (img2img / inpaint strength); 0 for text-to-image.
    pub start_step: usize,
    pub inpaint: Option<&'a InpaintBlend>,
    /// ControlNets with their conditions (`QwenImageControlNetPipeline`); empty for none.
    pub controlnet: &'a [ControlUnit<'a>],
}

/// What the callback sees after each step.
pub struct StepInfo<'a> {
    /// 0-based index in the full schedule.
    pub step: usize,
    /// Steps that run (`schedule.steps() - start_step`).
    pub total: usize,
    /// Index among the steps that run (0-based).
    pub done: usize,
    pub timestep: f32,
    /// Latents at the end of the step (after blending), packed.
    pub latents: &'a Tensor,
    /// The guided velocity of this step.
    pub noise_pred: &'a Tensor,
}

/// The callback's verdict after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// All steps ran; the final packed latents.
    Finished(Tensor),
    /// The callback stopped the loop after `steps_done` steps.
    Stopped { steps_done: usize },
}

/// True when diffusers would run true CFG: a negative prompt and a scale above 1.
pub fn cfg_active(negative: Option<&Conditioning>, scale: f64) -> bool {
    negative.is_some() && scale > 1.0
}

/// Right-pads `[B, L, D]` embeddings with zeros to `len` tokens.
fn pad_tokens(x: &Tensor, len: usize) -> Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    if l == len {
        return Ok(x.clone());
    }
    let pad = Tensor::zeros((b, len - l, d), x.dtype(), x.device())?;
    Tensor::cat(&[x, &pad], 1)
}

fn mask_or_ones(c: &Conditioning, len: usize) -> Result<Tensor> {
    let (b, l, _) = c.embeds.dims3()?;
    let m = match &c.mask {
        Some(m) => m.to_dtype(DType::F32)?,
        None => Tensor::ones((b, l), DType::F32, c.embeds.device())?,
    };
    if l == len {
        return Ok(m);
    }
    Tensor::cat(
        &[&m, &Tensor::zeros((b, len - l), DType::F32, m.device())?],
        1,
    )
}

/// Cond and uncond stacked into one batch `[2B, Lmax, D]` with a mask when any token is padding.
pub fn batch_conditioning(pos: &Conditioning, neg: &Conditioning) -> Result<Conditioning> {
    stack_conditioning(&[pos, neg])
}

/// Prompts stacked along the batch into `[sum B, Lmax, D]`, each right-padded with zeros to the longest,
/// with a 0/1 mask when any token is padding or any part has a mask (diffusers' batched prompts:
/// `encoder_hidden_states_mask`); `None` when every token of every part is valid.
pub fn stack_conditioning(parts: &[&Conditioning]) -> Result<Conditioning> {
    let lens = parts
        .iter()
        .map(|c| c.embeds.dim(1))
        .collect::<Result<Vec<_>>>()?;
    let len = lens.iter().copied().max().unwrap_or(0);
    let padded = parts
        .iter()
        .map(|c| pad_tokens(&c.embeds, len))
        .collect::<Result<Vec<_>>>()?;
    let embeds = Tensor::cat(&padded, 0)?;
    let mask = if lens.iter().all(|&l| l == len) && parts.iter().all(|c| c.mask.is_none()) {
        None
    } else {
        let masks = parts
            .iter()
            .map(|c| mask_or_ones(c, len))
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::cat(&masks, 0)?)
    };
    Ok(Conditioning { embeds, mask })
}

/// One guided velocity prediction at model timestep `t_model` (= t/1000).
pub fn predict(
    model: &QwenImageTransformer,
    latents: &Tensor,
    t_model: f32,
    positive: &Conditioning,
    negative: Option<&Conditioning>,
    true_cfg_scale: f64,
    img_shapes: &[ImgShape],
    controlnet_residuals: &[Vec<Tensor>],
) -> Result<Tensor> {
    predict_with_references(
        model,
        latents,
        t_model,
        positive,
        negative,
        true_cfg_scale,
        img_shapes,
        controlnet_residuals,
        None,
    )
}

/// [`predict`] with reference latents appended after the noise tokens (their shapes after `img_shapes`); the
/// output keeps the noise tokens only (`noise_pred[:, : latents.size(1)]`, `QwenImageEditPlusPipeline`).
#[allow(clippy::too_many_arguments)]
pub fn predict_with_references(
    model: &QwenImageTransformer,
    latents: &Tensor,
    t_model: f32,
    positive: &Conditioning,
    negative: Option<&Conditioning>,
    true_cfg_scale: f64,
    img_shapes: &[ImgShape],
    controlnet_residuals: &[Vec<Tensor>],
    references: Option<&ReferenceLatents>,
) -> Result<Tensor> {
    let (b, s, _) = latents.dims3()?;
    let device = latents.device();
    let (input, shapes) = match references {
        None => (latents.clone(), img_shapes.to_vec()),
        Some(r) => {
            if !controlnet_residuals.is_empty() {
                candle_core::bail!("reference latents and ControlNet residuals cannot be combined");
            }
            let rb = r.latents.dim(0)?;
            let refs = if rb == b {
                r.latents.to_dtype(latents.dtype())?
            } else if rb == 1 {
                Tensor::cat(&vec![&r.latents; b], 0)?.to_dtype(latents.dtype())?
            } else {
                candle_core::bail!("reference latents have batch {rb}, the latents {b}");
            };
            let mut shapes = img_shapes.to_vec();
            shapes.extend_from_slice(&r.shapes);
            (Tensor::cat(&[latents, &refs], 1)?, shapes)
        }
    };
    let noise_tokens = |out: Tensor| -> Result<Tensor> {
        if references.is_some() {
            out.narrow(1, 0, s)
        } else {
            Ok(out)
        }
    };
    if let Some(neg) = negative.filter(|_| cfg_active(negative, true_cfg_scale)) {
        let both = batch_conditioning(positive, neg)?;
        let x2 = Tensor::cat(&[&input, &input], 0)?;
        let t = Tensor::full(t_model, 2 * b, device)?;
        // the residuals (computed once with the positive prompt) serve both halves of the batch
        let res2: Vec<Vec<Tensor>> = controlnet_residuals
            .iter()
            .map(|list| {
                list.iter()
                    .map(|s| Tensor::cat(&[s, s], 0))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let out = noise_tokens(model.forward(&TransformerInputs {
            hidden_states: &x2,
            encoder_hidden_states: &both.embeds,
            encoder_mask: both.mask.as_ref(),
            timestep: &t,
            img_shapes: &shapes,
            controlnet_residuals: &res2,
        })?)?;
        let cond = out.narrow(0, 0, b)?;
        let uncond = out.narrow(0, b, b)?;
        return true_cfg(&cond, &uncond, true_cfg_scale);
    }
    let t = Tensor::full(t_model, b, device)?;
    noise_tokens(model.forward(&TransformerInputs {
        hidden_states: &input,
        encoder_hidden_states: &positive.embeds,
        encoder_mask: positive.mask.as_ref(),
        timestep: &t,
        img_shapes: &shapes,
        controlnet_residuals,
    })?)
}

/// `scale_noise(sample, sigma, noise) = sigma·noise + (1 - sigma)·sample`.
pub fn scale_noise(sample: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    (noise * sigma as f64)? + (sample * (1.0 - sigma as f64))?
}

/// Runs the loop from `start_step` to the end of the schedule.
pub fn denoise(
    model: &QwenImageTransformer,
    p: &DenoiseParams,
    on_step: impl FnMut(&StepInfo) -> Flow,
) -> Result<Outcome> {
    denoise_with_references(model, p, None, on_step)
}

/// [`denoise`] for instruction editing (`QwenImageEditPlusPipeline`): `references` are appended to the noise
/// tokens at every transformer pass (`p.img_shapes` is the noise grid alone) and only the noise tokens'
/// velocity is used. The schedule's `mu` must come from the noise tokens alone, as in the pipeline. Not
/// combinable with ControlNets or inpaint blending.
pub fn denoise_with_references(
    model: &QwenImageTransformer,
    p: &DenoiseParams,
    references: Option<&ReferenceLatents>,
    mut on_step: impl FnMut(&StepInfo) -> Flow,
) -> Result<Outcome> {
    if references.is_some() && (!p.controlnet.is_empty() || p.inpaint.is_some()) {
        candle_core::bail!(
            "reference latents cannot be combined with ControlNets or inpaint blending"
        );
    }
    let n = p.schedule.steps();
    if p.start_step >= n {
        candle_core::bail!(
            "start step {} leaves no step to run out of {n}",
            p.start_step
        );
    }
    let total = n - p.start_step;
    let dtype = model.dtype();
    let mut latents = p.latents.to_dtype(dtype)?;
    for (done, i) in (p.start_step..n).enumerate() {
        let v = step_velocity(model, p, &latents, i, done, total, references)?;
        latents = advance(&latents, &v, p.schedule, i, p.inpaint)?;
        let info = StepInfo {
            step: i,
            total,
            done,
            timestep: p.schedule.timesteps[i],
            latents: &latents,
            noise_pred: &v,
        };
        if on_step(&info) == Flow::Stop && done + 1 < total {
            return Ok(Outcome::Stopped {
                steps_done: done + 1,
            });
        }
    }
    Ok(Outcome::Finished(latents))
}

/// The guided velocity of step `i` (the `done`-th of `total` that run): the ControlNets' residuals, then
/// [`predict_with_references`] at the step's timestep.
pub fn step_velocity(
    model: &QwenImageTransformer,
    p: &DenoiseParams,
    latents: &Tensor,
    i: usize,
    done: usize,
    total: usize,
    references: Option<&ReferenceLatents>,
) -> Result<Tensor> {
    let t_model = p.schedule.model_timestep(i);
    let residuals = if p.controlnet.is_empty() {
        Vec::new()
    } else {
        // the pipeline runs the ControlNet once per step with the positive prompt
        let t = Tensor::full(t_model, latents.dim(0)?, latents.device())?;
        let inp = TransformerInputs {
            hidden_states: latents,
            encoder_hidden_states: &p.positive.embeds,
            encoder_mask: p.positive.mask.as_ref(),
            timestep: &t,
            img_shapes: p.img_shapes,
            controlnet_residuals: &[],
        };
        controlnet::residuals(p.controlnet, &inp, done, total)?
    };
    predict_with_references(
        model,
        latents,
        t_model,
        p.positive,
        p.negative,
        p.true_cfg_scale,
        p.img_shapes,
        &residuals,
        references,
    )
}

/// The end of step `i`: the Euler update in f32, `x + (sigma_{i+1} - sigma_i)·v`, back in the latents'
/// dtype, then the inpaint blending if any.
pub fn advance(
    latents: &Tensor,
    v: &Tensor,
    schedule: &Schedule,
    i: usize,
    inpaint: Option<&InpaintBlend>,
) -> Result<Tensor> {
    let dtype = latents.dtype();
    let dt = schedule.dt(i) as f64;
    let mut latents =
        (latents.to_dtype(DType::F32)? + (v.to_dtype(DType::F32)? * dt)?)?.to_dtype(dtype)?;
    if let Some(blend) = inpaint {
        let n = schedule.steps();
        let init = if i + 1 < n {
            scale_noise(&blend.image_latents, &blend.noise, schedule.sigmas[i + 1])?
        } else {
            blend.image_latents.clone()
        };
        let keep = (1.0 - &blend.mask)?;
        latents = ((keep * init)? + (&blend.mask * &latents)?)?;
    }
    Ok(latents)
}
