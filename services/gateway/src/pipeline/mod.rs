//! The steps every flow shares, over the stage clients: encode prompts, encode a picture to latents,
//! denoise (progress events and previews streamed to the caller), decode and build the PNG result; plus
//! the ControlNet run both ControlNet flows make. Flows (`crate::flows`) are sequences of these steps and
//! never use each other.

pub mod control;
pub mod decode;
pub mod denoise;
pub mod image_latents;
pub mod prompts;

use std::future::Future;
use std::time::Instant;

use bytes::Bytes;
use qwen_image_common::metric_names as m;
use qwen_image_common::randn::TorchCpuGenerator;
use qwen_image_common::tensor;
use qwen_image_proto::v1::{GenerateEvent, GenerateProgress, Stage, Tensor, generate_event};
use tokio::sync::mpsc;
use tonic::{Code, Status};
use tracing::Instrument;
use tracing::field::Empty;

use crate::error::{GatewayError, StageName};
use crate::geometry::Geometry;
use crate::request::Settings;
use crate::stages::{QueueObserver, Stages};

/// Where events go and what the request is bound by.
pub struct Ctx<'a> {
    pub stages: &'a Stages,
    pub request_id: &'a str,
    pub accepted: Instant,
    pub deadline: Instant,
    /// Model name for the PNG metadata (`None` = the text encoder's model id).
    pub model_name: Option<&'a str>,
    /// The model's geometry, as the stages described it when the request was accepted.
    pub geometry: Geometry,
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
            queue_position: 0,
        };
        let _ = self
            .events
            .send(Ok(GenerateEvent {
                event: Some(generate_event::Event::Progress(ev)),
            }))
            .await;
    }
}

/// A request waiting for a stage slot tells its caller its place (`STAGE_QUEUED`, `queue_position`).
/// The event is dropped when the caller lags (the next one carries the newer place).
impl QueueObserver for Ctx<'_> {
    fn waiting(&self, stage: StageName, position: usize) {
        tracing::debug!(%stage, position, "waiting for a stage slot");
        let ev = GenerateProgress {
            stage: Stage::Queued as i32,
            elapsed_ms: self.elapsed_ms(),
            queue_position: u32::try_from(position).unwrap_or(u32::MAX),
            ..Default::default()
        };
        let _ = self.events.try_send(Ok(GenerateEvent {
            event: Some(generate_event::Event::Progress(ev)),
        }));
    }
}

/// diffusers' initial noise: `randn([B, 1, C, h, w], generator=torch.Generator("cpu").manual_seed(seed))`.
pub fn seeded_noise(s: &Settings, g: &Geometry) -> Result<Tensor, GatewayError> {
    draw(&mut TorchCpuGenerator::new(s.seed), &s.noise_shape(g))
}

/// `generator.randn(shape)` as an F32 tensor (the next draw of a request's generator).
pub fn draw(generator: &mut TorchCpuGenerator, shape: &[usize]) -> Result<Tensor, GatewayError> {
    let data = generator
        .randn(shape.iter().product())
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
    Ok(tensor::from_f32(shape, &data))
}

/// `[1, ...]` → `[batch, ...]` by repeating the bytes (num_images_per_prompt in diffusers).
pub fn repeat_batch(t: &Tensor, batch: usize) -> Result<Tensor, String> {
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

/// The gRPC status code an error ends a phase with (the `code` label of the stage-call metric).
fn status_code(e: &GatewayError) -> i32 {
    let code = match e {
        GatewayError::Upstream { status, .. } => status.code(),
        GatewayError::InvalidArgument(_) => Code::InvalidArgument,
        GatewayError::FailedPrecondition(_) => Code::FailedPrecondition,
        GatewayError::BadUpstreamResponse { .. } | GatewayError::Internal(_) => Code::Internal,
        GatewayError::DeadlineExceeded => Code::DeadlineExceeded,
        GatewayError::Unavailable(_) => Code::Unavailable,
    };
    code as i32
}

/// Runs one stage phase (retries included) in its own span and records its duration as the gateway
/// saw it in [`m::STAGE_CALL_SECONDS`].
pub async fn phase<T>(
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
    use qwen_image_common::tensor;
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
