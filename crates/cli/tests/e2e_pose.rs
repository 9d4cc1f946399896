//! End to end, ControlNet pose: the four services as separate processes, the denoiser started with
//! `--controlnet` (the tiny fixture's random-weight ControlNet), driven through the gateway's `Pose` RPC and
//! compared with diffusers' QwenImageControlNetPipeline images for the same seed.

mod common;

use common::*;
use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::{
    ControlNetInpaintRequest, ControlNetSettings, GenerateResult, GenerationSettings, PoseRequest,
    generate_event, pose_request,
};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// reference.py's default prompt in `--mode controlnet`.
const CONTROLNET_DEFAULT_PROMPT: &str = "a blue bird on a branch";

async fn start_pose_stack() -> Stack {
    let cn = snapshot().join("controlnet");
    let cn = format!("union={}", cn.to_str().expect("utf-8 path"));
    start_stack_with(&["--controlnet", &cn]).await
}

async fn pose(
    c: &mut ImageGeneratorClient<Channel>,
    req: PoseRequest,
) -> Result<GenerateResult, tonic::Status> {
    result_of(c.pose(req).await?.into_inner()).await
}

/// The reference dump's parameters as a PoseRequest (without the pose) and its image.
fn pose_reference(name: &str) -> (PoseRequest, Vec<u8>, serde_json::Value) {
    let dir = workspace().join("tests/fixtures/tiny/refs").join(name);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
            .expect("json");
    let a = &manifest["args"];
    let prompt = a["prompt"]
        .as_str()
        .or_else(|| a["prompt"][0].as_str())
        .unwrap_or(CONTROLNET_DEFAULT_PROMPT)
        .to_string();
    let req = PoseRequest {
        settings: Some(GenerationSettings {
            prompt,
            negative_prompt: a["negative_prompt"].as_str().map(str::to_string),
            width_px: a["width"].as_u64().expect("width") as u32,
            height_px: a["height"].as_u64().expect("height") as u32,
            steps: a["steps"].as_u64().expect("steps") as u32,
            true_cfg_scale: Some(a["true_cfg_scale"].as_f64().expect("cfg") as f32),
            seed: Some(a["seed"].as_u64().expect("seed")),
            ..Default::default()
        }),
        control: Some(ControlNetSettings {
            conditioning_scale: Some(a["conditioning_scale"].as_f64().expect("scale") as f32),
            ..Default::default()
        }),
        ..Default::default()
    };
    let png = std::fs::read(dir.join("image_0.png")).expect("reference png");
    (req, png, manifest)
}

#[tokio::test]
async fn pose_image_and_keypoints_match_diffusers() {
    let stack = start_pose_stack().await;
    let mut c = client(&stack.gateway.url).await;

    // 1. The control picture of refs/controlnet_64 as PNG bytes, size from the picture (64x64).
    let (mut req, reference_png, _) = pose_reference("controlnet_64");
    let dir = workspace().join("tests/fixtures/tiny/refs/controlnet_64");
    req.pose = Some(pose_request::Pose::PoseImage(
        std::fs::read(dir.join("input_control.png"))
            .expect("control png")
            .into(),
    ));
    if let Some(s) = req.settings.as_mut() {
        (s.width_px, s.height_px) = (0, 0);
    }
    if let Some(c) = req.control.as_mut() {
        c.controlnet_id = "union".into();
    }
    let r = pose(&mut c, req.clone()).await.expect("pose image");
    assert_eq!((r.width_px, r.height_px, r.seed), (64, 64, 4));
    let diff = max_level_diff(&r.png[0], &reference_png, "controlnet_64");
    eprintln!("controlnet_64 (pose image): max difference {diff} levels");
    assert!(diff <= 1, "controlnet_64: {diff} levels");
    let params = r.parameters.expect("parameters");
    assert_eq!(Some(params.prompt), req.settings.map(|s| s.prompt));
    let info = png::Decoder::new(std::io::Cursor::new(&r.png[0][..]))
        .read_info()
        .expect("png");
    let text = |k: &str| {
        info.info()
            .uncompressed_latin1_text
            .iter()
            .find(|c| c.keyword == k)
            .map(|c| c.text.clone())
    };
    assert_eq!(text("controlnet").as_deref(), Some("union"));
    assert_eq!(text("pose_source").as_deref(), Some("pose_image"));
    assert_eq!(
        text("controlnet_conditioning_scale").as_deref(),
        Some("0.8")
    );
    assert_eq!(text("seed").as_deref(), Some("4"));

    // 2. docs/pose-example.json rendered by the gateway at 64x96; the reference was made by diffusers from
    // controlnet-aux's drawing of the same file (tools/make_fixtures.sh). Empty id = the only ControlNet.
    let (mut req, reference_png, _) = pose_reference("controlnet_pose_64x96");
    req.pose = Some(pose_request::Pose::KeypointsJson(
        std::fs::read_to_string(workspace().join("docs/pose-example.json")).expect("json"),
    ));
    let r = pose(&mut c, req).await.expect("keypoints");
    assert_eq!((r.width_px, r.height_px), (64, 96));
    let diff = max_level_diff(&r.png[0], &reference_png, "controlnet_pose_64x96");
    eprintln!("controlnet_pose_64x96 (keypoints JSON): max difference {diff} levels");
    assert!(diff <= 1, "controlnet_pose_64x96: {diff} levels");
}

#[tokio::test]
async fn bad_pose_inputs_are_rejected_and_the_stack_stays_healthy() {
    let stack = start_pose_stack().await;
    let mut c = client(&stack.gateway.url).await;
    let (mut good, _, _) = pose_reference("controlnet_pose_64x96");
    good.pose = Some(pose_request::Pose::KeypointsJson(
        std::fs::read_to_string(workspace().join("docs/pose-example.json")).expect("json"),
    ));
    let with = |pose: pose_request::Pose| PoseRequest {
        pose: Some(pose),
        ..good.clone()
    };
    // 18 keypoints on a 64x96 canvas, the right wrist (4) at x = 500.
    let mut kp: Vec<String> = (0..18)
        .map(|i| format!("{},{},1", 10 + i, 20 + 3 * i))
        .collect();
    kp[4] = "500,40,1".into();
    let outside = format!(
        r#"{{"canvas_width":64,"canvas_height":96,"people":[{{"pose_keypoints_2d":[{}]}}]}}"#,
        kp.join(",")
    );
    let cases = [
        (
            "malformed JSON",
            with(pose_request::Pose::KeypointsJson("{\"people\": [".into())),
        ),
        (
            "keypoints outside the image",
            with(pose_request::Pose::KeypointsJson(outside)),
        ),
        (
            "unreadable image format",
            with(pose_request::Pose::PoseImage(
                b"GIF89a\x01\x00\x01\x00".to_vec().into(),
            )),
        ),
        (
            "truncated PNG",
            with(pose_request::Pose::PoseImage(
                b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec().into(),
            )),
        ),
        (
            "no pose",
            PoseRequest {
                pose: None,
                ..good.clone()
            },
        ),
        (
            "NaN conditioning scale",
            PoseRequest {
                control: Some(ControlNetSettings {
                    conditioning_scale: Some(f32::NAN),
                    ..Default::default()
                }),
                ..good.clone()
            },
        ),
    ];
    for (what, req) in cases {
        let e = pose(&mut c, req).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {}", e.message());
        eprintln!("{what}: {}", e.message());
    }
    let e = pose(
        &mut c,
        PoseRequest {
            control: Some(ControlNetSettings {
                controlnet_id: "depth".into(),
                ..good.control.clone().unwrap_or_default()
            }),
            ..good.clone()
        },
    )
    .await
    .expect_err("unknown ControlNet");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("no ControlNet `depth`") && e.message().contains("[\"union\"]"),
        "{}",
        e.message()
    );

    let ch = Channel::from_shared(stack.gateway.url.clone())
        .expect("url")
        .connect_lazy();
    let status = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health");
    assert_eq!(status.into_inner().status, ServingStatus::Serving as i32);
    pose(&mut c, good).await.expect("still poses");
}

#[tokio::test]
async fn pose_on_a_denoiser_without_controlnet_is_a_failed_precondition() {
    let stack = start_stack(None).await;
    let mut c = client(&stack.gateway.url).await;
    let (mut req, _, _) = pose_reference("controlnet_pose_64x96");
    req.pose = Some(pose_request::Pose::KeypointsJson(
        std::fs::read_to_string(workspace().join("docs/pose-example.json")).expect("json"),
    ));
    let e = pose(&mut c, req).await.expect_err("no ControlNet loaded");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("--controlnet"), "{}", e.message());
    eprintln!("{}", e.message());
    // Text-to-image still works on that stack.
    let (settings, _) = reference("t2i_64");
    generate(&mut c, t2i(settings))
        .await
        .expect("t2i still served");
}

/// QwenImageControlNetInpaintPipeline on refs/controlnet_inpaint_64 (the fixture's inpainting ControlNet,
/// extra_condition_channels 4), through the gateway's `ControlNetInpaint` RPC.
#[tokio::test]
async fn controlnet_inpaint_matches_diffusers() {
    let cn = snapshot().join("controlnet_inpaint");
    let cn = format!("inpaint={}", cn.to_str().expect("utf-8 path"));
    let stack = start_stack_with(&["--controlnet", &cn]).await;
    let mut c = client(&stack.gateway.url).await;
    let (p, reference_png, _) = pose_reference("controlnet_inpaint_64");
    let (control, p) = (
        p.control.unwrap_or_default(),
        p.settings.unwrap_or_default(),
    );
    let dir = workspace().join("tests/fixtures/tiny/refs/controlnet_inpaint_64");
    let read = |f: &str| std::fs::read(dir.join(f)).expect("fixture");
    let prompt = if p.prompt == CONTROLNET_DEFAULT_PROMPT {
        "a red lantern in the middle".to_string() // reference.py's default in this mode
    } else {
        p.prompt
    };
    let req = ControlNetInpaintRequest {
        settings: Some(GenerationSettings {
            prompt,
            negative_prompt: p.negative_prompt,
            width_px: 0,
            height_px: 0,
            steps: p.steps,
            true_cfg_scale: p.true_cfg_scale,
            seed: p.seed,
            ..Default::default()
        }),
        control: Some(ControlNetSettings {
            controlnet_id: "inpaint".into(),
            conditioning_scale: control.conditioning_scale,
            ..Default::default()
        }),
        image: read("input_image.png").into(),
        mask: read("input_mask.png").into(),
    };
    let mut stream = c
        .control_net_inpaint(req.clone())
        .await
        .expect("accepted")
        .into_inner();
    let mut result = None;
    while let Some(ev) = stream.message().await.expect("events") {
        if let Some(generate_event::Event::Result(r)) = ev.event {
            result = Some(r);
        }
    }
    let r = result.expect("result");
    assert_eq!((r.width_px, r.height_px), (64, 64));
    let diff = max_level_diff(&r.png[0], &reference_png, "controlnet_inpaint_64");
    eprintln!("controlnet_inpaint_64: max difference {diff} levels");
    assert!(diff <= 1, "controlnet_inpaint_64: {diff} levels");

    // A mask without white pixels, and the union-style net id that is not loaded.
    let black = {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, 64, 64);
        enc.set_color(png::ColorType::Grayscale);
        let mut w = enc.write_header().expect("header");
        w.write_image_data(&[0u8; 64 * 64]).expect("data");
        w.finish().expect("finish");
        out
    };
    let e = c
        .control_net_inpaint(ControlNetInpaintRequest {
            mask: black.into(),
            ..req.clone()
        })
        .await
        .expect_err("empty mask");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
}
