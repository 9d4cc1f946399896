//! The denoiser's one error type and its mapping to gRPC status codes.

use std::time::Duration;

use qwen_image_common::queue::AdmitError;
use qwen_image_common::stage::StageError;
use qwen_image_common::tensor::TensorError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum DenoiserError {
    /// The request is malformed; the message says what to change.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request needs something this denoiser was not started with (e.g. a ControlNet it has not loaded).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Every admission slot is taken.
    #[error("queue full ({capacity} admitted)")]
    Overloaded {
        capacity: usize,
        retry_after: Duration,
    },
    /// The model is still loading / warming up, or the service is draining.
    #[error("not ready")]
    NotReady,
    /// The caller went away.
    #[error("cancelled by the caller")]
    Cancelled,
    /// The caller's grpc-timeout passed.
    #[error("deadline exceeded after {steps_done} steps")]
    DeadlineExceeded { steps_done: usize },
    /// The model failed on a valid request (details are logged, not sent).
    #[error("model error: {0}")]
    Model(String),
    /// Startup: the snapshot or the configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// Startup / serving I/O and transport failures.
    #[error("server: {0}")]
    Server(String),
}

impl From<TensorError> for DenoiserError {
    fn from(e: TensorError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

impl From<AdmitError> for DenoiserError {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::Overloaded {
                capacity,
                retry_after,
            } => Self::Overloaded {
                capacity,
                retry_after,
            },
            AdmitError::WorkerGone => Self::NotReady,
        }
    }
}

impl From<StageError> for DenoiserError {
    fn from(e: StageError) -> Self {
        match e {
            StageError::Load(m) => Self::Config(format!("cannot load the model: {m}")),
            StageError::Reflection(m) | StageError::Transport(m) => Self::Server(m),
        }
    }
}

impl From<DenoiserError> for Status {
    fn from(e: DenoiserError) -> Self {
        match e {
            DenoiserError::InvalidArgument(m) => Status::invalid_argument(m),
            DenoiserError::FailedPrecondition(m) => Status::failed_precondition(m),
            DenoiserError::Overloaded {
                capacity,
                retry_after,
            } => qwen_image_common::status::overloaded("denoiser", capacity, retry_after),
            DenoiserError::NotReady => Status::unavailable(
                "the denoiser is not serving (loading, warming up or draining); retry or use another replica",
            ),
            DenoiserError::Cancelled => Status::cancelled("the request was cancelled"),
            DenoiserError::DeadlineExceeded { steps_done } => Status::deadline_exceeded(format!(
                "the deadline passed after {steps_done} steps; allow more time (grpc-timeout) or request fewer steps"
            )),
            DenoiserError::Model(_) => {
                Status::internal("the denoiser failed on this request; it has been logged")
            }
            DenoiserError::Config(_) | DenoiserError::Server(_) => {
                Status::new(Code::Internal, "denoiser internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_every_variant() {
        let cases = [
            (
                DenoiserError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (
                DenoiserError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (
                DenoiserError::Overloaded {
                    capacity: 1,
                    retry_after: Duration::from_millis(5),
                },
                Code::ResourceExhausted,
            ),
            (DenoiserError::NotReady, Code::Unavailable),
            (DenoiserError::Cancelled, Code::Cancelled),
            (
                DenoiserError::DeadlineExceeded { steps_done: 2 },
                Code::DeadlineExceeded,
            ),
            (
                DenoiserError::Model("candle: boom /secret/path".into()),
                Code::Internal,
            ),
            (DenoiserError::Config("c".into()), Code::Internal),
            (DenoiserError::Server("s".into()), Code::Internal),
        ];
        for (e, code) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code);
            assert!(
                !s.message().contains("/secret"),
                "internals leak: {}",
                s.message()
            );
        }
    }
}
