//! Text-to-image over the stages (diffusers QwenImagePipeline): encode prompt(s) → seeded noise → denoise
//! (progress streamed to the caller) → decode → PNGs with the parameters in text chunks.

use std::future::Future;
use std::time::Instant;

use bytes::Bytes;
use qwen_image_common::metric_names as m;
use qwen_image_common::randn::TorchCpuGenerator;
use qwen_image_common::tensor;
use qwen_image_proto::v1::{
    DecodeRequest, DenoiseRequest, EncodeResponse, GenerateEvent, GenerateProgress, GenerateResult,
    Stage, Tensor, denoise_event, generate_event,
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
        let ev = GenerateProgress {
            stage: stage as i32,
            step,
            total_steps,
            elapsed_ms: self.elapsed_ms(),
            preview_png: Bytes::new(),
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

/// The prompt conditioning for the denoiser (negative only when CFG runs) and the text encoder's model id.
pub struct Prompts {
    pub prompt_embeds: Tensor,
    pub prompt_embeds_mask: Option<Tensor>,
    pub negative_prompt_embeds: Option<Tensor>,
    pub negative_prompt_embeds_mask: Option<Tensor>,
    pub model_id: String,
}

/// Encodes the prompt and (only when CFG will run, as diffusers does) the negative prompt, concurrently.
pub async fn encode_prompts(ctx: &Ctx<'_>, p: &T2iParams) -> Result<Prompts, GatewayError> {
    let batch = p.num_images as usize;
    let stages = ctx.stages;
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
    let model_id = pos.model_id.clone();
    if ctx.model_name.is_none() {
        tracing::Span::current().record("model", model_id.as_str());
    }
    let (prompt_embeds, prompt_embeds_mask) = conditioning(pos, batch)?;
    let (negative_prompt_embeds, negative_prompt_embeds_mask) = match neg? {
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
    })
}

/// A text-to-image DenoiseRequest (full schedule, no previews) for `latents`; flows add their inputs.
pub fn denoise_request(p: &T2iParams, prompts: Prompts, latents: Tensor) -> DenoiseRequest {
    DenoiseRequest {
        prompt_embeds: Some(prompts.prompt_embeds),
        prompt_embeds_mask: prompts.prompt_embeds_mask,
        negative_prompt_embeds: prompts.negative_prompt_embeds,
        negative_prompt_embeds_mask: prompts.negative_prompt_embeds_mask,
        true_cfg_scale: p.true_cfg_scale,
        latents: Some(latents),
        steps: p.steps,
        ..Default::default()
    }
}

/// Runs the denoiser (in a `denoise` stage span, timed in the stage-call metric), streaming its steps as
/// STAGE_DENOISE progress; returns the final latents.
pub async fn denoise(ctx: &Ctx<'_>, request: DenoiseRequest) -> Result<Tensor, GatewayError> {
    phase(
        "denoise",
        StageName::Denoiser,
        "Denoise",
        denoise_stream(ctx, request),
    )
    .await
}

async fn denoise_stream(ctx: &Ctx<'_>, request: DenoiseRequest) -> Result<Tensor, GatewayError> {
    let call = ctx.stages.denoise(request, ctx.deadline).await?;
    let (mut rest, _lease) = (call.rest, call.lease);
    let mut next = Some(call.first);
    loop {
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
                ctx.progress(Stage::Denoise, pr.step, pr.total_steps).await
            }
            Some(denoise_event::Event::Result(r)) => {
                return r.latents.ok_or_else(|| {
                    GatewayError::bad_response(StageName::Denoiser, "result without latents")
                });
            }
            None => {
                return Err(GatewayError::bad_response(
                    StageName::Denoiser,
                    "empty event",
                ));
            }
        }
    }
}

/// Decodes the final latents and encodes one PNG per image with the parameters (plus `extra_chunks`) in
/// its text chunks.
pub async fn decode_to_result(
    ctx: &Ctx<'_>,
    p: &T2iParams,
    final_latents: Tensor,
    model_id: String,
    extra_chunks: &[(String, String)],
) -> Result<GenerateResult, GatewayError> {
    let batch = p.num_images as usize;
    ctx.progress(Stage::Decode, 0, 0).await;
    let decoded = phase(
        "decode",
        StageName::Vae,
        "Decode",
        ctx.stages.decode(
            DecodeRequest {
                latents: Some(final_latents),
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
    chunks.extend_from_slice(extra_chunks);
    let mut pngs = Vec::with_capacity(batch);
    for img in &decoded.images {
        if (img.width_px, img.height_px) != (p.width_px, p.height_px) {
            return Err(GatewayError::bad_response(
                StageName::Vae,
                format!(
                    "image is {}x{}, expected {}x{}",
                    img.width_px, img.height_px, p.width_px, p.height_px
                ),
            ));
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
    })
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
async fn phase<T>(
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

pub async fn run(ctx: &Ctx<'_>, p: &T2iParams) -> Result<GenerateResult, GatewayError> {
    // 1. Prompts.
    ctx.progress(Stage::EncodePrompt, 0, 0).await;
    let mut prompts = encode_prompts(ctx, p).await?;
    let model_id = std::mem::take(&mut prompts.model_id);

    // 2. Start latents: the caller's, or the seed's noise.
    let latents = match &p.initial_latents {
        Some(t) => t.clone(),
        None => seeded_noise(p)?,
    };

    // 3. Denoise, streaming progress.
    let final_latents = denoise(ctx, denoise_request(p, prompts, latents)).await?;

    // 4. Decode and encode PNGs.
    decode_to_result(ctx, p, final_latents, model_id, &[]).await
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
