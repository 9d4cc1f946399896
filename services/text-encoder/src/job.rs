//! The Encode work on the worker thread: each prompt from the embedding cache or encoded alone (as
//! diffusers' `encode_prompt` encodes the prompt and the negative prompt in calls of their own), then the
//! batch padded to its longest prompt with the mask, as `_get_qwen_prompt_embeds` pads.

use qwen_image_common::stage::StageError;
use qwen_image_common::tensor;
use qwen_image_model::interrupt;
use qwen_image_model::nn::all_finite;
use qwen_image_model::prompt::EncodedPrompts;
use qwen_image_model::snapshot::first_line;
use qwen_image_proto::v1::EncodeResponse;

use crate::cache::PromptRows;
use crate::model::{self, LoadedModel};
use crate::validate::EncodeInputs;

fn internal(e: candle_core::Error) -> StageError {
    let msg = first_line(&e);
    if !interrupt::is_interrupted(&e) {
        tracing::error!(error = %msg, "encoding failed");
    }
    StageError::Model(msg)
}

/// One prompt through the text model: its rows, token count and truncation.
fn encode_one(m: &LoadedModel, prompt: &str, max: usize) -> Result<PromptRows, StageError> {
    rows_of(model::encode(m, &[prompt], max).map_err(internal)?)
}

/// One encoded prompt's rows on the host; never answered, nor cached, with NaN or infinity in it.
fn rows_of(enc: EncodedPrompts) -> Result<PromptRows, StageError> {
    if !all_finite(&enc.embeds).map_err(internal)? {
        return Err(StageError::non_finite_output("prompt embeddings"));
    }
    let (shape, values) = model::host_f32(&enc.embeds).map_err(internal)?;
    Ok(PromptRows {
        values,
        rows: shape[1],
        token_count: enc.token_counts[0],
        truncated: enc.truncated[0],
    })
}

/// One prompt with pictures through the Edit encoder (no truncation, no cache).
fn encode_with_pictures(
    m: &LoadedModel,
    prompt: &str,
    inputs: &EncodeInputs,
) -> Result<PromptRows, StageError> {
    let edit = m.edit.as_ref().ok_or_else(|| {
        StageError::FailedPrecondition(
            "this text encoder cannot encode prompts with pictures (its snapshot has no `processor/` folder or \
             no vision tower weights); start it with a Qwen-Image-Edit snapshot (--model)"
                .into(),
        )
    })?;
    rows_of(crate::vision::encode(edit, prompt, &inputs.images).map_err(internal)?)
}

/// Prompts with pictures (instruction editing): each prompt encoded alone with every picture.
fn encode_edit(m: &LoadedModel, inputs: &EncodeInputs) -> Result<EncodeResponse, StageError> {
    if let Some(edit) = &m.edit {
        crate::vision::check_pictures(edit, &inputs.images)?;
    }
    let all = inputs
        .prompts
        .iter()
        .map(|p| encode_with_pictures(m, p, inputs))
        .collect::<Result<Vec<_>, _>>()?;
    let from_cache = vec![false; all.len()];
    Ok(assemble(m, &all, from_cache))
}

pub fn encode(m: &mut LoadedModel, inputs: &EncodeInputs) -> Result<EncodeResponse, StageError> {
    if !inputs.images.is_empty() {
        return encode_edit(m, inputs);
    }
    let max = inputs.max_sequence_length;
    let cached: Vec<Option<PromptRows>> =
        inputs.prompts.iter().map(|p| m.cache.get(p, max)).collect();
    if !inputs.truncate {
        for (i, (p, c)) in inputs.prompts.iter().zip(&cached).enumerate() {
            let count = match c {
                Some(rows) => rows.token_count,
                None => model::token_counts(m, &[p.as_str()]).map_err(internal)?[0],
            };
            if count > max {
                return Err(StageError::InvalidArgument(format!(
                    "`prompts[{i}]` is {count} tokens long (template suffix included), more than max_sequence_length \
                     {max}; shorten it, raise max_sequence_length (up to 1024) or set overlong_policy TRUNCATE"
                )));
            }
        }
    }
    let mut from_cache = Vec::with_capacity(cached.len());
    let mut all = Vec::with_capacity(cached.len());
    for (p, c) in inputs.prompts.iter().zip(cached) {
        from_cache.push(c.is_some());
        let rows = match c {
            Some(rows) => rows,
            None => {
                let rows = encode_one(m, p, max)?;
                m.cache.insert(p, max, rows.clone());
                rows
            }
        };
        all.push(rows);
    }
    Ok(assemble(m, &all, from_cache))
}

/// The batch padded to its longest prompt with the mask, as `_get_qwen_prompt_embeds` pads.
fn assemble(m: &LoadedModel, all: &[PromptRows], from_cache: Vec<bool>) -> EncodeResponse {
    let hidden = m.encoder.hidden_size();
    let width = all.iter().map(|r| r.rows).max().unwrap_or(0);
    let mut embeds = vec![0f32; all.len() * width * hidden];
    let mut mask = vec![0u8; all.len() * width];
    for (i, r) in all.iter().enumerate() {
        embeds[i * width * hidden..][..r.values.len()].copy_from_slice(&r.values);
        mask[i * width..][..r.rows].fill(1);
    }
    EncodeResponse {
        prompt_embeds: Some(tensor::from_f32(&[all.len(), width, hidden], &embeds)),
        prompt_embeds_mask: Some(tensor::from_u8(&[all.len(), width], mask)),
        mask_all_ones: all.iter().all(|r| r.rows == width),
        token_counts: all.iter().map(|r| r.token_count as u32).collect(),
        truncated: all.iter().map(|r| r.truncated).collect(),
        model_id: m.model_id.clone(),
        from_cache,
    }
}
