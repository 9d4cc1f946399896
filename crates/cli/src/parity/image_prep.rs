//! The gateway's side of img2img / inpaint, checked against the dump: picture and mask preprocessing from the
//! dump's input PNGs, the generator's draws in diffusers' order, the posterior sample and its normalisation,
//! and the latent mask. Uses the gateway's own functions (`qwen_image_gateway::{images, edit}`).

use anyhow::{Context, Result};
use qwen_image_gateway::{edit, images};
use qwen_image_model::candle_core::{Device, Tensor};
use qwen_image_model::latents;
use qwen_image_model::snapshot::Snapshot;

use super::{ParityArgs, Reference, Report};

/// Relative tolerance of the torch-compatible normal draws (a few f32 ulps).
const RNG_TOL: f64 = 1e-6;

/// Packed image latents and noise as the gateway computes them, for the loop part.
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

#[derive(serde::Deserialize)]
struct VaeNorm {
    latents_mean: Vec<f32>,
    latents_std: Vec<f32>,
}

pub fn check(
    args: &ParityArgs,
    reference: &Reference,
    report: &mut Report,
    inpaint: bool,
) -> Result<Prepared> {
    let width = reference.arg("width").as_u64().context("args.width")? as u32;
    let height = reference.arg("height").as_u64().context("args.height")? as u32;
    let seed = reference.arg("seed").as_u64().context("args.seed")?;
    let (w, h) = (width as usize, height as usize);
    let (lh, lw) = (h / 8, w / 8);
    let c = 16;

    // init_image: RGB, LANCZOS to the working size, /255, 2x - 1
    let bytes = std::fs::read(reference.dir.join("input_image.png"))
        .context("input_image.png of the dump")?;
    let picture = gateway(images::to_rgb(&gateway(images::decode("image", &bytes))?))?;
    let resized = gateway(images::resize_to(&picture, width, height))?;
    let mut chw = vec![0f32; 3 * w * h];
    for (i, px) in resized.data.chunks_exact(3).enumerate() {
        for ch in 0..3 {
            chw[ch * w * h + i] = 2.0 * (f32::from(px[ch]) / 255.0) - 1.0;
        }
    }
    report.compare(
        "gateway: init_image (RGB, LANCZOS, 2x/255 - 1)",
        &to_tensor(&chw, &[1, 3, h, w])?,
        &reference.f32("init_image")?,
        1e-6,
    )?;

    // mask: L, LANCZOS, binarised; nearest to the latent grid, broadcast over channels, packed
    if inpaint {
        let bytes = std::fs::read(reference.dir.join("input_mask.png"))
            .context("input_mask.png of the dump")?;
        let l = gateway(images::to_l(&gateway(images::decode("mask", &bytes))?))?;
        let m = gateway(images::prepare_mask(&l, width, height))?;
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
            "gateway: mask_packed (nearest, top-left of 8x8)",
            &packed,
            &reference.f32("mask_packed")?,
            0.0,
        )?;
    }

    // generator draws in diffusers' order (torch's vectorised Box-Muller rounds differently in the last
    // bit or two, hence RNG_TOL rather than 0)
    let d = gateway(edit::draws_for(seed, c * lh * lw, 1, inpaint))?;
    let eps = to_tensor(&d.image_eps, &[1, c, 1, lh, lw])?;
    report.compare(
        "gateway: rng.0 (image posterior eps)",
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
    if let Some(m) = &d.masked_image_eps {
        report.compare(
            "gateway: rng.2 (masked-image eps, drawn and unused)",
            &to_tensor(m, &[1, c, 1, lh, lw])?,
            &reference.f32("rng.2")?,
            RNG_TOL,
        )?;
    }

    // posterior sample from the dump's own VAE mean/logvar, normalised with the snapshot's statistics
    let snapshot = Snapshot::open(&args.snapshot)?;
    let norm: VaeNorm = snapshot.config("vae", "config.json")?;
    let mean = reference
        .f32("vae.encode.0.mean")?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let logvar = reference
        .f32("vae.encode.0.logvar")?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let z = edit::normalised_sample(
        &(mean, logvar, norm.latents_mean, norm.latents_std),
        &d.image_eps,
    );
    let image_latents = latents::pack(&to_tensor(&z, &[1, c, 1, lh, lw])?)?;
    if reference.has("image_latents_packed") {
        report.compare(
            "gateway: image_latents_packed (sample, normalised)",
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
