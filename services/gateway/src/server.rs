//! `run`: stage pools with health checks, the public service, health, reflection, graceful drain.

use std::future::Future;
use std::sync::Arc;

use qwen_image_common::grpc::ServerTelemetryLayer;
use qwen_image_common::health::Health;
use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_proto::v1::FILE_DESCRIPTOR_SET;
use qwen_image_proto::v1::image_generator_server::ImageGeneratorServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::service::GatewayService;
use crate::stages::Stages;

/// Full proto name of the public service, as health checks name it.
pub const SERVICE_NAME: &str = "qwen_image.v1.ImageGenerator";

/// Serves until `shutdown` resolves, then drains: NOT_SERVING, stop accepting, finish in-flight streams.
///
/// Health is SERVING while every stage has at least one replica whose own health check says SERVING,
/// NOT_SERVING otherwise (checked every `config.health_interval`).
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    let stages = Arc::new(Stages::new(&config)?);
    let (health, health_service) = Health::new(SERVICE_NAME).await;

    let (stop_checks_tx, mut stop_checks_rx) = tokio::sync::watch::channel(false);
    let checker = {
        let (stages, health, interval) = (stages.clone(), health.clone(), config.health_interval);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut serving = None;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop_checks_rx.changed() => return,
                }
                let pools = stages.pools();
                tokio::join!(
                    pools[0].check_health(),
                    pools[1].check_health(),
                    pools[2].check_health()
                );
                let now = pools.iter().all(|p| p.any_healthy());
                if serving != Some(now) {
                    if now {
                        health.serving().await;
                    } else {
                        let down: Vec<&str> = pools
                            .iter()
                            .filter(|p| !p.any_healthy())
                            .map(|p| p.stage.as_str())
                            .collect();
                        tracing::warn!(?down, "no healthy replica for some stages: NOT_SERVING");
                        health.not_serving().await;
                    }
                    serving = Some(now);
                }
            }
        })
    };

    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let refl_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
    let refl_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| GatewayError::Internal(e.to_string()))?;

    let addr = listener
        .local_addr()
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
    tracing::info!(%addr, text_encoder = ?config.text_encoder, denoiser = ?config.denoiser, vae = ?config.vae, "gateway listening");
    let service = GatewayService {
        stages,
        config: Arc::new(config),
    };
    let generator = ImageGeneratorServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let drain_health = health.clone();
    let stop = async move {
        shutdown.await;
        tracing::info!("shutting down: draining in-flight requests");
        let _ = stop_checks_tx.send(true);
        drain_health.not_serving().await;
    };
    let served = tonic::transport::Server::builder()
        .layer(ServerTelemetryLayer::new("gateway"))
        .add_service(health_service)
        .add_service(refl_v1)
        .add_service(refl_v1alpha)
        .add_service(generator)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
        .await
        .map_err(|e| GatewayError::Internal(format!("gRPC server failed: {e}")));
    checker.abort();
    tracing::info!("gateway stopped");
    served
}
