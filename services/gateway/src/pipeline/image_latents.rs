//! A picture to normalised latents on the VAE stage, sampled with the request's posterior noise (drawn by
//! the flow in diffusers' order); the VAE owns the maths (sample and normalisation).

use qwen_image_common::tensor;
use qwen_image_imaging::Image8;
use qwen_image_proto::v1::{DataType, EncodeImageRequest, Image, Stage, Tensor};

use super::{Ctx, phase};
use crate::error::{GatewayError, StageName};
use crate::stages::Patience;

/// Encodes `image` with `noise` (`[N, C, 1, h, w]`; `None` = the posterior mean) and returns the latents
/// `[N, C, 1, h, w]`, checked against the model's geometry.
pub async fn encode(
    ctx: &Ctx<'_>,
    image: &Image8,
    noise: Option<Tensor>,
) -> Result<Tensor, GatewayError> {
    ctx.progress(Stage::EncodeImage, 0, 0).await;
    let g = &ctx.geometry;
    let (h, w) = g.latent_hw(image.width as u32, image.height as u32);
    let rows = noise
        .as_ref()
        .and_then(|t| t.shape.first())
        .map_or(1, |&n| n as usize);
    let request = EncodeImageRequest {
        images: vec![Image {
            width_px: image.width as u32,
            height_px: image.height as u32,
            rgb8: image.data.clone().into(),
        }],
        posterior_noise: noise,
    };
    let resp = phase(
        "encode_image",
        StageName::Vae,
        "Encode",
        ctx.stages
            .encode_image(request, ctx.deadline, Patience::Wait(ctx)),
    )
    .await?;
    let bad = |d: String| GatewayError::bad_response(StageName::Vae, d);
    let latents = resp.latents.ok_or_else(|| bad("no latents".into()))?;
    let host = tensor::to_f32(&latents, "latents", &[DataType::F32], &[5])
        .map_err(|e| bad(e.to_string()))?;
    let expected = [rows, g.latent_channels, 1, h, w];
    if host.shape != expected {
        return Err(bad(format!(
            "latents have shape {:?}, expected {expected:?}",
            host.shape
        )));
    }
    Ok(latents)
}
