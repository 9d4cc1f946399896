//! HTTP errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) and their status codes,
//! mapped from the gRPC status the service answered.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::Code;
use utoipa::ToSchema;

/// OpenAI's error body.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// What went wrong and what to send instead.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`, `server_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when known.
    pub param: Option<String>,
    /// The gRPC code name (`invalid_argument`, `unauthenticated`, ...) or an HTTP-level code.
    pub code: Option<String>,
}

/// An HTTP API error: status, body, and the `Retry-After` seconds of 429 / 503.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: ErrorDetail,
    pub retry_after_secs: Option<u64>,
}

fn kind_of(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        503 => "service_unavailable_error",
        504 => "timeout_error",
        _ => "server_error",
    }
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>, code: &str) -> Self {
        Self {
            status,
            detail: ErrorDetail {
                message: message.into(),
                kind: kind_of(status).into(),
                param: None,
                code: Some(code.into()),
            },
            retry_after_secs: None,
        }
    }

    /// 400 about one request field.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, message, "invalid_argument");
        e.detail.param = Some(param.into());
        e
    }

    /// 404 `model_not_found` (OpenAI's code): the request's `model` is not served; `message` lists the
    /// served ones.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::NOT_FOUND, message, "model_not_found");
        e.detail.param = Some("model".into());
        e
    }

    /// 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, "invalid_argument")
    }

    /// The HTTP form of a gRPC status from the service: 400 for the caller's mistakes, 401, 429 with
    /// Retry-After, 503, 504, 500 for the gateway's own failures. The message is the service's.
    pub fn from_status(s: &tonic::Status) -> Self {
        let status = match s.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                StatusCode::BAD_REQUEST
            }
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let code = format!("{:?}", s.code());
        let mut e = Self::new(status, s.message(), &snake(&code));
        e.detail.param = param_of(s.message());
        e.retry_after_secs = match status {
            StatusCode::TOO_MANY_REQUESTS => Some(
                qwen_image_common::status::retry_after(s)
                    .map_or(1, |d| d.as_millis().div_ceil(1000).max(1) as u64),
            ),
            StatusCode::SERVICE_UNAVAILABLE => Some(1),
            _ => None,
        };
        e
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.detail.clone(),
        }
    }
}

/// `InvalidArgument` -> `invalid_argument`.
fn snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The HTTP field a validation message of the service is about (its messages name the proto fields).
fn param_of(message: &str) -> Option<String> {
    let m = message.to_ascii_lowercase();
    [
        ("width", "size"),
        ("height", "size"),
        ("num_images", "n"),
        ("negative_prompt", "negative_prompt"),
        ("prompt", "prompt"),
        ("steps", "steps"),
        ("true_cfg_scale", "true_cfg_scale"),
        ("strength", "strength"),
        ("mask", "mask"),
        ("keypoints", "keypoints"),
        ("pose_image", "pose_image"),
        ("image", "image"),
    ]
    .iter()
    .find(|(needle, _)| m.contains(needle))
    .map(|(_, p)| p.to_string())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after_secs
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_grpc_codes_to_http() {
        let of = |c: Code| {
            ApiError::from_status(&tonic::Status::new(c, "m"))
                .status
                .as_u16()
        };
        assert_eq!(of(Code::InvalidArgument), 400);
        assert_eq!(of(Code::FailedPrecondition), 400);
        assert_eq!(of(Code::Unauthenticated), 401);
        assert_eq!(of(Code::ResourceExhausted), 429);
        assert_eq!(of(Code::Unavailable), 503);
        assert_eq!(of(Code::DeadlineExceeded), 504);
        assert_eq!(of(Code::Internal), 500);
        let busy = qwen_image_common::status::overloaded(
            "denoiser",
            1,
            std::time::Duration::from_millis(1500),
        );
        let e = ApiError::from_status(&busy);
        assert_eq!(e.retry_after_secs, Some(2));
        assert_eq!(e.detail.kind, "rate_limit_error");
        assert_eq!(e.detail.code.as_deref(), Some("resource_exhausted"));
        let e = ApiError::from_status(&tonic::Status::invalid_argument(
            "width_px 1000 is not a multiple of 16",
        ));
        assert_eq!(e.detail.param.as_deref(), Some("size"));
    }
}
