//! The `qwen_image.v1.PoseDetector` gRPC handler: validate, admit, answer.

use qwen_image_common::stage::{StageError, StageHandle};
use qwen_image_proto::v1::pose_detector_server::PoseDetector;
use qwen_image_proto::v1::{DetectPoseRequest, DetectPoseResponse, Image};
use tonic::{Request, Response, Status};

use crate::{LoadedDetector, MAX_ASPECT, MAX_SIDE_PX};

pub struct PoseDetectorService {
    pub(crate) stage: StageHandle<LoadedDetector>,
}

/// The picture of a request, checked: `(rgb8, width, height)`.
pub fn validate(req: &DetectPoseRequest) -> Result<(Vec<u8>, usize, usize), StageError> {
    let Some(Image {
        width_px,
        height_px,
        rgb8,
    }) = &req.image
    else {
        return Err(StageError::InvalidArgument(
            "image is required: an RGB8 picture (width_px, height_px, rgb8)".into(),
        ));
    };
    let (w, h) = (*width_px as usize, *height_px as usize);
    if w == 0 || h == 0 || w > MAX_SIDE_PX || h > MAX_SIDE_PX {
        return Err(StageError::InvalidArgument(format!(
            "image is {w}x{h}: each side must be 1..={MAX_SIDE_PX} pixels"
        )));
    }
    // the network sees the picture 184 px high (body.py boxsize 368 x scale 0.5): bound its width there
    if w > MAX_ASPECT * h || h > MAX_ASPECT * w {
        return Err(StageError::InvalidArgument(format!(
            "image is {w}x{h}: send a picture at most {MAX_ASPECT} times wider than high or higher than wide"
        )));
    }
    if rgb8.len() != w * h * 3 {
        return Err(StageError::InvalidArgument(format!(
            "image.rgb8 has {} bytes; a {w}x{h} RGB8 picture has {}",
            rgb8.len(),
            w * h * 3
        )));
    }
    Ok((rgb8.to_vec(), w, h))
}

#[tonic::async_trait]
impl PoseDetector for PoseDetectorService {
    #[tracing::instrument(name = "DetectPose", skip_all)]
    async fn detect_pose(
        &self,
        request: Request<DetectPoseRequest>,
    ) -> Result<Response<DetectPoseResponse>, Status> {
        let deadline = self.stage.begin(&request)?;
        let (rgb, w, h) = self.stage.checked(validate(request.get_ref()))?;
        self.stage
            .check_pixels((w * h) as u64, &format!("detecting in a {w}x{h} picture"))?;
        let out = self
            .stage
            .unary("DetectPose", deadline, move |m, _ctx| {
                crate::job::detect(m, &rgb, w, h)
            })
            .await?;
        Ok(Response::new(out))
    }
}
