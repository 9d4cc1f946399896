//! Logs, trace export and the Prometheus endpoint, set up in one place.
//!
//! - Logs: text or JSON lines on stderr, levels from `RUST_LOG` (default `info`). A log line inside a
//!   request carries the request's span fields (so its `request_id`); JSON lines also carry the
//!   OpenTelemetry `trace_id` and `span_id` when traces are exported.
//! - Traces: with an OTLP endpoint, spans at INFO and above (whatever `RUST_LOG` says) go through a batch
//!   span processor (its own thread; a full queue drops spans, it never blocks a request) to an OTLP/gRPC
//!   exporter (gzip) whose connection runs on a small runtime owned by the [`TelemetryGuard`], so export
//!   and the final flush work from any thread. Without an endpoint no OpenTelemetry layer is installed.
//! - The W3C `traceparent` propagator is installed in every case ([`crate::grpc`] extracts and injects).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

use crate::args::{CommonArgs, LogFormat};
use crate::metric_names;

/// Time one export may take before the batch is dropped (the collector is down or slow).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Spans buffered for export; more are dropped (counted by the SDK), never waited for.
const MAX_QUEUED_SPANS: usize = 8192;
/// Spans per export call.
const MAX_EXPORT_BATCH: usize = 512;
/// How often the processor exports a partial batch.
const EXPORT_DELAY: Duration = Duration::from_millis(500);
/// How often histograms are compacted by the Prometheus recorder.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Flushes and stops trace export on drop (blocking for at most about [`EXPORT_TIMEOUT`]).
#[must_use = "dropping the guard ends telemetry"]
pub struct TelemetryGuard {
    service: &'static str,
    provider: Option<SdkTracerProvider>,
    export_runtime: Option<tokio::runtime::Runtime>,
}

impl TelemetryGuard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Blocks this thread until the processor thread has exported what it holds; the export
            // itself runs on `export_runtime`, so this cannot deadlock a single-threaded caller.
            if let Err(e) = provider.shutdown() {
                tracing::warn!(service = self.service, error = %e, "trace flush failed");
            }
        }
        if let Some(rt) = self.export_runtime.take() {
            rt.shutdown_background();
        }
        tracing::debug!(service = self.service, "telemetry shut down");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(String),
    #[error("cannot set up trace export to {endpoint}: {reason}")]
    Otlp { endpoint: String, reason: String },
    #[error("cannot start the metrics endpoint on {addr}: {reason}")]
    Metrics { addr: SocketAddr, reason: String },
}

/// Installs the global log subscriber and, if an OTLP endpoint is configured, trace export with
/// `service.name = service`. Call once, from `main`; keep the guard until the server has drained.
pub fn init(service: &'static str, args: &CommonArgs) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut guard = TelemetryGuard {
        service,
        provider: None,
        export_runtime: None,
    };
    let otel_layer = match args.trace_endpoint() {
        Some(endpoint) => {
            let (provider, rt) = tracer_provider(service, endpoint, args.otlp_ca.as_deref())?;
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(service))
                .with_threads(false)
                .with_filter(LevelFilter::INFO);
            guard.provider = Some(provider);
            guard.export_runtime = Some(rt);
            Some(layer)
        }
        None => None,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(JsonWithTraceIds(
                tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true),
            ))
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(otel_layer)
        .with(fmt)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    if let Some(endpoint) = args.trace_endpoint() {
        tracing::info!(%endpoint, service, "exporting traces over OTLP/gRPC");
    }
    Ok(guard)
}

/// The exporter's TLS for an `https://` endpoint: the CA bundle `ca` (--otlp-ca /
/// OTEL_EXPORTER_OTLP_CERTIFICATE) or the system's roots; `None` for plaintext.
fn otlp_tls(
    endpoint: &str,
    ca: Option<&std::path::Path>,
) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
    if !endpoint.trim().to_ascii_lowercase().starts_with("https://") {
        return Ok(None);
    }
    let tls = tonic::transport::ClientTlsConfig::new();
    Ok(Some(match ca {
        Some(path) => tls.ca_certificate(tonic::transport::Certificate::from_pem(
            crate::tls::files::read(path)?,
        )),
        None => tls.with_native_roots(),
    }))
}

fn tracer_provider(
    service: &'static str,
    endpoint: &str,
    ca: Option<&std::path::Path>,
) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), TelemetryError> {
    let err = |reason: String| TelemetryError::Otlp {
        endpoint: endpoint.to_string(),
        reason,
    };
    // The exporter's channel lives on this runtime: building it needs a runtime, and so does every
    // export, which the processor thread drives with `block_on`.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| err(e.to_string()))?;
    let exporter = {
        let _entered = rt.enter();
        let builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint);
        // https:// endpoints: verified against --otlp-ca, else the system's roots.
        let builder = match otlp_tls(endpoint, ca).map_err(err)? {
            Some(tls) => builder.with_tls_config(tls),
            None => builder,
        };
        builder
            .with_timeout(EXPORT_TIMEOUT)
            .with_compression(opentelemetry_otlp::Compression::Gzip)
            .build()
            .map_err(|e| err(e.to_string()))?
    };
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(MAX_QUEUED_SPANS)
                .with_max_export_batch_size(MAX_EXPORT_BATCH)
                .with_scheduled_delay(EXPORT_DELAY)
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource(service))
        .build();
    Ok((provider, rt))
}

/// `service.name` plus the standard process attributes, on top of what the SDK's detectors read from
/// `OTEL_RESOURCE_ATTRIBUTES` (e.g. `deployment.environment`, `k8s.pod.name`).
fn resource(service: &'static str) -> Resource {
    let mut attrs = vec![
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.namespace", "qwen-image"),
        KeyValue::new("service.instance.id", instance_id()),
        KeyValue::new("process.pid", i64::from(std::process::id())),
        KeyValue::new("process.runtime.name", "rust"),
        KeyValue::new("os.type", std::env::consts::OS),
        KeyValue::new("host.arch", std::env::consts::ARCH),
    ];
    if let Some(host) = host_name() {
        attrs.push(KeyValue::new("host.name", host));
    }
    if let Some(exe) = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    {
        attrs.push(KeyValue::new("process.executable.name", exe));
    }
    // `builder()` applies the SDK's detectors first; ours win: one process runs one role.
    Resource::builder()
        .with_attributes(attrs)
        .with_service_name(service)
        .build()
}

/// A random 128-bit id per process (std's hasher keys come from the OS's randomness).
fn instance_id() -> String {
    let word = || {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    };
    format!("{:016x}{:016x}", word(), word())
}

fn host_name() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
}

/// tracing-subscriber's JSON lines with `trace_id` and `span_id` (of the current span) in front.
struct JsonWithTraceIds(Format<Json>);

impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let ids = ctx.lookup_current().and_then(|_| {
            let cx = tracing::Span::current().context();
            let span = cx.span();
            let sc = span.span_context();
            sc.is_valid()
                .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
        });
        match (ids, line.strip_prefix('{')) {
            (Some((trace_id, span_id)), Some(rest)) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            _ => writer.write_str(&line),
        }
    }
}

/// Serves Prometheus `/metrics` on `addr` (port 0 picks one) and installs the global recorder with the
/// buckets of [`metric_names::HISTOGRAM_BUCKETS`]. Needs a tokio runtime; returns the bound address.
/// Call once, from `main`.
pub async fn serve_metrics(addr: SocketAddr) -> Result<SocketAddr, TelemetryError> {
    let err = |reason: String| TelemetryError::Metrics { addr, reason };
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
    for (name, buckets) in metric_names::HISTOGRAM_BUCKETS {
        builder = builder
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full((*name).to_string()),
                buckets,
            )
            .map_err(|e| err(e.to_string()))?;
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| err(e.to_string()))?;
    let bound = listener.local_addr().map_err(|e| err(e.to_string()))?;
    let handle = builder.install_recorder().map_err(|e| err(e.to_string()))?;
    metric_names::describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(METRICS_UPKEEP);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    tracing::info!(addr = %bound, "serving Prometheus metrics on /metrics");
    Ok(bound)
}
