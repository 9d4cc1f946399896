//! Serving a stage: the worker, health (SERVING once the model is loaded and warmed up), `StageInfo`,
//! reflection, and the end of the process: a graceful drain on shutdown (NOT_SERVING, stop accepting,
//! finish in-flight calls), or, when the model cannot load or the worker stops, NOT_SERVING and an error
//! (the binary then exits non-zero so that a supervisor restarts it).

use std::future::Future;

use qwen_image_proto::v1::stage_info_server::{StageInfo, StageInfoServer};
use qwen_image_proto::v1::{DataType, DescribeRequest, StageDescription};
use tokio::sync::oneshot;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::health::Health;
use crate::stage::args::ComputeDtype;
use crate::stage::describe::snapshot_digest;
use crate::stage::error::StageError;
use crate::stage::handle::{Readiness, StageHandle};
use crate::stage::memory;
use crate::stage::worker::{self, WorkerSpec};
use crate::stage::{StageConfig, StageDef};

/// Answers `StageInfo.Describe` with the description made at startup.
struct Describe(StageDescription);

#[tonic::async_trait]
impl StageInfo for Describe {
    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<StageDescription>, Status> {
        Ok(Response::new(self.0.clone()))
    }
}

/// Why the server stopped serving.
enum Stop {
    Shutdown,
    LoadFailed(String),
    WorkerStopped(String),
}

/// The description of `D` on `config`: the stage's components (from `prepare`) plus what the skeleton
/// knows (kind, snapshot, device, dtype, capacity, version).
fn describe<D: StageDef>(
    config: &StageConfig<D::Args>,
    mut description: StageDescription,
) -> Result<StageDescription, StageError> {
    description.kind = D::KIND as i32;
    // Without a snapshot the stage names its model itself (its weights file) in `prepare`.
    if let Some(dir) = &config.model_dir {
        description.model_id = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        description.snapshot_digest = snapshot_digest(dir)
            .map_err(|e| StageError::Config(format!("cannot read {}: {e}", dir.display())))?;
    }
    description.compute_dtype = match config.device.compute_dtype() {
        ComputeDtype::F32 => DataType::F32,
        ComputeDtype::Bf16 => DataType::Bf16,
    } as i32;
    description.device = config.device.to_string();
    description.queue_capacity = config.queue_capacity as u32;
    description.server_version = env!("CARGO_PKG_VERSION").to_string();
    Ok(description)
}

/// Serves stage `D` on `listeners` (a `TcpListener` for plaintext, or [`crate::tls::Listeners`] with TLS
/// and a health listener) until `shutdown` resolves (then drains and returns Ok), the model fails to
/// load, or the worker stops (then returns the error after draining).
pub async fn run<D: StageDef>(
    config: StageConfig<D::Args>,
    listeners: impl Into<crate::tls::Listeners>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StageError> {
    let listeners = listeners.into();
    let name = D::NAME;
    // Fail fast on a wrong path or an unusable config, before the worker starts.
    let prepared = D::prepare(&config).map_err(StageError::Config)?;
    let description = describe::<D>(&config, prepared.description)?;
    let (health, health_service) = Health::new(D::SERVICE_NAME).await;

    let (load_cfg, load_state) = (config.clone(), prepared.state.clone());
    let spec = WorkerSpec::new(
        name,
        config.queue_capacity,
        move || {
            let model = D::load(&load_cfg, &load_state)?;
            memory::record_weights(name, &D::weights(&model));
            Ok(model)
        },
        D::probe,
        config.stats.clone(),
        config.faults.clone(),
    );
    let worker = worker::spawn(spec)
        .map_err(|e| StageError::Server(format!("cannot start the worker thread: {e}")))?;
    let readiness = Readiness::default();
    // Model RPCs take their queue slot before their message is decoded (stage::gate).
    let gate = crate::stage::gate::layer(worker.admission.reserver());
    let handle = StageHandle::new(worker.admission, readiness.clone(), config.max_pixels);

    let health_only = Routes::new(health_service.clone());
    let routes = Routes::new(health_service)
        .add_service(StageInfoServer::new(Describe(description.clone())));
    let routes = D::routes(routes, handle, prepared.state);

    let addr = listeners
        .main
        .local_addr()
        .map_err(|e| StageError::Server(e.to_string()))?;
    let (tls, mutual_tls) = (
        listeners.tls.is_some(),
        listeners.tls.as_ref().is_some_and(|t| t.mutual),
    );
    tracing::info!(%addr, tls, mutual_tls, stage = name, model = %description.model_id,
        weights = %description.weights_format, device = %config.device,
        queue_capacity = config.queue_capacity, "listening; loading the model");

    // SERVING once loaded; the first of shutdown / load failure / worker exit stops the server.
    let (stop_tx, stop_rx) = oneshot::channel::<Stop>();
    let (ready, exited) = (worker.ready, worker.exited);
    let watch = {
        let (readiness, health) = (readiness.clone(), health.clone());
        async move {
            match ready.await {
                Ok(Ok(())) => {
                    readiness.set(true);
                    health.serving().await;
                    tracing::info!(stage = name, "model loaded and warmed up: SERVING");
                }
                Ok(Err(e)) => return Stop::LoadFailed(e),
                Err(_) => return Stop::LoadFailed("the worker thread ended while loading".into()),
            }
            let reason = exited
                .await
                .unwrap_or_else(|_| "the worker thread ended".into());
            Stop::WorkerStopped(reason)
        }
    };
    let watcher = tokio::spawn(async move {
        let _ = stop_tx.send(watch.await);
    });
    let mut stopped = Stop::Shutdown;
    let stop = async {
        tokio::select! {
            () = shutdown => tracing::info!(stage = name, "shutting down: draining in-flight requests"),
            Ok(s) = stop_rx => {
                match &s {
                    Stop::LoadFailed(e) => tracing::error!(stage = name, error = %e, "model load failed: NOT_SERVING"),
                    Stop::WorkerStopped(e) => tracing::error!(stage = name, reason = %e, "the model worker stopped: NOT_SERVING"),
                    Stop::Shutdown => {}
                }
                stopped = s;
            }
        }
        readiness.set(false);
        health.not_serving().await;
    };
    crate::tls::serve(name, gate, routes, health_only, listeners, stop)
        .await
        .map_err(StageError::Server)?;
    watcher.abort();
    // The server and its handlers (holding the queue's senders) are gone: the worker drains and exits.
    let thread = worker.thread;
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    tracing::info!(stage = name, "stopped");
    match stopped {
        Stop::Shutdown => Ok(()),
        Stop::LoadFailed(e) => Err(StageError::Config(format!("cannot load the model: {e}"))),
        Stop::WorkerStopped(e) => Err(StageError::WorkerStopped(e)),
    }
}
