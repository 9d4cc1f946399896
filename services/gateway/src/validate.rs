//! Validation of a `TextToImageRequest` into typed parameters with every default filled in.
//!
//! Shape assumptions (Qwen-Image; the stage protos have no RPC to ask): the VAE scales by 8
//! (`2 ** len(vae.config.temperal_downsample)` in diffusers) and its latents have 16 channels
//! (`vae.config.z_dim`); the transformer packs 2x2 latent patches, so sizes must be multiples of 16.
//! The denoiser and VAE re-check everything and the gateway reports their disagreement as INTERNAL.

use qwen_image_common::tensor;
use qwen_image_proto::v1::{DataType, PreviewSettings, Tensor, TextToImageRequest};

use crate::error::GatewayError;

/// Pixels per latent cell (diffusers `vae_scale_factor`).
pub const VAE_SCALE_FACTOR: u32 = 8;
/// Latent channels (`z_dim` of the Qwen-Image VAE, `out_channels` of the transformer).
pub const LATENT_CHANNELS: usize = 16;
/// Width and height must be multiples of this (VAE factor x 2x2 patch packing).
pub const SIZE_MULTIPLE: u32 = VAE_SCALE_FACTOR * 2;
/// Size used when the request leaves width or height at 0 (diffusers' default 1024x1024).
pub const DEFAULT_SIDE_PX: u32 = 1024;
/// Steps used when the request leaves `steps` at 0 (diffusers' `num_inference_steps=50`).
pub const DEFAULT_STEPS: u32 = 50;
pub const MAX_STEPS: u32 = 1000;
/// Fewest steps accepted: Qwen-Image's scheduler stretches the schedule to `shift_terminal` (0.02), which
/// divides by zero for a one-step schedule (diffusers then produces NaN latents).
pub const MIN_STEPS: u32 = 2;
/// diffusers' QwenImagePipeline default `true_cfg_scale`.
pub const DEFAULT_TRUE_CFG_SCALE: f32 = 4.0;
/// Images per request (one batch).
pub const MAX_IMAGES: u32 = 4;
/// Longest prompt in bytes of UTF-8 (the text encoder's own limit).
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;

/// A validated text-to-image request.
#[derive(Debug, Clone, PartialEq)]
pub struct T2iParams {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width_px: u32,
    pub height_px: u32,
    pub steps: u32,
    pub true_cfg_scale: f32,
    pub seed: u64,
    /// Whether the seed was chosen by the gateway.
    pub seed_was_random: bool,
    pub num_images: u32,
    /// Caller's start latents, checked against the size; passed to the denoiser as is.
    pub initial_latents: Option<Tensor>,
    pub preview: Option<PreviewSettings>,
}

impl T2iParams {
    /// Latent grid (h, w).
    pub fn latent_hw(&self) -> (usize, usize) {
        (
            (self.height_px / VAE_SCALE_FACTOR) as usize,
            (self.width_px / VAE_SCALE_FACTOR) as usize,
        )
    }

    /// diffusers' noise shape `[B, 1, C, h, w]`.
    pub fn noise_shape(&self) -> [usize; 5] {
        let (h, w) = self.latent_hw();
        [self.num_images as usize, 1, LATENT_CHANNELS, h, w]
    }

    /// True CFG runs only with a negative prompt and a scale > 1 (diffusers' rule).
    pub fn uses_cfg(&self) -> bool {
        self.negative_prompt.is_some() && self.true_cfg_scale > 1.0
    }

    /// The request with every default filled in (initial latents omitted), for the result.
    pub fn to_request(&self) -> TextToImageRequest {
        TextToImageRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width_px: self.width_px,
            height_px: self.height_px,
            steps: self.steps,
            true_cfg_scale: Some(self.true_cfg_scale),
            seed: Some(self.seed),
            initial_latents: None,
            preview: self.preview,
            num_images: self.num_images,
        }
    }
}

fn invalid(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument(msg.into())
}

fn side(name: &str, v: u32, max: u32) -> Result<u32, GatewayError> {
    let v = if v == 0 { DEFAULT_SIDE_PX.min(max) } else { v };
    if v % SIZE_MULTIPLE != 0 || v > max {
        let lo = (v / SIZE_MULTIPLE) * SIZE_MULTIPLE;
        let hint = if v > max {
            format!("at most {max}")
        } else if lo == 0 {
            format!("e.g. {SIZE_MULTIPLE}")
        } else {
            format!("e.g. {lo} or {}", lo + SIZE_MULTIPLE)
        };
        return Err(invalid(format!(
            "{name} {v} is not supported: send a multiple of {SIZE_MULTIPLE} between {SIZE_MULTIPLE} and {max} ({hint}), or 0 for {DEFAULT_SIDE_PX}"
        )));
    }
    Ok(v)
}

fn prompt_text(name: &str, s: &str) -> Result<(), GatewayError> {
    if s.len() > MAX_PROMPT_BYTES {
        return Err(invalid(format!(
            "{name} is {} bytes; send at most {MAX_PROMPT_BYTES} bytes of UTF-8",
            s.len()
        )));
    }
    if s.contains('\0') {
        return Err(invalid(format!(
            "{name} contains a NUL character; remove it"
        )));
    }
    Ok(())
}

/// Checks `req` and fills defaults; `fallback_seed` is used when the request has no seed.
pub fn validate(
    req: TextToImageRequest,
    max_side_px: u32,
    fallback_seed: u64,
) -> Result<T2iParams, GatewayError> {
    if req.prompt.trim().is_empty() {
        return Err(invalid(
            "prompt is empty; send the text of the image you want",
        ));
    }
    prompt_text("prompt", &req.prompt)?;
    if let Some(n) = &req.negative_prompt {
        prompt_text("negative_prompt", n)?;
    }
    let width_px = side("width_px", req.width_px, max_side_px)?;
    let height_px = side("height_px", req.height_px, max_side_px)?;
    let steps = match req.steps {
        0 => DEFAULT_STEPS,
        s if s > MAX_STEPS => {
            return Err(invalid(format!(
                "steps {s} is too many; send {MIN_STEPS}..={MAX_STEPS} (0 = {DEFAULT_STEPS})"
            )));
        }
        s if s < MIN_STEPS => {
            return Err(invalid(format!(
                "steps {s} is too few: Qwen-Image's schedule needs at least {MIN_STEPS} steps (send \
                 {MIN_STEPS}..={MAX_STEPS}; 0 = {DEFAULT_STEPS})"
            )));
        }
        s => s,
    };
    let true_cfg_scale = req.true_cfg_scale.unwrap_or(DEFAULT_TRUE_CFG_SCALE);
    if !true_cfg_scale.is_finite() || true_cfg_scale < 0.0 {
        return Err(invalid(format!(
            "true_cfg_scale {true_cfg_scale} is not allowed; send a finite value >= 0 (e.g. 4.0)"
        )));
    }
    let num_images = match req.num_images {
        0 => 1,
        n if n > MAX_IMAGES => {
            return Err(invalid(format!(
                "num_images {n} is too many; send 1..={MAX_IMAGES}"
            )));
        }
        n => n,
    };
    let (seed, seed_was_random) = match req.seed {
        Some(s) => (s, false),
        None => (fallback_seed, true),
    };
    let mut params = T2iParams {
        prompt: req.prompt,
        negative_prompt: req.negative_prompt,
        width_px,
        height_px,
        steps,
        true_cfg_scale,
        seed,
        seed_was_random,
        num_images,
        initial_latents: None,
        preview: req.preview,
    };
    if let Some(t) = req.initial_latents {
        check_latents(&t, &params)?;
        params.initial_latents = Some(t);
    }
    Ok(params)
}

/// `initial_latents`: F32, finite, `[B, 1, C, h, w]` or `[B, C, 1, h, w]` for this size and batch.
fn check_latents(t: &Tensor, p: &T2iParams) -> Result<(), GatewayError> {
    let field = "initial_latents";
    let host =
        tensor::to_f32(t, field, &[DataType::F32], &[5]).map_err(|e| invalid(e.to_string()))?;
    let [b, _, c, h, w] = p.noise_shape();
    let s = &host.shape;
    let ok = s[0] == b
        && s[3] == h
        && s[4] == w
        && ((s[1] == 1 && s[2] == c) || (s[1] == c && s[2] == 1));
    if !ok {
        return Err(invalid(format!(
            "`{field}` has shape {s:?}; for {b} image(s) of {}x{} px send [{b}, 1, {c}, {h}, {w}] or [{b}, {c}, 1, {h}, {w}] (F32)",
            p.width_px, p.height_px
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> TextToImageRequest {
        TextToImageRequest {
            prompt: "a cat".into(),
            width_px: 64,
            height_px: 64,
            steps: 4,
            ..Default::default()
        }
    }

    fn err(r: TextToImageRequest) -> String {
        match validate(r, 2048, 7) {
            Err(GatewayError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn fills_defaults() {
        let p = validate(
            TextToImageRequest {
                prompt: "x".into(),
                ..Default::default()
            },
            2048,
            42,
        )
        .expect("valid");
        assert_eq!(
            (p.width_px, p.height_px, p.steps, p.num_images),
            (1024, 1024, 50, 1)
        );
        assert_eq!(p.true_cfg_scale, 4.0);
        assert_eq!((p.seed, p.seed_was_random), (42, true));
        assert!(!p.uses_cfg());
        let echo = p.to_request();
        assert_eq!(echo.seed, Some(42));
        assert_eq!(echo.true_cfg_scale, Some(4.0));
        let p = validate(
            TextToImageRequest {
                seed: Some(3),
                negative_prompt: Some(" ".into()),
                ..req()
            },
            2048,
            42,
        )
        .expect("valid");
        assert_eq!((p.seed, p.seed_was_random), (3, false));
        assert!(p.uses_cfg());
        assert_eq!(p.noise_shape(), [1, 1, 16, 8, 8]);
    }

    #[test]
    fn rejects_bad_inputs_with_hints() {
        assert!(
            err(TextToImageRequest {
                prompt: "  ".into(),
                ..req()
            })
            .contains("prompt is empty")
        );
        assert!(
            err(TextToImageRequest {
                width_px: 100,
                ..req()
            })
            .contains("e.g. 96 or 112")
        );
        assert!(
            err(TextToImageRequest {
                height_px: 4096,
                ..req()
            })
            .contains("at most 2048")
        );
        assert!(
            err(TextToImageRequest {
                width_px: 8,
                ..req()
            })
            .contains("e.g. 16")
        );
        assert!(
            err(TextToImageRequest {
                steps: 1001,
                ..req()
            })
            .contains("2..=1000")
        );
        assert!(err(TextToImageRequest { steps: 1, ..req() }).contains("at least 2 steps"));
        assert!(
            err(TextToImageRequest {
                true_cfg_scale: Some(f32::NAN),
                ..req()
            })
            .contains("finite")
        );
        assert!(
            err(TextToImageRequest {
                true_cfg_scale: Some(-1.0),
                ..req()
            })
            .contains(">= 0")
        );
        assert!(
            err(TextToImageRequest {
                num_images: 5,
                ..req()
            })
            .contains("1..=4")
        );
        assert!(
            err(TextToImageRequest {
                prompt: "x".repeat(MAX_PROMPT_BYTES + 1),
                ..req()
            })
            .contains("bytes")
        );
    }

    #[test]
    fn checks_initial_latents() {
        let good = tensor::from_f32(&[1, 16, 1, 8, 8], &[0.5; 1024]);
        assert!(
            validate(
                TextToImageRequest {
                    initial_latents: Some(good),
                    ..req()
                },
                2048,
                0
            )
            .is_ok()
        );
        let good = tensor::from_f32(&[1, 1, 16, 8, 8], &[0.5; 1024]);
        assert!(
            validate(
                TextToImageRequest {
                    initial_latents: Some(good),
                    ..req()
                },
                2048,
                0
            )
            .is_ok()
        );
        let wrong = tensor::from_f32(&[1, 16, 1, 4, 4], &[0.5; 256]);
        assert!(
            err(TextToImageRequest {
                initial_latents: Some(wrong),
                ..req()
            })
            .contains("[1, 1, 16, 8, 8]")
        );
        let rank4 = tensor::from_f32(&[1, 16, 8, 8], &[0.5; 1024]);
        assert!(
            err(TextToImageRequest {
                initial_latents: Some(rank4),
                ..req()
            })
            .contains("rank 4")
        );
        let nan = tensor::from_f32(&[1, 16, 1, 8, 8], &[f32::NAN; 1024]);
        assert!(
            err(TextToImageRequest {
                initial_latents: Some(nan),
                ..req()
            })
            .contains("not finite")
        );
    }
}
