//! `qwen-image pose`: one ControlNet pose request (a skeleton picture or OpenPose keypoints JSON), to a
//! running gateway or to a stack started in this process whose denoiser loads the ControlNet.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use qwen_image_denoiser::ControlNetSpec;
use qwen_image_proto::v1::{PoseRequest, pose_request};

use crate::generate::{ApiRequest, ControlArgs, TargetArgs, execute};
use crate::model_dir::default_model_dir;
use crate::settings::SettingsArgs;
use crate::stack::StageOptions;

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("pose").required(true).args(["pose_image", "keypoints"])))]
pub struct PoseArgs {
    /// The pose as a skeleton picture (PNG or JPEG, OpenPose / DWPose colours on black).
    #[arg(long, env = "QWEN_IMAGE_POSE_IMAGE")]
    pub pose_image: Option<PathBuf>,
    /// The pose as OpenPose keypoints JSON (COCO-18 or BODY_25, optional hands / face; see docs/pose-example.json).
    #[arg(long, env = "QWEN_IMAGE_KEYPOINTS")]
    pub keypoints: Option<PathBuf>,
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    pub settings: SettingsArgs,
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
        settings: Some(args.settings.to_proto(None)),
        pose: Some(pose),
        control: Some(args.control.to_proto(controlnet_id)),
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
        denoiser: qwen_image_denoiser::DenoiserArgs {
            controlnets: vec![spec],
            ..Default::default()
        },
        ..StageOptions::default()
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
