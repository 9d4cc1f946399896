//! The real denoiser on 127.0.0.1:0 with the tiny fixture snapshot, called through the generated client.

use std::time::Duration;

use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::stage::{StageDef, StageError};
use qwen_image_denoiser::{Denoiser, DenoiserConfig, SERVICE_NAME, Stats, run};
use qwen_image_proto::v1::denoise_event::Event;
use qwen_image_proto::v1::denoiser_client::DenoiserClient;
use qwen_image_proto::v1::{DataType, DenoiseEvent, DenoiseRequest, DenoiseResult, Tensor};
use qwen_image_testkit::service::{InProcess, health, wait_serving};
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny");
/// Guard against a hung test; never used to wait for something to happen.
const GUARD: Duration = Duration::from_secs(120);

struct Harness {
    service: InProcess<StageError>,
    channel: Channel,
    stats: Stats,
}

impl Harness {
    async fn start(queue_capacity: usize) -> Self {
        let mut config = Denoiser::config(format!("{FIXTURES}/snapshot"));
        config.queue_capacity = queue_capacity;
        Self::start_config(config).await
    }

    async fn start_config(config: DenoiserConfig) -> Self {
        let stats = config.stats.clone();
        let service = InProcess::start(|l, stop| run(config, l, stop)).await;
        wait_serving(&service.url(), SERVICE_NAME, GUARD)
            .await
            .expect("SERVING in time");
        let channel = service.channel();
        Self {
            service,
            channel,
            stats,
        }
    }

    fn client(&self) -> DenoiserClient<Channel> {
        DenoiserClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    async fn health(&self) -> i32 {
        health(&self.service.url(), SERVICE_NAME)
            .await
            .expect("check")
    }

    async fn shutdown(self) {
        drop(self.channel);
        let result = self.service.stop().await;
        assert!(result.is_ok(), "run returned {result:?}");
    }
}

/// Reference tensors dumped by diffusers for the t2i_64 fixture.
struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn load(name: &str) -> Self {
        Self {
            bytes: std::fs::read(format!("{FIXTURES}/refs/{name}/tensors.safetensors"))
                .expect("fixture"),
        }
    }

    fn tensor(&self, name: &str) -> Tensor {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).expect("safetensors");
        let v = st.tensor(name).expect("tensor in fixture");
        assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}");
        Tensor {
            dtype: DataType::F32 as i32,
            shape: v.shape().iter().map(|&d| d as u64).collect(),
            data: v.data().to_vec().into(),
        }
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn t2i_request(reference: &Reference, steps: u32) -> DenoiseRequest {
    DenoiseRequest {
        prompt_embeds: Some(reference.tensor("prompt_embeds")),
        negative_prompt_embeds: Some(reference.tensor("negative_prompt_embeds")),
        true_cfg_scale: 4.0,
        latents: Some(reference.tensor("rng.0")),
        steps,
        ..Default::default()
    }
}

/// A request that runs for a long time on the tiny model: 1000 steps on a 64x64 latent grid (1024 tokens).
fn long_request(reference: &Reference) -> DenoiseRequest {
    let mut r = t2i_request(reference, 1000);
    r.latents = Some(qwen_image_common::tensor::from_f32(
        &[1, 16, 64, 64],
        &vec![0.5; 16 * 64 * 64],
    ));
    r
}

/// Reads the stream to its end: the progress events and the result.
async fn collect(
    stream: Streaming<DenoiseEvent>,
) -> Result<(Vec<(u32, u32)>, DenoiseResult), tonic::Status> {
    collect_with_previews(stream).await.map(|(p, _, r)| (p, r))
}

/// Like [`collect`], also returning the steps that carried preview latents.
async fn collect_with_previews(
    mut stream: Streaming<DenoiseEvent>,
) -> Result<(Vec<(u32, u32)>, Vec<u32>, DenoiseResult), tonic::Status> {
    let mut progress = Vec::new();
    let mut previews = Vec::new();
    let mut result = None;
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(Event::Progress(p)) => {
                if let Some(t) = &p.preview_latents {
                    assert_eq!(t.shape, vec![1, 16, 1, 8, 8], "preview shape");
                    previews.push(p.step);
                }
                progress.push((p.step, p.total_steps));
            }
            Some(Event::Result(r)) => result = Some(r),
            None => panic!("empty event"),
        }
    }
    Ok((progress, previews, result.expect("a result event")))
}

/// Waits for the first progress event of a running stream.
async fn first_progress(stream: &mut Streaming<DenoiseEvent>) {
    let ev = tokio::time::timeout(GUARD, stream.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("an event");
    assert!(
        matches!(ev.event, Some(Event::Progress(_))),
        "first event is progress"
    );
}

#[tokio::test]
async fn final_latents_match_diffusers() {
    let h = Harness::start(2).await;
    let reference = Reference::load("t2i_64");
    let mut req = t2i_request(&reference, 4);
    req.preview_every_n_steps = 3;
    let stream = h
        .client()
        .denoise(req)
        .await
        .expect("admitted")
        .into_inner();
    let (progress, previews, result) = tokio::time::timeout(GUARD, collect_with_previews(stream))
        .await
        .expect("in time")
        .expect("ok");
    assert_eq!(previews, vec![3, 4], "every 3rd step and the last");
    assert_eq!(progress, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    assert_eq!(result.sigmas.len(), 5);
    let latents = result.latents.expect("latents");
    assert_eq!(latents.shape, vec![1, 16, 1, 8, 8]);
    let ours = f32s(&latents);

    // latents_final_packed [1, 16, 64] -> [1, 16, 1, 8, 8]: packed[y*4+x, c*4+dy*2+dx] = lat[c, 2y+dy, 2x+dx]
    let packed = f32s(&reference.tensor("latents_final_packed"));
    let mut expected = vec![0f32; 16 * 64];
    for c in 0..16 {
        for yy in 0..8 {
            for xx in 0..8 {
                let (y, dy, x, dx) = (yy / 2, yy % 2, xx / 2, xx % 2);
                expected[c * 64 + yy * 8 + xx] = packed[(y * 4 + x) * 64 + c * 4 + dy * 2 + dx];
            }
        }
    }
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = ours
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-3 * scale,
        "max abs diff {worst} vs max abs {scale}"
    );
    h.shutdown().await;
}

/// Packed `[1, 16, 64]` (4x4 tokens of 2x2 patches) -> unpacked `[1, 16, 1, 8, 8]` wire tensor.
fn unpack_8x8(packed: &Tensor) -> Tensor {
    let packed = f32s(packed);
    let mut out = vec![0f32; 16 * 64];
    for c in 0..16 {
        for yy in 0..8 {
            for xx in 0..8 {
                let (y, dy, x, dx) = (yy / 2, yy % 2, xx / 2, xx % 2);
                out[c * 64 + yy * 8 + xx] = packed[(y * 4 + x) * 64 + c * 4 + dy * 2 + dx];
            }
        }
    }
    qwen_image_common::tensor::from_f32(&[1, 16, 1, 8, 8], &out)
}

#[tokio::test]
async fn inpaint_blending_matches_diffusers() {
    let h = Harness::start(1).await;
    let reference = Reference::load("inpaint_64");
    // The dump numbers the steps that ran 0..=2. Strength 0.6 of 4 steps: t_start = int(4 - 2.4) = 1 (QwenImageInpaintPipeline.get_timesteps)
    let given = DenoiseRequest {
        prompt_embeds: Some(reference.tensor("prompt_embeds")),
        negative_prompt_embeds: Some(reference.tensor("negative_prompt_embeds")),
        true_cfg_scale: 4.0,
        latents: Some(unpack_8x8(&reference.tensor("latents_init_packed"))),
        steps: 4,
        start_step: 1,
        inpaint: Some(qwen_image_proto::v1::InpaintInputs {
            image_latents: Some(unpack_8x8(&reference.tensor("image_latents_packed"))),
            noise: Some(unpack_8x8(&reference.tensor("noise_packed"))),
            mask: Some(unpack_8x8(&reference.tensor("mask_packed"))),
        }),
        ..Default::default()
    };
    // The same run with the start latents computed by the service from the clean image latents and
    // `start_noise` (what the gateway sends).
    let from_image = DenoiseRequest {
        latents: Some(unpack_8x8(&reference.tensor("image_latents_packed"))),
        start_noise: Some(unpack_8x8(&reference.tensor("noise_packed"))),
        ..given.clone()
    };
    for (name, req) in [("given start latents", given), ("start_noise", from_image)] {
        let stream = h
            .client()
            .denoise(req)
            .await
            .expect("admitted")
            .into_inner();
        let (progress, result) = tokio::time::timeout(GUARD, collect(stream))
            .await
            .expect("in time")
            .expect("ok");
        assert_eq!(progress, vec![(1, 3), (2, 3), (3, 3)], "{name}");
        let ours = f32s(&result.latents.expect("latents"));
        let expected = f32s(&unpack_8x8(&reference.tensor("step.2.latents_end")));
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-3 * scale,
            "{name}: max abs diff {worst} vs max abs {scale}"
        );
    }
    h.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_get_invalid_argument_and_service_stays_healthy() {
    let h = Harness::start(2).await;
    let reference = Reference::load("t2i_64");
    let good = t2i_request(&reference, 2);
    let embeds = reference.tensor("prompt_embeds");
    let mut cases: Vec<(&str, DenoiseRequest)> = Vec::new();

    let mut r = good.clone();
    r.prompt_embeds = Some(Tensor {
        dtype: DataType::F16 as i32,
        ..embeds.clone()
    });
    cases.push(("dtype", r));
    let mut r = good.clone();
    r.prompt_embeds = Some(Tensor {
        shape: vec![22, 32],
        ..embeds.clone()
    });
    cases.push(("rank", r));
    let mut r = good.clone();
    r.prompt_embeds = Some(Tensor {
        shape: vec![1, 11, 64],
        ..embeds.clone()
    });
    cases.push(("embedding width", r));
    let mut r = good.clone();
    r.prompt_embeds = Some(Tensor {
        data: embeds.data.slice(..embeds.data.len() - 4),
        ..embeds.clone()
    });
    cases.push(("byte length", r));
    let mut r = good.clone();
    r.latents = Some(Tensor {
        shape: vec![1, 16, 1, 1, 64],
        ..reference.tensor("rng.0")
    });
    cases.push(("odd latent height", r));
    let mut r = good.clone();
    r.steps = 0;
    cases.push(("zero steps", r));
    let mut r = good.clone();
    r.steps = 1001;
    cases.push(("too many steps", r));
    let mut r = good.clone();
    r.true_cfg_scale = -1.0;
    cases.push(("negative cfg", r));

    for (what, req) in cases {
        let err = h.client().denoise(req).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(!err.message().is_empty(), "{what}");
    }
    assert_eq!(h.health().await, ServingStatus::Serving as i32);
    two_steps_complete(&h, &reference).await;
    h.shutdown().await;
}

/// A 2-step request is admitted and completes (the stage has a free slot).
async fn two_steps_complete(h: &Harness, reference: &Reference) {
    let stream = h
        .client()
        .denoise(t2i_request(reference, 2))
        .await
        .expect("admitted: a slot is free")
        .into_inner();
    let (progress, _) = tokio::time::timeout(GUARD, collect(stream))
        .await
        .expect("in time")
        .expect("ok");
    assert_eq!(progress.len(), 2);
}

#[tokio::test]
async fn full_queue_gets_resource_exhausted_and_cancel_frees_the_slot() {
    let h = Harness::start(1).await;
    let reference = Reference::load("t2i_64");
    let mut stats = h.stats.subscribe();

    let mut long = h
        .client()
        .denoise(long_request(&reference))
        .await
        .expect("admitted")
        .into_inner();
    first_progress(&mut long).await;

    let err = h
        .client()
        .denoise(t2i_request(&reference, 2))
        .await
        .expect_err("queue is full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        qwen_image_common::status::retry_after(&err).is_some(),
        "retry hint in metadata"
    );

    drop(long); // the caller goes away
    let snap = tokio::time::timeout(GUARD, stats.wait_for(|s| s.jobs_cancelled == 1))
        .await
        .expect("cancel observed in time")
        .expect("stats alive")
        .clone();
    assert!(snap.steps_run < 1000, "the loop stopped early: {snap:?}");
    eprintln!("cancelled after {} steps", snap.steps_run);
    assert_eq!(snap.jobs_finished, 0);

    // The slot is free again: the next request is admitted and completes.
    two_steps_complete(&h, &reference).await;
    h.shutdown().await;
}

/// A request larger than the message limit: the stage answers OUT_OF_RANGE once it has read it.
fn oversized_request() -> DenoiseRequest {
    DenoiseRequest {
        latents: Some(Tensor {
            dtype: DataType::F32 as i32,
            shape: vec![1, 16, 1, 1, 1],
            data: vec![0u8; MAX_MESSAGE_BYTES + 1024].into(),
        }),
        steps: 2,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_full_stage_refuses_a_call_before_reading_its_message() {
    let h = Harness::start(1).await;
    let reference = Reference::load("t2i_64");
    // The client may send more than the stage accepts.
    let big_client = || h.client().max_encoding_message_size(usize::MAX);

    let mut long = h
        .client()
        .denoise(long_request(&reference))
        .await
        .expect("admitted")
        .into_inner();
    first_progress(&mut long).await;

    // Queue full: refused at once, before the oversized message is read (reading it would give OUT_OF_RANGE).
    let err = big_client()
        .denoise(oversized_request())
        .await
        .expect_err("queue is full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(qwen_image_common::status::retry_after(&err).is_some());
    // Describe and health never take a slot.
    assert_eq!(h.health().await, ServingStatus::Serving as i32);

    drop(long);
    let mut stats = h.stats.subscribe();
    tokio::time::timeout(GUARD, stats.wait_for(|s| s.jobs_cancelled == 1))
        .await
        .expect("cancel observed in time")
        .expect("stats alive");
    // With a free slot the same call is read, and refused for its size; the refused call frees its slot.
    let err = big_client()
        .denoise(oversized_request())
        .await
        .expect_err("too large");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    two_steps_complete(&h, &reference).await;
    h.shutdown().await;
}

#[tokio::test]
async fn deadline_stops_the_loop_with_deadline_exceeded() {
    let h = Harness::start(1).await;
    let reference = Reference::load("t2i_64");
    let mut req = tonic::Request::new(long_request(&reference));
    req.set_timeout(Duration::from_millis(300));
    let stream = h
        .client()
        .denoise(req)
        .await
        .expect("admitted")
        .into_inner();
    let err = tokio::time::timeout(GUARD, collect(stream))
        .await
        .expect("in time")
        .expect_err("deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // The worker books the job after answering; shutting down joins it, so read the counters after.
    let stats = h.stats.clone();
    h.shutdown().await;
    assert_eq!(stats.snapshot().jobs_deadline_exceeded, 1);
    assert!(stats.snapshot().steps_run < 1000);
}

#[tokio::test]
async fn missing_snapshot_is_a_startup_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let config = Denoiser::config(format!("{FIXTURES}/no-such-snapshot"));
    let result = qwen_image_denoiser::run(config, listener, std::future::pending()).await;
    assert!(matches!(result, Err(StageError::Config(_))), "{result:?}");
}

#[tokio::test]
async fn shutdown_drains_in_flight_streams() {
    let mut h = Harness::start(1).await;
    let reference = Reference::load("t2i_64");
    let mut req = long_request(&reference);
    req.steps = 10;
    let mut stream = h
        .client()
        .denoise(req)
        .await
        .expect("admitted")
        .into_inner();
    first_progress(&mut stream).await;
    h.service.signal_stop();
    // The in-flight stream still runs to its result.
    let (progress, result) = tokio::time::timeout(GUARD, collect(stream))
        .await
        .expect("in time")
        .expect("ok");
    assert_eq!(progress.len(), 9, "the remaining steps after the first");
    assert!(result.latents.is_some());
    eprintln!("drained a job of {} ms", result.elapsed_ms);
    h.shutdown().await;
}

/// `packed [1, S, 4C]` → `[1, C, 1, h, w]` (diffusers `_unpack_latents` for one frame).
fn unpack_host(packed: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0; c * h * w];
    for y in 0..h / 2 {
        for x in 0..w / 2 {
            for ch in 0..c {
                for dy in 0..2 {
                    for dx in 0..2 {
                        out[ch * h * w + (2 * y + dy) * w + 2 * x + dx] =
                            packed[(y * (w / 2) + x) * 4 * c + ch * 4 + dy * 2 + dx];
                    }
                }
            }
        }
    }
    out
}

/// The fixture's ControlNet as an inpainting ControlNet (extra_condition_channels 4) whose four mask inputs
/// have zero weights: it must give exactly what the union net gives, whatever the mask.
fn zero_mask_inpainting_net(dir: &std::path::Path) {
    let src = std::fs::read(format!(
        "{FIXTURES}/snapshot/controlnet/diffusion_pytorch_model.safetensors"
    ))
    .expect("fixture weights");
    let st = safetensors::SafeTensors::deserialize(&src).expect("safetensors");
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let (shape, data) = (view.shape().to_vec(), view.data().to_vec());
        if name == "controlnet_x_embedder.weight" {
            let (rows, cols) = (shape[0], shape[1]);
            let mut wide = Vec::with_capacity(rows * (cols + 4) * 4);
            for r in 0..rows {
                wide.extend_from_slice(&data[r * cols * 4..(r + 1) * cols * 4]);
                wide.extend_from_slice(&[0u8; 16]);
            }
            owned.push((name, vec![rows, cols + 4], wide));
        } else {
            owned.push((name, shape, data));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, s, d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                .expect("view");
            (n.clone(), v)
        })
        .collect();
    std::fs::create_dir_all(dir).expect("dir");
    safetensors::serialize_to_file(
        views,
        None,
        &dir.join("diffusion_pytorch_model.safetensors"),
    )
    .expect("write weights");
    let cfg = std::fs::read_to_string(format!("{FIXTURES}/snapshot/controlnet/config.json"))
        .expect("config")
        .replace(
            "\"extra_condition_channels\": 0",
            "\"extra_condition_channels\": 4",
        );
    assert!(cfg.contains("\"extra_condition_channels\": 4"));
    std::fs::write(dir.join("config.json"), cfg).expect("write config");
}

/// The denoiser with `--controlnet union=... --controlnet inpaint=...` reproduces diffusers' ControlNet loop
/// (refs/controlnet_64: its noise, prompt embeddings and unpacked control latents), the inpainting variant
/// takes the mask as a 17th channel, and ControlInput mistakes are answered with clear statuses.
#[tokio::test]
async fn controlnet_inputs_reproduce_diffusers_and_take_the_inpaint_mask() {
    use qwen_image_denoiser::ControlNetSpec;
    use qwen_image_proto::v1::ControlInput;

    let tmp = std::env::temp_dir().join(format!("qwen-image-cn-inpaint-{}", std::process::id()));
    zero_mask_inpainting_net(&tmp);
    let mut config = Denoiser::config(format!("{FIXTURES}/snapshot"));
    config.own.controlnets = vec![
        ControlNetSpec {
            id: "union".into(),
            dir: format!("{FIXTURES}/snapshot/controlnet").into(),
        },
        ControlNetSpec {
            id: "inpaint".into(),
            dir: tmp.clone(),
        },
    ];
    let h = Harness::start_config(config).await;
    let r = Reference::load("controlnet_64");
    let (c, lh, lw) = (16, 8, 8);
    let cond = unpack_host(
        &f32s(&r.tensor("step.0.controlnet.0.controlnet_cond")),
        c,
        lh,
        lw,
    );
    let control = |id: &str, mask: Option<Vec<f32>>| ControlInput {
        controlnet_id: id.into(),
        control_latents: Some(qwen_image_common::tensor::from_f32(
            &[1, c, 1, lh, lw],
            &cond,
        )),
        conditioning_scale: 0.8,
        mask: mask.map(|m| qwen_image_common::tensor::from_f32(&[1, 1, lh, lw], &m)),
        ..Default::default()
    };
    let mut req = DenoiseRequest {
        latents: Some(r.tensor("rng.1")),
        ..t2i_request(&r, 3)
    };
    req.control = vec![control("union", None)];
    let (_, union) = collect(
        h.client()
            .denoise(req.clone())
            .await
            .expect("admitted")
            .into_inner(),
    )
    .await
    .expect("union result");
    let ours = f32s(union.latents.as_ref().expect("latents"));
    let theirs = unpack_host(&f32s(&r.tensor("step.2.latents_end")), c, lh, lw);
    let max = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max < 1e-3, "final latents differ from diffusers by {max}");

    let mask: Vec<f32> = (0..lh * lw).map(|i| ((i / 3) % 2) as f32).collect();
    let mut inpaint = req.clone();
    inpaint.control = vec![control("inpaint", Some(mask.clone()))];
    let (_, masked) = collect(
        h.client()
            .denoise(inpaint.clone())
            .await
            .expect("admitted")
            .into_inner(),
    )
    .await
    .expect("inpaint result");
    let diff = f32s(masked.latents.as_ref().expect("latents"))
        .iter()
        .zip(&ours)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff < 1e-5,
        "zero-weight mask channels changed the result by {diff}"
    );

    let code =
        |req: DenoiseRequest| async { h.client().denoise(req).await.expect_err("rejected").code() };
    inpaint.control = vec![control("inpaint", None)];
    assert_eq!(code(inpaint.clone()).await, Code::InvalidArgument);
    inpaint.control = vec![control("union", Some(mask))];
    assert_eq!(code(inpaint.clone()).await, Code::InvalidArgument);
    inpaint.control = vec![control("", None)];
    assert_eq!(code(inpaint.clone()).await, Code::FailedPrecondition);
    inpaint.control = vec![control("depth", None)];
    let e = h.client().denoise(inpaint).await.expect_err("unknown net");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("[\"union\", \"inpaint\"]"),
        "{}",
        e.message()
    );
    assert_eq!(h.health().await, ServingStatus::Serving as i32);
    h.shutdown().await;
    let _ = std::fs::remove_dir_all(&tmp);
}
