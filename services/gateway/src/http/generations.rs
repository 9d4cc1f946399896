//! `POST /v1/images/generations`: OpenAI's JSON body (plus our extensions) to a `TextToImage` or, with a pose,
//! a `Pose` request of the gRPC API, on the model the body names (`model`; absent = the first served one).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use base64::Engine;
use qwen_image_proto::v1::{ControlNetSettings, PoseRequest, TextToImageRequest, pose_request};
use serde::Deserialize;
use utoipa::ToSchema;

use super::call::Call;
use super::error::{ApiError, ErrorBody};
use super::options::ImageOptions;
use super::respond::{self, Kind, Output};
use super::{AppState, Target};

/// OpenAI's image generation body: the shared fields ([`ImageOptions`]) and those of generation. Fields
/// OpenAI defines that do not apply here (`quality`, `style`, `user`, `moderation`, `safety_identifier`,
/// `output_compression`) are accepted and ignored; unknown fields are refused.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct GenerationRequest {
    #[serde(flatten)]
    pub options: ImageOptions,
    /// Accepted and ignored (as is `moderation`).
    #[allow(dead_code)]
    pub style: Option<String>,
    #[allow(dead_code)]
    pub moderation: Option<String>,
    /// Extension, ControlNet pose: OpenPose keypoints JSON (an object, or the JSON as a string).
    #[schema(value_type = Option<Object>)]
    pub keypoints: Option<serde_json::Value>,
    /// Extension, ControlNet pose: a pose skeleton picture (PNG/JPEG) in base64.
    pub pose_image: Option<String>,
    /// Extension, ControlNet pose: which ControlNet (absent = the denoiser's only one).
    pub controlnet: Option<String>,
    /// Extension, ControlNet pose: conditioning scale, 0..=10 (absent = 1.0).
    pub controlnet_conditioning_scale: Option<f32>,
    /// Whatever else the body holds: refused (serde's `deny_unknown_fields` does not work with `flatten`).
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: std::collections::BTreeMap<String, serde_json::Value>,
}

impl GenerationRequest {
    /// The gRPC request for the model `target` and the output options.
    pub fn into_call(self, target: &Target) -> Result<(Call, Output), ApiError> {
        if let Some(field) = self.unknown.keys().next() {
            return Err(ApiError::bad_param(
                field,
                format!(
                    "unknown field `{field}`: see /openapi.json for the fields of /v1/images/generations"
                ),
            ));
        }
        let (width_px, height_px) = self.options.check()?;
        let out = self.options.output(Kind::Generation);
        let settings = self
            .options
            .settings(&target.asked, &out, width_px, height_px);
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
        (status = 404, description = "`model` is not served (`model_not_found`; the message lists the \
            served ones)", body = ErrorBody),
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
    let call = parsed.and_then(|r| {
        let target = state.target(r.options.model.as_deref())?;
        r.into_call(&target)
    });
    match call {
        Ok((call, out)) => respond::run(&state, call, out, &headers).await,
        Err(e) => respond::error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pose_fields_choose_the_pose_flow() {
        let req = |v: serde_json::Value| {
            serde_json::from_value::<GenerationRequest>(v)
                .expect("valid body")
                .into_call(&Target {
                    asked: String::new(),
                    name: "m".into(),
                    edit: Some(false),
                })
        };
        let (call, _) =
            req(serde_json::json!({"prompt": "p", "keypoints": {"people": []}})).expect("pose");
        assert!(matches!(call, Call::Pose(_)));
        let (call, _) = req(serde_json::json!({"prompt": "p", "n": 2})).expect("t2i");
        let Call::TextToImage(t) = call else {
            panic!("t2i expected")
        };
        assert_eq!(t.settings.expect("settings").num_images, 2);
        assert!(req(serde_json::json!({"prompt": "p", "response_format": "url"})).is_err());
        let e = req(serde_json::json!({"prompt": "p", "negative_promt": "x"})).expect_err("typo");
        assert_eq!(e.detail.param.as_deref(), Some("negative_promt"));
        let (call, _) =
            req(serde_json::json!({"prompt": "p", "seed": 3, "steps": 2, "style": "vivid"}))
                .expect("shared fields through flatten");
        let Call::TextToImage(t) = call else {
            panic!("t2i expected")
        };
        assert_eq!(t.settings.map(|s| (s.seed, s.steps)), Some((Some(3), 2)));
    }
}
