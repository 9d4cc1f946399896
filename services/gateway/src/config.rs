//! Command-line flags and the typed configuration `run` takes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qwen_image_common::args::CommonArgs;

use crate::auth::ApiKeys;

/// Default deadline of a request whose caller sent no `grpc-timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Default bound of the requests in the gateway at once (running or waiting for a stage).
pub const DEFAULT_MAX_QUEUED: u32 = 64;
/// Default period of the stage health checks.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
pub use crate::request::settings::MAX_SIDE_PX;

/// The qwen-image gateway: the public `qwen_image.v1.ImageGenerator` API over the stage services.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "qwen-image-gateway", version, about)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// Gateway flags (also flattened into `qwen-image serve`, where the stage endpoints are those of the stages
/// it starts unless given).
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Text-encoder stage endpoint(s): comma-separated URLs, e.g. `http://te-0:50051,http://te-1:50051`.
    /// Required.
    #[arg(long, env = "QWEN_IMAGE_TEXT_ENCODER", value_delimiter = ',')]
    pub text_encoder: Vec<String>,

    /// Denoiser stage endpoint(s): comma-separated URLs. Required.
    #[arg(long, env = "QWEN_IMAGE_DENOISER", value_delimiter = ',')]
    pub denoiser: Vec<String>,

    /// VAE stage endpoint(s): comma-separated URLs. Required.
    #[arg(long, env = "QWEN_IMAGE_VAE", value_delimiter = ',')]
    pub vae: Vec<String>,

    /// Deadline (seconds) of a request whose caller sent none; the caller's shorter deadline wins.
    #[arg(long, env = "QWEN_IMAGE_REQUEST_TIMEOUT_SECS", default_value_t = DEFAULT_REQUEST_TIMEOUT.as_secs())]
    pub request_timeout_secs: u64,

    /// Requests in the gateway at once, running or waiting for a stage slot; more are refused at once with
    /// RESOURCE_EXHAUSTED and a `retry-after-ms` hint.
    #[arg(long, env = "QWEN_IMAGE_MAX_QUEUED", default_value_t = DEFAULT_MAX_QUEUED,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_queued: u32,

    /// Period (milliseconds) of the health checks of every stage replica.
    #[arg(long, env = "QWEN_IMAGE_HEALTH_INTERVAL_MS", default_value_t = DEFAULT_HEALTH_INTERVAL.as_millis() as u64)]
    pub health_interval_ms: u64,

    /// Largest accepted width and height in pixels (at most 2048; sizes are multiples of the model's size
    /// multiple below it).
    #[arg(long, env = "QWEN_IMAGE_MAX_SIDE_PX", default_value_t = MAX_SIDE_PX,
          value_parser = clap::value_parser!(u32).range(16..=MAX_SIDE_PX as i64))]
    pub max_side_px: u32,

    /// Model name written into the PNG metadata (`model` text chunk); defaults to the text encoder's
    /// reported model id.
    #[arg(long, env = "QWEN_IMAGE_MODEL_NAME")]
    pub model_name: Option<String>,

    /// API keys file: requests must send `authorization: Bearer KEY` with one of its keys (one key per
    /// line, or `NAME:SHA256HEX`; `#` comments). Health, reflection and the HTTP `/healthz`, `/readyz`,
    /// `/openapi.json` and web page stay open. Without it every caller is served.
    #[arg(long, env = "QWEN_IMAGE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Address of the OpenAI-compatible HTTP API and web page (HOST:PORT; port 0 picks a free port,
    /// printed as `http listening on ADDR`). Not served when absent.
    #[arg(long, env = "QWEN_IMAGE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// Do not serve gRPC reflection (served by default, without an API key, for grpcurl and similar tools).
    #[arg(long, env = "QWEN_IMAGE_NO_REFLECTION")]
    pub no_reflection: bool,
}

/// What `run` needs (everything but the listener and the shutdown signal).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Stage endpoints (URLs such as `http://127.0.0.1:50051`), at least one each.
    pub text_encoder: Vec<String>,
    pub denoiser: Vec<String>,
    pub vae: Vec<String>,
    /// Deadline of a request whose caller sent none.
    pub request_timeout: Duration,
    /// Requests in the gateway at once (running or waiting); more get RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// Period of the stage health checks.
    pub health_interval: Duration,
    /// Largest accepted width / height in pixels.
    pub max_side_px: u32,
    /// Model name for the PNG metadata; `None` = the text encoder's `model_id`.
    pub model_name: Option<String>,
    /// Accepted API keys; `None` = no authentication.
    pub api_keys: Option<Arc<ApiKeys>>,
    /// Where the HTTP API listens; `None` = no HTTP API.
    pub http_listen: Option<SocketAddr>,
    /// Serve gRPC reflection (`--no-reflection` turns it off).
    pub reflection: bool,
}

impl GatewayConfig {
    /// One endpoint per stage, default limits.
    pub fn new(
        text_encoder: impl Into<String>,
        denoiser: impl Into<String>,
        vae: impl Into<String>,
    ) -> Self {
        Self {
            text_encoder: vec![text_encoder.into()],
            denoiser: vec![denoiser.into()],
            vae: vec![vae.into()],
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_queued: DEFAULT_MAX_QUEUED as usize,
            health_interval: DEFAULT_HEALTH_INTERVAL,
            max_side_px: MAX_SIDE_PX,
            model_name: None,
            api_keys: None,
            http_listen: None,
            reflection: true,
        }
    }

    /// Takes every flag of `a` but the stage endpoints (limits, queue bound, model name, API keys, HTTP
    /// address, reflection); reads the API keys file.
    pub fn apply_options(&mut self, a: &GatewayArgs) -> Result<(), String> {
        self.request_timeout = Duration::from_secs(a.request_timeout_secs.max(1));
        self.max_queued = a.max_queued as usize;
        self.health_interval = Duration::from_millis(a.health_interval_ms.max(10));
        self.max_side_px = a.max_side_px;
        self.model_name = a.model_name.clone();
        self.api_keys = match &a.api_keys_file {
            Some(path) => Some(Arc::new(ApiKeys::load(path)?)),
            None => None,
        };
        self.http_listen = a.http_listen;
        self.reflection = !a.no_reflection;
        Ok(())
    }
}

impl TryFrom<&GatewayArgs> for GatewayConfig {
    type Error = String;

    /// Every stage needs at least one endpoint.
    fn try_from(a: &GatewayArgs) -> Result<Self, String> {
        let clean = |flag: &str, v: &[String]| -> Result<Vec<String>, String> {
            let v: Vec<String> = v
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if v.is_empty() {
                return Err(format!(
                    "--{flag} is required: the stage's endpoint URL(s), e.g. http://127.0.0.1:50052"
                ));
            }
            Ok(v)
        };
        let mut c = Self::new("", "", "");
        c.text_encoder = clean("text-encoder", &a.text_encoder)?;
        c.denoiser = clean("denoiser", &a.denoiser)?;
        c.vae = clean("vae", &a.vae)?;
        c.apply_options(a)?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn parses_endpoint_lists() {
        let a = Args::try_parse_from([
            "x",
            "--listen",
            "127.0.0.1:0",
            "--text-encoder",
            "http://a:1",
            "--denoiser",
            "http://d:1, http://d:2",
            "--vae",
            "http://v:1",
        ])
        .expect("valid flags");
        let c = GatewayConfig::try_from(&a.gateway).expect("complete");
        assert_eq!(c.denoiser, vec!["http://d:1", "http://d:2"]);
        assert_eq!(c.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(c.max_queued, DEFAULT_MAX_QUEUED as usize);
        let partial = Args::try_parse_from(["x", "--denoiser", "http://d:1"]).expect("parses");
        let e = GatewayConfig::try_from(&partial.gateway).expect_err("incomplete");
        assert!(e.contains("--text-encoder is required"), "{e}");
        assert!(
            Args::try_parse_from([
                "x",
                "--text-encoder",
                "a",
                "--denoiser",
                "b",
                "--vae",
                "c",
                "--max-side-px",
                "4096"
            ])
            .is_err()
        );
    }
}
