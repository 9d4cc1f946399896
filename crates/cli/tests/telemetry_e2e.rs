//! Tracing and metrics end to end: the four services as separate processes (`qwen-image serve --stage`),
//! each exporting OTLP/gRPC to a receiver run by this test and serving /metrics on its own port. One
//! text-to-image request with the caller's `traceparent` must become one trace across the four services
//! (gateway span -> stage spans -> one span per denoising step), a rejected request's span must carry
//! the error status, and every /metrics endpoint must show the request.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::{GenerationSettings, TextToImageRequest, generate_event};
use qwen_image_testkit::otlp_sink::{OtlpSink, SpanRecord};
use qwen_image_testkit::process::{ServiceProcess, sample, scrape, wait_serving};
use tonic::Code;
use tonic::transport::Channel;

/// Failure guard for waits (model loading included); never used to synchronise.
const GUARD: Duration = Duration::from_secs(300);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const FAILED_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const REQUEST_ID: &str = "e2e-telemetry-1";
const STEPS: u32 = 3;

const GATEWAY: &str = "qwen-image-gateway";
const TEXT_ENCODER: &str = "qwen-image-text-encoder";
const DENOISER: &str = "qwen-image-denoiser";
const VAE: &str = "qwen-image-vae";

async fn spawn(stage: &str, extra: &[&str], otlp: &str) -> ServiceProcess {
    let mut args = vec![
        "serve",
        "--stage",
        stage,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--otlp-endpoint",
        otlp,
    ];
    args.extend_from_slice(extra);
    ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_qwen-image").as_ref(),
        &args,
        &[("RUST_LOG", "warn")],
        GUARD,
    )
    .await
    .unwrap_or_else(|e| panic!("{stage}: {e}"))
}

fn traced<T>(msg: T, trace_id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let tp = format!("00-{trace_id}-{CALLER_SPAN}-01");
    req.metadata_mut()
        .insert("traceparent", tp.parse().expect("ascii"));
    req
}

fn one<'a>(spans: &'a [SpanRecord], service: &str, name: &str) -> &'a SpanRecord {
    let found: Vec<&SpanRecord> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(found.len(), 1, "one {service} span {name}: {spans:#?}");
    found[0]
}

fn by_id<'a>(spans: &'a [SpanRecord], id: &str) -> Option<&'a SpanRecord> {
    spans.iter().find(|s| s.span_id == id)
}

#[tokio::test]
async fn one_trace_across_four_services_and_metrics_move() {
    let sink = OtlpSink::start().await.expect("sink");
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny/snapshot");
    let model = model.to_str().expect("utf-8 path");
    let te = spawn("text-encoder", &["--model", model], &sink.endpoint).await;
    let dn = spawn("denoiser", &["--model", model], &sink.endpoint).await;
    let vae = spawn("vae", &["--model", model], &sink.endpoint).await;
    let (te_url, dn_url, vae_url) = (te.url(), dn.url(), vae.url());
    let gw = spawn(
        "gateway",
        &[
            "--text-encoder",
            &te_url,
            "--denoiser",
            &dn_url,
            "--vae",
            &vae_url,
        ],
        &sink.endpoint,
    )
    .await;
    wait_serving(&gw.url(), GUARD).await.expect("SERVING");

    let channel = Channel::from_shared(gw.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = ImageGeneratorClient::new(channel).max_decoding_message_size(64 << 20);
    let mut req = traced(
        TextToImageRequest {
            settings: Some(GenerationSettings {
                prompt: "a red fox in the snow".into(),
                negative_prompt: Some(" ".into()),
                width_px: 64,
                height_px: 64,
                steps: STEPS,
                true_cfg_scale: Some(4.0),
                seed: Some(42),
                ..Default::default()
            }),
            ..Default::default()
        },
        TRACE_ID,
    );
    req.metadata_mut()
        .insert("x-request-id", REQUEST_ID.parse().expect("ascii"));
    let response = client.text_to_image(req).await.expect("accepted");
    assert_eq!(
        response
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some(REQUEST_ID)
    );
    let mut stream = response.into_inner();
    let mut result = None;
    while let Some(ev) = stream.message().await.expect("stream ok") {
        if let Some(generate_event::Event::Result(r)) = ev.event {
            result = Some(r);
        }
    }
    assert_eq!(result.expect("a result").png.len(), 1);

    let bad = client
        .text_to_image(traced(
            TextToImageRequest {
                settings: Some(GenerationSettings {
                    prompt: "x".into(),
                    width_px: 63,
                    height_px: 64,
                    steps: 1,
                    ..Default::default()
                }),
                ..Default::default()
            },
            FAILED_TRACE_ID,
        ))
        .await
        .expect_err("rejected");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.metadata().get("x-request-id").is_some());

    // Every /metrics endpoint saw the request.
    let ok = |service: &'static str, rpc: &'static str| {
        [("service", service), ("rpc", rpc), ("code", "0")]
    };
    let text = scrape(gw.metrics_addr.expect("gateway metrics"))
        .await
        .expect("scrape");
    assert_eq!(
        sample(
            &text,
            "qwen_image_grpc_server_requests_total",
            &ok("gateway", "TextToImage")
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "qwen_image_grpc_server_requests_total",
            &[
                ("service", "gateway"),
                ("rpc", "TextToImage"),
                ("code", "3")
            ]
        ),
        Some(1.0)
    );
    for (stage, rpc, count) in [
        ("text-encoder", "Encode", 2.0),
        ("denoiser", "Denoise", 1.0),
        ("vae", "Decode", 1.0),
    ] {
        let labels = [("stage", stage), ("rpc", rpc), ("code", "0")];
        assert_eq!(
            sample(
                &text,
                "qwen_image_gateway_stage_call_duration_seconds_count",
                &labels
            ),
            Some(count),
            "{stage}: {text}"
        );
    }
    assert!(
        sample(
            &text,
            "qwen_image_grpc_server_sent_bytes_total",
            &[("rpc", "TextToImage")]
        )
        .unwrap_or(0.0)
            > 0.0
    );
    for (proc_, service, rpc, count) in [
        (&te, "text-encoder", "Encode", 2.0),
        (&dn, "denoiser", "Denoise", 1.0),
        (&vae, "vae", "Decode", 1.0),
    ] {
        let text = scrape(proc_.metrics_addr.expect("stage metrics"))
            .await
            .expect("scrape");
        assert_eq!(
            sample(
                &text,
                "qwen_image_grpc_server_requests_total",
                &ok(service, rpc)
            ),
            Some(count),
            "{service}: {text}"
        );
        assert_eq!(
            sample(
                &text,
                "qwen_image_grpc_server_request_duration_seconds_count",
                &ok(service, rpc)
            ),
            Some(count)
        );
        let svc = [("service", service)];
        assert_eq!(
            sample(&text, "qwen_image_queue_wait_seconds_count", &svc),
            Some(count),
            "{service}"
        );
        assert!(
            sample(&text, "qwen_image_grpc_server_received_bytes_total", &svc).unwrap_or(0.0) > 0.0
        );
        assert!(sample(&text, "qwen_image_model_load_duration_seconds", &svc).unwrap_or(0.0) > 0.0);
        if service == "denoiser" {
            assert_eq!(
                sample(
                    &text,
                    "qwen_image_denoise_step_duration_seconds_count",
                    &svc
                ),
                Some(f64::from(STEPS))
            );
        }
    }

    // SIGTERM everything: each process drains and flushes its spans before exiting 0.
    for mut p in [gw, te, dn, vae] {
        let status = p.terminate(GUARD).await.expect("exits");
        assert!(status.success(), "{status:?}");
    }
    let spans = sink.spans();
    assert!(
        spans
            .iter()
            .all(|s| s.trace_id == TRACE_ID || s.trace_id == FAILED_TRACE_ID),
        "every span belongs to a caller's trace: {spans:#?}"
    );
    let trace: Vec<SpanRecord> = spans
        .iter()
        .filter(|s| s.trace_id == TRACE_ID)
        .cloned()
        .collect();
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from([DENOISER, GATEWAY, TEXT_ENCODER, VAE])
    );

    let root = one(&trace, GATEWAY, "/qwen_image.v1.ImageGenerator/TextToImage");
    assert_eq!(
        root.parent_span_id, CALLER_SPAN,
        "the caller's traceparent is honoured"
    );
    assert_eq!(root.attr("request_id"), Some(REQUEST_ID));
    assert_eq!(root.attr("rpc.grpc.status_code"), Some("0"));
    let t2i = one(&trace, GATEWAY, "text_to_image");
    assert_eq!(t2i.parent_span_id, root.span_id);
    assert_eq!(t2i.attr("width"), Some("64"));
    assert_eq!(t2i.attr("steps"), Some("3"));
    assert_eq!(t2i.attr("seed"), Some("42"));
    assert_eq!(t2i.attr("true_cfg_scale"), Some("4"));
    assert!(t2i.attr("model").is_some());

    // Each stage's server span hangs under a gateway client span of its stage, carrying the replica.
    for (service, path, stage) in [
        (DENOISER, "/qwen_image.v1.Denoiser/Denoise", "denoiser"),
        (VAE, "/qwen_image.v1.Vae/Decode", "vae"),
    ] {
        let server = one(&trace, service, path);
        let parent = by_id(&trace, &server.parent_span_id).expect("parent span exported");
        assert_eq!(parent.service, GATEWAY, "{path}: parent in the gateway");
        assert_eq!(parent.kind, 3, "{path}: parent is a client span");
        assert_eq!(parent.attr("stage"), Some(stage));
        assert!(
            parent
                .attr("replica")
                .is_some_and(|r| r.starts_with("http://127.0.0.1:"))
        );
        assert_eq!(
            server.attr("request_id"),
            Some(REQUEST_ID),
            "{path}: request id forwarded"
        );
    }
    let encodes: Vec<&SpanRecord> = trace
        .iter()
        .filter(|s| s.service == TEXT_ENCODER && s.name == "/qwen_image.v1.TextEncoder/Encode")
        .collect();
    assert_eq!(encodes.len(), 2, "prompt and negative prompt");
    for e in encodes {
        let parent = by_id(&trace, &e.parent_span_id).expect("parent span exported");
        assert_eq!((parent.service.as_str(), parent.kind), (GATEWAY, 3));
    }

    // The denoiser: server span -> Denoise -> job -> one span per step, each with its timestep.
    let denoise = one(&trace, DENOISER, "Denoise");
    let job = trace
        .iter()
        .find(|s| s.service == DENOISER && s.name == "job")
        .expect("job span");
    assert_eq!(job.parent_span_id, denoise.span_id);
    let steps: Vec<&SpanRecord> = trace.iter().filter(|s| s.name == "denoise_step").collect();
    assert_eq!(steps.len(), STEPS as usize);
    assert!(
        steps
            .iter()
            .all(|s| s.parent_span_id == job.span_id && s.attr("timestep").is_some())
    );

    let failed = one(
        &spans
            .iter()
            .filter(|s| s.trace_id == FAILED_TRACE_ID)
            .cloned()
            .collect::<Vec<_>>(),
        GATEWAY,
        "/qwen_image.v1.ImageGenerator/TextToImage",
    )
    .clone();
    assert_eq!(failed.status_code, 2, "ERROR status");
    assert_eq!(failed.attr("rpc.grpc.status_code"), Some("3"));
    assert_eq!(failed.parent_span_id, CALLER_SPAN);
}
