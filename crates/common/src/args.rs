//! Flags every qwen-image binary shares; flattened into each binary's clap `Args`.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::tls::ServerTlsArgs;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Shared server flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Address the gRPC server listens on (HOST:PORT; port 0 picks a free port).
    #[arg(long, env = "QWEN_IMAGE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Address of the Prometheus `/metrics` endpoint (HOST:PORT). Not served when absent.
    #[arg(long, env = "QWEN_IMAGE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Log format.
    #[arg(long, value_enum, env = "QWEN_IMAGE_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// OTLP/gRPC endpoint traces are exported to (e.g. http://otel-collector:4317). Without it (and
    /// without OTEL_EXPORTER_OTLP_ENDPOINT) no span is exported.
    #[arg(long, env = "QWEN_IMAGE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// The OpenTelemetry SDK's standard variable, used when `--otlp-endpoint` is not given.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", hide = true)]
    pub otel_exporter_otlp_endpoint: Option<String>,

    /// PEM CA bundle that verifies an https:// OTLP endpoint (default: the system's roots).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    pub otlp_ca: Option<PathBuf>,

    /// TLS of the server (--tls-cert, --tls-key, --tls-client-ca) and its plaintext --health-listen.
    #[command(flatten)]
    pub tls: ServerTlsArgs,

    /// Do not serve gRPC reflection (grpc.reflection.v1 / v1alpha, on by default so that grpcurl and
    /// similar tools can list the services without the protos).
    #[arg(long, env = "QWEN_IMAGE_NO_REFLECTION")]
    pub no_reflection: bool,
}

impl CommonArgs {
    /// Shared flags with defaults: listen on `listen`, no metrics, text logs, no trace export.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            metrics_listen: None,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            otel_exporter_otlp_endpoint: None,
            otlp_ca: None,
            tls: ServerTlsArgs::default(),
            no_reflection: false,
        }
    }

    /// Where traces go: `--otlp-endpoint` / QWEN_IMAGE_OTLP_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT.
    /// Empty values count as unset.
    pub fn trace_endpoint(&self) -> Option<&str> {
        [&self.otlp_endpoint, &self.otel_exporter_otlp_endpoint]
            .into_iter()
            .flatten()
            .map(|s| s.trim())
            .find(|s| !s.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Probe {
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn parses_shared_flags() {
        let p = Probe::try_parse_from([
            "x",
            "--listen",
            "0.0.0.0:7",
            "--log-format",
            "json",
            "--metrics-listen",
            "127.0.0.1:9",
        ])
        .expect("valid flags");
        assert_eq!(p.common.listen.port(), 7);
        assert_eq!(p.common.log_format, LogFormat::Json);
        assert_eq!(p.common.metrics_listen.map(|a| a.port()), Some(9));
        assert!(Probe::try_parse_from(["x", "--log-format", "xml"]).is_err());
        let p = Probe::try_parse_from(["x", "--otel-exporter-otlp-endpoint", "http://b:4317"])
            .expect("valid");
        assert_eq!(p.common.trace_endpoint(), Some("http://b:4317"));
        let p = Probe::try_parse_from([
            "x",
            "--otlp-endpoint",
            "http://a:4317",
            "--otel-exporter-otlp-endpoint",
            "http://b:4317",
        ])
        .expect("valid");
        assert_eq!(p.common.trace_endpoint(), Some("http://a:4317"));
    }
}
