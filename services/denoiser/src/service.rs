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

use crate::error::DenoiserError;
use crate::job::DenoiseJob;
use crate::validate::{ControlNetInfo, ModelShape, validate_with_controlnets};

/// Events buffered between the worker and a slow reader before the worker waits (backpressure).
const EVENT_BUFFER: usize = 8;

pub struct DenoiserService {
    pub(crate) admission: Admission<DenoiseJob>,
    pub(crate) shape: ModelShape,
    /// The loaded ControlNets requests may name.
    pub(crate) controlnets: Vec<ControlNetInfo>,
    /// True once the model is loaded and warmed up, false again while draining.
    pub(crate) readiness: Readiness,
}

#[tonic::async_trait]
impl Denoiser for DenoiserService {
    type DenoiseStream = ReceiverStream<Result<DenoiseEvent, Status>>;

    #[tracing::instrument(name = "Denoise", skip_all)]
    async fn denoise(
        &self,
        request: Request<DenoiseRequest>,
    ) -> Result<Response<Self::DenoiseStream>, Status> {
        if !self.readiness.is_ready() {
            return Err(DenoiserError::NotReady.into());
        }
        let deadline = deadline::from_metadata(request.metadata(), Instant::now());
        let inputs = validate_with_controlnets(request.get_ref(), self.shape, &self.controlnets)
            .inspect_err(|e| tracing::info!(error = %e, "rejected"))?;
        tracing::info!(
            batch = inputs.latents.shape[0],
            latent_h = inputs.latents.shape[2],
            latent_w = inputs.latents.shape[3],
            steps = inputs.schedule.steps(),
            start_step = inputs.start_step,
            cfg = inputs.negative.is_some() && inputs.true_cfg_scale > 1.0,
            controlnets = inputs.control.len(),
            "admitting"
        );
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
