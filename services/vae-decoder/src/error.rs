//! The VAE service's one error type and its mapping to gRPC status codes.

use std::time::Duration;

use qwen_image_common::queue::AdmitError;
use qwen_image_common::stage::StageError;
use qwen_image_common::tensor::TensorError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum VaeError {
    /// The request is malformed; the message says what to change.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("queue full ({capacity} admitted)")]
    Overloaded {
        capacity: usize,
        retry_after: Duration,
    },
    /// Loading, warming up or draining.
    #[error("not ready")]
    NotReady,
    #[error("cancelled by the caller")]
    Cancelled,
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The model failed on a valid request (details are logged, not sent).
    #[error("model error: {0}")]
    Model(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("server: {0}")]
    Server(String),
}

impl From<TensorError> for VaeError {
    fn from(e: TensorError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

impl From<AdmitError> for VaeError {
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

impl From<StageError> for VaeError {
    fn from(e: StageError) -> Self {
        match e {
            StageError::Load(m) => Self::Config(format!("cannot load the model: {m}")),
            StageError::Reflection(m) | StageError::Transport(m) => Self::Server(m),
        }
    }
}

impl From<VaeError> for Status {
    fn from(e: VaeError) -> Self {
        match e {
            VaeError::InvalidArgument(m) => Status::invalid_argument(m),
            VaeError::Overloaded {
                capacity,
                retry_after,
            } => qwen_image_common::status::overloaded("VAE", capacity, retry_after),
            VaeError::NotReady => Status::unavailable(
                "the VAE is not serving (loading, warming up or draining); retry or use another replica",
            ),
            VaeError::Cancelled => Status::cancelled("the request was cancelled"),
            VaeError::DeadlineExceeded => Status::deadline_exceeded(
                "the deadline passed before the images were processed; allow more time",
            ),
            VaeError::Model(_) => {
                Status::internal("the VAE failed on this request; it has been logged")
            }
            VaeError::Config(_) | VaeError::Server(_) => Status::internal("VAE internal error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn maps_every_variant() {
        let cases = [
            (VaeError::InvalidArgument("x".into()), Code::InvalidArgument),
            (
                VaeError::Overloaded {
                    capacity: 1,
                    retry_after: Duration::from_millis(5),
                },
                Code::ResourceExhausted,
            ),
            (VaeError::NotReady, Code::Unavailable),
            (VaeError::Cancelled, Code::Cancelled),
            (VaeError::DeadlineExceeded, Code::DeadlineExceeded),
            (VaeError::Model("/secret".into()), Code::Internal),
            (VaeError::Config("/secret".into()), Code::Internal),
            (VaeError::Server("/secret".into()), Code::Internal),
        ];
        for (e, code) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code);
            assert!(!s.message().contains("/secret"));
        }
    }
}
