//! The four services as separate processes on 127.0.0.1:0, for end-to-end tests: the real stage binaries
//! with their own flags (`qwen-image-text-encoder --model ...`, ...) or `qwen-image serve --stage X`.

use std::path::{Path, PathBuf};

use crate::process::{ServiceProcess, workspace_binary};
use crate::service::{GUARD, wait_serving};

/// How the services are started.
#[derive(Debug, Clone)]
pub enum Launcher {
    /// The stage binaries themselves (`qwen-image-text-encoder`, `qwen-image-denoiser`, `qwen-image-vae`,
    /// `qwen-image-gateway`).
    StageBinaries,
    /// `qwen-image serve --stage X` of this `qwen-image` binary.
    Cli(PathBuf),
}

/// What to start: a model per stage (`None` = no `--model`: with [`Launcher::Cli`] the default model,
/// or the stage's weight files given in its extra flags) and extra flags per service.
#[derive(Debug, Clone, Default)]
pub struct StackSpec {
    pub text_encoder_model: Option<PathBuf>,
    pub denoiser_model: Option<PathBuf>,
    pub vae_model: Option<PathBuf>,
    pub text_encoder_args: Vec<String>,
    pub denoiser_args: Vec<String>,
    pub vae_args: Vec<String>,
    pub gateway_args: Vec<String>,
    /// Environment of every service (e.g. `RUST_LOG`, an OTLP endpoint).
    pub env: Vec<(String, String)>,
    /// Extra flags of every service (e.g. `--metrics-listen 127.0.0.1:0`).
    pub common_args: Vec<String>,
}

impl StackSpec {
    /// Every stage on `model`.
    pub fn model(model: &Path) -> Self {
        Self {
            text_encoder_model: Some(model.to_path_buf()),
            denoiser_model: Some(model.to_path_buf()),
            vae_model: Some(model.to_path_buf()),
            ..Self::default()
        }
    }
}

/// The running services (killed when dropped).
pub struct ProcessStack {
    pub text_encoder: ServiceProcess,
    pub denoiser: ServiceProcess,
    pub vae: ServiceProcess,
    pub gateway: ServiceProcess,
}

async fn spawn(
    launcher: &Launcher,
    service: &str,
    args: Vec<String>,
    spec: &StackSpec,
) -> Result<ServiceProcess, String> {
    let mut full: Vec<String> = Vec::new();
    let program = match launcher {
        Launcher::StageBinaries => workspace_binary(&format!("qwen-image-{service}")),
        Launcher::Cli(bin) => {
            full.extend(["serve".into(), "--stage".into(), service.into()]);
            bin.clone()
        }
    };
    full.extend(["--listen".into(), "127.0.0.1:0".into()]);
    full.extend(spec.common_args.iter().cloned());
    full.extend(args);
    let args: Vec<&str> = full.iter().map(String::as_str).collect();
    let mut env: Vec<(&str, &str)> = vec![("RUST_LOG", "warn")];
    env.extend(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    ServiceProcess::spawn(&program, &args, &env, GUARD).await
}

fn model_flag(model: &Option<PathBuf>) -> Vec<String> {
    match model {
        Some(m) => vec!["--model".into(), m.display().to_string()],
        None => Vec::new(),
    }
}

impl ProcessStack {
    /// Starts the four services; does not wait for SERVING.
    pub async fn start(launcher: Launcher, spec: &StackSpec) -> Result<Self, String> {
        let mut te_args = model_flag(&spec.text_encoder_model);
        te_args.extend(spec.text_encoder_args.iter().cloned());
        let te = spawn(&launcher, "text-encoder", te_args, spec).await?;
        let mut dn_args = model_flag(&spec.denoiser_model);
        dn_args.extend(spec.denoiser_args.iter().cloned());
        let dn = spawn(&launcher, "denoiser", dn_args, spec).await?;
        let mut vae_args = model_flag(&spec.vae_model);
        vae_args.extend(spec.vae_args.iter().cloned());
        let vae = spawn(&launcher, "vae", vae_args, spec).await?;
        let mut gw_args = vec![
            "--text-encoder".to_string(),
            te.url(),
            "--denoiser".into(),
            dn.url(),
            "--vae".into(),
            vae.url(),
        ];
        gw_args.extend(spec.gateway_args.iter().cloned());
        let gateway = spawn(&launcher, "gateway", gw_args, spec).await?;
        Ok(Self {
            text_encoder: te,
            denoiser: dn,
            vae,
            gateway,
        })
    }

    /// [`ProcessStack::start`], then waits until the gateway is SERVING (every stage loaded and fitting).
    pub async fn serving(launcher: Launcher, spec: &StackSpec) -> Result<Self, String> {
        let stack = Self::start(launcher, spec).await?;
        wait_serving(&stack.gateway.url(), "", GUARD).await?;
        Ok(stack)
    }

    pub fn gateway_url(&self) -> String {
        self.gateway.url()
    }
}
