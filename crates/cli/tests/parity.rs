//! Runs `qwen-image parity` against every committed diffusers reference dump and requires it to pass.
//! These are the project's main correctness tests: our numbers against diffusers' on the same snapshot.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Runs the parity command; returns (success, stdout).
fn parity(snapshot: &Path, reference: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-image"))
        .args(["parity", "--snapshot"])
        .arg(snapshot)
        .arg("--reference")
        .arg(reference)
        .output()
        .expect("the qwen-image binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.success(), format!("{stdout}\n{stderr}"))
}

fn assert_passes(suite: &str, reference: &str) {
    let base = fixtures().join(suite);
    let (ok, text) = parity(&base.join("snapshot"), &base.join("refs").join(reference));
    assert!(ok, "parity failed for {suite}/{reference}:\n{text}");
    assert!(!text.contains("FAIL "), "{text}");
    // the transformer and the loop were really compared
    let needles: &[&str] = match reference.split('_').next().unwrap_or_default() {
        "t2i" => &["step.0.transformer.cond.out", "latents_final_packed"],
        "inpaint" | "outpaint" => &[
            "gateway: mask_packed",
            "gateway: rng.2",
            "vae: image_latents_packed",
            "unmasked final latents == image latents",
            "latents_init_packed",
            "final latents",
        ],
        "img2img" => &[
            "gateway: init_image",
            "latents_init_packed",
            "final latents",
        ],
        "edit1" | "edit2" => &[
            "gateway: condition sizes",
            "gateway: VAE sizes",
            "gateway: rng.0",
            "prompt_embeds",
            "vae: image_latents_packed",
            "final latents",
            "image_uint8",
        ],
        "controlnet" => &[
            "gateway: control_image",
            "gateway: rng.0",
            "vae: controlnet_cond",
            "step.0.controlnet.0.block_samples.0",
            "step.0.transformer.uncond.out",
            "final latents",
        ],
        _ => &[],
    };
    for needle in needles {
        assert!(
            text.contains(&format!("PASS  {needle}")),
            "{needle} not compared:\n{text}"
        );
    }
}

#[test]
fn t2i_with_cfg_matches_diffusers() {
    assert_passes("tiny", "t2i_64");
}

#[test]
fn t2i_batch_of_two_prompts_with_padding_matches_diffusers() {
    assert_passes("tiny", "t2i_batch_64x96");
}

#[test]
fn t2i_without_cfg_at_256_matches_diffusers() {
    assert_passes("tiny", "t2i_nocfg_256");
}

#[test]
fn inpaint_loop_matches_diffusers() {
    assert_passes("tiny", "inpaint_64");
}

#[test]
fn inpaint_non_square_and_outpaint_canvas_match_diffusers() {
    assert_passes("tiny", "inpaint_96x64");
    assert_passes("tiny", "outpaint_80x96");
}

#[test]
fn edit_matches_diffusers() {
    // 2509: one picture with CFG, two pictures; 2511 (zero_cond_t): one without CFG, two with
    assert_passes("edit-tiny", "edit1_64");
    assert_passes("edit-tiny", "edit2_64x48");
    let base = fixtures().join("edit-tiny");
    for r in ["edit1_2511", "edit2_2511"] {
        let (ok, text) = parity(&base.join("snapshot-2511"), &base.join("refs").join(r));
        assert!(
            ok && !text.contains("FAIL "),
            "parity failed for edit-tiny/{r}:\n{text}"
        );
        assert!(text.contains("PASS  final latents"), "{text}");
    }
}

#[test]
fn img2img_matches_diffusers() {
    assert_passes("tiny", "img2img_64x48");
}

#[test]
fn controlnet_matches_diffusers() {
    assert_passes("tiny", "controlnet_64");
}

#[test]
fn bf16_sharded_snapshot_loads_and_matches_diffusers() {
    assert_passes("tiny-bf16-sharded", "t2i_64x48");
}

#[test]
fn random_preset_snapshots_match_diffusers() {
    let dir = fixtures();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("fixtures dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !name.starts_with("random-") {
            continue;
        }
        for r in std::fs::read_dir(path.join("refs")).expect("refs dir") {
            let r = r.expect("entry").path();
            let rname = r
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            // t2i, vae and textenc dumps of every random-preset snapshot
            assert_passes(&name, &rname);
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected random-preset t2i fixtures, found {seen}"
    );
}

#[test]
fn a_corrupted_reference_fails() {
    // The comparison must be able to fail: perturb one dumped tensor and expect a FAIL line and exit 1.
    use qwen_image_model::candle_core::{Device, Tensor};
    let base = fixtures().join("tiny");
    let src = base.join("refs/t2i_64");
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(src.join("manifest.json"), tmp.path().join("manifest.json"))
        .expect("copy manifest");
    let mut tensors = qwen_image_model::candle_core::safetensors::load(
        src.join("tensors.safetensors"),
        &Device::Cpu,
    )
    .expect("load");
    let t = tensors
        .get("step.0.transformer.cond.out")
        .expect("tensor")
        .clone();
    let bumped: Tensor = (t + 0.01).expect("add");
    tensors.insert("step.0.transformer.cond.out".into(), bumped);
    qwen_image_model::candle_core::safetensors::save(
        &tensors,
        tmp.path().join("tensors.safetensors"),
    )
    .expect("save");
    let (ok, text) = parity(&base.join("snapshot"), tmp.path());
    assert!(!ok, "a perturbed reference must fail:\n{text}");
    assert!(text.contains("FAIL  step.0.transformer.cond.out"), "{text}");
}

/// The default model (models/qwen-image-demo: trained weights, bf16, trained tokenizer, legacy text-encoder
/// config, its pose ControlNet) against diffusers' pipelines on it (tools/make_fixtures.sh demo).
#[test]
fn default_model_matches_diffusers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let snapshot = root.join("models/qwen-image-demo");
    for (reference, needles) in [
        (
            "t2i_64_en",
            &["step.0.transformer.cond.out", "latents_final_packed"][..],
        ),
        (
            "t2i_64_zh",
            &["step.0.transformer.cond.out", "latents_final_packed"][..],
        ),
        (
            "controlnet_pose_64",
            &[
                "gateway: control_image",
                "vae: controlnet_cond",
                "step.0.controlnet.0.block_samples.0",
                "final latents",
            ][..],
        ),
    ] {
        let (ok, text) = parity(&snapshot, &fixtures().join("demo/refs").join(reference));
        assert!(
            ok,
            "parity failed for the default model, {reference}:\n{text}"
        );
        assert!(!text.contains("FAIL "), "{text}");
        for needle in needles {
            assert!(
                text.contains(&format!("PASS  {needle}")),
                "{reference}: {needle} not compared:\n{text}"
            );
        }
    }
}

#[test]
fn lora_mode_matches_diffusers_for_every_adapter_case() {
    let f = fixtures();
    let (ok, text) = parity(&f.join("tiny/snapshot"), &f.join("lora"));
    assert!(ok, "parity failed for lora:\n{text}");
    assert!(!text.contains("FAIL "), "{text}");
    for case in [
        "peft",
        "kohya",
        "comfy_0.8",
        "two",
        "lightning_4",
        "lightning_8",
    ] {
        assert!(
            text.contains(&format!("PASS  {case}.final")),
            "{case} not compared:\n{text}"
        );
    }
}
