//! The denoiser's own flags (beside the shared stage flags): the transformer's weights file and the
//! ControlNets it loads.

use std::path::PathBuf;

/// Denoiser flags (also flattened into `qwen-image serve`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DenoiserArgs {
    #[command(flatten)]
    pub weights: TransformerWeightsArgs,

    /// A ControlNet to load at startup (diffusers folder with config.json + safetensors, e.g. InstantX's
    /// Qwen-Image-ControlNet-Union), as `DIR` (id = the folder name) or `NAME=DIR`. Repeatable.
    #[arg(long = "controlnet", env = "QWEN_IMAGE_CONTROLNETS", value_delimiter = ',', value_parser = parse_controlnet)]
    pub controlnets: Vec<ControlNetSpec>,

    /// A LoRA adapter to load at startup, as `NAME=FILE` (a safetensors file in diffusers/PEFT, kohya or
    /// ComfyUI naming) or `FILE` (name = the file name without extension); requests name it in `loras`.
    /// `FILE` with `.safetensors` replaced by `.scheduler.json` beside it, when present, is the scheduler
    /// config requests with this adapter use (e.g. Lightning's). Repeatable.
    #[arg(long = "lora", env = "QWEN_IMAGE_LORAS", value_delimiter = ',', value_parser = crate::adapters::parse_lora)]
    pub loras: Vec<crate::adapters::LoraSpec>,

    /// Bytes of LoRA factors the denoiser holds at most, in MiB (fractions allowed; 0 = unbounded):
    /// `LoraAdmin.LoadLora` evicts the least recently used adapters beyond it; the `--lora` adapters must fit.
    #[arg(long, env = "QWEN_IMAGE_LORA_BUDGET_MB", default_value_t = 0.0)]
    pub lora_budget_mb: f64,
    #[command(flatten)]
    pub batching: BatchArgs,
}

/// Continuous batching (`batcher`): requests of one latent shape run through the transformer together.
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Most images (rows of requests' latents, summed) one transformer pass runs; requests join and leave
    /// the batch at step boundaries. 1 = one request at a time (no batching).
    #[arg(long, env = "QWEN_IMAGE_MAX_BATCH", default_value_t = DEFAULT_MAX_BATCH,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_batch: u32,

    /// How long a request that starts a batch waits for others of its shape before its first step
    /// (milliseconds; later requests still join at any step boundary).
    #[arg(long, env = "QWEN_IMAGE_BATCH_WAIT_MS", default_value_t = DEFAULT_BATCH_WAIT_MS,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub batch_wait_ms: u64,
}

/// Default `--max-batch`: no batching. Batched requests equal their solo runs within 1e-5 relative, not
/// bitwise, so batching is opt-in (4 suits 2-8 CPU cores) and a seed reproduces the same bytes by default.
pub const DEFAULT_MAX_BATCH: u32 = 1;
/// Default `--batch-wait-ms`: no wait; requests arriving together join at the next step boundary.
pub const DEFAULT_BATCH_WAIT_MS: u64 = 0;

impl Default for BatchArgs {
    fn default() -> Self {
        Self {
            max_batch: DEFAULT_MAX_BATCH,
            batch_wait_ms: DEFAULT_BATCH_WAIT_MS,
        }
    }
}

impl DenoiserArgs {
    /// `--lora-budget-mb` in bytes (0 = unbounded).
    pub fn lora_budget_bytes(&self) -> u64 {
        if self.lora_budget_mb.is_finite() && self.lora_budget_mb > 0.0 {
            (self.lora_budget_mb * (1u64 << 20) as f64) as u64
        } else {
            0
        }
    }
}

/// Where the transformer's weights come from besides the snapshot (its own struct so that commands that
/// start a local stack take it without the denoiser's other flags).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TransformerWeightsArgs {
    /// The transformer's weights as one file instead of the snapshot's `transformer/`: a GGUF (city96 /
    /// QuantStack: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, ...), Comfy-Org's fp8 e4m3fn or ComfyUI's scaled-fp8
    /// safetensors, or any ComfyUI single file of the transformer. The config comes from `--model`, or is
    /// the released Qwen-Image's without it.
    #[arg(long, env = "QWEN_IMAGE_TRANSFORMER_WEIGHTS", value_name = "FILE")]
    pub transformer_weights: Option<PathBuf>,
}

/// One `--controlnet`: the id requests name it by and its folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlNetSpec {
    pub id: String,
    pub dir: PathBuf,
}

/// `--controlnet` parser: `NAME=DIR` or `DIR` (id = the last path component).
pub fn parse_controlnet(s: &str) -> Result<ControlNetSpec, String> {
    let (id, dir) = match s.split_once('=') {
        Some((name, dir)) => (name.to_string(), PathBuf::from(dir)),
        None => {
            let dir = PathBuf::from(s);
            let name = dir
                .components()
                .filter_map(|c| match c {
                    std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
                    _ => None,
                })
                .next_back()
                .ok_or_else(|| format!("`{s}` has no folder name; use NAME=DIR"))?;
            (name, dir)
        }
    };
    if id.is_empty() || dir.as_os_str().is_empty() {
        return Err(format!(
            "`{s}`: use DIR or NAME=DIR with a non-empty NAME and DIR"
        ));
    }
    Ok(ControlNetSpec { id, dir })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        own: DenoiserArgs,
    }

    #[test]
    fn parses_controlnets() {
        let a = Probe::try_parse_from([
            "x",
            "--controlnet",
            "/nets/union/",
            "--controlnet",
            "pose=/nets/other",
        ])
        .expect("valid");
        let ids: Vec<&str> = a.own.controlnets.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["union", "pose"]);
        assert_eq!(a.own.controlnets[1].dir, PathBuf::from("/nets/other"));
        assert!(parse_controlnet("=/x").is_err());
        assert!(parse_controlnet("/").is_err());
    }
}
