//! Times `PromptEncoder::encode` (tokenize + text encoder + template handling) on CPU, f32.
//!
//!     cargo run --release -p qwen-image-model --example bench_textenc -- SNAPSHOT ITERS "PROMPT"
//!
//! Prints one JSON line: load time, token count, median / min encode time in ms. Thread count: candle's
//! CPU matmuls follow RAYON_NUM_THREADS (set by tools/bench_textenc.sh).

use std::time::Instant;

use qwen_image_model::candle_core::{DType, Device};
use qwen_image_model::prompt::PromptEncoder;
use qwen_image_model::snapshot::Snapshot;

/// Runs on a thread of rayon's pool, as the stage worker does (`crates/common/src/stage/worker.rs`): the
/// matmuls' forks then start from inside the pool.
fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    rayon::scope(|_| run())
}

fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: bench_textenc SNAPSHOT ITERS PROMPT".into());
    }
    let iters: usize = args[2].parse()?;
    let prompt = args[3].as_str();
    let t0 = Instant::now();
    let enc = PromptEncoder::load(&Snapshot::open(&args[1])?, DType::F32, &Device::Cpu)?;
    let load_s = t0.elapsed().as_secs_f64();
    let first = enc.encode(&[prompt], 512)?; // warm-up
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let e = enc.encode(&[prompt], 512)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(e);
    }
    // stage split: tokenizer alone, text model alone
    let mut tok_ms = Vec::with_capacity(iters);
    let mut lm_ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let batch = enc.tokenize_template(&[prompt])?;
        tok_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        std::hint::black_box(
            enc.model()
                .forward(&batch.input_ids, Some(&batch.attention_mask))?,
        );
        lm_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let median = median_of(&mut ms);
    let min = ms.first().copied().unwrap_or(f64::NAN);
    let (tok, lm) = (median_of(&mut tok_ms), median_of(&mut lm_ms));
    // Linux: peak RSS and its split (anonymous = copied weights + activations; file = mmapped safetensors pages)
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (hwm, anon, file) = (kb("VmHWM:"), kb("RssAnon:"), kb("RssFile:"));
    println!(
        "{{\"impl\": \"candle\", \"load_s\": {load_s:.3}, \"tokens\": {}, \"iters\": {iters}, \"median_ms\": {median:.3}, \"min_ms\": {min:.3}, \"tokenize_ms\": {tok:.3}, \"text_model_ms\": {lm:.3}, \"vm_hwm_kb\": {hwm}, \"rss_anon_kb\": {anon}, \"rss_file_kb\": {file}}}",
        first.token_counts[0]
    );
    Ok(())
}

fn median_of(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}
