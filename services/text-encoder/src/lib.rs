//! The qwen-image text-encoder stage: prompts → Qwen2.5-VL prompt embeddings, on the stage skeleton of
//! `qwen_image_common::stage` (worker thread, bounded queue, health, `StageInfo`, drain). This crate holds
//! only the model call ([`model`], [`job`]), the request checks ([`validate`]) and the handler
//! ([`service`]); `main.rs` is the skeleton's `main`.

pub mod cache;
pub mod job;
pub mod model;
pub mod service;
pub mod validate;

use qwen_image_common::stage::{Preparation, StageConfig, StageDef, StageError, StageHandle};
use qwen_image_model::snapshot::{Snapshot, first_line};
use qwen_image_model::text_encoder::TextEncoderConfig as ModelTextConfig;
use qwen_image_proto::v1::text_encoder_server::TextEncoderServer;
use qwen_image_proto::v1::{StageDescription, StageKind, StageLimits, TextEncoderDescription};
use tonic::service::Routes;

pub use qwen_image_common::stage::StageArgs;

/// Full proto name of the service, as health checks name it.
pub const SERVICE_NAME: &str = "qwen_image.v1.TextEncoder";

/// The text encoder's own flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TextEncoderArgs {
    /// Bound of the prompt-embedding cache in MiB (prompts sent again skip the text model; 0 = off).
    #[arg(long, env = "QWEN_IMAGE_EMBEDDING_CACHE_MB", default_value_t = 256)]
    pub embedding_cache_mb: usize,
}

impl Default for TextEncoderArgs {
    fn default() -> Self {
        Self {
            embedding_cache_mb: 256,
        }
    }
}

/// The text-encoder stage.
pub struct TextEncoder;

/// What `run` takes.
pub type TextEncoderConfig = StageConfig<TextEncoderArgs>;

impl StageDef for TextEncoder {
    type Args = TextEncoderArgs;
    type Model = model::LoadedModel;
    type State = ();

    const NAME: &'static str = "text-encoder";
    const BINARY: &'static str = "qwen-image-text-encoder";
    const SERVICE_NAME: &'static str = SERVICE_NAME;
    const KIND: StageKind = StageKind::TextEncoder;
    const DEFAULT_QUEUE_CAPACITY: usize = 8;
    const CUDA_BUILT: bool = cfg!(feature = "cuda");

    fn prepare(config: &TextEncoderConfig) -> Result<Preparation<()>, String> {
        let snapshot = Snapshot::open(&config.model_dir).map_err(|e| first_line(&e))?;
        let cfg: ModelTextConfig = snapshot
            .config("text_encoder", "config.json")
            .map_err(|e| first_line(&e))?;
        snapshot
            .component_dir("tokenizer")
            .map_err(|e| first_line(&e))?;
        let digest = qwen_image_common::stage::describe::digest(
            &config.model_dir,
            &["text_encoder", "tokenizer"],
            false,
        )
        .map_err(|e| format!("cannot read the text encoder's files: {e}"))?;
        Ok(Preparation {
            state: (),
            description: StageDescription {
                text_encoder: Some(TextEncoderDescription {
                    digest,
                    hidden_size: cfg.text.hidden_size as u32,
                    max_sequence_length: validate::MAX_SEQUENCE_LENGTH as u32,
                    default_max_sequence_length: validate::DEFAULT_MAX_SEQUENCE_LENGTH as u32,
                }),
                limits: Some(StageLimits {
                    max_batch: validate::MAX_PROMPTS as u32,
                    max_side_px: 0,
                    // Prompts have no pixels: not bounded by --max-pixels.
                    max_pixels: 0,
                }),
                ..Default::default()
            },
        })
    }

    fn load(config: &TextEncoderConfig, _state: &()) -> Result<model::LoadedModel, String> {
        model::load(config).map_err(|e| first_line(&e))
    }

    fn probe(model: &mut model::LoadedModel) -> Result<(), String> {
        model::warm_up(model).map_err(|e| first_line(&e))
    }

    fn routes(routes: Routes, handle: StageHandle<model::LoadedModel>, _state: ()) -> Routes {
        routes.add_service(
            TextEncoderServer::new(service::TextEncoderService { stage: handle })
                .max_decoding_message_size(qwen_image_common::limits::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(qwen_image_common::limits::MAX_MESSAGE_BYTES),
        )
    }
}

/// Serves the text encoder on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    config: TextEncoderConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StageError> {
    qwen_image_common::stage::run::<TextEncoder>(config, listener, shutdown).await
}
