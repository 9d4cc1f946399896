//! `qwen-image serve`: the whole stack in one process (three stages + gateway on loopback ports), or one
//! service with `--stage`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use clap::builder::TypedValueParser as _;
use qwen_image_common::args::CommonArgs;
use tokio::net::TcpListener;

use crate::model_dir::default_model_dir;
use crate::stack::{LocalStack, StageKind, StageOptions, run_stage};
use qwen_image_denoiser::config::ControlNetSpec;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// `--listen` is the gateway's address (or the one stage's with `--stage`).
    #[command(flatten)]
    pub common: CommonArgs,

    /// Diffusers snapshot directory. Default: the embedded default model.
    #[arg(long, env = "QWEN_IMAGE_MODEL")]
    pub model: Option<PathBuf>,

    /// Run only this service (for deployments and tests that want separate processes).
    #[arg(long, value_enum, env = "QWEN_IMAGE_STAGE")]
    pub stage: Option<StageKind>,

    /// With `--stage gateway`: text-encoder endpoint(s), comma-separated URLs.
    #[arg(long, env = "QWEN_IMAGE_TEXT_ENCODER", value_delimiter = ',')]
    pub text_encoder: Vec<String>,

    /// With `--stage gateway`: denoiser endpoint(s), comma-separated URLs.
    #[arg(long, env = "QWEN_IMAGE_DENOISER", value_delimiter = ',')]
    pub denoiser: Vec<String>,

    /// With `--stage gateway`: VAE endpoint(s), comma-separated URLs.
    #[arg(long, env = "QWEN_IMAGE_VAE", value_delimiter = ',')]
    pub vae: Vec<String>,

    /// With `--stage text-encoder|denoiser|vae`: requests admitted at once (running + waiting); more get
    /// RESOURCE_EXHAUSTED. Default: the service's own.
    #[arg(long, env = "QWEN_IMAGE_QUEUE_CAPACITY", value_parser = clap::value_parser!(u16).range(1..).map(|v| v as usize))]
    pub queue_capacity: Option<usize>,

    /// ControlNet for the denoiser to load (diffusers folder, e.g. InstantX/Qwen-Image-ControlNet-Union), as
    /// `DIR` (requests name it by the folder name) or `NAME=DIR`. Repeatable. Whole stack or `--stage denoiser`.
    #[arg(long = "controlnet", env = "QWEN_IMAGE_CONTROLNETS", value_delimiter = ',',
          value_parser = qwen_image_denoiser::config::parse_controlnet)]
    pub controlnets: Vec<qwen_image_denoiser::config::ControlNetSpec>,

    /// How long to wait for the stack to load its models and report SERVING.
    #[arg(long, env = "QWEN_IMAGE_READY_TIMEOUT_SECS", default_value_t = 600)]
    pub ready_timeout_secs: u64,
}

/// The model to serve and the ControlNets to load: without `--model`, the embedded default model, with its
/// pose ControlNet (`controlnet/`, requests name it `controlnet`) unless `--controlnet` names others.
fn model_and_controlnets(
    model: Option<PathBuf>,
    controlnets: Vec<ControlNetSpec>,
) -> Result<(PathBuf, Vec<ControlNetSpec>)> {
    if let Some(m) = model {
        return Ok((m, controlnets));
    }
    let model = default_model_dir()?;
    let dir = model.join("controlnet");
    if controlnets.is_empty() && dir.join("config.json").is_file() {
        let spec = ControlNetSpec {
            id: "controlnet".into(),
            dir,
        };
        return Ok((model, vec![spec]));
    }
    Ok((model, controlnets))
}

/// `service.name` of the traces: the binary name of the one service, or `qwen-image` for the whole stack
/// in one process.
fn service_name(stage: Option<StageKind>) -> &'static str {
    match stage {
        Some(StageKind::Gateway) => "qwen-image-gateway",
        Some(StageKind::TextEncoder) => "qwen-image-text-encoder",
        Some(StageKind::Denoiser) => "qwen-image-denoiser",
        Some(StageKind::Vae) => "qwen-image-vae",
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
    if let Some(addr) = args.common.metrics_listen {
        let bound = qwen_image_common::telemetry::serve_metrics(addr).await?;
        // Machine-readable line for scripts and tests (logs go to stderr).
        println!("metrics listening on {bound}");
    }
    let listen = args.common.listen.to_string();
    match args.stage {
        Some(StageKind::Gateway) => {
            if args.text_encoder.is_empty() || args.denoiser.is_empty() || args.vae.is_empty() {
                bail!("--stage gateway needs --text-encoder, --denoiser and --vae endpoint URLs");
            }
            let mut config = qwen_image_gateway::GatewayConfig::new("", "", "");
            config.text_encoder = args.text_encoder;
            config.denoiser = args.denoiser;
            config.vae = args.vae;
            let listener = TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!("listening on {}", listener.local_addr()?);
            qwen_image_gateway::run(config, listener, qwen_image_common::shutdown::signal())
                .await?;
        }
        Some(kind) => {
            let (model, controlnets) = model_and_controlnets(args.model, args.controlnets)?;
            let listener = TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!("listening on {}", listener.local_addr()?);
            run_stage(
                kind,
                &model,
                listener,
                qwen_image_common::shutdown::signal(),
                StageOptions {
                    queue_capacity: args.queue_capacity,
                    controlnets,
                },
            )
            .await?;
        }
        None => {
            let (model, controlnets) = model_and_controlnets(args.model, args.controlnets)?;
            let options = StageOptions {
                queue_capacity: None,
                controlnets,
            };
            let mut stack = LocalStack::start_with(model.clone(), &listen, options).await?;
            for (kind, addr) in &stack.stage_addrs {
                println!("{} listening on {addr}", kind.name());
            }
            println!("listening on {}", stack.gateway_addr);
            eprintln!("loading {} ...", model.display());
            let stop = qwen_image_common::shutdown::signal();
            tokio::pin!(stop);
            tokio::select! {
                r = stack.wait_ready(Duration::from_secs(args.ready_timeout_secs)) => {
                    r?;
                    eprintln!("ready: send requests to http://{} (ctrl-c to stop)", stack.gateway_addr);
                    stop.as_mut().await;
                }
                () = stop.as_mut() => {}
            }
            stack.shutdown().await?;
        }
    }
    Ok(())
}
