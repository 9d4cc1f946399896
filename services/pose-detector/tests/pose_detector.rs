//! The pose-detector stage in this process on 127.0.0.1:0, with a narrow network of random weights (same layer
//! names and topology as body_pose_model; the detector's maths is checked against controlnet-aux in
//! crates/model/tests/openpose_body.rs): health, Describe, DetectPose's answer (OpenPose JSON the gateway reads,
//! a PNG skeleton of the picture's size), a clear "no people", and bad pictures refused with INVALID_ARGUMENT.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use qwen_image_common::stage::StageDef;
use qwen_image_imaging::openpose::parse_openpose_json;
use qwen_image_model::candle_core::safetensors;
use qwen_image_model::openpose::random::{BodyNetShape, random_body_weights};
use qwen_image_pose_detector::{PoseDetectorArgs, PoseDetectorStage, run};
use qwen_image_proto::v1::pose_detector_client::PoseDetectorClient;
use qwen_image_proto::v1::stage_info_client::StageInfoClient;
use qwen_image_proto::v1::{DescribeRequest, DetectPoseRequest, Image, StageKind};
use qwen_image_testkit::service::InProcess;
use tonic::Code;

const NARROW: BodyNetShape = BodyNetShape {
    backbone: [4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8],
    stage: 8,
    stage1_wide: 8,
};

fn weights(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("body_pose_model.safetensors");
    safetensors::save(&random_body_weights(&NARROW, 7).unwrap(), &path).unwrap();
    path
}

fn picture(w: u32, h: u32) -> Image {
    let rgb8: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
    Image {
        width_px: w,
        height_px: h,
        rgb8: rgb8.into(),
    }
}

fn decode_png(bytes: &[u8]) -> (u32, u32) {
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    (reader.info().width, reader.info().height)
}

#[tokio::test]
async fn detect_pose_answers_keypoints_json_and_a_skeleton_and_refuses_bad_pictures() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = PoseDetectorStage::config(tmp.path());
    config.own = PoseDetectorArgs {
        pose_weights: Some(weights(tmp.path())),
    };
    let stage = InProcess::serving(move |l, s| run(config, l, s)).await;

    let d = StageInfoClient::new(stage.channel())
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.kind, StageKind::PoseDetector as i32);
    let pd = d.pose_detector.expect("pose_detector description");
    assert_eq!(pd.digest.len(), 64);
    assert!(pd.architecture.contains("narrower"), "{}", pd.architecture);
    assert_eq!(pd.parts, vec!["body".to_string()]);

    let mut client = PoseDetectorClient::new(stage.channel());
    let out = client
        .detect_pose(DetectPoseRequest {
            image: Some(picture(40, 32)),
        })
        .await
        .unwrap()
        .into_inner();
    // whatever the random network finds, the JSON is what the gateway's keypoints_json accepts, on the
    // picture's canvas, with as many people as announced
    let pose = parse_openpose_json(&out.keypoints_json, None).unwrap();
    assert_eq!((pose.canvas_width, pose.canvas_height), (40, 32));
    assert_eq!(pose.people.len(), out.people as usize);
    assert_eq!(decode_png(&out.skeleton_png), (40, 32));

    for (what, image) in [
        ("no image", None),
        (
            "short buffer",
            Some(Image {
                width_px: 8,
                height_px: 8,
                rgb8: vec![0u8; 10].into(),
            }),
        ),
        (
            "empty",
            Some(Image {
                width_px: 0,
                height_px: 8,
                rgb8: Vec::new().into(),
            }),
        ),
        (
            "too wide",
            Some(Image {
                width_px: 5000,
                height_px: 1,
                rgb8: vec![0u8; 15000].into(),
            }),
        ),
        (
            "too narrow",
            Some(Image {
                width_px: 1,
                height_px: 40,
                rgb8: vec![0u8; 120].into(),
            }),
        ),
    ] {
        let err = client
            .detect_pose(DetectPoseRequest { image })
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains("image"), "{what}: {}", err.message());
    }
}

#[tokio::test]
async fn a_missing_weights_file_is_a_startup_error_naming_the_converter() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = PoseDetectorStage::config(tmp.path());
    config.own = PoseDetectorArgs {
        pose_weights: Some(tmp.path().join("absent.safetensors")),
    };
    let mut stage = InProcess::start(move |l, s| run(config, l, s)).await;
    let err = stage
        .ended(qwen_image_testkit::service::GUARD)
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("convert_body_pose_model.py"),
        "{err}"
    );
}
