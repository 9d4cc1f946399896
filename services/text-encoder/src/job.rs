//! One Encode job on the worker thread.

use std::time::Instant;

use qwen_image_common::metric_names as m;
use qwen_image_common::queue::Slot;
use qwen_image_common::tensor;
use qwen_image_model::snapshot::first_line;
use qwen_image_proto::v1::EncodeResponse;
use tokio::sync::oneshot;

use crate::error::TextEncoderError;
use crate::model::{self, LoadedModel};
use crate::validate::EncodeInputs;

const SERVICE: &str = "text-encoder";

/// What the gRPC handler hands the worker.
pub struct EncodeJob {
    pub inputs: EncodeInputs,
    pub reply: oneshot::Sender<Result<EncodeResponse, TextEncoderError>>,
    pub deadline: Option<Instant>,
}

/// Runs the job and replies. Releases `slot` before replying.
pub fn run(model: &LoadedModel, job: EncodeJob, slot: Slot) {
    let started = Instant::now();
    if job.reply.is_closed() {
        tracing::info!("caller went away before the job started");
        metrics::counter!(m::JOBS_STOPPED_TOTAL, "service" => SERVICE, "outcome" => m::OUTCOME_CANCELLED).increment(1);
        return;
    }
    let result = if job.deadline.is_some_and(|d| started >= d) {
        Err(TextEncoderError::DeadlineExceeded)
    } else {
        encode(model, &job.inputs)
    };
    let outcome = match &result {
        Ok(_) => m::OUTCOME_OK,
        Err(TextEncoderError::DeadlineExceeded) => m::OUTCOME_DEADLINE_EXCEEDED,
        Err(_) => m::OUTCOME_ERROR,
    };
    metrics::histogram!(m::JOB_SECONDS, "service" => SERVICE, "rpc" => "Encode", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    slot.release();
    let _ = job.reply.send(result);
}

fn encode(model: &LoadedModel, inputs: &EncodeInputs) -> Result<EncodeResponse, TextEncoderError> {
    let internal = |e: candle_core::Error| {
        let msg = first_line(&e);
        tracing::error!(error = %msg, "encoding failed");
        TextEncoderError::Model(msg)
    };
    let prompts: Vec<&str> = inputs.prompts.iter().map(String::as_str).collect();
    let max = inputs.max_sequence_length;
    if !inputs.truncate {
        let counts = model::token_counts(model, &prompts).map_err(internal)?;
        if let Some(i) = counts.iter().position(|&n| n > max) {
            return Err(TextEncoderError::InvalidArgument(format!(
                "`prompts[{i}]` is {} tokens long (template suffix included), more than max_sequence_length {max}; \
                 shorten it, raise max_sequence_length (up to 1024) or set overlong_policy TRUNCATE",
                counts[i]
            )));
        }
    }
    let enc = model::encode(model, &prompts, max).map_err(internal)?;
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
