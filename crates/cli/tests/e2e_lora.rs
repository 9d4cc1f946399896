//! LoRA adapters through the four services (separate processes on the tiny snapshot, the denoiser started with
//! `--lora NAME=FILE`), against diffusers' `QwenImagePipeline.load_lora_weights` + `set_adapters` PNGs for the
//! same request (`tests/fixtures/lora/png`, made by `tools/refharness/ref_lora.py`): one adapter, two at
//! different scales, and the Lightning-style adapter whose scheduler sidecar the denoiser applies (4 steps,
//! CFG 1). Requests without adapters keep giving the base model's picture.

mod common;

use std::path::PathBuf;

use common::*;
use qwen_image_proto::v1::stage_info_client::StageInfoClient;
use qwen_image_proto::v1::{DescribeRequest, GenerationSettings, LoraRef, SchedulerOverride};
use tonic::Code;
use tonic::transport::Channel;

fn lora(f: &str) -> PathBuf {
    workspace().join("tests/fixtures/lora").join(f)
}

fn png(name: &str) -> Vec<u8> {
    std::fs::read(lora(&format!("png/{name}.png"))).expect("reference png")
}

fn flag(name: &str) -> String {
    let file = lora(&format!("adapters/{name}.safetensors"));
    format!("{name}={}", file.to_str().expect("utf-8 path"))
}

fn with(mut s: GenerationSettings, loras: &[(&str, Option<f32>)]) -> GenerationSettings {
    s.loras = loras
        .iter()
        .map(|(n, w)| LoraRef {
            name: n.to_string(),
            scale: *w,
        })
        .collect();
    s
}

#[tokio::test]
async fn lora_requests_through_the_services_match_diffusers() {
    let (peft, kohya, light) = (flag("peft"), flag("kohya"), flag("lightning"));
    let stack = start_stack_with(&["--lora", &peft, "--lora", &kohya, "--lora", &light]).await;
    let mut c = client(&stack.gateway.url).await;
    // t2i_64: 64x64, 4 steps, CFG 4 with negative " ", seed 0, the default prompt (as ref_lora.py's PNGs)
    let (base, base_png) = reference("t2i_64");

    let r = generate(&mut c, t2i(with(base.clone(), &[("peft", None)])))
        .await
        .expect("peft");
    assert_close(&r.png[0], &png("peft"), "one adapter");
    assert!(
        max_level_diff(&r.png[0], &base_png, "peft vs base") > 10,
        "the adapter changes the picture"
    );
    assert_eq!(r.parameters.expect("parameters").loras.len(), 1);

    let r = generate(
        &mut c,
        t2i(with(
            base.clone(),
            &[("peft", Some(0.7)), ("kohya", Some(-0.5))],
        )),
    )
    .await
    .expect("two");
    assert_close(&r.png[0], &png("two"), "two adapters at 0.7 and -0.5");

    // Lightning: no negative prompt, CFG 1, the adapter's scheduler sidecar (base_shift = max_shift = ln 3)
    let mut light_req = with(base.clone(), &[("lightning", Some(1.0))]);
    light_req.negative_prompt = None;
    light_req.true_cfg_scale = Some(1.0);
    let r = generate(&mut c, t2i(light_req.clone()))
        .await
        .expect("lightning");
    assert_close(
        &r.png[0],
        &png("lightning_4"),
        "lightning, 4 steps, sidecar scheduler",
    );
    // the same settings given as a request override give the same picture; other settings do not
    let mut overridden = light_req.clone();
    overridden.scheduler = Some(SchedulerOverride {
        base_shift: Some(3f64.ln()),
        max_shift: Some(3f64.ln()),
        shift_terminal: Some(0.0),
        ..Default::default()
    });
    let same = generate(&mut c, t2i(overridden.clone()))
        .await
        .expect("override");
    assert_eq!(decode_rgb(&same.png[0]).2, decode_rgb(&r.png[0]).2);
    overridden.scheduler = Some(SchedulerOverride {
        shift_terminal: Some(0.02),
        ..Default::default()
    });
    let other = generate(&mut c, t2i(overridden))
        .await
        .expect("other schedule");
    assert!(max_level_diff(&other.png[0], &r.png[0], "terminal stretch") > 0);

    // requests without adapters are the base model's, before and after adapter requests
    let r = generate(&mut c, t2i(base.clone())).await.expect("base");
    assert_close(&r.png[0], &base_png, "no adapter");

    // an adapter the denoiser does not hold: NOT_FOUND naming the loaded ones
    let e = generate(&mut c, t2i(with(base.clone(), &[("nope", None)])))
        .await
        .expect_err("unknown adapter");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    for name in ["`nope`", "`peft`", "`kohya`", "`lightning`"] {
        assert!(e.message().contains(name), "{}", e.message());
    }
    let e = generate(&mut c, t2i(with(base.clone(), &[("peft", Some(f32::NAN))])))
        .await
        .expect_err("nan scale");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // the CLI names adapters with --lora NAME[:SCALE]
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("cat.png");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_qwen-image"))
        .args(["generate", "--quiet", "--gateway", &stack.gateway.url])
        .args([
            "--prompt",
            &base.prompt,
            "--negative-prompt",
            " ",
            "--width",
            "64",
            "--height",
            "64",
        ])
        .args([
            "--steps",
            "4",
            "--seed",
            "0",
            "--lora",
            "peft:0.7",
            "--lora",
            "kohya:-0.5",
            "--out",
        ])
        .arg(&out)
        .status()
        .expect("qwen-image runs");
    assert!(status.success());
    assert_close(
        &std::fs::read(&out).expect("png"),
        &png("two"),
        "CLI --lora peft:0.7 --lora kohya:-0.5",
    );

    // the denoiser describes what it holds
    let ch = Channel::from_shared(stack.stages[1].url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let d = StageInfoClient::new(ch)
        .describe(DescribeRequest {})
        .await
        .expect("describe")
        .into_inner();
    let names: Vec<(&str, bool)> = d
        .loras
        .iter()
        .map(|l| (l.name.as_str(), l.has_scheduler))
        .collect();
    assert_eq!(
        names,
        [("peft", false), ("kohya", false), ("lightning", true)]
    );
    assert!(
        d.loras
            .iter()
            .all(|l| l.modules > 0 && l.bytes > 0 && l.digest.len() == 64)
    );
}

#[tokio::test]
async fn a_bad_adapter_file_stops_the_denoiser_at_startup() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a safetensors file").expect("write");
    let out = std::process::Command::new(qwen_image_testkit::process::workspace_binary(
        "qwen-image-denoiser",
    ))
    .args(["--listen", "127.0.0.1:0", "--model"])
    .arg(snapshot())
    .arg("--lora")
    .arg(format!("bad={}", bad.display()))
    .output()
    .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LoRA `bad`"), "{err}");
}

#[test]
fn the_default_model_ships_a_4_step_lightning_adapter() {
    // local stack on the default model: MODEL/loras/lightning.safetensors and its scheduler sidecar are loaded
    // because the request names `lightning`
    let dir = tempfile::tempdir().expect("tempdir");
    let (light, base) = (dir.path().join("light.png"), dir.path().join("base.png"));
    let prompt = "a purple stick figure jumping on a gray background, with the moon";
    let run = |extra: &[&str], out: &std::path::Path| {
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_qwen-image"))
            .args(["generate", "--quiet", "--prompt", prompt, "--seed", "1"])
            .args(extra)
            .arg("--out")
            .arg(out)
            .status()
            .expect("qwen-image runs");
        assert!(status.success(), "{extra:?}");
    };
    run(&["--lora", "lightning", "--steps", "4"], &light);
    run(&["--steps", "4"], &base);
    let (w, h, with) = decode_rgb(&std::fs::read(&light).expect("png"));
    assert_eq!((w, h), (64, 64));
    let (_, _, without) = decode_rgb(&std::fs::read(&base).expect("png"));
    assert_ne!(with, without, "the adapter is applied");
}
