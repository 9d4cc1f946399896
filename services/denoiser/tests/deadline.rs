//! Work ends with its request: a denoise of the largest latent grid (512x512, 65 536 tokens) stops inside the
//! transformer when its deadline passes or its caller goes away, and the stage answers the next small
//! request at once (real gRPC on 127.0.0.1:0, tiny fixture snapshot).

use std::time::{Duration, Instant};

use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::stage::StageDef;
use qwen_image_common::tensor::from_f32;
use qwen_image_denoiser::{Denoiser, run};
use qwen_image_proto::v1::denoise_event::Event;
use qwen_image_proto::v1::denoiser_client::DenoiserClient;
use qwen_image_proto::v1::{DenoiseRequest, DenoiseResult};
use qwen_image_testkit::service::InProcess;
use tonic::Code;
use tonic::transport::Channel;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny");

fn request(side: usize, steps: u32) -> DenoiseRequest {
    DenoiseRequest {
        prompt_embeds: Some(from_f32(&[1, 4, 32], &[0.1; 4 * 32])),
        latents: Some(from_f32(&[1, 16, side, side], &vec![0.5; 16 * side * side])),
        steps,
        ..Default::default()
    }
}

async fn result(client: &mut DenoiserClient<Channel>, req: DenoiseRequest) -> DenoiseResult {
    let mut stream = client.denoise(req).await.expect("admitted").into_inner();
    while let Some(ev) = stream.message().await.expect("events") {
        if let Some(Event::Result(r)) = ev.event {
            return r;
        }
    }
    panic!("the stream ended without a result");
}

#[tokio::test]
async fn the_largest_grid_past_its_deadline_or_abandoned_frees_the_stage_within_two_seconds() {
    let config = Denoiser::config(format!("{FIXTURES}/snapshot"));
    let stats = config.stats.clone();
    let service = InProcess::serving(|l, stop| run(config, l, stop)).await;
    let mut client = DenoiserClient::new(service.channel())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    // The deadline passes inside the first step (one transformer pass over 65 536 tokens).
    let timeout = Duration::from_secs(2);
    let mut big = tonic::Request::new(request(512, 4));
    big.set_timeout(timeout);
    let deadline = Instant::now() + timeout;
    let mut stream = client.denoise(big).await.expect("admitted").into_inner();
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the big request finished before its deadline"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let small = result(&mut client, request(8, 2)).await;
    let late = Instant::now().saturating_duration_since(deadline);
    eprintln!("next request answered {late:?} after the big one's deadline");
    assert!(small.latents.is_some());
    assert!(
        late < Duration::from_secs(2),
        "the next request was answered {late:?} after the big one's deadline"
    );
    let s = stats.snapshot();
    assert_eq!((s.jobs_deadline_exceeded, s.steps_run), (1, 2), "{s:?}");

    // The caller drops the stream of a running big request (no deadline).
    let mut watch = stats.subscribe();
    let stream = client
        .denoise(request(512, 4))
        .await
        .expect("admitted")
        .into_inner();
    watch
        .wait_for(|s| s.jobs_started == 3)
        .await
        .expect("stats alive");
    drop(stream);
    let gone = Instant::now();
    let small = result(&mut client, request(8, 2)).await;
    assert!(small.latents.is_some());
    let late = gone.elapsed();
    eprintln!("next request answered {late:?} after the big one's caller went away");
    assert!(
        late < Duration::from_secs(2),
        "the next request was answered {late:?} after the big one's caller went away"
    );
    let s = stats.snapshot();
    assert_eq!((s.jobs_cancelled, s.steps_run), (1, 4), "{s:?}");

    drop(client);
    assert!(service.stop().await.is_ok());
}
