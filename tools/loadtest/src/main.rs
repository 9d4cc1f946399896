//! `qwen-image-loadtest`: starts the four services as separate processes on loopback (the workspace's
//! stage and gateway binaries on the default model) and runs load and fault scenarios against the
//! gateway, printing one Markdown row per scenario (see `report`). Bounded: every scenario has a fixed
//! number of requests or a fixed duration, and every request a deadline.

mod cluster;
mod load;
mod prompts;
mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use cluster::{Cluster, Setup, Stage};
use load::{Bound, Outcome};
use report::{Row, mib};
use tokio::sync::mpsc;
use tonic::Code;

/// Every scenario, in the order they run.
const SCENARIOS: &[&str] = &[
    "c1",
    "c4",
    "c16",
    "c64",
    "kill-denoiser",
    "kill-text-encoder",
    "kill-vae",
    "restart-denoiser",
    "te-big-prompts",
    "soak",
];

/// A refusal from the gateway's full queue must come this fast.
const AT_ONCE: Duration = Duration::from_secs(2);
/// Largest allowed RSS change of a service between the first minute of the soak and its end.
const SOAK_RSS_DRIFT: f64 = 0.10;

#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Comma-separated scenarios: c1, c4, c16, c64 (N concurrent clients; c64 with --max-queued 32),
    /// kill-denoiser, kill-text-encoder, kill-vae (one of two replicas killed mid-request),
    /// restart-denoiser (a replica killed and started again during load), te-big-prompts (64 concurrent
    /// Encode calls of 64 prompts x 64 KiB straight to the text encoder), soak.
    /// Default: all, in this order.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Where the service binaries are (default: this executable's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Model snapshot the stages load (default: the demo model, `models/qwen-image-demo`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Denoising steps of the load requests.
    #[arg(long, default_value_t = 20)]
    steps: u32,
    /// Requests each client sends, one after the other, in the cN scenarios.
    #[arg(long, default_value_t = 2)]
    per_client: usize,
    /// Denoising steps of the requests in the kill scenarios (long enough to be killed mid-request).
    #[arg(long, default_value_t = 200)]
    kill_steps: u32,
    /// Length of the soak in seconds.
    #[arg(long, default_value_t = 600)]
    soak_secs: u64,
    /// Clients of the soak.
    #[arg(long, default_value_t = 8)]
    soak_clients: usize,
    /// When in the soak the first RSS reading is taken (seconds).
    #[arg(long, default_value_t = 60)]
    soak_baseline_secs: u64,
    /// Also append the table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.scenarios.is_empty() {
        args.scenarios = SCENARIOS.iter().map(|s| s.to_string()).collect();
    }
    for s in &args.scenarios {
        if !SCENARIOS.contains(&s.as_str()) {
            bail!("unknown scenario {s:?}; known: {}", SCENARIOS.join(", "));
        }
    }
    let setup = Setup {
        bin_dir: match &args.bin_dir {
            Some(d) => d.clone(),
            None => cluster::own_dir()?,
        },
        model: args.model.clone().unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/qwen-image-demo")
        }),
    };
    let mut rows = Vec::new();
    let mut failed = false;
    for name in &args.scenarios {
        eprintln!("== scenario {name}");
        let row = run_scenario(&setup, &args, name).await?;
        println!("{}", report::table(std::slice::from_ref(&row)));
        failed |= !row.ok;
        rows.push(row);
    }
    let table = report::table(&rows);
    println!("\n{table}");
    if let Some(out) = &args.out {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)?;
        writeln!(f, "{table}")?;
    }
    if failed {
        bail!("some scenario did not meet its goal (see the checks column)");
    }
    Ok(())
}

async fn run_scenario(setup: &Setup, args: &Args, name: &str) -> Result<Row> {
    match name {
        "c1" => concurrency(setup, args, 1).await,
        "c4" => concurrency(setup, args, 4).await,
        "c16" => concurrency(setup, args, 16).await,
        "c64" => concurrency(setup, args, 64).await,
        "kill-denoiser" => kill(setup, args, Stage::Denoiser).await,
        "kill-text-encoder" => kill(setup, args, Stage::TextEncoder).await,
        "kill-vae" => kill(setup, args, Stage::Vae).await,
        "restart-denoiser" => restart(setup, args).await,
        "te-big-prompts" => big_prompts(setup).await,
        "soak" => soak(setup, args).await,
        other => bail!("unknown scenario {other}"),
    }
}

/// `n` clients on one replica per stage; 64 clients with `--max-queued 32`: every request completes, or
/// (64) is refused with RESOURCE_EXHAUSTED at once.
async fn concurrency(setup: &Setup, args: &Args, n: usize) -> Result<Row> {
    let gateway_args: &[&str] = if n > 32 { &["--max-queued", "32"] } else { &[] };
    let cluster = Cluster::start(setup, [1, 1, 1], gateway_args).await?;
    let client = cluster.client().await?;
    let started = Instant::now();
    let outcomes = load::clients(
        &client,
        n,
        Bound::Requests(args.per_client),
        args.steps,
        0,
        None,
    )
    .await;
    let wall = started.elapsed();
    let mut notes = Vec::new();
    let refused: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| matches!(o.result, Err((Code::ResourceExhausted, _))))
        .collect();
    let slowest_refusal = refused.iter().map(|o| o.latency).max();
    if let Some(t) = slowest_refusal {
        notes.push(format!(
            "slowest RESOURCE_EXHAUSTED after {:.2} s",
            t.as_secs_f64()
        ));
    }
    let others = outcomes
        .iter()
        .filter(|o| matches!(&o.result, Err((c, _)) if *c != Code::ResourceExhausted))
        .count();
    let ok = if n > 32 {
        others == 0 && slowest_refusal.is_none_or(|t| t < AT_ONCE)
    } else {
        outcomes.iter().all(|o| o.result.is_ok())
    };
    Ok(Row {
        name: format!(
            "{n} concurrent{}",
            if n > 32 { ", --max-queued 32" } else { "" }
        ),
        clients: n,
        outcomes,
        wall,
        peaks: cluster.peaks(),
        notes,
        ok,
    })
}

/// Waits until `n` clients reported denoising (or every sender is gone).
async fn all_denoising(rx: &mut mpsc::UnboundedReceiver<()>, n: usize) {
    for _ in 0..n {
        if rx.recv().await.is_none() {
            break;
        }
    }
}

/// Runs every completed request of `outcomes` again, one at a time, and counts the PNGs that are
/// byte-identical to the first run.
async fn identical(cluster: &Cluster, outcomes: &[Outcome], steps: u32) -> Result<(usize, usize)> {
    let client = cluster.client().await?;
    let (mut same, mut compared) = (0, 0);
    for o in outcomes {
        let Ok(png) = &o.result else { continue };
        let again = load::run(client.clone(), steps, o.seed, None).await;
        compared += 1;
        if again.result.as_ref().is_ok_and(|p| p == png) {
            same += 1;
        }
    }
    Ok((same, compared))
}

/// Two replicas of `victim`: four long requests start, replica 0 is killed with SIGKILL once all four
/// are denoising, four more arrive. Every request must complete, some call must have been failed over,
/// and every PNG must equal the same request run undisturbed afterwards.
async fn kill(setup: &Setup, args: &Args, victim: Stage) -> Result<Row> {
    let mut replicas = [1, 1, 1];
    replicas[victim as usize] = 2;
    // Slow health checks: the failed call itself discovers the dead replica.
    let mut cluster = Cluster::start(setup, replicas, &["--health-interval-ms", "60000"]).await?;
    let client = cluster.client().await?;
    let started = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let first = {
        let client = client.clone();
        let steps = args.kill_steps;
        tokio::spawn(async move {
            load::clients(&client, 4, Bound::Requests(1), steps, 0, Some(tx)).await
        })
    };
    all_denoising(&mut rx, 4).await;
    cluster.kill(victim, 0).await?;
    let second = load::clients(&client, 4, Bound::Requests(1), args.kill_steps, 100, None).await;
    let mut outcomes = first.await?;
    outcomes.extend(second);
    let wall = started.elapsed();
    let peaks = cluster.peaks();
    let failovers = cluster.gateway_log_count(&["running it on another", victim.name()]);
    let resumed = cluster.gateway_log_count(&["resuming the denoising loop"]);
    let (same, compared) = identical(&cluster, &outcomes, args.kill_steps).await?;
    let all_ok = outcomes.iter().all(|o| o.result.is_ok());
    let mut notes = vec![
        format!("{failovers} call(s) failed over"),
        format!("PNGs identical to undisturbed runs: {same}/{compared}"),
    ];
    if victim == Stage::Denoiser {
        notes.push(format!("{resumed} resumed from checkpoint latents"));
    }
    Ok(Row {
        name: format!("kill -9 one of two {} replicas", victim.name()),
        clients: 8,
        outcomes,
        wall,
        peaks,
        notes,
        ok: all_ok && failovers >= 1 && same == compared,
    })
}

/// Two denoiser replicas under 8 clients; replica 0 is killed once every client is denoising and started
/// again on the same address; then 8 clients send more. Every request must complete and the restarted
/// replica must serve some of the later ones.
async fn restart(setup: &Setup, args: &Args) -> Result<Row> {
    let mut cluster = Cluster::start(setup, [1, 2, 1], &[]).await?;
    let client = cluster.client().await?;
    let started = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let before = {
        let (client, steps, n) = (client.clone(), args.steps, args.per_client.max(2));
        tokio::spawn(async move {
            load::clients(&client, 8, Bound::Requests(n), steps, 0, Some(tx)).await
        })
    };
    all_denoising(&mut rx, 8).await;
    cluster.kill(Stage::Denoiser, 0).await?;
    cluster.restart(Stage::Denoiser, 0).await?;
    let after = load::clients(
        &client,
        8,
        Bound::Requests(args.per_client.max(2)),
        args.steps,
        1000,
        None,
    )
    .await;
    let mut outcomes = before.await?;
    outcomes.extend(after);
    let wall = started.elapsed();
    let served = cluster.served(Stage::Denoiser, 0).await?;
    let all_ok = outcomes.iter().all(|o| o.result.is_ok());
    Ok(Row {
        name: "denoiser replica killed and restarted under load (2 replicas)".into(),
        clients: 8,
        outcomes,
        wall,
        peaks: cluster.peaks(),
        notes: vec![format!(
            "the restarted replica served {served} call(s) afterwards"
        )],
        ok: all_ok && served >= 1.0,
    })
}

/// 8 clients for `soak_secs` on one replica per stage: nothing lost, and each service's RSS at the end
/// within 10 % of its RSS after the first minute.
async fn soak(setup: &Setup, args: &Args) -> Result<Row> {
    let cluster = Cluster::start(setup, [1, 1, 1], &[]).await?;
    let client = cluster.client().await?;
    let started = Instant::now();
    let end = started + Duration::from_secs(args.soak_secs);
    let load = {
        let (client, n, steps) = (client.clone(), args.soak_clients, args.steps);
        tokio::spawn(
            async move { load::clients(&client, n, Bound::Until(end), steps, 0, None).await },
        )
    };
    tokio::time::sleep_until((started + Duration::from_secs(args.soak_baseline_secs)).into()).await;
    let baseline = cluster.rss_now();
    tokio::time::sleep_until(end.into()).await;
    let last = cluster.rss_now();
    let outcomes = load.await?;
    let wall = started.elapsed();
    let mut notes = Vec::new();
    let mut within = true;
    let by_service = |m: &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
        m.iter()
            .map(|(k, v)| (k.split('#').next().unwrap_or(k).to_string(), *v))
            .collect()
    };
    let (baseline, last) = (by_service(&baseline), by_service(&last));
    for (service, b) in &baseline {
        let Some(e) = last.get(service) else { continue };
        let drift = (*e as f64 - *b as f64) / (*b as f64).max(1.0);
        within &= drift.abs() <= SOAK_RSS_DRIFT;
        notes.push(format!(
            "{service} RSS {} → {} MiB ({:+.1} %)",
            mib(*b),
            mib(*e),
            drift * 100.0
        ));
    }
    let lost = outcomes.iter().filter(|o| o.result.is_err()).count();
    notes.insert(
        0,
        format!(
            "RSS after {} s → end of the {} s:",
            args.soak_baseline_secs, args.soak_secs
        ),
    );
    Ok(Row {
        name: format!("soak {} s", args.soak_secs),
        clients: args.soak_clients,
        outcomes,
        wall,
        peaks: cluster.peaks(),
        notes,
        ok: lost == 0 && within,
    })
}

/// 64 concurrent `Encode` calls of the largest prompts the text encoder accepts, straight to it: each
/// either completes or is refused (RESOURCE_EXHAUSTED when its queue is full); the row shows what that
/// costs in memory.
async fn big_prompts(setup: &Setup) -> Result<Row> {
    let cluster = Cluster::start(setup, [1, 1, 1], &[]).await?;
    let idle = cluster
        .rss_now()
        .get("text-encoder#0")
        .copied()
        .unwrap_or(0);
    let started = Instant::now();
    let outcomes = prompts::encode_storm(cluster.url(Stage::TextEncoder, 0), 64).await?;
    let wall = started.elapsed();
    let peaks = cluster.peaks();
    let others = outcomes
        .iter()
        .filter(|o| matches!(&o.result, Err((c, _)) if *c != Code::ResourceExhausted))
        .count();
    let growth = peaks
        .get("text-encoder")
        .map_or(0, |p| p.saturating_sub(idle));
    Ok(Row {
        name: "64 concurrent Encode calls of 64 prompts x 64 KiB, straight to the text encoder"
            .into(),
        clients: 64,
        outcomes,
        wall,
        peaks,
        notes: vec![format!(
            "text-encoder RSS {} MiB before, peak +{} MiB",
            mib(idle),
            mib(growth)
        )],
        ok: others == 0,
    })
}
