//! `qwen-image controlnet-inpaint`: regenerate the white region of a mask with an inpainting ControlNet
//! (diffusers QwenImageControlNetInpaintPipeline), through a gateway or a local stack.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use qwen_image_proto::v1::ControlNetInpaintRequest;

use crate::generate::{ApiRequest, ControlArgs, TargetArgs, execute};
use crate::pose::resolve_controlnet;

#[derive(Args, Debug, Clone)]
pub struct CnInpaintArgs {
    /// The image to inpaint (PNG or JPEG).
    #[arg(long)]
    pub image: PathBuf,
    /// The mask (PNG or JPEG): white = regenerate.
    #[arg(long)]
    pub mask: PathBuf,
    #[command(flatten)]
    pub control: ControlArgs,
    /// What to draw in the masked region.
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Width in pixels, a multiple of 16 (default: the image's width floored to 16).
    #[arg(long)]
    pub width: Option<u32>,
    /// Height in pixels, a multiple of 16 (default: the image's height floored to 16).
    #[arg(long)]
    pub height: Option<u32>,
    #[arg(long)]
    pub steps: Option<u32>,
    #[arg(long)]
    pub true_cfg_scale: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub num_images: Option<u32>,
    #[command(flatten)]
    pub target: TargetArgs,
}

pub fn run(args: CnInpaintArgs) -> Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(inpaint(args))?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn inpaint(args: CnInpaintArgs) -> Result<()> {
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let (model, options, id) = resolve_controlnet(
        args.target.gateway.as_deref(),
        args.target.model.as_ref(),
        args.control.controlnet.as_ref(),
        "controlnet_inpaint",
    )?;
    let request = ControlNetInpaintRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width_px: args.width.unwrap_or(0),
        height_px: args.height.unwrap_or(0),
        steps: args.steps.unwrap_or(0),
        true_cfg_scale: args.true_cfg_scale,
        seed: args.seed,
        preview: None,
        num_images: args.num_images.unwrap_or(0),
        image: read(&args.image)?.into(),
        mask: read(&args.mask)?.into(),
        controlnet_id: id,
        conditioning_scale: args.control.conditioning_scale,
        control_guidance_start: args.control.control_guidance_start,
        control_guidance_end: args.control.control_guidance_end,
    };
    let target = args.target.to_target(model, options);
    execute(
        ApiRequest::ControlNetInpaint(request),
        &target,
        &args.target.out,
    )
    .await?;
    Ok(())
}
