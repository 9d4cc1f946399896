//! The Decode and Encode work on the worker thread.

use qwen_image_common::stage::StageError;
use qwen_image_common::tensor;
use qwen_image_model::interrupt;
use qwen_image_model::nn::all_finite;
use qwen_image_model::snapshot::first_line;
use qwen_image_proto::v1::{DecodeResponse, EncodeImageResponse, Image};

use crate::model::{self, LoadedModel};
use crate::validate::{DecodeInputs, EncodeInputs};

fn internal(e: candle_core::Error) -> StageError {
    let msg = first_line(&e);
    if !interrupt::is_interrupted(&e) {
        tracing::error!(error = %msg, "VAE failed");
    }
    StageError::Model(msg)
}

pub fn decode(model: &LoadedModel, inputs: &DecodeInputs) -> Result<DecodeResponse, StageError> {
    let image = model::decode(model, &inputs.latents).map_err(internal)?; // [B, 3, H, W]
    if !all_finite(&image).map_err(internal)? {
        return Err(StageError::non_finite_output("decoded image"));
    }
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

pub fn encode(
    model: &LoadedModel,
    inputs: &EncodeInputs,
) -> Result<EncodeImageResponse, StageError> {
    let latents = model::encode(
        model,
        &inputs.images,
        inputs.width_px,
        inputs.height_px,
        inputs.noise.as_ref(),
    )
    .map_err(internal)?;
    if !all_finite(&latents).map_err(internal)? {
        return Err(StageError::non_finite_output("latents"));
    }
    let (shape, data) = model::host_f32(&latents).map_err(internal)?;
    Ok(EncodeImageResponse {
        latents: Some(tensor::from_f32(&shape, &data)),
    })
}
