//! `GET /v1/models` (every served model, OpenAI's list shape plus each model's kind), `/healthz` (the process
//! answers) and `/readyz` (the gateway is SERVING: every stage has a usable replica).

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
    /// Extension: `edit` for an instruction-editing model (Qwen-Image-Edit-2509 / -2511: `/v1/images/edits`
    /// without a mask edits 1-3 images by instruction), `base` for a base model (generations, img2img,
    /// inpaint, outpaint, pose), `unknown` before its denoiser described itself.
    pub kind: String,
    /// Extension: the model requests without `model` get (the first served one).
    pub default: bool,
    /// Extension: the denoiser's model id (its snapshot folder name), empty before it described itself.
    pub model_id: String,
    /// Extension: `_class_name` of the denoiser's snapshot (`QwenImagePipeline`, `QwenImageEditPlusPipeline`).
    pub pipeline_class: String,
    /// Extension: every stage of the model has a usable replica.
    pub ready: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Model>,
}

/// Every served model (the first is the default), with its kind (`base` or `edit`).
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
    let models = &state.service.models.models;
    if !models.iter().all(|m| m.named()) {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the stages have not described their model yet (starting or unreachable); retry shortly",
            "unavailable",
        );
        e.retry_after_secs = Some(1);
        return e.into_response();
    }
    let data = models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let info = m.info();
            Model {
                id: info.name,
                object: "model".into(),
                created: 0,
                owned_by: "qwen-image-serve".into(),
                kind: match m.is_edit() {
                    Some(true) => "edit",
                    Some(false) => "base",
                    None => "unknown",
                }
                .into(),
                default: i == 0,
                model_id: info.model_id,
                pipeline_class: info.pipeline_class,
                ready: info.ready,
            }
        })
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response()
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
