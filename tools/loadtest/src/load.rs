//! Clients: text-to-image requests on the demo model's 64x64 size, each timed from the call to its
//! result, with the status code of every failure.

use std::time::{Duration, Instant};

use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::{
    GenerationSettings, Stage as ProgressStage, TextToImageRequest, generate_event,
};
use tokio::sync::mpsc;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Deadline of one request (sent as `grpc-timeout`): queueing for the gateway's slots included.
const REQUEST_DEADLINE: Duration = Duration::from_secs(900);

/// The step after which a request counts as denoising (for the fault scenarios).
pub const DENOISING_AT: u32 = 8;

/// What one request gave.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The seed (it names the request: same seed, same PNG).
    pub seed: u64,
    pub latency: Duration,
    /// The PNG bytes, or the failure's code and message.
    pub result: Result<Vec<u8>, (Code, String)>,
}

/// The request every client sends: CFG 4 with the negative prompt " ", 64x64 (the demo model's size).
pub fn request(steps: u32, seed: u64) -> TextToImageRequest {
    const COLOURS: [&str; 6] = ["red", "blue", "green", "purple", "orange", "grey"];
    const POSES: [&str; 4] = ["running", "jumping", "kicking", "waving"];
    TextToImageRequest {
        settings: Some(GenerationSettings {
            prompt: format!(
                "a {} stick figure {} on a sky blue background, with the sun",
                COLOURS[seed as usize % COLOURS.len()],
                POSES[seed as usize % POSES.len()]
            ),
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

/// Runs one request to its result. `x-request-id` is fixed by the seed so that the PNG's metadata (and
/// so its bytes) is the same on every run. `denoising` is told once the denoiser has reported step
/// [`DENOISING_AT`] (past the gateway's first checkpoint latents, at step 5).
pub async fn run(
    client: ImageGeneratorClient<Channel>,
    steps: u32,
    seed: u64,
    denoising: Option<mpsc::UnboundedSender<()>>,
) -> Outcome {
    let started = Instant::now();
    let result = call(client, steps, seed, denoising).await;
    Outcome {
        seed,
        latency: started.elapsed(),
        result: result.map_err(|s| (s.code(), s.message().to_string())),
    }
}

async fn call(
    mut client: ImageGeneratorClient<Channel>,
    steps: u32,
    seed: u64,
    mut denoising: Option<mpsc::UnboundedSender<()>>,
) -> Result<Vec<u8>, Status> {
    let mut r = Request::new(request(steps, seed));
    r.set_timeout(REQUEST_DEADLINE);
    let id: MetadataValue<Ascii> = format!("loadtest-{seed}")
        .parse()
        .map_err(|_| Status::internal("request id is not ASCII"))?;
    r.metadata_mut().insert("x-request-id", id);
    let mut stream = client.text_to_image(r).await?.into_inner();
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(generate_event::Event::Progress(p))
                if p.stage == ProgressStage::Denoise as i32 && p.step >= DENOISING_AT =>
            {
                if let Some(tx) = denoising.take() {
                    let _ = tx.send(());
                }
            }
            Some(generate_event::Event::Result(r)) => {
                return r
                    .png
                    .into_iter()
                    .next()
                    .map(|b| b.to_vec())
                    .ok_or_else(|| Status::internal("a result without a PNG"));
            }
            _ => {}
        }
    }
    Err(Status::internal("the stream ended without a result"))
}

/// How long each client keeps sending, one request after the other.
#[derive(Debug, Clone, Copy)]
pub enum Bound {
    /// This many requests per client.
    Requests(usize),
    /// New requests until this instant (the last one runs to its end).
    Until(Instant),
}

/// `clients` clients sending requests back to back; seeds `seed0`, `seed0 + 1`, ... in order of sending.
/// Every client's first request reports on `denoising` when it starts denoising.
pub async fn clients(
    client: &ImageGeneratorClient<Channel>,
    clients: usize,
    bound: Bound,
    steps: u32,
    seed0: u64,
    denoising: Option<mpsc::UnboundedSender<()>>,
) -> Vec<Outcome> {
    let next_seed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(seed0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (c, seeds, tx) = (client.clone(), next_seed.clone(), denoising.clone());
        tasks.spawn(async move {
            let mut tx = tx;
            let mut out = Vec::new();
            loop {
                let more = match bound {
                    Bound::Requests(n) => out.len() < n,
                    Bound::Until(t) => Instant::now() < t,
                };
                if !more {
                    break;
                }
                let seed = seeds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                out.push(run(c.clone(), steps, seed, tx.take()).await);
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(mut v) = joined {
            all.append(&mut v);
        }
    }
    all
}
