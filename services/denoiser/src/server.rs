//! `run`: health, reflection, the worker and the gRPC server, with graceful drain.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use qwen_image_common::health::Health;
use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::queue::spawn_worker;
use qwen_image_model::snapshot::first_line;
use qwen_image_proto::v1::FILE_DESCRIPTOR_SET;
use qwen_image_proto::v1::denoiser_server::DenoiserServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::DenoiserConfig;
use crate::error::DenoiserError;
use crate::model;
use crate::service::DenoiserService;
use crate::stats::Stats;

/// Full proto name of the service, as health checks name it.
pub const SERVICE_NAME: &str = "qwen_image.v1.Denoiser";

/// Serves until `shutdown` resolves, then drains: NOT_SERVING, stop accepting, finish in-flight streams.
pub async fn run(
    config: DenoiserConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DenoiserError> {
    run_with_stats(config, listener, shutdown, Stats::default()).await
}

/// [`run`] with a handle on the worker's counters (tests observe cancellation through it).
pub async fn run_with_stats(
    config: DenoiserConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    stats: Stats,
) -> Result<(), DenoiserError> {
    let (shape, tcfg, scfg) = model::read_shape(&config).map_err(DenoiserError::Config)?;
    let (health, health_service) = Health::new(SERVICE_NAME).await;

    let load_cfg = config.clone();
    let worker_stats = stats.clone();
    let worker = spawn_worker(
        "denoiser",
        config.queue_capacity,
        move || {
            let started = std::time::Instant::now();
            let m = model::load(&load_cfg, &tcfg, scfg).map_err(|e| first_line(&e))?;
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "model loaded and warmed up"
            );
            Ok(m)
        },
        move |m, job, slot| crate::job::run(m, job, slot, &worker_stats),
    )
    .map_err(|e| DenoiserError::Server(format!("cannot start the worker thread: {e}")))?;

    let ready = Arc::new(AtomicBool::new(false));
    let (load_failed_tx, load_failed_rx) = tokio::sync::oneshot::channel::<String>();
    {
        let (ready, health) = (ready.clone(), health.clone());
        let load = worker.ready;
        tokio::spawn(async move {
            match load.await {
                Ok(Ok(())) => {
                    ready.store(true, Ordering::Release);
                    health.serving().await;
                }
                Ok(Err(e)) => {
                    let _ = load_failed_tx.send(e);
                }
                Err(_) => {
                    let _ = load_failed_tx.send("the worker thread ended while loading".into());
                }
            }
        });
    }

    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let refl_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| DenoiserError::Server(e.to_string()))?;
    let refl_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| DenoiserError::Server(e.to_string()))?;

    let service = DenoiserService {
        admission: worker.admission,
        shape,
        ready: ready.clone(),
    };
    let denoiser = DenoiserServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let addr = listener
        .local_addr()
        .map_err(|e| DenoiserError::Server(e.to_string()))?;
    tracing::info!(%addr, model = %config.model_dir.display(), queue_capacity = config.queue_capacity, "denoiser listening");
    let mut load_error = None;
    let drain_health = health.clone();
    let drain_ready = ready.clone();
    let stop = async {
        tokio::select! {
            () = shutdown => tracing::info!("shutting down: draining in-flight requests"),
            Ok(e) = load_failed_rx => {
                tracing::error!(error = %e, "model load failed");
                load_error = Some(e);
            }
        }
        drain_ready.store(false, Ordering::Release);
        drain_health.not_serving().await;
    };
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(refl_v1)
        .add_service(refl_v1alpha)
        .add_service(denoiser)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
        .await
        .map_err(|e| DenoiserError::Server(e.to_string()))?;
    // The server (and with it the last queue sender) is gone: the worker finishes its queue and exits.
    let thread = worker.thread;
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    tracing::info!("denoiser stopped");
    match load_error {
        Some(e) => Err(DenoiserError::Config(format!("cannot load the model: {e}"))),
        None => Ok(()),
    }
}
