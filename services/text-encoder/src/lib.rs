//! The qwen-image text-encoder stage: prompts → Qwen2.5-VL prompt embeddings, on the stage skeleton of
//! `qwen_image_common::stage` (worker thread, bounded queue, health, `StageInfo`, drain). This crate holds
//! only the model call ([`model`], [`job`]), the request checks ([`validate`]) and the handler
//! ([`service`]); `main.rs` is the skeleton's `main`.

pub mod cache;
pub mod job;
pub mod model;
pub mod service;
pub mod validate;
pub mod vision;

use std::path::{Path, PathBuf};

use qwen_image_common::stage::describe::{component_digest, file_label};
use qwen_image_common::stage::memory;
use qwen_image_common::stage::{
    Preparation, StageConfig, StageDef, StageError, StageHandle, WeightsUsage,
};
use qwen_image_model::snapshot::{Snapshot, first_line};
use qwen_image_model::source::{self, ConfigSource, WeightsSource};
use qwen_image_proto::v1::text_encoder_server::TextEncoderServer;
use qwen_image_proto::v1::{StageDescription, StageKind, StageLimits, TextEncoderDescription};
use tonic::service::Routes;

pub use qwen_image_common::stage::StageArgs;

/// Full proto name of the service, as health checks name it.
pub const SERVICE_NAME: &str = "qwen_image.v1.TextEncoder";

/// The text encoder's own flags (also flattened into `qwen-image serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct TextEncoderArgs {
    /// The text encoder's weights as one file instead of the snapshot's `text_encoder/`: a llama.cpp GGUF
    /// of Qwen2.5-VL-7B (dimensions from its metadata) or ComfyUI's `qwen_2.5_vl_7b*.safetensors` (dense
    /// or scaled fp8). The config comes from `--model`, the GGUF's metadata, or the released 7B sizes.
    #[arg(long, env = "QWEN_IMAGE_TEXT_ENCODER_WEIGHTS", value_name = "FILE")]
    pub text_encoder_weights: Option<PathBuf>,

    /// The Qwen2 tokenizer: a folder with `tokenizer.json` (or `vocab.json` + `merges.txt`) and
    /// `tokenizer_config.json`, or that folder's `tokenizer.json`. Default: the snapshot's `tokenizer/`;
    /// required without `--model`.
    #[arg(long, env = "QWEN_IMAGE_TOKENIZER", value_name = "DIR_OR_FILE")]
    pub tokenizer: Option<PathBuf>,

    /// Bound of the prompt-embedding cache in MiB (prompts sent again skip the text model; 0 = off).
    #[arg(long, env = "QWEN_IMAGE_EMBEDDING_CACHE_MB", default_value_t = 256)]
    pub embedding_cache_mb: usize,
}

impl Default for TextEncoderArgs {
    fn default() -> Self {
        Self {
            text_encoder_weights: None,
            tokenizer: None,
            embedding_cache_mb: 256,
        }
    }
}

/// The text-encoder stage.
pub struct TextEncoder;

/// What `run` takes.
pub type TextEncoderConfig = StageConfig<TextEncoderArgs>;

/// Where the worker loads the text encoder from (resolved from the flags by `prepare`).
#[derive(Debug, Clone)]
pub struct TextEncoderState {
    pub weights: WeightsSource,
    pub config: ConfigSource,
    pub tokenizer_dir: PathBuf,
    /// Reported in responses: the snapshot's folder name, or the weights file's.
    pub model_id: String,
    /// The snapshot whose processor and vision tower the worker loads (prompts with pictures); `None` =
    /// text-only prompts.
    pub vision_snapshot: Option<PathBuf>,
}

/// The tokenizer folder: `--tokenizer` (a folder, or the folder of the file it names), else the
/// snapshot's `tokenizer/`.
pub fn tokenizer_dir(tokenizer: Option<&Path>, snapshot: Option<&Path>) -> Result<PathBuf, String> {
    match (tokenizer, snapshot) {
        (Some(t), _) if t.is_dir() => Ok(t.to_path_buf()),
        (Some(t), _) if t.is_file() => Ok(t.parent().unwrap_or(Path::new(".")).to_path_buf()),
        (Some(t), _) => Err(format!("--tokenizer {}: no such file or folder", t.display())),
        (None, Some(dir)) => Snapshot::open(dir)
            .and_then(|s| s.component_dir("tokenizer"))
            .map_err(|e| first_line(&e)),
        (None, None) => Err(
            "no tokenizer: give --model DIR (a diffusers snapshot) or --tokenizer DIR (Qwen2.5-VL's tokenizer files)"
                .into(),
        ),
    }
}

impl StageDef for TextEncoder {
    type Args = TextEncoderArgs;
    type Model = model::LoadedModel;
    type State = TextEncoderState;

    const NAME: &'static str = "text-encoder";
    const BINARY: &'static str = "qwen-image-text-encoder";
    const SERVICE_NAME: &'static str = SERVICE_NAME;
    const KIND: StageKind = StageKind::TextEncoder;
    const DEFAULT_QUEUE_CAPACITY: usize = 8;
    const CUDA_BUILT: bool = cfg!(feature = "cuda");

    fn prepare(config: &TextEncoderConfig) -> Result<Preparation<TextEncoderState>, String> {
        let file = config.own.text_encoder_weights.as_deref();
        let snapshot = config.model_dir.as_deref();
        let (weights, tconfig) = source::sources(file, snapshot, "--text-encoder-weights")?;
        let tokenizer_dir = tokenizer_dir(config.own.tokenizer.as_deref(), snapshot)?;
        // The weights' headers (and a GGUF's metadata): a wrong file is refused here, before listening.
        let (text, weights_format) =
            source::inspect_text_encoder(&weights, &tconfig).map_err(|e| first_line(&e))?;
        let extra: Vec<&Path> = match &config.own.tokenizer {
            Some(_) => vec![tokenizer_dir.as_path()],
            None => Vec::new(),
        };
        // Prompts with pictures (instruction editing) when the snapshot has a processor and vision weights;
        // the processor's files are then part of what this stage serves.
        let vision = vision::available(snapshot, file);
        let dirs: &[&str] = match (extra.is_empty(), vision) {
            (true, true) => &["text_encoder", "tokenizer", "processor"],
            (true, false) => &["text_encoder", "tokenizer"],
            (false, true) => &["text_encoder", "processor"],
            (false, false) => &["text_encoder"],
        };
        let digest = component_digest(snapshot, dirs, file, &extra)
            .map_err(|e| format!("cannot read the text encoder's files: {e}"))?;
        let model_id = match (snapshot, file) {
            (Some(dir), _) => file_label(dir),
            (None, Some(f)) => file_label(f),
            (None, None) => String::new(),
        };
        Ok(Preparation {
            state: TextEncoderState {
                weights,
                config: tconfig,
                tokenizer_dir,
                model_id: model_id.clone(),
                vision_snapshot: snapshot.filter(|_| vision).map(Path::to_path_buf),
            },
            description: StageDescription {
                model_id: if snapshot.is_some() {
                    String::new()
                } else {
                    model_id
                },
                weights_format,
                text_encoder: Some(TextEncoderDescription {
                    digest,
                    hidden_size: text.hidden_size as u32,
                    max_sequence_length: validate::MAX_SEQUENCE_LENGTH as u32,
                    default_max_sequence_length: validate::DEFAULT_MAX_SEQUENCE_LENGTH as u32,
                    vision,
                }),
                limits: Some(StageLimits {
                    max_batch: validate::MAX_PROMPTS as u32,
                    max_batched_requests: 1,
                    max_side_px: 0,
                    // Prompts have no pixels: not bounded by --max-pixels.
                    max_pixels: 0,
                }),
                ..Default::default()
            },
        })
    }

    fn load(
        config: &TextEncoderConfig,
        state: &TextEncoderState,
    ) -> Result<model::LoadedModel, String> {
        model::load(config, state).map_err(|e| first_line(&e))
    }

    fn weights(model: &model::LoadedModel) -> Vec<WeightsUsage> {
        memory::usage("text_encoder", model.memory.entries())
    }

    fn probe(model: &mut model::LoadedModel) -> Result<(), String> {
        model::warm_up(model).map_err(|e| first_line(&e))
    }

    fn routes(
        routes: Routes,
        handle: StageHandle<model::LoadedModel>,
        _state: TextEncoderState,
    ) -> Routes {
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
    listener: impl Into<qwen_image_common::tls::Listeners>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StageError> {
    qwen_image_common::stage::run::<TextEncoder>(config, listener, shutdown).await
}
