//! One Decode or Encode job on the worker thread.

use std::time::Instant;

use qwen_image_common::metric_names as m;
use qwen_image_common::queue::Slot;
use qwen_image_common::tensor;
use qwen_image_model::snapshot::first_line;
use qwen_image_proto::v1::{DecodeResponse, EncodeImageResponse, Image};
use tokio::sync::oneshot;

use crate::error::VaeError;
use crate::model::{self, LoadedModel};
use crate::validate::{DecodeInputs, EncodeInputs};

const SERVICE: &str = "vae";

type Reply<T> = oneshot::Sender<Result<T, VaeError>>;

/// What the gRPC handlers hand the worker.
pub enum VaeJob {
    Decode {
        inputs: DecodeInputs,
        reply: Reply<DecodeResponse>,
        deadline: Option<Instant>,
    },
    Encode {
        inputs: EncodeInputs,
        reply: Reply<EncodeImageResponse>,
        deadline: Option<Instant>,
    },
}

/// Runs the job and replies. Releases `slot` before replying.
pub fn run(model: &LoadedModel, job: VaeJob, slot: Slot) {
    match job {
        VaeJob::Decode {
            inputs,
            reply,
            deadline,
        } => answer("Decode", reply, deadline, slot, || decode(model, &inputs)),
        VaeJob::Encode {
            inputs,
            reply,
            deadline,
        } => answer("Encode", reply, deadline, slot, || encode(model, &inputs)),
    }
}

fn answer<T>(
    rpc: &'static str,
    reply: Reply<T>,
    deadline: Option<Instant>,
    slot: Slot,
    work: impl FnOnce() -> Result<T, VaeError>,
) {
    let started = Instant::now();
    if reply.is_closed() {
        tracing::info!("caller went away before the job started");
        metrics::counter!(m::JOBS_STOPPED_TOTAL, "service" => SERVICE, "outcome" => m::OUTCOME_CANCELLED).increment(1);
        return;
    }
    let result = if deadline.is_some_and(|d| started >= d) {
        Err(VaeError::DeadlineExceeded)
    } else {
        work()
    };
    let outcome = match &result {
        Ok(_) => m::OUTCOME_OK,
        Err(VaeError::DeadlineExceeded) => m::OUTCOME_DEADLINE_EXCEEDED,
        Err(_) => m::OUTCOME_ERROR,
    };
    metrics::histogram!(m::JOB_SECONDS, "service" => SERVICE, "rpc" => rpc, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    slot.release();
    let _ = reply.send(result);
}

fn internal(e: candle_core::Error) -> VaeError {
    let msg = first_line(&e);
    tracing::error!(error = %msg, "VAE failed");
    VaeError::Model(msg)
}

fn decode(model: &LoadedModel, inputs: &DecodeInputs) -> Result<DecodeResponse, VaeError> {
    let image = model::decode(model, &inputs.latents).map_err(internal)?; // [B, 3, H, W]
    let (_, _, h, w) = image.dims4().map_err(internal)?;
    let images = model::rgb8(&image)
        .map_err(internal)?
        .into_iter()
        .map(|rgb| Image {
            width_px: w as u32,
            height_px: h as u32,
            rgb8: rgb.into(),
        })
        .collect();
    let decoded = if inputs.return_float {
        let (shape, data) = model::host_f32(&image).map_err(internal)?;
        Some(tensor::from_f32(&shape, &data))
    } else {
        None
    };
    Ok(DecodeResponse { images, decoded })
}

fn encode(model: &LoadedModel, inputs: &EncodeInputs) -> Result<EncodeImageResponse, VaeError> {
    let (mean, logvar) = model::encode(model, &inputs.images, inputs.width_px, inputs.height_px)
        .map_err(internal)?;
    let (shape, mean) = model::host_f32(&mean).map_err(internal)?;
    let (lshape, logvar) = model::host_f32(&logvar).map_err(internal)?;
    let cfg = model.vae.config();
    Ok(EncodeImageResponse {
        mean: Some(tensor::from_f32(&shape, &mean)),
        logvar: Some(tensor::from_f32(&lshape, &logvar)),
        latents_mean: cfg.latents_mean.iter().map(|&v| v as f32).collect(),
        latents_std: cfg.latents_std.iter().map(|&v| v as f32).collect(),
    })
}
