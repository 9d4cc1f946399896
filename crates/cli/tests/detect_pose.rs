//! `qwen-image detect-pose` as a user runs it, with the detector loaded in the process: a picture with nobody in
//! it writes an empty people list and exits 1 with a clear message; missing weights name the converter.
//! (The detector's maths is checked against controlnet-aux in crates/model/tests/openpose_body.rs.)
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

use qwen_image_model::candle_core::{Device, Tensor, safetensors};
use qwen_image_model::openpose::random::{BodyNetShape, random_body_weights};

const NARROW: BodyNetShape = BodyNetShape {
    backbone: [4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8],
    stage: 8,
    stage1_wide: 8,
};

fn write_png(path: &std::path::Path, w: u32, h: u32) {
    let mut enc = png::Encoder::new(std::fs::File::create(path).unwrap(), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let data: Vec<u8> = (0..w * h * 3).map(|i| (i * 31 % 256) as u8).collect();
    enc.write_header().unwrap().write_image_data(&data).unwrap();
}

#[test]
fn nobody_found_is_an_empty_list_and_exit_1_and_missing_weights_name_the_converter() {
    let tmp = tempfile::tempdir().unwrap();
    // a detector whose last heat-map conv is zero with a negative bias: ReLU → no heat anywhere → nobody
    let mut w = random_body_weights(&NARROW, 3).unwrap();
    w.insert(
        "Mconv7_stage6_L2.weight".into(),
        Tensor::zeros(
            (19, 8, 1, 1),
            qwen_image_model::candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap(),
    );
    w.insert(
        "Mconv7_stage6_L2.bias".into(),
        Tensor::full(-1f32, 19, &Device::Cpu).unwrap(),
    );
    let weights = tmp.path().join("body.safetensors");
    safetensors::save(&w, &weights).unwrap();
    let pic = tmp.path().join("pic.png");
    write_png(&pic, 48, 40);
    let out = tmp.path().join("pose.json");
    let skel = tmp.path().join("skeleton.png");

    let run = |weights: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_qwen-image"))
            .args(["detect-pose", "--image"])
            .arg(&pic)
            .arg("--out")
            .arg(&out)
            .arg("--skeleton-out")
            .arg(&skel)
            .arg("--pose-weights")
            .arg(weights)
            .output()
            .unwrap()
    };
    let r = run(&weights);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no person found"), "{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(json["canvas_width"], 48);
    assert_eq!(json["canvas_height"], 40);
    assert_eq!(json["people"].as_array().unwrap().len(), 0);
    let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&skel).unwrap()))
        .read_info()
        .unwrap();
    assert_eq!((reader.info().width, reader.info().height), (48, 40));

    let r = run(&tmp.path().join("absent.safetensors"));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("convert_body_pose_model.py"), "{stderr}");
}
