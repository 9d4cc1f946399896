//! The request flags every generating command shares, flattened into each (one struct, so their names and
//! meanings cannot drift): they become the request's `GenerationSettings`.

use clap::Args;
use qwen_image_proto::v1::{GenerationSettings, PreviewSettings};

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
    /// Which model of a gateway serving several runs the request (its name in ListModels; default the
    /// gateway's first model).
    #[arg(long = "served-model", env = "QWEN_IMAGE_SERVED_MODEL")]
    pub served_model: Option<String>,
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
            model: self.served_model.clone().unwrap_or_default(),
        }
    }
}
