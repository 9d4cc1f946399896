//! Command-line flags and the typed configuration `run` takes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qwen_image_common::args::CommonArgs;
use qwen_image_common::tls::{StageClientTls, StageClientTlsArgs};

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

    /// Period (milliseconds) of the DNS lookups of stage endpoints given by name (a Kubernetes headless
    /// Service): each address is one replica. 0 = names are not looked up (one replica per endpoint).
    #[arg(long, env = "QWEN_IMAGE_RESOLVE_INTERVAL_MS",
          default_value_t = crate::stages::discovery::DEFAULT_RESOLVE_INTERVAL.as_millis() as u64)]
    pub resolve_interval_ms: u64,

    /// Largest accepted width and height in pixels (at most 2048; sizes are multiples of the model's size
    /// multiple below it).
    #[arg(long, env = "QWEN_IMAGE_MAX_SIDE_PX", default_value_t = MAX_SIDE_PX,
          value_parser = clap::value_parser!(u32).range(16..=MAX_SIDE_PX as i64))]
    pub max_side_px: u32,

    /// Model name written into the PNG metadata (`model` text chunk); defaults to the text encoder's
    /// reported model id. Also the name requests give in `GenerationSettings.model` for the first model.
    #[arg(long, env = "QWEN_IMAGE_MODEL_NAME")]
    pub model_name: Option<String>,

    /// Another model behind this gateway (repeatable): `NAME=DENOISER_URLS`, its own denoiser replicas
    /// (comma-separated) sharing the text-encoder and VAE pools of `--text-encoder` / `--vae`, or
    /// `NAME=DENOISER_URLS;text-encoder=URLS;vae=URLS` with pools of its own. Requests name it in
    /// `GenerationSettings.model`; e.g. `--extra-model edit-2511=http://dn-edit:50052`.
    #[arg(
        long = "extra-model",
        env = "QWEN_IMAGE_EXTRA_MODELS",
        value_delimiter = ' '
    )]
    pub extra_model: Vec<String>,

    /// Area in pixels the Edit flow resizes each picture to for the text encoder (diffusers
    /// `CONDITION_IMAGE_SIZE`, 384 * 384). Change it only to match a reference made with another value.
    #[arg(long, env = "QWEN_IMAGE_EDIT_CONDITION_AREA", default_value_t = qwen_image_imaging::edit_sizes::CONDITION_IMAGE_SIZE,
          value_parser = clap::value_parser!(u64).range(1024..=4096 * 4096))]
    pub edit_condition_area: u64,

    /// Area in pixels the Edit flow resizes each picture to for its reference latents (diffusers
    /// `VAE_IMAGE_SIZE`, 1024 * 1024). Change it only to match a reference made with another value.
    #[arg(long, env = "QWEN_IMAGE_EDIT_VAE_AREA", default_value_t = qwen_image_imaging::edit_sizes::VAE_IMAGE_SIZE,
          value_parser = clap::value_parser!(u64).range(1024..=4096 * 4096))]
    pub edit_vae_area: u64,

    /// The pose-detector stage's endpoint URL, for Pose requests with a `reference_image` (without it they
    /// get FAILED_PRECONDITION).
    #[arg(long, env = "QWEN_IMAGE_POSE_DETECTOR")]
    pub pose_detector: Option<String>,

    /// API keys file: requests must send `authorization: Bearer KEY` with one of its keys (one key per
    /// line, or `NAME:SHA256HEX`; `#` comments). Health, reflection and the HTTP `/healthz`, `/readyz`,
    /// `/openapi.json` and web page stay open. Without it every caller is served.
    #[arg(long, env = "QWEN_IMAGE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Address of the OpenAI-compatible HTTP API and web page (HOST:PORT; port 0 picks a free port,
    /// printed as `http listening on ADDR`). Not served when absent.
    #[arg(long, env = "QWEN_IMAGE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// TLS towards the stages: --stage-ca, --stage-client-cert, --stage-client-key.
    #[command(flatten)]
    pub stage_tls: StageClientTlsArgs,
}

/// One more served model (`--extra-model`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The name requests use.
    pub name: String,
    pub denoiser: Vec<String>,
    /// Its own text-encoder / VAE endpoints; `None` = the first model's pools (shared).
    pub text_encoder: Option<Vec<String>>,
    pub vae: Option<Vec<String>>,
}

fn url_list(flag: &str, v: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = v
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(format!("{flag}: no endpoint URL"));
    }
    Ok(urls)
}

impl std::str::FromStr for ModelSpec {
    type Err = String;

    /// `NAME=DENOISER_URLS[;text-encoder=URLS][;vae=URLS]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "--extra-model NAME=DENOISER_URLS[;text-encoder=URLS][;vae=URLS]";
        let mut parts = s.split(';');
        let head = parts.next().unwrap_or_default();
        let (name, denoiser) = head
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected {usage}"))?;
        let name = name.trim();
        if name.is_empty() || name.len() > 128 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "`{s}`: the model name must be 1..=128 printable ASCII characters ({usage})"
            ));
        }
        let mut spec = Self {
            name: name.to_string(),
            denoiser: url_list(&format!("--extra-model {name}: denoiser"), denoiser)?,
            text_encoder: None,
            vae: None,
        };
        for part in parts {
            match part.split_once('=') {
                Some(("text-encoder", v)) => {
                    spec.text_encoder =
                        Some(url_list(&format!("--extra-model {name}: text-encoder"), v)?)
                }
                Some(("vae", v)) => {
                    spec.vae = Some(url_list(&format!("--extra-model {name}: vae"), v)?)
                }
                _ => return Err(format!("`{s}`: unknown part `{part}` ({usage})")),
            }
        }
        Ok(spec)
    }
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
    /// Period of the DNS lookups of endpoints given by name; zero = never looked up.
    pub resolve_interval: Duration,
    /// Largest accepted width / height in pixels.
    pub max_side_px: u32,
    /// Model name for the PNG metadata; `None` = the text encoder's `model_id`.
    pub model_name: Option<String>,
    /// More served models (`--extra-model`), after the first one above.
    pub extra_models: Vec<ModelSpec>,
    /// The Edit flow's picture areas (diffusers `CONDITION_IMAGE_SIZE`, `VAE_IMAGE_SIZE`).
    pub edit_condition_area: u64,
    pub edit_vae_area: u64,
    /// The pose-detector stage's URL (`PoseRequest.reference_image`); `None` = not available.
    pub pose_detector: Option<String>,
    /// Accepted API keys; `None` = no authentication.
    pub api_keys: Option<Arc<ApiKeys>>,
    /// Where the HTTP API listens; `None` = no HTTP API.
    pub http_listen: Option<SocketAddr>,
    /// Serve gRPC reflection (the gateway binary's `--no-reflection`, in the shared flags, turns it off
    /// through its listeners; this is the in-process switch).
    pub reflection: bool,
    /// TLS towards the stages (their URLs are then https://); `None`: plaintext.
    pub stage_tls: Option<StageClientTls>,
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
            resolve_interval: crate::stages::discovery::DEFAULT_RESOLVE_INTERVAL,
            max_side_px: MAX_SIDE_PX,
            model_name: None,
            extra_models: Vec::new(),
            edit_condition_area: qwen_image_imaging::edit_sizes::CONDITION_IMAGE_SIZE,
            edit_vae_area: qwen_image_imaging::edit_sizes::VAE_IMAGE_SIZE,
            pose_detector: None,
            api_keys: None,
            http_listen: None,
            reflection: true,
            stage_tls: None,
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
        self.stage_tls = a.stage_tls.load()?;
        self.resolve_interval = Duration::from_millis(a.resolve_interval_ms);
        self.extra_models = a
            .extra_model
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.parse())
            .collect::<Result<Vec<ModelSpec>, String>>()?;
        self.edit_condition_area = a.edit_condition_area;
        self.edit_vae_area = a.edit_vae_area;
        if let Some(url) = a
            .pose_detector
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            self.pose_detector = Some(url.to_string());
        }
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

    #[test]
    fn parses_extra_models() {
        let a = Args::try_parse_from([
            "x",
            "--text-encoder",
            "http://a:1",
            "--denoiser",
            "http://d:1",
            "--vae",
            "http://v:1",
            "--extra-model",
            "edit=http://e:1,http://e:2",
            "--extra-model",
            "other=http://o:1;text-encoder=http://t:2;vae=http://v:2",
        ])
        .expect("valid flags");
        let c = GatewayConfig::try_from(&a.gateway).expect("complete");
        assert_eq!(c.extra_models.len(), 2);
        assert_eq!(c.extra_models[0].name, "edit");
        assert_eq!(c.extra_models[0].denoiser, vec!["http://e:1", "http://e:2"]);
        assert_eq!(c.extra_models[0].text_encoder, None);
        assert_eq!(c.extra_models[1].vae, Some(vec!["http://v:2".to_string()]));
        assert_eq!(c.edit_vae_area, 1024 * 1024);
        for bad in ["noname", "=http://e:1", "e=", "e=http://x;gpu=1"] {
            assert!(bad.parse::<ModelSpec>().is_err(), "{bad}");
        }
    }
}
