//! Times `AutoencoderKLQwenImage::decode` (f32, CPU) on random latents; used by `tools/bench_vae.sh` and for
//! peak-RSS measurements (`/usr/bin/time -v`).
//!
//! `cargo run --release -p qwen-image-model --example vae_decode -- SNAPSHOT HEIGHT WIDTH [REPEATS] [--tiled]`
//! Prints one line per run (`decode_s <seconds>`) and `median_s <seconds>`.

use std::time::Instant;

use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::vae::{AutoencoderKLQwenImage, TileConfig};

/// Runs on a thread of rayon's pool, as the stage worker does (`crates/common/src/stage/worker.rs`): the
/// matmuls' forks then start from inside the pool.
fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    rayon::scope(|_| run())
}

fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: vae_decode SNAPSHOT HEIGHT WIDTH [REPEATS] [--tiled]".into());
    }
    let height: usize = args[2].parse()?;
    let width: usize = args[3].parse()?;
    let repeats: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let tiled = args.iter().any(|a| a == "--tiled");
    let snapshot = Snapshot::open(&args[1])?;
    let vae = AutoencoderKLQwenImage::load(&snapshot, DType::F32, &Device::Cpu)?;
    let f = vae.config().scale_factor();
    let z = Tensor::randn(
        0f32,
        1f32,
        (1, vae.config().z_dim, 1, height / f, width / f),
        &Device::Cpu,
    )?;
    let mut times = Vec::new();
    for _ in 0..repeats {
        let t0 = Instant::now();
        let img = if tiled {
            vae.decode_tiled(&z, TileConfig::default())?
        } else {
            vae.decode(&z)?
        };
        let dt = t0.elapsed().as_secs_f64();
        println!("decode_s {dt:.4} shape {:?}", img.dims());
        times.push(dt);
    }
    times.sort_by(f64::total_cmp);
    println!("median_s {:.4}", times[times.len() / 2]);
    Ok(())
}
