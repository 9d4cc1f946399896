//! The prompt encoder the worker thread owns: loading and warm-up. The only file that touches the
//! model crate's text-encoder API.

use candle_core::{DType, Tensor};
use qwen_image_common::stage::ComputeDtype;
use qwen_image_model::prompt::{EncodedPrompts, PromptEncoder};
use qwen_image_model::snapshot::Snapshot;

use crate::TextEncoderConfig;
use crate::cache::EmbeddingCache;

/// Encoder living on the worker thread.
pub struct LoadedModel {
    pub encoder: PromptEncoder,
    /// Identifier reported in responses (the snapshot directory's name).
    pub model_id: String,
    /// Prompt embeddings already computed by this model.
    pub cache: EmbeddingCache,
}

/// Loads tokenizer and text encoder and encodes one short prompt (warm-up). Runs on the worker.
pub fn load(cfg: &TextEncoderConfig) -> candle_core::Result<LoadedModel> {
    let (device, dtype) = qwen_image_model::device::open(
        cfg.device.cuda_ordinal(),
        cfg.device.compute_dtype() == ComputeDtype::Bf16,
    )?;
    let snapshot = Snapshot::open(&cfg.model_dir)?;
    let encoder = PromptEncoder::load(&snapshot, dtype, &device)?;
    let model_id = cfg
        .model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| cfg.model_dir.display().to_string());
    let model = LoadedModel {
        encoder,
        model_id,
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
