//! ControlNet inpaint (diffusers QwenImageControlNetInpaintPipeline, denoiser-and-pipelines.md §10): the
//! masked picture's latents with the inverted latent mask as the ControlNet's extra channel (the denoiser
//! appends `1 - mask`), from pure noise.

use qwen_image_common::tensor;
use qwen_image_proto::v1::GenerateResult;

use crate::error::GatewayError;
use crate::pipeline::Ctx;
use crate::pipeline::control::{self, ControlFlow};
use crate::request::cn_inpaint::CnInpaintParams;

pub async fn run(ctx: &Ctx<'_>, pp: &CnInpaintParams) -> Result<GenerateResult, GatewayError> {
    let batch = pp.settings.num_images as usize;
    let (lh, lw) = pp.settings.latent_hw(&ctx.geometry);
    let mask: Vec<f32> = std::iter::repeat_n(pp.latent_mask.iter().copied(), batch)
        .flatten()
        .collect();
    let flow = ControlFlow {
        image: &pp.masked_image,
        options: &pp.options,
        latent_mask: Some(tensor::from_f32(&[batch, 1, lh, lw], &mask)),
        eps_from_request_generator: false,
        chunks: pp.options.chunks(("control_mode", "inpaint")),
    };
    control::run(ctx, &pp.settings, &flow).await
}
