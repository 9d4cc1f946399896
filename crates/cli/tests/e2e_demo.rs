//! End to end on the default model (the demo model trained by `tools/demo-model`): the four services as
//! separate processes started without `--model`, driven through the gateway. Beside bit-parity with diffusers
//! on the same snapshot, these tests check meaning: the judge (`tests/fixtures/judge`, the classifier trained
//! with the model) must read in the pictures the colour, pose and background the prompt or the skeleton asked
//! for, on (colour, pose, background) combinations the model never saw in training.

mod common;

use common::*;
use qwen_image_proto::v1::{
    ControlNetSettings, GenerateResult, GenerationSettings, InpaintRequest, PoseRequest,
    TextToImageRequest, pose_request,
};
use qwen_image_testkit::judge::{Judge, Verdict};

fn judge() -> Judge {
    Judge::load(&workspace().join("tests/fixtures/judge")).expect("judge loads")
}

/// The stack on the default model: no `--model` anywhere; the denoiser loads the model's pose ControlNet.
async fn start_default_stack() -> Stack {
    start_stack_on(None, &[]).await
}

fn demo_t2i(prompt: &str, seed: u64) -> TextToImageRequest {
    t2i(GenerationSettings {
        prompt: prompt.into(),
        negative_prompt: Some(" ".into()),
        width_px: 64,
        height_px: 64,
        steps: 20,
        true_cfg_scale: Some(4.0),
        seed: Some(seed),
        ..Default::default()
    })
}

fn read(j: &Judge, r: &GenerateResult) -> Verdict {
    let (w, h, rgb) = decode_rgb(&r.png[0]);
    j.judge(&rgb, w as usize, h as usize)
        .expect("64x64 picture")
}

/// Held-out (colour, pose, background) combinations of `tools/demo-model/scene.py` in English, Chinese and
/// mixed prompts: (prompt, colour, pose, background).
const PROMPTS: &[(&str, &str, &str, &str)] = &[
    (
        "a red stick figure standing on a white background",
        "red",
        "standing",
        "white",
    ),
    (
        "a green stick figure kicking on a black background, with the sun",
        "green",
        "kicking",
        "black",
    ),
    (
        "blue stick figure running, gray background",
        "blue",
        "running",
        "gray",
    ),
    (
        "a yellow stick figure with arms raised on a sky blue background",
        "yellow",
        "arms_raised",
        "sky",
    ),
    ("灰色背景上一个跳跃的紫色小人", "purple", "jumping", "gray"),
    (
        "灰色背景上一个挥手的粉色小人，有月亮",
        "pink",
        "waving",
        "gray",
    ),
    ("天蓝色背景上一个坐着的红色小人", "red", "sitting", "sky"),
    (
        "白色背景上一个站立的绿色小人，有太阳",
        "green",
        "standing",
        "white",
    ),
    (
        "a 蓝色 stick figure kicking on a 灰色 background",
        "blue",
        "kicking",
        "gray",
    ),
    (
        "a yellow stick figure 跑步 on a 天蓝色 background",
        "yellow",
        "running",
        "sky",
    ),
    (
        "a 紫色 stick figure with arms raised on a white background",
        "purple",
        "arms_raised",
        "white",
    ),
    (
        "a pink stick figure 跳跃 on a 黑色 background, with the moon",
        "pink",
        "jumping",
        "black",
    ),
];

#[tokio::test]
async fn default_model_pictures_follow_the_prompt_in_english_chinese_and_mixed() {
    let stack = start_default_stack().await;
    let mut c = client(&stack.gateway.url).await;
    let j = judge();
    let (mut colour, mut pose_ok, mut bg, mut all) = (0, 0, 0, 0);
    for (i, (prompt, want_c, want_p, want_b)) in PROMPTS.iter().enumerate() {
        let r = generate(&mut c, demo_t2i(prompt, 100 + i as u64))
            .await
            .unwrap_or_else(|e| panic!("{prompt}: {e}"));
        assert_eq!((r.width_px, r.height_px), (64, 64));
        let v = read(&j, &r);
        eprintln!("{prompt:70} -> {v:?}");
        let (c_ok, p_ok, b_ok) = (
            v.colour == *want_c,
            v.pose == *want_p,
            v.background == *want_b,
        );
        colour += usize::from(c_ok);
        pose_ok += usize::from(p_ok);
        bg += usize::from(b_ok);
        all += usize::from(c_ok && p_ok && b_ok);
    }
    let n = PROMPTS.len();
    eprintln!("colour {colour}/{n} pose {pose_ok}/{n} background {bg}/{n} all {all}/{n}");
    // The thresholds sit below the model's measured accuracy on held-out combinations (README: colour and
    // background 100 %, pose 93 %; these 12 give 12/12), so its known error rate passes and a broken stage
    // (prompt, schedule, CFG, decode) fails: with the prompt ignored, colour would be right about 1 time in 6
    // and pose 1 time in 7.
    assert!(colour >= n - 1, "colour right in only {colour}/{n}");
    assert!(bg >= n - 1, "background right in only {bg}/{n}");
    assert!(pose_ok * 6 >= n * 5, "pose right in only {pose_ok}/{n}");
    assert!(all * 6 >= n * 5, "all three right in only {all}/{n}");
}

#[tokio::test]
async fn default_model_takes_the_pose_from_keypoints() {
    let stack = start_default_stack().await;
    let mut c = client(&stack.gateway.url).await;
    let j = judge();
    // The prompt does not name the pose: the skeleton (docs/demo/pose-*.json) alone must carry it.
    let cases = [
        ("kicking", "a blue stick figure on a white background", 1u64),
        ("arms_raised", "灰色背景上一个红色小人", 2),
        ("sitting", "a 绿色 stick figure on a sky blue background", 3),
        ("jumping", "a purple stick figure on a black background", 4),
        ("waving", "白色背景上一个黄色小人", 5),
        ("running", "a pink stick figure on a gray background", 6),
    ];
    let mut right = 0;
    for (want, prompt, seed) in cases {
        let json = std::fs::read_to_string(workspace().join(format!("docs/demo/pose-{want}.json")))
            .expect("pose json");
        let req = PoseRequest {
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
            pose: Some(pose_request::Pose::KeypointsJson(json)),
        };
        let r = result_of(c.pose(req).await.expect("accepted").into_inner())
            .await
            .unwrap_or_else(|e| panic!("{want}: {e}"));
        let v = read(&j, &r);
        eprintln!("{want:12} {prompt:45} -> {v:?}");
        right += usize::from(v.pose == want);
    }
    assert!(
        right >= cases.len() - 1,
        "pose right in only {right}/{}",
        cases.len()
    );
}

#[tokio::test]
async fn default_model_inpaint_repaints_the_figure_in_the_asked_colour() {
    let stack = start_default_stack().await;
    let mut c = client(&stack.gateway.url).await;
    let j = judge();
    let base = generate(
        &mut c,
        demo_t2i("a red stick figure standing on a white background", 7),
    )
    .await
    .expect("t2i");
    let before = read(&j, &base);
    assert_eq!(before.colour, "red", "{before:?}");
    // white = repaint: the middle of the picture, where the figure stands
    let mut mask = vec![0u8; 64 * 64];
    for y in 4..62 {
        for x in 12..52 {
            mask[y * 64 + x] = 255;
        }
    }
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, 64, 64);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().expect("header");
        w.write_image_data(&mask).expect("mask");
    }
    let mut changed = 0;
    for (seed, prompt, want) in [
        (
            1u64,
            "a blue stick figure standing on a white background",
            "blue",
        ),
        (2, "白色背景上一个站立的绿色小人", "green"),
    ] {
        let req = InpaintRequest {
            settings: Some(GenerationSettings {
                prompt: prompt.into(),
                negative_prompt: Some(" ".into()),
                steps: 20,
                true_cfg_scale: Some(4.0),
                seed: Some(seed),
                ..Default::default()
            }),
            image: base.png[0].clone().into(),
            mask: png.clone().into(),
            strength: Some(1.0),
            ..Default::default()
        };
        let r = result_of(c.inpaint(req).await.expect("accepted").into_inner())
            .await
            .expect("inpaint");
        let v = read(&j, &r);
        eprintln!("inpaint {prompt} -> {v:?}");
        assert_eq!(v.background, "white", "the kept background: {v:?}");
        changed += usize::from(v.colour == want);
    }
    assert!(changed >= 1, "inpainting never gave the asked colour");
}

#[tokio::test]
async fn default_model_matches_diffusers_through_the_gateway() {
    let stack = start_default_stack().await;
    let mut c = client(&stack.gateway.url).await;
    let refs = workspace().join("tests/fixtures/demo/refs");
    for name in ["t2i_64_en", "t2i_64_zh"] {
        let (req, reference_png) = reference_at(&refs.join(name));
        let r = generate(&mut c, t2i(req)).await.expect("t2i");
        let diff = max_level_diff(&r.png[0], &reference_png, name);
        eprintln!("{name}: max difference {diff} levels");
        assert!(diff <= 1, "{name}: {diff} levels");
    }
    // The pose ControlNet on docs/demo/pose-kicking.json, which diffusers got as controlnet-aux's drawing.
    let dir = refs.join("controlnet_pose_64");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
            .expect("json");
    let a = &manifest["args"];
    let req = PoseRequest {
        settings: Some(GenerationSettings {
            prompt: a["prompt"][0].as_str().expect("prompt").into(),
            negative_prompt: a["negative_prompt"].as_str().map(str::to_string),
            width_px: 64,
            height_px: 64,
            steps: a["steps"].as_u64().expect("steps") as u32,
            true_cfg_scale: Some(a["true_cfg_scale"].as_f64().expect("cfg") as f32),
            seed: Some(a["seed"].as_u64().expect("seed")),
            ..Default::default()
        }),
        control: Some(ControlNetSettings {
            conditioning_scale: Some(a["conditioning_scale"].as_f64().expect("scale") as f32),
            ..Default::default()
        }),
        pose: Some(pose_request::Pose::KeypointsJson(
            std::fs::read_to_string(workspace().join("docs/demo/pose-kicking.json")).expect("json"),
        )),
    };
    let r = result_of(c.pose(req).await.expect("accepted").into_inner())
        .await
        .expect("pose");
    let reference_png = std::fs::read(dir.join("image_0.png")).expect("png");
    let diff = max_level_diff(&r.png[0], &reference_png, "controlnet_pose_64");
    eprintln!("controlnet_pose_64: max difference {diff} levels");
    assert!(diff <= 1, "controlnet_pose_64: {diff} levels");
}

/// The OpenAI-compatible HTTP API (`--http-listen`) on the default model: a text-to-image request as JSON gives
/// a PNG the judge reads as the asked colour, `n: 2` gives two different pictures, and a bad size is a 400 that
/// says what to send.
#[tokio::test]
async fn default_model_over_the_http_api() {
    use base64::Engine;
    use qwen_image_testkit::stack::{Launcher, ProcessStack, StackSpec};
    let spec = StackSpec {
        gateway_args: vec!["--http-listen".into(), "127.0.0.1:0".into()],
        ..StackSpec::default()
    };
    let stack = ProcessStack::serving(
        Launcher::Cli(std::path::PathBuf::from(env!("CARGO_BIN_EXE_qwen-image"))),
        &spec,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let addr = stack.gateway.http_addr(GUARD).await.expect("HTTP address");
    let json = [("content-type", "application/json")];
    let post = |body: &'static str| {
        qwen_image_testkit::http::request(addr, "POST", "/v1/images/generations", &json, body)
    };
    let (status, err) = post(r#"{"prompt": "a red stick figure", "size": "64"}"#).await;
    assert_eq!(status, 400, "{err}");
    assert!(err.contains("WIDTHxHEIGHT"), "{err}");
    let (status, body) = post(
        r#"{"prompt": "a red stick figure standing on a white background", "size": "64x64", "steps": 20,
            "seed": 7, "negative_prompt": " ", "true_cfg_scale": 4.0, "n": 2}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let pngs: Vec<Vec<u8>> = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| {
            base64::engine::general_purpose::STANDARD
                .decode(d["b64_json"].as_str().expect("b64_json"))
                .expect("base64")
        })
        .collect();
    assert_eq!(pngs.len(), 2);
    assert_ne!(
        decode_rgb(&pngs[0]).2,
        decode_rgb(&pngs[1]).2,
        "n=2 gives two pictures"
    );
    let j = judge();
    let (w, h, rgb) = decode_rgb(&pngs[0]);
    let verdict = j.judge(&rgb, w as usize, h as usize).expect("64x64");
    assert_eq!(verdict.colour, "red", "{verdict:?}");
}
