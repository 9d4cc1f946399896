//! Quantized and single-file weights against diffusers' / transformers' own loaders on the same files
//! (`tests/fixtures/quant`, made by `tools/refharness/ref_quant.py` from the `tiny` snapshot):
//!
//! - GGUF transformers (Q8_0, Q4_0 on the tiny model; Q4_K on a 256-wide one) vs
//!   `QwenImageTransformer2DModel.from_single_file(..., quantization_config=GGUFQuantizationConfig(f32))`,
//! - fp8 e4m3fn and ComfyUI scaled fp8 (with the `model.diffusion_model.` prefix) vs `from_single_file`,
//! - llama.cpp GGUF and ComfyUI scaled-fp8 text encoders vs `QwenImagePipeline.encode_prompt` with transformers
//!   holding the same (dequantized) weights,
//! - the VAE under its original Wan 2.1 names, converted as `convert_wan_vae_to_diffusers`.
//!
//! Errors are relative L2 (`‖ours − ref‖ / ‖ref‖`); the bounds are the measured errors with headroom (README
//! "Quantized weights" gives the measured values).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::rel_l2 as rel;
use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::source::{
    self, ConfigSource, LoadOptions, WeightsSource, load_prompt_encoder, load_text_encoder,
    load_transformer,
};
use qwen_image_model::transformer::{QwenImageTransformer, TransformerInputs};
use qwen_image_model::weights::QuantMatmul;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn quant() -> PathBuf {
    fixtures().join("quant")
}

fn tiny() -> PathBuf {
    fixtures().join("tiny/snapshot")
}

fn refs() -> HashMap<String, Tensor> {
    qwen_image_model::candle_core::safetensors::load(quant().join("refs.safetensors"), &Device::Cpu)
        .expect("refs.safetensors")
}

fn opts(mode: QuantMatmul) -> LoadOptions {
    LoadOptions {
        quant_matmul: mode,
        ..LoadOptions::new(DType::F32, &Device::Cpu)
    }
}

/// Transformer output on the dumped inputs (`{model}.inputs.*`).
fn transformer_out(model: &QwenImageTransformer, r: &HashMap<String, Tensor>, m: &str) -> Tensor {
    let t = |k: &str| r[&format!("{m}.inputs.{k}")].clone();
    let ctx = t("encoder_hidden_states")
        .to_dtype(model.dtype())
        .expect("dtype");
    model
        .forward(&TransformerInputs {
            hidden_states: &t("hidden_states"),
            encoder_hidden_states: &ctx,
            encoder_mask: Some(&t("encoder_hidden_states_mask")),
            timestep: &t("timestep"),
            img_shapes: &[(1, 4, 4)],
            controlnet_residuals: &[],
        })
        .expect("forward")
}

/// Our denoising loop on the dumped pipeline inputs (`{model}.denoise.*`): 3 steps, true CFG 4, 64x64.
fn final_latents(model: &QwenImageTransformer, r: &HashMap<String, Tensor>, m: &str) -> Tensor {
    let sched = common::snapshot_scheduler(&tiny());
    common::final_latents(model, r, &format!("{m}."), 3, 4.0, &sched)
}

/// Loads `file` both ways (dequantize-then-matmul and candle's QMatMul) and compares one transformer pass and
/// the final latents with diffusers on the same file; returns the dequantize-path errors.
fn check_transformer(
    m: &str,
    format: &str,
    file: &str,
    config: ConfigSource,
    bound: (f64, f64),
    native_bound: (f64, f64),
) -> (f64, f64) {
    let r = refs();
    let mut dequant = (0.0, 0.0);
    for (mode, (b_out, b_final)) in [
        (QuantMatmul::Dequantize, bound),
        (QuantMatmul::Native, native_bound),
    ] {
        let loaded = load_transformer(
            &WeightsSource::File(quant().join(file)),
            &config,
            &opts(mode),
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        let out = transformer_out(&loaded.model, &r, m);
        let e_out = rel(&out, &r[&format!("{m}.{format}.out")]);
        let fin = final_latents(&loaded.model, &r, m);
        let e_final = rel(&fin, &r[&format!("{m}.{format}.final")]);
        let e_f32 = rel(&fin, &r[&format!("{m}.f32.final")]);
        eprintln!(
            "{m} {format} {mode:?}: out {e_out:.2e}, final latents {e_final:.2e} vs diffusers on the same file \
             ({e_f32:.2e} vs the f32 model); {}",
            loaded.memory
        );
        assert!(
            e_out < b_out,
            "{format} {mode:?}: transformer output error {e_out:.3e} >= {b_out:.0e}"
        );
        assert!(
            e_final < b_final,
            "{format} {mode:?}: final latents error {e_final:.3e} >= {b_final:.0e}"
        );
        if mode == QuantMatmul::Dequantize {
            dequant = (e_out, e_final);
        }
    }
    dequant
}

#[test]
fn gguf_q8_0_transformer_matches_diffusers() {
    check_transformer(
        "tiny",
        "Q8_0",
        "transformer/Q8_0.gguf",
        ConfigSource::Snapshot(tiny()),
        (1e-3, 1e-3),
        (3e-2, 3e-2),
    );
    // resident weights: the linears in 8.5 bits (34 bytes per 32 values), the rest f32
    let loaded = load_transformer(
        &WeightsSource::File(quant().join("transformer/Q8_0.gguf")),
        &ConfigSource::Snapshot(tiny()),
        &opts(QuantMatmul::Auto),
    )
    .expect("load");
    let q = loaded.memory.by_format["Q8_0"];
    assert_eq!(q.bytes * 32, q.params * 34);
    assert!(loaded.memory.by_format.contains_key("F32"));
    let dense = load_transformer(
        &WeightsSource::Snapshot(tiny()),
        &ConfigSource::Snapshot(tiny()),
        &opts(QuantMatmul::Auto),
    )
    .expect("dense");
    assert_eq!(
        dense.memory.total_params(),
        loaded.memory.total_params(),
        "every parameter is accounted for"
    );
    assert!((loaded.memory.total_bytes() as f64) < 0.35 * dense.memory.total_bytes() as f64);
}

#[test]
fn gguf_q4_0_transformer_matches_diffusers() {
    check_transformer(
        "tiny",
        "Q4_0",
        "transformer/Q4_0.gguf",
        ConfigSource::Snapshot(tiny()),
        (1e-3, 1e-3),
        (5e-2, 5e-2),
    );
}

#[test]
fn gguf_q4_k_transformer_matches_diffusers() {
    check_transformer(
        "t256",
        "Q4_K",
        "transformer256/Q4_K.gguf",
        ConfigSource::File(quant().join("transformer256/transformer/config.json")),
        (1e-3, 1e-3),
        (5e-2, 5e-2),
    );
}

#[test]
fn fp8_e4m3fn_transformer_matches_diffusers() {
    check_transformer(
        "tiny",
        "fp8",
        "transformer/fp8_e4m3fn.safetensors",
        ConfigSource::Snapshot(tiny()),
        (1e-5, 1e-5),
        (1e-5, 1e-5),
    );
}

#[test]
fn comfy_scaled_fp8_transformer_with_prefix_matches_comfy_dequantization() {
    let (_, _) = check_transformer(
        "tiny",
        "fp8_scaled",
        "transformer/fp8_scaled_comfy.safetensors",
        ConfigSource::Snapshot(tiny()),
        (1e-5, 1e-5),
        (1e-5, 1e-5),
    );
}

/// bf16 compute on a Q8_0 file stays near the f32 result (diffusers' `compute_dtype` analogue).
#[test]
fn gguf_q8_0_transformer_in_bf16() {
    let r = refs();
    let loaded = load_transformer(
        &WeightsSource::File(quant().join("transformer/Q8_0.gguf")),
        &ConfigSource::Snapshot(tiny()),
        &LoadOptions::new(DType::BF16, &Device::Cpu),
    )
    .expect("load");
    let out = transformer_out(&loaded.model, &r, "tiny")
        .to_dtype(DType::F32)
        .expect("f32");
    let e = rel(&out, &r["tiny.Q8_0.out"]);
    eprintln!("tiny Q8_0 in bf16: out {e:.2e}");
    assert!(e < 3e-2, "{e}");
}

fn check_text_encoder(format: &str, file: &str, config: ConfigSource, bound: f64) {
    let r = refs();
    let prompts = [
        "dance monkey",
        "A cat holding a sign that says hello world",
        "一只可爱的熊猫坐在竹林里，水墨画风格。",
        " ",
    ];
    for mode in [QuantMatmul::Dequantize, QuantMatmul::Native] {
        let enc = load_prompt_encoder(
            &WeightsSource::File(quant().join(file)),
            &config,
            &tiny().join("tokenizer"),
            &opts(mode),
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        let out = enc.model.encode(&prompts, 512).expect("encode");
        let e = rel(&out.embeds, &r[&format!("te.{format}.prompt_embeds")]);
        let e_f32 = rel(&out.embeds, &r["te.f32.prompt_embeds"]);
        let mask_ref = &r[&format!("te.{format}.prompt_embeds_mask")];
        assert_eq!(
            out.mask.to_vec2::<f32>().expect("mask"),
            mask_ref.to_vec2::<f32>().expect("mask")
        );
        eprintln!(
            "text encoder {format} {mode:?}: prompt_embeds {e:.2e} vs transformers on the same weights \
             ({e_f32:.2e} vs f32); {}",
            enc.memory
        );
        let b = if mode == QuantMatmul::Native {
            5e-2
        } else {
            bound
        };
        assert!(e < b, "{format} {mode:?}: {e:.3e} >= {b:.0e}");
    }
}

#[test]
fn llama_cpp_gguf_q8_0_text_encoder_matches_transformers() {
    // dims from the GGUF's qwen2vl.* metadata
    check_text_encoder(
        "Q8_0",
        "text_encoder/Q8_0.gguf",
        ConfigSource::Released,
        1e-4,
    );
}

#[test]
fn llama_cpp_gguf_q4_0_text_encoder_matches_transformers() {
    check_text_encoder(
        "Q4_0",
        "text_encoder/Q4_0.gguf",
        ConfigSource::Released,
        1e-4,
    );
}

#[test]
fn comfy_scaled_fp8_text_encoder_matches_transformers() {
    check_text_encoder(
        "fp8_scaled",
        "text_encoder/fp8_scaled_comfy.safetensors",
        ConfigSource::Snapshot(tiny()),
        1e-5,
    );
}

#[test]
fn gguf_text_encoder_keeps_the_embedding_quantized() {
    let te = load_text_encoder(
        &WeightsSource::File(quant().join("text_encoder/Q8_0.gguf")),
        &ConfigSource::Released,
        &opts(QuantMatmul::Auto),
    )
    .expect("load");
    let cfg = te.model.config();
    assert_eq!(
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size),
        (32, 2, 1152)
    );
    // token_embd [1152, 32] + 2 layers of q,k,v,o,gate,up,down in Q8_0; lm_head (`output`) is never read
    let q = te.memory.by_format["Q8_0"];
    let per_layer = 32 * 32 + 16 * 32 * 2 + 32 * 32 + 64 * 32 * 3;
    assert_eq!(q.params, 1152 * 32 + 2 * per_layer as u64);
}

// ------------------------------------------------------------------------------------------------------------
// VAE under the original Wan names
// ------------------------------------------------------------------------------------------------------------

/// Every Wan key of the released VAE layout maps to the diffusers key `convert_wan_vae_to_diffusers` gives.
#[test]
fn wan_vae_names_match_diffusers_converter() {
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(quant().join("vae_wan_keys.json")).expect("read"),
    )
    .expect("json");
    let nrb = j["num_res_blocks"].as_u64().expect("nrb") as usize;
    let keys = j["keys"].as_object().expect("keys");
    assert!(keys.len() > 150);
    for (wan, diffusers) in keys {
        assert_eq!(
            qwen_image_model::weights::naming::wan_vae_to_diffusers(wan, nrb),
            diffusers.as_str().expect("str"),
            "{wan}"
        );
    }
}

/// The test's inverse of the Wan → diffusers renaming (tiny VAE: one residual block per level).
fn diffusers_to_wan(key: &str, nrb: usize) -> String {
    let resid = |k: String| -> String {
        for (a, b) in [
            (".norm1.gamma", ".residual.0.gamma"),
            (".conv1.", ".residual.2."),
            (".norm2.gamma", ".residual.3.gamma"),
            (".conv2.", ".residual.6."),
            (".conv_shortcut.", ".shortcut."),
        ] {
            if k.contains(a) {
                return k.replacen(a, b, 1);
            }
        }
        k
    };
    match key {
        "quant_conv.weight" => return "conv1.weight".into(),
        "quant_conv.bias" => return "conv1.bias".into(),
        "post_quant_conv.weight" => return "conv2.weight".into(),
        "post_quant_conv.bias" => return "conv2.bias".into(),
        _ => {}
    }
    let (side, rest) = key.split_once('.').expect("side");
    if let Some(t) = rest.strip_prefix("conv_in.") {
        return format!("{side}.conv1.{t}");
    }
    if rest == "norm_out.gamma" {
        return format!("{side}.head.0.gamma");
    }
    if let Some(t) = rest.strip_prefix("conv_out.") {
        return format!("{side}.head.2.{t}");
    }
    if let Some(t) = rest.strip_prefix("mid_block.resnets.") {
        let (i, tail) = t.split_once('.').expect("idx");
        return resid(format!(
            "{side}.middle.{}.{tail}",
            if i == "0" { 0 } else { 2 }
        ));
    }
    if let Some(t) = rest.strip_prefix("mid_block.attentions.0.") {
        return format!("{side}.middle.1.{t}");
    }
    if let Some(t) = rest.strip_prefix("down_blocks.") {
        return resid(format!("{side}.downsamples.{t}"));
    }
    let t = rest.strip_prefix("up_blocks.").expect("up block");
    let (level, tail) = t.split_once('.').expect("level");
    let level: usize = level.parse().expect("level");
    if let Some(t) = tail.strip_prefix("resnets.") {
        let (j, tail) = t.split_once('.').expect("resnet");
        let j: usize = j.parse().expect("j");
        return resid(format!(
            "decoder.upsamples.{}.{tail}",
            level * (nrb + 2) + j
        ));
    }
    let t = tail.strip_prefix("upsamplers.0.").expect("upsampler");
    format!("decoder.upsamples.{}.{t}", level * (nrb + 2) + nrb + 1)
}

/// A single-file VAE with the original Wan names (as ComfyUI's `qwen_image_vae.safetensors`) decodes exactly
/// like the diffusers snapshot it was made from (diffusers' reference dump `tiny/refs/vae_64`).
#[test]
fn wan_layout_vae_file_matches_diffusers_decode() {
    let vae_file = tiny().join("vae/diffusion_pytorch_model.safetensors");
    let tensors =
        qwen_image_model::candle_core::safetensors::load(&vae_file, &Device::Cpu).expect("vae");
    let nrb = 1; // tiny/snapshot/vae/config.json
    let wan: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (diffusers_to_wan(&k, nrb), v))
        .collect();
    assert!(wan.keys().any(|k| k.starts_with("decoder.upsamples.")));
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("qwen_image_vae.safetensors");
    qwen_image_model::candle_core::safetensors::save(&wan, &file).expect("save");
    let loaded = source::load_vae(
        &WeightsSource::File(file),
        &ConfigSource::Snapshot(tiny()),
        &opts(QuantMatmul::Auto),
    )
    .expect("load wan vae");
    let r = qwen_image_model::candle_core::safetensors::load(
        fixtures().join("tiny/refs/vae_64/tensors.safetensors"),
        &Device::Cpu,
    )
    .expect("refs");
    let decoded = loaded
        .model
        .decode(&r["vae.posterior_mean"])
        .expect("decode");
    let e = rel(&decoded.unsqueeze(2).expect("5d"), &r["vae.decoded"]);
    assert!(e < 1e-5, "decode {e}");
}
