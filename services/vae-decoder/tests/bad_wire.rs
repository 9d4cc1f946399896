//! Requests that are broken on the wire, sent to the real VAE process (127.0.0.1:0, tiny fixture) as a
//! broken or hostile peer would: each gets a client error (never INTERNAL, never a GOAWAY that hits other
//! calls), the stage stays SERVING, and made-up method paths do not grow the metrics registry.

use std::path::PathBuf;

use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::tensor::from_f32;
use qwen_image_proto::v1::DecodeRequest;
use qwen_image_proto::v1::vae_client::VaeClient;
use qwen_image_testkit::process::{ServiceProcess, scrape, wait_serving};
use qwen_image_testkit::raw;
use qwen_image_testkit::service::GUARD;
use tonic::transport::Channel;
use tonic::{Code, Request};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny");
const DECODE: &str = "/qwen_image.v1.Vae/Decode";

async fn start() -> (ServiceProcess, Channel) {
    let model = PathBuf::from(format!("{FIXTURES}/snapshot"));
    let vae = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_qwen-image-vae").as_ref(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--model",
            model.to_str().expect("utf-8"),
        ],
        &[],
        GUARD,
    )
    .await
    .expect("the VAE starts");
    wait_serving(&vae.url(), GUARD).await.expect("SERVING");
    let channel = Channel::from_shared(vae.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    (vae, channel)
}

fn client(channel: &Channel) -> VaeClient<Channel> {
    VaeClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn small_decode() -> DecodeRequest {
    DecodeRequest {
        latents: Some(from_f32(&[1, 16, 1, 8, 8], &[0.1; 16 * 64])),
        return_float: false,
    }
}

#[tokio::test]
async fn broken_wire_input_gets_client_errors_and_harms_no_other_call() {
    let (mut vae, channel) = start().await;

    // Undecodable messages: garbage, a wrong wire type for `latents` (field 1 sent as a varint), and
    // invalid UTF-8 in a string (the health check's `service`).
    for (what, path, bytes) in [
        ("garbage", DECODE, vec![0xFF; 16]),
        ("wrong wire type", DECODE, vec![0x08, 0x01]),
        (
            "invalid UTF-8",
            "/grpc.health.v1.Health/Check",
            vec![0x0A, 0x02, 0xFF, 0xFE],
        ),
    ] {
        let err = raw::unary(channel.clone(), path, Request::new(bytes))
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().contains("cannot be decoded"),
            "{what}: {err:?}"
        );
    }

    // A 64 KiB x-request-id: INVALID_ARGUMENT for that call, while a call in flight on the same
    // connection completes (no GOAWAY).
    let mut other = client(&channel);
    let in_flight = tokio::spawn(async move {
        other
            .decode(DecodeRequest {
                latents: Some(from_f32(&[1, 16, 1, 96, 96], &vec![0.1; 16 * 96 * 96])),
                return_float: false,
            })
            .await
    });
    let mut big = Request::new(small_decode());
    big.metadata_mut().insert(
        "x-request-id",
        "r".repeat(64 * 1024).parse().expect("ascii"),
    );
    let err = client(&channel).decode(big).await.expect_err("too big");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("x-request-id"), "{err:?}");
    let done = in_flight
        .await
        .expect("task")
        .expect("the other call completes");
    assert_eq!(done.into_inner().images.len(), 1);

    // Made-up method paths are UNIMPLEMENTED and counted under rpc="unknown".
    for path in ["/qwen_image.v1.Vae/NoSuchMethod", "/made.Up/Path"] {
        let err = raw::unary(channel.clone(), path, Request::new(Vec::new()))
            .await
            .expect_err(path);
        assert_eq!(err.code(), Code::Unimplemented, "{path}: {err:?}");
    }
    let text = scrape(vae.metrics_addr.expect("metrics address"))
        .await
        .expect("scrape");
    let requests = "qwen_image_grpc_server_requests_total";
    assert_eq!(
        qwen_image_testkit::process::sample(&text, requests, &[("rpc", "unknown"), ("code", "12")]),
        Some(2.0),
        "{text}"
    );
    assert!(!text.contains("NoSuchMethod") && !text.contains("made.Up"));
    assert_eq!(
        qwen_image_testkit::process::sample(&text, requests, &[("rpc", "Decode"), ("code", "3")]),
        Some(3.0),
        "garbage, wrong wire type and the big header count as INVALID_ARGUMENT: {text}"
    );

    // Still serving.
    client(&channel)
        .decode(small_decode())
        .await
        .expect("serves on");
    drop(channel);
    vae.terminate(GUARD).await.expect("exits");
}
