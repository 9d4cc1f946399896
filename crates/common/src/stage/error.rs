//! The one error type of every model stage and its deliberate mapping to gRPC status codes.
//!
//! Status messages say what the caller can do; internals (paths, candle messages, panic payloads) go to the
//! log only.

use std::time::Duration;

use tonic::Status;

use crate::queue::AdmitError;
use crate::tensor::TensorError;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The request is malformed; the message says what to change.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request needs something this stage was not started with (e.g. a ControlNet it has not loaded).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request names something this stage does not hold (e.g. a LoRA adapter it has not loaded); the
    /// message lists what it holds.
    #[error("{0}")]
    NotFound(String),
    /// Every admission slot is taken.
    #[error("the {stage} queue is full ({capacity} admitted)")]
    Overloaded {
        stage: &'static str,
        capacity: usize,
        retry_after: Duration,
    },
    /// Loading, warming up or draining.
    #[error("not ready")]
    NotReady,
    /// The caller went away.
    #[error("cancelled by the caller")]
    Cancelled,
    /// The caller's deadline passed; the text says how far the work got and what to change.
    #[error("deadline exceeded {0}")]
    DeadlineExceeded(String),
    /// The model failed on a valid request (details are logged, not sent).
    #[error("model error: {0}")]
    Model(String),
    /// The job panicked (a bug of ours); caught, logged, and only this request fails.
    #[error("the job panicked: {0}")]
    Panicked(String),
    /// The model worker has stopped and cannot serve (the process turns NOT_SERVING and exits non-zero).
    #[error("the model worker stopped: {0}")]
    WorkerStopped(String),
    /// Startup: the snapshot or the configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// Startup / serving I/O and transport failures.
    #[error("server: {0}")]
    Server(String),
}

impl StageError {
    /// The model produced non-finite values (`what`, e.g. "final latents") from a request that passed
    /// validation: extreme but finite inputs; the answer is never OK with NaN or infinity in it.
    pub fn non_finite_output(what: &str) -> Self {
        Self::InvalidArgument(format!(
            "the request's values made the {what} non-finite (NaN or infinity); send values of ordinary \
             magnitude (e.g. latents and embeddings within a few hundred, true_cfg_scale within 1..=20)"
        ))
    }

    /// A deadline that passed before the job ran.
    pub fn deadline_before_start() -> Self {
        Self::DeadlineExceeded("before the work started; allow more time (grpc-timeout)".into())
    }
}

impl From<TensorError> for StageError {
    fn from(e: TensorError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

impl From<AdmitError> for StageError {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::Overloaded {
                service,
                capacity,
                retry_after,
            } => Self::Overloaded {
                stage: service,
                capacity,
                retry_after,
            },
            AdmitError::WorkerGone => Self::WorkerStopped("the worker thread has ended".into()),
        }
    }
}

impl From<StageError> for Status {
    fn from(e: StageError) -> Self {
        match e {
            StageError::InvalidArgument(m) => Status::invalid_argument(m),
            StageError::FailedPrecondition(m) => Status::failed_precondition(m),
            StageError::NotFound(m) => Status::not_found(m),
            StageError::Overloaded {
                stage,
                capacity,
                retry_after,
            } => crate::status::overloaded(stage, capacity, retry_after),
            StageError::NotReady => Status::unavailable(
                "this stage is not serving (loading, warming up or draining); retry or use another replica",
            ),
            StageError::Cancelled => Status::cancelled("the request was cancelled"),
            StageError::DeadlineExceeded(how) => {
                Status::deadline_exceeded(format!("the deadline passed {how}"))
            }
            StageError::Model(_) => {
                Status::internal("the stage failed on this request; it has been logged")
            }
            StageError::Panicked(_) => Status::internal(
                "the stage hit a bug on this request (logged); the replica keeps serving",
            ),
            StageError::WorkerStopped(_) => Status::unavailable(
                "this replica's model worker has stopped; retry on another replica",
            ),
            StageError::Config(_) | StageError::Server(_) => {
                Status::internal("stage internal error; it has been logged")
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
                StageError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (StageError::NotFound("x".into()), Code::NotFound),
            (
                StageError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (
                StageError::Overloaded {
                    stage: "denoiser",
                    capacity: 1,
                    retry_after: Duration::from_millis(5),
                },
                Code::ResourceExhausted,
            ),
            (StageError::NotReady, Code::Unavailable),
            (StageError::Cancelled, Code::Cancelled),
            (StageError::deadline_before_start(), Code::DeadlineExceeded),
            (
                StageError::Model("candle: boom /secret/path".into()),
                Code::Internal,
            ),
            (StageError::Panicked("/secret".into()), Code::Internal),
            (
                StageError::WorkerStopped("/secret".into()),
                Code::Unavailable,
            ),
            (StageError::Config("/secret".into()), Code::Internal),
            (StageError::Server("/secret".into()), Code::Internal),
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
