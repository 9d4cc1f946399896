//! Reference latents of instruction editing (diffusers `QwenImageEditPlusPipeline`): the checks of
//! `DenoiseRequest.reference_latents` and their packing for the model crate's `denoise_with_references`
//! (appended after the noise tokens, one `img_shapes` entry `(1, h/2, w/2)` each).

use candle_core::Device;
use qwen_image_common::stage::StageError;
use qwen_image_common::tensor::HostTensor;
use qwen_image_model::edit::ReferenceLatents;
use qwen_image_proto::v1::DenoiseRequest;

use crate::validate::ModelShape;

/// Most reference pictures per request (the Edit-2509 / -2511 cards: one to three input images).
pub const MAX_REFERENCES: usize = 3;

/// Checks `reference_latents`: at most [`MAX_REFERENCES`], each one unpacked latent of the model's
/// channels with an even grid; not combined with ControlNets or inpaint blending.
pub fn validate(
    req: &DenoiseRequest,
    model: ModelShape,
) -> Result<Vec<HostTensor<f32>>, StageError> {
    let n = req.reference_latents.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    if n > MAX_REFERENCES {
        return Err(StageError::InvalidArgument(format!(
            "`reference_latents` has {n} tensors; send at most {MAX_REFERENCES} (one per input picture)"
        )));
    }
    if !req.control.is_empty() || req.inpaint.is_some() {
        return Err(StageError::InvalidArgument(
            "`reference_latents` cannot be combined with `control` or `inpaint`; send one or the other".into(),
        ));
    }
    req.reference_latents
        .iter()
        .enumerate()
        .map(|(k, t)| crate::validate::latents_of(t, &format!("reference_latents[{k}]"), model, 1))
        .collect()
}

/// Latent cells of the references (counted against `--max-pixels` with the noise latents).
pub fn cells(refs: &[HostTensor<f32>]) -> usize {
    refs.iter().map(|r| r.shape[2] * r.shape[3]).sum()
}

/// The checked references as the model crate's packed [`ReferenceLatents`] (`None` without references).
pub fn to_model(
    refs: &[HostTensor<f32>],
    device: &Device,
) -> candle_core::Result<Option<ReferenceLatents>> {
    if refs.is_empty() {
        return Ok(None);
    }
    let zs = refs
        .iter()
        .map(|h| candle_core::Tensor::from_slice(&h.data, h.shape.as_slice(), device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    ReferenceLatents::from_unpacked(&zs).map(Some)
}
