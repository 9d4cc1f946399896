//! The qwen-image VAE stage: latents → RGB8 images (`Decode`) and images → normalised latents (`Encode`,
//! sampled with the caller's posterior noise), on the stage skeleton of `qwen_image_common::stage`. This
//! crate holds only the model calls ([`model`], [`job`]), the request checks ([`validate`]) and the
//! handlers ([`service`]); `main.rs` is the skeleton's `main`.

pub mod job;
pub mod model;
pub mod service;
pub mod validate;

use std::path::PathBuf;

use qwen_image_common::stage::describe::{component_digest, file_label};
use qwen_image_common::stage::memory;
use qwen_image_common::stage::{
    Preparation, StageConfig, StageDef, StageError, StageHandle, WeightsUsage,
};
use qwen_image_model::snapshot::first_line;
use qwen_image_model::source::{self, ConfigSource, WeightsSource};
use qwen_image_proto::v1::vae_server::VaeServer;
use qwen_image_proto::v1::{StageDescription, StageKind, StageLimits, VaeDescription};
use tonic::service::Routes;

use crate::validate::VaeShape;

/// Full proto name of the service, as health checks name it.
pub const SERVICE_NAME: &str = "qwen_image.v1.Vae";

/// The VAE's own flags (also flattened into `qwen-image serve`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct VaeArgs {
    /// The VAE's weights as one file instead of the snapshot's `vae/`: ComfyUI's
    /// `vae/qwen_image_vae.safetensors` (original Wan 2.1 names) or a safetensors file with diffusers
    /// names. The config comes from `--model`, or is the released Qwen-Image VAE's without it.
    #[arg(long, env = "QWEN_IMAGE_VAE_WEIGHTS", value_name = "FILE")]
    pub vae_weights: Option<PathBuf>,
}

/// The VAE stage.
pub struct Vae;

/// What `run` takes.
pub type VaeServiceConfig = StageConfig<VaeArgs>;

/// What the VAE reads before loading: the shape requests are checked against and where the weights are.
#[derive(Debug, Clone)]
pub struct VaeState {
    pub shape: VaeShape,
    pub weights: WeightsSource,
    pub config: ConfigSource,
}

impl StageDef for Vae {
    type Args = VaeArgs;
    type Model = model::LoadedModel;
    type State = VaeState;

    const NAME: &'static str = "vae";
    const BINARY: &'static str = "qwen-image-vae";
    const SERVICE_NAME: &'static str = SERVICE_NAME;
    const KIND: StageKind = StageKind::Vae;
    const DEFAULT_QUEUE_CAPACITY: usize = 8;
    const CUDA_BUILT: bool = cfg!(feature = "cuda");

    fn prepare(config: &VaeServiceConfig) -> Result<Preparation<VaeState>, String> {
        let file = config.own.vae_weights.as_deref();
        let snapshot = config.model_dir.as_deref();
        let (weights, vconfig) = source::sources(file, snapshot, "--vae-weights")?;
        let vcfg = source::vae_config(&vconfig).map_err(|e| first_line(&e))?;
        // The weights' headers: a wrong file is refused here, before the service listens.
        let weights_format = source::inspect_vae(&weights, &vconfig).map_err(|e| first_line(&e))?;
        let shape = VaeShape {
            z_dim: vcfg.z_dim,
            scale_factor: vcfg.scale_factor(),
        };
        let digest = component_digest(snapshot, &["vae"], file, &[])
            .map_err(|e| format!("cannot read the VAE's files: {e}"))?;
        Ok(Preparation {
            state: VaeState {
                shape,
                weights,
                config: vconfig,
            },
            description: StageDescription {
                model_id: file.map(file_label).unwrap_or_default(),
                weights_format,
                vae: Some(VaeDescription {
                    digest,
                    z_dim: shape.z_dim as u32,
                    scale_factor: shape.scale_factor as u32,
                }),
                limits: Some(StageLimits {
                    max_batch: validate::MAX_BATCH as u32,
                    max_batched_requests: 1,
                    max_side_px: validate::MAX_SIDE_PX as u32,
                    max_pixels: config.max_pixels,
                }),
                ..Default::default()
            },
        })
    }

    fn load(config: &VaeServiceConfig, state: &VaeState) -> Result<model::LoadedModel, String> {
        model::load(config, state).map_err(|e| first_line(&e))
    }

    fn weights(model: &model::LoadedModel) -> Vec<WeightsUsage> {
        memory::usage("vae", model.memory.entries())
    }

    fn probe(model: &mut model::LoadedModel) -> Result<(), String> {
        model::warm_up(model).map_err(|e| first_line(&e))
    }

    fn routes(routes: Routes, handle: StageHandle<model::LoadedModel>, state: VaeState) -> Routes {
        routes.add_service(
            VaeServer::new(service::VaeService {
                stage: handle,
                shape: state.shape,
            })
            .max_decoding_message_size(qwen_image_common::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(qwen_image_common::limits::MAX_MESSAGE_BYTES),
        )
    }
}

/// Serves the VAE on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    config: VaeServiceConfig,
    listener: impl Into<qwen_image_common::tls::Listeners>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StageError> {
    qwen_image_common::stage::run::<Vae>(config, listener, shutdown).await
}
