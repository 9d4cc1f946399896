//! The model the worker thread owns: loading from a snapshot and the warm-up pass.

use candle_core::{DType, Device, Tensor};
use qwen_image_common::stage::ComputeDtype;
use qwen_image_model::controlnet::{ControlNetConfig, QwenImageControlNet};
use qwen_image_model::denoise::{Conditioning, predict};
use qwen_image_model::scheduler::SchedulerConfig;
use qwen_image_model::snapshot::{Snapshot, first_line};
use qwen_image_model::source::{self, ConfigSource, LoadOptions};
use qwen_image_model::transformer::{QwenImageTransformer, TransformerConfig};
use qwen_image_model::weights::MemoryReport;

use crate::validate::{ControlNetInfo, ModelShape};
use crate::{DenoiserConfig, DenoiserState};

/// Transformer, scheduler config and device, living on the worker thread.
pub struct LoadedModel {
    pub transformer: QwenImageTransformer,
    pub scheduler: SchedulerConfig,
    pub device: Device,
    /// The `--controlnet` nets, in flag order, by id.
    pub controlnets: Vec<(String, QwenImageControlNet)>,
    pub shape: ModelShape,
    /// The transformer's resident weights, by format.
    pub memory: MemoryReport,
    /// The LoRA adapters held (the `--lora` ones, then LoraAdmin's changes).
    pub loras: crate::adapters::HeldLoras,
    /// The requests being denoised together (continuous batching), kept across jobs.
    pub batch: crate::batcher::Running,
}

/// Reads every `--controlnet` config (cheap JSON reads) and checks it fits the transformer: what requests'
/// ControlInputs are validated against.
pub fn read_controlnets(
    cfg: &DenoiserConfig,
    tcfg: &TransformerConfig,
) -> Result<Vec<ControlNetInfo>, String> {
    let mut out: Vec<ControlNetInfo> = Vec::new();
    for spec in &cfg.own.controlnets {
        if out.iter().any(|c| c.id == spec.id) {
            return Err(format!(
                "two ControlNets are named `{}`; name them apart with --controlnet NAME=DIR",
                spec.id
            ));
        }
        let path = spec.dir.join("config.json");
        let c: ControlNetConfig = qwen_image_model::snapshot::read_json(&path)
            .map_err(|e| format!("ControlNet `{}`: {}", spec.id, first_line(&e)))?;
        if c.base.joint_attention_dim != tcfg.joint_attention_dim
            || c.base.in_channels != tcfg.in_channels
            || c.base.patch_size != tcfg.patch_size
        {
            return Err(format!(
                "ControlNet `{}` ({}) does not fit the transformer: joint_attention_dim {} / in_channels {} / \
                 patch_size {} vs {} / {} / {}",
                spec.id,
                spec.dir.display(),
                c.base.joint_attention_dim,
                c.base.in_channels,
                c.base.patch_size,
                tcfg.joint_attention_dim,
                tcfg.in_channels,
                tcfg.patch_size
            ));
        }
        let extra = c.extra_condition_channels;
        if extra != 0 && extra != c.base.patch_size * c.base.patch_size {
            return Err(format!(
                "ControlNet `{}` has extra_condition_channels {extra}; only 0 (union) and 4 (inpainting) are supported",
                spec.id
            ));
        }
        out.push(ControlNetInfo {
            id: spec.id.clone(),
            cond_channels: c.base.in_channels + extra,
            takes_mask: extra != 0,
        });
    }
    Ok(out)
}

/// The configs `run` reads before starting the worker (cheap JSON reads): they fix what requests are
/// validated against. Without a snapshot, the released Qwen-Image transformer and scheduler configs.
pub fn read_shape(
    cfg: &DenoiserConfig,
    tconfig: &ConfigSource,
) -> Result<(ModelShape, TransformerConfig, SchedulerConfig), String> {
    let tcfg = source::transformer_config(tconfig).map_err(|e| first_line(&e))?;
    tcfg.validate().map_err(|e| first_line(&e))?;
    let scfg: SchedulerConfig = match &cfg.model_dir {
        Some(dir) => Snapshot::open(dir)
            .and_then(|s| s.config("scheduler", "scheduler_config.json"))
            .map_err(|e| first_line(&e))?,
        None => SchedulerConfig::qwen_image(),
    };
    scfg.validate()?;
    let shape = ModelShape {
        joint_attention_dim: tcfg.joint_attention_dim,
        latent_channels: tcfg.latent_channels(),
    };
    Ok((shape, tcfg, scfg))
}

/// Loads the transformer (from the snapshot or `--transformer-weights`) on the configured device and runs
/// one warm-up prediction. Runs on the worker.
pub fn load(cfg: &DenoiserConfig, state: &DenoiserState) -> candle_core::Result<LoadedModel> {
    let (device, dtype) = qwen_image_model::device::open(
        cfg.device.cuda_ordinal(),
        cfg.device.compute_dtype() == ComputeDtype::Bf16,
    )?;
    let loaded = source::load_transformer(
        &state.weights,
        &state.config,
        &LoadOptions::new(dtype, &device),
    )?;
    let tcfg = &state.transformer;
    let controlnets = cfg
        .own
        .controlnets
        .iter()
        .map(|c| {
            let net = QwenImageControlNet::load(&c.dir, dtype, &device)?;
            tracing::info!(id = %c.id, dir = %c.dir.display(), "ControlNet loaded");
            Ok((c.id.clone(), net))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let loras = crate::adapters::HeldLoras::load_all(&cfg.own.loras, &loaded.model)?;
    let model = LoadedModel {
        loras,
        transformer: loaded.model,
        scheduler: state.scheduler.clone(),
        device,
        controlnets,
        shape: ModelShape {
            joint_attention_dim: tcfg.joint_attention_dim,
            latent_channels: tcfg.latent_channels(),
        },
        memory: loaded.memory,
        batch: Default::default(),
    };
    warm_up(&model)?;
    Ok(model)
}

/// One transformer pass on a 2x2 latent (one token) and one zero prompt token: touches every weight.
pub fn warm_up(m: &LoadedModel) -> candle_core::Result<()> {
    let latents = Tensor::zeros((1, 1, 4 * m.shape.latent_channels), DType::F32, &m.device)?;
    let cond = Conditioning {
        embeds: Tensor::zeros((1, 1, m.shape.joint_attention_dim), DType::F32, &m.device)?,
        mask: None,
    };
    let out = predict(
        &m.transformer,
        &latents,
        1.0,
        &cond,
        None,
        1.0,
        &[(1, 1, 1)],
        &[],
    )?;
    let sum = out.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if !sum.is_finite() {
        candle_core::bail!("warm-up produced non-finite output");
    }
    Ok(())
}
