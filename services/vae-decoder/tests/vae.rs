//! The real VAE service on 127.0.0.1:0 with the tiny fixture snapshot, called through the generated client.

use std::time::Duration;

use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::stage::{StageDef, StageError};
use qwen_image_common::tensor::from_f32;
use qwen_image_proto::v1::vae_client::VaeClient;
use qwen_image_proto::v1::{DecodeRequest, EncodeImageRequest, Image};
use qwen_image_testkit::service::{InProcess, health};
use qwen_image_vae::{SERVICE_NAME, Vae, run};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny");

struct Harness {
    service: InProcess<StageError>,
    channel: Channel,
}

impl Harness {
    async fn start() -> Self {
        let config = Vae::config(format!("{FIXTURES}/snapshot"));
        let service = InProcess::serving(|l, stop| run(config, l, stop)).await;
        let channel = service.channel();
        Self { service, channel }
    }

    fn client(&self) -> VaeClient<Channel> {
        VaeClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    async fn shutdown(self) {
        drop(self.channel);
        let result = self.service.stop().await;
        assert!(result.is_ok(), "{result:?}");
    }
}

fn reference(dump: &str, name: &str) -> (Vec<usize>, Vec<u8>) {
    let bytes =
        std::fs::read(format!("{FIXTURES}/refs/{dump}/tensors.safetensors")).expect("fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let v = st.tensor(name).expect("tensor");
    (v.shape().to_vec(), v.data().to_vec())
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn assert_close(what: &str, ours: &[f32], expected: &[f32], rel: f32) {
    assert_eq!(ours.len(), expected.len(), "{what}");
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let worst = ours
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= rel * scale,
        "{what}: max abs diff {worst} vs max abs {scale}"
    );
}

#[tokio::test]
async fn decode_and_encode_match_diffusers() {
    let h = Harness::start().await;

    // Decode the t2i dump's final latents (normalised, packed [1, 16, 64] -> [1, 16, 1, 8, 8]).
    let (_, packed) = reference("t2i_64", "latents_final_packed");
    let packed = f32s(&packed);
    let mut latents = vec![0f32; 16 * 64];
    for c in 0..16 {
        for yy in 0..8 {
            for xx in 0..8 {
                let (y, dy, x, dx) = (yy / 2, yy % 2, xx / 2, xx % 2);
                latents[c * 64 + yy * 8 + xx] = packed[(y * 4 + x) * 64 + c * 4 + dy * 2 + dx];
            }
        }
    }
    let resp = h
        .client()
        .decode(DecodeRequest {
            latents: Some(from_f32(&[1, 16, 1, 8, 8], &latents)),
            return_float: true,
        })
        .await
        .expect("decoded")
        .into_inner();
    assert_eq!(resp.images.len(), 1);
    let img = &resp.images[0];
    assert_eq!((img.width_px, img.height_px), (64, 64));
    let (_, expected_u8) = reference("t2i_64", "image_uint8");
    let worst = img
        .rgb8
        .iter()
        .zip(&expected_u8)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .expect("pixels");
    assert!(worst <= 2, "8-bit image differs by {worst} levels");
    let decoded = resp.decoded.expect("float tensor");
    assert_eq!(decoded.shape, vec![1, 3, 64, 64]);
    let (_, expected) = reference("t2i_64", "vae.decode.0.out");
    assert_close("decoded", &f32s(&decoded.data), &f32s(&expected), 1e-3);

    // Encode the VAE dump's input image (it came from 8-bit pixels: x = 2 v / 255 - 1).
    let (shape, input) = reference("vae_64", "vae.input"); // [1, 3, 64, 64]
    let (hh, ww) = (shape[2], shape[3]);
    let x = f32s(&input);
    let mut rgb = vec![0u8; hh * ww * 3];
    for c in 0..3 {
        for i in 0..hh * ww {
            rgb[i * 3 + c] = ((x[c * hh * ww + i] + 1.0) * 127.5).round() as u8;
        }
    }
    let image = Image {
        width_px: ww as u32,
        height_px: hh as u32,
        rgb8: rgb.into(),
    };
    // Without noise: the normalised posterior mean (argmax), as diffusers' dump computes it.
    let resp = h
        .client()
        .encode(EncodeImageRequest {
            images: vec![image.clone()],
            posterior_noise: None,
        })
        .await
        .expect("encoded")
        .into_inner();
    let mean = resp.latents.expect("latents");
    assert_eq!(mean.shape, vec![1, 16, 1, 8, 8]);
    let expected = f32s(&reference("vae_64", "vae.latents_normalized").1);
    assert_close("normalised mean", &f32s(&mean.data), &expected, 1e-3);

    // With diffusers' posterior noise the service samples (diffusers' `mean + std * eps`) and normalises
    // with the snapshot's latents_mean / latents_std; two rows of noise for one image give two latents
    // (the image repeated to the batch).
    let (eps_shape, eps) = reference("vae_64", "vae.sample_eps");
    assert_eq!(eps_shape, vec![1, 16, 1, 8, 8]);
    let eps = f32s(&eps);
    let twice: Vec<f32> = eps.iter().chain(&eps).copied().collect();
    let resp = h
        .client()
        .encode(EncodeImageRequest {
            images: vec![image],
            posterior_noise: Some(from_f32(&[2, 16, 1, 8, 8], &twice)),
        })
        .await
        .expect("encoded")
        .into_inner();
    let latents = resp.latents.expect("latents");
    assert_eq!(latents.shape, vec![2, 16, 1, 8, 8]);
    let latents = f32s(&latents.data);
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("{FIXTURES}/snapshot/vae/config.json")).expect("vae config"),
    )
    .expect("json");
    let stat = |k: &str| -> Vec<f32> {
        cfg[k]
            .as_array()
            .expect("16 values")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect()
    };
    let (lm, ls) = (stat("latents_mean"), stat("latents_std"));
    let sample = f32s(&reference("vae_64", "vae.posterior_sample").1);
    let expected: Vec<f32> = sample
        .iter()
        .enumerate()
        .map(|(i, z)| (z - lm[i / 64]) * (1.0 / ls[i / 64]))
        .collect();
    assert_close("normalised sample", &latents[..1024], &expected, 1e-3);
    assert_eq!(
        latents[..1024],
        latents[1024..],
        "one image, two identical rows"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_invalid_argument_and_service_stays_healthy() {
    let h = Harness::start().await;
    let err = h
        .client()
        .decode(DecodeRequest {
            latents: Some(from_f32(&[1, 15, 1, 2, 2], &[0.0; 60])),
            return_float: false,
        })
        .await
        .expect_err("wrong channels");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut short = from_f32(&[1, 16, 1, 2, 2], &[0.0; 64]);
    short.data = short.data.slice(..10);
    let err = h
        .client()
        .decode(DecodeRequest {
            latents: Some(short),
            return_float: false,
        })
        .await
        .expect_err("bytes");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let bad_image = Image {
        width_px: 16,
        height_px: 16,
        rgb8: vec![0u8; 10].into(),
    };
    let err = h
        .client()
        .encode(EncodeImageRequest {
            images: vec![bad_image],
            posterior_noise: None,
        })
        .await
        .expect_err("bytes");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let odd = Image {
        width_px: 12,
        height_px: 16,
        rgb8: vec![0u8; 12 * 16 * 3].into(),
    };
    let err = h
        .client()
        .encode(EncodeImageRequest {
            images: vec![odd],
            posterior_noise: None,
        })
        .await
        .expect_err("size");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let status = health(&h.service.url(), SERVICE_NAME)
        .await
        .expect("health");
    assert_eq!(status, ServingStatus::Serving as i32);
    h.shutdown().await;
}

#[tokio::test]
async fn an_expired_deadline_gets_deadline_exceeded() {
    let h = Harness::start().await;
    let mut req = tonic::Request::new(DecodeRequest {
        latents: Some(from_f32(&[1, 16, 1, 2, 2], &[0.0; 64])),
        return_float: false,
    });
    req.set_timeout(Duration::from_nanos(1));
    let err = h.client().decode(req).await.expect_err("deadline");
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
        Vae::config(format!("{FIXTURES}/nope")),
        listener,
        std::future::pending(),
    )
    .await;
    assert!(matches!(result, Err(StageError::Config(_))), "{result:?}");
}
