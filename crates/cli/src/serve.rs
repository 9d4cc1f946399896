//! `qwen-image serve`: the whole stack in one process (three stages + gateway on loopback ports), or one
//! service with `--stage`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use qwen_image_common::args::CommonArgs;
use qwen_image_common::stage::StageArgs;
use qwen_image_denoiser::{ControlNetSpec, DenoiserArgs};
use qwen_image_gateway::GatewayArgs;
use qwen_image_text_encoder::TextEncoderArgs;
use tokio::net::TcpListener;

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

    /// The text encoder's flags (`--embedding-cache-mb`): whole stack or `--stage text-encoder`.
    #[command(flatten)]
    pub text_encoder: TextEncoderArgs,

    /// The denoiser's flags (`--controlnet`): whole stack or `--stage denoiser`.
    #[command(flatten)]
    pub denoiser: DenoiserArgs,

    /// The gateway's flags: its stage endpoints with `--stage gateway`; its limits in both modes.
    #[command(flatten)]
    pub gateway: GatewayArgs,

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
    if !args.denoiser.controlnets.is_empty()
        && !matches!(args.stage, None | Some(StageKind::Denoiser))
    {
        bail!(
            "--controlnet is a denoiser flag: use it with `--stage denoiser` or for the whole stack"
        );
    }
    Ok(())
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
    check_flags(&args)?;
    if let Some(addr) = args.common.metrics_listen {
        let bound = qwen_image_common::telemetry::serve_metrics(addr).await?;
        // Machine-readable line for scripts and tests (logs go to stderr).
        println!("metrics listening on {bound}");
    }
    let listen = args.common.listen.to_string();
    let bind = || async {
        let listener = TcpListener::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        println!("listening on {}", listener.local_addr()?);
        anyhow::Ok(listener)
    };
    match args.stage {
        Some(StageKind::Gateway) => {
            let config = qwen_image_gateway::GatewayConfig::try_from(&args.gateway)
                .map_err(anyhow::Error::msg)?;
            qwen_image_gateway::run(config, bind().await?, qwen_image_common::shutdown::signal())
                .await?;
        }
        Some(kind) => {
            let (model, controlnets) =
                model_and_controlnets(args.stage_args.model.clone(), args.denoiser.controlnets)?;
            let options = StageOptions {
                stage: args.stage_args,
                text_encoder: args.text_encoder,
                denoiser: DenoiserArgs { controlnets },
                gateway: None,
            };
            let listener = bind().await?;
            run_stage(
                kind,
                &model,
                listener,
                qwen_image_common::shutdown::signal(),
                options,
            )
            .await?;
        }
        None => {
            let (model, controlnets) =
                model_and_controlnets(args.stage_args.model.clone(), args.denoiser.controlnets)?;
            let options = StageOptions {
                stage: args.stage_args,
                text_encoder: args.text_encoder,
                denoiser: DenoiserArgs { controlnets },
                gateway: Some(args.gateway),
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
