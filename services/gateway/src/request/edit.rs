//! Img2Img / Inpaint / Outpaint requests → [`EditParams`] (diffusers QwenImageImg2ImgPipeline and
//! QwenImageInpaintPipeline preprocessing; outpaint = inpaint of a larger canvas), and the generator's draws
//! in diffusers' order ([`draws`]).

use qwen_image_common::randn::TorchCpuGenerator;
use qwen_image_imaging::Image8;
use qwen_image_proto::v1::{
    Anchor, GenerationSettings, Img2ImgRequest, InpaintRequest, OutpaintRequest,
};

use super::settings::{self, Settings};
use super::{Geometry, Limits, invalid};
use crate::error::GatewayError;
use crate::images::{self, Pad, PreparedMask};

/// diffusers' default strength of the img2img and inpaint pipelines.
pub const DEFAULT_STRENGTH: f64 = 0.6;
/// Outpaint starts from pure noise in the new area (sigma_start = 1).
pub const DEFAULT_OUTPAINT_STRENGTH: f64 = 1.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Img2Img,
    Inpaint,
    Outpaint,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Img2Img => "img2img",
            Self::Inpaint => "inpaint",
            Self::Outpaint => "outpaint",
        }
    }
}

/// A validated image-flow request with its pixels prepared.
#[derive(Debug, Clone)]
pub struct EditParams {
    /// The common settings; `width_px` x `height_px` is the working (= output) size.
    pub settings: Settings,
    pub mode: Mode,
    pub strength: f64,
    /// First step that runs: `int(N - min(N * strength, N))`.
    pub start_step: u32,
    /// RGB at the working size, as sent to the VAE.
    pub image: Image8,
    /// Inpaint / outpaint.
    pub mask: Option<PreparedMask>,
    pub paste_back: bool,
    /// Outpaint: the padding used.
    pub padding: Option<Pad>,
}

/// diffusers' `get_timesteps`: `t_start = int(max(N - min(N * strength, N), 0))` in float64.
pub fn start_step(steps: u32, strength: f64) -> Result<u32, GatewayError> {
    if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
        return Err(invalid(format!(
            "strength {strength} is not allowed; send a value in (0, 1] (e.g. 0.6; 1 = start from pure noise)"
        )));
    }
    let n = f64::from(steps);
    let t_start = (n - (n * strength).min(n)).max(0.0) as u32;
    if t_start >= steps {
        return Err(invalid(format!(
            "strength {strength} with {steps} steps runs no denoising step (diffusers skips int({steps} - {steps} * strength) = {t_start} of them); send a larger strength"
        )));
    }
    Ok(t_start)
}

/// Working size: both given, or both 0 = the picture's size rounded down to a multiple of 16.
fn working_size(
    s: &GenerationSettings,
    img: &Image8,
    g: &Geometry,
    limits: &Limits,
) -> Result<(u32, u32), GatewayError> {
    let (m, max) = (g.size_multiple(), limits.max_side_px);
    match (s.width_px, s.height_px) {
        (0, 0) => {
            let (w, h) = (
                g.floor_to_multiple(img.width as u32),
                g.floor_to_multiple(img.height as u32),
            );
            if w == 0 || h == 0 || w > max || h > max {
                return Err(invalid(format!(
                    "the picture is {}x{} px, which gives no usable working size by default (multiples of {m}, at most {max}); send width_px and height_px",
                    img.width, img.height
                )));
            }
            Ok((w, h))
        }
        (0, _) | (_, 0) => Err(invalid(format!(
            "send both width_px and height_px, or neither (= the picture's size rounded down to a multiple of {m})"
        ))),
        wh => Ok(wh),
    }
}

/// The settings at the working size (the picture's, or the request's).
fn settings_for(
    s: GenerationSettings,
    size: (u32, u32),
    g: &Geometry,
    limits: &Limits,
    fallback_seed: u64,
) -> Result<Settings, GatewayError> {
    settings::convert(s, size, "the picture's size", g, limits, fallback_seed)
}

/// The strength, defaulted, and the step it starts at.
fn strength_and_start(
    strength: Option<f64>,
    default: f64,
    steps: u32,
) -> Result<(f64, u32), GatewayError> {
    let s = strength.unwrap_or(default);
    Ok((s, start_step(steps, s)?))
}

pub fn validate_img2img(
    req: Img2ImgRequest,
    g: &Geometry,
    limits: &Limits,
    fallback_seed: u64,
) -> Result<EditParams, GatewayError> {
    let s = req.settings.unwrap_or_default();
    let picture = images::decode_rgb("image", &req.image)?;
    let (w, h) = working_size(&s, &picture, g, limits)?;
    let settings = settings_for(s, (w, h), g, limits, fallback_seed)?;
    let (strength, start_step) =
        strength_and_start(req.strength, DEFAULT_STRENGTH, settings.steps)?;
    Ok(EditParams {
        image: images::resize_to(&picture, w, h)?,
        settings,
        mode: Mode::Img2Img,
        strength,
        start_step,
        mask: None,
        paste_back: false,
        padding: None,
    })
}

pub fn validate_inpaint(
    req: InpaintRequest,
    g: &Geometry,
    limits: &Limits,
    fallback_seed: u64,
) -> Result<EditParams, GatewayError> {
    let s = req.settings.unwrap_or_default();
    let picture = images::decode_rgb("image", &req.image)?;
    let mask = images::to_l(&images::decode("mask", &req.mask)?)?;
    if (mask.width, mask.height) != (picture.width, picture.height) {
        return Err(invalid(format!(
            "`mask` is {}x{} px but `image` is {}x{} px; send a mask of the image's size",
            mask.width, mask.height, picture.width, picture.height
        )));
    }
    let (w, h) = working_size(&s, &picture, g, limits)?;
    let settings = settings_for(s, (w, h), g, limits, fallback_seed)?;
    let (strength, start_step) =
        strength_and_start(req.strength, DEFAULT_STRENGTH, settings.steps)?;
    Ok(EditParams {
        image: images::resize_to(&picture, w, h)?,
        mask: Some(images::prepare_mask(&mask, w, h, g)?),
        settings,
        mode: Mode::Inpaint,
        strength,
        start_step,
        paste_back: req.paste_back,
        padding: None,
    })
}

/// Padding from the per-side fields or from a target size and anchor, rounded up to a canvas that is a
/// multiple of 16 (the extra goes right / bottom).
pub fn outpaint_padding(
    req: &OutpaintRequest,
    iw: u32,
    ih: u32,
    g: &Geometry,
    limits: &Limits,
) -> Result<Pad, GatewayError> {
    let max_side_px = limits.max_side_px;
    let multiple = g.size_multiple();
    let sides = [req.left_px, req.right_px, req.top_px, req.bottom_px];
    let (tw, th) = req
        .settings
        .as_ref()
        .map_or((0, 0), |s| (s.width_px, s.height_px));
    let mut pad = match (tw, th) {
        (0, 0) => Pad {
            left: req.left_px,
            right: req.right_px,
            top: req.top_px,
            bottom: req.bottom_px,
        },
        (0, _) | (_, 0) => {
            return Err(invalid(
                "send both width_px and height_px (target canvas size), or neither (then left/right/top/bottom_px)",
            ));
        }
        (tw, th) => {
            if sides.iter().any(|&v| v > 0) {
                return Err(invalid(
                    "send either a target size (width_px, height_px, anchor) or per-side padding (left/right/top/bottom_px), not both",
                ));
            }
            if tw < iw || th < ih {
                return Err(invalid(format!(
                    "target {tw}x{th} px is smaller than the {iw}x{ih} px picture; outpaint only adds pixels"
                )));
            }
            let (dx, dy) = (tw - iw, th - ih);
            let anchor = Anchor::try_from(req.anchor).unwrap_or(Anchor::Unspecified);
            let (fx, fy) = match anchor {
                Anchor::TopLeft => (0, 0),
                Anchor::Top => (1, 0),
                Anchor::TopRight => (2, 0),
                Anchor::Left => (0, 1),
                Anchor::Unspecified | Anchor::Center => (1, 1),
                Anchor::Right => (2, 1),
                Anchor::BottomLeft => (0, 2),
                Anchor::Bottom => (1, 2),
                Anchor::BottomRight => (2, 2),
            };
            // the image's offset on the canvas: 0, half the added pixels, or all of them
            let (left, top) = (dx * fx / 2, dy * fy / 2);
            Pad {
                left,
                right: dx - left,
                top,
                bottom: dy - top,
            }
        }
    };
    let (w, h) = (
        u64::from(iw) + u64::from(pad.left) + u64::from(pad.right),
        u64::from(ih) + u64::from(pad.top) + u64::from(pad.bottom),
    );
    if w == u64::from(iw) && h == u64::from(ih) {
        return Err(invalid(
            "nothing to outpaint: send left/right/top/bottom_px, or a target size larger than the picture",
        ));
    }
    let m = u64::from(multiple);
    let (rw, rh) = (w.div_ceil(m) * m, h.div_ceil(m) * m);
    if rw > u64::from(max_side_px) || rh > u64::from(max_side_px) {
        return Err(invalid(format!(
            "the outpainted canvas would be {rw}x{rh} px (picture {iw}x{ih} + padding, rounded up to a multiple of {multiple}); at most {max_side_px} per side is allowed, so add fewer pixels"
        )));
    }
    pad.right += (rw - w) as u32;
    pad.bottom += (rh - h) as u32;
    Ok(pad)
}

pub fn validate_outpaint(
    req: OutpaintRequest,
    g: &Geometry,
    limits: &Limits,
    fallback_seed: u64,
) -> Result<EditParams, GatewayError> {
    let picture = images::decode_rgb("image", &req.image)?;
    let pad = outpaint_padding(&req, picture.width as u32, picture.height as u32, g, limits)?;
    let (canvas, mask) = images::outpaint_canvas(&picture, pad)?;
    let (w, h) = (canvas.width as u32, canvas.height as u32);
    let settings = settings_for(
        req.settings.unwrap_or_default(),
        (w, h),
        g,
        limits,
        fallback_seed,
    )?;
    let (strength, start_step) =
        strength_and_start(req.strength, DEFAULT_OUTPAINT_STRENGTH, settings.steps)?;
    Ok(EditParams {
        mask: Some(images::prepare_mask(&mask, w, h, g)?),
        image: canvas,
        settings,
        mode: Mode::Outpaint,
        strength,
        start_step,
        paste_back: req.paste_back,
        padding: Some(pad),
    })
}

/// The generator's draws in diffusers' order: image posterior eps, noise (whole batch), then for inpaint
/// the masked-image posterior eps, which diffusers computes but never uses (drawn only to keep the
/// generator in step; the masked-image VAE encode itself is skipped).
pub struct Draws {
    pub image_eps: Vec<f32>,
    pub noise: Vec<f32>,
    pub masked_image_eps: Option<Vec<f32>>,
}

/// `per_image` = C·h·w values of one latent image.
pub fn draws_for(
    seed: u64,
    per_image: usize,
    batch: usize,
    inpaint: bool,
) -> Result<Draws, GatewayError> {
    let rng_err =
        |e: qwen_image_common::randn::TooFewElements| GatewayError::Internal(e.to_string());
    let mut g = TorchCpuGenerator::new(seed);
    let image_eps = g.randn(per_image).map_err(rng_err)?;
    let noise = g.randn(per_image * batch).map_err(rng_err)?;
    let masked_image_eps = if inpaint {
        Some(g.randn(per_image).map_err(rng_err)?)
    } else {
        None
    };
    Ok(Draws {
        image_eps,
        noise,
        masked_image_eps,
    })
}

/// The request's draws: per-image values C·h·w of its geometry.
pub fn draws(p: &EditParams, g: &Geometry) -> Result<Draws, GatewayError> {
    let (h, w) = p.settings.latent_hw(g);
    draws_for(
        p.settings.seed,
        g.latent_channels * h * w,
        p.settings.num_images as usize,
        p.mask.is_some(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: std::fmt::Debug>(r: Result<T, GatewayError>) -> String {
        match r {
            Err(GatewayError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn start_step_truncates_like_diffusers() {
        // QwenImageInpaintPipeline.get_timesteps: 4 steps at 0.6 → int(4 - 2.4) = 1
        assert_eq!(start_step(4, 0.6).expect("ok"), 1);
        assert_eq!(start_step(50, 0.6).expect("ok"), 20);
        // float64 as in Python: 5 * 0.6 = 3.0 exactly, t_start 2 (an f32 0.6 would give 1)
        assert_eq!(start_step(5, 0.6).expect("ok"), 2);
        assert_eq!(start_step(4, 0.7).expect("ok"), 1);
        assert_eq!(start_step(3, 1.0).expect("ok"), 0);
        // any N * strength in (0, 1) still leaves one step: int(4 - 0.8) = 3
        assert_eq!(start_step(4, 0.2).expect("ok"), 3);
        // below the float64 resolution of N nothing runs
        assert!(err(start_step(4, 1e-17)).contains("runs no denoising step"));
        assert!(err(start_step(4, 0.0)).contains("(0, 1]"));
        assert!(err(start_step(4, 1.5)).contains("(0, 1]"));
        assert!(err(start_step(4, f64::NAN)).contains("(0, 1]"));
    }

    fn outpaint(w: u32, h: u32, sides: [u32; 4], anchor: Anchor) -> OutpaintRequest {
        OutpaintRequest {
            settings: Some(qwen_image_proto::v1::GenerationSettings {
                width_px: w,
                height_px: h,
                ..Default::default()
            }),
            left_px: sides[0],
            right_px: sides[1],
            top_px: sides[2],
            bottom_px: sides[3],
            anchor: anchor as i32,
            ..Default::default()
        }
    }

    #[test]
    fn outpaint_padding_rounds_and_anchors() {
        let g = Geometry {
            latent_channels: 16,
            vae_scale_factor: 8,
            patch_size: 2,
            max_pixels: 0,
        };
        let pad = |r: OutpaintRequest| outpaint_padding(&r, 64, 64, &g, &Limits::default());
        let p = pad(outpaint(0, 0, [16, 0, 8, 24], Anchor::Unspecified)).expect("ok");
        assert_eq!((p.left, p.right, p.top, p.bottom), (16, 0, 8, 24));
        // 64 + 10 = 74 → 80: 6 more on the right
        let p = pad(outpaint(0, 0, [10, 0, 0, 0], Anchor::Unspecified)).expect("ok");
        assert_eq!((p.left, p.right, p.top, p.bottom), (10, 6, 0, 0));
        let p = pad(outpaint(128, 96, [0; 4], Anchor::Center)).expect("ok");
        assert_eq!((p.left, p.right, p.top, p.bottom), (32, 32, 16, 16));
        let p = pad(outpaint(128, 96, [0; 4], Anchor::BottomRight)).expect("ok");
        assert_eq!((p.left, p.right, p.top, p.bottom), (64, 0, 32, 0));
        let p = pad(outpaint(128, 64, [0; 4], Anchor::Left)).expect("ok");
        assert_eq!((p.left, p.right, p.top, p.bottom), (0, 64, 0, 0));
        assert!(err(pad(outpaint(0, 0, [0; 4], Anchor::Center))).contains("nothing to outpaint"));
        assert!(err(pad(outpaint(32, 96, [0; 4], Anchor::Center))).contains("smaller"));
        assert!(err(pad(outpaint(128, 0, [0; 4], Anchor::Center))).contains("both"));
        assert!(err(pad(outpaint(128, 128, [8, 0, 0, 0], Anchor::Center))).contains("not both"));
        assert!(err(pad(outpaint(0, 0, [2000, 0, 0, 0], Anchor::Center))).contains("at most 2048"));
    }
}
