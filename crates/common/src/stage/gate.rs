//! Admission before decoding. A stage's model RPCs take their queue slot when the call arrives, before
//! tonic reads and decodes the request message: a full stage answers RESOURCE_EXHAUSTED (with
//! `retry-after-ms`) without holding the refused request's tensors or prompts in memory, so the memory of
//! a stage under any load is bounded by its queue capacity times the message limit, not by the number of
//! callers. The slot travels to the handler in a task-local (the handler runs inside the call's future);
//! [`crate::stage::handle::StageHandle`] puts the job into it. A call whose handler refuses the request
//! before submitting a job frees the slot when the call ends.
//!
//! Health, reflection, `StageInfo.Describe` and `LoraAdmin.ListLoras` never take a slot.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;

use crate::queue::{Reserver, Slot};
use crate::stage::error::StageError;

tokio::task_local! {
    static RESERVED: RefCell<Option<Slot>>;
}

/// The slot the gate took for the current call, if any (taken once).
pub(crate) fn take_reserved() -> Option<Slot> {
    RESERVED
        .try_with(|slot| slot.borrow_mut().take())
        .ok()
        .flatten()
}

/// gRPC services and methods that do not run on the model worker.
const UNGATED_PREFIXES: [&str; 4] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/qwen_image.v1.StageInfo/",
    "/qwen_image.v1.LoraAdmin/ListLoras",
];

/// Whether a call to `path` needs a queue slot.
fn gated(path: &str) -> bool {
    !UNGATED_PREFIXES.iter().any(|p| path.starts_with(p))
}

/// The layer: wraps a stage's whole gRPC router.
#[derive(Clone)]
pub struct AdmitGateLayer {
    reserver: Reserver,
}

impl AdmitGateLayer {
    pub fn new(reserver: Reserver) -> Self {
        Self { reserver }
    }
}

impl<S> tower::Layer<S> for AdmitGateLayer {
    type Service = AdmitGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmitGate {
            inner,
            reserver: self.reserver.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AdmitGate<S> {
    inner: S,
    reserver: Reserver,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for AdmitGate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // Clone-and-swap: the clone is ready (poll_ready was called on `self.inner`).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !gated(req.uri().path()) {
            return Box::pin(inner.call(req));
        }
        match self.reserver.try_reserve() {
            Ok(slot) => Box::pin(RESERVED.scope(RefCell::new(Some(slot)), inner.call(req))),
            Err(e) => {
                // The body is never read: dropping the request resets the client's stream after the
                // trailers-only answer.
                tracing::info!(path = req.uri().path(), error = %e, "refused before decoding: queue full");
                let status = tonic::Status::from(StageError::from(e));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_model_rpcs_are_gated() {
        assert!(gated("/qwen_image.v1.TextEncoder/Encode"));
        assert!(gated("/qwen_image.v1.Denoiser/Denoise"));
        assert!(gated("/qwen_image.v1.LoraAdmin/LoadLora"));
        assert!(!gated("/qwen_image.v1.LoraAdmin/ListLoras"));
        assert!(gated("/anything/else"));
        assert!(!gated("/grpc.health.v1.Health/Check"));
        assert!(!gated("/grpc.health.v1.Health/Watch"));
        assert!(!gated(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!gated("/qwen_image.v1.StageInfo/Describe"));
    }
}
