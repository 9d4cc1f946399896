//! The qwen-image VAE stage: latents → RGB8 images (`Decode`) and images → normalised latents (`Encode`,
//! sampled with the caller's posterior noise), on the stage skeleton of `qwen_image_common::stage`. This
//! crate holds only the model calls ([`model`], [`job`]), the request checks ([`validate`]) and the
//! handlers ([`service`]); `main.rs` is the skeleton's `main`.

pub mod job;
pub mod model;
pub mod service;
pub mod validate;

use qwen_image_common::stage::{Preparation, StageConfig, StageDef, StageError, StageHandle};
use qwen_image_model::snapshot::{Snapshot, first_line};
use qwen_image_model::vae::VaeConfig;
use qwen_image_proto::v1::vae_server::VaeServer;
use qwen_image_proto::v1::{StageDescription, StageKind, StageLimits, VaeDescription};
use tonic::service::Routes;

use crate::validate::VaeShape;

/// Full proto name of the service, as health checks name it.
pub const SERVICE_NAME: &str = "qwen_image.v1.Vae";

/// The VAE's own flags (it has none besides the shared stage flags).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct VaeArgs {}

/// The VAE stage.
pub struct Vae;

/// What `run` takes.
pub type VaeServiceConfig = StageConfig<VaeArgs>;

impl StageDef for Vae {
    type Args = VaeArgs;
    type Model = model::LoadedModel;
    type State = VaeShape;

    const NAME: &'static str = "vae";
    const BINARY: &'static str = "qwen-image-vae";
    const SERVICE_NAME: &'static str = SERVICE_NAME;
    const KIND: StageKind = StageKind::Vae;
    const DEFAULT_QUEUE_CAPACITY: usize = 8;
    const CUDA_BUILT: bool = cfg!(feature = "cuda");

    fn prepare(config: &VaeServiceConfig) -> Result<Preparation<VaeShape>, String> {
        let snapshot = Snapshot::open(&config.model_dir).map_err(|e| first_line(&e))?;
        let vcfg: VaeConfig = snapshot
            .config("vae", "config.json")
            .map_err(|e| first_line(&e))?;
        let shape = VaeShape {
            z_dim: vcfg.z_dim,
            scale_factor: vcfg.scale_factor(),
        };
        let digest = qwen_image_common::stage::describe::digest(&config.model_dir, &["vae"], false)
            .map_err(|e| format!("cannot read the VAE's files: {e}"))?;
        Ok(Preparation {
            state: shape,
            description: StageDescription {
                vae: Some(VaeDescription {
                    digest,
                    z_dim: shape.z_dim as u32,
                    scale_factor: shape.scale_factor as u32,
                }),
                limits: Some(StageLimits {
                    max_batch: validate::MAX_BATCH as u32,
                    max_side_px: validate::MAX_SIDE_PX as u32,
                    max_pixels: config.max_pixels,
                }),
                ..Default::default()
            },
        })
    }

    fn load(config: &VaeServiceConfig, _state: &VaeShape) -> Result<model::LoadedModel, String> {
        model::load(config).map_err(|e| first_line(&e))
    }

    fn probe(model: &mut model::LoadedModel) -> Result<(), String> {
        model::warm_up(model).map_err(|e| first_line(&e))
    }

    fn routes(routes: Routes, handle: StageHandle<model::LoadedModel>, shape: VaeShape) -> Routes {
        routes.add_service(
            VaeServer::new(service::VaeService {
                stage: handle,
                shape,
            })
            .max_decoding_message_size(qwen_image_common::limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(qwen_image_common::limits::MAX_MESSAGE_BYTES),
        )
    }
}

/// Serves the VAE on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    config: VaeServiceConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StageError> {
    qwen_image_common::stage::run::<Vae>(config, listener, shutdown).await
}
