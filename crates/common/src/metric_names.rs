//! Every metric name and histogram bucket set, in one place (Prometheus units, `qwen_image_` prefix).
//!
//! Labels: `service` (`gateway`, `text-encoder`, `denoiser`, `vae`), `rpc` (the gRPC method, e.g.
//! `Denoise`), `code` (the gRPC status code as a number, `0` = OK), `stage` (the stage a gateway call
//! went to), `outcome` (see the `OUTCOME_*` values).

// ---- gRPC server, recorded by the shared server layer (`crate::grpc`) for every service ----

/// Counter: finished RPCs. Labels: service, rpc, code.
pub const GRPC_REQUESTS_TOTAL: &str = "qwen_image_grpc_server_requests_total";
/// Histogram: RPC latency, from the request headers to the end of the response body (whole stream).
/// Labels: service, rpc, code.
pub const GRPC_REQUEST_SECONDS: &str = "qwen_image_grpc_server_request_duration_seconds";
/// Gauge: RPCs being served now. Labels: service, rpc.
pub const GRPC_IN_FLIGHT: &str = "qwen_image_grpc_server_in_flight_requests";
/// Counter: request message bytes received (length-prefixed gRPC frames; tensors dominate them).
/// Labels: service, rpc.
pub const GRPC_RECEIVED_BYTES_TOTAL: &str = "qwen_image_grpc_server_received_bytes_total";
/// Counter: response message bytes sent. Labels: service, rpc.
pub const GRPC_SENT_BYTES_TOTAL: &str = "qwen_image_grpc_server_sent_bytes_total";

// ---- stage queues and workers (`crate::queue`) ----

/// Counter: requests admitted to or rejected by a service queue. Labels: service, outcome
/// (`admitted` | `overloaded`).
pub const ADMISSIONS_TOTAL: &str = "qwen_image_admissions_total";
/// Gauge: requests admitted and not finished (queued + running). Labels: service.
pub const IN_FLIGHT: &str = "qwen_image_in_flight_requests";
/// Gauge: admitted requests waiting for the worker (not yet running). Labels: service.
pub const QUEUE_DEPTH: &str = "qwen_image_queue_depth";
/// Histogram: time a job waited in the queue before the worker took it. Labels: service.
pub const QUEUE_WAIT_SECONDS: &str = "qwen_image_queue_wait_seconds";
/// Histogram: worker time of one job. Labels: service, rpc, outcome.
pub const JOB_SECONDS: &str = "qwen_image_job_seconds";
/// Gauge: seconds the worker took to load and warm up its model. Labels: service.
pub const MODEL_LOAD_SECONDS: &str = "qwen_image_model_load_duration_seconds";
/// Counter: jobs that ended early. Labels: service, outcome (`cancelled` | `deadline_exceeded`).
pub const JOBS_STOPPED_TOTAL: &str = "qwen_image_jobs_stopped_total";

// ---- memory (`crate::stage::memory`) ----

/// Gauge: weight bytes a stage's model keeps resident (stage-dtype copies of dense tensors, the file's
/// blocks for GGUF-quantized and fp8 ones). Labels: service, component (`transformer`, `text_encoder`,
/// `vae`), format (`F32`, `BF16`, `F8_E4M3`, `Q8_0`, `Q4_K`, ...).
pub const WEIGHTS_RESIDENT_BYTES: &str = "qwen_image_weights_resident_bytes";
/// Gauge: peak resident set size of the process (`VmHWM`), set after loading and after every job.
/// Labels: service (in `qwen-image serve` all stages share one process and report the same value).
pub const PROCESS_PEAK_RSS_BYTES: &str = "qwen_image_process_peak_rss_bytes";
/// Gauge: resident set size of the process (`VmRSS`) at the same moments. Labels: service.
pub const PROCESS_RSS_BYTES: &str = "qwen_image_process_rss_bytes";

// ---- denoiser ----

/// Counter: denoising steps run. Labels: service.
pub const DENOISE_STEPS_TOTAL: &str = "qwen_image_denoise_steps_total";
/// Histogram: duration of one denoising step (transformer passes + scheduler update). Labels: service.
pub const DENOISE_STEP_SECONDS: &str = "qwen_image_denoise_step_duration_seconds";

// ---- text encoder ----

/// Counter: prompt-embedding cache lookups, one per prompt of a request. Labels: service, outcome (`hit` |
/// `miss`).
pub const EMBEDDING_CACHE_LOOKUPS_TOTAL: &str = "qwen_image_embedding_cache_lookups_total";
/// Counter: prompts dropped from the embedding cache to stay within its bound. Labels: service.
pub const EMBEDDING_CACHE_EVICTIONS_TOTAL: &str = "qwen_image_embedding_cache_evictions_total";
/// Gauge: bytes the embedding cache holds. Labels: service.
pub const EMBEDDING_CACHE_BYTES: &str = "qwen_image_embedding_cache_bytes";
/// Gauge: prompts the embedding cache holds. Labels: service.
pub const EMBEDDING_CACHE_ENTRIES: &str = "qwen_image_embedding_cache_entries";

// ---- gateway ----

/// Histogram: one stage call as the gateway sees it (network + queue + work), per attempt.
/// Labels: service (`gateway`), stage, rpc, code.
pub const STAGE_CALL_SECONDS: &str = "qwen_image_gateway_stage_call_duration_seconds";
/// Counter: stage replicas refused because their model does not fit the other stages (counted when a
/// replica becomes refused). Labels: service (`gateway`), stage, field (`kind`, `hidden_size`, `z_dim`,
/// `max_sequence_length`, `digest`).
pub const GATEWAY_REPLICA_REFUSALS_TOTAL: &str = "qwen_image_gateway_replica_refusals_total";

/// Counter: gateway requests that carried a valid API key. Labels: service (`gateway`), key (the key's
/// name from `--api-keys-file`, never the key).
pub const GATEWAY_API_KEY_REQUESTS_TOTAL: &str = "qwen_image_gateway_api_key_requests_total";
/// Counter: gateway requests refused for a missing or wrong API key. Labels: service (`gateway`).
pub const GATEWAY_UNAUTHENTICATED_TOTAL: &str = "qwen_image_gateway_unauthenticated_requests_total";

// ---- gateway HTTP API (`--http-listen`) ----

/// Counter: finished HTTP requests. Labels: service (`gateway`), route (the matched route, e.g.
/// `/v1/images/generations`; `other` for unknown paths), status (HTTP status code).
pub const HTTP_REQUESTS_TOTAL: &str = "qwen_image_http_server_requests_total";
/// Histogram: HTTP request latency until the response headers (a streamed body runs on). Labels: service,
/// route, status.
pub const HTTP_REQUEST_SECONDS: &str = "qwen_image_http_server_request_duration_seconds";

/// Outcome label values.
pub const OUTCOME_ADMITTED: &str = "admitted";
pub const OUTCOME_OVERLOADED: &str = "overloaded";
pub const OUTCOME_OK: &str = "ok";
pub const OUTCOME_ERROR: &str = "error";
pub const OUTCOME_CANCELLED: &str = "cancelled";
pub const OUTCOME_DEADLINE_EXCEEDED: &str = "deadline_exceeded";

/// Buckets (seconds) of request-scale latencies: a tiny-model request takes milliseconds, a 1024x1024
/// 50-step CPU request minutes.
pub const REQUEST_BUCKETS_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Buckets (seconds) of one denoising step: sub-millisecond (tiny model) to a minute (large image on CPU).
pub const STEP_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The histograms and their buckets (everything else is a counter or a gauge).
pub const HISTOGRAM_BUCKETS: &[(&str, &[f64])] = &[
    (GRPC_REQUEST_SECONDS, REQUEST_BUCKETS_SECONDS),
    (QUEUE_WAIT_SECONDS, REQUEST_BUCKETS_SECONDS),
    (JOB_SECONDS, REQUEST_BUCKETS_SECONDS),
    (STAGE_CALL_SECONDS, REQUEST_BUCKETS_SECONDS),
    (DENOISE_STEP_SECONDS, STEP_BUCKETS_SECONDS),
    (HTTP_REQUEST_SECONDS, REQUEST_BUCKETS_SECONDS),
];

/// `# HELP` texts.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        GRPC_REQUESTS_TOTAL,
        "Finished gRPC requests by rpc and status code"
    );
    describe_histogram!(
        GRPC_REQUEST_SECONDS,
        Unit::Seconds,
        "gRPC request latency including the streamed response"
    );
    describe_gauge!(GRPC_IN_FLIGHT, "gRPC requests being served");
    describe_counter!(
        GRPC_RECEIVED_BYTES_TOTAL,
        Unit::Bytes,
        "gRPC request message bytes received (mostly tensors)"
    );
    describe_counter!(
        GRPC_SENT_BYTES_TOTAL,
        Unit::Bytes,
        "gRPC response message bytes sent (mostly tensors and images)"
    );
    describe_counter!(
        ADMISSIONS_TOTAL,
        "Requests admitted to or rejected by the queue"
    );
    describe_gauge!(IN_FLIGHT, "Requests admitted and not finished");
    describe_gauge!(QUEUE_DEPTH, "Admitted requests waiting for the worker");
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "Time a job waited for the worker"
    );
    describe_histogram!(JOB_SECONDS, Unit::Seconds, "Worker time of one job");
    describe_gauge!(
        MODEL_LOAD_SECONDS,
        Unit::Seconds,
        "Model load and warm-up time"
    );
    describe_counter!(JOBS_STOPPED_TOTAL, "Jobs stopped early");
    describe_counter!(DENOISE_STEPS_TOTAL, "Denoising steps run");
    describe_histogram!(
        DENOISE_STEP_SECONDS,
        Unit::Seconds,
        "Duration of one denoising step"
    );
    describe_counter!(
        GATEWAY_REPLICA_REFUSALS_TOTAL,
        "Stage replicas refused because their model does not fit the other stages"
    );
    describe_histogram!(
        STAGE_CALL_SECONDS,
        Unit::Seconds,
        "Stage call latency seen by the gateway, per attempt"
    );
    describe_counter!(
        GATEWAY_API_KEY_REQUESTS_TOTAL,
        "Gateway requests with a valid API key, by key name"
    );
    describe_counter!(
        GATEWAY_UNAUTHENTICATED_TOTAL,
        "Gateway requests refused for a missing or wrong API key"
    );
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "Finished HTTP API requests by route and status"
    );
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        Unit::Seconds,
        "HTTP API latency until the response headers"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        for (name, buckets) in HISTOGRAM_BUCKETS {
            assert!(name.starts_with("qwen_image_") && name.ends_with("_seconds"));
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{name}");
        }
        for name in [
            GRPC_REQUESTS_TOTAL,
            GRPC_RECEIVED_BYTES_TOTAL,
            GRPC_SENT_BYTES_TOTAL,
            ADMISSIONS_TOTAL,
            JOBS_STOPPED_TOTAL,
            DENOISE_STEPS_TOTAL,
            GATEWAY_REPLICA_REFUSALS_TOTAL,
            GATEWAY_API_KEY_REQUESTS_TOTAL,
            GATEWAY_UNAUTHENTICATED_TOTAL,
            HTTP_REQUESTS_TOTAL,
        ] {
            assert!(name.starts_with("qwen_image_") && name.ends_with("_total"));
        }
    }
}
