//! Serving a stage service: reflection (v1 + v1alpha), SERVING once the worker has loaded and warmed up
//! the model, and a graceful drain (NOT_SERVING, stop accepting, finish in-flight calls, let the worker
//! finish its queue).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;

use crate::grpc::ServerTelemetryLayer;
use crate::health::Health;

/// Whether the stage accepts work: false while loading and while draining. Handlers answer UNAVAILABLE
/// when it is false.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("cannot load the model: {0}")]
    Load(String),
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    #[error("gRPC server failed: {0}")]
    Transport(String),
}

/// A stage about to be served.
pub struct Stage {
    /// Short name for logs (`denoiser`, `text-encoder`, `vae`).
    pub name: &'static str,
    pub health: Health,
    pub readiness: Readiness,
    /// The worker's load result ([`crate::queue::Worker::ready`]).
    pub loaded: oneshot::Receiver<Result<(), String>>,
    /// The worker thread, joined after the server has drained.
    pub worker: std::thread::JoinHandle<()>,
}

/// Serves `routes` (the health service and the stage's service) plus reflection on `listener` until
/// `shutdown` resolves or the model fails to load, then drains. Returns the load error if there was one.
pub async fn serve(
    stage: Stage,
    listener: TcpListener,
    routes: Routes,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StageError> {
    let Stage {
        name,
        health,
        readiness,
        loaded,
        worker,
    } = stage;
    let (load_failed_tx, load_failed_rx) = oneshot::channel::<String>();
    {
        let (readiness, health) = (readiness.clone(), health.clone());
        tokio::spawn(async move {
            match loaded.await {
                Ok(Ok(())) => {
                    readiness.set(true);
                    health.serving().await;
                    tracing::info!(stage = name, "model loaded and warmed up: SERVING");
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
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(qwen_image_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let refl_v1 = reflection()
        .build_v1()
        .map_err(|e| StageError::Reflection(e.to_string()))?;
    let refl_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| StageError::Reflection(e.to_string()))?;
    let routes = routes.add_service(refl_v1).add_service(refl_v1alpha);

    let mut load_error = None;
    let stop = async {
        tokio::select! {
            () = shutdown => tracing::info!(stage = name, "shutting down: draining in-flight requests"),
            Ok(e) = load_failed_rx => {
                tracing::error!(stage = name, error = %e, "model load failed");
                load_error = Some(e);
            }
        }
        readiness.set(false);
        health.not_serving().await;
    };
    tonic::transport::Server::builder()
        .layer(ServerTelemetryLayer::new(name))
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
        .await
        .map_err(|e| StageError::Transport(e.to_string()))?;
    // The server and its services (holding the queue's senders) are gone: the worker drains and exits.
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    tracing::info!(stage = name, "stopped");
    match load_error {
        Some(e) => Err(StageError::Load(e)),
        None => Ok(()),
    }
}
