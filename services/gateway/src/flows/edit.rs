//! Image to image, inpaint and outpaint (diffusers QwenImageImg2ImgPipeline and QwenImageInpaintPipeline;
//! outpaint = inpaint of a larger canvas). The generator's draws in diffusers' order (image posterior
//! noise, initial noise, the unused masked-image noise); the VAE stage samples and normalises the image
//! latents with the first; the denoiser mixes image latents and noise at `sigma[t_start]` and, for
//! inpaint, blends after every step.

use qwen_image_common::tensor;
use qwen_image_proto::v1::{GenerateResult, InpaintInputs, Padding, Tensor};

use crate::error::{GatewayError, StageName};
use crate::images;
use crate::pipeline::decode::{self, Finish};
use crate::pipeline::denoise::{self, Start};
use crate::pipeline::{Ctx, image_latents, prompts};
use crate::request::edit::{EditParams, draws};

pub async fn run(ctx: &Ctx<'_>, p: &EditParams) -> Result<GenerateResult, GatewayError> {
    let s = &p.settings;
    let g = ctx.geometry;
    let batch = s.num_images as usize;
    let (h, w) = s.latent_hw(&g);
    let one = [1, g.latent_channels, 1, h, w];
    let shape = [batch, g.latent_channels, 1, h, w];
    let d = draws(p, &g)?;
    let eps = tensor::from_f32(&one, &d.image_eps);
    let (prompts, latents) = tokio::join!(
        prompts::encode(ctx, s),
        image_latents::encode(ctx, &p.image, Some(eps))
    );
    let (prompts, latents) = (prompts?, latents?);
    let model_id = prompts.model_id.clone();
    let truncation = prompts.truncation;

    // One image sampled, then repeated to the batch (diffusers' prepare_latents).
    let image_latents = repeat(&latents, batch)?;
    let noise = tensor::from_f32(&shape, &d.noise);
    let inpaint = p.mask.as_ref().map(|m| {
        let one: Vec<f32> = (0..g.latent_channels)
            .flat_map(|_| m.latent.iter().map(|&v| f32::from(v)))
            .collect();
        InpaintInputs {
            image_latents: Some(image_latents.clone()),
            noise: Some(noise.clone()),
            mask: Some(tensor::from_f32(&shape, &one.repeat(batch))),
        }
    });
    let start = Start {
        latents: image_latents,
        start_noise: Some(noise),
        start_step: p.start_step,
        inpaint,
        control: Vec::new(),
    };
    let latents = denoise::run(ctx, s, prompts, start).await?;

    let keep = |rgb8: &mut [u8]| -> Result<(), String> {
        match &p.mask {
            Some(m) => images::paste_back(rgb8, &p.image, &m.pixels),
            None => Ok(()),
        }
    };
    let mut chunks = vec![
        ("mode".to_string(), p.mode.as_str().to_string()),
        ("strength".to_string(), p.strength.to_string()),
    ];
    let padding = p.padding.map(|pad| Padding {
        left_px: pad.left,
        right_px: pad.right,
        top_px: pad.top,
        bottom_px: pad.bottom,
    });
    if let Some(pad) = p.padding {
        chunks.push((
            "outpaint_padding".into(),
            format!(
                "left={} right={} top={} bottom={}",
                pad.left, pad.right, pad.top, pad.bottom
            ),
        ));
    }
    if p.paste_back {
        chunks.push(("paste_back".into(), "true".into()));
    }
    let finish = Finish {
        truncation,
        chunks,
        a1111_settings: vec![("Denoising strength".into(), p.strength.to_string())],
        strength: Some(p.strength),
        padding,
        post: if p.paste_back && p.mask.is_some() {
            Some(&keep)
        } else {
            None
        },
    };
    decode::finish(ctx, s, model_id, latents, finish).await
}

/// `[1, ...]` latents → `[batch, ...]` by repeating the bytes.
fn repeat(t: &Tensor, batch: usize) -> Result<Tensor, GatewayError> {
    crate::pipeline::repeat_batch(t, batch)
        .map_err(|e| GatewayError::bad_response(StageName::Vae, e))
}
