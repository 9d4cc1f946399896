//! The denoiser binary as a separate process exporting traces to an OTLP/gRPC receiver run by the test:
//! the caller's `traceparent` is honoured, spans nest server -> handler -> job -> one span per step,
//! a failed request's span carries the error status, `x-request-id` comes back, and /metrics moves.

use std::path::PathBuf;
use std::time::Duration;

use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_proto::v1::denoiser_client::DenoiserClient;
use qwen_image_proto::v1::{DataType, DenoiseRequest, Tensor};
use qwen_image_testkit::otlp_sink::{OtlpSink, SpanRecord};
use qwen_image_testkit::process::{ServiceProcess, sample, scrape, wait_serving};
use tonic::Code;
use tonic::transport::Channel;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tiny");
/// Guard against a hung test; never used to wait for something to happen.
const GUARD: Duration = Duration::from_secs(120);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const FAILED_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const STEPS: u32 = 3;

fn reference_tensor(name: &str) -> Tensor {
    let bytes =
        std::fs::read(format!("{FIXTURES}/refs/t2i_64/tensors.safetensors")).expect("fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let v = st.tensor(name).expect("tensor in fixture");
    Tensor {
        dtype: DataType::F32 as i32,
        shape: v.shape().iter().map(|&d| d as u64).collect(),
        data: v.data().to_vec().into(),
    }
}

fn traced<T>(msg: T, trace_id: &str, request_id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let tp = format!("00-{trace_id}-{CALLER_SPAN}-01");
    req.metadata_mut()
        .insert("traceparent", tp.parse().expect("ascii"));
    req.metadata_mut()
        .insert("x-request-id", request_id.parse().expect("ascii"));
    req
}

fn by_name<'a>(spans: &'a [SpanRecord], name: &str) -> Vec<&'a SpanRecord> {
    spans.iter().filter(|s| s.name == name).collect()
}

#[tokio::test]
async fn denoise_spans_reach_the_otlp_receiver_and_metrics_move() {
    let sink = OtlpSink::start().await.expect("sink");
    let model = PathBuf::from(format!("{FIXTURES}/snapshot"));
    let mut denoiser = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_qwen-image-denoiser").as_ref(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--model",
            model.to_str().expect("utf-8"),
            "--otlp-endpoint",
            &sink.endpoint,
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "info")],
        GUARD,
    )
    .await
    .expect("denoiser starts");
    wait_serving(&denoiser.url(), GUARD).await.expect("SERVING");
    let channel = Channel::from_shared(denoiser.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = DenoiserClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    // One good request.
    let req = DenoiseRequest {
        prompt_embeds: Some(reference_tensor("prompt_embeds")),
        negative_prompt_embeds: Some(reference_tensor("negative_prompt_embeds")),
        true_cfg_scale: 4.0,
        latents: Some(reference_tensor("rng.0")),
        steps: STEPS,
        ..Default::default()
    };
    let response = client
        .denoise(traced(req, TRACE_ID, "req-telemetry-ok"))
        .await
        .expect("admitted");
    assert_eq!(
        response
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("req-telemetry-ok"),
        "the caller's request id comes back"
    );
    let mut stream = response.into_inner();
    let mut events = 0;
    while stream.message().await.expect("stream ok").is_some() {
        events += 1;
    }
    assert_eq!(
        events,
        STEPS + 1,
        "a progress event per step and the result"
    );

    // One invalid request: INVALID_ARGUMENT, and a generated request id.
    let err = client
        .denoise(traced(
            DenoiseRequest::default(),
            FAILED_TRACE_ID,
            "req-telemetry-bad",
        ))
        .await
        .expect_err("rejected");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Metrics moved.
    let text = scrape(denoiser.metrics_addr.expect("metrics address printed"))
        .await
        .expect("scrape");
    let denoise = [("service", "denoiser"), ("rpc", "Denoise")];
    let ok = [denoise[0], denoise[1], ("code", "0")];
    let bad = [denoise[0], denoise[1], ("code", "3")];
    assert_eq!(
        sample(&text, "qwen_image_grpc_server_requests_total", &ok),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "qwen_image_grpc_server_requests_total", &bad),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "qwen_image_grpc_server_request_duration_seconds_count",
            &ok
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &text,
            "qwen_image_grpc_server_received_bytes_total",
            &denoise
        )
        .unwrap_or(0.0)
            > 1000.0
    );
    assert!(
        sample(&text, "qwen_image_grpc_server_sent_bytes_total", &denoise).unwrap_or(0.0) > 1000.0
    );
    let svc = [("service", "denoiser")];
    assert_eq!(
        sample(
            &text,
            "qwen_image_denoise_step_duration_seconds_count",
            &svc
        ),
        Some(f64::from(STEPS))
    );
    assert!(
        sample(
            &text,
            "qwen_image_denoise_step_duration_seconds_bucket",
            &svc
        )
        .is_some()
    );
    assert_eq!(
        sample(&text, "qwen_image_queue_wait_seconds_count", &svc),
        Some(1.0)
    );
    assert_eq!(sample(&text, "qwen_image_queue_depth", &svc), Some(0.0));
    assert_eq!(
        sample(&text, "qwen_image_in_flight_requests", &svc),
        Some(0.0)
    );
    assert!(sample(&text, "qwen_image_model_load_duration_seconds", &svc).unwrap_or(0.0) > 0.0);

    // SIGTERM: drain, flush the spans, exit 0.
    let status = denoiser.terminate(GUARD).await.expect("exits");
    assert!(status.success(), "{status:?}");

    // JSON log lines of a request carry its request id and the trace and span ids.
    let logs = denoiser.log_lines();
    let admitting: Vec<serde_json::Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "admitting")
        .collect();
    assert_eq!(admitting.len(), 1, "{logs:#?}");
    let line = &admitting[0];
    assert_eq!(line["trace_id"], TRACE_ID, "{line}");
    assert_eq!(line["span_id"].as_str().map(str::len), Some(16), "{line}");
    assert!(
        line.to_string()
            .contains("\"request_id\":\"req-telemetry-ok\""),
        "{line}"
    );
    let spans = sink.spans();

    let ok_trace: Vec<SpanRecord> = spans
        .iter()
        .filter(|s| s.trace_id == TRACE_ID)
        .cloned()
        .collect();
    assert!(ok_trace.iter().all(|s| s.service == "qwen-image-denoiser"));
    let resource = &ok_trace
        .first()
        .expect("spans of the traced request")
        .resource;
    for key in [
        "service.version",
        "service.instance.id",
        "host.name",
        "process.pid",
    ] {
        assert!(
            resource.contains_key(key),
            "resource has {key}: {resource:?}"
        );
    }
    let server = by_name(&ok_trace, "/qwen_image.v1.Denoiser/Denoise");
    assert_eq!(server.len(), 1, "one server span: {ok_trace:#?}");
    let server = server[0];
    assert_eq!(
        server.parent_span_id, CALLER_SPAN,
        "child of the caller's span"
    );
    assert_eq!(server.kind, 2, "SERVER kind");
    assert_eq!(server.attr("request_id"), Some("req-telemetry-ok"));
    assert_eq!(server.attr("rpc.grpc.status_code"), Some("0"));
    assert_ne!(server.status_code, 2);
    let handler = by_name(&ok_trace, "Denoise");
    assert_eq!(handler.len(), 1);
    assert_eq!(handler[0].parent_span_id, server.span_id);
    assert_eq!(handler[0].attr("steps"), Some("3"));
    assert_eq!(handler[0].attr("true_cfg_scale"), Some("4"));
    let job = by_name(&ok_trace, "job");
    assert_eq!(job.len(), 1);
    assert_eq!(job[0].parent_span_id, handler[0].span_id);
    assert!(job[0].attr("queue_wait_ms").is_some());
    let steps = by_name(&ok_trace, "denoise_step");
    assert_eq!(steps.len(), STEPS as usize, "one span per step");
    assert!(steps.iter().all(|s| s.parent_span_id == job[0].span_id));
    assert!(steps.iter().all(|s| s.attr("timestep").is_some()));

    let failed: Vec<&SpanRecord> = spans
        .iter()
        .filter(|s| s.trace_id == FAILED_TRACE_ID && s.name == "/qwen_image.v1.Denoiser/Denoise")
        .collect();
    assert_eq!(failed.len(), 1, "{spans:#?}");
    assert_eq!(failed[0].status_code, 2, "ERROR status");
    assert_eq!(failed[0].attr("rpc.grpc.status_code"), Some("3"));
    assert_eq!(failed[0].attr("request_id"), Some("req-telemetry-bad"));
    assert!(!failed[0].status_message.is_empty());
}
