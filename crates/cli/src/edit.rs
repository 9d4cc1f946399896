//! `qwen-image img2img | inpaint | outpaint`: one image-flow request, sent like `generate` (to a running
//! gateway, or to a stack started in this process); writes the PNG(s).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use qwen_image_proto::v1::{Anchor, Img2ImgRequest, InpaintRequest, OutpaintRequest};

use crate::generate::{ApiRequest, Target, TargetArgs, execute};
use crate::settings::SettingsArgs;
use crate::stack::StageOptions;

/// Options shared by the three commands (their meaning is `generate`'s unless said otherwise).
#[derive(Args, Debug, Clone)]
pub struct EditArgs {
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// The input picture (PNG or JPEG).
    #[arg(long, env = "QWEN_IMAGE_IMAGE")]
    pub image: PathBuf,
    /// How much to change, in (0, 1] (server default 0.6; 1.0 for outpaint).
    #[arg(long, env = "QWEN_IMAGE_STRENGTH")]
    pub strength: Option<f64>,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Args, Debug, Clone)]
pub struct Img2ImgArgs {
    #[command(flatten)]
    pub common: EditArgs,
}

#[derive(Args, Debug, Clone)]
pub struct InpaintArgs {
    #[command(flatten)]
    pub common: EditArgs,
    /// The mask (PNG or JPEG, the picture's size): white = repaint, black = keep.
    #[arg(long, env = "QWEN_IMAGE_MASK")]
    pub mask: PathBuf,
    /// Paste the kept pixels of the input back over the result (off = diffusers' behaviour).
    #[arg(long, env = "QWEN_IMAGE_PASTE_BACK")]
    pub paste_back: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum AnchorArg {
    Center,
    TopLeft,
    Top,
    TopRight,
    Left,
    Right,
    BottomLeft,
    Bottom,
    BottomRight,
}

impl From<AnchorArg> for Anchor {
    fn from(a: AnchorArg) -> Self {
        match a {
            AnchorArg::Center => Anchor::Center,
            AnchorArg::TopLeft => Anchor::TopLeft,
            AnchorArg::Top => Anchor::Top,
            AnchorArg::TopRight => Anchor::TopRight,
            AnchorArg::Left => Anchor::Left,
            AnchorArg::Right => Anchor::Right,
            AnchorArg::BottomLeft => Anchor::BottomLeft,
            AnchorArg::Bottom => Anchor::Bottom,
            AnchorArg::BottomRight => Anchor::BottomRight,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct OutpaintArgs {
    #[command(flatten)]
    pub common: EditArgs,
    /// Pixels to add on the left.
    #[arg(long, env = "QWEN_IMAGE_LEFT", default_value_t = 0)]
    pub left: u32,
    /// Pixels to add on the right.
    #[arg(long, env = "QWEN_IMAGE_RIGHT", default_value_t = 0)]
    pub right: u32,
    /// Pixels to add at the top.
    #[arg(long, env = "QWEN_IMAGE_TOP", default_value_t = 0)]
    pub top: u32,
    /// Pixels to add at the bottom.
    #[arg(long, env = "QWEN_IMAGE_BOTTOM", default_value_t = 0)]
    pub bottom: u32,
    /// With --width/--height: where the picture sits on the canvas (default center).
    #[arg(long, env = "QWEN_IMAGE_ANCHOR", value_enum)]
    pub anchor: Option<AnchorArg>,
    /// Paste the original pixels back over the result.
    #[arg(long, env = "QWEN_IMAGE_PASTE_BACK")]
    pub paste_back: bool,
}

fn read(path: &PathBuf) -> Result<bytes::Bytes> {
    Ok(std::fs::read(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .into())
}

fn target(a: &EditArgs) -> Target {
    a.target
        .to_target(a.target.model.clone(), StageOptions::default())
}

fn block_on(fut: impl std::future::Future<Output = Result<()>>) -> Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(fut)?;
    Ok(std::process::ExitCode::SUCCESS)
}

pub fn img2img(args: Img2ImgArgs) -> Result<std::process::ExitCode> {
    let a = args.common;
    let req = Img2ImgRequest {
        settings: Some(a.settings.to_proto(None)),
        image: read(&a.image)?,
        strength: a.strength,
    };
    block_on(async move {
        execute(ApiRequest::Img2Img(req), &target(&a), &a.target.out).await?;
        Ok(())
    })
}

pub fn inpaint(args: InpaintArgs) -> Result<std::process::ExitCode> {
    let a = args.common;
    let req = InpaintRequest {
        settings: Some(a.settings.to_proto(None)),
        image: read(&a.image)?,
        strength: a.strength,
        mask: read(&args.mask)?,
        paste_back: args.paste_back,
    };
    block_on(async move {
        execute(ApiRequest::Inpaint(req), &target(&a), &a.target.out).await?;
        Ok(())
    })
}

pub fn outpaint(args: OutpaintArgs) -> Result<std::process::ExitCode> {
    let a = args.common;
    let req = OutpaintRequest {
        settings: Some(a.settings.to_proto(None)),
        image: read(&a.image)?,
        strength: a.strength,
        left_px: args.left,
        right_px: args.right,
        top_px: args.top,
        bottom_px: args.bottom,
        anchor: args.anchor.map(Anchor::from).unwrap_or(Anchor::Unspecified) as i32,
        paste_back: args.paste_back,
    };
    block_on(async move {
        let r = execute(ApiRequest::Outpaint(req), &target(&a), &a.target.out).await?;
        if let Some(p) = r.padding {
            println!(
                "padding left {} right {} top {} bottom {}",
                p.left_px, p.right_px, p.top_px, p.bottom_px
            );
        }
        Ok(())
    })
}
