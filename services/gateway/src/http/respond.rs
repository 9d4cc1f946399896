//! Runs a call through the gRPC service and answers in OpenAI's shapes: one JSON `ImagesResponse`, or with
//! `stream` Server-Sent Events (`image_generation.*` / `image_edit.*`: our `progress` events, OpenAI's
//! `partial_image` events from the previews, then one `completed` event per image; `error` on failure).

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use qwen_image_proto::v1::{GenerateEvent, GenerateResult, PreviewSettings, Stage, generate_event};
use serde::Serialize;
use tonic::Streaming;
use utoipa::ToSchema;

use super::AppState;
use super::call::{Call, request_id};
use super::error::ApiError;
use crate::service::REQUEST_ID_KEY;

/// Which endpoint answers (the event type prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Generation,
    Edit,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Generation => "image_generation",
            Self::Edit => "image_edit",
        }
    }
}

/// How to answer: JSON or SSE, and how many partial images.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub kind: Kind,
    pub stream: bool,
    pub partial_images: u32,
    /// The request's steps (absent = the service's default, 50), to spread the previews.
    pub steps: u32,
}

/// diffusers' default num_inference_steps, the service's default too.
const DEFAULT_STEPS: u32 = 50;

impl Output {
    pub fn new(kind: Kind, stream: bool, partial_images: u32, steps: Option<u32>) -> Self {
        Self {
            kind,
            stream,
            partial_images: if stream { partial_images } else { 0 },
            steps: steps.filter(|s| *s > 0).unwrap_or(DEFAULT_STEPS),
        }
    }

    /// The preview settings for `partial_images` previews evenly over the steps.
    pub fn preview(&self) -> Option<PreviewSettings> {
        (self.partial_images > 0).then(|| PreviewSettings {
            every_n_steps: (self.steps / self.partial_images).max(1),
            max_side_px: 0,
        })
    }
}

/// One generated image.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageData {
    /// The PNG in base64 (with the generation parameters in its text chunks).
    pub b64_json: String,
}

/// The settings the service used, every default filled in.
#[derive(Debug, Serialize, ToSchema)]
pub struct Parameters {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub true_cfg_scale: Option<f32>,
    pub seed: u64,
    pub n: u32,
    /// Edits: the strength used.
    pub strength: Option<f64>,
    /// Outpaint: `[left, right, top, bottom]` pixels added.
    pub padding: Option<[u32; 4]>,
    /// The prompt was longer than the model's 512 tokens and was cut there.
    pub prompt_truncated: bool,
}

/// OpenAI's `ImagesResponse` plus the seed, the parameters and the request id.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<ImageData>,
    /// `WIDTHxHEIGHT` of the images.
    pub size: String,
    /// Always `png`.
    pub output_format: String,
    /// The seed used (also when the server chose it).
    pub seed: u64,
    pub parameters: Parameters,
    pub request_id: String,
    pub elapsed_ms: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn parameters(r: &GenerateResult) -> Parameters {
    let p = r.parameters.clone().unwrap_or_default();
    Parameters {
        prompt: p.prompt,
        negative_prompt: p.negative_prompt,
        width: r.width_px,
        height: r.height_px,
        steps: p.steps,
        true_cfg_scale: p.true_cfg_scale,
        seed: r.seed,
        n: r.png.len() as u32,
        strength: r.strength,
        padding: r
            .padding
            .map(|p| [p.left_px, p.right_px, p.top_px, p.bottom_px]),
        prompt_truncated: r.prompt_truncated,
    }
}

fn images_response(r: GenerateResult) -> ImagesResponse {
    ImagesResponse {
        created: now_secs(),
        data: r
            .png
            .iter()
            .map(|p| ImageData { b64_json: b64(p) })
            .collect(),
        size: format!("{}x{}", r.width_px, r.height_px),
        output_format: "png".into(),
        seed: r.seed,
        parameters: parameters(&r),
        request_id: r.request_id.clone(),
        elapsed_ms: r.elapsed_ms,
    }
}

/// An error response (also used before any call is made).
pub fn error(e: ApiError) -> Response {
    e.into_response()
}

fn with_request_id(mut r: Response, id: Option<&str>) -> Response {
    if let Some(v) = id.and_then(|id| HeaderValue::from_str(id).ok()) {
        r.headers_mut().insert(REQUEST_ID_KEY, v);
    }
    r
}

fn status_error(s: &tonic::Status) -> Response {
    with_request_id(
        ApiError::from_status(s).into_response(),
        request_id(s.metadata()).as_deref(),
    )
}

/// Starts `call` and answers as `out` says.
pub async fn run(state: &AppState, call: Call, out: Output, headers: &HeaderMap) -> Response {
    let (stream, id) = match state.client.start(call, headers).await {
        Ok(started) => started,
        Err(s) => return status_error(&s),
    };
    let response = if out.stream {
        sse(stream, out).into_response()
    } else {
        match result_of(stream).await {
            Ok(r) => Json(images_response(r)).into_response(),
            Err(s) => return status_error(&s),
        }
    };
    with_request_id(response, id.as_deref())
}

async fn result_of(mut stream: Streaming<GenerateEvent>) -> Result<GenerateResult, tonic::Status> {
    while let Some(ev) = stream.message().await? {
        if let Some(generate_event::Event::Result(r)) = ev.event {
            return Ok(r);
        }
    }
    Err(tonic::Status::internal(
        "the gateway's event stream ended without a result; report it with the request id",
    ))
}

fn stage_name(stage: i32) -> &'static str {
    match Stage::try_from(stage).unwrap_or(Stage::Unspecified) {
        Stage::Queued => "queued",
        Stage::EncodePrompt => "encode_prompt",
        Stage::EncodeImage => "encode_image",
        Stage::Denoise => "denoise",
        Stage::Decode => "decode",
        Stage::Unspecified => "unspecified",
    }
}

fn event(json: serde_json::Value) -> Event {
    let kind = json["type"].as_str().unwrap_or("message").to_string();
    Event::default().event(kind).data(json.to_string())
}

/// The SSE events of one gRPC event.
fn events_of(ev: GenerateEvent, out: Output, partials: &mut u32) -> Vec<Event> {
    let prefix = out.kind.prefix();
    let created_at = now_secs();
    match ev.event {
        Some(generate_event::Event::Progress(p)) => {
            let mut v = vec![event(serde_json::json!({
                "type": format!("{prefix}.progress"),
                "stage": stage_name(p.stage),
                "step": p.step,
                "total_steps": p.total_steps,
                "queue_position": p.queue_position,
                "elapsed_ms": p.elapsed_ms,
            }))];
            if !p.preview_png.is_empty() && *partials < out.partial_images {
                v.push(event(serde_json::json!({
                    "type": format!("{prefix}.partial_image"),
                    "b64_json": b64(&p.preview_png),
                    "partial_image_index": *partials,
                    "created_at": created_at,
                    "size": "auto",
                    "quality": "auto",
                    "background": "opaque",
                    "output_format": "png",
                    "step": p.step,
                    "total_steps": p.total_steps,
                })));
                *partials += 1;
            }
            v
        }
        Some(generate_event::Event::Result(r)) => {
            let params = serde_json::to_value(parameters(&r)).unwrap_or_default();
            let size = format!("{}x{}", r.width_px, r.height_px);
            r.png
                .iter()
                .enumerate()
                .map(|(i, png)| {
                    event(serde_json::json!({
                        "type": format!("{prefix}.completed"),
                        "b64_json": b64(png),
                        "created_at": created_at,
                        "size": size,
                        "quality": "auto",
                        "background": "opaque",
                        "output_format": "png",
                        "usage": {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                                  "output_tokens": 0, "total_tokens": 0},
                        "index": i,
                        "seed": r.seed,
                        "parameters": params,
                        "request_id": r.request_id,
                        "elapsed_ms": r.elapsed_ms,
                    }))
                })
                .collect()
        }
        None => Vec::new(),
    }
}

/// The SSE answer: a task turns the gRPC events into SSE events; the caller going away drops the
/// receiver, which ends the task and drops the gRPC stream (cancelling the request).
fn sse(
    mut stream: Streaming<GenerateEvent>,
    out: Output,
) -> Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(16);
    tokio::spawn(async move {
        let mut partials = 0u32;
        loop {
            let events = match stream.message().await {
                Ok(Some(ev)) => events_of(ev, out, &mut partials),
                Ok(None) => return,
                Err(s) => {
                    let e = ApiError::from_status(&s);
                    let ev = event(serde_json::json!({
                        "type": "error",
                        "error": e.body().error,
                        "status": e.status.as_u16(),
                    }));
                    let _ = tx.send(Ok(ev)).await;
                    return;
                }
            };
            for e in events {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}
