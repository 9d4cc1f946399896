//! The flags every model stage shares (flattened into each stage binary and into `qwen-image serve`), and
//! where a stage computes: the device and, from it, the dtype.

use std::path::PathBuf;

/// Upper bound of `--queue-capacity` (each admitted request holds its tensors in memory).
pub const MAX_QUEUE_CAPACITY: u64 = 1024;

/// Shared stage flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StageArgs {
    /// Diffusers snapshot directory (model_index.json and the component folders the stage reads).
    #[arg(long, env = "QWEN_IMAGE_MODEL")]
    pub model: Option<PathBuf>,

    /// Requests admitted at once (one running, the rest waiting); more get RESOURCE_EXHAUSTED. Default: the
    /// stage's own (text encoder 8, denoiser 4, VAE 8).
    #[arg(long, env = "QWEN_IMAGE_QUEUE_CAPACITY",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_QUEUE_CAPACITY))]
    pub queue_capacity: Option<usize>,

    /// Compute device: `cpu` (f32), or `cuda:N` (`cuda` = `cuda:0`; bf16; needs a binary built with
    /// `--features cuda`).
    #[arg(long, env = "QWEN_IMAGE_DEVICE", default_value = "cpu", value_parser = DeviceSpec::parse)]
    pub device: DeviceSpec,

    /// Most image pixels one request may ask for, summed over its batch (width x height x images; the
    /// denoiser counts 64 pixels per latent cell); larger requests get INVALID_ARGUMENT. Default: sized for
    /// the device (cpu 4096x4096, cuda 2048x2048x2).
    #[arg(long, env = "QWEN_IMAGE_MAX_PIXELS",
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    pub max_pixels: Option<u64>,
}

/// Where a stage runs its model: `cpu`, or `cuda:N` (`cuda` = `cuda:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

/// The dtype a stage computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeDtype {
    F32,
    Bf16,
}

impl DeviceSpec {
    /// Parses a `--device` value. Whether the binary can use CUDA is checked at startup
    /// ([`DeviceSpec::check_built`]), so the message can say how to rebuild.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("`{s}` is not a device; use `cpu` or `cuda:N`")),
            },
        }
    }

    /// Refuses `cuda:N` in a binary built without the `cuda` feature.
    pub fn check_built(self, cuda_built: bool) -> Result<Self, String> {
        if matches!(self, Self::Cuda(_)) && !cuda_built {
            return Err("this binary was built without CUDA support; rebuild with `--features cuda` or use `--device cpu`".into());
        }
        Ok(self)
    }

    /// The CUDA ordinal, `None` for the CPU.
    pub fn cuda_ordinal(self) -> Option<usize> {
        match self {
            Self::Cpu => None,
            Self::Cuda(n) => Some(n),
        }
    }

    /// The default `--max-pixels`: on the CPU a 4096x4096 image (the VAE's largest side; about 3.4 GB peak
    /// for the full-size VAE decode), on CUDA two 2048x2048 images (what a 24 GB card's activations
    /// hold beside the bf16 weights).
    pub fn default_max_pixels(self) -> u64 {
        match self {
            Self::Cpu => 4096 * 4096,
            Self::Cuda(_) => 2 * 2048 * 2048,
        }
    }

    /// The stages' one dtype policy: f32 on the CPU (the reference precision; candle's CPU bf16 matmuls are
    /// slow and it has no CPU bf16 convolution), bf16 on CUDA (the published weights' dtype).
    pub fn compute_dtype(self) -> ComputeDtype {
        match self {
            Self::Cpu => ComputeDtype::F32,
            Self::Cuda(_) => ComputeDtype::Bf16,
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn parses_devices() {
        assert_eq!(DeviceSpec::parse("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(DeviceSpec::parse("cuda:3"), Ok(DeviceSpec::Cuda(3)));
        assert!(DeviceSpec::parse("gpu").is_err());
        assert!(DeviceSpec::parse("cuda:x").is_err());
        assert!(DeviceSpec::Cuda(1).check_built(false).is_err());
        assert_eq!(
            DeviceSpec::Cuda(1).check_built(true),
            Ok(DeviceSpec::Cuda(1))
        );
        assert_eq!(DeviceSpec::Cuda(1).compute_dtype(), ComputeDtype::Bf16);
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        stage: StageArgs,
    }

    #[test]
    fn parses_stage_flags() {
        let p =
            Probe::try_parse_from(["x", "--model", "/m", "--queue-capacity", "2"]).expect("valid");
        assert_eq!(p.stage.queue_capacity, Some(2));
        assert_eq!(p.stage.device, DeviceSpec::Cpu);
        assert_eq!(p.stage.max_pixels, None);
        let p = Probe::try_parse_from(["x", "--max-pixels", "65536"]).expect("valid");
        assert_eq!(p.stage.max_pixels, Some(65536));
        assert!(Probe::try_parse_from(["x", "--max-pixels", "0"]).is_err());
        assert!(Probe::try_parse_from(["x", "--queue-capacity", "0"]).is_err());
        assert!(Probe::try_parse_from(["x", "--device", "tpu"]).is_err());
    }
}
