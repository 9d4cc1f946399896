//! Text to image (diffusers QwenImagePipeline): encode prompt(s) → seeded noise → denoise → decode.

use qwen_image_proto::v1::GenerateResult;

use crate::error::GatewayError;
use crate::pipeline::decode::{self, Finish};
use crate::pipeline::denoise::{self, Start};
use crate::pipeline::{Ctx, prompts, seeded_noise};
use crate::request::t2i::T2iParams;

pub async fn run(ctx: &Ctx<'_>, p: &T2iParams) -> Result<GenerateResult, GatewayError> {
    let s = &p.settings;
    let prompts = prompts::encode(ctx, s).await?;
    let model_id = prompts.model_id.clone();
    let truncation = prompts.truncation;
    // The caller's start latents, or the seed's noise.
    let latents = match &p.initial_latents {
        Some(t) => t.clone(),
        None => seeded_noise(s, &ctx.geometry)?,
    };
    let start = Start {
        latents,
        start_noise: None,
        start_step: 0,
        inpaint: None,
        control: Vec::new(),
    };
    let latents = denoise::run(ctx, s, prompts, start).await?;
    let finish = Finish {
        truncation,
        ..Finish::default()
    };
    decode::finish(ctx, s, model_id, latents, finish).await
}
