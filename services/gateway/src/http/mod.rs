//! The OpenAI-compatible HTTP API and the web page, beside gRPC on the gateway (`--http-listen`).
//!
//! Every image request goes through the gRPC service itself ([`call`]): the handlers only translate
//! OpenAI's bodies into the gRPC messages ([`generations`], [`edits`]) and the event stream back into
//! OpenAI's JSON or Server-Sent Events ([`respond`]). The OpenAPI document is generated from the handlers'
//! annotations and types as the router is built ([`router`]), so the two cannot disagree.

mod call;
mod edits;
mod error;
mod generations;
mod mask;
mod models;
mod options;
mod page;
mod respond;
mod telemetry;
mod tls;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::HeaderMap;
use qwen_image_common::tls::ServerTls;
use tokio::net::TcpListener;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::service::GatewayService;
use error::ApiError;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    client: call::Client,
    service: Arc<GatewayService>,
    /// The gateway's health (SERVING), kept by `run`'s health checker.
    ready: Arc<AtomicBool>,
}

/// The model a request targets.
#[derive(Debug, Clone)]
pub struct Target {
    /// The name to send as `settings.model` (as the request gave it; empty = the first model).
    pub asked: String,
    /// The model's name (`GET /v1/models` id).
    pub name: String,
    /// Whether it is an instruction-editing model (its denoiser serves a `QwenImageEditPlusPipeline`
    /// snapshot); `None` before its denoiser described itself.
    pub edit: Option<bool>,
}

impl AppState {
    /// The model `asked` names (absent or empty = the first), as the gRPC service selects it; an unknown
    /// name is 404 `model_not_found` listing the served ones.
    fn target(&self, asked: Option<&str>) -> Result<Target, ApiError> {
        let asked = asked.map(str::trim).unwrap_or_default();
        let model = self
            .service
            .models
            .select(asked)
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => {
                    let served: Vec<String> = self
                        .service
                        .models
                        .models
                        .iter()
                        .map(|m| m.display_name())
                        .collect();
                    ApiError::model_not_found(format!(
                        "model `{}` is not served here; served: [{}] (send one of them as `model`, see GET \
                         /v1/models, or leave model out for `{}`)",
                        qwen_image_common::wire_guard::clip(asked, 200),
                        served.join(", "),
                        served.first().cloned().unwrap_or_default()
                    ))
                }
                _ => ApiError::from_status(&s),
            })?;
        Ok(Target {
            asked: asked.to_string(),
            name: model.display_name(),
            edit: model.is_edit(),
        })
    }

    /// The API key check of the gRPC service, for the endpoints that do not call it (`/v1/models`).
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        match &self.service.config.api_keys {
            Some(keys) => keys
                .check(&tonic::metadata::MetadataMap::from_headers(headers.clone()))
                .map(|_| ())
                .map_err(|s| ApiError::from_status(&s)),
            None => Ok(()),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "qwen-image-serve HTTP API",
        description = "OpenAI-compatible image generation and editing over the Qwen-Image stages \
            (the same flows as the gRPC `qwen_image.v1.ImageGenerator` service)."
    ),
    modifiers(&BearerAuth),
    tags((name = "images"), (name = "models"), (name = "health"))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routes and the OpenAPI document they generate.
pub fn router(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(generations::create))
        .routes(routes!(edits::create))
        .routes(routes!(models::list))
        .routes(routes!(models::healthz))
        .routes(routes!(models::readyz))
        .split_for_parts();
    let doc_json = Arc::new(doc.to_pretty_json().unwrap_or_default());
    let app = api
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc_json.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        doc.as_str().to_string(),
                    )
                }
            }),
        )
        .merge(page::routes())
        .route_layer(axum::middleware::from_fn(telemetry::observe))
        .fallback(telemetry::not_found)
        .layer(DefaultBodyLimit::max(crate::limits::MAX_REQUEST_BYTES))
        .with_state(state);
    (app, doc)
}

/// Serves the HTTP API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<ServerTls>,
    service: Arc<GatewayService>,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AppState {
        client: call::Client::new(service.clone()),
        service,
        ready,
    };
    let (app, _) = router(state);
    match tls {
        // The gRPC server's watch reloads the shared config.
        Some(tls) => {
            axum::serve(tls::HttpsListener::new(listener, &tls)?, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}
