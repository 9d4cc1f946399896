//! The `ImageGenerator` gRPC service: request ids, deadlines, validation, and cancellation of the
//! orchestration when the caller goes away or the deadline passes.

use std::sync::Arc;
use std::time::Instant;

use qwen_image_proto::v1::image_generator_server::ImageGenerator;
use qwen_image_proto::v1::{
    ControlNetInpaintRequest, GenerateEvent, PoseRequest, TextToImageRequest, generate_event,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing::field::Empty;

use crate::cn_inpaint::{self, CnInpaintParams};
use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::pose::{self, PoseParams};
use crate::stages::Stages;
use crate::t2i;
use crate::validate::{T2iParams, validate};

/// Metadata key of the request id, in requests (optional, the caller's own id) and responses.
pub const REQUEST_ID_KEY: &str = "x-request-id";
/// Events buffered towards a slow caller before the orchestration waits.
const EVENT_BUFFER: usize = 16;

pub struct GatewayService {
    pub stages: Arc<Stages>,
    pub config: Arc<GatewayConfig>,
}

fn random_u64() -> u64 {
    // OS randomness; if it is unavailable, fall back to the clock (ids and seeds then stay unique enough).
    getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    })
}

/// A UUID-v4-formatted random id.
pub fn new_request_id() -> String {
    let (a, b) = (random_u64(), random_u64());
    let a = (a & !0xf000) | 0x4000; // version 4
    let b = (b & !(0b11 << 62)) | (0b10 << 62); // RFC 4122 variant
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// The caller's `x-request-id` if it is a sane token (ASCII graphic, at most 128 chars), else a new one.
fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get(REQUEST_ID_KEY)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

fn with_request_id(mut status: Status, id: &str) -> Status {
    if let Ok(v) = MetadataValue::try_from(id) {
        status.metadata_mut().insert(REQUEST_ID_KEY, v);
    }
    status
}

#[tonic::async_trait]
impl ImageGenerator for GatewayService {
    type TextToImageStream = ReceiverStream<Result<GenerateEvent, Status>>;

    async fn text_to_image(
        &self,
        request: Request<TextToImageRequest>,
    ) -> Result<Response<Self::TextToImageStream>, Status> {
        let accepted = Instant::now();
        let id = request_id(&request);
        let default_deadline = accepted + self.config.request_timeout;
        let deadline = qwen_image_common::deadline::from_metadata(request.metadata(), accepted)
            .map_or(default_deadline, |d| d.min(default_deadline));
        let span = tracing::info_span!(
            "text_to_image",
            request_id = %id,
            flow = "text_to_image",
            width = Empty,
            height = Empty,
            steps = Empty,
            true_cfg_scale = Empty,
            cfg = Empty,
            seed = Empty,
            images = Empty,
            model = Empty,
        );
        let params = validate(request.into_inner(), self.config.max_side_px, random_u64())
            .map_err(|e| with_request_id(e.into(), &id))?;
        span.record("width", params.width_px);
        span.record("height", params.height_px);
        span.record("steps", params.steps);
        span.record("true_cfg_scale", f64::from(params.true_cfg_scale));
        span.record("cfg", params.uses_cfg());
        span.record("seed", params.seed);
        span.record("images", params.num_images);
        if let Some(model) = self.config.model_name.as_deref() {
            span.record("model", model);
        }
        span.in_scope(|| tracing::info!("accepted"));

        Ok(self.start(id, accepted, deadline, span, Flow::T2i(params)))
    }

    type PoseStream = ReceiverStream<Result<GenerateEvent, Status>>;

    async fn pose(
        &self,
        request: Request<PoseRequest>,
    ) -> Result<Response<Self::PoseStream>, Status> {
        let accepted = Instant::now();
        let id = request_id(&request);
        let default_deadline = accepted + self.config.request_timeout;
        let deadline = qwen_image_common::deadline::from_metadata(request.metadata(), accepted)
            .map_or(default_deadline, |d| d.min(default_deadline));
        let span = tracing::info_span!("pose", request_id = %id);
        // Decoding, resizing and rendering are CPU work: off the async threads.
        let (max_side, seed) = (self.config.max_side_px, random_u64());
        let params = tokio::task::spawn_blocking(move || {
            pose::validate_pose(request.into_inner(), max_side, seed)
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("pose validation task: {e}")))
        .and_then(|r| r)
        .map_err(|e| with_request_id(e.into(), &id))?;
        span.in_scope(|| {
            tracing::info!(
                width = params.t2i.width_px,
                height = params.t2i.height_px,
                steps = params.t2i.steps,
                seed = params.t2i.seed,
                cfg = params.t2i.uses_cfg(),
                images = params.t2i.num_images,
                source = params.source.as_str(),
                controlnet = %params.controlnet_id,
                conditioning_scale = params.conditioning_scale,
                "accepted"
            )
        });
        Ok(self.start(id, accepted, deadline, span, Flow::Pose(Box::new(params))))
    }

    type ControlNetInpaintStream = ReceiverStream<Result<GenerateEvent, Status>>;

    async fn control_net_inpaint(
        &self,
        request: Request<ControlNetInpaintRequest>,
    ) -> Result<Response<Self::ControlNetInpaintStream>, Status> {
        let accepted = Instant::now();
        let id = request_id(&request);
        let default_deadline = accepted + self.config.request_timeout;
        let deadline = qwen_image_common::deadline::from_metadata(request.metadata(), accepted)
            .map_or(default_deadline, |d| d.min(default_deadline));
        let span = tracing::info_span!("controlnet_inpaint", request_id = %id);
        let (max_side, seed) = (self.config.max_side_px, random_u64());
        let params = tokio::task::spawn_blocking(move || {
            cn_inpaint::validate_cn_inpaint(request.into_inner(), max_side, seed)
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("validation task: {e}")))
        .and_then(|r| r)
        .map_err(|e| with_request_id(e.into(), &id))?;
        span.in_scope(|| {
            tracing::info!(
                width = params.t2i.width_px,
                height = params.t2i.height_px,
                steps = params.t2i.steps,
                seed = params.t2i.seed,
                controlnet = %params.controlnet_id,
                "accepted"
            )
        });
        Ok(self.start(
            id,
            accepted,
            deadline,
            span,
            Flow::CnInpaint(Box::new(params)),
        ))
    }
}

/// A validated request of one of the flows.
enum Flow {
    T2i(T2iParams),
    Pose(Box<PoseParams>),
    CnInpaint(Box<CnInpaintParams>),
}

impl GatewayService {
    /// Runs `flow` on its own task, streaming its events; the task stops when the caller goes away or the
    /// deadline passes.
    fn start(
        &self,
        id: String,
        accepted: Instant,
        deadline: Instant,
        span: tracing::Span,
        flow: Flow,
    ) -> Response<ReceiverStream<Result<GenerateEvent, Status>>> {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let (stages, config, task_id) = (self.stages.clone(), self.config.clone(), id.clone());
        let scoped_id = id.clone();
        tokio::spawn(qwen_image_common::grpc::with_request_id(
            scoped_id,
            async move {
                let ctx = t2i::Ctx {
                    stages: &stages,
                    request_id: &task_id,
                    accepted,
                    deadline,
                    model_name: config.model_name.as_deref(),
                    events: &tx,
                };
                let run = async {
                    match &flow {
                        Flow::T2i(p) => t2i::run(&ctx, p).await,
                        Flow::Pose(p) => pose::run(&ctx, p).await,
                        Flow::CnInpaint(p) => cn_inpaint::run(&ctx, p).await,
                    }
                };
                // Whichever ends first wins; the loser is dropped, which drops any stage call in flight
                // (the denoiser sees its stream reset and stops within a step).
                let outcome = tokio::select! {
                    r = run => r,
                    () = tx.closed() => {
                        tracing::info!(elapsed_ms = accepted.elapsed().as_millis() as u64, "caller went away; cancelled");
                        return;
                    }
                    () = tokio::time::sleep_until(deadline.into()) => Err(GatewayError::DeadlineExceeded),
                };
                let event = match outcome {
                    Ok(result) => {
                        tracing::info!(elapsed_ms = result.elapsed_ms, "done");
                        Ok(GenerateEvent { event: Some(generate_event::Event::Result(result)) })
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "failed");
                        Err(with_request_id(e.into(), &task_id))
                    }
                };
                let _ = tx.send(event).await;
            }
            .instrument(span),
        ));

        let mut response = Response::new(ReceiverStream::new(rx));
        if let Ok(v) = MetadataValue::try_from(id.as_str()) {
            response.metadata_mut().insert(REQUEST_ID_KEY, v);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_look_like_uuids() {
        let a = new_request_id();
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert_ne!(a, new_request_id());
        let mut req = Request::new(());
        req.metadata_mut()
            .insert(REQUEST_ID_KEY, "abc-123".parse().expect("ascii"));
        assert_eq!(request_id(&req), "abc-123");
    }
}
