//! `TextToImageRequest` → [`T2iParams`].

use qwen_image_common::tensor;
use qwen_image_proto::v1::{DataType, Tensor, TextToImageRequest};

use super::settings::{self, Settings};
use super::{Geometry, Limits, invalid};
use crate::error::GatewayError;

/// A validated text-to-image request.
#[derive(Debug, Clone, PartialEq)]
pub struct T2iParams {
    pub settings: Settings,
    /// Caller's start latents, checked against the size; passed to the denoiser as is.
    pub initial_latents: Option<Tensor>,
}

/// Checks `req` and fills defaults (0 size = diffusers' default_sample_size x the VAE scale factor, within
/// the gateway's limit); `fallback_seed` is used when the request has no seed.
pub fn validate(
    req: TextToImageRequest,
    g: &Geometry,
    limits: &Limits,
    fallback_seed: u64,
) -> Result<T2iParams, GatewayError> {
    let s = req.settings.unwrap_or_default();
    let default = g
        .default_side_px()
        .min(g.floor_to_multiple(limits.max_side_px));
    let or_default = |v: u32| if v == 0 { default } else { v };
    let size = (or_default(s.width_px), or_default(s.height_px));
    let settings = settings::convert(s, size, &default.to_string(), g, limits, fallback_seed)?;
    let initial_latents = match req.initial_latents {
        Some(t) => {
            check_latents(&t, &settings, g)?;
            Some(t)
        }
        None => None,
    };
    Ok(T2iParams {
        settings,
        initial_latents,
    })
}

/// `initial_latents`: F32, finite, `[B, 1, C, h, w]` or `[B, C, 1, h, w]` for this size and batch.
fn check_latents(t: &Tensor, s: &Settings, g: &Geometry) -> Result<(), GatewayError> {
    let field = "initial_latents";
    let host =
        tensor::to_f32(t, field, &[DataType::F32], &[5]).map_err(|e| invalid(e.to_string()))?;
    let [b, _, c, h, w] = s.noise_shape(g);
    let sh = &host.shape;
    let ok = sh[0] == b
        && sh[3] == h
        && sh[4] == w
        && ((sh[1] == 1 && sh[2] == c) || (sh[1] == c && sh[2] == 1));
    if !ok {
        return Err(invalid(format!(
            "`{field}` has shape {sh:?}; for {b} image(s) of {}x{} px send [{b}, 1, {c}, {h}, {w}] or [{b}, {c}, 1, {h}, {w}] (F32)",
            s.width_px, s.height_px
        )));
    }
    Ok(())
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

    fn req(initial_latents: Option<Tensor>) -> TextToImageRequest {
        TextToImageRequest {
            settings: Some(GenerationSettings {
                prompt: "a cat".into(),
                width_px: 64,
                height_px: 64,
                steps: 4,
                ..Default::default()
            }),
            initial_latents,
        }
    }

    fn err(r: TextToImageRequest) -> String {
        match validate(r, &G, &Limits::default(), 0) {
            Err(GatewayError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn default_size_comes_from_the_geometry() {
        let bare = TextToImageRequest {
            settings: Some(GenerationSettings {
                prompt: "x".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let p = validate(bare.clone(), &G, &Limits::default(), 1).expect("valid");
        assert_eq!((p.settings.width_px, p.settings.height_px), (1024, 1024));
        let g4 = Geometry {
            latent_channels: 4,
            vae_scale_factor: 4,
            patch_size: 2,
            max_pixels: 0,
        };
        let p = validate(bare.clone(), &g4, &Limits::default(), 1).expect("valid");
        assert_eq!((p.settings.width_px, p.settings.height_px), (512, 512));
        let small = Limits { max_side_px: 500 };
        let p = validate(bare, &G, &small, 1).expect("valid");
        assert_eq!(p.settings.width_px, 496);
    }

    #[test]
    fn checks_initial_latents() {
        let good = tensor::from_f32(&[1, 16, 1, 8, 8], &[0.5; 1024]);
        assert!(validate(req(Some(good)), &G, &Limits::default(), 0).is_ok());
        let good = tensor::from_f32(&[1, 1, 16, 8, 8], &[0.5; 1024]);
        assert!(validate(req(Some(good)), &G, &Limits::default(), 0).is_ok());
        let wrong = tensor::from_f32(&[1, 16, 1, 4, 4], &[0.5; 256]);
        assert!(err(req(Some(wrong))).contains("[1, 1, 16, 8, 8]"));
        let rank4 = tensor::from_f32(&[1, 16, 8, 8], &[0.5; 1024]);
        assert!(err(req(Some(rank4))).contains("rank 4"));
        let nan = tensor::from_f32(&[1, 16, 1, 8, 8], &[f32::NAN; 1024]);
        assert!(err(req(Some(nan))).contains("not finite"));
    }
}
