//! Helpers shared by the model crate's parity tests.
#![allow(clippy::unwrap_used, dead_code)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::path::Path;

use qwen_image_model::candle_core::{DType, Tensor};
use qwen_image_model::denoise::{self, Conditioning, DenoiseParams, Flow, Outcome};
use qwen_image_model::scheduler::{Schedule, SchedulerConfig};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::transformer::QwenImageTransformer;

/// max|a-b| / max|b|
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let max = |t: &Tensor| t.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    max(&(&a - &b).unwrap()) / max(&b).max(1e-12)
}

/// Relative L2 error `‖a − b‖ / ‖b‖`.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let sq = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (sq(&(&a - &b).unwrap()) / sq(&b).max(1e-30)).sqrt()
}

/// The values of an integer (or integral float) tensor, flattened.
pub fn ints(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `scheduler/scheduler_config.json` of a snapshot.
pub fn snapshot_scheduler(snapshot: &Path) -> SchedulerConfig {
    Snapshot::open(snapshot)
        .and_then(|s| s.config("scheduler", "scheduler_config.json"))
        .unwrap()
}

/// Our denoising loop on dumped `QwenImagePipeline` inputs `{prefix}denoise.*` (prompt embeddings whose mask is
/// all ones, negative embeddings with their mask, packed start latents on a 4x4 token grid, i.e. 64x64): true CFG
/// with the negative prompt when `cfg > 1`, `steps` steps of `scheduler`. Returns the final packed latents.
pub fn final_latents(
    model: &QwenImageTransformer,
    r: &HashMap<String, Tensor>,
    prefix: &str,
    steps: usize,
    cfg: f64,
    scheduler: &SchedulerConfig,
) -> Tensor {
    let t = |k: &str| r[&format!("{prefix}denoise.{k}")].clone();
    let pos = Conditioning {
        embeds: t("prompt_embeds"),
        mask: None, // all ones: diffusers passes None
    };
    let neg = Conditioning {
        embeds: t("negative_prompt_embeds"),
        mask: Some(t("negative_prompt_embeds_mask")),
    };
    let schedule = Schedule::for_pipeline(scheduler, steps, 16).unwrap();
    let shapes = [(1, 4, 4)];
    let p = DenoiseParams {
        positive: &pos,
        negative: (cfg > 1.0).then_some(&neg),
        true_cfg_scale: cfg,
        latents: t("latents"),
        img_shapes: &shapes,
        schedule: &schedule,
        start_step: 0,
        inpaint: None,
        controlnet: &[],
    };
    match denoise::denoise(model, &p, |_| Flow::Continue).unwrap() {
        Outcome::Finished(x) => x,
        Outcome::Stopped { .. } => panic!("stopped"),
    }
}
