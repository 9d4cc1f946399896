//! End to end: the four services as separate processes (`qwen-image serve --stage ...` on 127.0.0.1:0),
//! driven through the gateway as a user would, compared with diffusers' images for the same seed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use qwen_image_proto::v1::{
    DataType, GenerationSettings, PreviewSettings, Stage, Tensor, TextToImageRequest,
    generate_event,
};
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
        let r = generate(&mut c, t2i(req.clone()))
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
async fn previews_are_decoded_every_n_steps_and_the_last_is_the_picture() {
    let stack = start_stack(None).await;
    let mut c = client(&stack.gateway.url).await;
    let (mut req, reference_png) = reference("t2i_64");
    assert_eq!(req.steps, 4);
    for (every, max_side, want_side) in [(2u32, 0u32, 64u32), (3, 32, 32)] {
        req.preview = Some(PreviewSettings {
            every_n_steps: every,
            max_side_px: max_side,
        });
        let mut stream = c
            .text_to_image(t2i(req.clone()))
            .await
            .expect("accepted")
            .into_inner();
        let (mut previews, mut result) = (Vec::new(), None);
        while let Some(ev) = stream.message().await.expect("stream") {
            match ev.event {
                Some(generate_event::Event::Progress(p)) if !p.preview_png.is_empty() => {
                    assert_eq!(p.stage, Stage::Denoise as i32);
                    previews.push((p.step, p.preview_png));
                }
                Some(generate_event::Event::Result(r)) => result = Some(r),
                _ => {}
            }
        }
        let result = result.expect("a result");
        // every N steps and on the last one
        let steps: Vec<u32> = previews.iter().map(|p| p.0).collect();
        let want: Vec<u32> = if every == 2 { vec![2, 4] } else { vec![3, 4] };
        assert_eq!(steps, want, "preview steps for every_n_steps {every}");
        for (_, png) in &previews {
            let (w, h, _) = decode_rgb(png);
            assert_eq!((w, h), (want_side, want_side));
        }
        if want_side == 64 {
            // full size: the last preview is the decode of the final latents, i.e. the picture itself
            let (_, _, last) = decode_rgb(&previews.last().expect("previews").1);
            let (_, _, picture) = decode_rgb(&result.png[0]);
            assert_eq!(last, picture);
            assert_close(&result.png[0], &reference_png, "t2i_64 with previews");
            let (_, _, first) = decode_rgb(&previews[0].1);
            assert_ne!(first, picture, "the step-2 preview should still be noisy");
        }
    }
    // The CLI writes them next to --out.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("fox.png");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_qwen-image"))
        .args([
            "generate",
            "--quiet",
            "--gateway",
            &stack.gateway.url,
            "--prompt",
            "a fox",
        ])
        .args([
            "--width", "64", "--height", "64", "--steps", "4", "--seed", "1",
        ])
        .args(["--preview-every", "2", "--preview-max-side", "16", "--out"])
        .arg(&out)
        .status()
        .expect("qwen-image runs");
    assert!(status.success());
    for step in ["002", "004"] {
        let png = std::fs::read(dir.path().join(format!("fox.step{step}.png"))).expect("preview");
        assert_eq!(decode_rgb(&png).0, 16);
    }
    assert!(out.is_file());
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
        t2i(GenerationSettings {
            prompt: long,
            steps: 2,
            ..good.clone()
        }),
    )
    .await
    .expect("an over-long prompt still generates (diffusers truncates)");
    assert!(r.prompt_truncated, "the cut must be reported");
    assert!(!r.negative_prompt_truncated);
    assert_eq!(r.png.len(), 1);
    // one step cannot be stretched to shift_terminal (diffusers gives NaN): a clear error instead
    let err = generate(&mut c, t2i(GenerationSettings { steps: 1, ..good }))
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
            t2i(GenerationSettings {
                prompt: String::new(),
                ..good.clone()
            }),
        ),
        (
            "width 100",
            t2i(GenerationSettings {
                width_px: 100,
                ..good.clone()
            }),
        ),
        (
            "steps over 1000",
            t2i(GenerationSettings {
                steps: 5000,
                ..good.clone()
            }),
        ),
        (
            "NaN cfg",
            t2i(GenerationSettings {
                true_cfg_scale: Some(f32::NAN),
                ..good.clone()
            }),
        ),
        (
            "latents shape",
            TextToImageRequest {
                settings: Some(good.clone()),
                initial_latents: Some(bad_latents),
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
    generate(&mut c, t2i(good)).await.expect("still generates");
}

#[tokio::test]
async fn cancelling_a_request_frees_the_denoiser() {
    // Queue capacity 1: a second request is admitted only once the first stopped.
    let stack = start_stack(Some("1")).await;
    let mut c = client(&stack.gateway.url).await;
    let (good, _) = reference("t2i_64");
    let long = t2i(GenerationSettings {
        steps: 1000,
        ..good.clone()
    });
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
        match generate(&mut c, t2i(good.clone())).await {
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
