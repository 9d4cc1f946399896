//! `run`: the worker, the gRPC services and the stage lifecycle (SERVING after warm-up, graceful drain).

use std::future::Future;

use qwen_image_common::health::Health;
use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::queue::spawn_worker;
use qwen_image_common::stage::{self, Readiness, Stage};
use qwen_image_model::snapshot::first_line;
use qwen_image_proto::v1::denoiser_server::DenoiserServer;
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::config::DenoiserConfig;
use crate::error::DenoiserError;
use crate::model;
use crate::service::DenoiserService;
use crate::stats::Stats;

/// Full proto name of the service, as health checks name it.
pub const SERVICE_NAME: &str = "qwen_image.v1.Denoiser";

/// Serves until `shutdown` resolves, then drains: NOT_SERVING, stop accepting, finish in-flight streams.
/// Returns an error if the snapshot is unusable or the model fails to load.
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
    let controlnets = model::read_controlnets(&config, &tcfg).map_err(DenoiserError::Config)?;
    let (health, health_service) = Health::new(SERVICE_NAME).await;

    let load_cfg = config.clone();
    let worker = spawn_worker(
        "denoiser",
        config.queue_capacity,
        move || model::load(&load_cfg, &tcfg, scfg).map_err(|e| first_line(&e)),
        move |m, job, slot| crate::job::run(m, job, slot, &stats),
    )
    .map_err(|e| DenoiserError::Server(format!("cannot start the worker thread: {e}")))?;

    let readiness = Readiness::default();
    let service = DenoiserService {
        admission: worker.admission,
        shape,
        controlnets,
        readiness: readiness.clone(),
    };
    let denoiser = DenoiserServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let routes = Routes::new(health_service).add_service(denoiser);

    let addr = listener
        .local_addr()
        .map_err(|e| DenoiserError::Server(e.to_string()))?;
    tracing::info!(%addr, model = %config.model_dir.display(), queue_capacity = config.queue_capacity, "denoiser listening");
    let stage = Stage {
        name: "denoiser",
        health,
        readiness,
        loaded: worker.ready,
        worker: worker.thread,
    };
    stage::serve(stage, listener, routes, shutdown)
        .await
        .map_err(DenoiserError::from)
}
