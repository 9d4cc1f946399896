//! Per-RPC telemetry shared by every server and client: W3C trace context, request ids, RPC metrics.
//!
//! Servers add one [`ServerTelemetryLayer`]: for each RPC it extracts the caller's `traceparent` once,
//! opens the `grpc.server` span (the parent of the handler's spans) with the request id, counts the RPC
//! and its bytes, times it until the end of the response stream, records the final gRPC status on the
//! span (`rpc.grpc.status_code`, `otel.status_code = "ERROR"` when not OK) and returns `x-request-id`
//! in the response headers. Clients add [`InjectTraceContext`] so the current span's context goes out
//! as `traceparent`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use opentelemetry::global;
use opentelemetry::propagation::{Extractor, Injector};
use tonic::body::Body;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metric_names as m;
use crate::wire_guard;

/// Metadata key of the request id: optional in requests (the caller's own id is kept), always in
/// responses.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest caller-chosen request id kept; longer or non-printable ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A random UUID-v4-formatted id (std's hasher keys come from the OS's randomness).
pub fn new_request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let word = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0);
        h.finish()
    };
    let (a, b) = (word(), word());
    let a = (a & !0xf000) | 0x4000; // version 4
    let b = (b & !(0b11 << 62)) | (0b10 << 62); // RFC 4122 variant
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// The caller's request id if it is a sane token (printable ASCII, 1..=128 chars).
pub fn valid_request_id(v: &HeaderValue) -> Option<&str> {
    v.to_str()
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= MAX_REQUEST_ID_LEN)
        .filter(|s| s.bytes().all(|b| b.is_ascii_graphic()))
}

/// Reads W3C headers from an HTTP request.
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes W3C headers into outgoing gRPC metadata.
pub struct MetadataInjector<'a>(pub &'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

tokio::task_local! {
    static REQUEST_ID: String;
}

/// Runs `fut` (a request's work, e.g. a spawned orchestration task) with `request_id` as the id that
/// [`InjectTraceContext`] forwards on outgoing calls.
pub async fn with_request_id<F: Future>(request_id: String, fut: F) -> F::Output {
    REQUEST_ID.scope(request_id, fut).await
}

/// Client interceptor: sends the current span's trace context as `traceparent` (nothing when traces
/// are not exported) and the request id of [`with_request_id`] as `x-request-id`. Every stage client
/// of the gateway uses it.
#[derive(Debug, Clone, Copy, Default)]
pub struct InjectTraceContext;

impl tonic::service::Interceptor for InjectTraceContext {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let cx = tracing::Span::current().context();
        global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MetadataInjector(req.metadata_mut()))
        });
        let _ = REQUEST_ID.try_with(|id| {
            if let Ok(v) = tonic::metadata::MetadataValue::try_from(id.as_str()) {
                req.metadata_mut().insert(REQUEST_ID_HEADER, v);
            }
        });
        Ok(req)
    }
}

/// `/pkg.Service/Method` -> (`pkg.Service`, `Method`).
fn split_path(path: &str) -> (&str, &str) {
    let p = path.trim_start_matches('/');
    p.split_once('/').unwrap_or((p, ""))
}

/// Health checks, reflection and `StageInfo` (control-plane calls the gateway makes on its own, outside any
/// request) are counted but get no span.
fn traced(grpc_service: &str) -> bool {
    !(grpc_service.starts_with("grpc.health.")
        || grpc_service.starts_with("grpc.reflection.")
        || grpc_service == "qwen_image.v1.StageInfo")
}

/// The tower layer of every server (see the module docs). `service` is the metrics `service` label.
#[derive(Debug, Clone, Copy)]
pub struct ServerTelemetryLayer {
    service: &'static str,
}

impl ServerTelemetryLayer {
    pub fn new(service: &'static str) -> Self {
        Self { service }
    }
}

impl<S> tower::Layer<S> for ServerTelemetryLayer {
    type Service = ServerTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTelemetry {
            inner,
            service: self.service,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerTelemetry<S> {
    inner: S,
    service: &'static str,
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Clone-and-swap for a tower layer's `call`: returns the service `poll_ready` readied and leaves a fresh
/// clone in its place.
pub(crate) fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

impl<S> tower::Service<http::Request<Body>> for ServerTelemetry<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let service = self.service;
        let started = Instant::now();
        let (mut parts, body) = req.into_parts();
        let (grpc_service, rpc) = split_path(parts.uri.path());
        let rpc = wire_guard::rpc_label(grpc_service, rpc);
        let oversized = wire_guard::oversized_headers(&parts.headers);

        let request_id = match parts
            .headers
            .get(REQUEST_ID_HEADER)
            .and_then(valid_request_id)
        {
            Some(id) => id.to_string(),
            None => {
                let id = new_request_id();
                // The handler (the gateway's) reads the same id from its metadata.
                if let Ok(v) = HeaderValue::from_str(&id) {
                    parts.headers.insert(REQUEST_ID_HEADER, v);
                }
                id
            }
        };
        let span = if traced(grpc_service) {
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = %parts.uri.path(),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = %grpc_service,
                rpc.method = %rpc,
                request_id = %request_id,
                rpc.grpc.status_code = Empty,
                otel.status_code = Empty,
                otel.status_description = Empty,
            );
            if !span.is_disabled() {
                let parent = global::get_text_map_propagator(|p| {
                    p.extract(&HeaderExtractor(&parts.headers))
                });
                let _ = span.set_parent(parent);
            }
            span
        } else {
            tracing::Span::none()
        };

        metrics::gauge!(m::GRPC_IN_FLIGHT, "service" => service, "rpc" => rpc.clone()).increment(1);
        let received = metrics::counter!(m::GRPC_RECEIVED_BYTES_TOTAL, "service" => service, "rpc" => rpc.clone());
        let req = http::Request::from_parts(
            parts,
            Body::new(CountingBody {
                inner: body,
                received,
            }),
        );
        let finish = Finish {
            service,
            rpc,
            span: span.clone(),
            started,
            sent: 0,
        };
        let fut: BoxFuture<Result<Self::Response, Self::Error>> = match oversized {
            Some(status) => Box::pin(std::future::ready(Ok(wire_guard::status_response(status)))),
            None => Box::pin(tracing::Instrument::instrument(inner.call(req), span)),
        };
        Box::pin(async move {
            let response = match fut.await {
                Ok(r) => r,
                Err(e) => {
                    finish.done(tonic::Code::Internal as i32, None);
                    return Err(e);
                }
            };
            let (mut parts, body) = response.into_parts();
            if let Ok(v) = HeaderValue::from_str(&request_id) {
                parts.headers.insert(REQUEST_ID_HEADER, v);
            }
            // Trailers-only responses (errors before any message) carry the status in the headers:
            // recorded now, before the caller can see the answer.
            wire_guard::fix_status(&mut parts.headers, true);
            let finish = match grpc_status(&parts.headers) {
                Some((code, message)) => {
                    finish.done(code, message);
                    None
                }
                None => Some(finish),
            };
            let body = TrackedBody {
                inner: body,
                finish,
            };
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

/// `grpc-status` and `grpc-message` of headers or trailers.
fn grpc_status(h: &HeaderMap) -> Option<(i32, Option<String>)> {
    let code = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode);
    Some((code, message))
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What is recorded once the response has ended (or was dropped).
struct Finish {
    service: &'static str,
    rpc: String,
    span: tracing::Span,
    started: Instant,
    sent: u64,
}

impl Finish {
    fn done(self, code: i32, message: Option<String>) {
        let Self {
            service,
            rpc,
            span,
            started,
            sent,
        } = self;
        let code_label = code.to_string();
        metrics::counter!(m::GRPC_REQUESTS_TOTAL, "service" => service, "rpc" => rpc.clone(), "code" => code_label.clone())
            .increment(1);
        metrics::histogram!(m::GRPC_REQUEST_SECONDS, "service" => service, "rpc" => rpc.clone(), "code" => code_label)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(m::GRPC_SENT_BYTES_TOTAL, "service" => service, "rpc" => rpc.clone())
            .increment(sent);
        metrics::gauge!(m::GRPC_IN_FLIGHT, "service" => service, "rpc" => rpc).decrement(1);
        span.record("rpc.grpc.status_code", code);
        if code != tonic::Code::Ok as i32 {
            span.record("otel.status_code", "ERROR");
            if let Some(msg) = message.filter(|m| !m.is_empty()) {
                span.record("otel.status_description", msg.as_str());
            }
        }
    }
}

/// Request body that counts the bytes it yields.
struct CountingBody {
    inner: Body,
    received: metrics::Counter,
}

impl HttpBody for CountingBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.received.increment(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Response body that counts bytes, finds the final status in the trailers and records the RPC when
/// it ends, fails or is dropped (the caller went away: CANCELLED). `finish` is None for trailers-only
/// responses, recorded before the body.
struct TrackedBody {
    inner: Body,
    finish: Option<Finish>,
}

impl TrackedBody {
    fn end(&mut self, status: Option<(i32, Option<String>)>) {
        if let Some(f) = self.finish.take() {
            let (code, message) = status.unwrap_or((tonic::Code::Ok as i32, None));
            f.done(code, message);
        }
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut polled
            && frame.is_trailers()
        {
            let taken = std::mem::replace(frame, Frame::data(Bytes::new()));
            *frame = match taken.into_trailers() {
                Ok(mut trailers) => {
                    wire_guard::fix_status(&mut trailers, false);
                    Frame::trailers(trailers)
                }
                Err(other) => other,
            };
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if let Some(f) = self.finish.as_mut() {
                        f.sent += n;
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    let status = grpc_status(trailers);
                    self.end(status);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let status = Some((e.code() as i32, Some(e.message().to_string())));
                self.end(status);
            }
            Poll::Ready(None) => self.end(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        // Dropped before its end: the caller went away (or the server stopped) mid-stream.
        self.end(Some((tonic::Code::Cancelled as i32, None)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let a = new_request_id();
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert_ne!(a, new_request_id());
        assert_eq!(
            valid_request_id(&HeaderValue::from_static("abc-123")),
            Some("abc-123")
        );
        assert_eq!(valid_request_id(&HeaderValue::from_static("a b")), None);
        assert_eq!(valid_request_id(&HeaderValue::from_static("")), None);
    }

    #[test]
    fn paths_and_messages() {
        assert_eq!(
            split_path("/qwen_image.v1.Denoiser/Denoise"),
            ("qwen_image.v1.Denoiser", "Denoise")
        );
        assert!(!traced("grpc.health.v1.Health"));
        assert!(traced("qwen_image.v1.Vae"));
        assert!(!traced("qwen_image.v1.StageInfo"));
        assert_eq!(percent_decode("bad%20shape%3A 1"), "bad shape: 1");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
