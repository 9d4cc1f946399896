//! The qwen-image pose-detector stage: a picture → the people in it (COCO-18 keypoints, controlnet-aux's OpenPose
//! body estimator, `qwen_image_model::openpose`) and their skeleton, on the stage skeleton of
//! `qwen_image_common::stage`. This crate holds only the model call ([`job`]) and the handler ([`service`]);
//! `main.rs` is the skeleton's `main`.

pub mod job;
pub mod service;

use std::path::PathBuf;

use qwen_image_common::stage::describe::{component_digest, file_label};
use qwen_image_common::stage::{
    Preparation, StageConfig, StageDef, StageError, StageHandle, WeightsUsage,
};
use qwen_image_model::openpose::BodyPoseNet;
use qwen_image_proto::v1::pose_detector_server::PoseDetectorServer;
use qwen_image_proto::v1::{PoseDetectorDescription, StageDescription, StageKind, StageLimits};
use tonic::service::Routes;

/// Full proto name of the service, as health checks name it.
pub const SERVICE_NAME: &str = "qwen_image.v1.PoseDetector";
/// Where a model folder keeps the detector's weights (`--model DIR` without `--pose-weights`).
pub const WEIGHTS_IN_MODEL: &str = "pose_detector/body_pose_model.safetensors";
/// Largest picture side accepted (the network always sees it scaled to 184 px high; this bounds the resizes).
pub const MAX_SIDE_PX: usize = 4096;
/// Largest width:height (or height:width) ratio accepted (the network's input is 184 px high).
pub const MAX_ASPECT: usize = 16;

/// The detector's own flags (also flattened into `qwen-image serve`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PoseDetectorArgs {
    /// controlnet-aux's `body_pose_model.pth` converted to safetensors
    /// (tools/openpose/convert_body_pose_model.py). Default: `<--model>/pose_detector/body_pose_model.safetensors`.
    #[arg(long, env = "QWEN_IMAGE_POSE_WEIGHTS", value_name = "FILE")]
    pub pose_weights: Option<PathBuf>,
}

/// The pose-detector stage.
pub struct PoseDetectorStage;

/// What `run` takes.
pub type PoseDetectorConfig = StageConfig<PoseDetectorArgs>;

/// The weights file the stage loads.
#[derive(Debug, Clone)]
pub struct PoseState {
    pub weights: PathBuf,
}

/// The weights a config names: `--pose-weights`, else the model folder's [`WEIGHTS_IN_MODEL`].
pub fn weights_path(config: &PoseDetectorConfig) -> Result<PathBuf, String> {
    match (&config.own.pose_weights, &config.model_dir) {
        (Some(f), _) => Ok(f.clone()),
        (None, Some(dir)) => Ok(dir.join(WEIGHTS_IN_MODEL)),
        (None, None) => {
            Err("give --pose-weights FILE (body_pose_model.safetensors) or --model DIR".into())
        }
    }
}

/// The model on the worker thread.
pub struct LoadedDetector {
    pub net: BodyPoseNet,
    pub device: candle_core::Device,
}

impl StageDef for PoseDetectorStage {
    type Args = PoseDetectorArgs;
    type Model = LoadedDetector;
    type State = PoseState;

    const NAME: &'static str = "pose-detector";
    const BINARY: &'static str = "qwen-image-pose-detector";
    const SERVICE_NAME: &'static str = SERVICE_NAME;
    const KIND: StageKind = StageKind::PoseDetector;
    const DEFAULT_QUEUE_CAPACITY: usize = 4;
    const CUDA_BUILT: bool = cfg!(feature = "cuda");

    fn prepare(config: &PoseDetectorConfig) -> Result<Preparation<PoseState>, String> {
        let weights = weights_path(config)?;
        if !weights.is_file() {
            return Err(format!(
                "pose detector weights {} not found: convert body_pose_model.pth with \
                 tools/openpose/convert_body_pose_model.py and pass --pose-weights",
                weights.display()
            ));
        }
        // the header only: a wrong file is refused here, before the service listens
        let architecture =
            qwen_image_model::openpose::net::inspect(&weights).map_err(|e| e.to_string())?;
        let digest = component_digest(None, &[], Some(&weights), &[])
            .map_err(|e| format!("cannot read {}: {e}", weights.display()))?;
        Ok(Preparation {
            description: StageDescription {
                model_id: file_label(&weights),
                weights_format: "safetensors F32".into(),
                pose_detector: Some(PoseDetectorDescription {
                    digest,
                    architecture,
                    parts: vec!["body".into()],
                }),
                limits: Some(StageLimits {
                    max_batch: 1,
                    max_side_px: MAX_SIDE_PX as u32,
                    max_pixels: config.max_pixels,
                    max_batched_requests: 1,
                }),
                ..Default::default()
            },
            state: PoseState { weights },
        })
    }

    fn load(config: &PoseDetectorConfig, state: &PoseState) -> Result<LoadedDetector, String> {
        // f32 on every device: the detector's maths is validated in f32 (controlnet-aux runs it in f32)
        let (device, _) = qwen_image_model::device::open(config.device.cuda_ordinal(), false)
            .map_err(|e| e.to_string())?;
        let net = BodyPoseNet::load(&state.weights, &device).map_err(|e| e.to_string())?;
        Ok(LoadedDetector { net, device })
    }

    fn weights(_model: &LoadedDetector) -> Vec<WeightsUsage> {
        Vec::new()
    }

    fn probe(model: &mut LoadedDetector) -> Result<(), String> {
        job::warm_up(model).map_err(|e| e.to_string())
    }

    fn routes(routes: Routes, handle: StageHandle<LoadedDetector>, _state: PoseState) -> Routes {
        routes.add_service(
            PoseDetectorServer::new(service::PoseDetectorService { stage: handle })
                .max_decoding_message_size(qwen_image_common::limits::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(qwen_image_common::limits::MAX_MESSAGE_BYTES),
        )
    }
}

/// Serves the detector on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    config: PoseDetectorConfig,
    listener: impl Into<qwen_image_common::tls::Listeners>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StageError> {
    qwen_image_common::stage::run::<PoseDetectorStage>(config, listener, shutdown).await
}
