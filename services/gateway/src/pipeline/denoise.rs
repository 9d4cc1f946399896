//! The denoising loop on a replica: every progress event forwarded to the caller, with a preview PNG
//! (decoded by the VAE stage) when the denoiser sent latents for one; returns the final latents.

use bytes::Bytes;
use qwen_image_proto::v1::{
    ControlInput, DecodeRequest, DenoiseEvent, DenoiseRequest, InpaintInputs, Stage, Tensor,
    denoise_event,
};
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::prompts::Prompts;
use super::{Ctx, phase};
use crate::error::{GatewayError, StageName};
use crate::pngmeta;
use crate::request::Settings;
use crate::stages::Patience;
use crate::stages::resume::{Attempt, Resume};

/// How the denoising loop starts.
pub struct Start {
    /// Text-to-image: the start latents. Image flows: the clean normalised image latents.
    pub latents: Tensor,
    /// Image flows: the noise the denoiser mixes in at `sigma[start_step]`.
    pub start_noise: Option<Tensor>,
    pub start_step: u32,
    pub inpaint: Option<InpaintInputs>,
    /// ControlNet flows: the control inputs the denoiser runs every step.
    pub control: Vec<ControlInput>,
}

/// Runs the denoiser, streaming its progress; returns the final latents.
pub async fn run(
    ctx: &Ctx<'_>,
    p: &Settings,
    prompts: Prompts,
    start: Start,
) -> Result<Tensor, GatewayError> {
    run_with_references(ctx, p, prompts, start, Vec::new()).await
}

/// [`run`] with reference latents (instruction editing: one normalised `[1, C, 1, h, w]` per picture,
/// appended after the noise tokens by the denoiser).
pub async fn run_with_references(
    ctx: &Ctx<'_>,
    p: &Settings,
    prompts: Prompts,
    start: Start,
    reference_latents: Vec<Tensor>,
) -> Result<Tensor, GatewayError> {
    let mut request = DenoiseRequest {
        reference_latents,
        prompt_embeds: Some(prompts.prompt_embeds),
        prompt_embeds_mask: prompts.prompt_embeds_mask,
        negative_prompt_embeds: prompts.negative_prompt_embeds,
        negative_prompt_embeds_mask: prompts.negative_prompt_embeds_mask,
        true_cfg_scale: p.true_cfg_scale,
        latents: Some(start.latents),
        steps: p.steps,
        start_step: start.start_step,
        start_noise: start.start_noise,
        inpaint: start.inpaint,
        control: start.control,
        preview_every_n_steps: p.preview.map_or(0, |s| s.every_n_steps),
        loras: p.loras.clone(),
        scheduler: p.scheduler.clone(),
        ..Default::default()
    };
    let preview_side = p.preview.map_or(DEFAULT_PREVIEW_SIDE_PX, |s| {
        if s.max_side_px == 0 {
            DEFAULT_PREVIEW_SIDE_PX
        } else {
            s.max_side_px
        }
    });
    let resume = Resume::prepare(&mut request);
    phase(
        "denoise",
        StageName::Denoiser,
        "Denoise",
        denoise_events(ctx, request, &resume, preview_side),
    )
    .await
}

/// Longest side of a preview PNG when the caller sets none (`PreviewSettings.max_side_px` 0).
pub const DEFAULT_PREVIEW_SIDE_PX: u32 = 256;

/// A preview of the first image of the batch: the step's latents decoded by the VAE stage (a full decode),
/// shrunk (LANCZOS) so that the longest side is at most `max_side` (never enlarged), as PNG. A failure only
/// loses the preview, and so does a busy VAE (previews never wait for a slot).
async fn preview_png(ctx: &Ctx<'_>, latents: Tensor, max_side: u32) -> Option<Bytes> {
    let first = first_of_batch(&latents)
        .map_err(|e| tracing::warn!(error = %e, "preview skipped"))
        .ok()?;
    let decoded = ctx
        .stages
        .decode(
            DecodeRequest {
                latents: Some(first),
                return_float: false,
            },
            ctx.deadline,
            Patience::Now,
        )
        .instrument(tracing::info_span!("preview"))
        .await
        .map_err(|e| tracing::warn!(error = %e, "preview skipped"))
        .ok()?;
    let img = decoded.images.into_iter().next()?;
    let (w, h) = (img.width_px, img.height_px);
    let scale = f64::from(max_side.max(1)) / f64::from(w.max(h).max(1));
    let (pw, ph) = if scale < 1.0 {
        (
            ((f64::from(w) * scale).round() as u32).max(1),
            ((f64::from(h) * scale).round() as u32).max(1),
        )
    } else {
        (w, h)
    };
    let rgb = qwen_image_imaging::Image8::new(w as usize, h as usize, 3, img.rgb8.to_vec()).ok()?;
    let small = if (pw, ph) == (w, h) {
        rgb
    } else {
        crate::images::resize_to(&rgb, pw, ph).ok()?
    };
    pngmeta::encode_png(pw, ph, &small.data, &[])
        .map(Bytes::from)
        .map_err(|e| tracing::warn!(error = %e, "preview skipped"))
        .ok()
}

/// `[B, ...]` → `[1, ...]`: the first element's bytes.
fn first_of_batch(t: &Tensor) -> Result<Tensor, String> {
    let b = *t.shape.first().ok_or("a scalar preview tensor")?;
    if b == 0 || !t.data.len().is_multiple_of(b as usize) {
        return Err(format!(
            "preview tensor shape {:?} does not fit its {} bytes",
            t.shape,
            t.data.len()
        ));
    }
    let mut shape = t.shape.clone();
    shape[0] = 1;
    Ok(Tensor {
        dtype: t.dtype,
        shape,
        data: t.data.slice(..t.data.len() / b as usize),
    })
}

/// The denoising loop on a replica: forwards every progress event (with a preview PNG when the denoiser
/// sent latents for one), returns the final latents. A replica that dies mid-loop is replaced and the loop
/// resumes from the last checkpoint latents, or runs again from step 1 (see
/// [`crate::stages::Stages::denoise`]).
async fn denoise_events(
    ctx: &Ctx<'_>,
    request: DenoiseRequest,
    resume: &Resume,
    preview_side: u32,
) -> Result<Tensor, GatewayError> {
    ctx.stages
        .denoise(
            request,
            resume,
            ctx.deadline,
            Patience::Wait(ctx),
            |stream, attempt| forward(ctx, stream, attempt, preview_side),
        )
        .await
}

/// Reads one denoiser stream to its end. A stream that ends without a result is a broken replica
/// (UNAVAILABLE: the call is run again elsewhere); an event that breaks the API contract is INTERNAL.
async fn forward(
    ctx: &Ctx<'_>,
    mut stream: Streaming<DenoiseEvent>,
    attempt: Attempt<'_>,
    preview_side: u32,
) -> Result<Tensor, Status> {
    let contract = |what: &str| {
        tracing::error!(what, "denoiser event breaks the API contract");
        Status::internal(format!("denoiser: {what}"))
    };
    let final_latents = loop {
        let Some(ev) = stream.message().await? else {
            return Err(Status::unavailable(
                "the denoiser stream ended without a result",
            ));
        };
        match ev.event {
            Some(denoise_event::Event::Progress(mut pr)) => {
                attempt.observe(&mut pr);
                let png = match pr.preview_latents {
                    Some(l) => preview_png(ctx, l, preview_side).await.unwrap_or_default(),
                    None => Bytes::new(),
                };
                ctx.progress_with_preview(Stage::Denoise, pr.step, pr.total_steps, png)
                    .await
            }
            Some(denoise_event::Event::Result(r)) => {
                break r
                    .latents
                    .ok_or_else(|| contract("result without latents"))?;
            }
            None => return Err(contract("empty event")),
        }
    };
    // Read the stream to its end (the trailers) so the denoiser sees the call complete with OK rather
    // than a reset stream (recorded as CANCELLED) and so an error status after the result is not lost.
    match stream.message().await? {
        None => Ok(final_latents),
        Some(_) => Err(contract("an event came after the result")),
    }
}
