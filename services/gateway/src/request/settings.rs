//! The settings every request shares (`GenerationSettings`), converted once for every flow: prompt rules,
//! size rules from the model's geometry, steps, CFG, seed, previews, batch.

use qwen_image_proto::v1::{GenerationSettings, LoraRef, PreviewSettings, SchedulerOverride};

use super::invalid;
use crate::error::GatewayError;
use crate::geometry::Geometry;

/// Default of the gateway's largest accepted width and height in pixels (a 2048x2048 request's tensors fit
/// the message limits, see `qwen_image_common::limits`).
pub const MAX_SIDE_PX: u32 = 2048;
/// Steps used when the request leaves `steps` at 0 (diffusers' `num_inference_steps=50`).
pub const DEFAULT_STEPS: u32 = 50;
pub const MAX_STEPS: u32 = 1000;
/// Fewest steps accepted: Qwen-Image's scheduler stretches the schedule to `shift_terminal` (0.02), which
/// divides by zero for a one-step schedule (diffusers then produces NaN latents).
pub const MIN_STEPS: u32 = 2;
/// diffusers' QwenImagePipeline default `true_cfg_scale`.
pub const DEFAULT_TRUE_CFG_SCALE: f32 = 4.0;
/// Largest `true_cfg_scale` (the denoiser's own bound; diffusers' default is 4.0, and a huge scale only
/// overflows the guided velocity to NaN).
pub const MAX_TRUE_CFG_SCALE: f32 = 100.0;
/// Images per request (one batch).
pub const MAX_IMAGES: u32 = 4;
/// Longest prompt in bytes of UTF-8 (the text encoder's own limit).
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;

/// The gateway's own bounds on requests (not the model's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted width / height in pixels.
    pub max_side_px: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_side_px: MAX_SIDE_PX,
        }
    }
}

/// Validated common settings with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
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
    pub preview: Option<PreviewSettings>,
    /// LoRA adapters and scheduler override, passed to the denoiser as given (it checks them against what it
    /// loaded).
    pub loras: Vec<LoraRef>,
    pub scheduler: Option<SchedulerOverride>,
    /// The served model the request named (`GenerationSettings.model`; empty = the first).
    pub model: String,
}

impl Settings {
    /// True CFG runs only with a negative prompt and a scale > 1 (diffusers' rule).
    pub fn uses_cfg(&self) -> bool {
        self.negative_prompt.is_some() && self.true_cfg_scale > 1.0
    }

    /// Latent grid (h, w).
    pub fn latent_hw(&self, g: &Geometry) -> (usize, usize) {
        g.latent_hw(self.width_px, self.height_px)
    }

    /// diffusers' noise shape `[B, 1, C, h, w]`.
    pub fn noise_shape(&self, g: &Geometry) -> [usize; 5] {
        let (h, w) = self.latent_hw(g);
        [self.num_images as usize, 1, g.latent_channels, h, w]
    }

    /// The settings with every default filled in, for the result.
    pub fn to_proto(&self) -> GenerationSettings {
        GenerationSettings {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width_px: self.width_px,
            height_px: self.height_px,
            steps: self.steps,
            true_cfg_scale: Some(self.true_cfg_scale),
            seed: Some(self.seed),
            preview: self.preview,
            num_images: self.num_images,
            loras: self.loras.clone(),
            scheduler: self.scheduler.clone(),
            model: self.model.clone(),
        }
    }
}

/// Checks one side: a multiple of the size multiple within the limit. `default` is what 0 stands for in
/// this request (said in the hint).
pub fn check_side(
    name: &str,
    v: u32,
    default: &str,
    g: &Geometry,
    limits: &Limits,
) -> Result<u32, GatewayError> {
    let (m, max) = (g.size_multiple(), limits.max_side_px);
    if v == 0 || !v.is_multiple_of(m) || v > max {
        let lo = (v / m) * m;
        let hint = if v > max {
            format!("at most {max}")
        } else if lo == 0 {
            format!("e.g. {m}")
        } else {
            format!("e.g. {lo} or {}", lo + m)
        };
        return Err(invalid(format!(
            "{name} {v} is not supported: send a multiple of {m} between {m} and {max} ({hint}), or 0 for {default}"
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

/// Converts the common settings of any request. `width_px` x `height_px` is the size the flow resolved
/// (its default applied, `default` naming it for the hint); `fallback_seed` is used when the request has
/// no seed.
pub fn convert(
    s: GenerationSettings,
    (width_px, height_px): (u32, u32),
    default: &str,
    g: &Geometry,
    limits: &Limits,
    fallback_seed: u64,
) -> Result<Settings, GatewayError> {
    if s.prompt.trim().is_empty() {
        return Err(invalid(
            "prompt is empty; send the text of the image you want",
        ));
    }
    prompt_text("prompt", &s.prompt)?;
    if let Some(n) = &s.negative_prompt {
        prompt_text("negative_prompt", n)?;
    }
    let width_px = check_side("width_px", width_px, default, g, limits)?;
    let height_px = check_side("height_px", height_px, default, g, limits)?;
    let steps = match s.steps {
        0 => DEFAULT_STEPS,
        n if n > MAX_STEPS => {
            return Err(invalid(format!(
                "steps {n} is too many; send {MIN_STEPS}..={MAX_STEPS} (0 = {DEFAULT_STEPS})"
            )));
        }
        n if n < MIN_STEPS => {
            return Err(invalid(format!(
                "steps {n} is too few: Qwen-Image's schedule needs at least {MIN_STEPS} steps (send \
                 {MIN_STEPS}..={MAX_STEPS}; 0 = {DEFAULT_STEPS})"
            )));
        }
        n => n,
    };
    let true_cfg_scale = s.true_cfg_scale.unwrap_or(DEFAULT_TRUE_CFG_SCALE);
    if !true_cfg_scale.is_finite() || !(0.0..=MAX_TRUE_CFG_SCALE).contains(&true_cfg_scale) {
        return Err(invalid(format!(
            "true_cfg_scale {true_cfg_scale} is not allowed; send a finite value in 0..={MAX_TRUE_CFG_SCALE} (e.g. 4.0)"
        )));
    }
    let num_images = match s.num_images {
        0 => 1,
        n if n > MAX_IMAGES => {
            return Err(invalid(format!(
                "num_images {n} is too many; send 1..={MAX_IMAGES}"
            )));
        }
        n => n,
    };
    let pixels = u64::from(width_px) * u64::from(height_px) * u64::from(num_images);
    if g.max_pixels > 0 && pixels > g.max_pixels {
        return Err(invalid(format!(
            "{num_images} image(s) of {width_px}x{height_px} are {pixels} pixels; the stages take at most {} \
             pixels per request (their --max-pixels): ask for fewer or smaller images",
            g.max_pixels
        )));
    }
    let (seed, seed_was_random) = match s.seed {
        Some(seed) => (seed, false),
        None => (fallback_seed, true),
    };
    Ok(Settings {
        prompt: s.prompt,
        negative_prompt: s.negative_prompt,
        width_px,
        height_px,
        steps,
        true_cfg_scale,
        seed,
        seed_was_random,
        num_images,
        preview: s.preview,
        loras: s.loras,
        scheduler: s.scheduler,
        model: s.model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        latent_channels: 16,
        vae_scale_factor: 8,
        patch_size: 2,
        max_pixels: 0,
    };

    fn settings() -> GenerationSettings {
        GenerationSettings {
            prompt: "a cat".into(),
            steps: 4,
            ..Default::default()
        }
    }

    fn err(s: GenerationSettings, wh: (u32, u32)) -> String {
        match convert(s, wh, "1024", &G, &Limits::default(), 7) {
            Err(GatewayError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn fills_defaults() {
        let p = convert(
            GenerationSettings {
                prompt: "x".into(),
                ..Default::default()
            },
            (1024, 1024),
            "1024",
            &G,
            &Limits::default(),
            42,
        )
        .expect("valid");
        assert_eq!((p.steps, p.num_images), (50, 1));
        assert_eq!(p.true_cfg_scale, 4.0);
        assert_eq!((p.seed, p.seed_was_random), (42, true));
        assert!(!p.uses_cfg());
        let echo = p.to_proto();
        assert_eq!(echo.seed, Some(42));
        assert_eq!(echo.true_cfg_scale, Some(4.0));
        let p = convert(
            GenerationSettings {
                seed: Some(3),
                negative_prompt: Some(" ".into()),
                ..settings()
            },
            (64, 64),
            "1024",
            &G,
            &Limits::default(),
            42,
        )
        .expect("valid");
        assert_eq!((p.seed, p.seed_was_random), (3, false));
        assert!(p.uses_cfg());
        assert_eq!(p.noise_shape(&G), [1, 1, 16, 8, 8]);
        let g4 = Geometry {
            latent_channels: 4,
            vae_scale_factor: 4,
            patch_size: 2,
            max_pixels: 0,
        };
        assert_eq!(p.noise_shape(&g4), [1, 1, 4, 16, 16]);
    }

    #[test]
    fn rejects_bad_inputs_with_hints() {
        let wh = (64, 64);
        assert!(
            err(
                GenerationSettings {
                    prompt: "  ".into(),
                    ..settings()
                },
                wh
            )
            .contains("prompt is empty")
        );
        assert!(err(settings(), (100, 64)).contains("e.g. 96 or 112"));
        assert!(err(settings(), (64, 4096)).contains("at most 2048"));
        assert!(err(settings(), (8, 64)).contains("e.g. 16"));
        let g4 = Geometry {
            latent_channels: 4,
            vae_scale_factor: 4,
            patch_size: 2,
            max_pixels: 0,
        };
        assert!(convert(settings(), (40, 72), "512", &g4, &Limits::default(), 0).is_ok());
        // The stages' pixel budget: 2 images of 64x64 fit 8192 pixels, 3 do not.
        let budget = Geometry {
            max_pixels: 2 * 64 * 64,
            ..G
        };
        let two = GenerationSettings {
            num_images: 2,
            ..settings()
        };
        assert!(convert(two, wh, "1024", &budget, &Limits::default(), 0).is_ok());
        let three = GenerationSettings {
            num_images: 3,
            ..settings()
        };
        match convert(three, wh, "1024", &budget, &Limits::default(), 0) {
            Err(GatewayError::InvalidArgument(m)) => assert!(m.contains("--max-pixels"), "{m}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
        let huge_cfg = GenerationSettings {
            true_cfg_scale: Some(3.4e38),
            ..settings()
        };
        assert!(err(huge_cfg, wh).contains("true_cfg_scale"));
        assert!(
            err(
                GenerationSettings {
                    steps: 1001,
                    ..settings()
                },
                wh
            )
            .contains("2..=1000")
        );
        assert!(
            err(
                GenerationSettings {
                    steps: 1,
                    ..settings()
                },
                wh
            )
            .contains("at least 2 steps")
        );
        assert!(
            err(
                GenerationSettings {
                    true_cfg_scale: Some(f32::NAN),
                    ..settings()
                },
                wh
            )
            .contains("finite")
        );
        assert!(
            err(
                GenerationSettings {
                    true_cfg_scale: Some(-1.0),
                    ..settings()
                },
                wh
            )
            .contains("in 0..=100")
        );
        assert!(
            err(
                GenerationSettings {
                    num_images: 5,
                    ..settings()
                },
                wh
            )
            .contains("1..=4")
        );
        assert!(
            err(
                GenerationSettings {
                    prompt: "x".repeat(MAX_PROMPT_BYTES + 1),
                    ..settings()
                },
                wh
            )
            .contains("bytes")
        );
    }
}
