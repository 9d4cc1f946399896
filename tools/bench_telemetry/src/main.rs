//! Telemetry overhead: three copies of the four-service stack run side by side (separate
//! `qwen-image serve --stage` processes), identical except for telemetry:
//!
//! - `off`:  `RUST_LOG=off`, no OTLP endpoint: every span and log call is disabled (the baseline);
//! - `logs`: `RUST_LOG=info`, no OTLP endpoint: the default deployment without a collector (server
//!   layer spans, per-step spans and request logs are live, nothing is exported);
//! - `otlp`: `RUST_LOG=info` and `--otlp-endpoint` to an in-process OTLP receiver: full export.
//!
//! Requests alternate between the stacks round by round (so load drift on a shared machine hits all
//! three alike); the report gives each mode's median latency and the median of the per-round ratios
//! to `off` (the paired figure is the robust one under load).
//!
//! Then the per-step cost in isolation: this binary re-runs itself (`--micro MODE`, one process per
//! mode since the subscriber is global) and times the denoiser's per-step span (`denoise_step` with
//! `step`, then `timestep` recorded) against the same loop without it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_testkit::bench::{self, Geometry, PROMPTS, gateway_client, t2i_request, timed_t2i};
use qwen_image_testkit::otlp_sink::OtlpSink;
use qwen_image_testkit::stack::{Launcher, ProcessStack, StackSpec};
use tonic::transport::Channel;

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
    /// Internal: time the per-step span under this telemetry mode (`none`, `logs`, `otlp`) and exit.
    #[arg(long, hide = true)]
    micro: Option<String>,
    /// Internal: the OTLP endpoint of `--micro otlp`.
    #[arg(long, hide = true)]
    micro_endpoint: Option<String>,
}

/// Spans timed per micro run.
const MICRO_STEPS: u32 = 200_000;

/// The denoiser's per-step span (services/denoiser/src/job.rs), opened and closed `MICRO_STEPS` times;
/// returns ns per step with and without it.
fn micro(mode: &str, endpoint: Option<String>) -> Result<()> {
    let mut common = qwen_image_common::args::CommonArgs::new(([127, 0, 0, 1], 0).into());
    common.otlp_endpoint = endpoint;
    let _guard = match mode {
        "none" => None,
        "logs" | "otlp" => Some(qwen_image_common::telemetry::init("bench", &common)?),
        other => bail!("unknown micro mode {other}"),
    };
    // Inside a request-like parent, as in the worker.
    let parent = tracing::info_span!("job", queue_wait_ms = 0.0).entered();
    let time = |with_span: bool| {
        let started = Instant::now();
        let mut acc = 0u64;
        for step in 0..MICRO_STEPS {
            if with_span {
                let span =
                    tracing::info_span!("denoise_step", step, timestep = tracing::field::Empty)
                        .entered();
                acc = std::hint::black_box(acc + u64::from(step));
                span.record("timestep", f64::from(step));
            } else {
                acc = std::hint::black_box(acc + u64::from(step));
            }
        }
        std::hint::black_box(acc);
        started.elapsed().as_nanos() as f64 / f64::from(MICRO_STEPS)
    };
    let _ = (time(false), time(true)); // warm-up
    let (without, with) = (time(false), time(true));
    drop(parent);
    println!("micro {mode} {without:.1} {with:.1}");
    Ok(())
}

struct Stack {
    mode: &'static str,
    _procs: ProcessStack,
    client: ImageGeneratorClient<Channel>,
    times: Vec<Duration>,
}

async fn start(bin: &Path, model: &Path, mode: &'static str, otlp: Option<&str>) -> Result<Stack> {
    let mut spec = StackSpec::model(model);
    let log = if mode == "off" { "off" } else { "info" };
    spec.env = vec![("RUST_LOG".into(), log.into())];
    if let Some(e) = otlp {
        spec.common_args = vec!["--otlp-endpoint".into(), e.into()];
    }
    let procs = ProcessStack::serving(Launcher::Cli(bin.to_path_buf()), &spec)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(Stack {
        mode,
        client: gateway_client(&procs.gateway_url()),
        _procs: procs,
        times: Vec::new(),
    })
}

async fn request(c: &mut ImageGeneratorClient<Channel>, a: &Args) -> Result<Duration> {
    let g = Geometry {
        width: a.width,
        height: a.height,
        steps: a.steps,
    };
    let (elapsed, _png) = timed_t2i(c, t2i_request(g, PROMPTS[0], 0))
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(elapsed)
}

fn median(v: &[Duration]) -> Duration {
    Duration::from_secs_f64(bench::median(
        &v.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(mode) = &a.micro {
        return micro(mode, a.micro_endpoint.clone());
    }
    let bin = match &a.qwen_image {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("qwen-image"),
    };
    let sink = OtlpSink::start().await?;
    let mut stacks = vec![
        start(&bin, &a.model, "off", None).await?,
        start(&bin, &a.model, "logs", None).await?,
        start(&bin, &a.model, "otlp", Some(&sink.endpoint)).await?,
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
    let paired = |s: &Stack| {
        let mut r: Vec<f64> = s
            .times
            .iter()
            .zip(&stacks[0].times)
            .map(|(t, b)| t.as_secs_f64() / b.as_secs_f64())
            .collect();
        r.sort_by(f64::total_cmp);
        (r[r.len() / 2] - 1.0) * 100.0
    };
    println!(
        "{}x{}, {} steps, true CFG 4, {} rounds (spans received by the sink: {})",
        a.width,
        a.height,
        a.steps,
        a.runs,
        sink.spans().len()
    );
    println!("| mode | median | p10 | p90 | median vs off | median of paired ratios vs off |");
    println!("|---|---|---|---|---|---|");
    for s in &stacks {
        let mut v = s.times.clone();
        v.sort();
        let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
        let med = median(&s.times).as_secs_f64();
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:+.2} % | {:+.2} % |",
            s.mode,
            med * 1e3,
            p(0.1),
            p(0.9),
            (med / base - 1.0) * 100.0,
            paired(s)
        );
    }
    drop(stacks);

    println!();
    println!("per-step span, {MICRO_STEPS} steps (ns per step; one process per mode)");
    println!("| subscriber | loop without span | loop with span | span cost |");
    println!("|---|---|---|---|");
    let me = std::env::current_exe()?;
    for mode in ["none", "logs", "otlp"] {
        let mut cmd = tokio::process::Command::new(&me);
        cmd.args(["--micro", mode]).env("RUST_LOG", "info");
        if mode == "otlp" {
            cmd.args(["--micro-endpoint", &sink.endpoint]);
        }
        let out = cmd.output().await?;
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(line) = text.lines().find_map(|l| l.strip_prefix("micro ")) else {
            bail!(
                "micro {mode} printed nothing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [without, with] = v[..] {
            println!(
                "| {mode} | {without:.1} ns | {with:.1} ns | {:.1} ns |",
                with - without
            );
        }
    }
    Ok(())
}
