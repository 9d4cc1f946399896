//! Image to image, inpaint and outpaint over the stages (diffusers QwenImageImg2ImgPipeline and
//! QwenImageInpaintPipeline; outpaint = inpaint of a larger canvas). The prompt and the picture are encoded
//! concurrently; the gateway samples the VAE posterior and draws the noise from the request's
//! torch-compatible generator in diffusers' order, and the denoiser mixes them at `sigma[t_start]`
//! (`DenoiseRequest.start_noise`) and, for inpaint, blends after every step. Denoise and decode are the
//! text-to-image flow's.

use qwen_image_common::randn::TorchCpuGenerator;
use qwen_image_common::tensor;
use qwen_image_imaging::Image8;
use qwen_image_proto::v1::{
    Anchor, DataType, EncodeImageRequest, EncodeImageResponse, GenerateResult, Image,
    Img2ImgRequest, InpaintInputs, InpaintRequest, OutpaintRequest, Padding, PreviewSettings,
    Stage, Tensor, TextToImageRequest,
};

use crate::error::{GatewayError, StageName};
use crate::images::{self, Pad, PreparedMask};
use crate::t2i::{self, Ctx, Finish, Start};
use crate::validate::{LATENT_CHANNELS, SIZE_MULTIPLE, T2iParams, validate};

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
    /// The common options; `width_px` x `height_px` is the working (= output) size.
    pub base: T2iParams,
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

fn invalid(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument(msg.into())
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

/// The common options (fields 1-10) checked by the text-to-image rules at an explicit working size.
#[allow(clippy::too_many_arguments)]
fn common(
    prompt: String,
    negative_prompt: Option<String>,
    width_px: u32,
    height_px: u32,
    steps: u32,
    true_cfg_scale: Option<f32>,
    seed: Option<u64>,
    preview: Option<PreviewSettings>,
    num_images: u32,
    max_side_px: u32,
    fallback_seed: u64,
) -> Result<T2iParams, GatewayError> {
    validate(
        TextToImageRequest {
            prompt,
            negative_prompt,
            width_px,
            height_px,
            steps,
            true_cfg_scale,
            seed,
            initial_latents: None,
            preview,
            num_images,
        },
        max_side_px,
        fallback_seed,
    )
}

/// Working size: both given, or both 0 = the picture's size rounded down to a multiple of 16.
fn working_size(
    width_px: u32,
    height_px: u32,
    img: &Image8,
    max_side_px: u32,
) -> Result<(u32, u32), GatewayError> {
    match (width_px, height_px) {
        (0, 0) => {
            let floor = |v: usize| (v as u32 / SIZE_MULTIPLE) * SIZE_MULTIPLE;
            let (w, h) = (floor(img.width), floor(img.height));
            if w == 0 || h == 0 || w > max_side_px || h > max_side_px {
                return Err(invalid(format!(
                    "the picture is {}x{} px, which gives no usable working size by default (multiples of {SIZE_MULTIPLE}, at most {max_side_px}); send width_px and height_px",
                    img.width, img.height
                )));
            }
            Ok((w, h))
        }
        (0, _) | (_, 0) => Err(invalid(
            "send both width_px and height_px, or neither (= the picture's size rounded down to a multiple of 16)",
        )),
        wh => Ok(wh),
    }
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
    max_side_px: u32,
    fallback_seed: u64,
) -> Result<EditParams, GatewayError> {
    let picture = images::to_rgb(&images::decode("image", &req.image)?)?;
    let (w, h) = working_size(req.width_px, req.height_px, &picture, max_side_px)?;
    let base = common(
        req.prompt,
        req.negative_prompt,
        w,
        h,
        req.steps,
        req.true_cfg_scale,
        req.seed,
        req.preview,
        req.num_images,
        max_side_px,
        fallback_seed,
    )?;
    let (strength, start_step) = strength_and_start(req.strength, DEFAULT_STRENGTH, base.steps)?;
    Ok(EditParams {
        image: images::resize_to(&picture, w, h)?,
        base,
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
    max_side_px: u32,
    fallback_seed: u64,
) -> Result<EditParams, GatewayError> {
    let picture = images::to_rgb(&images::decode("image", &req.image)?)?;
    let mask = images::to_l(&images::decode("mask", &req.mask)?)?;
    if (mask.width, mask.height) != (picture.width, picture.height) {
        return Err(invalid(format!(
            "`mask` is {}x{} px but `image` is {}x{} px; send a mask of the image's size",
            mask.width, mask.height, picture.width, picture.height
        )));
    }
    let (w, h) = working_size(req.width_px, req.height_px, &picture, max_side_px)?;
    let base = common(
        req.prompt,
        req.negative_prompt,
        w,
        h,
        req.steps,
        req.true_cfg_scale,
        req.seed,
        req.preview,
        req.num_images,
        max_side_px,
        fallback_seed,
    )?;
    let (strength, start_step) = strength_and_start(req.strength, DEFAULT_STRENGTH, base.steps)?;
    Ok(EditParams {
        image: images::resize_to(&picture, w, h)?,
        mask: Some(images::prepare_mask(&mask, w, h)?),
        base,
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
    max_side_px: u32,
) -> Result<Pad, GatewayError> {
    let sides = [req.left_px, req.right_px, req.top_px, req.bottom_px];
    let mut pad = match (req.width_px, req.height_px) {
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
    let m = u64::from(SIZE_MULTIPLE);
    let (rw, rh) = (w.div_ceil(m) * m, h.div_ceil(m) * m);
    if rw > u64::from(max_side_px) || rh > u64::from(max_side_px) {
        return Err(invalid(format!(
            "the outpainted canvas would be {rw}x{rh} px (picture {iw}x{ih} + padding, rounded up to a multiple of {SIZE_MULTIPLE}); at most {max_side_px} per side is allowed, so add fewer pixels"
        )));
    }
    pad.right += (rw - w) as u32;
    pad.bottom += (rh - h) as u32;
    Ok(pad)
}

pub fn validate_outpaint(
    req: OutpaintRequest,
    max_side_px: u32,
    fallback_seed: u64,
) -> Result<EditParams, GatewayError> {
    let picture = images::to_rgb(&images::decode("image", &req.image)?)?;
    let pad = outpaint_padding(
        &req,
        picture.width as u32,
        picture.height as u32,
        max_side_px,
    )?;
    let (canvas, mask) = images::outpaint_canvas(&picture, pad)?;
    let (w, h) = (canvas.width as u32, canvas.height as u32);
    let base = common(
        req.prompt,
        req.negative_prompt,
        w,
        h,
        req.steps,
        req.true_cfg_scale,
        req.seed,
        req.preview,
        req.num_images,
        max_side_px,
        fallback_seed,
    )?;
    let (strength, start_step) =
        strength_and_start(req.strength, DEFAULT_OUTPAINT_STRENGTH, base.steps)?;
    Ok(EditParams {
        mask: Some(images::prepare_mask(&mask, w, h)?),
        image: canvas,
        base,
        mode: Mode::Outpaint,
        strength,
        start_step,
        paste_back: req.paste_back,
        padding: Some(pad),
    })
}

/// The VAE posterior of the working-size picture: (mean, logvar, latents_mean, latents_std), checked.
pub type Posterior = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn check_posterior(
    resp: EncodeImageResponse,
    h: usize,
    w: usize,
) -> Result<Posterior, GatewayError> {
    let bad = |d: String| GatewayError::bad_response(StageName::Vae, d);
    let expected = [1, LATENT_CHANNELS, 1, h, w];
    let get = |t: Option<&Tensor>, name: &str| -> Result<Vec<f32>, GatewayError> {
        let t = t.ok_or_else(|| bad(format!("no {name}")))?;
        let host =
            tensor::to_f32(t, name, &[DataType::F32], &[5]).map_err(|e| bad(e.to_string()))?;
        if host.shape != expected {
            return Err(bad(format!(
                "{name} has shape {:?}, expected {expected:?}",
                host.shape
            )));
        }
        Ok(host.data)
    };
    let mean = get(resp.mean.as_ref(), "mean")?;
    let logvar = get(resp.logvar.as_ref(), "logvar")?;
    if resp.latents_mean.len() != LATENT_CHANNELS || resp.latents_std.len() != LATENT_CHANNELS {
        return Err(bad(format!(
            "{} latents_mean / {} latents_std values, expected {LATENT_CHANNELS}",
            resp.latents_mean.len(),
            resp.latents_std.len()
        )));
    }
    Ok((mean, logvar, resp.latents_mean, resp.latents_std))
}

/// diffusers' `retrieve_latents(sample)` then `(z - latents_mean) * (1 / latents_std)`, in f32:
/// `z = mean + exp(0.5 * logvar) * eps`.
pub fn normalised_sample(posterior: &Posterior, eps: &[f32]) -> Vec<f32> {
    let (mean, logvar, lmean, lstd) = posterior;
    let per_channel = mean.len() / LATENT_CHANNELS;
    mean.iter()
        .zip(logvar)
        .zip(eps)
        .enumerate()
        .map(|(i, ((m, lv), e))| {
            let c = i / per_channel;
            let z = m + (0.5 * lv).exp() * e;
            (z - lmean[c]) * (1.0 / lstd[c])
        })
        .collect()
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

pub fn draws(p: &EditParams) -> Result<Draws, GatewayError> {
    let (h, w) = p.base.latent_hw();
    draws_for(
        p.base.seed,
        LATENT_CHANNELS * h * w,
        p.base.num_images as usize,
        p.mask.is_some(),
    )
}

async fn encode_image(ctx: &Ctx<'_>, p: &EditParams) -> Result<Posterior, GatewayError> {
    ctx.progress(Stage::EncodeImage, 0, 0).await;
    let (h, w) = p.base.latent_hw();
    let resp = t2i::phase(
        "encode_image",
        StageName::Vae,
        "Encode",
        ctx.stages.encode_image(
            EncodeImageRequest {
                images: vec![Image {
                    width_px: p.base.width_px,
                    height_px: p.base.height_px,
                    rgb8: p.image.data.clone().into(),
                }],
            },
            ctx.deadline,
        ),
    )
    .await?;
    check_posterior(resp, h, w)
}

pub async fn run(ctx: &Ctx<'_>, p: &EditParams) -> Result<GenerateResult, GatewayError> {
    let base = &p.base;
    let batch = base.num_images as usize;
    let (prompts, posterior) = tokio::join!(t2i::encode_prompts(ctx, base), encode_image(ctx, p));
    let (prompts, posterior) = (prompts?, posterior?);
    let model_id = prompts.model_id.clone();
    let truncation = prompts.truncation;

    let d = draws(p)?;
    let image_latents = normalised_sample(&posterior, &d.image_eps).repeat(batch);
    let (h, w) = base.latent_hw();
    let shape = [batch, LATENT_CHANNELS, 1, h, w];
    let image_latents = tensor::from_f32(&shape, &image_latents);
    let noise = tensor::from_f32(&shape, &d.noise);
    let inpaint = p.mask.as_ref().map(|m| {
        let one: Vec<f32> = (0..LATENT_CHANNELS)
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
    let latents = t2i::denoise(ctx, base, prompts, start).await?;

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
    t2i::decode(ctx, base, model_id, latents, finish).await
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
            width_px: w,
            height_px: h,
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
        let pad = |r: OutpaintRequest| outpaint_padding(&r, 64, 64, 2048);
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

    #[test]
    fn normalises_the_posterior_sample() {
        let n = LATENT_CHANNELS;
        let post: Posterior = (
            vec![1.0; n],
            vec![2.0f32.ln() * 2.0; n], // exp(0.5 * logvar) = 2
            (0..n).map(|c| c as f32).collect(),
            vec![4.0; n],
        );
        let z = normalised_sample(&post, &vec![0.5; n]);
        // (1 + 2 * 0.5 - c) * 0.25
        assert!((z[0] - 0.5).abs() < 1e-6 && z[2].abs() < 1e-6, "{z:?}");
    }
}
