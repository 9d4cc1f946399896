//! Inpaint parity (`inpaint` mode): start latents from strength, the loop with per-step blending of the
//! re-noised original into the unmasked region, from the dump's own image latents, noise and mask.
//! `img2img` mode: the same loop without blending, from the image latents and noise the gateway computes.
//! Both first check the gateway-side preprocessing (`image_prep`).

use anyhow::{Context, Result};
use qwen_image_model::denoise::{self, DenoiseParams, Flow, InpaintBlend, Outcome, scale_noise};
use qwen_image_model::scheduler::{Schedule, SchedulerConfig, strength_start};
use qwen_image_model::snapshot::Snapshot;

use super::t2i::{conditioning, img_shapes, load_transformer};
use super::{ParityArgs, Reference, Report, image_prep, textenc, vae};

pub fn check(args: &ParityArgs, reference: &Reference, report: &mut Report) -> Result<()> {
    let snapshot = Snapshot::open(&args.snapshot)?;
    let model = load_transformer(args)?;
    let sched_cfg: SchedulerConfig = snapshot.config("scheduler", "scheduler_config.json")?;
    let steps = reference
        .arg("steps")
        .as_u64()
        .context("manifest args.steps")? as usize;
    let strength = reference
        .arg("strength")
        .as_f64()
        .context("manifest args.strength")?;
    let is_inpaint = reference.mode() == "inpaint";
    let prepared = image_prep::check(args, reference, report, is_inpaint)?;
    let (image_latents, noise, mask) = if is_inpaint {
        (
            reference.f32("image_latents_packed")?,
            reference.f32("noise_packed")?,
            Some(reference.f32("mask_packed")?),
        )
    } else {
        (prepared.image_latents, prepared.noise, None)
    };
    let schedule = Schedule::for_pipeline(&sched_cfg, steps, image_latents.dim(1)?)
        .map_err(anyhow::Error::msg)?;
    let start = strength_start(steps, strength);
    let ran = (0..steps)
        .filter(|i| reference.has(&format!("step.{i}.t")))
        .count();
    report.check(
        "steps run (strength)",
        ran == steps - start,
        format!(
            "ours {} (t_start {start} of {steps}, strength {strength}), reference {ran}",
            steps - start
        ),
    );

    // start latents: scale_noise(image_latents, sigmas[t_start], noise)
    let latents0 = scale_noise(&image_latents, &noise, schedule.sigmas[start])?;
    report.compare(
        "latents_init_packed",
        &latents0,
        &reference.f32("latents_init_packed")?,
        args.tol,
    )?;

    let shapes = img_shapes(reference.scalar("step.0.transformer.cond.img_shapes"))?;
    let positive = conditioning(reference, "prompt_embeds")?;
    let negative = if reference.has("negative_prompt_embeds") {
        Some(conditioning(reference, "negative_prompt_embeds")?)
    } else {
        None
    };
    let blend = mask.map(|mask| InpaintBlend {
        image_latents,
        noise,
        mask,
    });
    let params = DenoiseParams {
        positive: &positive,
        negative: negative.as_ref(),
        true_cfg_scale: reference.arg("true_cfg_scale").as_f64().unwrap_or(1.0),
        latents: latents0,
        img_shapes: &shapes,
        schedule: &schedule,
        start_step: start,
        inpaint: blend.as_ref(),
        controlnet: &[],
    };
    let mut per_step = Vec::new();
    let outcome = denoise::denoise(&model, &params, |s| {
        per_step.push((s.done, s.noise_pred.clone(), s.latents.clone()));
        Flow::Continue
    })?;
    // the dump numbers steps from 0 over the steps that ran
    for (i, v, lat) in &per_step {
        let np = format!("step.{i}.noise_pred");
        if reference.has(&np) {
            report.compare(
                &np,
                v,
                &reference.f32(&np)?,
                if *i == 0 { args.tol } else { args.loop_tol },
            )?;
        }
        let name = format!("step.{i}.latents_end");
        if reference.has(&name) {
            report.compare(&name, lat, &reference.f32(&name)?, args.loop_tol)?;
        }
    }
    let Outcome::Finished(final_latents) = outcome else {
        anyhow::bail!("the loop stopped early")
    };
    let last = per_step.len() - 1;
    report.compare(
        &format!("final latents (step.{last}.latents_end)"),
        &final_latents,
        &reference.f32(&format!("step.{last}.latents_end"))?,
        args.loop_tol,
    )?;
    if let Some(b) = &blend {
        // Where the mask is 0 the last blend puts the clean image latents back: exactly, so the kept area
        // of an inpaint is the VAE round trip of the input, up to the decoder's mixing near the mask edge.
        let kept = ((&final_latents - &b.image_latents)? * (1.0 - &b.mask)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        report.check(
            "unmasked final latents == image latents",
            kept == 0.0,
            format!("max |final - image latents| where the mask is 0: {kept:e}"),
        );
    }

    textenc::check_t2i_part(args, reference, report)?;
    vae::check_t2i_part(args, reference, report)?;
    Ok(())
}
