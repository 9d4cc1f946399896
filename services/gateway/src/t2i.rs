//! Text-to-image over the stages (diffusers QwenImagePipeline): encode prompt(s) → seeded noise → denoise
//! (progress streamed to the caller) → decode → PNGs with the parameters in text chunks.

use std::future::Future;
use std::time::Instant;

use bytes::Bytes;
use qwen_image_common::metric_names as m;
use qwen_image_common::randn::TorchCpuGenerator;
use qwen_image_common::tensor;
use qwen_image_proto::v1::{
    ControlInput, DecodeRequest, DenoiseRequest, EncodeResponse, GenerateEvent, GenerateProgress,
    GenerateResult, InpaintInputs, Padding, Stage, Tensor, denoise_event, generate_event,
};
use tokio::sync::mpsc;
use tonic::{Code, Status};
use tracing::Instrument;
use tracing::field::Empty;

use crate::error::{GatewayError, StageName};
use crate::pngmeta;
use crate::stages::Stages;
use crate::validate::T2iParams;

/// Where events go and what the request is bound by.
pub struct Ctx<'a> {
    pub stages: &'a Stages,
    pub request_id: &'a str,
    pub accepted: Instant,
    pub deadline: Instant,
    /// Model name for the PNG metadata (`None` = the text encoder's model id).
    pub model_name: Option<&'a str>,
    pub events: &'a mpsc::Sender<Result<GenerateEvent, Status>>,
}

impl Ctx<'_> {
    pub fn elapsed_ms(&self) -> u64 {
        self.accepted.elapsed().as_millis() as u64
    }

    /// Sends a progress event; a caller that went away is noticed by the handler's `closed()` watch.
    pub async fn progress(&self, stage: Stage, step: u32, total_steps: u32) {
        self.progress_with_preview(stage, step, total_steps, Bytes::new())
            .await
    }

    /// [`Ctx::progress`] carrying a preview PNG (empty = none).
    pub async fn progress_with_preview(
        &self,
        stage: Stage,
        step: u32,
        total_steps: u32,
        preview_png: Bytes,
    ) {
        let ev = GenerateProgress {
            stage: stage as i32,
            step,
            total_steps,
            elapsed_ms: self.elapsed_ms(),
            preview_png,
        };
        let _ = self
            .events
            .send(Ok(GenerateEvent {
                event: Some(generate_event::Event::Progress(ev)),
            }))
            .await;
    }
}

/// Conditioning for the denoiser: embeddings repeated to the batch, mask dropped when all ones (diffusers
/// then passes `None`).
fn conditioning(
    resp: EncodeResponse,
    batch: usize,
) -> Result<(Tensor, Option<Tensor>), GatewayError> {
    let bad = |d: String| GatewayError::bad_response(StageName::TextEncoder, d);
    let embeds = resp
        .prompt_embeds
        .ok_or_else(|| bad("no prompt_embeds".into()))?;
    let embeds = repeat_batch(&embeds, batch).map_err(bad)?;
    let mask = match (resp.mask_all_ones, resp.prompt_embeds_mask) {
        (true, _) => None,
        (false, Some(m)) => Some(repeat_batch(&m, batch).map_err(bad)?),
        (false, None) => return Err(bad("mask not all ones but no mask sent".into())),
    };
    Ok((embeds, mask))
}

/// `[1, ...]` → `[batch, ...]` by repeating the bytes (num_images_per_prompt in diffusers).
fn repeat_batch(t: &Tensor, batch: usize) -> Result<Tensor, String> {
    if t.shape.first() != Some(&1) {
        return Err(format!("expected a batch of one, got shape {:?}", t.shape));
    }
    if batch == 1 {
        return Ok(t.clone());
    }
    let mut shape = t.shape.clone();
    shape[0] = batch as u64;
    Ok(Tensor {
        dtype: t.dtype,
        shape,
        data: Bytes::from(t.data.repeat(batch)),
    })
}

/// diffusers' initial noise: `randn([B, 1, C, h, w], generator=torch.Generator("cpu").manual_seed(seed))`.
pub fn seeded_noise(p: &T2iParams) -> Result<Tensor, GatewayError> {
    let shape = p.noise_shape();
    let n = shape.iter().product();
    let data = TorchCpuGenerator::new(p.seed)
        .randn(n)
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
    Ok(tensor::from_f32(&shape, &data))
}

/// The denoiser's prompt conditioning for one request.
pub struct Prompts {
    pub prompt_embeds: Tensor,
    pub prompt_embeds_mask: Option<Tensor>,
    pub negative_prompt_embeds: Option<Tensor>,
    pub negative_prompt_embeds_mask: Option<Tensor>,
    /// The text encoder's model id (PNG metadata when the gateway has no model name).
    pub model_id: String,
    /// Whether the prompts were cut at max_sequence_length (reported to the caller in the result).
    pub truncation: Truncation,
}

/// Which prompts the text encoder cut at diffusers' max_sequence_length.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Truncation {
    pub prompt: bool,
    pub negative_prompt: bool,
}

/// Encodes the prompt and (only when CFG will run, as diffusers does) the negative prompt, concurrently.
pub async fn encode_prompts(ctx: &Ctx<'_>, p: &T2iParams) -> Result<Prompts, GatewayError> {
    let batch = p.num_images as usize;
    let stages = ctx.stages;
    ctx.progress(Stage::EncodePrompt, 0, 0).await;
    let negative = p.negative_prompt.as_deref().filter(|_| p.uses_cfg());
    let (pos, neg) = tokio::join!(
        phase(
            "encode_prompt",
            StageName::TextEncoder,
            "Encode",
            stages.encode(&p.prompt, ctx.deadline)
        ),
        async {
            match negative {
                Some(n) => phase(
                    "encode_negative_prompt",
                    StageName::TextEncoder,
                    "Encode",
                    stages.encode(n, ctx.deadline),
                )
                .await
                .map(Some),
                None => Ok(None),
            }
        }
    );
    let pos = pos?;
    let neg = neg?;
    let truncation = Truncation {
        prompt: pos.truncated.iter().any(|t| *t),
        negative_prompt: neg.as_ref().is_some_and(|r| r.truncated.iter().any(|t| *t)),
    };
    if truncation.prompt || truncation.negative_prompt {
        tracing::warn!(
            ?truncation,
            "prompt longer than 512 tokens: cut as diffusers does (reported in the result)"
        );
    }
    let model_id = pos.model_id.clone();
    if ctx.model_name.is_none() {
        tracing::Span::current().record("model", model_id.as_str());
    }
    let (prompt_embeds, prompt_embeds_mask) = conditioning(pos, batch)?;
    let (negative_prompt_embeds, negative_prompt_embeds_mask) = match neg {
        Some(r) => {
            let (e, m) = conditioning(r, batch)?;
            (Some(e), m)
        }
        None => (None, None),
    };
    Ok(Prompts {
        prompt_embeds,
        prompt_embeds_mask,
        negative_prompt_embeds,
        negative_prompt_embeds_mask,
        model_id,
        truncation,
    })
}

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
pub async fn denoise(
    ctx: &Ctx<'_>,
    p: &T2iParams,
    prompts: Prompts,
    start: Start,
) -> Result<Tensor, GatewayError> {
    let request = DenoiseRequest {
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
        ..Default::default()
    };
    let preview_side = p.preview.map_or(DEFAULT_PREVIEW_SIDE_PX, |s| {
        if s.max_side_px == 0 {
            DEFAULT_PREVIEW_SIDE_PX
        } else {
            s.max_side_px
        }
    });
    phase(
        "denoise",
        StageName::Denoiser,
        "Denoise",
        denoise_events(ctx, request, preview_side),
    )
    .await
}

/// A step on each decoded RGB8 image before PNG encoding.
pub type PostProcess<'a> = dyn Fn(&mut [u8]) -> Result<(), String> + Sync + 'a;

/// What the image flows add to the result and the PNGs.
#[derive(Default)]
pub struct Finish<'a> {
    /// Extra PNG text chunks (e.g. `mode`, `strength`) and the A1111 settings they add.
    pub chunks: Vec<(String, String)>,
    pub a1111_settings: Vec<(String, String)>,
    pub strength: Option<f64>,
    pub padding: Option<Padding>,
    /// Applied to every decoded RGB8 image before PNG encoding (inpaint paste-back).
    pub post: Option<&'a PostProcess<'a>>,
    /// Prompts cut at max_sequence_length (from [`Prompts::truncation`]).
    pub truncation: Truncation,
}

/// Decodes the final latents and builds the result with PNGs carrying the parameters.
pub async fn decode(
    ctx: &Ctx<'_>,
    p: &T2iParams,
    model_id: String,
    latents: Tensor,
    finish: Finish<'_>,
) -> Result<GenerateResult, GatewayError> {
    let batch = p.num_images as usize;
    ctx.progress(Stage::Decode, 0, 0).await;
    let decoded = phase(
        "decode",
        StageName::Vae,
        "Decode",
        ctx.stages.decode(
            DecodeRequest {
                latents: Some(latents),
                return_float: false,
            },
            ctx.deadline,
        ),
    )
    .await?;
    if decoded.images.len() != batch {
        return Err(GatewayError::bad_response(
            StageName::Vae,
            format!("{} images for a batch of {batch}", decoded.images.len()),
        ));
    }
    let model = ctx.model_name.map(str::to_string).unwrap_or(model_id);
    let mut chunks = pngmeta::text_chunks(p, &model, ctx.request_id);
    pngmeta::add_extras(&mut chunks, &finish.chunks, &finish.a1111_settings);
    let mut pngs = Vec::with_capacity(batch);
    for mut img in decoded.images {
        if (img.width_px, img.height_px) != (p.width_px, p.height_px) {
            return Err(GatewayError::bad_response(
                StageName::Vae,
                format!(
                    "image is {}x{}, expected {}x{}",
                    img.width_px, img.height_px, p.width_px, p.height_px
                ),
            ));
        }
        if let Some(post) = finish.post {
            let mut rgb8 = img.rgb8.to_vec();
            post(&mut rgb8).map_err(|e| GatewayError::bad_response(StageName::Vae, e))?;
            img.rgb8 = Bytes::from(rgb8);
        }
        let png = pngmeta::encode_png(img.width_px, img.height_px, &img.rgb8, &chunks)
            .map_err(|e| GatewayError::bad_response(StageName::Vae, e))?;
        pngs.push(Bytes::from(png));
    }
    Ok(GenerateResult {
        png: pngs,
        width_px: p.width_px,
        height_px: p.height_px,
        seed: p.seed,
        parameters: Some(p.to_request()),
        request_id: ctx.request_id.to_string(),
        elapsed_ms: ctx.elapsed_ms(),
        strength: finish.strength,
        padding: finish.padding,
        prompt_truncated: finish.truncation.prompt,
        negative_prompt_truncated: finish.truncation.negative_prompt,
    })
}

pub async fn run(ctx: &Ctx<'_>, p: &T2iParams) -> Result<GenerateResult, GatewayError> {
    let prompts = encode_prompts(ctx, p).await?;
    let model_id = prompts.model_id.clone();
    let truncation = prompts.truncation;
    // The caller's start latents, or the seed's noise.
    let latents = match &p.initial_latents {
        Some(t) => t.clone(),
        None => seeded_noise(p)?,
    };
    let start = Start {
        latents,
        start_noise: None,
        start_step: 0,
        inpaint: None,
        control: Vec::new(),
    };
    let latents = denoise(ctx, p, prompts, start).await?;
    let finish = Finish {
        truncation,
        ..Finish::default()
    };
    decode(ctx, p, model_id, latents, finish).await
}

/// Longest side of a preview PNG when the caller sets none (`PreviewSettings.max_side_px` 0).
pub const DEFAULT_PREVIEW_SIDE_PX: u32 = 256;

/// A preview of the first image of the batch: the step's latents decoded by the VAE stage (a full decode),
/// shrunk (LANCZOS) so that the longest side is at most `max_side` (never enlarged), as PNG. A failure only
/// loses the preview.
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
    if b == 0 || t.data.len() % b as usize != 0 {
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
/// sent latents for one), returns the final latents.
async fn denoise_events(
    ctx: &Ctx<'_>,
    request: DenoiseRequest,
    preview_side: u32,
) -> Result<Tensor, GatewayError> {
    let call = ctx.stages.denoise(request, ctx.deadline).await?;
    let (mut rest, _lease) = (call.rest, call.lease);
    let mut next = Some(call.first);
    let final_latents = loop {
        let ev = match next.take() {
            Some(ev) => ev,
            None => match rest.message().await {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    return Err(GatewayError::bad_response(
                        StageName::Denoiser,
                        "stream ended without a result",
                    ));
                }
                Err(status) => return Err(GatewayError::upstream(StageName::Denoiser, status)),
            },
        };
        match ev.event {
            Some(denoise_event::Event::Progress(pr)) => {
                let png = match pr.preview_latents {
                    Some(l) => preview_png(ctx, l, preview_side).await.unwrap_or_default(),
                    None => Bytes::new(),
                };
                ctx.progress_with_preview(Stage::Denoise, pr.step, pr.total_steps, png)
                    .await
            }
            Some(denoise_event::Event::Result(r)) => {
                break r.latents.ok_or_else(|| {
                    GatewayError::bad_response(StageName::Denoiser, "result without latents")
                })?;
            }
            None => {
                return Err(GatewayError::bad_response(
                    StageName::Denoiser,
                    "empty event",
                ));
            }
        }
    };
    // Read the stream to its end (the trailers) so the denoiser sees the call complete with OK rather
    // than a reset stream (recorded as CANCELLED) and so an error status after the result is not lost.
    match rest.message().await {
        Ok(None) => {}
        Ok(Some(_)) => {
            return Err(GatewayError::bad_response(
                StageName::Denoiser,
                "an event came after the result",
            ));
        }
        Err(status) => return Err(GatewayError::upstream(StageName::Denoiser, status)),
    }
    Ok(final_latents)
}

/// The gRPC status code an error ends a phase with (the `code` label of the stage-call metric).
fn status_code(e: &GatewayError) -> i32 {
    let code = match e {
        GatewayError::Upstream { status, .. } => status.code(),
        GatewayError::InvalidArgument(_) => Code::InvalidArgument,
        GatewayError::BadUpstreamResponse { .. } | GatewayError::Internal(_) => Code::Internal,
        GatewayError::DeadlineExceeded => Code::DeadlineExceeded,
        GatewayError::Unavailable(_) => Code::Unavailable,
    };
    code as i32
}

/// Runs one stage phase (retries included) in its own span and records its duration as the gateway
/// saw it in [`m::STAGE_CALL_SECONDS`].
pub(crate) async fn phase<T>(
    name: &'static str,
    stage: StageName,
    rpc: &'static str,
    work: impl Future<Output = Result<T, GatewayError>>,
) -> Result<T, GatewayError> {
    let started = Instant::now();
    let span = tracing::info_span!(
        "stage",
        otel.name = name,
        stage = stage.as_str(),
        rpc,
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
    );
    let result = work.instrument(span.clone()).await;
    let code = result.as_ref().map_or_else(status_code, |_| 0);
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
    }
    metrics::histogram!(
        m::STAGE_CALL_SECONDS,
        "service" => "gateway",
        "stage" => stage.as_str(),
        "rpc" => rpc,
        "code" => code.to_string()
    )
    .record(started.elapsed().as_secs_f64());
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_image_proto::v1::DataType;

    #[test]
    fn repeats_batch_and_checks_shape() {
        let t = tensor::from_f32(&[1, 2], &[1.0, 2.0]);
        let r = repeat_batch(&t, 3).expect("batch of one");
        assert_eq!(r.shape, vec![3, 2]);
        assert_eq!(
            tensor::to_f32(&r, "x", &[DataType::F32], &[2])
                .expect("valid")
                .data,
            vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0]
        );
        assert!(repeat_batch(&tensor::from_f32(&[2, 1], &[1.0, 2.0]), 2).is_err());
    }
}
