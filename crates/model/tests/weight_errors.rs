//! A wrong weights file is refused at load with a message naming the file, the tensor and what was expected:
//! a GGUF of another model, a truncated file, a quant type candle lacks, a missing tensor, a wrong shape, a
//! ComfyUI format this server does not compute.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::source::{
    ConfigSource, LoadOptions, WeightsSource, load_text_encoder, load_transformer,
};
use qwen_image_testkit::files::{gguf_type_offset, patched_copy};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn quant(f: &str) -> PathBuf {
    fixtures().join("quant").join(f)
}

fn tiny() -> ConfigSource {
    ConfigSource::Snapshot(fixtures().join("tiny/snapshot"))
}

fn opts() -> LoadOptions {
    LoadOptions::new(DType::F32, &Device::Cpu)
}

fn transformer_err(file: &Path, config: &ConfigSource) -> String {
    match load_transformer(&WeightsSource::File(file.to_path_buf()), config, &opts()) {
        Ok(_) => panic!("{} loaded", file.display()),
        Err(e) => {
            eprintln!("refused: {e}");
            e.to_string()
        }
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{p}` not in: {msg}");
    }
}

#[test]
fn gguf_of_another_model_is_refused() {
    let e = transformer_err(&quant("text_encoder/Q8_0.gguf"), &tiny());
    assert_has(
        &e,
        &[
            "text_encoder/Q8_0.gguf",
            "`qwen2vl`",
            "Qwen-Image transformer",
            "`qwen_image`",
        ],
    );
    let e = match load_text_encoder(
        &WeightsSource::File(quant("transformer/Q8_0.gguf")),
        &ConfigSource::Released,
        &opts(),
    ) {
        Ok(_) => panic!("a transformer loaded as text encoder"),
        Err(e) => e.to_string(),
    };
    assert_has(&e, &["transformer/Q8_0.gguf", "`qwen_image`", "`qwen2vl`"]);
}

#[test]
fn gguf_without_architecture_and_foreign_tensors_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("other.gguf");
    let q = qwen_image_model::candle_core::quantized::QTensor::quantize(
        &Tensor::zeros((8, 32), DType::F32, &Device::Cpu).expect("zeros"),
        qwen_image_model::candle_core::quantized::GgmlDType::Q8_0,
    )
    .expect("quantize");
    let mut f = std::fs::File::create(&path).expect("create");
    qwen_image_model::candle_core::quantized::gguf_file::write(
        &mut f,
        &[],
        &[("double_blocks.0.img_attn.qkv.weight", &q)],
    )
    .expect("write");
    drop(f);
    let e = transformer_err(&path, &tiny());
    assert_has(
        &e,
        &[
            "other.gguf",
            "not a Qwen-Image transformer",
            "`img_in.weight`",
            "double_blocks.0.img_attn.qkv.weight",
        ],
    );
}

#[test]
fn truncated_files_are_refused_naming_a_tensor() {
    let tmp = tempfile::tempdir().expect("tmp");
    for f in [
        "transformer/Q8_0.gguf",
        "transformer/fp8_e4m3fn.safetensors",
    ] {
        let cut = patched_copy(&quant(f), tmp.path(), |b| {
            let n = b.len() * 3 / 5;
            b.truncate(n);
        });
        let e = transformer_err(&cut, &tiny());
        assert_has(
            &e,
            &[
                cut.to_str().expect("utf8"),
                "truncated",
                "tensor `",
                "needs bytes",
            ],
        );
    }
    // a file cut inside its header
    let cut = patched_copy(&quant("transformer/Q8_0.gguf"), tmp.path(), |b| {
        b.truncate(300)
    });
    let e = transformer_err(&cut, &tiny());
    assert_has(&e, &["Q8_0.gguf", "truncated or corrupt GGUF header"]);
}

#[test]
fn quant_types_candle_lacks_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    // [32, 256]: rows fit IQ4_XS's 256-value blocks, and its data (4352 bytes) is shorter than the Q8_0 data
    let name = "time_text_embed.timestep_embedder.linear_1.weight";
    let file = patched_copy(&quant("transformer/Q8_0.gguf"), tmp.path(), |b| {
        let at = gguf_type_offset(b, name);
        b[at..at + 4].copy_from_slice(&23u32.to_le_bytes()); // ggml IQ4_XS
    });
    let e = transformer_err(&file, &tiny());
    assert_has(&e, &["Q8_0.gguf", name, "IQ4_XS", "Q4_K", "Q8_0"]);

    let file = patched_copy(&quant("transformer/Q8_0.gguf"), tmp.path(), |b| {
        let at = gguf_type_offset(b, name);
        b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    });
    let e = transformer_err(&file, &tiny());
    assert_has(&e, &["Q8_0.gguf", name, "unknown ggml type 99"]);
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = patched_copy(&quant("transformer/Q4_0.gguf"), tmp.path(), |b| {
        let pat = b"proj_out.bias";
        let at = b.windows(pat.len()).position(|w| w == pat).expect("name");
        b[at + pat.len() - 1] = b'z'; // proj_out.biaz
    });
    let e = transformer_err(&file, &tiny());
    assert_has(&e, &["Q4_0.gguf", "`proj_out.bias`", "missing"]);
}

#[test]
fn wrong_shape_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny/snapshot/transformer/config.json"))
            .expect("config"),
    )
    .expect("json");
    cfg["joint_attention_dim"] = 64.into();
    let path = tmp.path().join("config.json");
    std::fs::write(&path, cfg.to_string()).expect("write");
    let e = transformer_err(&quant("transformer/Q8_0.gguf"), &ConfigSource::File(path));
    assert_has(
        &e,
        &[
            "Q8_0.gguf",
            "`txt_norm.weight`",
            "shape [32]",
            "expects [64]",
        ],
    );
}

#[test]
fn the_released_config_against_a_tiny_file_names_the_mismatch() {
    let e = transformer_err(&quant("transformer/Q8_0.gguf"), &ConfigSource::Released);
    assert_has(&e, &["Q8_0.gguf", "has shape", "the config expects"]);
}

#[test]
fn unsupported_comfy_formats_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    // a mixed-precision layer declared nvfp4
    let src = quant("transformer/fp8_e4m3fn.safetensors");
    let mut t: HashMap<String, Tensor> =
        qwen_image_model::candle_core::safetensors::load(&src, &Device::Cpu).expect("load");
    let conf = br#"{"format": "nvfp4"}"#.to_vec();
    let n = conf.len();
    t.insert(
        "img_in.comfy_quant".into(),
        Tensor::from_vec(conf, n, &Device::Cpu).expect("u8"),
    );
    let file = tmp.path().join("nvfp4.safetensors");
    qwen_image_model::candle_core::safetensors::save(&t, &file).expect("save");
    let e = transformer_err(&file, &tiny());
    assert_has(
        &e,
        &["nvfp4.safetensors", "`img_in`", "`nvfp4`", "float8_e4m3fn"],
    );

    // an fp8 e5m2 weight (candle has no e5m2): same byte size, so only the header's dtype changes
    let file = patched_copy(&src, tmp.path(), |b| {
        let pat = b"\"F8_E4M3\"";
        let at = b.windows(pat.len()).position(|w| w == pat).expect("dtype");
        b[at..at + pat.len()].copy_from_slice(b"\"F8_E5M2\"");
    });
    let e = transformer_err(&file, &tiny());
    assert_has(&e, &["fp8_e4m3fn.safetensors", "F8_E5M2", "cannot load"]);
}

#[test]
fn garbage_and_missing_files_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("junk.safetensors");
    std::fs::write(&file, vec![0xffu8; 4096]).expect("write");
    let e = transformer_err(&file, &tiny());
    assert_has(&e, &["junk.safetensors", "not a valid safetensors file"]);
    let e = transformer_err(&tmp.path().join("nope.gguf"), &tiny());
    assert_has(&e, &["nope.gguf", "no such file"]);
}
