//! ControlNet inpaint over the stages (diffusers QwenImageControlNetInpaintPipeline,
//! denoiser-and-pipelines.md §10): image and mask at the output size → masked pixels set to -1 (RGB8 0) →
//! VAE posterior sampled, normalised → with the inverted nearest-downsampled mask as the ControlNet's 17th
//! channel (the denoiser appends `1 - mask`) → the pose flow's ControlNet loop from pure noise.

use qwen_image_common::tensor;
use qwen_image_imaging::Image8;
use qwen_image_imaging::convert::rgb_to_l;
use qwen_image_imaging::mask::{binarize, to_latent_grid};
use qwen_image_imaging::resize::lanczos_resize;
use qwen_image_proto::v1::{ControlNetInpaintRequest, GenerateResult, TextToImageRequest};

use crate::error::GatewayError;
use crate::pose::{ControlFlow, control_options, decode_image, run_control, side};
use crate::t2i::Ctx;
use crate::validate::{T2iParams, validate};

/// A validated ControlNet-inpaint request.
#[derive(Debug, Clone)]
pub struct CnInpaintParams {
    pub t2i: T2iParams,
    /// The image at the output size with the masked pixels black (-1 after the VAE's mapping), RGB8.
    pub masked_image: Image8,
    /// The binarised mask on the latent grid, 1 = regenerate, `h * w` values.
    pub latent_mask: Vec<f32>,
    pub controlnet_id: String,
    pub conditioning_scale: f32,
    pub guidance_start: f32,
    pub guidance_end: f32,
}

fn invalid(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument(msg.into())
}

pub fn validate_cn_inpaint(
    req: ControlNetInpaintRequest,
    max_side_px: u32,
    fallback_seed: u64,
) -> Result<CnInpaintParams, GatewayError> {
    let (conditioning_scale, guidance_start, guidance_end) = control_options(
        req.conditioning_scale,
        req.control_guidance_start,
        req.control_guidance_end,
    )?;
    let image = decode_image(&req.image, "image")?;
    let mask = decode_image(&req.mask, "mask")?;
    let width_px = side("width_px", req.width_px, image.width, max_side_px)?;
    let height_px = side("height_px", req.height_px, image.height, max_side_px)?;
    let t2i = validate(
        TextToImageRequest {
            prompt: req.prompt,
            negative_prompt: req.negative_prompt,
            width_px,
            height_px,
            steps: req.steps,
            true_cfg_scale: req.true_cfg_scale,
            seed: req.seed,
            initial_latents: None,
            preview: req.preview,
            num_images: req.num_images,
        },
        max_side_px,
        fallback_seed,
    )?;
    let (w, h) = (t2i.width_px as usize, t2i.height_px as usize);
    // image_processor.preprocess: LANCZOS to W x H; mask_processor: L, LANCZOS, >= 0.5.
    let mut masked_image = lanczos_resize(&image, w, h).map_err(invalid)?;
    let l = rgb_to_l(&mask).map_err(invalid)?;
    let l = lanczos_resize(&l, w, h).map_err(invalid)?;
    let bin = binarize(&l).map_err(invalid)?;
    if !bin.contains(&1) {
        return Err(invalid(
            "the mask has no white pixels (after resizing and thresholding at 50 %); paint the region to \
             regenerate white",
        ));
    }
    for (px, &m) in masked_image.data.chunks_exact_mut(3).zip(&bin) {
        if m == 1 {
            px.fill(0);
        }
    }
    let (lh, lw) = t2i.latent_hw();
    let latent_mask = to_latent_grid(&bin, w, h, lw, lh)
        .map_err(invalid)?
        .into_iter()
        .map(f32::from)
        .collect();
    Ok(CnInpaintParams {
        t2i,
        masked_image,
        latent_mask,
        controlnet_id: req.controlnet_id,
        conditioning_scale,
        guidance_start,
        guidance_end,
    })
}

pub async fn run(ctx: &Ctx<'_>, pp: &CnInpaintParams) -> Result<GenerateResult, GatewayError> {
    let batch = pp.t2i.num_images as usize;
    let (lh, lw) = pp.t2i.latent_hw();
    let mask: Vec<f32> = std::iter::repeat_n(pp.latent_mask.iter().copied(), batch)
        .flatten()
        .collect();
    let chunks = vec![
        (
            "controlnet".into(),
            if pp.controlnet_id.is_empty() {
                "(default)".into()
            } else {
                pp.controlnet_id.clone()
            },
        ),
        ("control_mode".into(), "inpaint".into()),
        (
            "controlnet_conditioning_scale".into(),
            pp.conditioning_scale.to_string(),
        ),
        (
            "control_guidance_start".into(),
            pp.guidance_start.to_string(),
        ),
        ("control_guidance_end".into(), pp.guidance_end.to_string()),
    ];
    let flow = ControlFlow {
        image: &pp.masked_image,
        controlnet_id: &pp.controlnet_id,
        conditioning_scale: pp.conditioning_scale,
        guidance_start: pp.guidance_start,
        guidance_end: pp.guidance_end,
        latent_mask: Some(tensor::from_f32(&[batch, 1, lh, lw], &mask)),
        eps_from_request_generator: false,
        chunks,
    };
    run_control(ctx, &pp.t2i, &flow).await
}
