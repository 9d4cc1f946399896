//! The text encoder's one error type and its mapping to gRPC status codes.

use std::time::Duration;

use qwen_image_common::queue::AdmitError;
use qwen_image_common::stage::StageError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum TextEncoderError {
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

impl From<AdmitError> for TextEncoderError {
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

impl From<StageError> for TextEncoderError {
    fn from(e: StageError) -> Self {
        match e {
            StageError::Load(m) => Self::Config(format!("cannot load the model: {m}")),
            StageError::Reflection(m) | StageError::Transport(m) => Self::Server(m),
        }
    }
}

impl From<TextEncoderError> for Status {
    fn from(e: TextEncoderError) -> Self {
        match e {
            TextEncoderError::InvalidArgument(m) => Status::invalid_argument(m),
            TextEncoderError::Overloaded {
                capacity,
                retry_after,
            } => qwen_image_common::status::overloaded("text encoder", capacity, retry_after),
            TextEncoderError::NotReady => Status::unavailable(
                "the text encoder is not serving (loading, warming up or draining); retry or use another replica",
            ),
            TextEncoderError::Cancelled => Status::cancelled("the request was cancelled"),
            TextEncoderError::DeadlineExceeded => Status::deadline_exceeded(
                "the deadline passed before the prompts were encoded; allow more time",
            ),
            TextEncoderError::Model(_) => {
                Status::internal("the text encoder failed on this request; it has been logged")
            }
            TextEncoderError::Config(_) | TextEncoderError::Server(_) => {
                Status::internal("text encoder internal error")
            }
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
            (
                TextEncoderError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (
                TextEncoderError::Overloaded {
                    capacity: 1,
                    retry_after: Duration::from_millis(5),
                },
                Code::ResourceExhausted,
            ),
            (TextEncoderError::NotReady, Code::Unavailable),
            (TextEncoderError::Cancelled, Code::Cancelled),
            (TextEncoderError::DeadlineExceeded, Code::DeadlineExceeded),
            (TextEncoderError::Model("/secret".into()), Code::Internal),
            (TextEncoderError::Config("/secret".into()), Code::Internal),
            (TextEncoderError::Server("/secret".into()), Code::Internal),
        ];
        for (e, code) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code);
            assert!(!s.message().contains("/secret"));
        }
    }
}
