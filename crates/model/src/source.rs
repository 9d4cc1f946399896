//! Loading a component from the files users hold: a diffusers snapshot, or single files as ComfyUI and the
//! GGUF community lay them out, with a config from a snapshot, a `config.json`, or the released Qwen-Image sizes.
//!
//! | component | [`WeightsSource::File`] accepts |
//! |---|---|
//! | transformer | GGUF (city96 / QuantStack: arch `qwen_image`, diffusers names, optional `model.diffusion_model.` prefix), safetensors with diffusers names (optional prefix) in f32/bf16/f16, fp8 e4m3fn, or ComfyUI scaled fp8 |
//! | text encoder | llama.cpp GGUF of Qwen2.5-VL (arch `qwen2vl`, `token_embd` / `blk.N.*` names; dims from its metadata), safetensors with transformers names (`model.layers.N` as ComfyUI's `qwen_2.5_vl_7b*.safetensors`, or `model.language_model.*`), dense or (scaled) fp8 |
//! | VAE | safetensors with the original Wan 2.1 names (ComfyUI `qwen_image_vae.safetensors`, converted as diffusers' `convert_wan_vae_to_diffusers`) or diffusers names |
//!
//! A `--transformer-weights FILE` flag maps to `WeightsSource::File(FILE)`, a `--model DIR` snapshot to
//! `WeightsSource::Snapshot(DIR)` / `ConfigSource::Snapshot(DIR)`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result};

use crate::prompt::PromptEncoder;
use crate::snapshot::{self, Snapshot};
use crate::text_encoder::{Qwen25VlTextModel, TextConfig, TextEncoderConfig, WeightNaming};
use crate::tokenizer::QwenTokenizer;
use crate::transformer::{QwenImageTransformer, TransformerConfig};
use crate::vae::{AutoencoderKLQwenImage, VaeConfig};
use crate::weights::naming::{self, COMFY_DIFFUSION_PREFIX, COMFY_VAE_PREFIX};
use crate::weights::store::{Encoding, TensorFile, dtype_label};
use crate::weights::{MemoryReport, QuantMatmul, VarBuilder, WeightStore};

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// Where a component's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    /// The component folder of a diffusers snapshot (`ROOT/transformer`, `ROOT/text_encoder`, `ROOT/vae`).
    Snapshot(PathBuf),
    /// One `.gguf` or `.safetensors` file; its format and naming are detected from its content.
    File(PathBuf),
}

/// Where a component's config comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// `ROOT/<component>/config.json` of a diffusers snapshot.
    Snapshot(PathBuf),
    /// A `config.json` file (diffusers / transformers format).
    File(PathBuf),
    /// What the weights say about themselves (a llama.cpp GGUF's `qwen2vl.*` metadata), else the released
    /// Qwen/Qwen-Image sizes ([`TransformerConfig::qwen_image`], [`TextConfig::qwen25_vl_7b`],
    /// [`VaeConfig::default`]). Tensor shapes are checked against it at load.
    Released,
}

/// Stage dtype, device and how packed (quantized / fp8) linears multiply.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    pub quant_matmul: QuantMatmul,
}

impl LoadOptions {
    pub fn new(dtype: DType, device: &Device) -> Self {
        Self {
            dtype,
            device: device.clone(),
            quant_matmul: QuantMatmul::Auto,
        }
    }
}

/// A loaded component and the weight memory it keeps resident.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    pub model: T,
    pub memory: MemoryReport,
    /// The files the weights came from (for logs and errors).
    pub files: Vec<PathBuf>,
}

/// A renaming of a single file's tensors, chosen from the file's own tensor names.
type PickNaming<'a> = &'a dyn Fn(&[&str]) -> Box<dyn Fn(&str) -> Option<String>>;

/// Opens the weights of `component` with `naming` applied to single files.
fn open_store(src: &WeightsSource, component: &str, naming: PickNaming) -> Result<WeightStore> {
    match src {
        WeightsSource::Snapshot(root) => {
            let dir = Snapshot::open(root)?.component_dir(component)?;
            let files = snapshot::weight_files(&dir)?;
            WeightStore::open(&files, dir.display().to_string(), &|n| Some(n.to_string()))
        }
        WeightsSource::File(path) => {
            if !path.is_file() {
                return Err(err(format!(
                    "{component} weights {}: no such file",
                    path.display()
                )));
            }
            let file = TensorFile::open(path)?;
            // the file's own names pick the renaming
            let rename = naming(&file.names());
            WeightStore::from_files(vec![file], path.display().to_string(), &*rename)
        }
    }
}

fn files_of(store: &WeightStore) -> Vec<PathBuf> {
    store
        .files()
        .iter()
        .map(|f| f.path().to_path_buf())
        .collect()
}

fn read_config<T: serde::de::DeserializeOwned>(
    src: &ConfigSource,
    component: &str,
    file: &str,
) -> Result<Option<T>> {
    match src {
        ConfigSource::Snapshot(root) => Ok(Some(Snapshot::open(root)?.config(component, file)?)),
        ConfigSource::File(path) => Ok(Some(snapshot::read_json(path)?)),
        ConfigSource::Released => Ok(None),
    }
}

/// Refuses a GGUF whose `general.architecture` names another model.
fn check_gguf_arch(store: &WeightStore, expected: &[&str], what: &str) -> Result<()> {
    let Some(meta) = store.gguf_metadata() else {
        return Ok(());
    };
    let arch = meta.get("general.architecture").and_then(|v| v.as_str());
    match arch {
        Some(a) if !expected.contains(&a) => Err(err(format!(
            "{}: GGUF holds a `{a}` model (general.architecture), expected {what} (`{}`)",
            store.label(),
            expected.join("` or `")
        ))),
        _ => Ok(()),
    }
}

/// Refuses weights without the tensors that identify the component, naming a few it does have.
fn check_keys(store: &WeightStore, required: &[&str], what: &str) -> Result<()> {
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|k| !store.contains(k))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut some: Vec<&str> = store.names().collect();
    some.sort();
    some.truncate(4);
    Err(err(format!(
        "{}: not {what}: tensor(s) `{}` missing (the file has e.g. {})",
        store.label(),
        missing.join("`, `"),
        if some.is_empty() {
            "no tensors".to_string()
        } else {
            some.iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    )))
}

/// Opens a transformer's weights (headers only) and checks they are a Qwen-Image transformer.
fn open_transformer(weights: &WeightsSource) -> Result<WeightStore> {
    let store = open_store(weights, "transformer", &|names| {
        let prefix = naming::detect_prefix(names, &[COMFY_DIFFUSION_PREFIX]).map(str::to_string);
        Box::new(move |n| naming::strip_prefix(prefix.as_deref(), n))
    })?;
    check_gguf_arch(&store, &["qwen_image"], "a Qwen-Image transformer")?;
    check_keys(
        &store,
        &[
            "img_in.weight",
            "txt_norm.weight",
            "transformer_blocks.0.img_mod.1.weight",
        ],
        "a Qwen-Image transformer",
    )?;
    Ok(store)
}

/// The transformer config `config` names (the released sizes for [`ConfigSource::Released`]).
pub fn transformer_config(config: &ConfigSource) -> Result<TransformerConfig> {
    Ok(read_config(config, "transformer", "config.json")?
        .unwrap_or_else(TransformerConfig::qwen_image))
}

/// Checks a transformer's weights without loading them (headers only) and describes their format
/// ([`weights_format`]): what a stage reports before its worker loads.
pub fn inspect_transformer(weights: &WeightsSource) -> Result<String> {
    open_transformer(weights).map(|s| weights_format(&s))
}

/// Loads `QwenImageTransformer2DModel`.
pub fn load_transformer(
    weights: &WeightsSource,
    config: &ConfigSource,
    opts: &LoadOptions,
) -> Result<Loaded<QwenImageTransformer>> {
    let cfg = transformer_config(config)?;
    let store = open_transformer(weights)?;
    let files = files_of(&store);
    let vb = VarBuilder::from_store(store, opts.dtype, &opts.device)
        .with_quant_matmul(opts.quant_matmul);
    let model = QwenImageTransformer::new(&cfg, vb.clone())?;
    Ok(Loaded {
        model,
        memory: vb.report(),
        files,
    })
}

/// The text config of a llama.cpp GGUF (`convert_hf_to_gguf.py` writes `{arch}.embedding_length`, ...).
fn text_config_from_gguf(store: &WeightStore) -> Result<Option<TextConfig>> {
    let Some(meta) = store.gguf_metadata() else {
        return Ok(None);
    };
    let arch = meta
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("qwen2vl");
    let num = |k: &str| -> Result<f64> {
        meta.get(&format!("{arch}.{k}"))
            .and_then(|v| v.as_f64())
            .ok_or_else(|| {
                err(format!(
                    "{}: GGUF metadata `{arch}.{k}` is missing",
                    store.label()
                ))
            })
    };
    let vocab = store
        .stored("model.embed_tokens.weight")?
        .shape
        .first()
        .copied()
        .unwrap_or(0);
    let v = serde_json::json!({
        "vocab_size": vocab,
        "hidden_size": num("embedding_length")? as usize,
        "intermediate_size": num("feed_forward_length")? as usize,
        "num_hidden_layers": num("block_count")? as usize,
        "num_attention_heads": num("attention.head_count")? as usize,
        "num_key_value_heads": num("attention.head_count_kv")? as usize,
        "rms_norm_eps": num("attention.layer_norm_rms_epsilon")?,
        "rope_theta": num("rope.freq_base")?,
    });
    serde_json::from_value(v)
        .map(Some)
        .map_err(|e| err(format!("{}: GGUF metadata: {e}", store.label())))
}

/// Opens a text encoder's weights (headers only), checks they are a Qwen2.5-VL text model, and reads its
/// config: `config`, else the GGUF's own metadata, else the released 7B sizes.
fn open_text_encoder(
    weights: &WeightsSource,
    config: &ConfigSource,
) -> Result<(WeightStore, WeightNaming, TextConfig)> {
    let store = open_store(weights, "text_encoder", &|names| {
        if names.iter().any(|n| n.starts_with("blk.")) || names.contains(&"token_embd.weight") {
            Box::new(naming::llama_cpp_to_transformers)
        } else {
            Box::new(|n| Some(n.to_string()))
        }
    })?;
    check_gguf_arch(&store, &["qwen2vl"], "a Qwen2.5-VL text encoder")?;
    let naming = [WeightNaming::LanguageModel, WeightNaming::Legacy]
        .into_iter()
        .find(|n| store.contains(&format!("{}.embed_tokens.weight", n.prefix())))
        .ok_or_else(|| {
            err(format!(
                "{}: neither `model.language_model.embed_tokens.weight` nor `model.embed_tokens.weight` (GGUF: \
                 `token_embd.weight`) found; not a Qwen2.5-VL text encoder",
                store.label()
            ))
        })?;
    let cfg = match read_config::<TextEncoderConfig>(config, "text_encoder", "config.json")? {
        Some(c) => c.text,
        None => text_config_from_gguf(&store)?.unwrap_or_else(TextConfig::qwen25_vl_7b),
    };
    Ok((store, naming, cfg))
}

/// Checks a text encoder's weights without loading them (headers only): its config (as
/// [`load_text_encoder`] would use it) and its format ([`weights_format`]).
pub fn inspect_text_encoder(
    weights: &WeightsSource,
    config: &ConfigSource,
) -> Result<(TextConfig, String)> {
    let (store, _, cfg) = open_text_encoder(weights, config)?;
    Ok((cfg, weights_format(&store)))
}

/// Loads the Qwen2.5-VL text model (text weights only; `visual.*` and `lm_head` / `output` are never read).
pub fn load_text_encoder(
    weights: &WeightsSource,
    config: &ConfigSource,
    opts: &LoadOptions,
) -> Result<Loaded<Qwen25VlTextModel>> {
    let (store, naming, cfg) = open_text_encoder(weights, config)?;
    let files = files_of(&store);
    let vb = VarBuilder::from_store(store, opts.dtype, &opts.device)
        .with_quant_matmul(opts.quant_matmul);
    let model = Qwen25VlTextModel::new(&cfg, vb.pp(naming.prefix()))?;
    Ok(Loaded {
        model,
        memory: vb.report(),
        files,
    })
}

/// The prompt encoder: a text encoder from `weights` and the tokenizer folder `tokenizer_dir`.
pub fn load_prompt_encoder(
    weights: &WeightsSource,
    config: &ConfigSource,
    tokenizer_dir: &Path,
    opts: &LoadOptions,
) -> Result<Loaded<PromptEncoder>> {
    let tokenizer = QwenTokenizer::from_dir(tokenizer_dir)?;
    let te = load_text_encoder(weights, config, opts)?;
    Ok(Loaded {
        model: PromptEncoder::new(tokenizer, te.model),
        memory: te.memory,
        files: te.files,
    })
}

/// Opens a VAE's weights (headers only), renaming Wan 2.1 names, and checks they are a Qwen-Image VAE.
fn open_vae(weights: &WeightsSource, cfg: &VaeConfig) -> Result<WeightStore> {
    let nrb = cfg.num_res_blocks;
    let store = open_store(weights, "vae", &move |names| {
        let prefix = naming::detect_prefix(names, &[COMFY_VAE_PREFIX]).map(str::to_string);
        let stripped: Vec<String> = names
            .iter()
            .filter_map(|n| naming::strip_prefix(prefix.as_deref(), n))
            .collect();
        let refs: Vec<&str> = stripped.iter().map(String::as_str).collect();
        let wan = naming::is_wan_vae_layout(&refs);
        Box::new(move |n| {
            let n = naming::strip_prefix(prefix.as_deref(), n)?;
            Some(if wan {
                naming::wan_vae_to_diffusers(&n, nrb)
            } else {
                n
            })
        })
    })?;
    check_keys(
        &store,
        &["decoder.conv_in.weight", "post_quant_conv.weight"],
        "a Qwen-Image (Wan 2.1) VAE",
    )?;
    Ok(store)
}

/// The VAE config `config` names (the released one for [`ConfigSource::Released`]).
pub fn vae_config(config: &ConfigSource) -> Result<VaeConfig> {
    Ok(read_config(config, "vae", "config.json")?.unwrap_or_default())
}

/// Checks a VAE's weights without loading them (headers only) and describes their format.
pub fn inspect_vae(weights: &WeightsSource, config: &ConfigSource) -> Result<String> {
    open_vae(weights, &vae_config(config)?).map(|s| weights_format(&s))
}

/// Loads `AutoencoderKLQwenImage` (f32 or f16 on the CPU, see [`AutoencoderKLQwenImage::load`]).
pub fn load_vae(
    weights: &WeightsSource,
    config: &ConfigSource,
    opts: &LoadOptions,
) -> Result<Loaded<AutoencoderKLQwenImage>> {
    if opts.device.is_cpu() && opts.dtype == DType::BF16 {
        return Err(err(
            "vae: bf16 is not supported on the CPU (candle has no bf16 conv there); load it in F32 or F16",
        ));
    }
    let cfg = vae_config(config)?;
    let store = open_vae(weights, &cfg)?;
    let files = files_of(&store);
    let vb = VarBuilder::from_store(store, opts.dtype, &opts.device);
    let model = AutoencoderKLQwenImage::new(&cfg, vb.clone())?;
    Ok(Loaded {
        model,
        memory: vb.report(),
        files,
    })
}

/// The weights and config of one component from a stage's flags: `FILE` of its `--<component>-weights`
/// flag (`flag`) when given, else the component folder of the `--model` snapshot; the config from the
/// snapshot, else the released sizes ([`ConfigSource::Released`]).
pub fn sources(
    file: Option<&Path>,
    snapshot: Option<&Path>,
    flag: &str,
) -> std::result::Result<(WeightsSource, ConfigSource), String> {
    let weights = match (file, snapshot) {
        (Some(f), _) => WeightsSource::File(f.to_path_buf()),
        (None, Some(dir)) => WeightsSource::Snapshot(dir.to_path_buf()),
        (None, None) => {
            return Err(format!(
                "no weights: give --model DIR (a diffusers snapshot) or {flag} FILE"
            ));
        }
    };
    let config = snapshot.map_or(ConfigSource::Released, |d| {
        ConfigSource::Snapshot(d.to_path_buf())
    });
    Ok((weights, config))
}

/// The storage format of a component's weights as a stage reports it: the container, the type holding
/// most parameters, the other types, and whether ComfyUI scales are applied: `gguf Q8_0 + F32`,
/// `safetensors F32`, `safetensors F8_E4M3 + BF16, scaled`.
pub fn weights_format(store: &WeightStore) -> String {
    use std::collections::BTreeMap;
    let mut params: BTreeMap<String, u64> = BTreeMap::new();
    let mut scaled = false;
    for name in store.names() {
        if name.ends_with(".scale_weight") || name.ends_with(".weight_scale") {
            scaled = true;
            continue;
        }
        if name == "scaled_fp8" {
            continue;
        }
        let Ok(info) = store.stored(name) else {
            continue;
        };
        let label = match info.encoding {
            Encoding::Plain(d) => dtype_label(d),
            Encoding::Ggml(g, _) => g.name.to_string(),
            Encoding::Unsupported(s) => s,
        };
        *params.entry(label).or_default() += info.shape.iter().product::<usize>() as u64;
    }
    let mut types: Vec<(String, u64)> = params.into_iter().collect();
    types.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let container = match store.files().first() {
        Some(TensorFile::Gguf(_)) => "gguf",
        _ => "safetensors",
    };
    let names: Vec<&str> = types.iter().map(|(t, _)| t.as_str()).collect();
    let mut out = format!("{container} {}", names.join(" + "));
    if scaled {
        out.push_str(", scaled");
    }
    out
}
