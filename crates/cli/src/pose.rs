//! `qwen-image pose`: one ControlNet pose request (a skeleton picture or OpenPose keypoints JSON), to a
//! running gateway or to a stack started in this process whose denoiser loads the ControlNet.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use qwen_image_denoiser::config::ControlNetSpec;
use qwen_image_proto::v1::{PoseRequest, pose_request};

use crate::generate::{ApiRequest, ControlArgs, TargetArgs, execute};
use crate::model_dir::default_model_dir;
use crate::stack::StageOptions;

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("pose").required(true).args(["pose_image", "keypoints"])))]
pub struct PoseArgs {
    /// The pose as a skeleton picture (PNG or JPEG, OpenPose / DWPose colours on black).
    #[arg(long)]
    pub pose_image: Option<PathBuf>,
    /// The pose as OpenPose keypoints JSON (COCO-18 or BODY_25, optional hands / face; see docs/pose-example.json).
    #[arg(long)]
    pub keypoints: Option<PathBuf>,
    #[command(flatten)]
    pub control: ControlArgs,
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// Negative prompt; enables true CFG when --true-cfg-scale > 1 (e.g. " ").
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Width in pixels, a multiple of 16 (default: the pose picture's / keypoints canvas width).
    #[arg(long)]
    pub width: Option<u32>,
    /// Height in pixels, a multiple of 16 (default: the pose picture's / keypoints canvas height).
    #[arg(long)]
    pub height: Option<u32>,
    /// Denoising steps (server default 50; the InstantX card suggests 30).
    #[arg(long)]
    pub steps: Option<u32>,
    /// True CFG scale (server default 4.0).
    #[arg(long)]
    pub true_cfg_scale: Option<f32>,
    /// Seed (torch.Generator("cpu").manual_seed compatible); random when absent, printed either way.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of images (1..=4); files after the first get `-1`, `-2`, ... before the extension.
    #[arg(long)]
    pub num_images: Option<u32>,
    #[command(flatten)]
    pub target: TargetArgs,
}

pub fn run(args: PoseArgs) -> Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(pose(args))?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn build_request(args: &PoseArgs, controlnet_id: String) -> Result<PoseRequest> {
    let pose = match (&args.pose_image, &args.keypoints) {
        (Some(p), None) => pose_request::Pose::PoseImage(
            std::fs::read(p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .into(),
        ),
        (None, Some(p)) => pose_request::Pose::KeypointsJson(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {} as UTF-8 text", p.display()))?,
        ),
        _ => bail!("give exactly one of --pose-image and --keypoints"),
    };
    Ok(PoseRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width_px: args.width.unwrap_or(0),
        height_px: args.height.unwrap_or(0),
        steps: args.steps.unwrap_or(0),
        true_cfg_scale: args.true_cfg_scale,
        seed: args.seed,
        preview: None,
        num_images: args.num_images.unwrap_or(0),
        pose: Some(pose),
        controlnet_id,
        conditioning_scale: args.control.conditioning_scale,
        control_guidance_start: args.control.control_guidance_start,
        control_guidance_end: args.control.control_guidance_end,
    })
}

/// Where the request goes and which ControlNet it names: with a gateway, the id only; for a local stack,
/// the model and the ControlNet its denoiser loads (`--controlnet`, default MODEL/`default_folder`).
pub fn resolve_controlnet(
    gateway: Option<&str>,
    model: Option<&PathBuf>,
    controlnet: Option<&ControlNetSpec>,
    default_folder: &str,
) -> Result<(Option<PathBuf>, StageOptions, String)> {
    if gateway.is_some() {
        let id = controlnet.map(|c| c.id.clone()).unwrap_or_default();
        return Ok((None, StageOptions::default(), id));
    }
    let model = match model {
        Some(m) => m.clone(),
        None => default_model_dir()?,
    };
    let spec = match controlnet {
        Some(c) => c.clone(),
        None => {
            let dir = model.join(default_folder);
            if !dir.join("config.json").is_file() {
                bail!(
                    "{} has no {default_folder}/ folder; pass --controlnet DIR (a diffusers ControlNet folder)",
                    model.display()
                );
            }
            ControlNetSpec {
                id: default_folder.into(),
                dir,
            }
        }
    };
    let id = spec.id.clone();
    let options = StageOptions {
        queue_capacity: None,
        controlnets: vec![spec],
    };
    Ok((Some(model), options, id))
}

async fn pose(args: PoseArgs) -> Result<()> {
    let (model, options, id) = resolve_controlnet(
        args.target.gateway.as_deref(),
        args.target.model.as_ref(),
        args.control.controlnet.as_ref(),
        "controlnet",
    )?;
    let request = build_request(&args, id)?;
    let target = args.target.to_target(model, options);
    execute(ApiRequest::Pose(request), &target, &args.target.out).await?;
    Ok(())
}
