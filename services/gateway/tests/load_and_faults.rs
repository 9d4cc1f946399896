//! Load and faults, with the real stage binaries as processes on the tiny snapshot: requests wait their
//! turn for stage slots instead of bouncing, the gateway's own queue refuses at once when full, and a
//! replica killed with SIGKILL mid-request is replaced without the caller noticing (same PNG bytes; a
//! denoising loop resumes from its last checkpoint latents).
//!
//! Needs the workspace's binaries (`cargo build --bins`, which `cargo test --workspace` does).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::{
    GenerateResult, GenerationSettings, Stage, TextToImageRequest, generate_event,
};
use qwen_image_testkit::process::{ServiceProcess, stage_flags, wait_serving, workspace_binary};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Failure guard for waits (model loading included); never used to synchronise.
const GUARD: Duration = Duration::from_secs(300);

fn snapshot() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/snapshot")
}

async fn spawn(binary: &str, args: &[&str]) -> ServiceProcess {
    let mut full = vec!["--listen", "127.0.0.1:0"];
    full.extend_from_slice(args);
    ServiceProcess::spawn(
        &workspace_binary(binary),
        &full,
        &[("RUST_LOG", "warn")],
        GUARD,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A stage replica on the tiny snapshot, SERVING.
async fn stage(binary: &str) -> ServiceProcess {
    let model = snapshot();
    let p = spawn(binary, &["--model", model.to_str().expect("utf-8 path")]).await;
    wait_serving(&p.url(), GUARD)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    p
}

/// The stages (`replicas` of each, in the order text encoder, denoiser, VAE) and a gateway over them.
struct Cluster {
    text_encoder: Vec<ServiceProcess>,
    denoiser: Vec<ServiceProcess>,
    vae: Vec<ServiceProcess>,
    gateway: ServiceProcess,
}

impl Cluster {
    async fn start(replicas: [usize; 3], gateway_args: &[&str]) -> Self {
        let mut sets = Vec::new();
        for (binary, n) in [
            "qwen-image-text-encoder",
            "qwen-image-denoiser",
            "qwen-image-vae",
        ]
        .into_iter()
        .zip(replicas)
        {
            let mut set = Vec::new();
            for _ in 0..n {
                set.push(stage(binary).await);
            }
            sets.push(set);
        }
        let flags = stage_flags(&sets[0], &sets[1], &sets[2]);
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend_from_slice(gateway_args);
        let gateway = spawn("qwen-image-gateway", &args).await;
        wait_serving(&gateway.url(), GUARD)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let vae = sets.pop().expect("vae");
        let denoiser = sets.pop().expect("denoiser");
        let text_encoder = sets.pop().expect("text encoder");
        Self {
            text_encoder,
            denoiser,
            vae,
            gateway,
        }
    }

    async fn client(&self) -> ImageGeneratorClient<Channel> {
        let ch = Channel::from_shared(self.gateway.url())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        ImageGeneratorClient::new(ch).max_decoding_message_size(64 << 20)
    }
}

/// A 64x64 text-to-image request with CFG (two prompt encodes), `steps` steps and `seed`.
fn request(steps: u32, seed: u64) -> TextToImageRequest {
    TextToImageRequest {
        settings: Some(GenerationSettings {
            prompt: format!("a lighthouse at dusk, number {seed}"),
            negative_prompt: Some(" ".into()),
            width_px: 64,
            height_px: 64,
            steps,
            true_cfg_scale: Some(4.0),
            seed: Some(seed),
            ..Default::default()
        }),
        initial_latents: None,
    }
}

/// What one streamed request saw.
#[derive(Debug, Default)]
struct Seen {
    /// `queue_position` of every STAGE_QUEUED event.
    queue_positions: Vec<u32>,
}

/// Runs `req` (with `x-request-id` = `id`, so that the PNG metadata is the same on every run) to its
/// result. `on_step` is told the first time the denoiser reports step `notify_at_step` (or later).
async fn run(
    mut client: ImageGeneratorClient<Channel>,
    req: TextToImageRequest,
    id: &str,
    notify_at_step: Option<(u32, mpsc::UnboundedSender<()>)>,
) -> Result<(GenerateResult, Seen), Status> {
    let mut r = Request::new(req);
    r.metadata_mut()
        .insert("x-request-id", id.parse().expect("ascii id"));
    let mut stream = client.text_to_image(r).await?.into_inner();
    let mut seen = Seen::default();
    let mut notify = notify_at_step;
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(generate_event::Event::Progress(p)) => {
                if p.stage == Stage::Queued as i32 {
                    assert!(p.queue_position >= 1, "positions start at 1: {p:?}");
                    seen.queue_positions.push(p.queue_position);
                }
                if p.stage == Stage::Denoise as i32
                    && let Some((at, _)) = &notify
                    && p.step >= *at
                    && let Some((_, tx)) = notify.take()
                {
                    let _ = tx.send(());
                }
            }
            Some(generate_event::Event::Result(r)) => return Ok((r, seen)),
            None => {}
        }
    }
    Err(Status::internal("stream ended without a result"))
}

#[tokio::test]
async fn sixteen_concurrent_clients_all_complete_on_one_replica_per_stage() {
    // Default capacities (text encoder 8, denoiser 4, VAE 8) and the default --max-queued: 16 requests
    // with CFG need 32 prompt encodes and 16 denoising loops at once; the surplus waits its turn.
    let cluster = Cluster::start([1, 1, 1], &[]).await;
    let client = cluster.client().await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16u64 {
        let c = client.clone();
        tasks.spawn(async move { run(c, request(20, i), &format!("load-{i}"), None).await });
    }
    let (mut done, mut waited) = (0, 0);
    while let Some(joined) = tasks.join_next().await {
        let (result, seen) = joined.expect("task").unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(result.png.len(), 1);
        done += 1;
        if !seen.queue_positions.is_empty() {
            waited += 1;
        }
    }
    assert_eq!(done, 16);
    assert!(
        waited >= 1,
        "16 requests on a denoiser of capacity 4: some must have waited (and been told their place)"
    );
}

#[tokio::test]
async fn a_full_gateway_queue_refuses_at_once_and_the_admitted_complete() {
    let cluster = Cluster::start([1, 1, 1], &["--max-queued", "4"]).await;
    let client = cluster.client().await;
    // The first four are admitted and are denoising before the others arrive.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut admitted = tokio::task::JoinSet::new();
    for i in 0..4u64 {
        let (c, tx) = (client.clone(), tx.clone());
        admitted
            .spawn(async move { run(c, request(200, i), &format!("q-{i}"), Some((1, tx))).await });
    }
    for _ in 0..4 {
        rx.recv()
            .await
            .expect("every admitted request starts denoising");
    }
    let mut refused = tokio::task::JoinSet::new();
    for i in 4..12u64 {
        let c = client.clone();
        refused.spawn(async move {
            let started = Instant::now();
            let r = run(c, request(200, i), &format!("q-{i}"), None).await;
            (r, started.elapsed())
        });
    }
    // Each later request either completes (a place freed in time) or is refused at once.
    let (mut slowest_refusal, mut refusals) = (Duration::ZERO, 0);
    while let Some(joined) = refused.join_next().await {
        let (r, took) = joined.expect("task");
        let Err(e) = r else { continue };
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            qwen_image_common::status::retry_after(&e).is_some(),
            "retry-after-ms is set: {e:?}"
        );
        slowest_refusal = slowest_refusal.max(took);
        refusals += 1;
    }
    assert!(
        refusals >= 1,
        "8 more requests while 4 long ones fill the gateway: some are refused"
    );
    let started = Instant::now();
    while let Some(joined) = admitted.join_next().await {
        let (result, _) = joined.expect("task").unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(result.png.len(), 1);
    }
    let rest_of_admitted = started.elapsed();
    assert!(
        slowest_refusal < Duration::from_secs(2),
        "refusals come at once, not after waiting: {slowest_refusal:?} (admitted needed {rest_of_admitted:?} more)"
    );
    // A place is free again: a new request is admitted and completes.
    let (result, _) = run(client, request(4, 99), "q-after", None)
        .await
        .expect("admitted once the queue has room");
    assert_eq!(result.png.len(), 1);
}

/// Which stage loses a replica.
#[derive(Debug, Clone, Copy)]
enum Victim {
    TextEncoder,
    Denoiser,
    Vae,
}

/// Two replicas of `victim`'s stage; `n` requests run, one replica is killed with SIGKILL once every
/// request is past step 8 (a checkpoint at step 5 is behind it), more requests arrive after; every request completes and its PNG is byte for byte
/// the one the same request gives undisturbed. The gateway's own health checks are slowed down so that it
/// is the failed call itself that discovers the dead replica.
async fn survives_a_killed_replica(victim: Victim) {
    let replicas = match victim {
        Victim::TextEncoder => [2, 1, 1],
        Victim::Denoiser => [1, 2, 1],
        Victim::Vae => [1, 1, 2],
    };
    let mut cluster = Cluster::start(replicas, &["--health-interval-ms", "60000"]).await;
    let client = cluster.client().await;
    let steps = 300;
    // Denoiser: a replica runs one loop at a time (the others wait in its queue); two requests go one to
    // each replica (fewest calls in flight), so the killed one has a loop past its first checkpoint.
    let (first_wave, second_wave) = match victim {
        Victim::Denoiser => (2u64, 4u64),
        _ => (4u64, 4u64),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..first_wave {
        let (c, tx) = (client.clone(), tx.clone());
        tasks.spawn(async move {
            let id = format!("fault-{i}");
            (i, run(c, request(steps, i), &id, Some((8, tx))).await)
        });
    }
    for _ in 0..first_wave {
        rx.recv().await.expect("every request is denoising");
    }
    let killed = match victim {
        Victim::TextEncoder => &mut cluster.text_encoder[0],
        Victim::Denoiser => &mut cluster.denoiser[0],
        Victim::Vae => &mut cluster.vae[0],
    };
    killed.kill().await.expect("kill -9");
    // Prompt encodes (text encoder) happen at the start of a request: a second wave meets the dead one.
    for i in first_wave..first_wave + second_wave {
        let c = client.clone();
        tasks.spawn(async move {
            let id = format!("fault-{i}");
            (i, run(c, request(steps, i), &id, None).await)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, r) = joined.expect("task");
        let (result, _) = r.unwrap_or_else(|e| panic!("{victim:?}: request {i} failed: {e:?}"));
        results.push((i, result));
    }
    let stage = match victim {
        Victim::TextEncoder => "text-encoder",
        Victim::Denoiser => "denoiser",
        Victim::Vae => "vae",
    };
    let failovers = cluster
        .gateway
        .log_lines()
        .iter()
        .filter(|l| l.contains("running it on another") && l.contains(stage))
        .count();
    assert!(
        failovers >= 1,
        "{victim:?}: some call was on the killed replica and was run again elsewhere"
    );
    if let Victim::Denoiser = victim {
        // Each request was past step 8 when the replica died; the ones on it resume from their last
        // checkpoint latents (every 5 steps) instead of step 1.
        let resumed = cluster
            .gateway
            .log_lines()
            .iter()
            .filter(|l| l.contains("resuming the denoising loop from checkpoint latents"))
            .count();
        assert!(
            resumed >= 1,
            "a denoising loop on the killed replica resumed from its checkpoint latents"
        );
    }
    // The same requests undisturbed (on the surviving replicas): the same bytes.
    let results = Arc::new(results);
    for (i, disturbed) in results.iter() {
        let (again, _) = run(
            client.clone(),
            request(steps, *i),
            &format!("fault-{i}"),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{victim:?}: undisturbed run {i}: {e:?}"));
        assert_eq!(
            disturbed.png, again.png,
            "{victim:?}: request {i} gives the same PNG bytes with and without the failure"
        );
    }
}

#[tokio::test]
async fn a_killed_denoiser_replica_is_replaced_with_identical_results() {
    survives_a_killed_replica(Victim::Denoiser).await;
}

#[tokio::test]
async fn a_killed_text_encoder_replica_is_replaced_with_identical_results() {
    survives_a_killed_replica(Victim::TextEncoder).await;
}

#[tokio::test]
async fn a_killed_vae_replica_is_replaced_with_identical_results() {
    survives_a_killed_replica(Victim::Vae).await;
}
