//! Helpers shared by the end-to-end tests: the services as separate processes (`qwen-image serve --stage
//! ...` on 127.0.0.1:0), gateway clients, reference dumps and image comparison.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::{GenerateEvent, GenerateResult, TextToImageRequest, generate_event};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Failure guard for waits (model loading included); never used to synchronise.
pub const GUARD: Duration = Duration::from_secs(300);
/// diffusers' reference.py default prompt.
pub const DEFAULT_PROMPT: &str = "A cat holding a sign that says hello world";

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn snapshot() -> PathBuf {
    workspace().join("tests/fixtures/tiny/snapshot")
}

/// A child process killed when dropped, with the address it printed (`listening on HOST:PORT`).
pub struct Service {
    _child: Child,
    pub url: String,
}

pub async fn spawn(args: &[&str]) -> Service {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qwen-image"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("qwen-image starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(GUARD, async {
        while let Some(line) = lines.next_line().await.expect("stdout") {
            if let Some(a) = line.strip_prefix("listening on ") {
                return a.trim().to_string();
            }
        }
        panic!("qwen-image {args:?} exited without printing its address");
    })
    .await
    .expect("address printed");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Service {
        _child: child,
        url: format!("http://{addr}"),
    }
}

pub struct Stack {
    /// text-encoder, denoiser, vae
    pub stages: Vec<Service>,
    pub gateway: Service,
}

pub async fn start_stack(denoiser_queue_capacity: Option<&str>) -> Stack {
    match denoiser_queue_capacity {
        Some(q) => start_stack_with(&["--queue-capacity", q]).await,
        None => start_stack_with(&[]).await,
    }
}

/// The four services, the denoiser started with `denoiser_args` added (e.g. `--controlnet DIR`).
pub async fn start_stack_with(denoiser_args: &[&str]) -> Stack {
    let model = snapshot();
    start_stack_on(Some(model.to_str().expect("utf-8 path")), denoiser_args).await
}

/// The four services as separate processes on `model` (`None`: no `--model`, the default model).
pub async fn start_stack_on(model: Option<&str>, denoiser_args: &[&str]) -> Stack {
    let stage = |name: &'static str, extra: &[&str]| {
        let mut args = vec!["serve", "--stage", name, "--listen", "127.0.0.1:0"];
        if let Some(m) = model {
            args.extend(["--model", m]);
        }
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let spawn_owned = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn(&refs).await
    };
    let te = spawn_owned(stage("text-encoder", &[])).await;
    let dn = spawn_owned(stage("denoiser", denoiser_args)).await;
    let vae = spawn_owned(stage("vae", &[])).await;
    let gateway = spawn(&[
        "serve",
        "--stage",
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--text-encoder",
        &te.url,
        "--denoiser",
        &dn.url,
        "--vae",
        &vae.url,
    ])
    .await;
    wait_serving(&gateway.url).await;
    Stack {
        stages: vec![te, dn, vae],
        gateway,
    }
}

/// Waits for SERVING through grpc.health.v1 `Watch` (the gateway turns SERVING once every stage is).
pub async fn wait_serving(url: &str) {
    let channel = Channel::from_shared(url.to_string())
        .expect("url")
        .connect_lazy();
    let mut health = HealthClient::new(channel);
    tokio::time::timeout(GUARD, async {
        let mut stream = health
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("watch")
            .into_inner();
        while let Some(m) = stream.message().await.expect("health stream") {
            if m.status == ServingStatus::Serving as i32 {
                return;
            }
        }
        panic!("health stream ended before SERVING");
    })
    .await
    .expect("SERVING");
}

pub async fn client(url: &str) -> ImageGeneratorClient<Channel> {
    let ch = Channel::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    ImageGeneratorClient::new(ch).max_decoding_message_size(64 << 20)
}

pub async fn generate(
    c: &mut ImageGeneratorClient<Channel>,
    req: TextToImageRequest,
) -> Result<GenerateResult, tonic::Status> {
    result_of(c.text_to_image(req).await?.into_inner()).await
}

/// The result event of a gateway flow's stream (progress events skipped).
pub async fn result_of(
    mut stream: tonic::Streaming<GenerateEvent>,
) -> Result<GenerateResult, tonic::Status> {
    while let Some(ev) = stream.message().await? {
        if let Some(generate_event::Event::Result(r)) = ev.event {
            return Ok(r);
        }
    }
    Err(tonic::Status::internal("no result"))
}

pub fn decode_rgb(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(png_bytes))
        .read_info()
        .expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// The reference dump's request parameters and image.
pub fn reference(name: &str) -> (TextToImageRequest, Vec<u8>) {
    reference_at(&workspace().join("tests/fixtures/tiny/refs").join(name))
}

/// [`reference`] for a dump directory anywhere.
pub fn reference_at(dir: &std::path::Path) -> (TextToImageRequest, Vec<u8>) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
            .expect("json");
    let a = &manifest["args"];
    // reference.py stores `--prompt` as a list (one entry per batch element) or null for its default.
    let prompt = a["prompt"]
        .as_str()
        .or_else(|| a["prompt"][0].as_str())
        .unwrap_or(DEFAULT_PROMPT)
        .to_string();
    let negative_prompt = if a["no_negative"].as_bool().unwrap_or(false) {
        None
    } else {
        a["negative_prompt"].as_str().map(str::to_string)
    };
    let req = TextToImageRequest {
        prompt,
        negative_prompt,
        width_px: a["width"].as_u64().expect("width") as u32,
        height_px: a["height"].as_u64().expect("height") as u32,
        steps: a["steps"].as_u64().expect("steps") as u32,
        true_cfg_scale: Some(a["true_cfg_scale"].as_f64().expect("cfg") as f32),
        seed: Some(a["seed"].as_u64().expect("seed")),
        ..Default::default()
    };
    (
        req,
        std::fs::read(dir.join("image_0.png")).expect("reference png"),
    )
}

/// Largest per-channel difference in levels between two RGB PNGs of the same size.
pub fn max_level_diff(ours: &[u8], theirs_png: &[u8], what: &str) -> u8 {
    let (w, h, theirs) = decode_rgb(theirs_png);
    let (ow, oh, ours) = decode_rgb(ours);
    assert_eq!((ow, oh), (w, h), "{what}: size");
    ours.iter()
        .zip(&theirs)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0)
}

pub fn assert_close(ours: &[u8], theirs_png: &[u8], what: &str) {
    let (w, h, theirs) = decode_rgb(theirs_png);
    let (ow, oh, ours) = decode_rgb(ours);
    assert_eq!((ow, oh), (w, h), "{what}: size");
    let max = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(max <= 1, "{what}: max difference {max} levels (allowed 1)");
}
