//! `qwen-image serve`: the whole stack in one process (three stages + gateway on loopback ports), or one
//! service with `--stage`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use qwen_image_common::args::CommonArgs;
use qwen_image_common::stage::StageArgs;
use qwen_image_denoiser::{ControlNetSpec, DenoiserArgs};
use qwen_image_gateway::GatewayArgs;
use qwen_image_pose_detector::PoseDetectorArgs;
use qwen_image_text_encoder::TextEncoderArgs;
use qwen_image_vae::VaeArgs;

use crate::model_dir::default_model_dir;
use crate::stack::{LocalStack, StageKind, StageOptions, run_stage};

/// `qwen-image serve`: the flags of every service, flattened from the services' own flag structs (so they
/// are the same flags as the stage binaries' and cannot drift).
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// `--listen` is the gateway's address (or the one service's with `--stage`).
    #[command(flatten)]
    pub common: CommonArgs,

    /// Run only this service (for deployments and tests that want separate processes).
    #[arg(long, value_enum, env = "QWEN_IMAGE_STAGE")]
    pub stage: Option<StageKind>,

    /// The stages' flags (`--model`, default: the embedded default model; `--queue-capacity`; `--device`).
    #[command(flatten)]
    pub stage_args: StageArgs,

    /// The denoiser's flags (`--transformer-weights`, `--controlnet`): whole stack or `--stage denoiser`.
    #[command(flatten)]
    pub denoiser: DenoiserArgs,

    /// The text encoder's flags (`--text-encoder-weights`, `--tokenizer`, `--embedding-cache-mb`): whole stack or
    /// `--stage text-encoder`.
    #[command(flatten)]
    pub text_encoder: TextEncoderArgs,

    /// The VAE's flags (`--vae-weights`): whole stack or `--stage vae`.
    #[command(flatten)]
    pub vae: VaeArgs,

    /// The pose detector's flags (`--pose-weights`): the whole stack starts the detector when its weights exist
    /// (this file, or the model's `pose_detector/body_pose_model.safetensors`); or `--stage pose-detector`.
    #[command(flatten)]
    pub pose_detector: PoseDetectorArgs,

    /// The gateway's flags: its stage endpoints with `--stage gateway`; its limits in both modes.
    #[command(flatten)]
    pub gateway: GatewayArgs,

    /// How long to wait for the stack to load its models and report SERVING.
    #[arg(long, env = "QWEN_IMAGE_READY_TIMEOUT_SECS", default_value_t = 600)]
    pub ready_timeout_secs: u64,
}

/// The model to serve and the ControlNets to load: without `--model`, the embedded default model, with its
/// pose ControlNet (`controlnet/`, requests name it `controlnet`) unless `--controlnet` names others; but no
/// snapshot at all when weight files are given (`--transformer-weights`, ...: the released configs).
fn model_and_controlnets(
    model: Option<PathBuf>,
    controlnets: Vec<ControlNetSpec>,
    weight_files: bool,
) -> Result<(Option<PathBuf>, Vec<ControlNetSpec>)> {
    if model.is_some() || weight_files {
        return Ok((model, controlnets));
    }
    let model = default_model_dir()?;
    let dir = model.join("controlnet");
    if controlnets.is_empty() && dir.join("config.json").is_file() {
        let spec = ControlNetSpec {
            id: "controlnet".into(),
            dir,
        };
        return Ok((Some(model), vec![spec]));
    }
    Ok((Some(model), controlnets))
}

/// Flags that only one service takes are refused for the others (rather than ignored).
fn check_flags(args: &ServeArgs) -> Result<()> {
    let g = &args.gateway;
    let endpoints = !(g.text_encoder.is_empty() && g.denoiser.is_empty() && g.vae.is_empty());
    match args.stage {
        Some(StageKind::Gateway) => {}
        Some(_) | None if endpoints => bail!(
            "--text-encoder, --denoiser and --vae are for `--stage gateway`; the whole stack uses its own stages"
        ),
        _ => {}
    }
    let own = [
        (
            "--controlnet",
            !args.denoiser.controlnets.is_empty(),
            StageKind::Denoiser,
        ),
        (
            "--transformer-weights",
            args.denoiser.weights.transformer_weights.is_some(),
            StageKind::Denoiser,
        ),
        (
            "--text-encoder-weights",
            args.text_encoder.text_encoder_weights.is_some(),
            StageKind::TextEncoder,
        ),
        (
            "--tokenizer",
            args.text_encoder.tokenizer.is_some(),
            StageKind::TextEncoder,
        ),
        (
            "--vae-weights",
            args.vae.vae_weights.is_some(),
            StageKind::Vae,
        ),
        (
            "--pose-weights",
            args.pose_detector.pose_weights.is_some(),
            StageKind::PoseDetector,
        ),
    ];
    for (flag, given, kind) in own {
        if given && args.stage.is_some() && args.stage != Some(kind) {
            bail!(
                "{flag} is a {} flag: use it with `--stage {}` or for the whole stack",
                kind.name(),
                kind.name()
            );
        }
    }
    let t = &g.stage_tls;
    let stage_client_tls =
        t.stage_ca.is_some() || t.stage_client_cert.is_some() || t.stage_client_key.is_some();
    if stage_client_tls && matches!(args.stage, Some(k) if k != StageKind::Gateway) {
        bail!(
            "--stage-ca, --stage-client-cert and --stage-client-key are the gateway's: use them with \
             `--stage gateway` or for the whole stack"
        );
    }
    Ok(())
}

/// The snapshot (see [`model_and_controlnets`]) and the stage options from the stage flags.
fn stage_options(
    stage: StageArgs,
    denoiser: DenoiserArgs,
    text_encoder: TextEncoderArgs,
    vae: VaeArgs,
    pose_detector: PoseDetectorArgs,
    tls: qwen_image_common::tls::ServerTlsArgs,
    gateway: Option<GatewayArgs>,
) -> Result<(Option<PathBuf>, StageOptions)> {
    let mut options = StageOptions {
        stage,
        denoiser,
        text_encoder,
        vae,
        pose_detector,
        gateway,
        tls,
        no_reflection: false,
    };
    let (model, controlnets) = model_and_controlnets(
        options.stage.model.clone(),
        std::mem::take(&mut options.denoiser.controlnets),
        options.has_weight_files(),
    )?;
    options.denoiser.controlnets = controlnets;
    Ok((model, options))
}

/// `service.name` of the traces: the binary name of the one service, or `qwen-image` for the whole stack
/// in one process.
fn service_name(stage: Option<StageKind>) -> &'static str {
    match stage {
        Some(StageKind::Gateway) => "qwen-image-gateway",
        Some(StageKind::TextEncoder) => "qwen-image-text-encoder",
        Some(StageKind::Denoiser) => "qwen-image-denoiser",
        Some(StageKind::Vae) => "qwen-image-vae",
        Some(StageKind::PoseDetector) => "qwen-image-pose-detector",
        None => "qwen-image",
    }
}

pub fn run(args: ServeArgs) -> Result<std::process::ExitCode> {
    // Declared before the runtime, so dropped after it: the guard flushes spans on its own thread.
    let _telemetry = qwen_image_common::telemetry::init(service_name(args.stage), &args.common)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args))?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs) -> Result<()> {
    check_flags(&args)?;
    if let Some(addr) = args.common.metrics_listen {
        let bound = qwen_image_common::telemetry::serve_metrics(addr).await?;
        // Machine-readable line for scripts and tests (logs go to stderr).
        println!("metrics listening on {bound}");
    }
    let listen = args.common.listen.to_string();
    let bind = || async {
        qwen_image_common::launch::bind(&args.common)
            .await
            .map_err(anyhow::Error::msg)
    };
    match args.stage {
        Some(StageKind::Gateway) => {
            let config = qwen_image_gateway::GatewayConfig::try_from(&args.gateway)
                .map_err(anyhow::Error::msg)?;
            qwen_image_gateway::run(config, bind().await?, qwen_image_common::shutdown::signal())
                .await?;
        }
        Some(kind) => {
            let (model, options) = stage_options(
                args.stage_args,
                args.denoiser,
                args.text_encoder,
                args.vae,
                args.pose_detector,
                args.common.tls.clone(),
                None,
            )?;
            let listener = bind().await?;
            run_stage(
                kind,
                model.as_deref(),
                listener,
                qwen_image_common::shutdown::signal(),
                options,
            )
            .await?;
        }
        None => {
            let (model, mut options) = stage_options(
                args.stage_args,
                args.denoiser,
                args.text_encoder,
                args.vae,
                args.pose_detector,
                args.common.tls.clone(),
                Some(args.gateway),
            )?;
            options.no_reflection = args.common.no_reflection;
            let mut stack = LocalStack::start_with(model.clone(), &listen, options).await?;
            for (kind, addr) in &stack.stage_addrs {
                println!("{} listening on {addr}", kind.name());
            }
            println!("listening on {}", stack.gateway_addr);
            match &model {
                Some(m) => eprintln!("loading {} ...", m.display()),
                None => eprintln!("loading the weight files (released Qwen-Image configs) ..."),
            }
            let stop = qwen_image_common::shutdown::signal();
            tokio::pin!(stop);
            tokio::select! {
                r = stack.wait_ready(Duration::from_secs(args.ready_timeout_secs)) => {
                    r?;
                    eprintln!("ready: send requests to {} (ctrl-c to stop)", stack.gateway_url());
                    stop.as_mut().await;
                }
                () = stop.as_mut() => {}
            }
            stack.shutdown().await?;
        }
    }
    Ok(())
}
