//! The DetectPose work on the worker thread: detect, write the OpenPose JSON, draw the skeleton.

use qwen_image_common::stage::StageError;
use qwen_image_imaging::openpose::{PoseKeypoints, render};
use qwen_image_model::openpose::detect_people;
use qwen_image_proto::v1::DetectPoseResponse;

use crate::LoadedDetector;

fn internal(e: impl std::fmt::Display) -> StageError {
    let msg = e.to_string();
    tracing::error!(error = %msg, "pose detection failed");
    StageError::Model(msg)
}

/// OpenPose JSON (`pose_keypoints_2d` as x, y, confidence triples; missing points 0, 0, 0) in the picture's
/// pixels, the format `qwen_image_imaging::openpose::parse_openpose_json` and the gateway's Pose request read.
pub fn keypoints_json(pose: &PoseKeypoints) -> String {
    let people: Vec<String> = pose
        .people
        .iter()
        .map(|p| {
            let kps: Vec<String> = p
                .body
                .iter()
                .map(|kp| match kp {
                    Some((x, y)) => format!("{x},{y},1"),
                    None => "0,0,0".to_string(),
                })
                .collect();
            format!("{{\"pose_keypoints_2d\":[{}]}}", kps.join(","))
        })
        .collect();
    format!(
        "{{\"canvas_width\":{},\"canvas_height\":{},\"people\":[{}]}}",
        pose.canvas_width,
        pose.canvas_height,
        people.join(",")
    )
}

/// RGB8 → PNG bytes.
pub fn encode_png(width: usize, height: usize, rgb: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(|e| e.to_string())?;
        w.write_image_data(rgb).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Detects the people in an RGB8 picture.
pub fn detect(
    m: &LoadedDetector,
    rgb: &[u8],
    width: usize,
    height: usize,
) -> Result<DetectPoseResponse, StageError> {
    let pose = detect_people(&m.net, rgb, width, height, &m.device).map_err(internal)?;
    let skeleton = render(&pose, width, height, false, false);
    Ok(DetectPoseResponse {
        keypoints_json: keypoints_json(&pose),
        people: pose.people.len() as u32,
        skeleton_png: encode_png(width, height, &skeleton.data)
            .map_err(internal)?
            .into(),
    })
}

/// One detection on a small grey picture (touches every weight).
pub fn warm_up(m: &LoadedDetector) -> Result<(), StageError> {
    detect(m, &vec![128u8; 16 * 16 * 3], 16, 16).map(|_| ())
}
