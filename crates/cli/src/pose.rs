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
#[command(group(clap::ArgGroup::new("pose").required(true).args(["pose_image", "keypoints", "reference_image"])))]
pub struct PoseArgs {
    /// The pose as a skeleton picture (PNG or JPEG, OpenPose / DWPose colours on black).
    #[arg(long, env = "QWEN_IMAGE_POSE_IMAGE")]
    pub pose_image: Option<PathBuf>,
    /// The pose as OpenPose keypoints JSON (COCO-18 or BODY_25, optional hands / face; see docs/pose-example.json).
    #[arg(long, env = "QWEN_IMAGE_KEYPOINTS")]
    pub keypoints: Option<PathBuf>,
    /// A reference picture (PNG or JPEG, e.g. a photo) to take the pose from: the pose-detector stage finds the
    /// people (controlnet-aux's OpenPose body estimator), then they are posed as with --keypoints. Needs a
    /// detector: the gateway's `--pose-detector`, or for a local stack `--pose-weights` (or the model's
    /// `pose_detector/`).
    #[arg(long, env = "QWEN_IMAGE_REFERENCE_IMAGE")]
    pub reference_image: Option<PathBuf>,
    /// The local stack's pose detector weights (`--pose-weights FILE`).
    #[command(flatten)]
    pub pose_detector: qwen_image_pose_detector::PoseDetectorArgs,
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
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let pose = match (&args.pose_image, &args.keypoints, &args.reference_image) {
        (Some(p), None, None) => pose_request::Pose::PoseImage(read(p)?.into()),
        (None, Some(p), None) => pose_request::Pose::KeypointsJson(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {} as UTF-8 text", p.display()))?,
        ),
        (None, None, Some(p)) => pose_request::Pose::ReferenceImage(read(p)?.into()),
        _ => bail!("give exactly one of --pose-image, --keypoints and --reference-image"),
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
    let (model, mut options, id) = resolve_controlnet(
        args.target.gateway.as_deref(),
        args.target.model.as_ref(),
        args.control.controlnet.as_ref(),
        "controlnet",
    )?;
    options.pose_detector = args.pose_detector.clone();
    let request = build_request(&args, id)?;
    let target = args.target.to_target(model, options);
    execute(ApiRequest::Pose(request), &target, &args.target.out).await?;
    Ok(())
}
