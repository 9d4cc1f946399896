//! Admission before decoding at the public gRPC API, as the stages do (`qwen_image_common::stage::gate`):
//! a generation call is checked for its API key and takes its place in the gateway's queue
//! (`--max-queued`) when it arrives, before tonic reads its message (up to [`crate::limits`], about
//! 96 MiB). A refused call (UNAUTHENTICATED, or RESOURCE_EXHAUSTED with `retry-after-ms`) is answered
//! without its message ever being held, so the gateway's memory is bounded by `--max-queued` requests,
//! not by its callers. The place travels to the handler in a task-local (the handler runs inside the
//! call's future); calls that did not come through this layer (the HTTP API's in-process client) are
//! admitted by the handler itself.

use std::sync::Arc;

use qwen_image_common::admit_gate::{AdmitGateLayer, take_admitted as take};
use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::auth::ApiKeys;
use crate::service::REQUEST_ID_KEY;
use crate::stages::admission::{Admitted, RequestQueue};

/// The place the layer took for the current call, if any (taken once).
pub(crate) fn take_admitted() -> Option<Admitted> {
    take::<Admitted>()
}

/// Calls that run a flow (every `ImageGenerator` method but `ListModels`).
fn gated(path: &str) -> bool {
    path.strip_prefix("/qwen_image.v1.ImageGenerator/")
        .is_some_and(|method| method != "ListModels")
}

/// The caller's place, or the status that refuses the call (with its request id).
fn admit(
    queue: &Arc<RequestQueue>,
    keys: Option<&ApiKeys>,
    headers: &http::HeaderMap,
) -> Result<Admitted, Status> {
    let with_id = |mut status: Status| {
        if let Some(id) = headers
            .get(REQUEST_ID_KEY)
            .and_then(|v| MetadataValue::try_from(v.as_bytes()).ok())
        {
            status.metadata_mut().insert(REQUEST_ID_KEY, id);
        }
        status
    };
    if let Some(keys) = keys
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
    queue.admit().map_err(with_id)
}

/// The layer of the gateway's gRPC server.
pub fn layer(queue: Arc<RequestQueue>, keys: Option<Arc<ApiKeys>>) -> AdmitGateLayer {
    AdmitGateLayer::new(Arc::new(move |path: &str, headers: &http::HeaderMap| {
        gated(path).then(|| {
            admit(&queue, keys.as_deref(), headers)
                .map(|a| Box::new(a) as Box<dyn std::any::Any + Send>)
        })
    }))
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
