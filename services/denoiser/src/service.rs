//! The `qwen_image.v1.Denoiser` gRPC handler: validate, admit, stream the worker's events.

use qwen_image_common::stage::StageHandle;
use qwen_image_proto::v1::denoiser_server::Denoiser;
use qwen_image_proto::v1::{DenoiseEvent, DenoiseRequest};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::field::Empty;

use crate::model::LoadedModel;
use crate::validate::{ControlNetInfo, ModelShape, validate_with_controlnets};

/// Events buffered between the worker and a slow reader before the worker waits (backpressure).
const EVENT_BUFFER: usize = 8;

pub struct DenoiserService {
    pub(crate) stage: StageHandle<LoadedModel>,
    pub(crate) shape: ModelShape,
    /// The loaded ControlNets requests may name.
    pub(crate) controlnets: Vec<ControlNetInfo>,
}

#[tonic::async_trait]
impl Denoiser for DenoiserService {
    type DenoiseStream = ReceiverStream<Result<DenoiseEvent, Status>>;

    #[tracing::instrument(
        name = "Denoise",
        skip_all,
        fields(batch = Empty, latent_height = Empty, latent_width = Empty, steps = Empty,
               start_step = Empty, true_cfg_scale = Empty, cfg = Empty)
    )]
    async fn denoise(
        &self,
        request: Request<DenoiseRequest>,
    ) -> Result<Response<Self::DenoiseStream>, Status> {
        let deadline = self.stage.begin(&request)?;
        let inputs = self.stage.checked(validate_with_controlnets(
            request.get_ref(),
            self.shape,
            &self.controlnets,
        ))?;
        let span = tracing::Span::current();
        span.record("batch", inputs.latents.shape[0]);
        span.record("latent_height", inputs.latents.shape[2]);
        span.record("latent_width", inputs.latents.shape[3]);
        span.record("steps", inputs.schedule.steps());
        span.record("start_step", inputs.start_step);
        span.record("true_cfg_scale", inputs.true_cfg_scale);
        span.record(
            "cfg",
            inputs.negative.is_some() && inputs.true_cfg_scale > 1.0,
        );
        tracing::info!(controlnets = inputs.control.len(), "admitting");
        let stream =
            self.stage
                .stream("Denoise", deadline, EVENT_BUFFER, move |m, ctx, events| {
                    crate::job::run(m, &inputs, ctx, events)
                })?;
        Ok(Response::new(stream))
    }
}
