//! The gateway's side of img2img / inpaint, checked against the dump through the gateway's request API
//! (`qwen_image_gateway::request`: what the gateway computes from a request before any stage call): picture
//! and mask preprocessing from the dump's input PNGs, the latent mask, and the generator's draws in
//! diffusers' order; then the VAE stage's side: the posterior sampled with the gateway's noise and
//! normalised, with the model crate's functions the VAE service uses. The geometry comes from the
//! snapshot's configs, as the stages describe it.

use anyhow::{Context, Result};
use qwen_image_gateway::request::edit::{
    Draws, EditParams, draws, draws_for, validate_img2img, validate_inpaint,
};
use qwen_image_gateway::request::pose::validate_pose;
use qwen_image_gateway::request::{Geometry, Limits};
use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::latents;
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::transformer::TransformerConfig;
use qwen_image_model::vae::{AutoencoderKLQwenImage, Posterior, VaeConfig};
use qwen_image_proto::v1::{
    GenerationSettings, Img2ImgRequest, InpaintRequest, PoseRequest, pose_request,
};

use super::{ParityArgs, Reference, Report};

/// Relative tolerance of the torch-compatible normal draws (a few f32 ulps).
const RNG_TOL: f64 = 1e-6;

/// Packed image latents and noise as the gateway and the VAE stage compute them, for the loop part.
pub struct Prepared {
    pub image_latents: Tensor,
    pub noise: Tensor,
}

fn to_tensor(v: &[f32], shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_slice(v, shape, &Device::Cpu)?)
}

fn gateway<T>(r: Result<T, qwen_image_gateway::GatewayError>) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("{e}"))
}

/// The model's geometry as the stages describe it, from the snapshot's configs.
pub fn geometry(snapshot: &Snapshot) -> Result<Geometry> {
    let vae: VaeConfig = snapshot.config("vae", "config.json")?;
    let t: TransformerConfig = snapshot.config("transformer", "config.json")?;
    Ok(Geometry {
        latent_channels: vae.z_dim,
        vae_scale_factor: vae.scale_factor() as u32,
        patch_size: t.patch_size as u32,
        // parity runs are not bounded by a stage's --max-pixels
        max_pixels: 0,
    })
}

/// The dump's size, steps and seed as the request's common settings.
fn settings(reference: &Reference) -> Result<GenerationSettings> {
    Ok(GenerationSettings {
        prompt: "parity".into(),
        width_px: reference.arg("width").as_u64().context("args.width")? as u32,
        height_px: reference.arg("height").as_u64().context("args.height")? as u32,
        steps: reference.arg("steps").as_u64().context("args.steps")? as u32,
        seed: Some(reference.arg("seed").as_u64().context("args.seed")?),
        ..Default::default()
    })
}

/// RGB8 pixels as diffusers' `VaeImageProcessor.preprocess` hands them to the VAE: `[1, 3, H, W]`, 2x/255 - 1.
fn to_unit_range(rgb: &[u8], w: usize, h: usize) -> Result<Tensor> {
    let mut chw = vec![0f32; 3 * w * h];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for ch in 0..3 {
            chw[ch * w * h + i] = 2.0 * (f32::from(px[ch]) / 255.0) - 1.0;
        }
    }
    to_tensor(&chw, &[1, 3, h, w])
}

/// The generator's first two draws against the dump's: the posterior eps `[1, C, 1, h, w]` of the
/// `what` picture, then the initial noise `[1, 1, C, h, w]` (torch's vectorised Box-Muller rounds differently
/// in the last bit or two, hence RNG_TOL rather than 0).
fn check_draws(
    d: &Draws,
    [c, lh, lw]: [usize; 3],
    what: &str,
    reference: &Reference,
    report: &mut Report,
) -> Result<(Tensor, Tensor)> {
    let eps = to_tensor(&d.image_eps, &[1, c, 1, lh, lw])?;
    report.compare(
        &format!("gateway: rng.0 ({what} posterior eps)"),
        &eps,
        &reference.f32("rng.0")?,
        RNG_TOL,
    )?;
    let noise = to_tensor(&d.noise, &[1, 1, c, lh, lw])?;
    report.compare(
        "gateway: rng.1 (noise)",
        &noise,
        &reference.f32("rng.1")?,
        RNG_TOL,
    )?;
    Ok((eps, noise))
}

/// The VAE stage's encode from the dump's own posterior: sampled with the gateway's eps, normalised with the
/// snapshot's statistics (`Posterior::sample` and `normalize`, as the VAE service computes), packed.
fn sampled_latents(snapshot: &Snapshot, reference: &Reference, eps: &Tensor) -> Result<Tensor> {
    let vae = AutoencoderKLQwenImage::load(snapshot, DType::F32, &Device::Cpu)?;
    let posterior = Posterior {
        mean: reference.f32("vae.encode.0.mean")?,
        logvar: reference.f32("vae.encode.0.logvar")?,
    };
    Ok(latents::pack(&vae.normalize(&posterior.sample(eps)?)?)?)
}

/// The gateway's parameters for the dump's request.
fn params(reference: &Reference, g: &Geometry, inpaint: bool) -> Result<EditParams> {
    let settings = settings(reference)?;
    let strength = reference.arg("strength").as_f64();
    let image = std::fs::read(reference.dir.join("input_image.png"))
        .context("input_image.png of the dump")?
        .into();
    let limits = Limits::default();
    if inpaint {
        let mask = std::fs::read(reference.dir.join("input_mask.png"))
            .context("input_mask.png of the dump")?
            .into();
        let req = InpaintRequest {
            settings: Some(settings),
            image,
            strength,
            mask,
            paste_back: false,
        };
        gateway(validate_inpaint(req, g, &limits, 0))
    } else {
        let req = Img2ImgRequest {
            settings: Some(settings),
            image,
            strength,
        };
        gateway(validate_img2img(req, g, &limits, 0))
    }
}

pub fn check(
    args: &ParityArgs,
    reference: &Reference,
    report: &mut Report,
    inpaint: bool,
) -> Result<Prepared> {
    let snapshot = Snapshot::open(&args.snapshot)?;
    let g = geometry(&snapshot)?;
    let p = params(reference, &g, inpaint)?;
    let (w, h) = (p.settings.width_px as usize, p.settings.height_px as usize);
    let (lh, lw) = p.settings.latent_hw(&g);
    let c = g.latent_channels;

    // init_image: RGB, LANCZOS to the working size, /255, 2x - 1
    report.compare(
        "gateway: init_image (RGB, LANCZOS, 2x/255 - 1)",
        &to_unit_range(&p.image.data, w, h)?,
        &reference.f32("init_image")?,
        1e-6,
    )?;

    // mask: L, LANCZOS, binarised; nearest to the latent grid, broadcast over channels, packed
    if let Some(m) = &p.mask {
        let px: Vec<f32> = m.pixels.iter().map(|&v| f32::from(v)).collect();
        report.compare(
            "gateway: mask_condition (L, LANCZOS, >= 0.5)",
            &to_tensor(&px, &[1, 1, h, w])?,
            &reference.f32("mask_condition")?,
            0.0,
        )?;
        let grid: Vec<f32> = (0..c)
            .flat_map(|_| m.latent.iter().map(|&v| f32::from(v)))
            .collect();
        let packed = latents::pack(&to_tensor(&grid, &[1, c, 1, lh, lw])?)?;
        report.compare(
            "gateway: mask_packed (nearest, top-left of each f x f cell)",
            &packed,
            &reference.f32("mask_packed")?,
            0.0,
        )?;
    }

    // generator draws in diffusers' order
    let d = gateway(draws(&p, &g))?;
    let (eps, noise) = check_draws(&d, [c, lh, lw], "image", reference, report)?;
    if let Some(m) = &d.masked_image_eps {
        report.compare(
            "gateway: rng.2 (masked-image eps, drawn and unused)",
            &to_tensor(m, &[1, c, 1, lh, lw])?,
            &reference.f32("rng.2")?,
            RNG_TOL,
        )?;
    }

    let image_latents = sampled_latents(&snapshot, reference, &eps)?;
    if reference.has("image_latents_packed") {
        report.compare(
            "vae: image_latents_packed (gateway eps, sampled, normalised)",
            &image_latents,
            &reference.f32("image_latents_packed")?,
            args.tol,
        )?;
    }
    let noise = latents::pack(&noise)?;
    if reference.has("noise_packed") {
        report.compare(
            "gateway: noise_packed",
            &noise,
            &reference.f32("noise_packed")?,
            RNG_TOL,
        )?;
    }
    Ok(Prepared {
        image_latents,
        noise,
    })
}

/// The gateway's side of the ControlNet pose flow (`controlnet` mode), through the gateway's request API:
/// the control picture from the dump's `input_control.png` as `validate_pose` prepares it (LANCZOS to the
/// output size) and as the VAE receives it, the generator's draws (the control posterior's eps, then the
/// initial noise: QwenImageControlNetPipeline samples `retrieve_latents(vae.encode(control_image),
/// generator)` before `prepare_latents`), then the VAE stage's side: the dump's posterior sampled with the
/// gateway's eps, normalised and packed, which is the ControlNet's `controlnet_cond`.
pub fn check_control(args: &ParityArgs, reference: &Reference, report: &mut Report) -> Result<()> {
    let snapshot = Snapshot::open(&args.snapshot)?;
    let g = geometry(&snapshot)?;
    let image = std::fs::read(reference.dir.join("input_control.png"))
        .context("input_control.png of the dump")?;
    let req = PoseRequest {
        settings: Some(settings(reference)?),
        pose: Some(pose_request::Pose::PoseImage(image.into())),
        ..Default::default()
    };
    let p = gateway(validate_pose(req, &g, &Limits::default(), 0))?;
    let (w, h) = (p.settings.width_px as usize, p.settings.height_px as usize);
    let (lh, lw) = p.settings.latent_hw(&g);
    let c = g.latent_channels;
    let control = to_unit_range(&p.control.data, w, h)?;
    report.compare(
        "gateway: control_image (RGB, LANCZOS, 2x/255 - 1)",
        &control,
        &reference.f32("control_image")?,
        1e-6,
    )?;
    report.compare(
        "gateway: vae.encode.0.in (the control image the VAE stage encodes)",
        &control.unsqueeze(2)?,
        &reference.f32("vae.encode.0.in")?,
        1e-6,
    )?;

    let d = gateway(draws_for(p.settings.seed, c * lh * lw, 1, false))?;
    let (eps, noise) = check_draws(&d, [c, lh, lw], "control", reference, report)?;
    report.compare(
        "gateway: latents_init_packed",
        &latents::pack(&noise)?,
        &reference.f32("latents_init_packed")?,
        RNG_TOL,
    )?;

    let cond = sampled_latents(&snapshot, reference, &eps)?;
    report.compare(
        "vae: controlnet_cond (gateway eps, sampled, normalised, packed)",
        &cond,
        &reference.f32("step.0.controlnet.0.controlnet_cond")?,
        args.tol,
    )?;
    Ok(())
}
