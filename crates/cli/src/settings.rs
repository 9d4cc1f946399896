//! The request flags every generating command shares, flattened into each (one struct, so their names and
//! meanings cannot drift): they become the request's `GenerationSettings`.

use clap::Args;
use std::path::PathBuf;

use qwen_image_proto::v1::{GenerationSettings, LoraRef, PreviewSettings};

#[derive(Args, Debug, Clone)]
pub struct SettingsArgs {
    /// What to draw (Chinese, English or mixed).
    #[arg(long, env = "QWEN_IMAGE_PROMPT")]
    pub prompt: String,
    /// Negative prompt; enables true CFG when --true-cfg-scale > 1 (e.g. " ").
    #[arg(long, env = "QWEN_IMAGE_NEGATIVE_PROMPT")]
    pub negative_prompt: Option<String>,
    /// Width in pixels, a multiple of the model's size multiple (VAE scale factor x 2: 16 for Qwen-Image).
    /// Default: `generate` the model's declared size (64 for the demo model) or the server's (128 x the VAE
    /// scale factor, 1024); image commands the picture's size; `pose` the pose's canvas; outpaint: the
    /// target canvas width (with --anchor) instead of --left/--right.
    #[arg(long, env = "QWEN_IMAGE_WIDTH")]
    pub width: Option<u32>,
    /// Height in pixels (as --width).
    #[arg(long, env = "QWEN_IMAGE_HEIGHT")]
    pub height: Option<u32>,
    /// Denoising steps of the full schedule (server default 50; image commands run about steps x strength).
    #[arg(long, env = "QWEN_IMAGE_STEPS")]
    pub steps: Option<u32>,
    /// True CFG scale (server default 4.0).
    #[arg(long, env = "QWEN_IMAGE_TRUE_CFG_SCALE")]
    pub true_cfg_scale: Option<f32>,
    /// Seed (torch.Generator("cpu").manual_seed compatible); random when absent, printed either way.
    #[arg(long, env = "QWEN_IMAGE_SEED")]
    pub seed: Option<u64>,
    /// Number of images (1..=4); files after the first get `-1`, `-2`, ... before the extension.
    #[arg(long, env = "QWEN_IMAGE_NUM_IMAGES")]
    pub num_images: Option<u32>,
    /// A LoRA adapter for this request, `NAME[:SCALE]` (scale default 1): with --gateway one the denoiser
    /// loaded (`--lora NAME=FILE`); on the local stack MODEL/loras/NAME.safetensors (the default model ships
    /// `lightning`, a 4-step adapter), or `FILE.safetensors[:SCALE]` (`generate` only; name = the file
    /// stem). An adapter with a `NAME.scheduler.json` beside it brings its scheduler settings. Repeatable;
    /// adapters are summed in order.
    #[arg(long = "lora", env = "QWEN_IMAGE_LORA", value_delimiter = ',', value_parser = parse_lora_arg)]
    pub lora: Vec<LoraArg>,
    /// Which model of a gateway serving several runs the request (its name in ListModels; default the
    /// gateway's first model).
    #[arg(long = "served-model", env = "QWEN_IMAGE_SERVED_MODEL")]
    pub served_model: Option<String>,
}

/// One `--lora NAME[:SCALE]` / `FILE[:SCALE]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraArg {
    pub name: String,
    pub scale: Option<f32>,
    /// A file the local stack's denoiser loads under `name`.
    pub file: Option<PathBuf>,
}

/// `--lora` parser: `NAME`, `NAME:SCALE`, `FILE.safetensors` or `FILE.safetensors:SCALE` (a value with a
/// `/` or ending in `.safetensors` is a file).
pub fn parse_lora_arg(s: &str) -> Result<LoraArg, String> {
    let (target, scale) = match s.rsplit_once(':') {
        Some((t, v)) => {
            let scale: f32 = v.parse().map_err(|_| {
                format!("`{s}`: the scale after `:` must be a number (e.g. lightning:0.8)")
            })?;
            if !scale.is_finite() {
                return Err(format!("`{s}`: the scale must be finite"));
            }
            (t, Some(scale))
        }
        None => (s, None),
    };
    if target.is_empty() {
        return Err(format!("`{s}`: name the adapter, as NAME[:SCALE]"));
    }
    if target.contains('/') || target.ends_with(".safetensors") {
        let file = PathBuf::from(target);
        let name = file
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("`{s}` has no file name"))?;
        return Ok(LoraArg {
            name,
            scale,
            file: Some(file),
        });
    }
    Ok(LoraArg {
        name: target.to_string(),
        scale,
        file: None,
    })
}

impl SettingsArgs {
    /// The request's settings (unset flags = 0 / absent: the server's defaults).
    pub fn to_proto(&self, preview: Option<PreviewSettings>) -> GenerationSettings {
        GenerationSettings {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width_px: self.width.unwrap_or(0),
            height_px: self.height.unwrap_or(0),
            steps: self.steps.unwrap_or(0),
            true_cfg_scale: self.true_cfg_scale,
            seed: self.seed,
            preview,
            num_images: self.num_images.unwrap_or(0),
            loras: self
                .lora
                .iter()
                .map(|l| LoraRef {
                    name: l.name.clone(),
                    scale: l.scale,
                })
                .collect(),
            scheduler: None,
            model: self.served_model.clone().unwrap_or_default(),
        }
    }

    /// The `--lora FILE` adapters, for the local stack's denoiser.
    pub fn lora_files(&self) -> Vec<qwen_image_denoiser::adapters::LoraSpec> {
        self.lora
            .iter()
            .filter_map(|l| {
                l.file
                    .as_ref()
                    .map(|f| qwen_image_denoiser::adapters::LoraSpec {
                        name: l.name.clone(),
                        file: f.clone(),
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lora_args() {
        let a = parse_lora_arg("lightning").expect("name");
        assert_eq!(
            (a.name.as_str(), a.scale, a.file),
            ("lightning", None, None)
        );
        let a = parse_lora_arg("style:-0.5").expect("scale");
        assert_eq!((a.name.as_str(), a.scale), ("style", Some(-0.5)));
        let a = parse_lora_arg("/x/Lightning-4steps.safetensors:0.8").expect("file");
        assert_eq!(a.name, "Lightning-4steps");
        assert_eq!(
            a.file.as_deref(),
            Some(std::path::Path::new("/x/Lightning-4steps.safetensors"))
        );
        assert!(parse_lora_arg("style:abc").is_err());
        assert!(parse_lora_arg(":1").is_err());
        assert!(parse_lora_arg("style:inf").is_err());
    }
}
