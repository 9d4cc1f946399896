//! End to end: the four services as separate processes (`qwen-image serve --stage ...` on 127.0.0.1:0),
//! driven through the gateway as a user would, compared with diffusers' images for the same seed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use qwen_image_proto::v1::{DataType, Stage, Tensor, TextToImageRequest, generate_event};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn text_to_image_matches_diffusers() {
    let stack = start_stack(None).await;
    let mut c = client(&stack.gateway.url).await;
    for name in ["t2i_64", "t2i_64_nocfg", "t2i_64_zh"] {
        let (req, reference_png) = reference(name);
        let expected_seed = req.seed;
        let r = generate(&mut c, req.clone())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(Some(r.seed), expected_seed);
        assert_eq!(r.png.len(), 1);
        assert_close(&r.png[0], &reference_png, name);
        let params = r.parameters.expect("parameters");
        assert_eq!(params.prompt, req.prompt);
        assert!(
            !r.prompt_truncated && !r.negative_prompt_truncated,
            "{name}: nothing was cut"
        );
    }
}

#[tokio::test]
async fn over_long_prompts_are_cut_as_diffusers_does_and_reported() {
    let stack = start_stack(None).await;
    let mut c = client(&stack.gateway.url).await;
    let (good, _) = reference("t2i_64");
    // far more than 512 tokens with any vocabulary
    let long = "a very long prompt about a red lantern on an old street, ".repeat(120);
    let r = generate(
        &mut c,
        TextToImageRequest {
            prompt: long,
            steps: 2,
            ..good.clone()
        },
    )
    .await
    .expect("an over-long prompt still generates (diffusers truncates)");
    assert!(r.prompt_truncated, "the cut must be reported");
    assert!(!r.negative_prompt_truncated);
    assert_eq!(r.png.len(), 1);
    // one step cannot be stretched to shift_terminal (diffusers gives NaN): a clear error instead
    let err = generate(&mut c, TextToImageRequest { steps: 1, ..good })
        .await
        .expect_err("one step is rejected");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("2 steps"), "{}", err.message());
}

#[tokio::test]
async fn bad_inputs_are_rejected_and_the_gateway_stays_healthy() {
    let stack = start_stack(None).await;
    let mut c = client(&stack.gateway.url).await;
    let (good, _) = reference("t2i_64");
    let bad_latents = Tensor {
        dtype: DataType::F32 as i32,
        shape: vec![1, 16, 1, 4, 4],
        data: vec![0u8; 1024].into(),
    };
    let cases = [
        (
            "empty prompt",
            TextToImageRequest {
                prompt: String::new(),
                ..good.clone()
            },
        ),
        (
            "width 100",
            TextToImageRequest {
                width_px: 100,
                ..good.clone()
            },
        ),
        (
            "steps over 1000",
            TextToImageRequest {
                steps: 5000,
                ..good.clone()
            },
        ),
        (
            "NaN cfg",
            TextToImageRequest {
                true_cfg_scale: Some(f32::NAN),
                ..good.clone()
            },
        ),
        (
            "latents shape",
            TextToImageRequest {
                initial_latents: Some(bad_latents),
                ..good.clone()
            },
        ),
    ];
    for (what, req) in cases {
        let e = generate(&mut c, req).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {}", e.message());
    }
    // steps: 0 means the default (50), so the "steps 0" case of the brief is a valid request here.
    let ch = Channel::from_shared(stack.gateway.url.clone())
        .expect("url")
        .connect_lazy();
    let status = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health");
    assert_eq!(status.into_inner().status, ServingStatus::Serving as i32);
    generate(&mut c, good).await.expect("still generates");
}

#[tokio::test]
async fn cancelling_a_request_frees_the_denoiser() {
    // Queue capacity 1: a second request is admitted only once the first stopped.
    let stack = start_stack(Some("1")).await;
    let mut c = client(&stack.gateway.url).await;
    let (good, _) = reference("t2i_64");
    let long = TextToImageRequest {
        steps: 1000,
        ..good.clone()
    };
    let mut stream = c.text_to_image(long).await.expect("accepted").into_inner();
    let mut step_ms = Vec::new();
    while step_ms.len() < 3 {
        let ev = stream
            .message()
            .await
            .expect("events")
            .expect("not finished");
        if let Some(generate_event::Event::Progress(p)) = ev.event
            && p.stage == Stage::Denoise as i32
        {
            step_ms.push(p.elapsed_ms);
        }
    }
    let per_step = Duration::from_millis((step_ms[2] - step_ms[0]).max(2) / 2);
    let cancelled_at = Instant::now();
    drop(stream);
    // The second request may race the cancellation by a step: honour the server's retry hint.
    let r = loop {
        match generate(&mut c, good.clone()).await {
            Err(e) if e.code() == Code::ResourceExhausted => {
                let wait = qwen_image_common::status::retry_after(&e)
                    .unwrap_or(per_step)
                    .min(per_step * 2);
                assert!(
                    cancelled_at.elapsed() < per_step * 200,
                    "the denoiser is still busy: {e:?}"
                );
                tokio::time::sleep(wait).await;
            }
            other => break other,
        }
    };
    r.expect("second request served after the cancellation");
    let remaining_work = per_step * 990;
    assert!(
        cancelled_at.elapsed() < remaining_work / 2,
        "took {:?}; the cancelled request would have needed about {remaining_work:?} more",
        cancelled_at.elapsed()
    );
}
