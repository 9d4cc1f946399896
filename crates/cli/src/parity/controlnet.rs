//! ControlNet parity (`controlnet` mode): the ControlNet's residuals at step 0, the transformer passes that
//! receive them, and the loop with per-step ControlNet runs, from the dump's own inputs; first the
//! gateway-side preprocessing of the control picture (`image_prep::check_control`).

use anyhow::{Context, Result};
use qwen_image_model::candle_core::{DType, Device};
use qwen_image_model::controlnet::{ControlUnit, QwenImageControlNet};
use qwen_image_model::denoise::{self, DenoiseParams, Flow, Outcome};
use qwen_image_model::scheduler::{Schedule, SchedulerConfig};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::transformer::TransformerInputs;

use super::t2i::{conditioning, img_shapes, load_transformer};
use super::{ParityArgs, Reference, Report, image_prep, textenc, vae};

pub fn check(args: &ParityArgs, reference: &Reference, report: &mut Report) -> Result<()> {
    image_prep::check_control(args, reference, report)?;
    let snapshot = Snapshot::open(&args.snapshot)?;
    let cn_dir = match reference.arg("controlnet").as_str() {
        Some(d) => std::path::PathBuf::from(d),
        None => args.snapshot.join("controlnet"),
    };
    let net = QwenImageControlNet::load(&cn_dir, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading the ControlNet from {}", cn_dir.display()))?;
    let model = load_transformer(&snapshot)?;
    let sched_cfg: SchedulerConfig = snapshot.config("scheduler", "scheduler_config.json")?;
    let scale = reference.arg("conditioning_scale").as_f64().unwrap_or(1.0);
    let shapes = img_shapes(reference.scalar("step.0.transformer.cond.img_shapes"))?;
    let cond = reference.f32("step.0.controlnet.0.controlnet_cond")?;

    // --- step 0: ControlNet residuals from the cond pass's inputs
    let p = "step.0.transformer.cond";
    let hidden = reference.f32(&format!("{p}.hidden_states"))?;
    let text = reference.f32(&format!("{p}.encoder_hidden_states"))?;
    let t = reference.f32(&format!("{p}.timestep"))?;
    let inp = TransformerInputs {
        hidden_states: &hidden,
        encoder_hidden_states: &text,
        encoder_mask: None,
        timestep: &t,
        img_shapes: &shapes,
        controlnet_residuals: &[],
    };
    let samples = net.forward(&inp, &cond, scale)?;
    for (j, s) in samples.iter().enumerate() {
        let name = format!("step.0.controlnet.0.block_samples.{j}");
        report.compare(&name, s, &reference.f32(&name)?, args.tol)?;
    }

    // --- step 0: transformer passes with the dumped residuals
    for branch in ["cond", "uncond"] {
        let p = format!("step.0.transformer.{branch}");
        let mut res = Vec::new();
        while reference.has(&format!("{p}.controlnet_block_samples.{}", res.len())) {
            res.push(reference.f32(&format!("{p}.controlnet_block_samples.{}", res.len()))?);
        }
        let out = model.forward(&TransformerInputs {
            hidden_states: &reference.f32(&format!("{p}.hidden_states"))?,
            encoder_hidden_states: &reference.f32(&format!("{p}.encoder_hidden_states"))?,
            encoder_mask: None,
            timestep: &reference.f32(&format!("{p}.timestep"))?,
            img_shapes: &shapes,
            controlnet_residuals: &[res],
        })?;
        report.compare(
            &format!("{p}.out"),
            &out,
            &reference.f32(&format!("{p}.out"))?,
            args.tol,
        )?;
    }

    // --- the loop with the ControlNet run every step
    let latents0 = reference.f32("latents_init_packed")?;
    let steps = reference
        .arg("steps")
        .as_u64()
        .context("manifest args.steps")? as usize;
    let schedule =
        Schedule::for_pipeline(&sched_cfg, steps, latents0.dim(1)?).map_err(anyhow::Error::msg)?;
    let positive = conditioning(reference, "prompt_embeds")?;
    let negative = if reference.has("negative_prompt_embeds") {
        Some(conditioning(reference, "negative_prompt_embeds")?)
    } else {
        None
    };
    let units = [ControlUnit {
        net: &net,
        cond: cond.clone(),
        scale,
        start: 0.0,
        end: 1.0,
    }];
    let params = DenoiseParams {
        positive: &positive,
        negative: negative.as_ref(),
        true_cfg_scale: reference.arg("true_cfg_scale").as_f64().unwrap_or(1.0),
        latents: latents0,
        img_shapes: &shapes,
        schedule: &schedule,
        start_step: 0,
        inpaint: None,
        controlnet: &units,
    };
    let mut per_step = Vec::new();
    let outcome = denoise::denoise(&model, &params, |s| {
        per_step.push((s.step, s.latents.clone()));
        Flow::Continue
    })?;
    for (i, lat) in &per_step {
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

    textenc::check_t2i_part(args, reference, report)?;
    vae::check_t2i_part(args, reference, report)?;
    Ok(())
}
