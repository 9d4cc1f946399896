//! LoRA parity (`tools/refharness/ref_lora.py` dumps, mode `lora`): for every case of the manifest, the final
//! latents of our loop with the case's adapters (loaded from the dump's `adapters/`) at their scales, its steps,
//! CFG and scheduler (the snapshot's, or the first adapter's `.scheduler.json` sidecar), against diffusers'
//! `load_lora_weights` + `set_adapters` run on the same inputs.

use anyhow::{Context, Result};
use qwen_image_model::candle_core::{DType, Device};
use qwen_image_model::denoise::{self, Conditioning, DenoiseParams, Flow, Outcome};
use qwen_image_model::lora::{self, LoraAdapter};
use qwen_image_model::scheduler::{Schedule, SchedulerConfig};
use qwen_image_model::snapshot::Snapshot;

use super::{ParityArgs, Reference, Report, t2i};

pub fn check(args: &ParityArgs, reference: &Reference, report: &mut Report) -> Result<()> {
    let model = t2i::load_transformer(args)?;
    let targets = lora::targets(&model)?;
    let snap: SchedulerConfig = Snapshot::open(&args.snapshot)
        .and_then(|s| s.config("scheduler", "scheduler_config.json"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let positive = Conditioning {
        embeds: reference.f32("denoise.prompt_embeds")?,
        mask: None, // all ones: diffusers passes None
    };
    let negative = Conditioning {
        embeds: reference.f32("denoise.negative_prompt_embeds")?,
        mask: Some(reference.f32("denoise.negative_prompt_embeds_mask")?),
    };
    let latents = reference.f32("denoise.latents")?;
    let (_, tokens, _) = latents.dims3()?;
    let side = (tokens as f64).sqrt() as usize;
    anyhow::ensure!(
        side * side == tokens,
        "denoise.latents has {tokens} tokens, not a square grid"
    );
    let cases = reference.manifest["cases"]
        .as_object()
        .context("manifest has no `cases`")?;
    for (name, case) in cases {
        let mut adapters = Vec::new();
        for a in case["adapters"].as_array().context("case adapters")? {
            let stem = a[0].as_str().context("adapter name")?;
            let scale = a[1].as_f64().context("adapter scale")?;
            let path = reference
                .dir
                .join("adapters")
                .join(format!("{stem}.safetensors"));
            let adapter = LoraAdapter::load(&path, &targets, DType::F32, &Device::Cpu)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            adapters.push((adapter, scale));
        }
        let scheduler = if case["scheduler"].is_null() {
            snap.clone()
        } else {
            adapters
                .iter()
                .find_map(|(a, _)| a.scheduler.clone())
                .with_context(|| format!("case {name}: no adapter brings a scheduler sidecar"))?
        };
        let list: Vec<(&LoraAdapter, f64)> = adapters.iter().map(|(a, s)| (a, *s)).collect();
        let with = lora::apply(&model, &list)?;
        let steps = case["steps"].as_u64().context("case steps")? as usize;
        let cfg = case["true_cfg_scale"]
            .as_f64()
            .context("case true_cfg_scale")?;
        let schedule =
            Schedule::for_pipeline(&scheduler, steps, tokens).map_err(anyhow::Error::msg)?;
        let shapes = [(1, side, side)];
        let p = DenoiseParams {
            positive: &positive,
            negative: (cfg > 1.0).then_some(&negative),
            true_cfg_scale: cfg,
            latents: latents.clone(),
            img_shapes: &shapes,
            schedule: &schedule,
            start_step: 0,
            inpaint: None,
            controlnet: &[],
        };
        let fin = match denoise::denoise(&with, &p, |_| Flow::Continue)? {
            Outcome::Finished(x) => x,
            Outcome::Stopped { .. } => anyhow::bail!("case {name}: the loop stopped"),
        };
        report.compare(
            &format!("{name}.final"),
            &fin,
            &reference.f32(&format!("{name}.final"))?,
            args.loop_tol,
        )?;
    }
    Ok(())
}
