//! Pose from a picture: controlnet-aux 0.0.10's OpenPose *body* estimator (`open_pose/body.py` + `model.py`) in
//! candle. Hands and face (`hand.py`, `face.py`) are not ported: people get the 18 COCO body points only.
//!
//! - [`net`]: `bodypose_model` (VGG backbone + 6 PAF/heat-map stages), loading `body_pose_model.pth` converted to
//!   safetensors (`tools/openpose/convert_body_pose_model.py`);
//! - [`body`]: `Body.__call__` (resize + pad, network, map averaging, Gaussian smoothing, peaks, PAF scoring,
//!   limb assembly), with OpenCV's resizes in [`cv_resize`] and scipy's Gaussian in [`gaussian`];
//! - [`random`]: the deterministic random weights the parity fixtures use;
//! - [`detect_people`]: `OpenposeDetector.detect_poses` for an RGB picture → [`Person`]s in its pixels.

pub mod body;
pub mod cv_resize;
pub mod gaussian;
pub mod net;
pub mod random;

use candle_core::{Device, Result};
use qwen_image_imaging::openpose::{Person, PoseKeypoints};

pub use body::{BodyEstimate, body_call};
pub use net::BodyPoseNet;

/// `format_body_result`: one [`Person`] per `subset` row, keypoints `(x, y)` in the picture's pixels.
pub fn people_from_estimate(est: &BodyEstimate) -> Vec<Person> {
    est.subset
        .iter()
        .map(|row| Person {
            body: row[..18]
                .iter()
                .map(|&idx| {
                    let i = idx as i64; // person[:18].astype(int)
                    (i >= 0).then(|| {
                        let c = est.candidate[i as usize];
                        (c[0] as f32, c[1] as f32)
                    })
                })
                .collect(),
            left_hand: None,
            right_hand: None,
            face: None,
        })
        .collect()
}

/// `OpenposeDetector.detect_poses(rgb)` (body only): flips RGB → BGR (`oriImg[:, :, ::-1]`), runs
/// `Body.__call__` and returns the people on a `width x height` canvas (empty `people` = nobody found).
pub fn detect_people(
    net: &BodyPoseNet,
    rgb: &[u8],
    width: usize,
    height: usize,
    device: &Device,
) -> Result<PoseKeypoints> {
    if rgb.len() != width * height * 3 {
        candle_core::bail!(
            "openpose: {} bytes is not a {width}x{height} RGB picture",
            rgb.len()
        );
    }
    let bgr: Vec<u8> = rgb
        .chunks_exact(3)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect();
    let (est, _) = body_call(net, &bgr, height, width, device)?;
    Ok(PoseKeypoints {
        canvas_width: width,
        canvas_height: height,
        people: people_from_estimate(&est),
    })
}
