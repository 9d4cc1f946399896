//! Continuous batching through the real denoiser (tiny fixture snapshot, 127.0.0.1:0): requests batched
//! together (different prompt lengths, masks, steps and CFG scales, one joining mid-way, one cancelled)
//! end with the final latents each gets alone from a denoiser that does not batch (`--max-batch 1`).
//!
//! No timing decides what is batched: a long `--batch-wait-ms` holds the first request until the batch is
//! full, and a request whose progress events are not read holds the batch until the test has sent the
//! request that joins it (it asks for a 64 KiB preview every step: its unread stream fills the bounded
//! event buffer and the HTTP/2 window, a few MiB, long before its 100 steps are done).

use std::time::Duration;

use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::stage::{StageDef, StageError};
use qwen_image_common::tensor::from_f32;
use qwen_image_denoiser::{Denoiser, SERVICE_NAME, Stats, run};
use qwen_image_proto::v1::denoise_event::Event;
use qwen_image_proto::v1::denoiser_client::DenoiserClient;
use qwen_image_proto::v1::{DenoiseEvent, DenoiseRequest, Tensor};
use qwen_image_testkit::service::{InProcess, wait_serving};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const SNAPSHOT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tiny/snapshot"
);
/// Guard against a hung test; never used to wait for something to happen.
const GUARD: Duration = Duration::from_secs(120);
/// Holds a new batch until it is full (the tests fill every batch they start).
const FILL_WAIT_MS: u64 = 600_000;
/// The tiny transformer's text width.
const TEXT_DIM: usize = 32;
/// Latent grid side (a 256x256 picture): 16 channels x 32 x 32 f32 = 64 KiB per preview.
const SIDE: usize = 32;

struct Server {
    service: InProcess<StageError>,
    stats: Stats,
}

impl Server {
    async fn start(max_batch: u32, batch_wait_ms: u64) -> Self {
        let mut config = Denoiser::config(SNAPSHOT);
        config.queue_capacity = 8;
        config.own.batching.max_batch = max_batch;
        config.own.batching.batch_wait_ms = batch_wait_ms;
        let stats = config.stats.clone();
        let service = InProcess::start(|l, stop| run(config, l, stop)).await;
        wait_serving(&service.url(), SERVICE_NAME, GUARD)
            .await
            .expect("SERVING in time");
        Self { service, stats }
    }

    fn client(&self) -> DenoiserClient<Channel> {
        DenoiserClient::new(self.service.channel())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    async fn open(&self, req: &DenoiseRequest) -> Streaming<DenoiseEvent> {
        self.client()
            .denoise(req.clone())
            .await
            .expect("admitted")
            .into_inner()
    }

    async fn stop(self) {
        assert!(self.service.stop().await.is_ok());
    }
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn embeds(seed: u64, len: usize) -> Tensor {
    from_f32(&[1, len, TEXT_DIM], &values(seed, len * TEXT_DIM))
}

/// A text-to-image request on a [`SIDE`]-cell latent grid: `prompt` tokens (the last `padded` of them masked
/// out), a `negative` prompt of that many tokens (0 = none), `steps` and true-CFG `scale`.
fn request(
    seed: u64,
    prompt: usize,
    padded: usize,
    negative: usize,
    steps: u32,
    scale: f32,
) -> DenoiseRequest {
    let mask = (padded > 0).then(|| {
        let m: Vec<f32> = (0..prompt)
            .map(|i| if i < prompt - padded { 1.0 } else { 0.0 })
            .collect();
        from_f32(&[1, prompt], &m)
    });
    DenoiseRequest {
        prompt_embeds: Some(embeds(seed, prompt)),
        prompt_embeds_mask: mask,
        negative_prompt_embeds: (negative > 0).then(|| embeds(seed + 1, negative)),
        true_cfg_scale: scale,
        latents: Some(from_f32(
            &[1, 16, SIDE, SIDE],
            &values(seed + 2, 16 * SIDE * SIDE),
        )),
        steps,
        ..Default::default()
    }
}

/// Reads a stream to its end; the final latents and the number of progress events.
async fn finish(mut stream: Streaming<DenoiseEvent>) -> Result<(Vec<f32>, usize), tonic::Status> {
    let read = async {
        let mut steps = 0;
        let mut latents = None;
        while let Some(ev) = stream.message().await? {
            match ev.event {
                Some(Event::Progress(_)) => steps += 1,
                Some(Event::Result(r)) => latents = r.latents,
                None => panic!("empty event"),
            }
        }
        let t: Tensor = latents.expect("a result event");
        let v = t
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((v, steps))
    };
    tokio::time::timeout(GUARD, read).await.expect("in time")
}

/// `r` with a preview every step: unread, its stream holds the batch within a few dozen steps.
fn holding(mut r: DenoiseRequest) -> DenoiseRequest {
    r.preview_every_n_steps = 1;
    r
}

/// The final latents of each request run alone, one after the other, on a denoiser that does not batch.
async fn alone(requests: &[&DenoiseRequest]) -> Vec<Vec<f32>> {
    let server = Server::start(1, 0).await;
    let mut out = Vec::new();
    for r in requests {
        out.push(finish(server.open(r).await).await.expect("ok").0);
    }
    server.stop().await;
    out
}

/// max|a - b| / max|b|
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let worst = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max(f64::from((x - y).abs())));
    worst / scale.max(1e-12)
}

fn assert_same(name: &str, batched: &[f32], alone: &[f32]) {
    let r = rel(batched, alone);
    eprintln!("{name}: batched vs alone relative difference {r:e}");
    assert!(
        r <= 1e-5,
        "{name}: batched latents differ from alone by {r:e}"
    );
}

#[tokio::test]
async fn batched_requests_end_as_they_do_alone_and_one_joins_mid_way() {
    // Different prompt lengths, a masked prompt, no negative prompt, steps and CFG scales.
    let long = holding(request(1, 7, 0, 3, 100, 4.0));
    let short = request(2, 12, 4, 5, 4, 2.5);
    let plain = request(3, 5, 0, 0, 6, 1.0);
    let joiner = request(4, 9, 0, 9, 5, 6.0);
    let expected = alone(&[&long, &short, &plain, &joiner]).await;

    let server = Server::start(3, FILL_WAIT_MS).await;
    let mut stats = server.stats.subscribe();
    // The first request waits until all three are queued, then they run as one batch.
    let long_stream = server.open(&long).await;
    let (short_stream, plain_stream) = (server.open(&short).await, server.open(&plain).await);
    // `long` is not read yet: its stream holds the batch well before its last step, so it cannot end
    // before `joiner` is queued; the two others end at steps 4 and 6.
    let (short_out, short_steps) = finish(short_stream).await.expect("short ok");
    let (plain_out, plain_steps) = finish(plain_stream).await.expect("plain ok");
    assert_eq!((short_steps, plain_steps), (4, 6));
    assert_eq!(
        server.stats.snapshot().largest_batch,
        3,
        "the three ran together"
    );
    // `long` now runs alone; `joiner` joins it at a step boundary once `long` is read on.
    let joiner_stream = server.open(&joiner).await;
    let ((long_out, long_steps), (joiner_out, joiner_steps)) =
        tokio::try_join!(finish(long_stream), finish(joiner_stream)).expect("long and joiner ok");
    assert_eq!((long_steps, joiner_steps), (100, 5));
    let s = stats
        .wait_for(|s| s.jobs_finished == 4)
        .await
        .expect("stats alive")
        .clone();
    assert_eq!(s.steps_run, 100 + 4 + 6 + 5, "{s:?}");

    assert_same("long (100 steps, CFG 4)", &long_out, &expected[0]);
    assert_same(
        "short (4 steps, CFG 2.5, masked prompt)",
        &short_out,
        &expected[1],
    );
    assert_same("plain (6 steps, no CFG)", &plain_out, &expected[2]);
    assert_same(
        "joiner (5 steps, CFG 6, joined mid-way)",
        &joiner_out,
        &expected[3],
    );
    // The comparison can fail: different requests end differently.
    assert!(rel(&long_out, &joiner_out) > 1e-2);
    server.stop().await;
}

#[tokio::test]
async fn a_request_joins_a_running_batch_at_a_step_boundary() {
    let first = holding(request(5, 6, 0, 4, 100, 3.0));
    let second = request(6, 10, 0, 2, 6, 5.0);
    let expected = alone(&[&first, &second]).await;

    let server = Server::start(2, 0).await;
    let mut stats = server.stats.subscribe();
    let first_stream = server.open(&first).await;
    // `first` has started alone (and, unread, cannot finish before `second` is queued).
    stats
        .wait_for(|s| s.steps_run >= 1)
        .await
        .expect("stats alive");
    let second_stream = server.open(&second).await;
    let ((first_out, _), (second_out, _)) =
        tokio::try_join!(finish(first_stream), finish(second_stream)).expect("ok");
    assert_eq!(
        server.stats.snapshot().largest_batch,
        2,
        "second joined first's batch"
    );
    assert_same("first", &first_out, &expected[0]);
    assert_same("second (joined mid-way)", &second_out, &expected[1]);
    server.stop().await;
}

#[tokio::test]
async fn cancelling_one_request_of_a_batch_leaves_the_others_correct() {
    let a = request(7, 8, 0, 8, 8, 4.0);
    let b = holding(request(8, 4, 0, 6, 100, 3.0));
    let c = request(9, 11, 3, 0, 6, 1.0);
    let expected = alone(&[&a, &c]).await;

    let server = Server::start(3, FILL_WAIT_MS).await;
    let mut stats = server.stats.subscribe();
    let a_stream = server.open(&a).await;
    let mut b_stream = server.open(&b).await;
    let c_stream = server.open(&c).await;
    // `b` runs in the batch (its first step is done; unread, it holds the batch), then its caller goes
    // away.
    let first = tokio::time::timeout(GUARD, b_stream.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("an event");
    assert!(matches!(first.event, Some(Event::Progress(_))));
    drop(b_stream);
    let ((a_out, _), (c_out, _)) =
        tokio::try_join!(finish(a_stream), finish(c_stream)).expect("ok");
    let s = stats
        .wait_for(|s| s.jobs_finished == 2 && s.jobs_cancelled == 1)
        .await
        .expect("stats alive")
        .clone();
    assert_eq!(s.largest_batch, 3, "{s:?}");
    assert!(s.steps_run < 8 + 100 + 6, "b stopped early: {s:?}");
    assert_same("a", &a_out, &expected[0]);
    assert_same("c (masked prompt, no CFG)", &c_out, &expected[1]);
    server.stop().await;
}

#[tokio::test]
async fn the_batch_limit_is_described() {
    let server = Server::start(3, 0).await;
    let mut info =
        qwen_image_proto::v1::stage_info_client::StageInfoClient::new(server.service.channel());
    let d = info
        .describe(qwen_image_proto::v1::DescribeRequest::default())
        .await
        .expect("describe")
        .into_inner();
    let limits = d.limits.expect("limits");
    assert_eq!(limits.max_batched_requests, 3);
    // A request the batch cannot take still answers (here: a bad one is refused as before).
    let mut bad = request(1, 4, 0, 0, 4, 1.0);
    bad.steps = 0;
    bad.sigmas.clear();
    let err = server.client().denoise(bad).await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

/// Throughput of the denoiser alone on the default (demo) model, batching off (`--max-batch 1`) and on:
/// requests/min and p50/p99 latency at 1, 2, 4 and 8 concurrent clients (64x64 = an 8x8 latent grid,
/// 20 steps, true CFG 4, a 12-token prompt and a 4-token negative). Not a test: run it with
/// `cargo test -p qwen-image-denoiser --test batching -- --ignored --nocapture throughput`
/// (`BENCH_ROUNDS`, `BENCH_REQUESTS` per client per run, `BENCH_MAX_BATCH`). Rounds alternate which
/// server goes first; the table gives medians over rounds and the median per-round ratio on / off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: minutes of CPU"]
async fn throughput() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (rounds, per_client, max_batch) = (
        env("BENCH_ROUNDS", 3),
        env("BENCH_REQUESTS", 4),
        env("BENCH_MAX_BATCH", 4) as u32,
    );
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/qwen-image-demo");
    let start = |max_batch: u32| async move {
        let mut config = Denoiser::config(demo);
        config.queue_capacity = 16;
        config.own.batching.max_batch = max_batch;
        let service = InProcess::start(|l, stop| run(config, l, stop)).await;
        wait_serving(&service.url(), SERVICE_NAME, GUARD)
            .await
            .expect("SERVING in time");
        service
    };
    let servers = [start(1).await, start(max_batch).await];
    let req = |n: u64| {
        let mut r = DenoiseRequest {
            prompt_embeds: Some(from_f32(&[1, 12, 64], &values(n, 12 * 64))),
            negative_prompt_embeds: Some(from_f32(&[1, 4, 64], &values(n + 1, 4 * 64))),
            true_cfg_scale: 4.0,
            latents: Some(from_f32(&[1, 16, 8, 8], &values(n + 2, 16 * 64))),
            steps: 20,
            ..Default::default()
        };
        r.preview_every_n_steps = 0;
        r
    };
    let one_run = |url: String, clients: usize| async move {
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let mut client = DenoiserClient::new(qwen_image_testkit::service::channel(&url));
                let mut times = Vec::new();
                for i in 0..per_client {
                    let t = std::time::Instant::now();
                    let s = client
                        .denoise(req((c * 1000 + i) as u64))
                        .await
                        .expect("admitted")
                        .into_inner();
                    finish(s).await.expect("ok");
                    times.push(t.elapsed().as_secs_f64());
                }
                times
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.extend(t.await.expect("client"));
        }
        (
            times.len() as f64 * 60.0 / started.elapsed().as_secs_f64(),
            times,
        )
    };
    for s in &servers {
        one_run(s.url(), 1).await; // warm-up
    }
    let levels = [1usize, 2, 4, 8];
    let mut per_min = vec![vec![Vec::new(); levels.len()]; 2];
    let mut lat = vec![vec![Vec::new(); levels.len()]; 2];
    for round in 0..rounds {
        for (li, &clients) in levels.iter().enumerate() {
            for k in 0..2 {
                let si = (round + li + k) % 2;
                let (pm, times) = one_run(servers[si].url(), clients).await;
                eprintln!(
                    "round {round} clients {clients} max-batch {}: {pm:.0}/min",
                    [1, max_batch][si]
                );
                per_min[si][li].push(pm);
                lat[si][li].extend(times);
            }
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let quantile = |v: &[f64], q: f64| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
    };
    println!(
        "denoiser alone, default model, 64x64, 20 steps, CFG 4; {rounds} rounds x {per_client} requests per client"
    );
    println!(
        "| clients | --max-batch | requests/min | p50 latency | p99 latency | on / off requests/min |"
    );
    println!("|---|---|---|---|---|---|");
    for (li, &clients) in levels.iter().enumerate() {
        for si in 0..2 {
            let ratio = if si == 1 {
                let r: Vec<f64> = per_min[1][li]
                    .iter()
                    .zip(&per_min[0][li])
                    .map(|(on, off)| on / off)
                    .collect();
                format!("{:.2}x", median(&r))
            } else {
                String::new()
            };
            println!(
                "| {clients} | {} | {:.0} | {:.3} s | {:.3} s | {ratio} |",
                [1, max_batch][si],
                median(&per_min[si][li]),
                quantile(&lat[si][li], 0.5),
                quantile(&lat[si][li], 0.99)
            );
        }
    }
    for s in servers {
        assert!(s.stop().await.is_ok());
    }
}
