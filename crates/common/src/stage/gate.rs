//! Admission before decoding. A stage's model RPCs take their queue slot when the call arrives, before
//! tonic reads and decodes the request message: a full stage answers RESOURCE_EXHAUSTED (with
//! `retry-after-ms`) without holding the refused request's tensors or prompts in memory, so the memory of
//! a stage under any load is bounded by its queue capacity times the message limit, not by the number of
//! callers. The slot travels to the handler in a task-local (the handler runs inside the call's future);
//! [`crate::stage::handle::StageHandle`] puts the job into it. A call whose handler refuses the request
//! before submitting a job frees the slot when the call ends.
//!
//! Health, reflection, `StageInfo.Describe` and `LoraAdmin.ListLoras` never take a slot.

use std::sync::Arc;

use crate::admit_gate::{AdmitGateLayer, take_admitted};
use crate::queue::{Reserver, Slot};
use crate::stage::error::StageError;

/// The slot the gate took for the current call, if any (taken once).
pub(crate) fn take_reserved() -> Option<Slot> {
    take_admitted::<Slot>()
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

/// The layer of a stage's server: model calls take a slot of `reserver`'s queue as they arrive.
pub fn layer(reserver: Reserver) -> AdmitGateLayer {
    AdmitGateLayer::new(Arc::new(move |path: &str, _headers: &http::HeaderMap| {
        if !gated(path) {
            return None;
        }
        Some(match reserver.try_reserve() {
            Ok(slot) => Ok(Box::new(slot) as Box<dyn std::any::Any + Send>),
            Err(e) => {
                tracing::info!(path, error = %e, "refused before decoding: queue full");
                Err(tonic::Status::from(StageError::from(e)))
            }
        })
    }))
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
