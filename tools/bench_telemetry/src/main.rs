//! Telemetry overhead: three copies of the four-service stack run side by side (separate
//! `qwen-image serve --stage` processes), identical except for telemetry:
//!
//! - `off`:  `RUST_LOG=off`, no OTLP endpoint: every span and log call is disabled (the baseline);
//! - `logs`: `RUST_LOG=info`, no OTLP endpoint: the default deployment without a collector (server
//!   layer spans, per-step spans and request logs are live, nothing is exported);
//! - `otlp`: `RUST_LOG=info` and `--otlp-endpoint` to an in-process OTLP receiver: full export.
//!
//! Requests alternate between the stacks round by round (so load drift on a shared machine hits all
//! three alike); the report gives each mode's median latency and its ratio to `off`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::{TextToImageRequest, generate_event};
use qwen_image_testkit::otlp_sink::OtlpSink;
use qwen_image_testkit::process::{ServiceProcess, wait_serving};
use tonic::transport::Channel;

const GUARD: Duration = Duration::from_secs(600);

#[derive(Parser)]
struct Args {
    /// Diffusers snapshot directory.
    #[arg(long, default_value = "tests/fixtures/tiny/snapshot")]
    model: PathBuf,
    /// The `qwen-image` binary (default: next to this one).
    #[arg(long)]
    qwen_image: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    width: u32,
    #[arg(long, default_value_t = 64)]
    height: u32,
    #[arg(long, default_value_t = 20)]
    steps: u32,
    /// Measured rounds (one request per mode each); one more warm-up round is not counted.
    #[arg(long, default_value_t = 30)]
    runs: usize,
}

struct Stack {
    mode: &'static str,
    _procs: Vec<ServiceProcess>,
    client: ImageGeneratorClient<Channel>,
    times: Vec<Duration>,
}

async fn start(
    bin: &PathBuf,
    model: &str,
    mode: &'static str,
    otlp: Option<&str>,
) -> Result<Stack> {
    let log = if mode == "off" { "off" } else { "info" };
    let env = [("RUST_LOG", log)];
    let spawn = |stage: &'static str, extra: Vec<String>| {
        let mut args: Vec<String> = ["serve", "--stage", stage, "--listen", "127.0.0.1:0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(e) = otlp {
            args.extend(["--otlp-endpoint".to_string(), e.to_string()]);
        }
        args.extend(extra);
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            ServiceProcess::spawn(bin, &refs, &env, GUARD)
                .await
                .map_err(anyhow::Error::msg)
        }
    };
    let m = || vec!["--model".to_string(), model.to_string()];
    let te = spawn("text-encoder", m()).await?;
    let dn = spawn("denoiser", m()).await?;
    let vae = spawn("vae", m()).await?;
    let gw = spawn(
        "gateway",
        vec![
            "--text-encoder".into(),
            te.url(),
            "--denoiser".into(),
            dn.url(),
            "--vae".into(),
            vae.url(),
        ],
    )
    .await?;
    wait_serving(&gw.url(), GUARD)
        .await
        .map_err(anyhow::Error::msg)?;
    let ch = Channel::from_shared(gw.url())?.connect().await?;
    Ok(Stack {
        mode,
        client: ImageGeneratorClient::new(ch).max_decoding_message_size(64 << 20),
        _procs: vec![gw, te, dn, vae],
        times: Vec::new(),
    })
}

async fn request(c: &mut ImageGeneratorClient<Channel>, a: &Args) -> Result<Duration> {
    let req = TextToImageRequest {
        prompt: "A cat holding a sign that says hello world".into(),
        negative_prompt: Some(" ".into()),
        width_px: a.width,
        height_px: a.height,
        steps: a.steps,
        true_cfg_scale: Some(4.0),
        seed: Some(0),
        ..Default::default()
    };
    let started = Instant::now();
    let mut stream = c.text_to_image(req).await?.into_inner();
    while let Some(ev) = stream.message().await? {
        if let Some(generate_event::Event::Result(_)) = ev.event {
            return Ok(started.elapsed());
        }
    }
    bail!("no result")
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let bin = match &a.qwen_image {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("qwen-image"),
    };
    let model = a.model.to_str().context("utf-8 model path")?.to_string();
    let sink = OtlpSink::start().await?;
    let mut stacks = vec![
        start(&bin, &model, "off", None).await?,
        start(&bin, &model, "logs", None).await?,
        start(&bin, &model, "otlp", Some(&sink.endpoint)).await?,
    ];
    for round in 0..=a.runs {
        // Rotate the order each round so no mode always runs first.
        let n = stacks.len();
        for i in 0..n {
            let s = &mut stacks[(round + i) % n];
            let t = request(&mut s.client, &a).await?;
            if round > 0 {
                s.times.push(t);
            }
        }
    }
    let base = median(&stacks[0].times).as_secs_f64();
    println!(
        "{}x{}, {} steps, true CFG 4, {} rounds (medians; spans received by the sink: {})",
        a.width,
        a.height,
        a.steps,
        a.runs,
        sink.spans().len()
    );
    println!("| mode | median | p10 | p90 | vs off |");
    println!("|---|---|---|---|---|");
    for s in &stacks {
        let mut v = s.times.clone();
        v.sort();
        let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
        let med = median(&s.times).as_secs_f64();
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:+.2} % |",
            s.mode,
            med * 1e3,
            p(0.1),
            p(0.9),
            (med / base - 1.0) * 100.0
        );
    }
    Ok(())
}
