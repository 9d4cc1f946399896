//! One measurement, in its own process so that its peak RSS is its own: load a component from a weights
//! source, run it on fixed inputs, report resident weights, RSS, timings, and save the outputs.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use qwen_image_model::denoise::{self, Conditioning, DenoiseParams, Flow, Outcome};
use qwen_image_model::scheduler::{Schedule, SchedulerConfig};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::source::{self, ConfigSource, LoadOptions, WeightsSource};
use qwen_image_model::transformer::TransformerInputs;
use qwen_image_model::weights::QuantMatmul;
use serde::{Deserialize, Serialize};

/// What one measurement reports (one JSON line on stdout).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub case: String,
    /// Resident weight bytes by format, from the loader's memory report.
    pub weights_bytes: u64,
    pub weights_params: u64,
    pub formats: String,
    pub rss_before_load: u64,
    pub rss_after_load: u64,
    /// `VmHWM` right after loading: the load's own peak.
    pub peak_rss_load: u64,
    pub peak_rss: u64,
    pub load_seconds: f64,
    /// Median seconds of one transformer step (cond + uncond batched) or one prompt batch encode.
    pub run_seconds: f64,
}

/// `VmRSS` and `VmHWM` of this process in bytes (Linux `/proc/self/status`; 0 elsewhere).
pub fn rss() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return (0, 0);
    };
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Deterministic N(0, 1) values (xorshift + Box-Muller), the same in every process.
pub fn normal(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (next(), next());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(normal(n, seed), shape, &Device::Cpu)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub struct Job<'a> {
    pub case: &'a str,
    pub component: &'a str,
    pub model: &'a Path,
    /// `None`: the snapshot's own weights.
    pub weights: Option<&'a Path>,
    pub dtype: DType,
    pub matmul: QuantMatmul,
    /// Image side in pixels (transformer) and denoising steps.
    pub size: usize,
    pub steps: usize,
    pub out: &'a Path,
}

pub fn run(job: &Job) -> Result<Measurement> {
    let (rss_before_load, _) = rss();
    let weights = match job.weights {
        Some(f) => WeightsSource::File(f.to_path_buf()),
        None => WeightsSource::Snapshot(job.model.to_path_buf()),
    };
    let config = ConfigSource::Snapshot(job.model.to_path_buf());
    let opts = LoadOptions {
        quant_matmul: job.matmul,
        ..LoadOptions::new(job.dtype, &Device::Cpu)
    };
    let mut outputs = std::collections::HashMap::new();
    let t0 = Instant::now();
    let (memory, load_seconds, (rss_after_load, peak_rss_load), run_seconds) = match job.component {
        "transformer" => {
            let loaded = source::load_transformer(&weights, &config, &opts)?;
            let load_seconds = t0.elapsed().as_secs_f64();
            let rss_loaded = rss();
            let m = &loaded.model;
            let cfg = m.config();
            // latent grid of an 8x VAE: h = 2·(H/16); 2x2 packing
            let side = job.size / 16;
            let seq = side * side;
            let shapes = [(1, side, side)];
            let dt = m.dtype();
            let x = tensor(&[1, seq, cfg.in_channels], 1)?;
            let pos = Conditioning {
                embeds: tensor(&[1, 32, cfg.joint_attention_dim], 2)?.to_dtype(dt)?,
                mask: None,
            };
            let neg = Conditioning {
                embeds: tensor(&[1, 8, cfg.joint_attention_dim], 3)?.to_dtype(dt)?,
                mask: None,
            };
            let t = Tensor::new(&[0.8f32], &Device::Cpu)?;
            let out = m.forward(&TransformerInputs {
                hidden_states: &x,
                encoder_hidden_states: &pos.embeds,
                encoder_mask: None,
                timestep: &t,
                img_shapes: &shapes,
                controlnet_residuals: &[],
            })?;
            outputs.insert("out".to_string(), out.to_dtype(DType::F32)?);
            let sched: SchedulerConfig =
                Snapshot::open(job.model)?.config("scheduler", "scheduler_config.json")?;
            let schedule =
                Schedule::for_pipeline(&sched, job.steps, seq).map_err(anyhow::Error::msg)?;
            let p = DenoiseParams {
                positive: &pos,
                negative: Some(&neg),
                true_cfg_scale: 4.0,
                latents: x.clone(),
                img_shapes: &shapes,
                schedule: &schedule,
                start_step: 0,
                inpaint: None,
                controlnet: &[],
            };
            let mut times = Vec::new();
            let mut last = Instant::now();
            let outcome = denoise::denoise(m, &p, |_| {
                times.push(last.elapsed().as_secs_f64());
                last = Instant::now();
                Flow::Continue
            })?;
            let Outcome::Finished(fin) = outcome else {
                anyhow::bail!("denoise stopped");
            };
            outputs.insert("final".to_string(), fin.to_dtype(DType::F32)?);
            (loaded.memory, load_seconds, rss_loaded, median(times))
        }
        "text-encoder" => {
            let loaded = source::load_prompt_encoder(
                &weights,
                &config,
                &job.model.join("tokenizer"),
                &opts,
            )?;
            let load_seconds = t0.elapsed().as_secs_f64();
            let rss_loaded = rss();
            let prompts = [
                "A cat holding a sign that says hello world",
                "一只可爱的熊猫坐在竹林里，水墨画风格。",
                "A coffee shop entrance with a chalkboard sign reading \"通义千问 Coffee 😊 $2 per cup\", 4k",
                " ",
            ];
            let mut times = Vec::new();
            let mut embeds = None;
            for _ in 0..3 {
                let t = Instant::now();
                let e = loaded.model.encode(&prompts, 512)?;
                times.push(t.elapsed().as_secs_f64());
                embeds = Some(e.embeds);
            }
            let embeds = embeds.context("no encode ran")?;
            outputs.insert("embeds".to_string(), embeds.to_dtype(DType::F32)?);
            (loaded.memory, load_seconds, rss_loaded, median(times))
        }
        other => anyhow::bail!("unknown component {other} (transformer | text-encoder)"),
    };
    candle_core::safetensors::save(&outputs, job.out)?;
    let (_, peak_rss) = rss();
    Ok(Measurement {
        case: job.case.to_string(),
        weights_bytes: memory.total_bytes(),
        weights_params: memory.total_params(),
        formats: memory.to_string(),
        rss_before_load,
        rss_after_load,
        peak_rss_load,
        peak_rss,
        load_seconds,
        run_seconds,
    })
}
