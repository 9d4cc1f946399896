//! Pose from a reference picture on the default model, end to end: the demo model's pose detector
//! (`models/qwen-image-demo/pose_detector/`, trained by tools/openpose/train_demo_detector.py) finds the figure
//! in a world picture, the ControlNet draws that pose, and the judge (`tests/fixtures/judge`) reads in the
//! result the reference's pose and the colour the prompt asked for (never the reference's own colour).
//!
//! 1. through the gateway: the five services as separate processes (`qwen-image serve --stage X`, no
//!    `--model`: the embedded default model), `PoseRequest.reference_image`; a picture with nobody in it is
//!    FAILED_PRECONDITION ("no people found") and the stack stays healthy;
//! 2. the command a user types: `qwen-image pose --reference-image docs/demo/reference-kicking.png --prompt
//!    "a red stick figure on a black background" --negative-prompt " " --steps 20` (a local stack that starts
//!    the detector by itself).

mod common;

use std::process::Command;

use common::*;
use qwen_image_proto::v1::{ControlNetSettings, GenerationSettings, PoseRequest, pose_request};
use qwen_image_testkit::judge::Judge;
use qwen_image_testkit::process::ServiceProcess;
use qwen_image_testkit::stack::{Launcher, ProcessStack, StackSpec};

fn judge() -> Judge {
    Judge::load(&workspace().join("tests/fixtures/judge")).expect("judge loads")
}

fn judge_png(j: &Judge, png: &[u8]) -> qwen_image_testkit::judge::Verdict {
    let (w, h, rgb) = decode_rgb(png);
    j.judge(&rgb, w as usize, h as usize)
        .expect("64x64 picture")
}

fn reference(name: &str) -> Vec<u8> {
    std::fs::read(workspace().join(format!("docs/demo/{name}.png"))).expect("docs/demo picture")
}

fn request(prompt: &str, seed: u64, picture: Vec<u8>) -> PoseRequest {
    PoseRequest {
        settings: Some(GenerationSettings {
            prompt: prompt.into(),
            negative_prompt: Some(" ".into()),
            width_px: 64,
            height_px: 64,
            steps: 20,
            true_cfg_scale: Some(4.0),
            seed: Some(seed),
            ..Default::default()
        }),
        control: Some(ControlNetSettings {
            conditioning_scale: Some(1.0),
            ..Default::default()
        }),
        pose: Some(pose_request::Pose::ReferenceImage(picture.into())),
    }
}

#[tokio::test]
async fn reference_picture_pose_in_another_colour_and_nobody_is_a_failed_precondition() {
    let cli = std::path::PathBuf::from(env!("CARGO_BIN_EXE_qwen-image"));
    // the pose detector, a process of its own on the default model's pose_detector/
    let detector = ServiceProcess::spawn(
        &cli,
        &[
            "serve",
            "--stage",
            "pose-detector",
            "--listen",
            "127.0.0.1:0",
        ],
        &[("RUST_LOG", "warn")],
        GUARD,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let spec = StackSpec {
        gateway_args: vec!["--pose-detector".into(), detector.url()],
        ..StackSpec::default()
    };
    let stack = ProcessStack::serving(Launcher::Cli(cli), &spec)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut c = client(&stack.gateway_url()).await;
    let j = judge();

    // (reference picture, its pose, its colour, the prompt: another colour and background, no pose)
    let cases = [
        (
            "reference-kicking",
            "kicking",
            "green",
            "a red stick figure on a white background",
            "red",
        ),
        (
            "reference-arms_raised",
            "arms_raised",
            "yellow",
            "灰色背景上一个蓝色小人",
            "blue",
        ),
        (
            "reference-sitting",
            "sitting",
            "red",
            "a purple stick figure on a black background",
            "purple",
        ),
    ];
    for (i, (name, pose, own_colour, prompt, colour)) in cases.iter().enumerate() {
        let v0 = judge_png(&j, &reference(name));
        assert_eq!(
            (v0.pose.as_str(), v0.colour.as_str()),
            (*pose, *own_colour),
            "the judge misreads the reference {name} itself"
        );
        let r = result_of(
            c.pose(request(prompt, 1000 + i as u64, reference(name)))
                .await
                .expect("accepted")
                .into_inner(),
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let v = judge_png(&j, &r.png[0]);
        eprintln!("{name:24} {prompt:45} -> {v:?}");
        assert_eq!(v.pose, *pose, "{name}: the pose is not the reference's");
        assert_eq!(v.colour, *colour, "{name}: not the asked colour");
    }

    // nobody in the picture: FAILED_PRECONDITION, saying so; then the stack still serves
    let err = match c
        .pose(request(
            "a red stick figure on a black background",
            1,
            reference("no-person"),
        ))
        .await
    {
        Ok(stream) => result_of(stream.into_inner())
            .await
            .expect_err("a picture with nobody in it must not be posed"),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("no people found") || err.message().contains("no person"),
        "{}",
        err.message()
    );
    let r = result_of(
        c.pose(request(
            "a pink stick figure on a gray background",
            5,
            reference("reference-jumping"),
        ))
        .await
        .expect("accepted")
        .into_inner(),
    )
    .await
    .expect("the stack serves after a refused picture");
    let v = judge_png(&j, &r.png[0]);
    eprintln!("reference-jumping after the refusal -> {v:?}");
    assert_eq!((v.pose.as_str(), v.colour.as_str()), ("jumping", "pink"));
}

#[test]
fn qwen_image_pose_reference_image_draws_the_reference_pose_in_the_asked_colour() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("posed.png");
    let r = Command::new(env!("CARGO_BIN_EXE_qwen-image"))
        .current_dir(workspace())
        .args([
            "pose",
            "--reference-image",
            "docs/demo/reference-kicking.png",
            "--prompt",
            "a red stick figure on a black background",
            "--negative-prompt",
            " ",
            "--steps",
            "20",
            "--seed",
            "3",
            "--quiet",
            "--out",
        ])
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .expect("qwen-image runs");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v = judge_png(&judge(), &std::fs::read(&out).expect("the picture"));
    eprintln!("qwen-image pose --reference-image reference-kicking.png -> {v:?}");
    assert_eq!(
        (v.pose.as_str(), v.colour.as_str(), v.background.as_str()),
        ("kicking", "red", "black")
    );
}
