//! The gateway's API keys and its HTTP API (`--http-listen`) through real clients, on the default model (the
//! four services as processes, `--api-keys-file` with one named key):
//! - gRPC without or with a wrong key is UNAUTHENTICATED, and the logs of a keyed request hold the key's name,
//!   never the key;
//! - the official OpenAI Python SDK (`tools/http-clients/openai_sdk.py`): `images.generate` gives pictures the
//!   demo judge reads as the asked colour and pose, `images.edit` with a mask repaints only the masked area,
//!   `n=2` gives two different pictures, streaming gives partial images then the result, a wrong key is
//!   `AuthenticationError` (401), a bad size `BadRequestError` (400) saying what to send;
//! - the web page at `/` in headless Chromium (`tools/http-clients/web_page.py`, Chrome DevTools protocol):
//!   a submitted prompt shows previews and a result the judge reads as asked; its screenshot is
//!   docs/web-page.png (`QWEN_IMAGE_UPDATE_SCREENSHOT=1` rewrites it).
//!
//! The Python tests need the venv of `tools/http-clients/venv.sh` (pinned `openai` and `websockets`; its python
//! in `QWEN_IMAGE_TEST_PYTHON`, else the script's default place) and the page test Debian's `chromium`
//! (`QWEN_IMAGE_CHROMIUM`, default `/usr/bin/chromium`); `.ci/run` installs both. When one is missing the
//! test fails saying what to install, unless `QWEN_IMAGE_SKIP_HTTP_CLIENT_TESTS=1` asks to skip it.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::*;
use qwen_image_proto::v1::GenerationSettings;
use qwen_image_testkit::judge::{Judge, Verdict};
use qwen_image_testkit::stack::{Launcher, ProcessStack, StackSpec};
use sha2::{Digest, Sha256};
use tonic::Code;

/// The test key, given to the gateway as `NAME:SHA256` (so the file does not hold it either).
const KEY: &str = "sk-qwen-image-test-4f1d2c3b5a697887";
const KEY_NAME: &str = "http-clients-test";
fn chromium() -> Option<PathBuf> {
    let p = std::env::var_os("QWEN_IMAGE_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    if p.exists() {
        Some(p)
    } else {
        missing(
            "Chromium",
            "`apt-get install chromium` (.ci/run does) or point QWEN_IMAGE_CHROMIUM at a Chromium binary",
        )
    }
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The stack on the default model with the test key required and the HTTP API on a free port.
async fn start_keyed_stack(dir: &Path) -> (ProcessStack, SocketAddr) {
    let keys = dir.join("api-keys");
    std::fs::write(
        &keys,
        format!(
            "# the test key, by its digest\n{KEY_NAME}:{}\n",
            sha256_hex(KEY)
        ),
    )
    .expect("write keys");
    let spec = StackSpec {
        gateway_args: vec![
            "--http-listen".into(),
            "127.0.0.1:0".into(),
            "--api-keys-file".into(),
            keys.display().to_string(),
        ],
        // Logs of every request (the gateway's `accepted` / `done` lines carry the request span), without
        // ANSI colours (which split `field=value`).
        env: vec![
            ("RUST_LOG".into(), "info".into()),
            ("NO_COLOR".into(), "1".into()),
        ],
        ..StackSpec::default()
    };
    let stack = ProcessStack::serving(
        Launcher::Cli(PathBuf::from(env!("CARGO_BIN_EXE_qwen-image"))),
        &spec,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let addr = stack.gateway.http_addr(GUARD).await.expect("HTTP address");
    (stack, addr)
}

/// No service logged the key; the gateway logged its name (the `api_key` field of the request span).
fn assert_logs_name_the_key_only(stack: &ProcessStack) {
    for (service, p) in [
        ("gateway", &stack.gateway),
        ("text-encoder", &stack.text_encoder),
        ("denoiser", &stack.denoiser),
        ("vae", &stack.vae),
    ] {
        let lines = p.log_lines();
        assert!(!lines.is_empty(), "{service} logged nothing at info");
        for l in &lines {
            assert!(!l.contains(KEY), "{service} logged the key: {l}");
        }
    }
    let named = stack
        .gateway
        .log_lines()
        .into_iter()
        .filter(|l| l.contains(&format!("api_key=\"{KEY_NAME}\"")))
        .count();
    assert!(
        named > 0,
        "no gateway log line names the key `{KEY_NAME}`:\n{}",
        stack.gateway.log_lines().join("\n")
    );
}

fn judge() -> Judge {
    Judge::load(&workspace().join("tests/fixtures/judge")).expect("judge loads")
}

fn read_png(path: &Path) -> (u32, u32, Vec<u8>) {
    decode_rgb(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn verdict(j: &Judge, path: &Path) -> Verdict {
    let (w, h, rgb) = read_png(path);
    j.judge(&rgb, w as usize, h as usize)
        .expect("64x64 picture")
}

/// The repainted area of the edit test: the middle of the picture, where the figure stands (as in
/// e2e_demo's inpaint test).
fn repainted(x: usize, y: usize) -> bool {
    (4..62).contains(&y) && (12..52).contains(&x)
}

/// OpenAI's mask convention: RGBA, transparent = repaint.
fn openai_mask() -> Vec<u8> {
    let mut rgba = Vec::with_capacity(64 * 64 * 4);
    for y in 0..64 {
        for x in 0..64 {
            rgba.extend_from_slice(&[0, 0, 0, if repainted(x, y) { 0 } else { 255 }]);
        }
    }
    let mut png = Vec::new();
    let mut enc = png::Encoder::new(&mut png, 64, 64);
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .expect("header")
        .write_image_data(&rgba)
        .expect("mask");
    png
}

#[tokio::test]
async fn grpc_calls_need_the_key_and_logs_name_it_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (stack, _) = start_keyed_stack(dir.path()).await;
    let mut c = client(&stack.gateway_url()).await;
    let settings = GenerationSettings {
        prompt: "a red stick figure standing on a white background".into(),
        width_px: 64,
        height_px: 64,
        steps: 2,
        seed: Some(1),
        ..Default::default()
    };
    let keyed = |key: Option<&str>| {
        let mut r = tonic::Request::new(t2i(settings.clone()));
        if let Some(k) = key {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {k}").parse().expect("ascii"),
            );
        }
        r
    };
    for key in [None, Some("sk-wrong-key-0123456789"), Some("")] {
        let e = c.text_to_image(keyed(key)).await.expect_err("refused");
        assert_eq!(e.code(), Code::Unauthenticated, "key {key:?}: {e:?}");
    }
    let stream = c
        .text_to_image(keyed(Some(KEY)))
        .await
        .expect("the key is accepted")
        .into_inner();
    let r = result_of(stream).await.expect("a picture with the key");
    assert_eq!((r.width_px, r.height_px), (64, 64));
    assert_logs_name_the_key_only(&stack);
}

#[tokio::test]
async fn the_openai_python_sdk_drives_the_http_api() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let (stack, addr) = start_keyed_stack(dir.path()).await;
    let work = dir.path().join("sdk");
    std::fs::create_dir(&work).expect("mkdir");
    std::fs::copy(
        workspace().join("docs/demo/pose-kicking.json"),
        work.join("pose.json"),
    )
    .expect("pose");
    std::fs::write(work.join("mask.png"), openai_mask()).expect("mask");
    run_python(
        &python,
        "openai_sdk.py",
        &[
            format!("http://{addr}/v1"),
            KEY.into(),
            work.display().to_string(),
        ],
    )
    .await;
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join("results.json")).expect("results"))
            .expect("JSON");
    eprintln!("{results:#}");
    let j = judge();

    let v = verdict(&j, &work.join("generate.png"));
    eprintln!("generate -> {v:?}");
    assert_eq!(
        (v.colour.as_str(), v.pose.as_str()),
        ("red", "standing"),
        "{v:?}"
    );
    let v = verdict(&j, &work.join("pose.png"));
    eprintln!("pose (keypoints: kicking) -> {v:?}");
    assert_eq!(
        (v.colour.as_str(), v.pose.as_str()),
        ("blue", "kicking"),
        "{v:?}"
    );

    let n2 = results["n2"].as_array().expect("n2");
    assert_eq!(n2.len(), 2, "n=2 gives two images");
    let (a, b) = (
        read_png(&work.join("n2-0.png")),
        read_png(&work.join("n2-1.png")),
    );
    assert_eq!((a.0, a.1, b.0, b.1), (64, 64, 64, 64));
    assert_ne!(a.2, b.2, "n=2 gives two different pictures");

    // The edit repaints only where the mask is transparent: every other pixel is the input's.
    let (_, _, input) = read_png(&work.join("generate.png"));
    let (w, h, edited) = read_png(&work.join("edit.png"));
    assert_eq!((w, h), (64, 64));
    let (mut kept, mut changed) = (0, 0);
    for y in 0..64 {
        for x in 0..64 {
            let i = (y * 64 + x) * 3;
            let same = input[i..i + 3] == edited[i..i + 3];
            if repainted(x, y) {
                changed += usize::from(!same);
            } else {
                assert!(same, "pixel ({x}, {y}) outside the mask changed");
                kept += 1;
            }
        }
    }
    assert!(
        changed > 58 * 40 / 4,
        "only {changed} of the masked pixels changed"
    );
    let v = verdict(&j, &work.join("edit.png"));
    eprintln!("edit (blue, {kept} pixels kept) -> {v:?}");
    assert_eq!(
        (v.colour.as_str(), v.background.as_str()),
        ("blue", "white"),
        "{v:?}"
    );

    let types: Vec<&str> = results["stream_types"]
        .as_array()
        .expect("stream_types")
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    let partials = types
        .iter()
        .filter(|t| **t == "image_generation.partial_image")
        .count();
    assert_eq!(partials, 2, "partial_images=2: {types:?}");
    assert_eq!(
        types.last(),
        Some(&"image_generation.completed"),
        "the result ends the stream: {types:?}"
    );
    let v = verdict(&j, &work.join("stream.png"));
    eprintln!("stream -> {v:?}");
    assert_eq!(v.colour, "yellow", "{v:?}");

    assert_eq!(results["wrong_key"]["status"], 401, "{results}");
    assert_eq!(results["bad_size"]["status"], 400, "{results}");
    let message = results["bad_size"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("WIDTHxHEIGHT"),
        "the 400 says what to send: {message}"
    );
    assert_logs_name_the_key_only(&stack);
}

#[tokio::test]
async fn the_web_page_works_in_headless_chromium() {
    let Some(python) = python() else { return };
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let (_stack, addr) = start_keyed_stack(dir.path()).await;
    run_python(
        &python,
        "web_page.py",
        &[
            chromium.display().to_string(),
            format!("http://{addr}/"),
            KEY.into(),
            "a red stick figure standing on a white background".into(),
            "7".into(),
            dir.path().display().to_string(),
        ],
    )
    .await;
    let shown: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("page.json")).expect("page.json"))
            .expect("JSON");
    eprintln!("{shown:#}");
    assert!(
        shown["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("Done")),
        "{shown}"
    );
    assert!(
        shown["previews"].as_u64().is_some_and(|n| n >= 1),
        "{shown}"
    );
    let params: serde_json::Value =
        serde_json::from_str(shown["params"].as_str().expect("params")).expect("params JSON");
    assert_eq!(params["seed"], 7, "{params}");
    let v = verdict(&judge(), &dir.path().join("result.png"));
    eprintln!("page result -> {v:?}");
    assert_eq!(v.colour, "red", "{v:?}");

    let shot = dir.path().join("screenshot.png");
    let bytes = std::fs::read(&shot).expect("screenshot");
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("screenshot is a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut pixels).expect("PNG frame");
    assert_eq!((info.width, info.height), (1100, 720), "the viewport");
    let px = info.color_type.samples();
    assert!(
        pixels[..info.buffer_size()]
            .chunks(px)
            .any(|p| p != &pixels[..px]),
        "the screenshot is not blank"
    );
    let kept = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-page.png");
    std::fs::copy(&shot, &kept).expect("keep the screenshot");
    eprintln!("screenshot: {}", kept.display());
    if std::env::var("QWEN_IMAGE_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1") {
        std::fs::copy(&shot, workspace().join("docs/web-page.png")).expect("docs/web-page.png");
    }
}
