//! Command-line flags and the typed configuration `run` takes.

use std::path::PathBuf;

use qwen_image_common::args::CommonArgs;
pub use qwen_image_common::args::DeviceSpec;

/// Default number of requests admitted at once (running + waiting).
pub const DEFAULT_QUEUE_CAPACITY: usize = 4;
/// Upper bound of `--queue-capacity` (each admitted request holds its tensors in memory).
pub const MAX_QUEUE_CAPACITY: u64 = 1024;

/// The qwen-image denoiser stage service.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "qwen-image-denoiser", version, about)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Diffusers snapshot directory (holds model_index.json, transformer/, scheduler/).
    #[arg(long, env = "QWEN_IMAGE_MODEL")]
    pub model: PathBuf,

    /// Requests admitted at once (one running, the rest waiting); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "QWEN_IMAGE_QUEUE_CAPACITY", default_value_t = DEFAULT_QUEUE_CAPACITY,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_QUEUE_CAPACITY))]
    pub queue_capacity: usize,

    /// Compute device: `cpu`, or `cuda:N` (`cuda` = `cuda:0`; needs a binary built with `--features cuda`).
    #[arg(long, env = "QWEN_IMAGE_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,

    /// A ControlNet to load at startup (diffusers folder with config.json + safetensors, e.g. InstantX's
    /// Qwen-Image-ControlNet-Union), as `DIR` (id = the folder name) or `NAME=DIR`. Repeatable.
    #[arg(long = "controlnet", env = "QWEN_IMAGE_CONTROLNETS", value_delimiter = ',', value_parser = parse_controlnet)]
    pub controlnets: Vec<ControlNetSpec>,
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

/// `--device` parser: refuses `cuda:N` unless built with the `cuda` feature.
pub fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    DeviceSpec::parse(s, cfg!(feature = "cuda"))
}

/// What `run` needs (everything but the listener and the shutdown signal).
#[derive(Debug, Clone)]
pub struct DenoiserConfig {
    /// Diffusers snapshot directory.
    pub model_dir: PathBuf,
    /// Requests admitted at once (running + waiting), at least 1.
    pub queue_capacity: usize,
    pub device: DeviceSpec,
    /// ControlNets loaded at startup, ids unique.
    pub controlnets: Vec<ControlNetSpec>,
}

impl DenoiserConfig {
    /// A CPU configuration with the default queue capacity.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        Self {
            model_dir: model_dir.into(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            device: DeviceSpec::Cpu,
            controlnets: Vec::new(),
        }
    }
}

impl From<&Args> for DenoiserConfig {
    fn from(a: &Args) -> Self {
        Self {
            model_dir: a.model.clone(),
            queue_capacity: a.queue_capacity,
            device: a.device,
            controlnets: a.controlnets.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn parses_devices() {
        assert_eq!(parse_device("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(parse_device("cuda:1").is_ok(), cfg!(feature = "cuda"));
    }

    #[test]
    fn parses_flags() {
        let a = Args::try_parse_from([
            "x",
            "--model",
            "/m",
            "--queue-capacity",
            "2",
            "--listen",
            "127.0.0.1:0",
        ])
        .expect("valid");
        let c = DenoiserConfig::from(&a);
        assert_eq!(c.queue_capacity, 2);
        assert!(Args::try_parse_from(["x", "--model", "/m", "--queue-capacity", "0"]).is_err());
    }

    #[test]
    fn parses_controlnets() {
        let a = Args::try_parse_from([
            "x",
            "--model",
            "/m",
            "--controlnet",
            "/nets/union/",
            "--controlnet",
            "pose=/nets/other",
        ])
        .expect("valid");
        let ids: Vec<&str> = a.controlnets.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["union", "pose"]);
        assert_eq!(a.controlnets[1].dir, PathBuf::from("/nets/other"));
        assert!(parse_controlnet("=/x").is_err());
        assert!(parse_controlnet("/").is_err());
    }
}
