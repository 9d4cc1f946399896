//! The prompt encoder the worker thread owns: loading and warm-up. The only file that touches the
//! model crate's text-encoder API.

use candle_core::{DType, Tensor};
use qwen_image_common::stage::ComputeDtype;
use qwen_image_model::edit_prompt::EditPromptEncoder;
use qwen_image_model::prompt::{EncodedPrompts, PromptEncoder};
use qwen_image_model::source::{self, LoadOptions};
use qwen_image_model::weights::MemoryReport;

use crate::cache::EmbeddingCache;
use crate::{TextEncoderConfig, TextEncoderState};

/// Encoder living on the worker thread.
pub struct LoadedModel {
    pub encoder: PromptEncoder,
    /// Identifier reported in responses (the snapshot directory's name, or the weights file's).
    pub model_id: String,
    /// The text model's resident weights, by format.
    pub memory: MemoryReport,
    /// Prompt embeddings already computed by this model.
    pub cache: EmbeddingCache,
    /// Prompts with pictures (instruction editing): the processor and vision tower over the same language
    /// model; `None` when the snapshot has no processor or vision weights.
    pub edit: Option<EditPromptEncoder>,
}

/// Loads tokenizer and text encoder (from the snapshot or `--text-encoder-weights` / `--tokenizer`) and
/// encodes one short prompt (warm-up). Runs on the worker.
pub fn load(cfg: &TextEncoderConfig, state: &TextEncoderState) -> candle_core::Result<LoadedModel> {
    let (device, dtype) = qwen_image_model::device::open(
        cfg.device.cuda_ordinal(),
        cfg.device.compute_dtype() == ComputeDtype::Bf16,
    )?;
    let loaded = source::load_prompt_encoder(
        &state.weights,
        &state.config,
        &state.tokenizer_dir,
        &LoadOptions::new(dtype, &device),
    )?;
    let edit = match &state.vision_snapshot {
        Some(dir) => Some(crate::vision::load(dir, &loaded.model, dtype, &device)?),
        None => None,
    };
    let model = LoadedModel {
        edit,
        encoder: loaded.model,
        model_id: state.model_id.clone(),
        memory: loaded.memory,
        cache: EmbeddingCache::new(cfg.own.embedding_cache_mb.saturating_mul(1 << 20)),
    };
    warm_up(&model)?;
    Ok(model)
}

/// Encodes one short prompt and checks the embeddings are finite.
pub fn warm_up(m: &LoadedModel) -> candle_core::Result<()> {
    let warm = m.encoder.encode(&["warm-up"], 16)?;
    let sum = warm
        .embeds
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if !sum.is_finite() {
        candle_core::bail!("warm-up produced non-finite embeddings");
    }
    Ok(())
}

/// Token count of each prompt (template suffix included), before truncation.
pub fn token_counts(m: &LoadedModel, prompts: &[&str]) -> candle_core::Result<Vec<usize>> {
    m.encoder.token_counts(prompts)
}

pub fn encode(
    m: &LoadedModel,
    prompts: &[&str],
    max_sequence_length: usize,
) -> candle_core::Result<EncodedPrompts> {
    m.encoder.encode(prompts, max_sequence_length)
}

/// Host copy of a `[B, L, D]` / `[B, L]` tensor as f32: (shape, data).
pub fn host_f32(t: &Tensor) -> candle_core::Result<(Vec<usize>, Vec<f32>)> {
    let shape = t.dims().to_vec();
    Ok((
        shape,
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
    ))
}
