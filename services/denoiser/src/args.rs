//! The denoiser's own flags (beside the shared stage flags): the ControlNets it loads.

use std::path::PathBuf;

/// Denoiser flags (also flattened into `qwen-image serve`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DenoiserArgs {
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
