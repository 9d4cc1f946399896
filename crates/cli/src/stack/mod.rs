//! Running stage services and the gateway in this process, each a real gRPC server on its own listener.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use qwen_image_common::stage::{StageArgs, StageConfig, StageDef};
use qwen_image_common::tls::{Listeners, ServerTls, ServerTlsArgs};
use qwen_image_denoiser::{Denoiser, DenoiserArgs};
use qwen_image_gateway::GatewayArgs;
use qwen_image_pose_detector::{PoseDetectorArgs, PoseDetectorStage};
use qwen_image_text_encoder::{TextEncoder, TextEncoderArgs};
use qwen_image_vae::{Vae, VaeArgs};

/// One service of the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StageKind {
    TextEncoder,
    Denoiser,
    Vae,
    Gateway,
    PoseDetector,
}

impl StageKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::TextEncoder => "text-encoder",
            Self::Denoiser => "denoiser",
            Self::Vae => "vae",
            Self::Gateway => "gateway",
            Self::PoseDetector => "pose-detector",
        }
    }
}

/// The flags of the stack's services: the stages' shared flags (queue capacity, device; the model is the
/// stack's), their own (the denoiser's ControlNets, each stage's weights file, the tokenizer), and the
/// gateway's limits.
#[derive(Debug, Clone, Default)]
pub struct StageOptions {
    pub stage: StageArgs,
    pub denoiser: DenoiserArgs,
    pub text_encoder: TextEncoderArgs,
    pub vae: VaeArgs,
    /// The pose detector's weights (`--pose-weights`); the stack starts the detector when they exist.
    pub pose_detector: PoseDetectorArgs,
    /// Gateway flags whose endpoints are ignored (the stack's own stages are used).
    pub gateway: Option<GatewayArgs>,
    /// TLS: --tls-cert/--tls-key on every service, --tls-client-ca on the stages (mutual TLS with the
    /// gateway, whose --stage-* flags are in `gateway`), --health-listen for the gateway.
    pub tls: ServerTlsArgs,
    /// `--no-reflection`: no gRPC reflection on any of the stack's services.
    pub no_reflection: bool,
}

impl StageOptions {
    /// These options with the weight-file flags of `files` (the denoiser's other flags kept).
    pub fn with_weight_files(mut self, files: &crate::weights::WeightFilesArgs) -> Self {
        self.denoiser.weights = files.transformer.clone();
        self.text_encoder = files.text_encoder.clone();
        self.vae = files.vae.clone();
        self
    }

    /// Whether a stage reads a weights file or tokenizer given apart from the snapshot.
    pub fn has_weight_files(&self) -> bool {
        self.denoiser.weights.transformer_weights.is_some()
            || self.text_encoder.text_encoder_weights.is_some()
            || self.text_encoder.tokenizer.is_some()
            || self.vae.vae_weights.is_some()
    }
}

/// The configuration of stage `D` on `model` (none: single weight files with the released configs) from
/// the shared and its own flags.
fn config<D: StageDef>(
    model: Option<&Path>,
    stage: &StageArgs,
    own: D::Args,
) -> Result<StageConfig<D::Args>> {
    let mut stage = stage.clone();
    stage.model = model.map(Path::to_path_buf);
    D::config_from(&stage, own).map_err(anyhow::Error::msg)
}

/// Runs one model stage on `listener` until `shutdown`, through the stage library's own `run`.
pub async fn run_stage(
    kind: StageKind,
    model: Option<&Path>,
    listener: impl Into<Listeners>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: StageOptions,
) -> Result<()> {
    let s = &options.stage;
    match kind {
        StageKind::TextEncoder => {
            let c = config::<TextEncoder>(model, s, options.text_encoder)?;
            qwen_image_text_encoder::run(c, listener, shutdown).await?;
        }
        StageKind::Denoiser => {
            let c = config::<Denoiser>(model, s, options.denoiser)?;
            qwen_image_denoiser::run(c, listener, shutdown).await?;
        }
        StageKind::Vae => {
            let c = config::<Vae>(model, s, options.vae)?;
            qwen_image_vae::run(c, listener, shutdown).await?;
        }
        StageKind::PoseDetector => {
            let c = config::<PoseDetectorStage>(model, s, options.pose_detector)?;
            qwen_image_pose_detector::run(c, listener, shutdown).await?;
        }
        StageKind::Gateway => {
            bail!("the gateway is not a model stage; use qwen_image_gateway::run")
        }
    }
    Ok(())
}

/// A running in-process stack: three stages and a gateway on loopback ports.
pub struct LocalStack {
    pub gateway_addr: SocketAddr,
    /// With TLS: the CA that verifies every service (the gateway's --stage-ca).
    pub ca: Option<PathBuf>,
    pub stage_addrs: Vec<(StageKind, SocketAddr)>,
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<Result<()>>)>,
}

fn stop_signal(rx: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let a = l.local_addr()?;
    Ok((l, a))
}

impl LocalStack {
    /// Starts the three stages on `127.0.0.1:0` and the gateway on `gateway_listen`; `model` is the
    /// snapshot (`None`: every stage reads a weights file given in the options).
    #[allow(dead_code)] // the no-options entry point; current callers pass options
    pub async fn start(model: Option<PathBuf>, gateway_listen: &str) -> Result<Self> {
        Self::start_with(model, gateway_listen, StageOptions::default()).await
    }

    /// [`start`](Self::start) with stage options (queue capacity, the denoiser's ControlNets).
    pub async fn start_with(
        model: Option<PathBuf>,
        gateway_listen: &str,
        options: StageOptions,
    ) -> Result<Self> {
        let security = StackTls::load(&options)?;
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut stage_addrs = Vec::new();
        // The pose detector too, when its weights are there (`--pose-weights`, or the model's pose_detector/).
        let detector_weights = options.pose_detector.pose_weights.clone().or_else(|| {
            model
                .as_ref()
                .map(|m| m.join(qwen_image_pose_detector::WEIGHTS_IN_MODEL))
        });
        let mut kinds = vec![StageKind::TextEncoder, StageKind::Denoiser, StageKind::Vae];
        if detector_weights.as_ref().is_some_and(|w| w.is_file()) {
            kinds.push(StageKind::PoseDetector);
        }
        for kind in kinds {
            let (main, addr) = bind("127.0.0.1:0").await?;
            let listener = Listeners {
                main,
                tls: security.stages.clone(),
                health: None,
                reflection: !options.no_reflection,
            };
            let (model, shutdown) = (model.clone(), stop_signal(&stop_rx));
            let options = options.clone();
            tasks.push((
                kind.name(),
                tokio::spawn(async move {
                    run_stage(kind, model.as_deref(), listener, shutdown, options).await
                }),
            ));
            stage_addrs.push((kind, addr));
        }
        let url = |k: StageKind| {
            stage_addrs
                .iter()
                .find(|(s, _)| *s == k)
                .map(|(_, a)| security.url(*a))
                .unwrap_or_default()
        };
        let mut config = qwen_image_gateway::GatewayConfig::new(
            url(StageKind::TextEncoder),
            url(StageKind::Denoiser),
            url(StageKind::Vae),
        );
        config.pose_detector = stage_addrs
            .iter()
            .any(|(k, _)| *k == StageKind::PoseDetector)
            .then(|| url(StageKind::PoseDetector));
        if let Some(g) = &options.gateway {
            config.apply_options(g).map_err(anyhow::Error::msg)?;
        }
        // The stack's own stage TLS (read once in `StackTls`), whatever `apply_options` read.
        config.stage_tls = security.stage_client.clone();
        let (main, gateway_addr) = bind(gateway_listen).await?;
        let health = match options.tls.health_listen {
            Some(addr) => {
                let (l, bound) = bind(&addr.to_string()).await?;
                println!("health listening on {bound}");
                Some(l)
            }
            None => None,
        };
        let listener = Listeners {
            main,
            tls: security.gateway.clone(),
            health,
            reflection: !options.no_reflection,
        };
        let shutdown = stop_signal(&stop_rx);
        tasks.push((
            "gateway",
            tokio::spawn(
                async move { Ok(qwen_image_gateway::run(config, listener, shutdown).await?) },
            ),
        ));
        Ok(Self {
            gateway_addr,
            ca: security.ca.clone(),
            stage_addrs,
            stop,
            tasks,
        })
    }

    /// `http://127.0.0.1:PORT`, or with TLS `https://localhost:PORT` (the name the certificate must carry).
    pub fn gateway_url(&self) -> String {
        match self.ca {
            Some(_) => format!("https://localhost:{}", self.gateway_addr.port()),
            None => format!("http://{}", self.gateway_addr),
        }
    }

    /// The pose detector's URL, when the stack runs one.
    pub fn pose_detector_url(&self) -> Option<String> {
        self.stage_addrs
            .iter()
            .find(|(k, _)| *k == StageKind::PoseDetector)
            .map(|(_, a)| match self.ca {
                Some(_) => format!("https://localhost:{}", a.port()),
                None => format!("http://{a}"),
            })
    }

    /// Waits until the gateway (all stages loaded) and the pose detector, if any, report SERVING, or fails when
    /// a service ends first.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let url = self.gateway_url();
        let detector = self.pose_detector_url();
        let ca = self.ca.clone();
        let ready = async move {
            wait_serving(&url, ca.as_deref(), timeout).await?;
            match detector {
                Some(d) => wait_serving(&d, ca.as_deref(), timeout).await,
                None => Ok(()),
            }
        };
        tokio::pin!(ready);
        loop {
            if let Some(i) = self.tasks.iter().position(|(_, t)| t.is_finished()) {
                let (name, task) = self.tasks.remove(i);
                let r = task
                    .await
                    .map_err(|e| anyhow!("the {name} task panicked: {e}"))?;
                r.with_context(|| format!("the {name} service stopped"))?;
                bail!("the {name} service stopped before the stack was ready");
            }
            tokio::select! {
                r = &mut ready => return r,
                // Re-check the tasks every so often (a failed stage never turns the gateway SERVING).
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Stops every service and waits for them to drain.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        let mut first_error = None;
        for (name, task) in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e.context(format!("the {name} service failed")));
                }
                Err(e) => {
                    first_error.get_or_insert(anyhow!("the {name} task panicked: {e}"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Waits (through grpc.health.v1 `Watch`, no polling of the status) until `url` reports SERVING.
pub async fn wait_serving(url: &str, ca: Option<&Path>, timeout: Duration) -> Result<()> {
    let channel = qwen_image_common::tls::client::endpoint(url, ca)
        .map_err(anyhow::Error::msg)?
        .connect_lazy();
    let mut health = HealthClient::new(channel);
    let fut = async {
        loop {
            match health
                .watch(HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    while let Ok(Some(m)) = stream.message().await {
                        if m.status == ServingStatus::Serving as i32 {
                            return;
                        }
                    }
                }
                // Not accepting connections yet: try again shortly.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("{url} did not become SERVING within {timeout:?}"))
}

/// The stack's TLS: the stages' server config (requiring the gateway's certificate with
/// --tls-client-ca), the gateway's (no client certificate), and the gateway's stage client.
struct StackTls {
    stages: Option<ServerTls>,
    gateway: Option<ServerTls>,
    stage_client: Option<qwen_image_common::tls::StageClientTls>,
    ca: Option<PathBuf>,
}

impl StackTls {
    fn load(options: &StageOptions) -> Result<Self> {
        let stages = options.tls.load().map_err(anyhow::Error::msg)?;
        let client_args = options
            .gateway
            .as_ref()
            .map(|g| g.stage_tls.clone())
            .unwrap_or_default();
        let stage_client = client_args.load().map_err(anyhow::Error::msg)?;
        let gateway = match (&options.tls.tls_cert, &options.tls.tls_key) {
            (Some(c), Some(k)) => {
                Some(ServerTls::load(c.clone(), k.clone(), None).map_err(anyhow::Error::msg)?)
            }
            _ => None,
        };
        match (&stages, &stage_client) {
            (Some(_), None) => bail!(
                "with --tls-cert, the stack's gateway verifies its stages: add --stage-ca (the CA that signed \
                 --tls-cert; the certificate must name `localhost`), and with --tls-client-ca also \
                 --stage-client-cert/--stage-client-key"
            ),
            (None, Some(_)) => {
                bail!("--stage-ca is for a stack served over TLS: add --tls-cert and --tls-key")
            }
            _ => {}
        }
        Ok(Self {
            stages,
            gateway,
            stage_client,
            ca: client_args.stage_ca,
        })
    }

    /// A stage's URL: `https://localhost:PORT` with TLS (the certificate names `localhost`).
    fn url(&self, addr: SocketAddr) -> String {
        match self.stages {
            Some(_) => format!("https://localhost:{}", addr.port()),
            None => format!("http://{addr}"),
        }
    }
}
