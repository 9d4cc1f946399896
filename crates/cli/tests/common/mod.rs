//! Helpers shared by the end-to-end tests: the four services as separate processes
//! (`qwen-image serve --stage ...` on 127.0.0.1:0), health waits, and PNG comparisons.
#![allow(dead_code)] // each test binary uses a subset

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
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
    let model = snapshot();
    let model = model.to_str().expect("utf-8 path");
    let te = spawn(&[
        "serve",
        "--stage",
        "text-encoder",
        "--listen",
        "127.0.0.1:0",
        "--model",
        model,
    ])
    .await;
    let mut dn_args = vec![
        "serve",
        "--stage",
        "denoiser",
        "--listen",
        "127.0.0.1:0",
        "--model",
        model,
    ];
    if let Some(q) = denoiser_queue_capacity {
        dn_args.extend(["--queue-capacity", q]);
    }
    let dn = spawn(&dn_args).await;
    let vae = spawn(&[
        "serve",
        "--stage",
        "vae",
        "--listen",
        "127.0.0.1:0",
        "--model",
        model,
    ])
    .await;
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

/// Largest per-channel difference in levels between two PNGs of the same size.
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
