//! Instruction-editing parity (`ref_edit.py` dumps, mode `edit`, diffusers `QwenImageEditPlusPipeline`): the
//! gateway's side through its request API (`qwen_image_gateway::request::instruct`: the condition and VAE
//! sizes of the dump's input pictures, the output size, the seed's noise), then what the stages compute
//! with the model crate's functions they use: the prompt embeddings with the pictures (text encoder), the
//! reference latents (VAE, posterior mode), the loop with the references appended (denoiser, from the dump's
//! own noise), and the decoded picture.

use anyhow::{Context, Result};
use qwen_image_common::randn::TorchCpuGenerator;
use qwen_image_gateway::request::Limits;
use qwen_image_gateway::request::instruct::{self, Areas};
use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::denoise::{
    Conditioning, DenoiseParams, Flow, Outcome, denoise_with_references,
};
use qwen_image_model::edit::encode_references;
use qwen_image_model::edit_prompt::EditPromptEncoder;
use qwen_image_model::latents::{pack, unpack};
use qwen_image_model::scheduler::{Schedule, SchedulerConfig};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::vae::{AutoencoderKLQwenImage, to_rgb8};
use qwen_image_proto::v1::{EditRequest, GenerationSettings};

use super::{ParityArgs, Reference, Report, image_prep, t2i};

/// Relative tolerance of the torch-compatible normal draws (a few f32 ulps).
const RNG_TOL: f64 = 1e-6;

fn sizes(v: &serde_json::Value) -> Vec<(usize, usize)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p.get(0)?.as_u64()? as usize, p.get(1)?.as_u64()? as usize)))
                .collect()
        })
        .unwrap_or_default()
}

pub fn check(args: &ParityArgs, reference: &Reference, report: &mut Report) -> Result<()> {
    let snapshot = Snapshot::open(&args.snapshot)?;
    let g = image_prep::geometry(&snapshot)?;
    let n = sizes(reference.scalar("input_sizes")).len().max(1);
    let images = (0..n)
        .map(|k| {
            let p = reference.dir.join(format!("input_{k}.png"));
            std::fs::read(&p)
                .map(bytes::Bytes::from)
                .with_context(|| format!("reading {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let areas = Areas {
        condition: reference
            .scalar("condition_area")
            .as_u64()
            .context("condition_area")?,
        vae: reference.scalar("vae_area").as_u64().context("vae_area")?,
    };
    let seed = reference.arg("seed").as_u64().context("args.seed")?;
    let negative = reference
        .scalar("negative_prompt")
        .as_str()
        .map(str::to_string);
    let prompt = reference
        .scalar("prompt")
        .as_str()
        .context("prompt")?
        .to_string();
    let req = EditRequest {
        settings: Some(GenerationSettings {
            prompt: prompt.clone(),
            negative_prompt: negative.clone(),
            width_px: reference.arg("width").as_u64().unwrap_or(0) as u32,
            height_px: reference.arg("height").as_u64().unwrap_or(0) as u32,
            steps: reference.arg("steps").as_u64().context("args.steps")? as u32,
            true_cfg_scale: reference.arg("true_cfg_scale").as_f64().map(|v| v as f32),
            seed: Some(seed),
            ..Default::default()
        }),
        images,
    };
    let p = instruct::validate(req, &g, &Limits::default(), areas, 0)
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    // --- gateway: picture sizes, output size, the seed's noise
    let ours_c: Vec<(usize, usize)> = p.condition.iter().map(|i| (i.width, i.height)).collect();
    let ours_v: Vec<(usize, usize)> = p.vae.iter().map(|i| (i.width, i.height)).collect();
    let want_c = sizes(reference.scalar("condition_sizes"));
    let want_v = sizes(reference.scalar("vae_sizes"));
    report.check(
        "gateway: condition sizes",
        ours_c == want_c,
        format!("ours {ours_c:?} reference {want_c:?}"),
    );
    report.check(
        "gateway: VAE sizes",
        ours_v == want_v,
        format!("ours {ours_v:?} reference {want_v:?}"),
    );
    let out = sizes(&serde_json::json!([reference.scalar("output_size")]));
    let ours_out = (p.settings.width_px as usize, p.settings.height_px as usize);
    report.check(
        "gateway: output size",
        out.first() == Some(&ours_out),
        format!("ours {ours_out:?} reference {out:?}"),
    );
    let shape = p.settings.noise_shape(&g);
    let noise = TorchCpuGenerator::new(seed)
        .randn(shape.iter().product())
        .map_err(anyhow::Error::msg)?;
    let noise = Tensor::from_vec(noise, shape.as_slice(), &Device::Cpu)?;
    report.compare("gateway: rng.0", &noise, &reference.f32("rng.0")?, RNG_TOL)?;

    // --- text encoder: the prompt (and negative prompt) with the condition-size pictures
    let enc = EditPromptEncoder::load(&snapshot, DType::F32, &Device::Cpu)?;
    let pos = enc.encode(&prompt, &p.condition)?;
    report.compare(
        "prompt_embeds",
        &pos.embeds,
        &reference.f32("prompt_embeds")?,
        args.tol,
    )?;
    let cfg_scale = reference.arg("true_cfg_scale").as_f64().unwrap_or(1.0);
    let negative = match (&negative, reference.has("negative_prompt_embeds")) {
        (Some(n), true) => {
            let e = enc.encode(n, &p.condition)?;
            report.compare(
                "negative_prompt_embeds",
                &e.embeds,
                &reference.f32("negative_prompt_embeds")?,
                args.tol,
            )?;
            Some(Conditioning {
                embeds: e.embeds,
                mask: None,
            })
        }
        _ => None,
    };
    let positive = Conditioning {
        embeds: pos.embeds,
        mask: None,
    };

    // --- VAE: reference latents (posterior mode, normalised, packed)
    let vae = AutoencoderKLQwenImage::load(&snapshot, DType::F32, &Device::Cpu)?;
    let refs = encode_references(&vae, &p.vae, &Device::Cpu)?;
    report.compare(
        "vae: image_latents_packed",
        &refs.latents,
        &reference.f32("image_latents_packed")?,
        args.tol,
    )?;

    // --- denoiser: the loop from the dump's noise, references appended
    let init = reference.f32("latents_init_packed")?;
    let unpacked = noise.reshape((shape[0], shape[2], shape[3], shape[4]))?; // [B, 1, C, h, w] → [B, C, h, w]
    report.compare(
        "latents_init_packed (our noise, packed)",
        &pack(&unpacked)?,
        &init,
        RNG_TOL,
    )?;
    let model = t2i::load_transformer(args)?;
    let sched: SchedulerConfig = snapshot.config("scheduler", "scheduler_config.json")?;
    let steps = p.settings.steps as usize;
    let schedule =
        Schedule::for_pipeline(&sched, steps, init.dim(1)?).map_err(anyhow::Error::msg)?;
    let f = g.vae_scale_factor as usize;
    let (h, w) = (
        p.settings.height_px as usize / f,
        p.settings.width_px as usize / f,
    );
    let shapes = [(1, h / 2, w / 2)];
    let params = DenoiseParams {
        positive: &positive,
        negative: negative.as_ref(),
        true_cfg_scale: cfg_scale,
        latents: init,
        img_shapes: &shapes,
        schedule: &schedule,
        start_step: 0,
        inpaint: None,
        controlnet: &[],
    };
    let mut first_v = None;
    let outcome = denoise_with_references(&model, &params, Some(&refs), |s| {
        if s.done == 0 {
            first_v = Some(s.noise_pred.clone());
        }
        Flow::Continue
    })?;
    let Outcome::Finished(latents) = outcome else {
        anyhow::bail!("the loop stopped early")
    };
    if let Some(v) = &first_v {
        report.compare(
            "step.0.noise_pred",
            v,
            &reference.f32("step.0.noise_pred")?,
            args.tol,
        )?;
    }
    report.compare(
        "final latents",
        &latents,
        &reference.f32("latents_final_packed")?,
        args.loop_tol,
    )?;

    // --- VAE: decode
    let z = vae.denormalize(&unpack(&latents, h, w)?)?;
    let ours: Vec<u8> = to_rgb8(&vae.decode(&z)?)?.concat();
    let want = reference
        .get("image_uint8")?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    report.compare_u8("image_uint8", &ours, &want, 1);
    Ok(())
}
