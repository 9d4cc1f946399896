//! The real text encoder on 127.0.0.1:0 with the tiny fixture snapshot, called through the generated client.

use std::time::Duration;

use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::stage::{StageDef, StageError};
use qwen_image_proto::v1::text_encoder_client::TextEncoderClient;
use qwen_image_proto::v1::{DataType, EncodeRequest, OverlongPromptPolicy};
use qwen_image_testkit::service::{InProcess, health, wait_not_serving};
use qwen_image_text_encoder::{SERVICE_NAME, TextEncoder, TextEncoderConfig, run};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny");
/// Guard against a hung test; never used to wait for something to happen.
const GUARD: Duration = Duration::from_secs(120);

struct Harness {
    service: InProcess<StageError>,
    channel: Channel,
}

impl Harness {
    async fn start() -> Self {
        Self::start_config(TextEncoder::config(format!("{FIXTURES}/snapshot"))).await
    }

    async fn start_config(config: TextEncoderConfig) -> Self {
        let service = InProcess::serving(|l, stop| run(config, l, stop)).await;
        let channel = service.channel();
        Self { service, channel }
    }

    fn client(&self) -> TextEncoderClient<Channel> {
        TextEncoderClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    async fn health(&self) -> i32 {
        health(&self.service.url(), SERVICE_NAME)
            .await
            .expect("health answers")
    }

    async fn shutdown(self) {
        drop(self.channel);
        let result = self.service.stop().await;
        assert!(result.is_ok(), "{result:?}");
    }
}

fn reference(name: &str) -> (Vec<u64>, Vec<f32>) {
    let bytes =
        std::fs::read(format!("{FIXTURES}/refs/textenc/tensors.safetensors")).expect("fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let v = st.tensor(name).expect("tensor");
    let data = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (v.shape().iter().map(|&d| d as u64).collect(), data)
}

#[tokio::test]
async fn embeddings_match_diffusers_and_bad_requests_are_rejected() {
    let h = Harness::start().await;
    let prompt = "A cat holding a sign that says hello world";
    let resp = h
        .client()
        .encode(EncodeRequest {
            prompts: vec![prompt.into()],
            ..Default::default()
        })
        .await
        .expect("encoded")
        .into_inner();
    let embeds = resp.prompt_embeds.expect("embeds");
    let (shape, expected) = reference("single.1.prompt_embeds");
    assert_eq!(embeds.dtype, DataType::F32 as i32);
    assert_eq!(embeds.shape, shape);
    let ours: Vec<f32> = embeds
        .data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = max_abs_diff(&ours, &expected);
    assert!(worst <= 1e-4 * scale.max(1.0), "max abs diff {worst}");
    let mask = resp.prompt_embeds_mask.expect("mask");
    assert_eq!(mask.dtype, DataType::U8 as i32);
    assert_eq!(mask.shape, vec![1, shape[1]]);
    assert!(resp.mask_all_ones);
    assert_eq!(resp.token_counts, vec![shape[1] as u32]);
    assert_eq!(resp.truncated, vec![false]);

    // Too long for max_sequence_length 4: rejected by default, truncated on request.
    let long = EncodeRequest {
        prompts: vec![prompt.into()],
        max_sequence_length: 4,
        ..Default::default()
    };
    let err = h.client().encode(long.clone()).await.expect_err("too long");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("TRUNCATE"), "{}", err.message());
    let cut = h
        .client()
        .encode(EncodeRequest {
            overlong_policy: OverlongPromptPolicy::Truncate as i32,
            ..long
        })
        .await
        .expect("truncated")
        .into_inner();
    assert_eq!(
        cut.prompt_embeds.expect("embeds").shape,
        vec![1, 4, shape[2]]
    );
    assert_eq!(cut.truncated, vec![true]);

    for bad in [
        EncodeRequest::default(),
        EncodeRequest {
            prompts: vec!["a".into()],
            max_sequence_length: 5000,
            ..Default::default()
        },
        EncodeRequest {
            prompts: vec!["a".into()],
            overlong_policy: 42,
            ..Default::default()
        },
    ] {
        let err = h.client().encode(bad).await.expect_err("invalid");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    let status = h.health().await;
    assert_eq!(status, ServingStatus::Serving as i32);
    h.shutdown().await;
}

#[tokio::test]
async fn an_expired_deadline_gets_deadline_exceeded() {
    let h = Harness::start().await;
    let mut req = tonic::Request::new(EncodeRequest {
        prompts: vec!["a cat".into()],
        ..Default::default()
    });
    req.set_timeout(Duration::from_nanos(1));
    let err = h.client().encode(req).await.expect_err("deadline");
    // Either our handler answers first (DEADLINE_EXCEEDED), or tonic's own grpc-timeout enforcement on
    // unary calls does (CANCELLED "Timeout expired", rust-stack.md §3.5): both end the call.
    let tonic_timeout = err.code() == Code::Cancelled && err.message() == "Timeout expired";
    assert!(
        err.code() == Code::DeadlineExceeded || tonic_timeout,
        "{err:?}"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn missing_snapshot_is_a_startup_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let result = run(
        TextEncoder::config(format!("{FIXTURES}/nope")),
        listener,
        std::future::pending(),
    )
    .await;
    assert!(matches!(result, Err(StageError::Config(_))), "{result:?}");
}

fn small_request() -> EncodeRequest {
    EncodeRequest {
        prompts: vec!["a cat".into()],
        ..Default::default()
    }
}

/// A job that panics (through the skeleton's test-only fault hook, which no flag or environment variable
/// reaches) gets INTERNAL; the worker goes on: the next request succeeds and health stays SERVING.
#[tokio::test]
async fn a_panicking_job_gets_internal_and_the_next_request_succeeds() {
    let config = TextEncoder::config(format!("{FIXTURES}/snapshot"));
    let faults = config.faults.clone();
    let stats = config.stats.clone();
    let h = Harness::start_config(config).await;
    faults.panic_next_job();
    let err = h
        .client()
        .encode(small_request())
        .await
        .expect_err("the job panicked");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        !err.message().contains("injected"),
        "panic text leaked: {err:?}"
    );
    let ok = h
        .client()
        .encode(small_request())
        .await
        .expect("the next request is served");
    assert_eq!(ok.into_inner().token_counts.len(), 1);
    assert_eq!(h.health().await, ServingStatus::Serving as i32);
    // The counters move right after the answer is delivered.
    let s = tokio::time::timeout(GUARD, stats.subscribe().wait_for(|s| s.jobs_finished == 1))
        .await
        .expect("in time")
        .expect("stats alive")
        .clone();
    assert_eq!(s.jobs_panicked, 1);
    h.shutdown().await;
}

/// A worker that cannot go on (the job panics and the model then fails its check): the request gets
/// INTERNAL, the service turns NOT_SERVING and `run` ends with an error, so the binary exits non-zero and
/// a supervisor restarts it.
#[tokio::test]
async fn a_worker_that_cannot_go_on_turns_not_serving_and_run_fails() {
    let config = TextEncoder::config(format!("{FIXTURES}/snapshot"));
    let faults = config.faults.clone();
    let Harness {
        mut service,
        channel,
    } = Harness::start_config(config).await;
    faults.break_model_on_next_job();
    let mut client = TextEncoderClient::new(channel);
    let err = client
        .encode(small_request())
        .await
        .expect_err("the job panicked");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    wait_not_serving(&service.url(), SERVICE_NAME, GUARD)
        .await
        .expect("NOT_SERVING");
    drop(client);
    let ended = service.ended(GUARD).await;
    assert!(
        matches!(ended, Err(StageError::WorkerStopped(_))),
        "{ended:?}"
    );
}

fn max_abs_diff(ours: &[f32], expected: &[f32]) -> f32 {
    ours.iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

fn f32s(t: &qwen_image_proto::v1::Tensor) -> Vec<f32> {
    t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The six prompts of the fixture's batch (tools/refharness/reference.py DEFAULT_TEXTENC_PROMPTS).
fn batch_prompts() -> Vec<String> {
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("{FIXTURES}/refs/textenc/manifest.json")).expect("manifest"),
    )
    .expect("json");
    manifest["scalars"]["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| p.as_str().expect("string").to_owned())
        .collect()
}

#[tokio::test]
async fn the_embedding_cache_serves_repeated_prompts_with_the_same_numbers() {
    let h = Harness::start().await;
    let prompts = batch_prompts();
    let request = EncodeRequest {
        prompts: prompts.clone(),
        ..Default::default()
    };
    let first = h
        .client()
        .encode(request.clone())
        .await
        .expect("encoded")
        .into_inner();
    assert_eq!(first.from_cache, vec![false; prompts.len()]);
    // Each prompt encoded alone and padded matches diffusers' batched encoding (padding + mask).
    let (shape, expected) = reference("batch.prompt_embeds");
    let embeds = first.prompt_embeds.clone().expect("embeds");
    assert_eq!(embeds.shape, shape);
    let ours = f32s(&embeds);
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = max_abs_diff(&ours, &expected);
    assert!(worst <= 1e-4 * scale.max(1.0), "max abs diff {worst}");
    // diffusers' mask is int64
    let bytes =
        std::fs::read(format!("{FIXTURES}/refs/textenc/tensors.safetensors")).expect("fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let expected_mask: Vec<u8> = st
        .tensor("batch.prompt_embeds_mask")
        .expect("mask")
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as u8)
        .collect();
    let mask = first.prompt_embeds_mask.clone().expect("mask");
    assert_eq!(mask.data, expected_mask);
    assert!(!first.mask_all_ones);

    // The same prompts again: all from the cache, byte for byte the same answer.
    let second = h
        .client()
        .encode(request)
        .await
        .expect("encoded")
        .into_inner();
    assert_eq!(second.from_cache, vec![true; prompts.len()]);
    assert_eq!(second.prompt_embeds, first.prompt_embeds);
    assert_eq!(second.prompt_embeds_mask, first.prompt_embeds_mask);
    assert_eq!(second.token_counts, first.token_counts);

    // A new prompt beside a cached one: only the new one is encoded; the cached one keeps its numbers, now
    // padded to the new batch's width.
    let mixed = h
        .client()
        .encode(EncodeRequest {
            prompts: vec!["a brand new prompt".into(), prompts[0].clone()],
            ..Default::default()
        })
        .await
        .expect("encoded")
        .into_inner();
    assert_eq!(mixed.from_cache, vec![false, true]);
    let (_, single0) = reference("single.0.prompt_embeds");
    let row = f32s(mixed.prompt_embeds.as_ref().expect("embeds"));
    let width = mixed.prompt_embeds.as_ref().expect("embeds").shape[1] as usize;
    let hidden = shape[2] as usize;
    let cached_rows = &row[width * hidden..][..single0.len()];
    let worst = max_abs_diff(cached_rows, &single0);
    assert!(worst <= 1e-4 * scale.max(1.0), "max abs diff {worst}");
    h.shutdown().await;
}

#[tokio::test]
async fn with_the_cache_off_nothing_is_served_from_it() {
    let mut config = TextEncoder::config(format!("{FIXTURES}/snapshot"));
    config.own.embedding_cache_mb = 0;
    let h = Harness::start_config(config).await;
    for _ in 0..2 {
        let r = h
            .client()
            .encode(EncodeRequest {
                prompts: vec!["dance monkey".into()],
                ..Default::default()
            })
            .await
            .expect("encoded")
            .into_inner();
        assert_eq!(r.from_cache, vec![false]);
    }
    h.shutdown().await;
}
