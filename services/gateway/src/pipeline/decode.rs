//! Decoding the final latents and building the result: PNGs carrying the parameters.

use bytes::Bytes;
use qwen_image_proto::v1::{DecodeRequest, GenerateResult, Padding, Stage, Tensor};

use super::prompts::Truncation;
use super::{Ctx, phase};
use crate::error::{GatewayError, StageName};
use crate::pngmeta;
use crate::request::Settings;
use crate::stages::Patience;

/// A step on each decoded RGB8 image before PNG encoding.
pub type PostProcess<'a> = dyn Fn(&mut [u8]) -> Result<(), String> + Sync + 'a;

/// What the image flows add to the result and the PNGs.
#[derive(Default)]
pub struct Finish<'a> {
    /// Extra PNG text chunks (e.g. `mode`, `strength`) and the A1111 settings they add.
    pub chunks: Vec<(String, String)>,
    pub a1111_settings: Vec<(String, String)>,
    pub strength: Option<f64>,
    pub padding: Option<Padding>,
    /// Applied to every decoded RGB8 image before PNG encoding (inpaint paste-back).
    pub post: Option<&'a PostProcess<'a>>,
    /// Prompts cut at max_sequence_length (from [`Prompts::truncation`]).
    pub truncation: Truncation,
}

/// Decodes the final latents and builds the result with PNGs carrying the parameters.
pub async fn finish(
    ctx: &Ctx<'_>,
    p: &Settings,
    model_id: String,
    latents: Tensor,
    finish: Finish<'_>,
) -> Result<GenerateResult, GatewayError> {
    let batch = p.num_images as usize;
    ctx.progress(Stage::Decode, 0, 0).await;
    let decoded = phase(
        "decode",
        StageName::Vae,
        "Decode",
        ctx.stages.decode(
            DecodeRequest {
                latents: Some(latents),
                return_float: false,
            },
            ctx.deadline,
            Patience::Wait(ctx),
        ),
    )
    .await?;
    if decoded.images.len() != batch {
        return Err(GatewayError::bad_response(
            StageName::Vae,
            format!("{} images for a batch of {batch}", decoded.images.len()),
        ));
    }
    let model = ctx.model_name.map(str::to_string).unwrap_or(model_id);
    let mut chunks = pngmeta::text_chunks(p, &model, ctx.request_id);
    pngmeta::add_extras(&mut chunks, &finish.chunks, &finish.a1111_settings);
    let mut pngs = Vec::with_capacity(batch);
    for mut img in decoded.images {
        if (img.width_px, img.height_px) != (p.width_px, p.height_px) {
            return Err(GatewayError::bad_response(
                StageName::Vae,
                format!(
                    "image is {}x{}, expected {}x{}",
                    img.width_px, img.height_px, p.width_px, p.height_px
                ),
            ));
        }
        if let Some(post) = finish.post {
            let mut rgb8 = img.rgb8.to_vec();
            post(&mut rgb8).map_err(|e| GatewayError::bad_response(StageName::Vae, e))?;
            img.rgb8 = Bytes::from(rgb8);
        }
        let png = pngmeta::encode_png(img.width_px, img.height_px, &img.rgb8, &chunks)
            .map_err(|e| GatewayError::bad_response(StageName::Vae, e))?;
        pngs.push(Bytes::from(png));
    }
    Ok(GenerateResult {
        png: pngs,
        width_px: p.width_px,
        height_px: p.height_px,
        seed: p.seed,
        parameters: Some(p.to_proto()),
        request_id: ctx.request_id.to_string(),
        elapsed_ms: ctx.elapsed_ms(),
        strength: finish.strength,
        padding: finish.padding,
        prompt_truncated: finish.truncation.prompt,
        negative_prompt_truncated: finish.truncation.negative_prompt,
    })
}
