//! The qwen-image denoiser stage: the Qwen-Image transformer's denoising loop (flow-match Euler, true CFG,
//! inpaint blending, ControlNets), streamed step by step, on the stage skeleton of
//! `qwen_image_common::stage`. This crate holds only the model call ([`model`], [`job`]), the request
//! checks ([`validate`]), its flags ([`args`]) and the handler ([`service`]); `main.rs` is the skeleton's
//! `main`.

pub mod adapters;
pub mod admin;
pub mod args;
pub mod batcher;
pub mod job;
pub mod model;
pub mod references;
pub mod service;
pub mod validate;

use qwen_image_common::stage::describe::{component_digest, digest, file_label};
use qwen_image_common::stage::memory;
use qwen_image_common::stage::{
    Preparation, StageConfig, StageDef, StageError, StageHandle, WeightsUsage,
};
use qwen_image_model::scheduler::SchedulerConfig;
use qwen_image_model::snapshot::first_line;
use qwen_image_model::source::{self, ConfigSource, WeightsSource};
use qwen_image_model::transformer::TransformerConfig;
use qwen_image_proto::v1::denoiser_server::DenoiserServer;
use qwen_image_proto::v1::lora_admin_server::LoraAdminServer;
use qwen_image_proto::v1::{
    ControlNetDescription, StageDescription, StageKind, StageLimits, TransformerDescription,
};
use tonic::service::Routes;

pub use args::{BatchArgs, ControlNetSpec, DenoiserArgs, TransformerWeightsArgs};
pub use qwen_image_common::stage::{Stats, StatsSnapshot};

use crate::validate::{ControlNetInfo, ModelShape};

/// Full proto name of the service, as health checks name it.
pub const SERVICE_NAME: &str = "qwen_image.v1.Denoiser";

/// The denoiser stage.
pub struct Denoiser;

/// What `run` takes.
pub type DenoiserConfig = StageConfig<DenoiserArgs>;

/// What the denoiser reads before loading: the facts requests are checked against and the configs the
/// worker loads with.
#[derive(Debug, Clone)]
pub struct DenoiserState {
    pub shape: ModelShape,
    pub controlnets: Vec<ControlNetInfo>,
    pub transformer: TransformerConfig,
    pub scheduler: SchedulerConfig,
    /// The adapters requests may name (the `--lora` ones, then LoraAdmin's changes).
    pub loras: adapters::LoraCatalog,
    /// Bytes per adapter value in the stage dtype (4 for f32, 2 for bf16).
    pub dtype_bytes: usize,
    /// `--lora-budget-mb` in bytes (0 = unbounded).
    pub lora_budget: u64,
    /// Where the transformer's weights and config come from (`--transformer-weights`, `--model`).
    pub weights: WeightsSource,
    pub config: ConfigSource,
    /// `--max-batch`, `--batch-wait-ms`.
    pub batch: batcher::BatchConfig,
}

impl StageDef for Denoiser {
    type Args = DenoiserArgs;
    type Model = model::LoadedModel;
    type State = DenoiserState;

    const NAME: &'static str = "denoiser";
    const BINARY: &'static str = "qwen-image-denoiser";
    const SERVICE_NAME: &'static str = SERVICE_NAME;
    const KIND: StageKind = StageKind::Denoiser;
    // Room for a full batch (`--max-batch` 4) and as many requests waiting to join it.
    const DEFAULT_QUEUE_CAPACITY: usize = 8;
    const CUDA_BUILT: bool = cfg!(feature = "cuda");

    fn prepare(config: &DenoiserConfig) -> Result<Preparation<DenoiserState>, String> {
        let file = config.own.weights.transformer_weights.as_deref();
        let (weights, tconfig) =
            source::sources(file, config.model_dir.as_deref(), "--transformer-weights")?;
        let (shape, transformer, scheduler) = model::read_shape(config, &tconfig)?;
        // The weights' headers: a wrong file is refused here, before the service listens.
        let weights_format = source::inspect_transformer(&weights).map_err(|e| first_line(&e))?;
        let controlnets = model::read_controlnets(config, &transformer)?;
        let dtype_bytes = match config.device.compute_dtype() {
            qwen_image_common::stage::ComputeDtype::Bf16 => 2,
            _ => 4,
        };
        let (loras, lora_descriptions) = adapters::prepare(
            &config.own.loras,
            dtype_bytes,
            config.own.lora_budget_bytes(),
        )?;
        let io = |what: &str, e: std::io::Error| format!("cannot read the {what}'s files: {e}");
        let transformer_digest = component_digest(
            config.model_dir.as_deref(),
            &["transformer", "scheduler"],
            file,
            &[],
        )
        .map_err(|e| io("transformer", e))?;
        let nets = config
            .own
            .controlnets
            .iter()
            .zip(&controlnets)
            .map(|(spec, info)| {
                Ok(ControlNetDescription {
                    id: info.id.clone(),
                    digest: digest(&spec.dir, &["."], false)
                        .map_err(|e| io(&format!("ControlNet `{}`", spec.id), e))?,
                    cond_channels: info.cond_channels as u32,
                    takes_mask: info.takes_mask,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let description = StageDescription {
            transformer: Some(TransformerDescription {
                digest: transformer_digest,
                latent_channels: shape.latent_channels as u32,
                in_channels: transformer.in_channels as u32,
                patch_size: transformer.patch_size as u32,
                joint_attention_dim: shape.joint_attention_dim as u32,
                max_prompt_tokens: validate::MAX_PROMPT_TOKENS as u32,
                max_steps: validate::MAX_STEPS as u32,
                zero_cond_t: transformer.zero_cond_t,
                pipeline_class: config
                    .model_dir
                    .as_deref()
                    .and_then(|d| qwen_image_model::snapshot::Snapshot::open(d).ok())
                    .and_then(|s| s.pipeline_class().map(str::to_string))
                    .unwrap_or_default(),
            }),
            controlnets: nets,
            loras: lora_descriptions,
            weights_format,
            model_id: file.map(file_label).unwrap_or_default(),
            limits: Some(StageLimits {
                max_batch: validate::MAX_BATCH as u32,
                // Bounded in latent cells (validate::MAX_LATENT_SIDE); pixels depend on the VAE.
                max_side_px: 0,
                max_pixels: config.max_pixels,
                max_batched_requests: config.own.batching.max_batch,
            }),
            ..Default::default()
        };
        Ok(Preparation {
            state: DenoiserState {
                shape,
                controlnets,
                transformer,
                scheduler,
                loras,
                dtype_bytes,
                lora_budget: config.own.lora_budget_bytes(),
                weights,
                config: tconfig,
                batch: batcher::BatchConfig {
                    max_rows: config.own.batching.max_batch as usize,
                    wait: std::time::Duration::from_millis(config.own.batching.batch_wait_ms),
                },
            },
            description,
        })
    }

    fn load(config: &DenoiserConfig, state: &DenoiserState) -> Result<model::LoadedModel, String> {
        model::load(config, state).map_err(|e| first_line(&e))
    }

    fn weights(model: &model::LoadedModel) -> Vec<WeightsUsage> {
        memory::usage("transformer", model.memory.entries())
    }

    fn probe(model: &mut model::LoadedModel) -> Result<(), String> {
        model::warm_up(model).map_err(|e| first_line(&e))
    }

    fn routes(
        routes: Routes,
        handle: StageHandle<model::LoadedModel>,
        state: DenoiserState,
    ) -> Routes {
        let admin = admin::LoraAdminService {
            stage: handle.clone(),
            catalog: state.loras.clone(),
            dtype_bytes: state.dtype_bytes,
            budget: state.lora_budget,
        };
        routes
            .add_service(
                DenoiserServer::new(service::DenoiserService {
                    stage: handle,
                    shape: state.shape,
                    controlnets: state.controlnets,
                    scheduler: state.scheduler,
                    loras: state.loras,
                    batcher: batcher::Batcher::new(state.batch),
                })
                .max_decoding_message_size(qwen_image_common::limits::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(qwen_image_common::limits::MAX_MESSAGE_BYTES),
            )
            .add_service(LoraAdminServer::new(admin))
    }
}

/// Serves the denoiser on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    config: DenoiserConfig,
    listener: impl Into<qwen_image_common::tls::Listeners>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StageError> {
    qwen_image_common::stage::run::<Denoiser>(config, listener, shutdown).await
}
