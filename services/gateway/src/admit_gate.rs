//! Admission before decoding at the public gRPC API, as the stages do (`qwen_image_common::stage::gate`):
//! a generation call is checked for its API key and takes its place in the gateway's queue
//! (`--max-queued`) when it arrives, before tonic reads its message (up to [`crate::limits`], about
//! 96 MiB). A refused call (UNAUTHENTICATED, or RESOURCE_EXHAUSTED with `retry-after-ms`) is answered
//! without its message ever being held, so the gateway's memory is bounded by `--max-queued` requests,
//! not by its callers. The place travels to the handler in a task-local (the handler runs inside the
//! call's future); calls that did not come through this layer (the HTTP API's in-process client) are
//! admitted by the handler itself.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::auth::ApiKeys;
use crate::service::REQUEST_ID_KEY;
use crate::stages::admission::{Admitted, RequestQueue};

tokio::task_local! {
    static ADMITTED: RefCell<Option<Admitted>>;
}

/// The place this layer took for the current call, if any (taken once).
pub(crate) fn take_admitted() -> Option<Admitted> {
    ADMITTED.try_with(|a| a.borrow_mut().take()).ok().flatten()
}

/// Calls that run a flow (every `ImageGenerator` method but `ListModels`).
fn gated(path: &str) -> bool {
    path.strip_prefix("/qwen_image.v1.ImageGenerator/")
        .is_some_and(|method| method != "ListModels")
}

#[derive(Clone)]
pub struct AdmitGateLayer {
    queue: Arc<RequestQueue>,
    keys: Option<Arc<ApiKeys>>,
}

impl AdmitGateLayer {
    pub fn new(queue: Arc<RequestQueue>, keys: Option<Arc<ApiKeys>>) -> Self {
        Self { queue, keys }
    }
}

impl<S> tower::Layer<S> for AdmitGateLayer {
    type Service = AdmitGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmitGate {
            inner,
            gate: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AdmitGate<S> {
    inner: S,
    gate: AdmitGateLayer,
}

impl AdmitGateLayer {
    /// The caller's place, or the status that refuses the call (with its request id).
    fn admit(&self, headers: &http::HeaderMap) -> Result<Admitted, Status> {
        let with_id = |mut status: Status| {
            if let Some(id) = headers
                .get(REQUEST_ID_KEY)
                .and_then(|v| MetadataValue::try_from(v.as_bytes()).ok())
            {
                status.metadata_mut().insert(REQUEST_ID_KEY, id);
            }
            status
        };
        if let Some(keys) = &self.keys
            && keys
                .name_of(headers.get("authorization").map(|v| v.as_bytes()))
                .is_none()
        {
            // `check` counts the refusal; an accepted key is counted once, by the handler.
            let refused = keys.check(&MetadataMap::from_headers(headers.clone()));
            return Err(with_id(
                refused.err().unwrap_or_else(|| Status::unauthenticated("")),
            ));
        }
        self.queue.admit().map_err(with_id)
    }
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
        match self.gate.admit(req.headers()) {
            Ok(admitted) => Box::pin(ADMITTED.scope(RefCell::new(Some(admitted)), inner.call(req))),
            // The message is never read.
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_flow_calls_are_gated() {
        assert!(gated("/qwen_image.v1.ImageGenerator/TextToImage"));
        assert!(gated("/qwen_image.v1.ImageGenerator/Edit"));
        assert!(!gated("/qwen_image.v1.ImageGenerator/ListModels"));
        assert!(!gated("/grpc.health.v1.Health/Check"));
        assert!(!gated(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
    }
}
