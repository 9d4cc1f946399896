//! Flags every qwen-image binary shares; flattened into each binary's clap `Args`.

use std::net::SocketAddr;

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

    /// OTLP/gRPC endpoint for traces (e.g. http://otel-collector:4317). Trace export is not implemented
    /// yet: the flag is accepted and logged.
    #[arg(long, env = "QWEN_IMAGE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
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
    }
}
