//! `qwen-image edit --image a.png [--image b.png ...] --prompt ...`: one instruction-editing request
//! (Qwen-Image-Edit-2509 / -2511, the gateway's `Edit`), sent like `generate` (to a running gateway, or
//! to a stack started in this process on an Edit snapshot); writes the PNG(s).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use qwen_image_proto::v1::EditRequest;

use crate::generate::{ApiRequest, TargetArgs, execute};
use crate::settings::SettingsArgs;
use crate::stack::StageOptions;

#[derive(Args, Debug, Clone)]
pub struct InstructArgs {
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// An input picture (PNG or JPEG); repeat for two or three ("Picture 1", "Picture 2", ... in the
    /// prompt). The output size defaults to about 1024x1024 with the last picture's aspect ratio.
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub target: TargetArgs,
}

pub fn run(args: InstructArgs) -> Result<std::process::ExitCode> {
    let images = args
        .images
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(bytes::Bytes::from)
                .with_context(|| format!("cannot read {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let req = EditRequest {
        settings: Some(args.settings.to_proto(None)),
        images,
    };
    let target = args
        .target
        .to_target(args.target.model.clone(), StageOptions::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(execute(ApiRequest::Edit(req), &target, &args.target.out))?;
    Ok(std::process::ExitCode::SUCCESS)
}
