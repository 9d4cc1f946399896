//! `POST /v1/images/generations`: OpenAI's JSON body (plus our extensions) to a `TextToImage` or, with a pose,
//! a `Pose` request of the gRPC API.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use base64::Engine;
use qwen_image_proto::v1::{
    ControlNetSettings, GenerationSettings, PoseRequest, TextToImageRequest, pose_request,
};
use serde::Deserialize;
use utoipa::ToSchema;

use super::AppState;
use super::call::Call;
use super::error::{ApiError, ErrorBody};
use super::respond::{self, Kind, Output};

/// OpenAI's image generation body. Fields OpenAI defines that do not apply here (`quality`, `style`,
/// `user`, `moderation`, `safety_identifier`, `output_compression`) are accepted and ignored; unknown fields
/// are refused.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationRequest {
    /// The prompt (Chinese, English or mixed).
    pub prompt: String,
    /// The served model (see `GET /v1/models`); absent = the served one.
    pub model: Option<String>,
    /// Number of images, 1..=4 (one batch, one seed: image i uses the generator's following noise).
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT` in pixels, multiples of the model's size multiple (16 for Qwen-Image), or `auto`
    /// (the default size: 1024x1024 for Qwen-Image; a pose's own size).
    pub size: Option<String>,
    /// Only `b64_json` (images are returned inline, never as URLs).
    pub response_format: Option<String>,
    /// `true`: Server-Sent Events (progress, partial images, then one `completed` event per image).
    pub stream: Option<bool>,
    /// Streaming: how many partial images (denoising previews) to send, spread over the steps.
    pub partial_images: Option<u32>,
    /// Only `png`.
    pub output_format: Option<String>,
    /// `auto` or `opaque` (no transparent output).
    pub background: Option<String>,
    /// Accepted and ignored (as are the next five).
    #[allow(dead_code)]
    pub quality: Option<String>,
    #[allow(dead_code)]
    pub style: Option<String>,
    #[allow(dead_code)]
    pub user: Option<String>,
    #[allow(dead_code)]
    pub moderation: Option<String>,
    #[allow(dead_code)]
    pub safety_identifier: Option<String>,
    #[allow(dead_code)]
    pub output_compression: Option<u32>,
    /// Extension: negative prompt for true CFG (CFG runs when it is given and `true_cfg_scale` > 1).
    pub negative_prompt: Option<String>,
    /// Extension: the seed (absent = random, returned in the response).
    pub seed: Option<u64>,
    /// Extension: denoising steps, 2..=1000 (absent = 50).
    pub steps: Option<u32>,
    /// Extension: true CFG scale (absent = 4.0).
    pub true_cfg_scale: Option<f32>,
    /// Extension, ControlNet pose: OpenPose keypoints JSON (an object, or the JSON as a string).
    #[schema(value_type = Option<Object>)]
    pub keypoints: Option<serde_json::Value>,
    /// Extension, ControlNet pose: a pose skeleton picture (PNG/JPEG) in base64.
    pub pose_image: Option<String>,
    /// Extension, ControlNet pose: which ControlNet (absent = the denoiser's only one).
    pub controlnet: Option<String>,
    /// Extension, ControlNet pose: conditioning scale, 0..=10 (absent = 1.0).
    pub controlnet_conditioning_scale: Option<f32>,
}

/// Parses `WIDTHxHEIGHT` (`auto` or absent = 0x0, the flow's default).
pub fn parse_size(size: Option<&str>) -> Result<(u32, u32), ApiError> {
    let s = match size.map(str::trim) {
        None | Some("") | Some("auto") => return Ok((0, 0)),
        Some(s) => s,
    };
    let parsed = s
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?)))
        .filter(|(w, h)| *w > 0 && *h > 0);
    parsed.ok_or_else(|| {
        ApiError::bad_param(
            "size",
            format!(
                "size `{s}` is not WIDTHxHEIGHT: send e.g. \"1024x1024\" (pixels, multiples of the model's size \
                 multiple, at most the gateway's limit) or \"auto\""
            ),
        )
    })
}

/// The options every endpoint shares: `response_format`, `output_format`, `background`.
pub fn check_formats(
    response_format: Option<&str>,
    output_format: Option<&str>,
    background: Option<&str>,
) -> Result<(), ApiError> {
    if let Some(f) = response_format.filter(|f| *f != "b64_json") {
        return Err(ApiError::bad_param(
            "response_format",
            format!("response_format `{f}` is not served: send \"b64_json\" (images come inline)"),
        ));
    }
    if let Some(f) = output_format.filter(|f| *f != "png") {
        return Err(ApiError::bad_param(
            "output_format",
            format!("output_format `{f}` is not served: send \"png\""),
        ));
    }
    if let Some(b) = background.filter(|b| !matches!(*b, "auto" | "opaque")) {
        return Err(ApiError::bad_param(
            "background",
            format!("background `{b}` is not served: send \"auto\" or \"opaque\""),
        ));
    }
    Ok(())
}

impl GenerationRequest {
    /// The gRPC request and the output options.
    pub fn into_call(self, served_model: Option<&str>) -> Result<(Call, Output), ApiError> {
        check_formats(
            self.response_format.as_deref(),
            self.output_format.as_deref(),
            self.background.as_deref(),
        )?;
        super::check_model(self.model.as_deref(), served_model)?;
        let (width_px, height_px) = parse_size(self.size.as_deref())?;
        let out = Output::new(
            Kind::Generation,
            self.stream.unwrap_or(false),
            self.partial_images.unwrap_or(0),
            self.steps,
        );
        let settings = GenerationSettings {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            width_px,
            height_px,
            steps: self.steps.unwrap_or(0),
            true_cfg_scale: self.true_cfg_scale,
            seed: self.seed,
            preview: out.preview(),
            num_images: self.n.unwrap_or(1),
            ..Default::default()
        };
        let pose = match (self.keypoints, self.pose_image) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_param(
                    "keypoints",
                    "send either keypoints or pose_image, not both",
                ));
            }
            (Some(serde_json::Value::String(s)), None) => Some(pose_request::Pose::KeypointsJson(s)),
            (Some(v), None) => Some(pose_request::Pose::KeypointsJson(v.to_string())),
            (None, Some(b64)) => Some(pose_request::Pose::PoseImage(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| {
                        ApiError::bad_param(
                            "pose_image",
                            format!("pose_image is not base64 ({e}): send the PNG/JPEG bytes in standard base64"),
                        )
                    })?
                    .into(),
            )),
            (None, None) => None,
        };
        let call = match pose {
            Some(pose) => Call::Pose(PoseRequest {
                settings: Some(settings),
                pose: Some(pose),
                control: Some(ControlNetSettings {
                    controlnet_id: self.controlnet.unwrap_or_default(),
                    conditioning_scale: self.controlnet_conditioning_scale,
                    ..Default::default()
                }),
            }),
            None => {
                if self.controlnet.is_some() || self.controlnet_conditioning_scale.is_some() {
                    return Err(ApiError::bad_param(
                        "controlnet",
                        "controlnet options need a pose: send keypoints or pose_image too",
                    ));
                }
                Call::TextToImage(TextToImageRequest {
                    settings: Some(settings),
                    initial_latents: None,
                })
            }
        };
        Ok((call, out))
    }
}

/// Create images from a prompt (OpenAI `images.generate`); with `keypoints` or `pose_image`, through the
/// pose ControlNet. `stream: true` answers with Server-Sent Events.
#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "images",
    request_body = GenerationRequest,
    responses(
        (status = 200, description = "The images (JSON), or with `stream: true` an event stream of \
            `image_generation.progress`, `image_generation.partial_image` and `image_generation.completed` \
            events", body = respond::ImagesResponse),
        (status = 400, description = "Invalid request; the message says what to send", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Busy; retry after the `Retry-After` seconds", body = ErrorBody),
        (status = 503, description = "No usable stage replica", body = ErrorBody),
        (status = 504, description = "The request deadline passed", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let parsed = serde_json::from_slice::<GenerationRequest>(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not a valid image generation request: {e}; send JSON such as \
             {{\"prompt\": \"a red fox\", \"size\": \"1024x1024\"}}"
        ))
    });
    let served = state.served_model();
    match parsed.and_then(|r| r.into_call(served.as_deref())) {
        Ok((call, out)) => respond::run(&state, call, out, &headers).await,
        Err(e) => respond::error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size(Some("1024x768")).ok(), Some((1024, 768)));
        assert_eq!(parse_size(Some("auto")).ok(), Some((0, 0)));
        assert_eq!(parse_size(None).ok(), Some((0, 0)));
        for bad in ["big", "1024", "0x64", "x64", "-64x64", "64x64x64"] {
            let e = parse_size(Some(bad)).expect_err(bad);
            assert_eq!(e.detail.param.as_deref(), Some("size"));
            assert!(
                e.detail.message.contains("1024x1024"),
                "{}",
                e.detail.message
            );
        }
    }

    #[test]
    fn pose_fields_choose_the_pose_flow() {
        let req = |v: serde_json::Value| {
            serde_json::from_value::<GenerationRequest>(v)
                .expect("valid body")
                .into_call(Some("m"))
        };
        let (call, _) =
            req(serde_json::json!({"prompt": "p", "keypoints": {"people": []}})).expect("pose");
        assert!(matches!(call, Call::Pose(_)));
        let (call, _) = req(serde_json::json!({"prompt": "p", "n": 2})).expect("t2i");
        let Call::TextToImage(t) = call else {
            panic!("t2i expected")
        };
        assert_eq!(t.settings.expect("settings").num_images, 2);
        assert!(req(serde_json::json!({"prompt": "p", "model": "other"})).is_err());
        assert!(req(serde_json::json!({"prompt": "p", "response_format": "url"})).is_err());
        assert!(
            serde_json::from_value::<GenerationRequest>(
                serde_json::json!({"prompt": "p", "negative_promt": "x"})
            )
            .is_err()
        );
    }
}
