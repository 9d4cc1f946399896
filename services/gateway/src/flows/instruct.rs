//! Instruction editing (diffusers `QwenImageEditPlusPipeline`): the prompt (and, with CFG, the negative
//! prompt) encoded with the condition-size pictures; each VAE-size picture encoded to its posterior mode
//! (`sample_mode="argmax"`: no generator draw) as reference latents; the seed's noise (the generator's only
//! draw, `prepare_latents`); the denoiser appends the references after the noise tokens; decode.

use qwen_image_imaging::Image8;
use qwen_image_proto::v1::{GenerateResult, Image};

use crate::error::GatewayError;
use crate::pipeline::decode::{self, Finish};
use crate::pipeline::denoise::{self, Start};
use crate::pipeline::{Ctx, image_latents, prompts, seeded_noise};
use crate::request::instruct::InstructParams;

fn wire(p: &Image8) -> Image {
    Image {
        width_px: p.width as u32,
        height_px: p.height as u32,
        rgb8: p.data.clone().into(),
    }
}

pub async fn run(ctx: &Ctx<'_>, p: &InstructParams) -> Result<GenerateResult, GatewayError> {
    let s = &p.settings;
    let pictures: Vec<Image> = p.condition.iter().map(wire).collect();
    let references = async {
        let mut out = Vec::with_capacity(p.vae.len());
        for picture in &p.vae {
            out.push(image_latents::encode(ctx, picture, None).await?);
        }
        Ok::<_, GatewayError>(out)
    };
    let (prompts, references) =
        tokio::join!(prompts::encode_with_pictures(ctx, s, &pictures), references);
    let (prompts, references) = (prompts?, references?);
    let model_id = prompts.model_id.clone();
    let truncation = prompts.truncation;
    let start = Start {
        latents: seeded_noise(s, &ctx.geometry)?,
        start_noise: None,
        start_step: 0,
        inpaint: None,
        control: Vec::new(),
    };
    let latents = denoise::run_with_references(ctx, s, prompts, start, references).await?;
    let sizes: Vec<String> = p
        .condition
        .iter()
        .zip(&p.vae)
        .map(|(c, v)| format!("{}x{}/{}x{}", c.width, c.height, v.width, v.height))
        .collect();
    let finish = Finish {
        truncation,
        chunks: vec![
            ("mode".into(), "edit".into()),
            ("edit_pictures".into(), p.vae.len().to_string()),
            ("edit_picture_sizes".into(), sizes.join(" ")),
        ],
        ..Finish::default()
    };
    decode::finish(ctx, s, model_id, latents, finish).await
}
