//! Times one denoising step with true CFG (cond + uncond transformer passes batched, CFG rescale, Euler
//! update) on a snapshot. Driven by `tools/bench/denoise_step.sh`, which runs diffusers on the same snapshot
//! and prints the ratio.
//!
//! usage: cargo bench -p qwen-image-model --bench denoise_step -- SNAPSHOT [WIDTH HEIGHT REPEATS COND_LEN UNCOND_LEN]

use std::time::Instant;

use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::denoise::{Conditioning, predict};
use qwen_image_model::scheduler::{Schedule, SchedulerConfig};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::transformer::{QwenImageTransformer, TransformerConfig};

/// Runs on a thread of rayon's pool, as the stage worker does (`crates/common/src/stage/worker.rs`): the
/// matmuls' forks then start from inside the pool.
fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    rayon::scope(|_| run())
}

fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if std::env::var_os("BENCH_MALLOPT").is_some() {
        // keep freed tensor buffers in the heap instead of returning them to the OS (see README: performance)
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(snapshot) = args.first() else {
        eprintln!("usage: denoise_step SNAPSHOT [WIDTH HEIGHT REPEATS COND_LEN UNCOND_LEN]");
        return Ok(());
    };
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (width, height, repeats, cond_len, uncond_len) =
        (num(1, 512), num(2, 512), num(3, 5), num(4, 24), num(5, 6));
    let dev = Device::Cpu;
    let snap = Snapshot::open(snapshot)?;
    let cfg: TransformerConfig = snap.config("transformer", "config.json")?;
    let sched: SchedulerConfig = snap.config("scheduler", "scheduler_config.json")?;
    let model = QwenImageTransformer::new(&cfg, snap.weights("transformer", DType::F32, &dev)?)?;
    // latent grid for an 8x VAE: h = 2·(H/16)
    let (h, w) = (2 * (height / 16), 2 * (width / 16));
    let shapes = [(1, h / 2, w / 2)];
    let seq = (h / 2) * (w / 2);
    let schedule = Schedule::for_pipeline(&sched, 20, seq)?;
    let latents = Tensor::randn(0f32, 1f32, (1, seq, cfg.in_channels), &dev)?;
    let pos = Conditioning {
        embeds: Tensor::randn(0f32, 1f32, (1, cond_len, cfg.joint_attention_dim), &dev)?,
        mask: None,
    };
    let neg = Conditioning {
        embeds: Tensor::randn(0f32, 1f32, (1, uncond_len, cfg.joint_attention_dim), &dev)?,
        mask: None,
    };
    let step = |lat: &Tensor| -> Result<Tensor, Box<dyn std::error::Error + Send + Sync>> {
        let v = predict(
            &model,
            lat,
            schedule.model_timestep(0),
            &pos,
            Some(&neg),
            4.0,
            &shapes,
            &[],
        )?;
        Ok((lat + (v * schedule.dt(0) as f64)?)?)
    };
    step(&latents)?; // warm-up
    let mut times = Vec::new();
    for _ in 0..repeats {
        let t0 = Instant::now();
        let out = step(&latents)?;
        out.sum_all()?.to_scalar::<f32>()?; // force completion
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{{\"impl\":\"qwen-image-serve\",\"width\":{width},\"height\":{height},\"tokens\":{seq},\"median_s\":{median:.4},\"runs\":{times:?}}}"
    );
    Ok(())
}
