//! `run`: the worker, the gRPC services and the stage lifecycle (SERVING after warm-up, graceful drain).

use std::future::Future;

use qwen_image_common::health::Health;
use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::queue::spawn_worker;
use qwen_image_common::stage::{self, Readiness, Stage};
use qwen_image_model::snapshot::{Snapshot, first_line};
use qwen_image_proto::v1::text_encoder_server::TextEncoderServer;
use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::config::TextEncoderConfig;
use crate::error::TextEncoderError;
use crate::model;
use crate::service::TextEncoderService;

/// Full proto name of the service, as health checks name it.
pub const SERVICE_NAME: &str = "qwen_image.v1.TextEncoder";

/// Serves until `shutdown` resolves, then drains: NOT_SERVING, stop accepting, finish in-flight calls.
/// Returns an error if the snapshot is unusable or the model fails to load.
pub async fn run(
    config: TextEncoderConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TextEncoderError> {
    // Fail fast on a wrong path, before the worker starts.
    Snapshot::open(&config.model_dir).map_err(|e| TextEncoderError::Config(first_line(&e)))?;
    let (health, health_service) = Health::new(SERVICE_NAME).await;
    let load_cfg = config.clone();
    let worker = spawn_worker(
        "text-encoder",
        config.queue_capacity,
        move || model::load(&load_cfg).map_err(|e| first_line(&e)),
        |m, job, slot| crate::job::run(m, job, slot),
    )
    .map_err(|e| TextEncoderError::Server(format!("cannot start the worker thread: {e}")))?;

    let readiness = Readiness::default();
    let service = TextEncoderService {
        admission: worker.admission,
        readiness: readiness.clone(),
    };
    let server = TextEncoderServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let routes = Routes::new(health_service).add_service(server);

    let addr = listener
        .local_addr()
        .map_err(|e| TextEncoderError::Server(e.to_string()))?;
    tracing::info!(%addr, model = %config.model_dir.display(), queue_capacity = config.queue_capacity, "text encoder listening");
    let stage = Stage {
        name: "text-encoder",
        health,
        readiness,
        loaded: worker.ready,
        worker: worker.thread,
    };
    stage::serve(stage, listener, routes, shutdown)
        .await
        .map_err(TextEncoderError::from)
}
