//! `qwen-image controlnet-inpaint`: regenerate the white region of a mask with an inpainting ControlNet
//! (diffusers QwenImageControlNetInpaintPipeline), through a gateway or a local stack.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use qwen_image_proto::v1::ControlNetInpaintRequest;

use crate::generate::{ApiRequest, ControlArgs, TargetArgs, execute};
use crate::pose::resolve_controlnet;
use crate::settings::SettingsArgs;

#[derive(Args, Debug, Clone)]
pub struct CnInpaintArgs {
    /// The image to inpaint (PNG or JPEG).
    #[arg(long, env = "QWEN_IMAGE_IMAGE")]
    pub image: PathBuf,
    /// The mask (PNG or JPEG): white = regenerate.
    #[arg(long, env = "QWEN_IMAGE_MASK")]
    pub mask: PathBuf,
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    pub settings: SettingsArgs,
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
        settings: Some(args.settings.to_proto(None)),
        image: read(&args.image)?.into(),
        mask: read(&args.mask)?.into(),
        control: Some(args.control.to_proto(id)),
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
