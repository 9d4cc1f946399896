//! `GET /v1/models` (the served model, OpenAI's list shape), `/healthz` (the process answers) and `/readyz`
//! (the gateway is SERVING: every stage has a usable replica).

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};

#[derive(Debug, Serialize, ToSchema)]
pub struct Model {
    /// The name requests may send as `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds (0: unknown).
    pub created: u64,
    pub owned_by: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Model>,
}

/// The served model (`--model-name`, else the model id the stages describe).
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    responses(
        (status = 200, body = ModelList),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 503, description = "The stages have not described their model yet", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = state.authorize(&headers) {
        return e.into_response();
    }
    match state.served_model() {
        Some(id) => Json(ModelList {
            object: "list".into(),
            data: vec![Model {
                id,
                object: "model".into(),
                created: 0,
                owned_by: "qwen-image-serve".into(),
            }],
        })
        .into_response(),
        None => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the stages have not described their model yet (starting or unreachable); retry shortly",
                "unavailable",
            );
            e.retry_after_secs = Some(1);
            e.into_response()
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `ready` or `not_ready`.
    pub status: String,
}

/// Liveness: 200 while the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: 200 when every stage has a healthy replica serving the model, 503 otherwise (starting,
/// stages down or mismatched, draining).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses((status = 200, body = Health), (status = 503, body = Health))
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    if state.ready.load(Ordering::Relaxed) {
        (
            StatusCode::OK,
            Json(Health {
                status: "ready".into(),
            }),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "not_ready".into(),
            }),
        )
    }
}
