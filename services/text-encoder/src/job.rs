//! The Encode work on the worker thread.

use qwen_image_common::stage::StageError;
use qwen_image_common::tensor;
use qwen_image_model::interrupt;
use qwen_image_model::nn::all_finite;
use qwen_image_model::snapshot::first_line;
use qwen_image_proto::v1::EncodeResponse;

use crate::model::{self, LoadedModel};
use crate::validate::EncodeInputs;

fn internal(e: candle_core::Error) -> StageError {
    let msg = first_line(&e);
    if !interrupt::is_interrupted(&e) {
        tracing::error!(error = %msg, "encoding failed");
    }
    StageError::Model(msg)
}

pub fn encode(model: &LoadedModel, inputs: &EncodeInputs) -> Result<EncodeResponse, StageError> {
    let prompts: Vec<&str> = inputs.prompts.iter().map(String::as_str).collect();
    let max = inputs.max_sequence_length;
    if !inputs.truncate {
        let counts = model::token_counts(model, &prompts).map_err(internal)?;
        if let Some(i) = counts.iter().position(|&n| n > max) {
            return Err(StageError::InvalidArgument(format!(
                "`prompts[{i}]` is {} tokens long (template suffix included), more than max_sequence_length {max}; \
                 shorten it, raise max_sequence_length (up to 1024) or set overlong_policy TRUNCATE",
                counts[i]
            )));
        }
    }
    let enc = model::encode(model, &prompts, max).map_err(internal)?;
    if !all_finite(&enc.embeds).map_err(internal)? {
        return Err(StageError::non_finite_output("prompt embeddings"));
    }
    let (shape, embeds) = model::host_f32(&enc.embeds).map_err(internal)?;
    let (mask_shape, mask) = model::host_f32(&enc.mask).map_err(internal)?;
    let mask_u8: Vec<u8> = mask.iter().map(|&v| u8::from(v >= 0.5)).collect();
    Ok(EncodeResponse {
        prompt_embeds: Some(tensor::from_f32(&shape, &embeds)),
        prompt_embeds_mask: Some(tensor::from_u8(&mask_shape, mask_u8)),
        mask_all_ones: enc.mask_all_ones,
        token_counts: enc.token_counts.iter().map(|&n| n as u32).collect(),
        truncated: enc.truncated,
        model_id: model.model_id.clone(),
    })
}
