//! `qwen-image-gateway`: parse flags, then the shared service `main` (telemetry, metrics, bind, serve until
//! SIGTERM / ctrl-c).

use clap::Parser;
use qwen_image_gateway::{Args, GatewayConfig, run};

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = match GatewayConfig::try_from(&args.gateway) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    qwen_image_common::launch::serve_main(
        "qwen-image-gateway",
        &args.common,
        |listener, shutdown| {
            tracing::info!(?config, "starting");
            run(config, listener, shutdown)
        },
    )
}
