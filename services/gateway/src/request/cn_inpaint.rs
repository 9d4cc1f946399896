//! `ControlNetInpaintRequest` → [`CnInpaintParams`] (diffusers QwenImageControlNetInpaintPipeline's
//! preprocessing, denoiser-and-pipelines.md §10): image and mask at the output size, the masked pixels set
//! to -1 (RGB8 0), and the binarised mask on the latent grid.

use qwen_image_imaging::Image8;
use qwen_image_imaging::convert::rgb_to_l;
use qwen_image_imaging::mask::{binarize, to_latent_grid};
use qwen_image_imaging::resize::lanczos_resize;
use qwen_image_proto::v1::ControlNetInpaintRequest;

use super::control::{self, ControlOptions};
use super::settings::{self, Settings};
use super::{Geometry, Limits, invalid};
use crate::error::GatewayError;
use crate::images;

/// A validated ControlNet-inpaint request.
#[derive(Debug, Clone)]
pub struct CnInpaintParams {
    pub settings: Settings,
    /// The image at the output size with the masked pixels black (-1 after the VAE's mapping), RGB8.
    pub masked_image: Image8,
    /// The binarised mask on the latent grid, 1 = regenerate, `h * w` values.
    pub latent_mask: Vec<f32>,
    pub options: ControlOptions,
}

pub fn validate_cn_inpaint(
    req: ControlNetInpaintRequest,
    g: &Geometry,
    limits: &Limits,
    fallback_seed: u64,
) -> Result<CnInpaintParams, GatewayError> {
    let options = control::options(req.control)?;
    let s = req.settings.unwrap_or_default();
    let image = images::decode_rgb("image", &req.image)?;
    let mask = images::decode_rgb("mask", &req.mask)?;
    let width_px = control::side("width_px", s.width_px, image.width, g, limits)?;
    let height_px = control::side("height_px", s.height_px, image.height, g, limits)?;
    let settings = settings::convert(
        s,
        (width_px, height_px),
        "the image's own size",
        g,
        limits,
        fallback_seed,
    )?;
    let (w, h) = (settings.width_px as usize, settings.height_px as usize);
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
    let (lh, lw) = settings.latent_hw(g);
    let latent_mask = to_latent_grid(&bin, w, h, lw, lh)
        .map_err(invalid)?
        .into_iter()
        .map(f32::from)
        .collect();
    Ok(CnInpaintParams {
        settings,
        masked_image,
        latent_mask,
        options,
    })
}
