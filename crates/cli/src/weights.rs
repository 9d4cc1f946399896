//! The single-file weight flags of a local stack (`generate` and the other request commands, `parity`):
//! the stages' own flag structs flattened, so they are the same flags as `serve`'s and the stage binaries'.

use clap::Args;
use qwen_image_denoiser::TransformerWeightsArgs;
use qwen_image_text_encoder::TextEncoderArgs;
use qwen_image_vae::VaeArgs;

/// `--transformer-weights`, `--text-encoder-weights`, `--tokenizer`, `--vae-weights`.
#[derive(Args, Debug, Clone, Default)]
pub struct WeightFilesArgs {
    #[command(flatten)]
    pub transformer: TransformerWeightsArgs,
    #[command(flatten)]
    pub text_encoder: TextEncoderArgs,
    #[command(flatten)]
    pub vae: VaeArgs,
}
