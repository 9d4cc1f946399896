//! LoRA adapters against diffusers' `QwenImagePipeline.load_lora_weights` + `set_adapters` (PEFT backend) on the
//! `tiny` snapshot (`tests/fixtures/lora`, made by `tools/refharness/ref_lora.py`): one adapter in each naming
//! (diffusers/PEFT with LoraConfig metadata, kohya `lora_unet_`, ComfyUI `diffusion_model.` in bf16), two
//! adapters at different scales, and a Lightning-style adapter with its scheduler sidecar at 4 and 8 steps, CFG 1.
//! Errors are relative L2 of the final packed latents.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use common::rel_l2 as rel;
use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::lora::{self, LoraAdapter};
use qwen_image_model::scheduler::SchedulerConfig;
use qwen_image_model::source::{ConfigSource, LoadOptions, WeightsSource, load_transformer};
use qwen_image_model::transformer::QwenImageTransformer;
use qwen_image_model::weights::QuantMatmul;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn adapter_path(stem: &str) -> PathBuf {
    fixtures().join(format!("lora/adapters/{stem}.safetensors"))
}

fn tiny() -> PathBuf {
    fixtures().join("tiny/snapshot")
}

fn refs() -> HashMap<String, Tensor> {
    qwen_image_model::candle_core::safetensors::load(
        fixtures().join("lora/tensors.safetensors"),
        &Device::Cpu,
    )
    .expect("refs.safetensors")
}

fn model(weights: WeightsSource, mode: QuantMatmul) -> QwenImageTransformer {
    let opts = LoadOptions {
        quant_matmul: mode,
        ..LoadOptions::new(DType::F32, &Device::Cpu)
    };
    load_transformer(&weights, &ConfigSource::Snapshot(tiny()), &opts)
        .expect("tiny transformer")
        .model
}

fn dense() -> QwenImageTransformer {
    model(WeightsSource::Snapshot(tiny()), QuantMatmul::Auto)
}

fn load(m: &QwenImageTransformer, stem: &str) -> LoraAdapter {
    let targets = lora::targets(m).expect("targets");
    LoraAdapter::load(&adapter_path(stem), &targets, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{stem}: {e}"))
}

/// Our loop on the dumped pipeline inputs (64x64): true CFG with the negative prompt when `cfg > 1`, the
/// snapshot's scheduler unless `scheduler` is given.
fn final_latents(
    m: &QwenImageTransformer,
    r: &HashMap<String, Tensor>,
    steps: usize,
    cfg: f64,
    scheduler: Option<&SchedulerConfig>,
) -> Tensor {
    let snap = common::snapshot_scheduler(&tiny());
    common::final_latents(m, r, "", steps, cfg, scheduler.unwrap_or(&snap))
}

/// Runs `adapters` (file stem, scale) on `base` with 3 steps, CFG 4, and compares with diffusers' `case`.
fn check(base: &QwenImageTransformer, case: &str, adapters: &[(&str, f64)], bound: f64) -> f64 {
    let r = refs();
    let loaded: Vec<(LoraAdapter, f64)> =
        adapters.iter().map(|(s, w)| (load(base, s), *w)).collect();
    let refs_: Vec<(&LoraAdapter, f64)> = loaded.iter().map(|(a, w)| (a, *w)).collect();
    let m = lora::apply(base, &refs_).expect("apply");
    let fin = final_latents(&m, &r, 3, 4.0, None);
    let e = rel(&fin, &r[&format!("{case}.final")]);
    let moved = rel(&r[&format!("{case}.final")], &r["base.final"]);
    eprintln!(
        "{case}: final latents error {e:.2e} vs diffusers (the adapters move them by {moved:.2e})"
    );
    assert!(
        moved > 100.0 * bound,
        "{case}: the adapters barely change the result"
    );
    assert!(e < bound, "{case}: error {e:.3e} >= {bound:.0e}");
    e
}

#[test]
fn base_model_matches_diffusers_without_adapters() {
    let r = refs();
    let m = dense();
    let e = rel(&final_latents(&m, &r, 3, 4.0, None), &r["base.final"]);
    assert!(e < 1e-5, "base: {e:.3e}");
}

#[test]
fn peft_names_with_lora_config_metadata_match_diffusers() {
    let m = dense();
    let a = load(&m, "peft");
    // rank_pattern / alpha_pattern from the LoraConfig: img_in rank 2, proj_out alpha 3, the rest 8 / 4
    assert_eq!(a.modules["img_in"].rank, 2);
    assert_eq!(a.modules["img_in"].alpha_over_rank, 4.0);
    assert_eq!(a.modules["proj_out"].alpha_over_rank, 0.75);
    assert_eq!(
        a.modules["transformer_blocks.1.attn.to_q"].alpha_over_rank,
        2.0
    );
    check(&m, "peft", &[("peft", 1.0)], 1e-4);
}

#[test]
fn kohya_names_match_diffusers() {
    let m = dense();
    let a = load(&m, "kohya");
    assert!(a.modules.contains_key("norm_out.linear"));
    assert!(
        a.modules
            .contains_key("time_text_embed.timestep_embedder.linear_1")
    );
    check(&m, "kohya", &[("kohya", 1.0)], 1e-4);
}

#[test]
fn comfy_bf16_names_match_diffusers_at_scale_0_8() {
    check(&dense(), "comfy_0.8", &[("comfy", 0.8)], 1e-4);
}

#[test]
fn two_adapters_at_different_scales_match_diffusers() {
    check(&dense(), "two", &[("peft", 0.7), ("kohya", -0.5)], 1e-4);
}

#[test]
fn lightning_sidecar_scheduler_at_4_and_8_steps_cfg_1_matches_diffusers() {
    let r = refs();
    let m = dense();
    let a = load(&m, "lightning");
    let sched = a
        .scheduler
        .clone()
        .expect("lightning.scheduler.json is read");
    assert_eq!(sched.base_shift, 3f64.ln());
    assert_eq!(sched.max_shift, 3f64.ln());
    assert_eq!(sched.shift_terminal, None);
    let with = lora::apply(&m, &[(&a, 1.0)]).expect("apply");
    for steps in [4, 8] {
        let fin = final_latents(&with, &r, steps, 1.0, Some(&sched));
        let e = rel(&fin, &r[&format!("lightning_{steps}.final")]);
        eprintln!("lightning {steps} steps: {e:.2e}");
        assert!(e < 1e-4, "lightning {steps}: {e:.3e}");
        // without the adapter the result differs: the adapter is applied
        let plain = final_latents(&m, &r, steps, 1.0, Some(&sched));
        assert!(rel(&plain, &r[&format!("lightning_{steps}.final")]) > 1e-2);
    }
}

#[test]
fn adapters_leave_the_base_model_untouched() {
    let r = refs();
    let m = dense();
    let before = final_latents(&m, &r, 3, 4.0, None);
    let a = load(&m, "peft");
    let with = lora::apply(&m, &[(&a, 1.0)]).expect("apply");
    let _ = final_latents(&with, &r, 3, 4.0, None);
    let after = final_latents(&m, &r, 3, 4.0, None);
    assert_eq!(rel(&before, &after), 0.0, "the base model must not change");
    // an empty adapter list is the base model
    let same = lora::apply(&m, &[]).expect("apply none");
    assert_eq!(rel(&final_latents(&same, &r, 3, 4.0, None), &before), 0.0);
}

#[test]
fn adapters_apply_to_a_quantized_transformer() {
    // Q8_0 GGUF of the same tiny transformer (tests/fixtures/quant): its own error vs f32 is < 1e-3
    let q = model(
        WeightsSource::File(fixtures().join("quant/transformer/Q8_0.gguf")),
        QuantMatmul::Dequantize,
    );
    let e = check(&q, "peft", &[("peft", 1.0)], 5e-3);
    assert!(e > 0.0);
}

fn write(path: &Path, tensors: Vec<(&str, Tensor)>) {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    qwen_image_model::candle_core::safetensors::save(&map, path).expect("write");
}

fn load_err(path: &Path) -> String {
    let targets: BTreeMap<String, (usize, usize)> = lora::targets(&dense()).expect("targets");
    LoraAdapter::load(path, &targets, DType::F32, &Device::Cpu)
        .expect_err("must fail")
        .to_string()
}

#[test]
fn unmatched_and_malformed_files_are_errors_naming_the_tensors() {
    let dir = tempfile::tempdir().expect("tmp");
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).expect("zeros");
    let good_a = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight";
    let good_b = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight";

    let p = dir.path().join("unknown.safetensors");
    write(
        &p,
        vec![
            (good_a, z(&[4, 32])),
            (good_b, z(&[32, 4])),
            (
                "transformer.transformer_blocks.9.attn.to_q.lora_A.weight",
                z(&[4, 32]),
            ),
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_B.bias",
                z(&[32]),
            ),
        ],
    );
    let e = load_err(&p);
    assert!(e.contains("2 tensor(s)"), "{e}");
    assert!(
        e.contains("transformer_blocks.9.attn.to_q.lora_A.weight"),
        "{e}"
    );
    assert!(e.contains("lora_B.bias"), "{e}");

    let p = dir.path().join("half.safetensors");
    write(&p, vec![(good_a, z(&[4, 32]))]);
    let e = load_err(&p);
    assert!(
        e.contains("needs both a down (lora_A) and an up (lora_B)"),
        "{e}"
    );

    let p = dir.path().join("shape.safetensors");
    write(&p, vec![(good_a, z(&[4, 16])), (good_b, z(&[32, 4]))]);
    let e = load_err(&p);
    assert!(e.contains("is 32 -> 32"), "{e}");

    let p = dir.path().join("mixed.safetensors");
    write(
        &p,
        vec![
            (good_a, z(&[4, 32])),
            (good_b, z(&[32, 4])),
            (
                "lora_unet_transformer_blocks_1_attn_to_q.lora_down.weight",
                z(&[4, 32]),
            ),
            (
                "lora_unet_transformer_blocks_1_attn_to_q.lora_up.weight",
                z(&[32, 4]),
            ),
        ],
    );
    assert!(load_err(&p).contains("mixes"));
}
