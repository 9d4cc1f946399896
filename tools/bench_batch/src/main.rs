//! Throughput of continuous batching: text-to-image requests through the four services (separate
//! `qwen-image serve --stage ...` processes on loopback), at 1, 2, 4 and 8 concurrent clients, with the
//! denoiser's batching off (`--max-batch 1`) and on (`--max-batch N`).
//!
//! Both stacks run side by side; each round runs every client count on each stack, alternating which
//! goes first, so load drift on a shared machine hits both alike. A run: each client sends
//! `--requests` requests one after the other (different prompts and seeds); requests per minute = all
//! requests / the run's wall time; latencies are per request. The table gives medians over the rounds
//! and the ratio on / off of the round-by-round requests per minute (its median), then each service's CPU
//! time per request (from `/proc/PID/stat`), which shows where the time goes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_testkit::bench::{
    Geometry, PROMPTS, cpu_seconds, gateway_client, load_average, median, quantile, t2i_request,
    timed_t2i,
};
use qwen_image_testkit::stack::{Launcher, ProcessStack, StackSpec};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// Diffusers snapshot directory; without it, the default model (the `qwen-image` binary's).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The `qwen-image` binary (default: next to this one).
    #[arg(long)]
    qwen_image: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    width: u32,
    #[arg(long, default_value_t = 64)]
    height: u32,
    #[arg(long, default_value_t = 20)]
    steps: u32,
    /// Concurrent client counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    clients: Vec<usize>,
    /// Requests each client sends per run.
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// Rounds (each runs every client count on both stacks); one more warm-up run is not counted.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// `--max-batch` of the batching stack.
    #[arg(long, default_value_t = 4)]
    max_batch: u32,
    /// `--batch-wait-ms` of the batching stack.
    #[arg(long, default_value_t = 0)]
    batch_wait_ms: u64,
}

struct Stack {
    name: &'static str,
    procs: ProcessStack,
    url: String,
}

/// The services whose CPU time a run reports, in table order.
const SERVICES: [&str; 4] = ["text encoder", "denoiser", "VAE", "gateway"];

impl Stack {
    /// CPU seconds used so far by each of [`SERVICES`] (NaN where unreadable).
    fn cpu(&self) -> [f64; 4] {
        let p = &self.procs;
        [&p.text_encoder, &p.denoiser, &p.vae, &p.gateway]
            .map(|s| s.pid().and_then(cpu_seconds).unwrap_or(f64::NAN))
    }
}

async fn start(a: &Args, bin: &Path, name: &'static str, max_batch: u32) -> Result<Stack> {
    let mut spec = match &a.model {
        Some(m) => StackSpec::model(m),
        None => StackSpec::default(),
    };
    // Room in the denoiser for every client (the gateway sends at most `--queue-capacity` at once).
    spec.denoiser_args = vec![
        "--max-batch".into(),
        max_batch.to_string(),
        "--batch-wait-ms".into(),
        a.batch_wait_ms.to_string(),
        "--queue-capacity".into(),
        "16".into(),
    ];
    for args in [&mut spec.text_encoder_args, &mut spec.vae_args] {
        args.extend(["--queue-capacity".to_string(), "16".to_string()]);
    }
    let procs = ProcessStack::serving(Launcher::Cli(bin.to_path_buf()), &spec)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(Stack {
        name,
        url: procs.gateway_url(),
        procs,
    })
}

async fn request(c: &mut ImageGeneratorClient<Channel>, a: &Args, n: usize) -> Result<Duration> {
    let g = Geometry {
        width: a.width,
        height: a.height,
        steps: a.steps,
    };
    let req = t2i_request(g, PROMPTS[n % PROMPTS.len()], n as u64);
    let (elapsed, _png) = timed_t2i(c, req).await.map_err(anyhow::Error::msg)?;
    Ok(elapsed)
}

struct Run {
    per_minute: f64,
    latencies: Vec<Duration>,
    /// CPU milliseconds per request of each of [`SERVICES`] over the run.
    cpu_ms: [f64; 4],
}

async fn run(stack: &Stack, a: &Args, clients: usize) -> Result<Run> {
    let cpu_before = stack.cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = gateway_client(&stack.url);
        let a = Args {
            model: None,
            qwen_image: None,
            clients: Vec::new(),
            ..*a
        };
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            for i in 0..a.requests {
                times.push(request(&mut client, &a, c * 1000 + i).await?);
            }
            anyhow::Ok(times)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let wall = started.elapsed();
    let cpu_after = stack.cpu();
    let n = latencies.len() as f64;
    Ok(Run {
        per_minute: n * 60.0 / wall.as_secs_f64(),
        latencies,
        cpu_ms: std::array::from_fn(|i| (cpu_after[i] - cpu_before[i]) * 1000.0 / n),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if a.rounds == 0 || a.requests == 0 || a.clients.is_empty() {
        bail!("--rounds, --requests and --clients must be positive");
    }
    let bin = match &a.qwen_image {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("qwen-image"),
    };
    let stacks = [
        start(&a, &bin, "off", 1)
            .await
            .context("the stack without batching")?,
        start(&a, &bin, "on", a.max_batch)
            .await
            .context("the stack with batching")?,
    ];
    let load_start = load_average();
    eprintln!("warm-up");
    for s in &stacks {
        run(s, &a, 1).await?;
    }
    // [stack][clients] -> runs
    let mut runs: Vec<Vec<Vec<Run>>> = (0..2)
        .map(|_| (0..a.clients.len()).map(|_| Vec::new()).collect())
        .collect();
    for round in 0..a.rounds {
        for (ci, &clients) in a.clients.iter().enumerate() {
            for k in 0..2 {
                let si = (round + ci + k) % 2;
                let r = run(&stacks[si], &a, clients).await?;
                eprintln!(
                    "round {round} clients {clients} batching {}: {:.1} requests/min",
                    stacks[si].name, r.per_minute
                );
                runs[si][ci].push(r);
            }
        }
    }
    println!(
        "{}x{}, {} steps, CFG 4, {} requests per client per run, {} rounds, --max-batch {} --batch-wait-ms {}, load average {} (start) {} (end)",
        a.width,
        a.height,
        a.steps,
        a.requests,
        a.rounds,
        a.max_batch,
        a.batch_wait_ms,
        load_start,
        load_average()
    );
    println!();
    println!(
        "| clients | batching | requests/min | p50 latency | p99 latency | on / off requests/min |"
    );
    println!("|---|---|---|---|---|---|");
    for (ci, &clients) in a.clients.iter().enumerate() {
        for si in 0..2 {
            let rs = &runs[si][ci];
            let per_minute = median(&rs.iter().map(|r| r.per_minute).collect::<Vec<_>>());
            let all: Vec<Duration> = rs.iter().flat_map(|r| r.latencies.clone()).collect();
            let ratio = if si == 1 {
                let ratios: Vec<f64> = runs[1][ci]
                    .iter()
                    .zip(&runs[0][ci])
                    .map(|(on, off)| on.per_minute / off.per_minute)
                    .collect();
                format!("{:.2}x", median(&ratios))
            } else {
                String::new()
            };
            println!(
                "| {clients} | {} | {per_minute:.0} | {:.2} s | {:.2} s | {ratio} |",
                stacks[si].name,
                quantile(&all, 0.5).as_secs_f64(),
                quantile(&all, 0.99).as_secs_f64(),
            );
        }
    }
    println!();
    println!(
        "CPU time per request, milliseconds, by service (medians over the rounds; /proc/PID/stat, 10 ms ticks):"
    );
    println!();
    println!("| clients | batching | {} | all |", SERVICES.join(" | "));
    println!("|---|---|{}---|", "---|".repeat(SERVICES.len()));
    for (ci, &clients) in a.clients.iter().enumerate() {
        for si in 0..2 {
            let rs = &runs[si][ci];
            let per: Vec<f64> = (0..SERVICES.len())
                .map(|i| median(&rs.iter().map(|r| r.cpu_ms[i]).collect::<Vec<_>>()))
                .collect();
            let cells: Vec<String> = per.iter().map(|v| format!("{v:.0}")).collect();
            println!(
                "| {clients} | {} | {} | {:.0} |",
                stacks[si].name,
                cells.join(" | "),
                per.iter().sum::<f64>()
            );
        }
    }
    Ok(())
}
