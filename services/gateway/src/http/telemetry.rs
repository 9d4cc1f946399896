//! Per-request handling of the HTTP API (a route layer, so the matched route is known): the `http.server` span (parented by the caller's `traceparent`;
//! the gRPC call it makes is its child), the request metrics by route and status, and OpenAI error JSON for
//! the errors axum answers by itself (413 body too large, 404, 405, 415).

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use opentelemetry::global;
use qwen_image_common::grpc::HeaderExtractor;
use qwen_image_common::metric_names as m;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::error::ApiError;

/// Bytes of a plain-text error body kept as the message.
const MAX_MESSAGE: usize = 1024;

pub async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let span = tracing::info_span!(
        "http.server",
        otel.name = %format!("{} {route}", request.method()),
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    if !span.is_disabled() {
        let parent =
            global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(request.headers())));
        let _ = span.set_parent(parent);
    }
    let response = next.run(request).instrument(span.clone()).await;
    let response = openai_error(response).await;
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    count(route, status, started);
    response
}

fn count(route: String, status: u16, started: Instant) {
    let labels = [
        ("service", "gateway".to_string()),
        ("route", route),
        ("status", status.to_string()),
    ];
    metrics::counter!(m::HTTP_REQUESTS_TOTAL, &labels).increment(1);
    metrics::histogram!(m::HTTP_REQUEST_SECONDS, &labels).record(started.elapsed().as_secs_f64());
}

/// A non-JSON error answer (axum's own rejections) rewritten as OpenAI error JSON with the same status.
async fn openai_error(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_MESSAGE * 4)
        .await
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(MAX_MESSAGE)]).into_owned())
        .unwrap_or_default();
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the body is larger than the gateway accepts ({} MiB): send smaller pictures",
            qwen_image_common::limits::MAX_MESSAGE_BYTES >> 20
        ),
        StatusCode::METHOD_NOT_ALLOWED => {
            "method not allowed on this path: see /openapi.json".to_string()
        }
        _ if text.trim().is_empty() => status.canonical_reason().unwrap_or("error").to_string(),
        _ => text,
    };
    let code = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace(' ', "_");
    let mut r = ApiError::new(status, message, &code).into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            r.headers_mut().insert(k.clone(), v.clone());
        }
    }
    r
}

/// Unknown paths: 404 naming where the API is described.
pub async fn not_found(request: Request<Body>) -> Response {
    count(
        "other".into(),
        StatusCode::NOT_FOUND.as_u16(),
        Instant::now(),
    );
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route for {} {}: the API is described at /openapi.json",
            request.method(),
            request.uri().path()
        ),
        "not_found",
    )
    .into_response()
}
