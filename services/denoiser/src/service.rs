//! The `qwen_image.v1.Denoiser` gRPC handler: validate, admit, stream the worker's events.

use std::sync::Arc;

use qwen_image_common::stage::{JobCtx, JobStream, StageHandle};
use qwen_image_proto::v1::denoiser_server::Denoiser;
use qwen_image_proto::v1::{DenoiseEvent, DenoiseRequest};
use tonic::{Request, Response, Status};
use tracing::field::Empty;

use qwen_image_common::stage::StageError;
use qwen_image_model::scheduler::SchedulerConfig;

use crate::batcher::{self, Batcher};
use crate::model::LoadedModel;
use crate::validate::{ControlNetInfo, ModelShape, validate_with_controlnets};

/// Image pixels per latent cell counted against `--max-pixels`: the Qwen-Image VAE's 8x8 spatial
/// compression (diffusers `QwenImagePipeline`: `vae_scale_factor = 2 ** len(vae.temperal_downsample)` = 8).
pub const PIXELS_PER_LATENT_CELL: u64 = 64;

/// The image pixels of a batch of `b` latent grids of `h` x `w` cells.
pub fn pixel_count(b: usize, h: usize, w: usize) -> u64 {
    (b as u64)
        .saturating_mul(h as u64)
        .saturating_mul(w as u64)
        .saturating_mul(PIXELS_PER_LATENT_CELL)
}

/// Events buffered between the worker and a slow reader before the worker waits (backpressure).
const EVENT_BUFFER: usize = 8;

pub struct DenoiserService {
    pub(crate) stage: StageHandle<LoadedModel>,
    pub(crate) shape: ModelShape,
    /// The loaded ControlNets requests may name.
    pub(crate) controlnets: Vec<ControlNetInfo>,
    /// What the request's schedule is built from (checked at admission).
    pub(crate) scheduler: SchedulerConfig,
    /// The loaded LoRA adapters requests may name.
    pub(crate) loras: crate::adapters::LoraCatalog,
    /// Continuous batching: the requests waiting to join a batch.
    pub(crate) batcher: Arc<Batcher>,
}

#[tonic::async_trait]
impl Denoiser for DenoiserService {
    type DenoiseStream = JobStream<DenoiseEvent>;

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
        let (b, h, w) = (
            inputs.latents.shape[0],
            inputs.latents.shape[2],
            inputs.latents.shape[3],
        );
        let reference_cells = crate::references::cells(&inputs.references);
        self.stage.check_pixels(
            pixel_count(b, h, w).saturating_add(pixel_count(b, reference_cells, 1)),
            &format!(
                "a batch of {b} latent grids of {h}x{w} cells and {reference_cells} reference cells each \
                 ({PIXELS_PER_LATENT_CELL} pixels each)"
            ),
        )?;
        let loras = self.stage.checked(crate::adapters::check(
            &request.get_ref().loras,
            request.get_ref().scheduler.as_ref(),
            &self.loras,
            &self.scheduler,
        ))?;
        // A schedule the scheduler cannot build (a one-step schedule ending at sigma 1) is the request's fault.
        self.stage.checked(
            crate::job::schedule(&loras.scheduler, &inputs)
                .map(drop)
                .map_err(|e| {
                    StageError::InvalidArgument(format!("{e}; send `steps` >= 2 or other `sigmas`"))
                }),
        )?;
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
        tracing::info!(
            controlnets = inputs.control.len(),
            loras = loras.loras.len(),
            references = inputs.references.len(),
            "admitting"
        );
        let batcher = self.batcher.clone();
        let stream = if batcher.takes(&inputs, &loras, &self.scheduler) {
            self.stage.stream_shared(
                "Denoise",
                deadline,
                EVENT_BUFFER,
                move |reply, cancelled| {
                    let ticket = batcher.enqueue(inputs, reply, cancelled.flag(), deadline);
                    move |m: &mut LoadedModel, ctx: &JobCtx<'_>| batcher::drive(m, ctx, &ticket)
                },
            )?
        } else {
            let ticket = (batcher.config.max_rows > 1).then(|| batcher.barrier());
            self.stage
                .stream("Denoise", deadline, EVENT_BUFFER, move |m, ctx, events| {
                    drop(ticket);
                    let active = m.loras.activate(&loras)?;
                    crate::job::run(m, &inputs, &active, ctx, events)
                })?
        };
        Ok(Response::new(stream))
    }
}
