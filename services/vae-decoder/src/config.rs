//! Command-line flags and the typed configuration `run` takes.

use std::path::PathBuf;

use qwen_image_common::args::CommonArgs;
pub use qwen_image_common::args::DeviceSpec;

/// Default number of requests admitted at once (running + waiting).
pub const DEFAULT_QUEUE_CAPACITY: usize = 4;
/// Upper bound of `--queue-capacity`.
pub const MAX_QUEUE_CAPACITY: u64 = 1024;

/// The qwen-image VAE stage service.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "qwen-image-vae", version, about)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Diffusers snapshot directory (holds model_index.json, vae/).
    #[arg(long, env = "QWEN_IMAGE_MODEL")]
    pub model: PathBuf,

    /// Requests admitted at once (one running, the rest waiting); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "QWEN_IMAGE_QUEUE_CAPACITY", default_value_t = DEFAULT_QUEUE_CAPACITY,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_QUEUE_CAPACITY))]
    pub queue_capacity: usize,

    /// Compute device: `cpu`, or `cuda:N` (needs a binary built with `--features cuda`).
    #[arg(long, env = "QWEN_IMAGE_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
}

/// `--device` parser: refuses `cuda:N` unless built with the `cuda` feature.
pub fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    DeviceSpec::parse(s, cfg!(feature = "cuda"))
}

/// What `run` needs (everything but the listener and the shutdown signal).
#[derive(Debug, Clone)]
pub struct VaeServiceConfig {
    pub model_dir: PathBuf,
    pub queue_capacity: usize,
    pub device: DeviceSpec,
}

impl VaeServiceConfig {
    /// A CPU configuration with the default queue capacity.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        Self {
            model_dir: model_dir.into(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            device: DeviceSpec::Cpu,
        }
    }
}

impl From<&Args> for VaeServiceConfig {
    fn from(a: &Args) -> Self {
        Self {
            model_dir: a.model.clone(),
            queue_capacity: a.queue_capacity,
            device: a.device,
        }
    }
}
