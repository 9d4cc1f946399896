//! The `ImageGenerator` gRPC service: request ids, deadlines, validation, and cancellation of the
//! orchestration when the caller goes away or the deadline passes.

use std::sync::Arc;
use std::time::Instant;

use qwen_image_proto::v1::image_generator_server::ImageGenerator;
use qwen_image_proto::v1::{
    ControlNetInpaintRequest, EditRequest, GenerateEvent, GenerateResult, Img2ImgRequest,
    InpaintRequest, ListModelsRequest, ListModelsResponse, OutpaintRequest, PoseRequest,
    TextToImageRequest, generate_event,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing::field::Empty;

use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::flows;
use crate::geometry::Geometry;
use crate::models::Models;
use crate::pipeline::Ctx;
use crate::request::cn_inpaint::{CnInpaintParams, validate_cn_inpaint};
use crate::request::edit::{EditParams, validate_img2img, validate_inpaint, validate_outpaint};
use crate::request::instruct::{self, InstructParams};
use crate::request::pose::{PoseParams, validate_pose};
use crate::request::t2i::{self, T2iParams};
use crate::request::{Limits, Settings};
use crate::stages::Stages;
use crate::stages::admission::{Admitted, RequestQueue};

/// Metadata key of the request id, in requests (optional, the caller's own id) and responses.
pub const REQUEST_ID_KEY: &str = "x-request-id";
/// Events buffered towards a slow caller before the orchestration waits.
const EVENT_BUFFER: usize = 16;

pub struct GatewayService {
    /// The served models and their stage pools.
    pub models: Arc<Models>,
    pub config: Arc<GatewayConfig>,
    /// The requests in the gateway (at most `config.max_queued`).
    pub queue: Arc<RequestQueue>,
    /// The pose-detector stage (`--pose-detector`), for `PoseRequest.reference_image`.
    pub detector: Option<crate::reference_pose::Detector>,
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

/// A validated request of any flow.
enum Flow {
    Instruct(Box<InstructParams>),
    TextToImage(T2iParams),
    Edit(Box<EditParams>),
    Pose(Box<PoseParams>),
    CnInpaint(Box<CnInpaintParams>),
}

impl Flow {
    async fn run(&self, ctx: &Ctx<'_>) -> Result<GenerateResult, GatewayError> {
        match self {
            Self::Instruct(p) => flows::instruct::run(ctx, p).await,
            Self::TextToImage(p) => flows::t2i::run(ctx, p).await,
            Self::Edit(p) => flows::edit::run(ctx, p).await,
            Self::Pose(p) => flows::pose::run(ctx, p).await,
            Self::CnInpaint(p) => flows::cn_inpaint::run(ctx, p).await,
        }
    }

    /// Records the validated parameters on the request span and logs the acceptance.
    fn record(&self, span: &tracing::Span, model_name: Option<&str>) {
        let p: &Settings = match self {
            Self::Instruct(p) => &p.settings,
            Self::TextToImage(p) => &p.settings,
            Self::Edit(e) => {
                span.record("strength", e.strength);
                &e.settings
            }
            Self::Pose(p) => &p.settings,
            Self::CnInpaint(p) => &p.settings,
        };
        span.record("width", p.width_px);
        span.record("height", p.height_px);
        span.record("steps", p.steps);
        span.record("true_cfg_scale", f64::from(p.true_cfg_scale));
        span.record("cfg", p.uses_cfg());
        span.record("seed", p.seed);
        span.record("images", p.num_images);
        if let Some(model) = model_name {
            span.record("model", model);
        }
        span.in_scope(|| tracing::info!("accepted"));
    }
}

/// The request span of a flow (static name per flow, as tracing requires); parameters are recorded
/// once validated.
macro_rules! flow_span {
    ($name:literal, $id:expr) => {
        tracing::info_span!(
            $name,
            request_id = %$id,
            flow = $name,
            width = Empty,
            height = Empty,
            steps = Empty,
            true_cfg_scale = Empty,
            cfg = Empty,
            seed = Empty,
            images = Empty,
            strength = Empty,
            model = Empty,
            api_key = Empty,
        )
    };
}

/// What every request gets on arrival: its place in the gateway, id, acceptance time, deadline, and the
/// model's geometry.
struct Admission {
    admitted: Admitted,
    id: String,
    /// The name of the caller's API key (with `--api-keys-file`).
    key_name: Option<String>,
    accepted: Instant,
    deadline: Instant,
    geometry: Geometry,
    /// The model's stages (`GenerationSettings.model`).
    stages: Arc<Stages>,
    /// Model name for the PNG metadata and the span (`None` = the text encoder's model id).
    model_name: Option<String>,
}

/// `GenerationSettings.model` of a request.
fn model_of(s: Option<&qwen_image_proto::v1::GenerationSettings>) -> String {
    s.map(|s| s.model.clone()).unwrap_or_default()
}

type EventStream = ReceiverStream<Result<GenerateEvent, Status>>;

impl GatewayService {
    /// The caller's API key (UNAUTHENTICATED when keys are required and it is missing or wrong), the
    /// request's place in the gateway (RESOURCE_EXHAUSTED at once when `--max-queued` requests are in),
    /// id, deadline, and the geometry it is validated against (FAILED_PRECONDITION when the stages do not
    /// serve one model, UNAVAILABLE before they have described it).
    async fn admit<T>(&self, request: &Request<T>, model: &str) -> Result<Admission, Status> {
        let key_name = match &self.config.api_keys {
            Some(keys) => Some(
                keys.check(request.metadata())
                    .map_err(|s| with_request_id(s, &request_id(request)))?,
            ),
            None => None,
        };
        let accepted = Instant::now();
        let default_deadline = accepted + self.config.request_timeout;
        let deadline = qwen_image_common::deadline::from_metadata(request.metadata(), accepted)
            .map_or(default_deadline, |d| d.min(default_deadline));
        let id = request_id(request);
        let served = self
            .models
            .select(model)
            .map_err(|s| with_request_id(s, &id))?;
        let (stages, name) = (served.stages.clone(), served.name.clone());
        // Admitted before decoding by the gRPC server's layer, or here (the HTTP API's in-process calls).
        let admitted = match crate::admit_gate::take_admitted() {
            Some(admitted) => admitted,
            None => self.queue.admit().map_err(|s| with_request_id(s, &id))?,
        };
        let geometry = stages
            .geometry_by(deadline)
            .await
            .map_err(|e| with_request_id(e.into(), &id))?;
        Ok(Admission {
            admitted,
            id,
            key_name,
            accepted,
            deadline,
            geometry,
            stages,
            model_name: name,
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            max_side_px: self.config.max_side_px,
        }
    }

    fn edit_areas(&self) -> instruct::Areas {
        instruct::Areas {
            condition: self.config.edit_condition_area,
            vae: self.config.edit_vae_area,
        }
    }

    /// Validates a request off the async threads (decoding, resizing and rendering pictures is CPU work)
    /// and wraps it in its `Flow`.
    async fn validate_off_thread<R: Send + 'static, P: Send + 'static>(
        &self,
        a: &Admission,
        req: R,
        check: fn(R, &Geometry, &Limits, u64) -> Result<P, GatewayError>,
        wrap: fn(P) -> Flow,
    ) -> Result<Flow, Status> {
        let (g, limits) = (a.geometry, self.limits());
        tokio::task::spawn_blocking(move || check(req, &g, &limits, random_u64()))
            .await
            .map_err(|e| GatewayError::Internal(format!("validation task failed: {e}")))
            .and_then(|r| r)
            .map(wrap)
            .map_err(|e| with_request_id(e.into(), &a.id))
    }

    /// Runs `flow` in its own task, streaming its events; the caller going away or the deadline passing
    /// cancels it.
    fn start(&self, a: Admission, span: tracing::Span, flow: Flow) -> Response<EventStream> {
        if let Some(name) = &a.key_name {
            span.record("api_key", name.as_str());
        }
        flow.record(&span, a.model_name.as_deref());
        let Admission {
            admitted,
            id,
            key_name: _,
            accepted,
            deadline,
            geometry,
            stages,
            model_name,
        } = a;
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let task_id = id.clone();
        let scoped_id = id.clone();
        tokio::spawn(qwen_image_common::grpc::with_request_id(
            scoped_id,
            async move {
                let ctx = Ctx {
                    stages: &stages,
                    request_id: &task_id,
                    accepted,
                    deadline,
                    model_name: model_name.as_deref(),
                    geometry,
                    events: &tx,
                };
                // Whichever ends first wins; the loser is dropped, which drops any stage call in flight
                // (the denoiser sees its stream reset and stops within a step).
                let outcome = tokio::select! {
                    r = flow.run(&ctx) => r,
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
                drop(admitted);
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

#[tonic::async_trait]
impl ImageGenerator for GatewayService {
    type EditStream = EventStream;
    type TextToImageStream = EventStream;
    type Img2ImgStream = EventStream;
    type InpaintStream = EventStream;
    type OutpaintStream = EventStream;
    type PoseStream = EventStream;
    type ControlNetInpaintStream = EventStream;

    async fn edit(
        &self,
        request: Request<EditRequest>,
    ) -> Result<Response<Self::EditStream>, Status> {
        let model = model_of(request.get_ref().settings.as_ref());
        let a = self.admit(&request, &model).await?;
        let checked = self
            .models
            .select(&model)
            .and_then(|m| m.check_edit().map_err(Status::from));
        checked.map_err(|s| with_request_id(s, &a.id))?;
        let span = flow_span!("edit", a.id);
        let (g, limits, areas) = (a.geometry, self.limits(), self.edit_areas());
        let req = request.into_inner();
        let flow = tokio::task::spawn_blocking(move || {
            instruct::validate(req, &g, &limits, areas, random_u64())
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("validation task failed: {e}")))
        .and_then(|r| r)
        .map(|p| Flow::Instruct(Box::new(p)))
        .map_err(|e| with_request_id(e.into(), &a.id))?;
        Ok(self.start(a, span, flow))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Ok(Response::new(self.models.list()))
    }

    async fn text_to_image(
        &self,
        request: Request<TextToImageRequest>,
    ) -> Result<Response<Self::TextToImageStream>, Status> {
        let a = self
            .admit(&request, &model_of(request.get_ref().settings.as_ref()))
            .await?;
        let span = flow_span!("text_to_image", a.id);
        let flow = self
            .validate_off_thread(&a, request.into_inner(), t2i::validate, t2i_flow)
            .await?;
        Ok(self.start(a, span, flow))
    }

    async fn img2_img(
        &self,
        request: Request<Img2ImgRequest>,
    ) -> Result<Response<Self::Img2ImgStream>, Status> {
        let a = self
            .admit(&request, &model_of(request.get_ref().settings.as_ref()))
            .await?;
        let span = flow_span!("img2img", a.id);
        let flow = self
            .validate_off_thread(&a, request.into_inner(), validate_img2img, edit_flow)
            .await?;
        Ok(self.start(a, span, flow))
    }

    async fn inpaint(
        &self,
        request: Request<InpaintRequest>,
    ) -> Result<Response<Self::InpaintStream>, Status> {
        let a = self
            .admit(&request, &model_of(request.get_ref().settings.as_ref()))
            .await?;
        let span = flow_span!("inpaint", a.id);
        let flow = self
            .validate_off_thread(&a, request.into_inner(), validate_inpaint, edit_flow)
            .await?;
        Ok(self.start(a, span, flow))
    }

    async fn outpaint(
        &self,
        request: Request<OutpaintRequest>,
    ) -> Result<Response<Self::OutpaintStream>, Status> {
        let a = self
            .admit(&request, &model_of(request.get_ref().settings.as_ref()))
            .await?;
        let span = flow_span!("outpaint", a.id);
        let flow = self
            .validate_off_thread(&a, request.into_inner(), validate_outpaint, edit_flow)
            .await?;
        Ok(self.start(a, span, flow))
    }

    async fn pose(
        &self,
        request: Request<PoseRequest>,
    ) -> Result<Response<Self::PoseStream>, Status> {
        let a = self
            .admit(&request, &model_of(request.get_ref().settings.as_ref()))
            .await?;
        let span = flow_span!("pose", a.id);
        let req = crate::reference_pose::resolve(
            self.detector.as_ref(),
            request.into_inner(),
            a.deadline,
        )
        .await
        .map_err(|e| with_request_id(e.into(), &a.id))?;
        let flow = self
            .validate_off_thread(&a, req, validate_pose, pose_flow)
            .await?;
        Ok(self.start(a, span, flow))
    }

    async fn control_net_inpaint(
        &self,
        request: Request<ControlNetInpaintRequest>,
    ) -> Result<Response<Self::ControlNetInpaintStream>, Status> {
        let a = self
            .admit(&request, &model_of(request.get_ref().settings.as_ref()))
            .await?;
        let span = flow_span!("controlnet_inpaint", a.id);
        let flow = self
            .validate_off_thread(
                &a,
                request.into_inner(),
                validate_cn_inpaint,
                cn_inpaint_flow,
            )
            .await?;
        Ok(self.start(a, span, flow))
    }
}

fn t2i_flow(p: T2iParams) -> Flow {
    Flow::TextToImage(p)
}

fn edit_flow(p: EditParams) -> Flow {
    Flow::Edit(Box::new(p))
}

fn pose_flow(p: PoseParams) -> Flow {
    Flow::Pose(Box::new(p))
}

fn cn_inpaint_flow(p: CnInpaintParams) -> Flow {
    Flow::CnInpaint(Box::new(p))
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
