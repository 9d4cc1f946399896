//! Logging (and later trace export) set up in one place. `RUST_LOG` selects levels (default `info`).

use std::net::SocketAddr;

use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

use crate::args::{CommonArgs, LogFormat};

/// Flushes telemetry on drop. Trace export is a later issue; today it only marks the end of the process.
#[must_use = "dropping the guard ends telemetry"]
pub struct TelemetryGuard {
    service: &'static str,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        tracing::debug!(service = self.service, "telemetry shut down");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(String),
    #[error("cannot start the metrics endpoint on {addr}: {reason}")]
    Metrics { addr: SocketAddr, reason: String },
}

/// Installs the global log subscriber (text or JSON lines on stderr). Call once, from `main`.
pub fn init(service: &'static str, args: &CommonArgs) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match args.log_format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    result.map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    if let Some(endpoint) = &args.otlp_endpoint {
        tracing::warn!(%endpoint, "OTLP trace export is not implemented yet; traces are not exported");
    }
    Ok(TelemetryGuard { service })
}

/// Serves Prometheus `/metrics` on `addr` (needs a tokio runtime). Call once, from `main`.
pub fn serve_metrics(addr: SocketAddr) -> Result<(), TelemetryError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| TelemetryError::Metrics {
            addr,
            reason: e.to_string(),
        })
}
