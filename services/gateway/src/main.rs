//! `qwen-image-gateway`: parse flags, start telemetry, bind, serve until SIGTERM / ctrl-c.

use anyhow::Context;
use clap::Parser;
use qwen_image_gateway::{Args, GatewayConfig, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = qwen_image_common::telemetry::init("qwen-image-gateway", &args.common)?;
    if let Some(addr) = args.common.metrics_listen {
        let bound = qwen_image_common::telemetry::serve_metrics(addr).await?;
        // Machine-readable line for scripts and tests (logs go to stderr).
        println!("metrics listening on {bound}");
    }
    let config = GatewayConfig::from(&args.gateway);
    tracing::info!(?config, "starting");
    let listener = tokio::net::TcpListener::bind(args.common.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.common.listen))?;
    let addr = listener.local_addr().context("listener address")?;
    // Machine-readable line for scripts and tests (logs go to stderr).
    println!("listening on {addr}");
    run(config, listener, qwen_image_common::shutdown::signal()).await?;
    Ok(())
}
