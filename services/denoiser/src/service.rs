//! The `qwen_image.v1.Denoiser` gRPC handler: validate, admit, stream the worker's events.

use std::time::Instant;

use qwen_image_common::deadline;
use qwen_image_common::queue::Admission;
use qwen_image_common::stage::Readiness;
use qwen_image_proto::v1::denoiser_server::Denoiser;
use qwen_image_proto::v1::{DenoiseEvent, DenoiseRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::field::Empty;

use crate::error::DenoiserError;
use crate::job::DenoiseJob;
use crate::validate::{ModelShape, validate};

/// Events buffered between the worker and a slow reader before the worker waits (backpressure).
const EVENT_BUFFER: usize = 8;

pub struct DenoiserService {
    pub(crate) admission: Admission<DenoiseJob>,
    pub(crate) shape: ModelShape,
    /// True once the model is loaded and warmed up, false again while draining.
    pub(crate) readiness: Readiness,
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
        if !self.readiness.is_ready() {
            return Err(DenoiserError::NotReady.into());
        }
        let deadline = deadline::from_metadata(request.metadata(), Instant::now());
        let inputs = validate(request.get_ref(), self.shape)
            .inspect_err(|e| tracing::info!(error = %e, "rejected"))?;
        let span = tracing::Span::current();
        span.record("batch", inputs.latents.shape[0]);
        span.record("latent_height", inputs.latents.shape[2]);
        span.record("latent_width", inputs.latents.shape[3]);
        span.record("steps", inputs.schedule.steps());
        span.record("start_step", inputs.start_step);
        span.record("true_cfg_scale", f64::from(inputs.true_cfg_scale));
        span.record(
            "cfg",
            inputs.negative.is_some() && inputs.true_cfg_scale > 1.0,
        );
        tracing::info!("admitting");
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        self.admission
            .try_submit(
                DenoiseJob {
                    inputs,
                    events,
                    deadline,
                },
                tracing::Span::current(),
            )
            .map_err(DenoiserError::from)?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
