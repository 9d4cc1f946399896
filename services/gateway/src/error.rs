//! The gateway's one error enum and its deliberate mapping to gRPC status codes.

use tonic::{Code, Status};

/// The stage a call went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageName {
    TextEncoder,
    Denoiser,
    Vae,
}

impl StageName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TextEncoder => "text-encoder",
            Self::Denoiser => "denoiser",
            Self::Vae => "vae",
        }
    }
}

impl std::fmt::Display for StageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The caller's request is invalid; the message says what to change.
    #[error("{0}")]
    InvalidArgument(String),
    /// The stages cannot serve the request as configured (e.g. they do not serve one model); the message
    /// names what differs.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A stage answered with an error status (after retries on other replicas where that made sense).
    #[error("{stage} stage answered {}: {}", .status.code(), .status.message())]
    Upstream { stage: StageName, status: Status },
    /// A stage answered OK with a response that breaks the API contract (wrong shape, missing field).
    #[error("{stage} stage sent an unusable response: {detail}")]
    BadUpstreamResponse { stage: StageName, detail: String },
    /// The request's deadline passed.
    #[error("the request deadline passed")]
    DeadlineExceeded,
    /// The gateway is shutting down or has no usable replica configured.
    #[error("{0}")]
    Unavailable(String),
    /// A gateway-internal failure (PNG encoding, server start).
    #[error("{0}")]
    Internal(String),
}

impl GatewayError {
    pub fn upstream(stage: StageName, status: Status) -> Self {
        Self::Upstream { stage, status }
    }

    pub fn bad_response(stage: StageName, detail: impl Into<String>) -> Self {
        Self::BadUpstreamResponse {
            stage,
            detail: detail.into(),
        }
    }
}

/// Longest stage message passed on to the caller (a stage may echo a long client string; the status must
/// fit in an HTTP/2 header).
const MAX_FORWARDED_MESSAGE_BYTES: usize = 1024;

/// `"{stage}: {message}"`, the message cut at [`MAX_FORWARDED_MESSAGE_BYTES`] (on a char boundary).
fn forwarded(stage: StageName, message: &str) -> String {
    if message.len() <= MAX_FORWARDED_MESSAGE_BYTES {
        return format!("{stage}: {message}");
    }
    let mut end = MAX_FORWARDED_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{stage}: {}... (cut)", &message[..end])
}

/// Upstream codes are mapped on purpose: retryable conditions stay retryable for the caller (a dead
/// replica is UNAVAILABLE), a stage's verdict on the request (INVALID_ARGUMENT, FAILED_PRECONDITION,
/// OUT_OF_RANGE) keeps its code and message, and the rest is INTERNAL.
fn map_upstream(stage: StageName, status: &Status) -> Status {
    let internal = || {
        Status::internal(format!(
            "the {stage} stage failed; retrying will likely not help, report it with the request id"
        ))
    };
    match status.code() {
        Code::Unavailable => Status::unavailable(format!(
            "no {stage} replica is reachable right now; retry in a few seconds"
        )),
        Code::ResourceExhausted => {
            let mut s = Status::resource_exhausted(format!(
                "every {stage} replica is busy; retry later{}",
                qwen_image_common::status::retry_after(status)
                    .map(|d| format!(" (in about {} ms)", d.as_millis()))
                    .unwrap_or_default()
            ));
            if let Some(v) = status
                .metadata()
                .get(qwen_image_common::status::RETRY_AFTER_MS_KEY)
            {
                s.metadata_mut()
                    .insert(qwen_image_common::status::RETRY_AFTER_MS_KEY, v.clone());
            }
            s
        }
        Code::DeadlineExceeded => Status::deadline_exceeded(format!(
            "the request deadline passed during the {stage} stage; allow more time"
        )),
        Code::Cancelled => Status::cancelled(format!("the {stage} stage call was cancelled")),
        // The stage lacks something the request names (e.g. a ControlNet id the denoiser has not loaded):
        // the caller can fix it, and the stage's message says how.
        Code::FailedPrecondition => Status::failed_precondition(forwarded(stage, status.message())),
        // The stage found the request invalid (a check the gateway does not make, e.g. a ControlNet that
        // takes no mask): the caller can fix it, and the stage's message says how.
        Code::InvalidArgument => Status::invalid_argument(forwarded(stage, status.message())),
        Code::OutOfRange => Status::out_of_range(forwarded(stage, status.message())),
        // The request names something the stage does not hold (a LoRA adapter the denoiser has not loaded);
        // the stage's message lists what it holds.
        Code::NotFound => Status::not_found(forwarded(stage, status.message())),
        Code::Unimplemented
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Aborted
        | Code::DataLoss
        | Code::Internal
        | Code::Unknown
        | Code::Ok => internal(),
    }
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        match &e {
            GatewayError::InvalidArgument(m) => Status::invalid_argument(m.clone()),
            GatewayError::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
            GatewayError::Upstream { stage, status } => {
                tracing::warn!(%stage, code = ?status.code(), message = status.message(), "stage call failed");
                map_upstream(*stage, status)
            }
            GatewayError::BadUpstreamResponse { stage, detail } => {
                tracing::error!(%stage, %detail, "stage response breaks the API contract");
                Status::internal(format!(
                    "the {stage} stage sent an unusable response; report it with the request id"
                ))
            }
            GatewayError::DeadlineExceeded => Status::deadline_exceeded(
                "the request deadline passed; send a longer deadline or fewer steps",
            ),
            GatewayError::Unavailable(m) => Status::unavailable(m.clone()),
            GatewayError::Internal(m) => {
                tracing::error!(error = %m, "internal gateway error");
                Status::internal("internal gateway error; report it with the request id")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(e: GatewayError) -> Code {
        Status::from(e).code()
    }

    #[test]
    fn maps_upstream_codes_on_purpose() {
        let up = |c: Code| {
            code(GatewayError::upstream(
                StageName::Denoiser,
                Status::new(c, "x"),
            ))
        };
        assert_eq!(up(Code::Unavailable), Code::Unavailable);
        assert_eq!(up(Code::ResourceExhausted), Code::ResourceExhausted);
        assert_eq!(up(Code::DeadlineExceeded), Code::DeadlineExceeded);
        assert_eq!(up(Code::Cancelled), Code::Cancelled);
        assert_eq!(up(Code::InvalidArgument), Code::InvalidArgument);
        assert_eq!(up(Code::OutOfRange), Code::OutOfRange);
        assert_eq!(up(Code::FailedPrecondition), Code::FailedPrecondition);
        assert_eq!(up(Code::NotFound), Code::NotFound);
        assert_eq!(up(Code::Internal), Code::Internal);
        assert_eq!(
            code(GatewayError::InvalidArgument("w".into())),
            Code::InvalidArgument
        );
        assert_eq!(code(GatewayError::DeadlineExceeded), Code::DeadlineExceeded);
        assert_eq!(
            code(GatewayError::FailedPrecondition("x".into())),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(GatewayError::bad_response(StageName::Vae, "x")),
            Code::Internal
        );
        assert_eq!(
            code(GatewayError::Unavailable("x".into())),
            Code::Unavailable
        );
        assert_eq!(code(GatewayError::Internal("x".into())), Code::Internal);
    }

    #[test]
    fn keeps_the_retry_hint() {
        let busy = qwen_image_common::status::overloaded(
            "denoiser",
            1,
            std::time::Duration::from_millis(700),
        );
        let s = Status::from(GatewayError::upstream(StageName::Denoiser, busy));
        assert_eq!(
            qwen_image_common::status::retry_after(&s),
            Some(std::time::Duration::from_millis(700))
        );
        assert!(s.message().contains("700 ms"), "{}", s.message());
    }

    #[test]
    fn stage_verdicts_keep_their_message_cut_to_size() {
        let s = Status::from(GatewayError::upstream(
            StageName::Denoiser,
            Status::invalid_argument("controlnet `x` takes no mask; drop the mask"),
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "denoiser: controlnet `x` takes no mask; drop the mask"
        );
        let long = "é".repeat(10_000);
        let s = Status::from(GatewayError::upstream(
            StageName::Vae,
            Status::failed_precondition(long),
        ));
        assert!(
            s.message().len() < MAX_FORWARDED_MESSAGE_BYTES + 32,
            "{}",
            s.message().len()
        );
        assert!(s.message().ends_with("(cut)"));
    }

    #[test]
    fn internal_details_stay_in_the_log() {
        let s = Status::from(GatewayError::Internal("/secret/path: png broke".into()));
        assert!(!s.message().contains("/secret"));
    }
}
