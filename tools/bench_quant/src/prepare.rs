//! Writes the single files the benchmark loads, from a diffusers snapshot: GGUF transformers as city96's
//! converter lays them out (arch `qwen_image`, diffusers names), llama.cpp-layout GGUF text encoders (arch
//! `qwen2vl`), a Comfy-Org style fp8 e4m3fn transformer and a ComfyUI scaled-fp8 text encoder.
//!
//! Quantization uses candle's ggml quantizers (`QTensor::quantize`, ports of ggml's reference
//! `quantize_row_*`). Rows that do not fit a type's block fall back: k-quants (256-value blocks) to Q5_0, then
//! to F16.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use qwen_image_model::snapshot::{Snapshot, weight_files};
use qwen_image_model::text_encoder::TextEncoderConfig;
use qwen_image_model::weights::naming;

/// float8_e4m3fn's largest finite value (ComfyUI's scale is amax / 448).
const FP8_MAX: f64 = 448.0;

/// Every tensor of a snapshot component, as f32.
fn load_component(snapshot: &Snapshot, component: &str) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in weight_files(&snapshot.component_dir(component)?)? {
        for (k, v) in candle_core::safetensors::load(&f, &Device::Cpu)? {
            all.insert(k, v.to_dtype(DType::F32)?);
        }
    }
    Ok(all)
}

/// The ggml type a 2-D weight with rows of `cols` values gets when `want` is asked for.
fn fit(want: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(want.block_size()) {
        want
    } else if cols.is_multiple_of(GgmlDType::Q5_0.block_size()) {
        GgmlDType::Q5_0
    } else {
        GgmlDType::F16
    }
}

fn quantize(t: &Tensor, want: GgmlDType) -> Result<QTensor> {
    let ty = if t.rank() == 2 {
        fit(want, t.dim(1)?)
    } else {
        GgmlDType::F32
    };
    Ok(QTensor::quantize(t, ty)?)
}

fn write_gguf(path: &Path, meta: &[(&str, Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta, &tensors)?;
    Ok(())
}

/// ComfyUI scaled fp8 of one weight: `(w / s).to(fp8)` with `s = amax / 448`.
fn fp8_scaled(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let amax = w.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let s = (amax / FP8_MAX).max(1e-12);
    let q = (w / s)?.clamp(-FP8_MAX, FP8_MAX)?.to_dtype(DType::F8E4M3)?;
    Ok((q, Tensor::new(s as f32, &Device::Cpu)?))
}

/// The files `table` measures, by case name.
pub struct Prepared {
    pub transformer: Vec<(String, PathBuf)>,
    pub text_encoder: Vec<(String, PathBuf)>,
}

pub const QUANTS: [(&str, GgmlDType); 3] = [
    ("Q8_0", GgmlDType::Q8_0),
    ("Q4_0", GgmlDType::Q4_0),
    ("Q4_K", GgmlDType::Q4K),
];

pub fn prepare(model: &Path, work: &Path) -> Result<Prepared> {
    std::fs::create_dir_all(work)?;
    let snap = Snapshot::open(model)?;
    let mut out = Prepared {
        transformer: Vec::new(),
        text_encoder: Vec::new(),
    };

    // transformer
    let t = load_component(&snap, "transformer")?;
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    for (label, ty) in QUANTS {
        let path = work.join(format!("transformer.{label}.gguf"));
        if !path.exists() {
            let tensors = names
                .iter()
                .map(|k| Ok(((*k).clone(), quantize(&t[*k], ty)?)))
                .collect::<Result<Vec<_>>>()?;
            let meta = [("general.architecture", Value::String("qwen_image".into()))];
            write_gguf(&path, &meta, &tensors)?;
        }
        out.transformer.push((label.to_string(), path));
    }
    let path = work.join("transformer.fp8_e4m3fn.safetensors");
    if !path.exists() {
        let mut fp8 = HashMap::new();
        for (k, v) in &t {
            let v = if v.rank() == 2 {
                v.to_dtype(DType::F8E4M3)?
            } else {
                v.to_dtype(DType::BF16)?
            };
            fp8.insert(k.clone(), v);
        }
        candle_core::safetensors::save(&fp8, &path)?;
    }
    out.transformer.push(("fp8".to_string(), path));
    drop(t);

    // text encoder (text weights only)
    let cfg: TextEncoderConfig = snap.config("text_encoder", "config.json")?;
    let te = load_component(&snap, "text_encoder")?;
    let prefix = if te.contains_key("model.language_model.embed_tokens.weight") {
        "model.language_model."
    } else {
        "model."
    };
    let text: HashMap<String, Tensor> = te
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|r| (r.to_string(), v)))
        .collect();
    for (label, ty) in QUANTS {
        let path = work.join(format!("text_encoder.{label}.gguf"));
        if !path.exists() {
            let mut tensors = Vec::new();
            let mut keys: Vec<&String> = text.keys().collect();
            keys.sort();
            for k in keys {
                let Some(name) = naming::transformers_to_llama_cpp(&format!("model.{k}")) else {
                    continue;
                };
                tensors.push((name, quantize(&text[k], ty)?));
            }
            let c = &cfg.text;
            let u = |v: usize| Value::U32(v as u32);
            let meta = [
                ("general.architecture", Value::String("qwen2vl".into())),
                ("qwen2vl.embedding_length", u(c.hidden_size)),
                ("qwen2vl.block_count", u(c.num_hidden_layers)),
                ("qwen2vl.feed_forward_length", u(c.intermediate_size)),
                ("qwen2vl.attention.head_count", u(c.num_attention_heads)),
                ("qwen2vl.attention.head_count_kv", u(c.num_kv_heads())),
                ("qwen2vl.rope.freq_base", Value::F32(c.rope_theta() as f32)),
                (
                    "qwen2vl.attention.layer_norm_rms_epsilon",
                    Value::F32(c.rms_norm_eps as f32),
                ),
            ];
            write_gguf(&path, &meta, &tensors)?;
        }
        out.text_encoder.push((label.to_string(), path));
    }
    let path = work.join("text_encoder.fp8_scaled.safetensors");
    if !path.exists() {
        let mut st = HashMap::new();
        for (k, v) in &text {
            let full = format!("model.{k}");
            if v.rank() == 2 && !k.starts_with("embed_tokens") {
                let (q, s) = fp8_scaled(v)?;
                let layer = full.trim_end_matches(".weight");
                st.insert(format!("{layer}.scale_weight"), s);
                st.insert(full, q);
            } else {
                st.insert(full, v.to_dtype(DType::BF16)?);
            }
        }
        st.insert(
            "scaled_fp8".to_string(),
            Tensor::zeros(0, DType::F32, &Device::Cpu)?.to_dtype(DType::F8E4M3)?,
        );
        candle_core::safetensors::save(&st, &path)?;
    }
    out.text_encoder.push(("fp8 scaled".to_string(), path));
    Ok(out)
}
