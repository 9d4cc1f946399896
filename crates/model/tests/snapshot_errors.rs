//! A broken snapshot gives a clear error naming the file and tensor at fault.

use std::path::{Path, PathBuf};

use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::transformer::{QwenImageTransformer, TransformerConfig};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/snapshot")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).expect("copy");
        }
    }
}

fn load(dir: &Path) -> Result<QwenImageTransformer, String> {
    let s = Snapshot::open(dir).map_err(|e| e.to_string())?;
    let cfg: TransformerConfig = s
        .config("transformer", "config.json")
        .map_err(|e| e.to_string())?;
    let vb = s
        .weights("transformer", DType::F32, &Device::Cpu)
        .map_err(|e| e.to_string())?;
    QwenImageTransformer::new(&cfg, vb).map_err(|e| e.to_string())
}

#[test]
fn fixture_loads() {
    load(&tiny()).expect("tiny snapshot loads");
}

#[test]
fn missing_model_index_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let err = Snapshot::open(tmp.path()).expect_err("no model_index.json");
    assert!(err.to_string().contains("model_index.json"), "{err}");
}

#[test]
fn missing_weight_file_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_dir(&tiny(), tmp.path());
    std::fs::remove_file(
        tmp.path()
            .join("transformer/diffusion_pytorch_model.safetensors"),
    )
    .expect("rm");
    let err = load(tmp.path()).expect_err("no weights");
    assert!(
        err.contains("transformer") && err.contains("safetensors"),
        "{err}"
    );
}

#[test]
fn missing_tensor_and_wrong_shape_are_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_dir(&tiny(), tmp.path());
    let file = tmp
        .path()
        .join("transformer/diffusion_pytorch_model.safetensors");
    let mut tensors =
        qwen_image_model::candle_core::safetensors::load(&file, &Device::Cpu).expect("load");
    tensors.remove("proj_out.bias");
    qwen_image_model::candle_core::safetensors::save(&tensors, &file).expect("save");
    let err = load(tmp.path()).expect_err("missing tensor");
    assert!(
        err.contains("proj_out.bias") && err.contains("missing"),
        "{err}"
    );

    tensors.insert(
        "proj_out.bias".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).expect("zeros"),
    );
    qwen_image_model::candle_core::safetensors::save(&tensors, &file).expect("save");
    let err = load(tmp.path()).expect_err("wrong shape");
    assert!(
        err.contains("proj_out.bias")
            && err.contains("shape")
            && err.contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
}

#[test]
fn missing_shard_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_dir(&tiny(), tmp.path());
    let dir = tmp.path().join("transformer");
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors.index.json"),
        r#"{"metadata":{},"weight_map":{"img_in.weight":"diffusion_pytorch_model-00001-of-00002.safetensors"}}"#,
    )
    .expect("write index");
    let err = load(tmp.path()).expect_err("missing shard");
    assert!(err.contains("00001-of-00002"), "{err}");
}

#[test]
fn bad_config_is_named_and_unknown_keys_are_ignored() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_dir(&tiny(), tmp.path());
    let cfg_path = tmp.path().join("transformer/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("read")).expect("json");
    cfg["pooled_projection_dim"] = 768.into();
    cfg["some_future_key"] = serde_json::json!({"nested": [1, 2]});
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    load(tmp.path()).expect("unknown keys are ignored");

    std::fs::write(&cfg_path, "{ not json").expect("write");
    let err = load(tmp.path()).expect_err("bad json");
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn unsupported_variants_are_rejected() {
    // Qwen-Image-Edit-2511's zero_cond_t is supported (crates/model/tests/edit.rs); the Layered flags are not
    let cfg: TransformerConfig = serde_json::from_str(r#"{"zero_cond_t": true}"#).expect("parse");
    cfg.validate().expect("zero_cond_t is supported");
    for flag in ["use_additional_t_cond", "use_layer3d_rope"] {
        let cfg: TransformerConfig =
            serde_json::from_str(&format!(r#"{{"{flag}": true}}"#)).expect("parse");
        let e = cfg.validate().expect_err("Layered flags are rejected");
        assert!(e.to_string().contains(flag));
    }
    let cfg: TransformerConfig =
        serde_json::from_str(r#"{"attention_head_dim": 64}"#).expect("parse");
    assert!(cfg.validate().is_err(), "axes must sum to the head dim");
}
