//! `run`: stage pools with health checks, the public service, health, reflection (unless
//! `--no-reflection`), the HTTP API, graceful drain.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use qwen_image_common::health::Health;
use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::tls::Listeners;
use qwen_image_proto::v1::image_generator_server::ImageGeneratorServer;
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::models::Models;
use crate::service::GatewayService;

/// Full proto name of the public service, as health checks name it.
pub const SERVICE_NAME: &str = "qwen_image.v1.ImageGenerator";

/// Serves until `shutdown` resolves, then drains: NOT_SERVING, stop accepting, finish in-flight streams.
///
/// Health is SERVING while every stage has at least one replica whose own health check says SERVING and
/// whose model fits the other stages' (checked every `config.health_interval`; a replica's `Describe` is
/// read when it is first seen healthy and whenever it comes back), NOT_SERVING otherwise.
pub async fn run(
    config: GatewayConfig,
    listeners: impl Into<Listeners>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    let listeners = listeners.into();
    let http_listener = match config.http_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(|e| {
                GatewayError::Internal(format!("cannot listen on {addr} (--http-listen): {e}"))
            })?;
            let bound = l
                .local_addr()
                .map_err(|e| GatewayError::Internal(e.to_string()))?;
            // Machine-readable line for scripts and tests (logs go to stderr).
            println!("http listening on {bound}");
            Some(l)
        }
        None => None,
    };
    run_with_http(config, listeners, http_listener, shutdown).await
}

/// [`run`] with the HTTP API on `http_listener` (bound by the caller; `config.http_listen` is ignored).
/// With TLS on the gRPC listener (`--tls-cert`/`--tls-key`), the HTTP API serves HTTPS with the same
/// certificate (a client certificate is then required too when `--tls-client-ca` is set).
pub async fn run_with_http(
    config: GatewayConfig,
    listeners: impl Into<Listeners>,
    http_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    let mut listeners = listeners.into();
    listeners.reflection &= config.reflection;
    let models = Arc::new(Models::new(&config)?);
    // The stage client certificate and CA reload on SIGHUP and on file changes while serving.
    let _stage_tls_watch = config.stage_tls.as_ref().map(|t| t.watch());
    let (health, health_service) = Health::new(SERVICE_NAME).await;
    // The health status as `/readyz` reads it.
    let ready = Arc::new(AtomicBool::new(false));

    let (stop_checks_tx, mut stop_checks_rx) = tokio::sync::watch::channel(false);
    let stop_checks_rx_http = stop_checks_rx.clone();
    let checker = {
        let (models, health, interval) = (models.clone(), health.clone(), config.health_interval);
        let resolve_interval = config.resolve_interval;
        let ready = ready.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut serving = None;
            // Stage endpoints given by DNS name: resolved before the first check, then periodically.
            let mut resolved_at: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop_checks_rx.changed() => return,
                }
                if !resolve_interval.is_zero()
                    && resolved_at.is_none_or(|t| t.elapsed() >= resolve_interval)
                {
                    for p in models.pools() {
                        p.rediscover(&crate::stages::discovery::SystemResolver)
                            .await;
                    }
                    resolved_at = Some(tokio::time::Instant::now());
                }
                // Every pool once (pools shared by several models are checked once).
                let pools = models.pools();
                let checks: Vec<_> = pools
                    .iter()
                    .cloned()
                    .map(|p| tokio::spawn(async move { (p.stage, p.check_health().await) }))
                    .collect();
                let mut back = Vec::new();
                for check in checks {
                    if let Ok((stage, replicas)) = check.await {
                        back.extend(replicas.into_iter().map(|r| (stage, r)));
                    }
                }
                if back.is_empty() {
                    models.review();
                } else {
                    models.describe(back).await;
                }
                let now = models.all_usable();
                ready.store(now, Ordering::Relaxed);
                if serving != Some(now) {
                    if now {
                        let slots: Vec<String> = pools
                            .iter()
                            .map(|p| format!("{}: {}", p.stage, p.capacity()))
                            .collect();
                        tracing::info!(
                            models = models.models.len(),
                            ?slots,
                            "every stage has a usable replica: SERVING"
                        );
                        health.serving().await;
                    } else {
                        let down: Vec<String> = pools
                            .iter()
                            .filter(|p| !p.any_usable())
                            .map(|p| match p.refusals() {
                                Some(why) => format!("{}: {why}", p.stage),
                                None => format!("{}: no healthy replica", p.stage),
                            })
                            .collect();
                        tracing::warn!(?down, "some stages have no usable replica: NOT_SERVING");
                        health.not_serving().await;
                    }
                    serving = Some(now);
                }
            }
        })
    };

    let addr = listeners
        .main
        .local_addr()
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
    let (tls, stage_tls) = (listeners.tls.is_some(), config.stage_tls.is_some());
    tracing::info!(%addr, tls, stage_tls, text_encoder = ?config.text_encoder, denoiser = ?config.denoiser,
        vae = ?config.vae, extra_models = ?config.extra_models, "gateway listening");
    let detector = config
        .pose_detector
        .as_deref()
        .map(|url| crate::reference_pose::Detector::new(url, config.stage_tls.as_ref()))
        .transpose()
        .map_err(GatewayError::Internal)?;
    if let Some(l) = &http_listener
        && let Ok(addr) = l.local_addr()
    {
        tracing::info!(%addr, https = tls, "HTTP API listening");
    }
    if config.api_keys.is_some() {
        tracing::info!(keys = ?config.api_keys, "API keys required");
    }
    let http_tls = listeners.tls.clone();
    let service = Arc::new(GatewayService {
        models,
        detector,
        queue: crate::stages::admission::RequestQueue::new(config.max_queued),
        config: Arc::new(config),
    });
    let http = http_listener.map(|l| {
        let mut stopped = stop_checks_rx_http.clone();
        let stop = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        tokio::spawn(crate::http::serve(
            l,
            http_tls,
            service.clone(),
            ready.clone(),
            stop,
        ))
    });
    let gate = crate::admit_gate::layer(service.queue.clone(), service.config.api_keys.clone());
    let generator = ImageGeneratorServer::from_arc(service)
        .max_decoding_message_size(crate::limits::MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let drain_health = health.clone();
    let drain_ready = ready.clone();
    let stop = async move {
        shutdown.await;
        tracing::info!("shutting down: draining in-flight requests");
        let _ = stop_checks_tx.send(true);
        drain_ready.store(false, Ordering::Relaxed);
        drain_health.not_serving().await;
    };
    let health_only = Routes::new(health_service.clone());
    let routes = Routes::new(health_service).add_service(generator);
    let served =
        qwen_image_common::tls::serve("gateway", gate, routes, health_only, listeners, stop)
            .await
            .map_err(GatewayError::Internal);
    checker.abort();
    if let Some(h) = http {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "HTTP API failed"),
            Err(e) => tracing::error!(error = %e, "HTTP API task failed"),
        }
    }
    tracing::info!("gateway stopped");
    served
}
