//! Values a peer may send the denoiser that used to give INTERNAL or NaN: huge finite numbers, one-step
//! schedules, a 16 KiB ControlNet id, more pixels than `--max-pixels`. Each gets a clear client error
//! naming what to change (real gRPC on 127.0.0.1:0, tiny fixture snapshot); valid neighbours still work.

use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::stage::StageDef;
use qwen_image_common::tensor::from_f32;
use qwen_image_denoiser::{Denoiser, run};
use qwen_image_proto::v1::denoise_event::Event;
use qwen_image_proto::v1::denoiser_client::DenoiserClient;
use qwen_image_proto::v1::stage_info_client::StageInfoClient;
use qwen_image_proto::v1::{ControlInput, DenoiseRequest, DescribeRequest};
use qwen_image_testkit::service::InProcess;
use tonic::Code;
use tonic::transport::Channel;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny");
/// The budget of this test's denoiser: a 16x16 latent grid (128x128 pixels) and no more.
const MAX_PIXELS: u64 = 128 * 128;

fn good() -> DenoiseRequest {
    DenoiseRequest {
        prompt_embeds: Some(from_f32(&[1, 4, 32], &[0.1; 4 * 32])),
        latents: Some(from_f32(&[1, 16, 8, 8], &[0.5; 16 * 64])),
        steps: 2,
        ..Default::default()
    }
}

/// The stream's final status: Ok(true) when a result arrived.
async fn outcome(
    client: &mut DenoiserClient<Channel>,
    req: DenoiseRequest,
) -> Result<bool, tonic::Status> {
    let mut stream = client.denoise(req).await?.into_inner();
    let mut finished = false;
    while let Some(ev) = stream.message().await? {
        finished |= matches!(ev.event, Some(Event::Result(_)));
    }
    Ok(finished)
}

#[tokio::test]
async fn extreme_values_one_step_schedules_long_ids_and_big_grids_are_client_errors() {
    let mut config = Denoiser::config(format!("{FIXTURES}/snapshot"));
    config.max_pixels = MAX_PIXELS;
    let service = InProcess::serving(|l, stop| run(config, l, stop)).await;
    let mut client = DenoiserClient::new(service.channel())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    assert!(outcome(&mut client, good()).await.expect("valid"));

    let expect = |code: Code, needle: &'static str| {
        move |r: Result<bool, tonic::Status>| {
            let e = r.expect_err(needle);
            assert_eq!(e.code(), code, "{e:?}");
            assert!(e.message().contains(needle), "{e:?}");
            e
        }
    };
    // Huge but finite numbers.
    let mut r = good();
    r.latents = Some(from_f32(&[1, 16, 8, 8], &[1e30; 16 * 64]));
    expect(Code::InvalidArgument, "within")(outcome(&mut client, r).await);
    let mut r = good();
    r.negative_prompt_embeds = r.prompt_embeds.clone();
    r.true_cfg_scale = 3.4e38;
    expect(Code::InvalidArgument, "true_cfg_scale")(outcome(&mut client, r).await);

    // One-step schedules that end at sigma 1 cannot be stretched to shift_terminal.
    let mut r = good();
    r.steps = 1;
    expect(Code::InvalidArgument, "steps")(outcome(&mut client, r).await);
    let mut r = good();
    r.sigmas = vec![1.0];
    expect(Code::InvalidArgument, "sigmas")(outcome(&mut client, r).await);
    // A one-step schedule the scheduler can stretch runs.
    let mut r = good();
    r.sigmas = vec![0.5];
    assert!(outcome(&mut client, r).await.expect("sigmas [0.5] run"));

    // A 16 KiB ControlNet id is echoed cut short.
    let mut r = good();
    r.control = vec![ControlInput {
        controlnet_id: "x".repeat(16 * 1024),
        control_latents: Some(from_f32(&[1, 16, 8, 8], &[0.0; 16 * 64])),
        conditioning_scale: 1.0,
        guidance_end: 1.0,
        ..Default::default()
    }];
    let e = expect(Code::FailedPrecondition, "more bytes")(outcome(&mut client, r).await);
    assert!(e.message().len() < 1024, "{} bytes", e.message().len());

    // More pixels than --max-pixels: refused, and the budget is described.
    let mut r = good();
    r.latents = Some(from_f32(&[1, 16, 16, 18], &[0.5; 16 * 16 * 18]));
    expect(Code::InvalidArgument, "--max-pixels")(outcome(&mut client, r).await);
    let mut r = good();
    r.latents = Some(from_f32(&[1, 16, 16, 16], &[0.5; 16 * 256]));
    assert!(outcome(&mut client, r).await.expect("at the budget"));
    let d = StageInfoClient::new(service.channel())
        .describe(DescribeRequest::default())
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(d.limits.expect("limits").max_pixels, MAX_PIXELS);

    drop(client);
    assert!(service.stop().await.is_ok());
}
