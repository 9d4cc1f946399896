//! Text-to-image parity: schedule, step-0 transformer passes, per-step and final latents (starting from the
//! dump's own initial latents and prompt embeddings), then the text-encoder and decode parts.

use anyhow::{Context, Result};
use qwen_image_model::candle_core::{Device, Tensor};
use qwen_image_model::denoise::{self, Conditioning, DenoiseParams, Flow, Outcome};
use qwen_image_model::rope::ImgShape;
use qwen_image_model::scheduler::{Schedule, SchedulerConfig};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::transformer::{QwenImageTransformer, TransformerInputs};

use super::{ParityArgs, Reference, Report, textenc, vae};

/// The first batch element's image list from a dumped `img_shapes`: t2i passes `[[(1,h,w)]]*B`, the
/// ControlNet pipeline `[(1,h,w)]*B`.
pub fn img_shapes(v: &serde_json::Value) -> Result<Vec<ImgShape>> {
    let first = v.get(0).context("img_shapes is empty")?;
    let nested = first.get(0).is_some_and(|x| x.is_array());
    let entries: Vec<&serde_json::Value> = if nested {
        first.as_array().context("img_shapes")?.iter().collect()
    } else {
        vec![first]
    };
    entries
        .into_iter()
        .map(|s| {
            let n: Vec<usize> = s
                .as_array()
                .context("img_shapes entry is not a list")?
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|u| u as usize)
                        .context("img_shapes entry is not an integer")
                })
                .collect::<Result<_>>()?;
            anyhow::ensure!(n.len() == 3, "img_shapes entry {n:?} is not (frames, h, w)");
            Ok((n[0], n[1], n[2]))
        })
        .collect()
}

/// Conditioning from dumped `name` / `name_mask` tensors (the mask is `None` when diffusers had `None`).
pub fn conditioning(reference: &Reference, name: &str) -> Result<Conditioning> {
    let embeds = reference.f32(name)?;
    let mask = if reference
        .scalar(&format!("{name}_mask_is_none"))
        .as_bool()
        .unwrap_or(false)
    {
        None
    } else {
        Some(reference.f32(&format!("{name}_mask"))?)
    };
    Ok(Conditioning { embeds, mask })
}

/// The transformer of the snapshot, or of `--transformer-weights` (config from the snapshot).
pub fn load_transformer(args: &ParityArgs) -> Result<QwenImageTransformer> {
    let file = args.weights.transformer.transformer_weights.as_deref();
    let (weights, config) = args.sources(file, "--transformer-weights")?;
    let loaded =
        qwen_image_model::source::load_transformer(&weights, &config, &args.load_options())?;
    println!("transformer weights: {}", loaded.memory);
    Ok(loaded.model)
}

pub fn check(args: &ParityArgs, reference: &Reference, report: &mut Report) -> Result<()> {
    let snapshot = Snapshot::open(&args.snapshot)?;
    let sched_cfg: SchedulerConfig = snapshot.config("scheduler", "scheduler_config.json")?;
    let model = load_transformer(args)?;

    // --- schedule
    let latents0 = reference.f32("latents_init_packed")?;
    let seq_len = latents0.dim(1)?;
    let steps = reference
        .arg("steps")
        .as_u64()
        .context("manifest args.steps")? as usize;
    let schedule =
        Schedule::for_pipeline(&sched_cfg, steps, seq_len).map_err(anyhow::Error::msg)?;
    if let Some(mu) = reference.scalar("scheduler_set_timesteps_kwargs")["mu"].as_f64() {
        let ours = schedule.mu.unwrap_or(f64::NAN);
        report.check(
            "mu",
            (ours - mu).abs() < 1e-12,
            format!("ours {ours} reference {mu}"),
        );
    }
    let n = schedule.sigmas.len();
    report.compare(
        "sched.sigmas",
        &Tensor::from_vec(schedule.sigmas.clone(), n, &Device::Cpu)?,
        &reference.f32("sched.sigmas")?,
        1e-6,
    )?;
    report.compare(
        "sched.timesteps",
        &Tensor::from_vec(schedule.timesteps.clone(), n - 1, &Device::Cpu)?,
        &reference.f32("sched.timesteps")?,
        1e-6,
    )?;

    // --- step-0 transformer passes, each on the dump's own inputs
    let shapes = img_shapes(reference.scalar("step.0.transformer.cond.img_shapes"))?;
    for branch in ["cond", "uncond"] {
        let p = format!("step.0.transformer.{branch}");
        if !reference.has(&format!("{p}.out")) {
            continue;
        }
        let mask = if reference
            .scalar(&format!("{p}.encoder_hidden_states_mask_is_none"))
            .as_bool()
            .unwrap_or(true)
        {
            None
        } else {
            Some(reference.f32(&format!("{p}.encoder_hidden_states_mask"))?)
        };
        let out = model.forward(&TransformerInputs {
            hidden_states: &reference.f32(&format!("{p}.hidden_states"))?,
            encoder_hidden_states: &reference.f32(&format!("{p}.encoder_hidden_states"))?,
            encoder_mask: mask.as_ref(),
            timestep: &reference.f32(&format!("{p}.timestep"))?,
            img_shapes: &shapes,
            controlnet_residuals: &[],
        })?;
        report.compare(
            &format!("{p}.out"),
            &out,
            &reference.f32(&format!("{p}.out"))?,
            args.tol,
        )?;
    }

    // --- the loop from the dump's initial latents, CFG batched as our denoiser runs it
    let positive = conditioning(reference, "prompt_embeds")?;
    let negative = if reference.has("negative_prompt_embeds") {
        Some(conditioning(reference, "negative_prompt_embeds")?)
    } else {
        None
    };
    let cfg_scale = reference.arg("true_cfg_scale").as_f64().unwrap_or(1.0);
    let params = DenoiseParams {
        positive: &positive,
        negative: negative.as_ref(),
        true_cfg_scale: cfg_scale,
        latents: latents0,
        img_shapes: &shapes,
        schedule: &schedule,
        start_step: 0,
        inpaint: None,
        controlnet: &[],
    };
    let mut per_step: Vec<(usize, Tensor, Tensor)> = Vec::new();
    let outcome = denoise::denoise(&model, &params, |s| {
        per_step.push((s.step, s.noise_pred.clone(), s.latents.clone()));
        Flow::Continue
    })?;
    for (i, v, lat) in &per_step {
        let np = format!("step.{i}.noise_pred");
        if reference.has(&np) {
            // step 0 shares the dump's inputs exactly: single-pass tolerance; later steps carry the loop's drift
            let tol = if *i == 0 { args.tol } else { args.loop_tol };
            report.compare(&np, v, &reference.f32(&np)?, tol)?;
        }
        let le = format!("step.{i}.latents_end");
        if reference.has(&le) {
            report.compare(&le, lat, &reference.f32(&le)?, args.loop_tol)?;
        }
    }
    let Outcome::Finished(final_latents) = outcome else {
        anyhow::bail!("the loop stopped early")
    };
    report.compare(
        "latents_final_packed",
        &final_latents,
        &reference.f32("latents_final_packed")?,
        args.loop_tol,
    )?;

    textenc::check_t2i_part(args, reference, report)?;
    vae::check_t2i_part(args, reference, report)?;
    Ok(())
}
