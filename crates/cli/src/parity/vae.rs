//! VAE parity: `vae` mode dumps (encode → posterior → sample → normalise → decode → 8-bit image) and the
//! decode part of `t2i` dumps (unpack → denormalise → decode → 8-bit image).

use anyhow::{Context, Result};
use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::latents;
use qwen_image_model::vae::{self, AutoencoderKLQwenImage};

use super::{ParityArgs, Reference, Report};

/// 8-bit images may differ by one level where the f32 value sits on a rounding boundary.
const U8_LEVELS: u8 = 1;

/// The VAE of the snapshot, or of `--vae-weights` (config from the snapshot).
pub fn load_vae(args: &ParityArgs) -> Result<AutoencoderKLQwenImage> {
    let (weights, config) =
        args.sources(args.weights.vae.vae_weights.as_deref(), "--vae-weights")?;
    let loaded = qwen_image_model::source::load_vae(&weights, &config, &args.load_options())?;
    println!("vae weights: {}", loaded.memory);
    Ok(loaded.model)
}

/// Flattened uint8 bytes of a `[B, H, W, 3]` reference.
fn u8_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(t.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?)
}

/// Our decode of `z` → 8-bit bytes compared with `reference[name]`.
fn compare_image(
    report: &mut Report,
    reference: &Reference,
    name: &str,
    decoded: &Tensor,
) -> Result<()> {
    let ours: Vec<u8> = vae::to_rgb8(decoded)?.concat();
    report.compare_u8(name, &ours, &u8_bytes(reference.get(name)?)?, U8_LEVELS);
    Ok(())
}

/// Exact bit equality (reported as a check line, with the max abs difference).
fn bit_exact(report: &mut Report, name: &str, ours: &Tensor, reference: &Tensor) -> Result<()> {
    let a = ours.flatten_all()?.to_vec1::<f32>()?;
    let b = reference.flatten_all()?.to_vec1::<f32>()?;
    let same = a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
    let max_abs = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    report.check(
        name,
        same,
        format!("bit-exact: {same} (max_abs {max_abs:.3e})"),
    );
    Ok(())
}

pub fn check(args: &ParityArgs, reference: &Reference, report: &mut Report) -> Result<()> {
    let model = load_vae(args)?;
    let tol = args.tol;

    // --- preprocessing: the dump's input is x/255*2-1 of 8-bit pixels; rebuild the bytes and redo it
    let input = reference.f32("vae.input")?; // [B, 3, H, W]
    let (b, _, h, w) = input.dims4()?;
    let px = ((((&input + 1.0)? * 0.5)? * 255.0)?
        .round()?
        .clamp(0.0, 255.0)?)
    .to_dtype(DType::U8)?;
    let mut rebuilt = Vec::with_capacity(b);
    for i in 0..b {
        let bytes = px
            .get(i)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1::<u8>()?; // HWC
        rebuilt.push(vae::from_rgb8(&bytes, w, h, &Device::Cpu)?);
    }
    bit_exact(
        report,
        "vae.input (from_rgb8)",
        &Tensor::cat(&rebuilt, 0)?,
        &input,
    )?;

    // --- encode
    let posterior = model.encode(&input)?;
    report.compare(
        "vae.posterior_mean",
        &posterior.mean,
        &reference.f32("vae.posterior_mean")?,
        tol,
    )?;
    report.compare(
        "vae.posterior_logvar",
        &posterior.logvar,
        &reference.f32("vae.posterior_logvar")?,
        tol,
    )?;
    report.compare(
        "vae.posterior_std",
        &posterior.std()?,
        &reference.f32("vae.posterior_std")?,
        tol,
    )?;
    let sample = posterior.sample(&reference.f32("vae.sample_eps")?)?;
    report.compare(
        "vae.posterior_sample",
        &sample,
        &reference.f32("vae.posterior_sample")?,
        tol,
    )?;
    // normalised from OUR mean (the pipeline's `(z - mean) * (1/std)`; the dump divides by std)
    let normalized = model.normalize(&posterior.mean)?;
    report.compare(
        "vae.latents_normalized",
        &normalized,
        &reference.f32("vae.latents_normalized")?,
        tol,
    )?;
    let back = model.denormalize(&normalized)?;
    report.compare(
        "normalize/denormalize round trip",
        &back,
        &posterior.mean,
        1e-6,
    )?;

    // --- decode of the reference posterior mean (isolates the decoder from encoder error)
    let decoded = model.decode(&reference.f32("vae.posterior_mean")?)?; // [B, 3, H, W]
    let ref_decoded = reference.f32("vae.decoded")?; // [B, 3, 1, H, W]
    report.compare("vae.decoded", &decoded.unsqueeze(2)?, &ref_decoded, tol)?;
    compare_image(report, reference, "roundtrip_uint8", &decoded)?;
    // and end to end from our own encode
    let decoded_own = model.decode(&posterior.mean)?;
    report.compare(
        "vae.decoded (from our encode)",
        &decoded_own.unsqueeze(2)?,
        &ref_decoded,
        tol,
    )?;
    Ok(())
}

/// The decode part of a t2i dump (`vae.decode.0.*`, `image_uint8`), from the dump's final packed latents.
pub fn check_t2i_part(args: &ParityArgs, reference: &Reference, report: &mut Report) -> Result<()> {
    let model = load_vae(args)?;
    let f = model.config().scale_factor();
    let height = reference
        .arg("height")
        .as_u64()
        .context("manifest args.height")? as usize;
    let width = reference
        .arg("width")
        .as_u64()
        .context("manifest args.width")? as usize;
    // prepare_latents: latent size 2·(H // (2f)) so that 2x2 packing divides it
    let (lh, lw) = (2 * (height / (2 * f)), 2 * (width / (2 * f)));
    // t2i dumps hold `latents_final_packed`; inpaint / controlnet dumps end with the last step's latents
    let packed = if reference.has("latents_final_packed") {
        reference.f32("latents_final_packed")?
    } else {
        let last = (0..10_000)
            .take_while(|i| reference.has(&format!("step.{i}.t")))
            .last();
        let last = last.context("the dump has no denoising steps")?;
        reference.f32(&format!("step.{last}.latents_end"))?
    };
    let z = model.denormalize(&latents::unpack(&packed, lh, lw)?)?; // [B, z, 1, h, w]
    let ref_in = reference.f32("vae.decode.0.in")?;
    report.compare("vae.decode.0.in (denormalize)", &z, &ref_in, args.tol)?;
    bit_exact(report, "vae.decode.0.in (x / (1/std) + mean)", &z, &ref_in)?;
    let decoded = model.decode(&ref_in)?; // [B, 3, H, W]
    report.compare(
        "vae.decode.0.out",
        &decoded.unsqueeze(2)?,
        &reference.f32("vae.decode.0.out")?,
        args.tol,
    )?;
    compare_image(report, reference, "image_uint8", &decoded)?;
    Ok(())
}
