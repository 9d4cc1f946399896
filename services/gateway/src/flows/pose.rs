//! ControlNet pose (diffusers QwenImageControlNetPipeline, denoiser-and-pipelines.md §9): the control
//! picture's latents sampled with the request generator's first draw, the initial noise its second.

use qwen_image_proto::v1::GenerateResult;

use crate::error::GatewayError;
use crate::pipeline::Ctx;
use crate::pipeline::control::{self, ControlFlow};
use crate::request::pose::PoseParams;

pub async fn run(ctx: &Ctx<'_>, pp: &PoseParams) -> Result<GenerateResult, GatewayError> {
    let flow = ControlFlow {
        image: &pp.control,
        options: &pp.options,
        latent_mask: None,
        eps_from_request_generator: true,
        chunks: pp.options.chunks(("pose_source", pp.source.as_str())),
    };
    control::run(ctx, &pp.settings, &flow).await
}
