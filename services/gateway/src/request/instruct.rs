//! Edit requests (instruction editing, diffusers 0.42.1 `QwenImageEditPlusPipeline`,
//! `pipelines/qwenimage/pipeline_qwenimage_edit_plus.py`) → [`InstructParams`]: the pictures decoded and
//! resized twice as `__call__` does (`calculate_dimensions(CONDITION_IMAGE_SIZE, w / h)` + LANCZOS for the
//! text encoder, `calculate_dimensions(VAE_IMAGE_SIZE, w / h)` floored to `2 · vae_scale_factor` + LANCZOS for
//! the reference latents), and the output size defaulting from the LAST picture.

use qwen_image_imaging::Image8;
use qwen_image_imaging::edit_sizes::{condition_size, default_output_size, vae_size};
use qwen_image_proto::v1::EditRequest;

use super::settings::{self, Settings};
use super::{Geometry, Limits, invalid};
use crate::error::GatewayError;
use crate::images;

/// Most pictures per request (the Qwen-Image-Edit-2509 / -2511 model cards: one to three input images).
pub const MAX_PICTURES: usize = 3;
/// transformers `smart_resize` (`image_processing_qwen2_vl.py`, `MAX_RATIO = 200`) refuses pictures whose
/// aspect ratio is 200:1 or more; checked on the condition size before any stage call.
pub const MAX_ASPECT_RATIO: usize = 200;

/// The pipeline's picture areas (diffusers `CONDITION_IMAGE_SIZE` and `VAE_IMAGE_SIZE`; the gateway's
/// `--edit-condition-area` / `--edit-vae-area`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Areas {
    pub condition: u64,
    pub vae: u64,
}

impl Default for Areas {
    fn default() -> Self {
        Self {
            condition: qwen_image_imaging::edit_sizes::CONDITION_IMAGE_SIZE,
            vae: qwen_image_imaging::edit_sizes::VAE_IMAGE_SIZE,
        }
    }
}

/// A validated Edit request with its pictures prepared.
#[derive(Debug, Clone)]
pub struct InstructParams {
    /// The common settings; `width_px` x `height_px` is the output size.
    pub settings: Settings,
    /// The pictures at their condition size (for the text encoder), in order.
    pub condition: Vec<Image8>,
    /// The pictures at their VAE size (reference latents), in order.
    pub vae: Vec<Image8>,
}

/// Checks an Edit request and prepares its pictures.
pub fn validate(
    req: EditRequest,
    g: &Geometry,
    limits: &Limits,
    areas: Areas,
    fallback_seed: u64,
) -> Result<InstructParams, GatewayError> {
    let n = req.images.len();
    if n == 0 || n > MAX_PICTURES {
        return Err(invalid(format!(
            "images has {n} pictures; send 1..={MAX_PICTURES} (PNG or JPEG)"
        )));
    }
    let pictures = req
        .images
        .iter()
        .enumerate()
        .map(|(k, b)| images::decode_rgb(&format!("images[{k}]"), b))
        .collect::<Result<Vec<_>, _>>()?;
    let sized = |k: usize, r: Result<(usize, usize), String>| {
        r.map_err(|e| invalid(format!("images[{k}]: {e}; send a less elongated picture")))
    };
    let mut condition = Vec::with_capacity(n);
    let mut vae = Vec::with_capacity(n);
    for (k, p) in pictures.iter().enumerate() {
        let (cw, ch) = sized(k, condition_size(p.width, p.height, areas.condition))?;
        if cw.max(ch) >= MAX_ASPECT_RATIO * cw.min(ch) {
            return Err(invalid(format!(
                "images[{k}] ({}x{}) is resized to {cw}x{ch} for the text encoder, an aspect ratio the image \
                 processor refuses (at least {MAX_ASPECT_RATIO}:1); send a less elongated picture",
                p.width, p.height
            )));
        }
        let (vw, vh) = sized(
            k,
            vae_size(p.width, p.height, areas.vae, g.vae_scale_factor as usize),
        )?;
        condition.push(images::resize_to(p, cw as u32, ch as u32)?);
        vae.push(images::resize_to(p, vw as u32, vh as u32)?);
    }
    let s = req.settings.unwrap_or_default();
    let size = match (s.width_px, s.height_px) {
        (0, 0) => {
            let last = pictures.last().ok_or_else(|| invalid("no picture"))?;
            let (w, h) = default_output_size(last.width, last.height, g.vae_scale_factor as usize)
                .map_err(|e| invalid(format!("images[{}]: {e}", n - 1)))?;
            (w as u32, h as u32)
        }
        (0, _) | (_, 0) => {
            return Err(invalid(
                "send both width_px and height_px, or neither (= about 1024x1024 with the last picture's aspect \
                 ratio)",
            ));
        }
        wh => wh,
    };
    let settings = settings::convert(
        s,
        size,
        "about 1024x1024 with the last picture's aspect ratio",
        g,
        limits,
        fallback_seed,
    )?;
    Ok(InstructParams {
        settings,
        condition,
        vae,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_image_proto::v1::GenerationSettings;

    const G: Geometry = Geometry {
        latent_channels: 16,
        vae_scale_factor: 8,
        patch_size: 2,
        max_pixels: 0,
    };

    fn png(w: u32, h: u32) -> bytes::Bytes {
        let data = vec![90u8; (w * h * 3) as usize];
        crate::pngmeta::encode_png(w, h, &data, &[])
            .expect("png")
            .into()
    }

    fn req(pictures: Vec<bytes::Bytes>, w: u32, h: u32) -> EditRequest {
        EditRequest {
            settings: Some(GenerationSettings {
                prompt: "make it night".into(),
                width_px: w,
                height_px: h,
                steps: 2,
                ..Default::default()
            }),
            images: pictures,
        }
    }

    fn err(r: EditRequest) -> String {
        match validate(r, &G, &Limits::default(), Areas::default(), 0) {
            Err(GatewayError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn sizes_as_the_pipeline() {
        // 120x90 (4:3): 448x320 for the text encoder, 1184x896 for the VAE (edit_sizes tests, refharness)
        let p = validate(
            req(vec![png(64, 64), png(120, 90)], 0, 0),
            &G,
            &Limits::default(),
            Areas::default(),
            0,
        )
        .expect("valid");
        assert_eq!((p.condition[1].width, p.condition[1].height), (448, 320));
        assert_eq!((p.vae[1].width, p.vae[1].height), (1184, 896));
        assert_eq!((p.condition[0].width, p.condition[0].height), (384, 384));
        // the default output size follows the LAST picture
        assert_eq!((p.settings.width_px, p.settings.height_px), (1184, 896));
        let small = Areas {
            condition: 28672,
            vae: 16384,
        };
        let p = validate(
            req(vec![png(80, 56)], 64, 48),
            &G,
            &Limits::default(),
            small,
            0,
        )
        .expect("valid");
        assert_eq!((p.condition[0].width, p.condition[0].height), (192, 128));
        assert_eq!((p.vae[0].width, p.vae[0].height), (160, 96));
        assert_eq!((p.settings.width_px, p.settings.height_px), (64, 48));
    }

    #[test]
    fn refuses_bad_pictures() {
        assert!(err(req(vec![], 0, 0)).contains("1..=3"));
        assert!(err(req(vec![png(8, 8); 4], 0, 0)).contains("1..=3"));
        assert!(err(req(vec![png(8, 8)], 64, 0)).contains("both width_px and height_px"));
        assert!(err(req(vec![png(8, 8), png(3000, 2)], 0, 0)).contains("images[1]"));
        assert!(err(req(vec![png(8, 8), b"nope".to_vec().into()], 0, 0)).contains("images[1]"));
    }
}
