//! `qwen-image detect-pose`: the people in a picture (controlnet-aux's OpenPose body estimator) as OpenPose
//! keypoints JSON, and optionally their skeleton as PNG; from a running pose-detector stage (`--pose-detector
//! URL`) or with the detector's weights loaded in this process.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use qwen_image_common::stage::StageDef;
use qwen_image_pose_detector::{LoadedDetector, PoseDetectorArgs, PoseDetectorStage};
use qwen_image_proto::v1::pose_detector_client::PoseDetectorClient;
use qwen_image_proto::v1::{DetectPoseRequest, DetectPoseResponse, Image};

use crate::model_dir::default_model_dir;

#[derive(Args, Debug, Clone)]
pub struct DetectPoseArgs {
    /// The picture (PNG or JPEG).
    #[arg(long)]
    pub image: PathBuf,
    /// Where to write the keypoints (OpenPose JSON in the picture's pixels; what `pose --keypoints` reads).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the skeleton picture (PNG, the picture's size, controlnet-aux's drawing).
    #[arg(long)]
    pub skeleton_out: Option<PathBuf>,
    /// A running pose-detector stage (e.g. http://127.0.0.1:50054). Without it the detector runs in this process.
    #[arg(long, env = "QWEN_IMAGE_POSE_DETECTOR")]
    pub pose_detector: Option<String>,
    /// PEM CA bundle that verifies an https:// --pose-detector (default: the system's roots).
    #[arg(long, env = "QWEN_IMAGE_CA_CERT", requires = "pose_detector")]
    pub ca_cert: Option<PathBuf>,
    /// Model folder whose `pose_detector/body_pose_model.safetensors` is used without `--pose-weights`.
    /// Default: the embedded default model.
    #[arg(long, env = "QWEN_IMAGE_MODEL", conflicts_with = "pose_detector")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub weights: PoseDetectorArgs,
    /// Give up after this many seconds (with --pose-detector).
    #[arg(long, env = "QWEN_IMAGE_TIMEOUT_SECS", default_value_t = 600)]
    pub timeout_secs: u64,
}

/// The picture as RGB8.
fn read_rgb(path: &PathBuf) -> Result<Image> {
    let img = image::open(path)
        .with_context(|| format!("cannot read {} as a PNG or JPEG picture", path.display()))?
        .to_rgb8();
    Ok(Image {
        width_px: img.width(),
        height_px: img.height(),
        rgb8: img.into_raw().into(),
    })
}

async fn remote(
    url: &str,
    ca_cert: Option<&std::path::Path>,
    image: Image,
    timeout: Duration,
) -> Result<DetectPoseResponse> {
    let channel = qwen_image_common::tls::client::endpoint(url, ca_cert)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("--pose-detector `{url}` is not a usable URL"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the pose detector at {url}"))?;
    let mut client = PoseDetectorClient::new(channel)
        .max_decoding_message_size(qwen_image_common::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(qwen_image_common::limits::MAX_MESSAGE_BYTES);
    let mut req = tonic::Request::new(DetectPoseRequest { image: Some(image) });
    req.set_timeout(timeout);
    let r = client
        .detect_pose(req)
        .await
        .map_err(|s| anyhow::anyhow!("the pose detector answered {}: {}", s.code(), s.message()))?;
    Ok(r.into_inner())
}

fn local(args: &DetectPoseArgs, image: &Image) -> Result<DetectPoseResponse> {
    let model = match (&args.weights.pose_weights, &args.model) {
        (Some(_), m) => m.clone(),
        (None, Some(m)) => Some(m.clone()),
        (None, None) => Some(default_model_dir()?),
    };
    let mut config = PoseDetectorStage::config(model.clone().unwrap_or_default());
    config.model_dir = model;
    config.own = args.weights.clone();
    let weights = qwen_image_pose_detector::weights_path(&config).map_err(anyhow::Error::msg)?;
    if !weights.is_file() {
        bail!(
            "no pose detector weights at {}: convert controlnet-aux's body_pose_model.pth with \
             tools/openpose/convert_body_pose_model.py and pass --pose-weights FILE (or use --pose-detector URL)",
            weights.display()
        );
    }
    let state = qwen_image_pose_detector::PoseState { weights };
    let model: LoadedDetector =
        PoseDetectorStage::load(&config, &state).map_err(anyhow::Error::msg)?;
    let (w, h) = (image.width_px as usize, image.height_px as usize);
    qwen_image_pose_detector::job::detect(&model, &image.rgb8, w, h)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn run(args: DetectPoseArgs) -> Result<std::process::ExitCode> {
    let image = read_rgb(&args.image)?;
    let answer = match &args.pose_detector {
        Some(url) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(remote(
                url,
                args.ca_cert.as_deref(),
                image,
                Duration::from_secs(args.timeout_secs),
            ))?,
        None => local(&args, &image)?,
    };
    std::fs::write(&args.out, &answer.keypoints_json)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    if let Some(p) = &args.skeleton_out {
        std::fs::write(p, &answer.skeleton_png)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if answer.people == 0 {
        eprintln!(
            "no person found in {} ({} has an empty people list)",
            args.image.display(),
            args.out.display()
        );
        return Ok(std::process::ExitCode::from(1));
    }
    eprintln!(
        "{} person(s) found; keypoints written to {}",
        answer.people,
        args.out.display()
    );
    Ok(std::process::ExitCode::SUCCESS)
}
