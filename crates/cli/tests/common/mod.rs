//! Helpers shared by the end-to-end tests: the services as separate processes (`qwen-image serve --stage
//! ...` on 127.0.0.1:0), gateway clients, reference dumps and image comparison.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::time::Duration;

use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::{
    GenerateEvent, GenerateResult, GenerationSettings, TextToImageRequest, generate_event,
};
use qwen_image_testkit::stack::{Launcher, ProcessStack, StackSpec};
use tonic::transport::Channel;

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

/// The URL of a running service.
pub struct Service {
    pub url: String,
}

/// The four services as processes; the stages' URLs in `stages` (text encoder, denoiser, VAE).
pub struct Stack {
    pub stages: Vec<Service>,
    pub gateway: Service,
    _processes: ProcessStack,
}

impl Stack {
    fn from(p: ProcessStack) -> Self {
        Self {
            stages: vec![
                Service {
                    url: p.text_encoder.url(),
                },
                Service {
                    url: p.denoiser.url(),
                },
                Service { url: p.vae.url() },
            ],
            gateway: Service {
                url: p.gateway_url(),
            },
            _processes: p,
        }
    }
}

pub async fn start_stack(denoiser_queue_capacity: Option<&str>) -> Stack {
    match denoiser_queue_capacity {
        Some(q) => start_stack_with(&["--queue-capacity", q]).await,
        None => start_stack_with(&[]).await,
    }
}

/// The four services on the tiny snapshot, the denoiser started with `denoiser_args` added (e.g.
/// `--controlnet DIR`).
pub async fn start_stack_with(denoiser_args: &[&str]) -> Stack {
    start_stack_on(
        Some(snapshot().to_str().expect("utf-8 path")),
        denoiser_args,
    )
    .await
}

/// The four services as separate processes on `model`: the stage binaries with their own flags; `None`
/// = no `--model`, the default model, through `qwen-image serve --stage X` (which embeds it).
pub async fn start_stack_on(model: Option<&str>, denoiser_args: &[&str]) -> Stack {
    let (launcher, mut spec) = match model {
        Some(m) => (
            Launcher::StageBinaries,
            StackSpec::model(std::path::Path::new(m)),
        ),
        None => (
            Launcher::Cli(PathBuf::from(env!("CARGO_BIN_EXE_qwen-image"))),
            StackSpec::default(),
        ),
    };
    spec.denoiser_args = denoiser_args.iter().map(|s| s.to_string()).collect();
    Stack::from(
        ProcessStack::serving(launcher, &spec)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    )
}

/// A text-to-image request of `settings`.
pub fn t2i(settings: GenerationSettings) -> TextToImageRequest {
    TextToImageRequest {
        settings: Some(settings),
        initial_latents: None,
    }
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

/// The reference dump's request settings and image.
pub fn reference(name: &str) -> (GenerationSettings, Vec<u8>) {
    reference_at(&workspace().join("tests/fixtures/tiny/refs").join(name))
}

/// [`reference`] for a dump directory anywhere.
pub fn reference_at(dir: &std::path::Path) -> (GenerationSettings, Vec<u8>) {
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
    let req = GenerationSettings {
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

// The Python clients of the HTTP API (tools/http-clients): used by http_clients.rs and e2e_instruct.rs.

pub const SKIP_VAR: &str = "QWEN_IMAGE_SKIP_HTTP_CLIENT_TESTS";

/// `None` (after saying so) when the caller asked to skip the tests that need `what`; otherwise fails.
pub fn missing(what: &str, how: &str) -> Option<PathBuf> {
    if std::env::var(SKIP_VAR).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: {what} is missing and {SKIP_VAR}=1 ({how})");
        return None;
    }
    panic!("{what} is missing: {how}; or set {SKIP_VAR}=1 to skip this test");
}

/// The Python of the client tests' venv.
pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("QWEN_IMAGE_TEST_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/qwen-image-http-clients/venv/bin/python"))
        });
    match p {
        Some(p) if p.exists() => Some(p),
        _ => missing(
            "the Python venv of the HTTP client tests",
            "run `export QWEN_IMAGE_TEST_PYTHON=$(bash tools/http-clients/venv.sh)` (.ci/run does)",
        ),
    }
}

/// Runs `script` of tools/http-clients with `args`, failing with its output when it fails.
pub async fn run_python(python: &Path, script: &str, args: &[String]) {
    let script = workspace().join("tools/http-clients").join(script);
    let child = tokio::process::Command::new(python)
        .arg(&script)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(GUARD, child)
        .await
        .unwrap_or_else(|_| panic!("{} still running after {GUARD:?}", script.display()))
        .expect("python starts");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}",
        script.display(),
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}
