//! Work ends with its request: a 4096x4096 Decode whose deadline passes stops inside the VAE, and the stage
//! answers the next small request at once (real gRPC on 127.0.0.1:0, tiny fixture snapshot).

use std::time::{Duration, Instant};

use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::stage::StageDef;
use qwen_image_common::tensor::from_f32;
use qwen_image_proto::v1::DecodeRequest;
use qwen_image_proto::v1::vae_client::VaeClient;
use qwen_image_testkit::service::InProcess;
use qwen_image_vae::{Vae, run};
use tonic::Code;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny");

fn decode_request(side: usize) -> DecodeRequest {
    DecodeRequest {
        latents: Some(from_f32(
            &[1, 16, 1, side, side],
            &vec![0.1; 16 * side * side],
        )),
        return_float: false,
    }
}

#[tokio::test]
async fn a_4096px_decode_past_its_deadline_or_abandoned_frees_the_stage_within_two_seconds() {
    let config = Vae::config(format!("{FIXTURES}/snapshot"));
    let stats = config.stats.clone();
    let service = InProcess::serving(|l, stop| run(config, l, stop)).await;
    let mut client = VaeClient::new(service.channel())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    // 512x512 latents: a 4096x4096 image, minutes of work for the tiny VAE on a CPU.
    let timeout = Duration::from_secs(2);
    let mut big = tonic::Request::new(decode_request(512));
    big.set_timeout(timeout);
    let deadline = Instant::now() + timeout;
    let err = client.decode(big).await.expect_err("past its deadline");
    // tonic's client enforces the timeout itself (CANCELLED "Timeout expired", and it resets the call)
    // when its timer fires before the stage's DEADLINE_EXCEEDED arrives.
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );

    let small = client
        .decode(decode_request(8))
        .await
        .expect("the small request is served")
        .into_inner();
    let late = Instant::now().saturating_duration_since(deadline);
    eprintln!("next request answered {late:?} after the big one's deadline");
    assert_eq!(small.images.len(), 1);
    assert_eq!(
        (small.images[0].width_px, small.images[0].height_px),
        (64, 64)
    );
    assert!(
        late < Duration::from_secs(2),
        "the next request was answered {late:?} after the big one's deadline"
    );
    // The worker ran the big job and stopped it (for its deadline, or for the reset that tonic's client
    // sends at the same moment): it did not finish it.
    let s = stats.snapshot();
    assert_eq!(s.jobs_deadline_exceeded + s.jobs_cancelled, 1, "{s:?}");
    assert_eq!(s.jobs_started, 2, "{s:?}");

    // The caller of a running big Decode (no deadline) goes away.
    let mut watch = stats.subscribe();
    let mut other = client.clone();
    let call = tokio::spawn(async move { other.decode(decode_request(512)).await });
    watch
        .wait_for(|s| s.jobs_started == 3)
        .await
        .expect("stats alive");
    call.abort();
    let gone = Instant::now();
    client
        .decode(decode_request(8))
        .await
        .expect("the small request is served");
    let late = gone.elapsed();
    eprintln!("next request answered {late:?} after the big one's caller went away");
    assert!(
        late < Duration::from_secs(2),
        "the next request was answered {late:?} after the big one's caller went away"
    );
    let s = stats.snapshot();
    assert_eq!(s.jobs_deadline_exceeded + s.jobs_cancelled, 2, "{s:?}");

    drop(client);
    assert!(service.stop().await.is_ok());
}
