//! The default (demo) model's own detector (`models/qwen-image-demo/pose_detector/`, a smaller configuration of
//! body_pose_model trained on the demo world by tools/openpose/train_demo_detector.py), served by the stage in
//! this process with `--model` only: it finds the one figure of each reference picture in docs/demo with its
//! joints where tools/openpose/demo_references.py drew them (tests/fixtures/openpose_body/demo_references.json),
//! and nobody in docs/demo/no-person.png.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use qwen_image_common::stage::StageDef;
use qwen_image_imaging::openpose::parse_openpose_json;
use qwen_image_pose_detector::{PoseDetectorStage, run};
use qwen_image_proto::v1::pose_detector_client::PoseDetectorClient;
use qwen_image_proto::v1::stage_info_client::StageInfoClient;
use qwen_image_proto::v1::{DescribeRequest, DetectPoseRequest, Image};
use qwen_image_testkit::service::InProcess;

fn workspace() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read_png(path: &std::path::Path) -> Image {
    let mut reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    buf.truncate(info.buffer_size());
    Image {
        width_px: info.width,
        height_px: info.height,
        rgb8: buf.into(),
    }
}

#[tokio::test]
async fn the_demo_detector_finds_the_reference_figures_joints_and_nobody_in_an_empty_picture() {
    let model = workspace().join("models/qwen-image-demo");
    let config = PoseDetectorStage::config(&model);
    let stage = InProcess::serving(move |l, s| run(config, l, s)).await;
    let d = StageInfoClient::new(stage.channel())
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    let arch = d.pose_detector.unwrap().architecture;
    assert!(
        arch.contains("narrower") && arch.contains("2 stages"),
        "{arch}"
    );

    let truth: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            workspace().join("tests/fixtures/openpose_body/demo_references.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut c = PoseDetectorClient::new(stage.channel());
    for (name, joints) in truth.as_object().unwrap() {
        let image = read_png(&workspace().join(format!("docs/demo/{name}.png")));
        let r = c
            .detect_pose(DetectPoseRequest { image: Some(image) })
            .await
            .unwrap()
            .into_inner();
        let joints = joints.as_array().unwrap();
        if joints.is_empty() {
            assert_eq!(r.people, 0, "{name}: {}", r.keypoints_json);
            continue;
        }
        assert_eq!(r.people, 1, "{name}: {}", r.keypoints_json);
        let pose = parse_openpose_json(&r.keypoints_json, None).unwrap();
        let body = &pose.people[0].body;
        let mut within = 0;
        for (k, t) in joints.iter().enumerate() {
            let (tx, ty) = (t[0].as_f64().unwrap(), t[1].as_f64().unwrap());
            if let Some(Some((x, y))) = body.get(k) {
                let d = ((f64::from(*x) - tx).powi(2) + (f64::from(*y) - ty).powi(2)).sqrt();
                within += usize::from(d <= 3.0);
            }
        }
        eprintln!("{name}: {within}/18 joints within 3 px");
        assert!(
            within >= 16,
            "{name}: only {within}/18 joints within 3 px: {}",
            r.keypoints_json
        );
    }
}
