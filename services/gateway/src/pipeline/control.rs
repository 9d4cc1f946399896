//! The ControlNet run both ControlNet flows make (diffusers QwenImageControlNetPipeline /
//! QwenImageControlNetInpaintPipeline): prompts and the control picture's latents concurrently, the
//! posterior noise and the initial noise in diffusers' order, denoise with the ControlInput, decode.

use qwen_image_common::randn::TorchCpuGenerator;
use qwen_image_imaging::Image8;
use qwen_image_proto::v1::{ControlInput, GenerateResult, Tensor};

use super::decode::{self, Finish};
use super::denoise::{self, Start};
use super::{Ctx, draw, image_latents, prompts};
use crate::error::GatewayError;
use crate::request::Settings;
use crate::request::control::ControlOptions;

/// What a ControlNet flow sends besides the prompt part.
pub struct ControlFlow<'a> {
    /// The control picture at the output size, RGB8, as the VAE encodes it.
    pub image: &'a Image8,
    pub options: &'a ControlOptions,
    /// Inpainting ControlNet: the mask on the latent grid `[B, 1, h, w]`, 1 = regenerate.
    pub latent_mask: Option<Tensor>,
    /// `true`: the posterior noise is the request generator's first draw, the initial noise its second
    /// (QwenImageControlNetPipeline). `false`: the posterior noise comes from a second generator seeded with
    /// the same seed (QwenImageControlNetInpaintPipeline samples with torch's default generator).
    pub eps_from_request_generator: bool,
    /// Extra PNG text chunks.
    pub chunks: Vec<(String, String)>,
}

pub async fn run(
    ctx: &Ctx<'_>,
    p: &Settings,
    f: &ControlFlow<'_>,
) -> Result<GenerateResult, GatewayError> {
    let g = &ctx.geometry;
    let (h, w) = p.latent_hw(g);
    if (
        h * g.vae_scale_factor as usize,
        w * g.vae_scale_factor as usize,
    ) != (f.image.height, f.image.width)
    {
        return Err(GatewayError::Internal("control image size mismatch".into()));
    }
    // The control image repeated to the batch is sampled with one draw over [B, C, 1, h, w] (diffusers'
    // retrieve_latents on the repeated image), then the initial noise [B, 1, C, h, w].
    let batch = p.num_images as usize;
    let eps_shape = [batch, g.latent_channels, 1, h, w];
    let mut generator = TorchCpuGenerator::new(p.seed);
    let eps = if f.eps_from_request_generator {
        draw(&mut generator, &eps_shape)?
    } else {
        draw(&mut TorchCpuGenerator::new(p.seed), &eps_shape)?
    };
    let noise = draw(&mut generator, &p.noise_shape(g))?;

    let (prompts, control) = tokio::join!(
        prompts::encode(ctx, p),
        image_latents::encode(ctx, f.image, Some(eps))
    );
    let (mut prompts, control) = (prompts?, control?);
    let model_id = std::mem::take(&mut prompts.model_id);
    let truncation = prompts.truncation;
    let start = Start {
        latents: noise,
        start_noise: None,
        start_step: 0,
        inpaint: None,
        control: vec![ControlInput {
            controlnet_id: f.options.controlnet_id.clone(),
            control_latents: Some(control),
            conditioning_scale: f.options.conditioning_scale,
            guidance_start: f.options.guidance_start,
            guidance_end: f.options.guidance_end,
            mask: f.latent_mask.clone(),
        }],
    };
    let final_latents = denoise::run(ctx, p, prompts, start).await?;
    let finish = Finish {
        chunks: f.chunks.to_vec(),
        truncation,
        ..Default::default()
    };
    decode::finish(ctx, p, model_id, final_latents, finish).await
}
