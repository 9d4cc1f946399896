//! `POST /v1/images/edits`: OpenAI's multipart form to an `Inpaint` (with a mask), `Outpaint` (with our
//! `outpaint` field) or `Img2Img` (neither) request of the gRPC API.

use axum::extract::{Multipart, State};
use axum::http::HeaderMap;
use axum::response::Response;
use qwen_image_proto::v1::{
    Anchor, GenerationSettings, Img2ImgRequest, InpaintRequest, OutpaintRequest,
};
use utoipa::ToSchema;

use super::AppState;
use super::call::Call;
use super::error::{ApiError, ErrorBody};
use super::generations::{check_formats, parse_size};
use super::mask;
use super::respond::{self, Kind, Output};

/// The form fields (multipart/form-data; files as file parts, the rest as text). OpenAI fields that do not
/// apply (`quality`, `user`, `input_fidelity`, `safety_identifier`, `output_compression`) are accepted and
/// ignored; unknown fields are refused.
#[derive(Debug, Default, ToSchema)]
pub struct EditForm {
    /// The picture to edit (PNG or JPEG; `image[]` is accepted too, one picture).
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    /// Where to repaint: transparent pixels (OpenAI's convention) or, in a mask without transparency, white
    /// pixels. With any transparent pixel the alpha decides and the colours are ignored. Same size as the
    /// image. Absent = img2img of the whole picture.
    #[schema(value_type = Option<String>, format = Binary)]
    pub mask: Option<Vec<u8>>,
    pub prompt: String,
    pub model: Option<String>,
    /// 1..=4.
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT` working size (absent / `auto` = the image's size rounded down to the size multiple);
    /// with `outpaint=true`, the canvas size.
    pub size: Option<String>,
    /// Only `b64_json`.
    pub response_format: Option<String>,
    pub stream: Option<bool>,
    pub partial_images: Option<u32>,
    /// Only `png`.
    pub output_format: Option<String>,
    pub background: Option<String>,
    /// Extension: how much to change, (0, 1]. Absent = 1.0 with a mask (the masked area is replaced, as
    /// OpenAI does), 0.6 without (diffusers' img2img default), 1.0 for outpaint.
    pub strength: Option<f64>,
    /// Extension: with a mask or outpaint, paste the kept pixels back so only the repainted area changes.
    /// Absent = true.
    pub paste_back: Option<bool>,
    /// Extension: extend the canvas: `LEFT,RIGHT,TOP,BOTTOM` pixels to add, or `true` to grow the canvas to
    /// `size` with the picture placed by `anchor`.
    pub outpaint: Option<String>,
    /// Extension, with `outpaint=true`: `center` (default), `top-left`, `top`, `top-right`, `left`, `right`,
    /// `bottom-left`, `bottom`, `bottom-right`.
    pub anchor: Option<String>,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub steps: Option<u32>,
    pub true_cfg_scale: Option<f32>,
}

fn parse<T: std::str::FromStr>(name: &str, v: &str, what: &str) -> Result<T, ApiError> {
    v.trim()
        .parse()
        .map_err(|_| ApiError::bad_param(name, format!("{name} `{v}` is not {what}")))
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ApiError::bad_param(
            name,
            format!("{name} `{v}` is not a boolean: send true or false"),
        )),
    }
}

fn anchor(v: &str) -> Result<Anchor, ApiError> {
    Ok(
        match v.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "center" | "centre" => Anchor::Center,
            "top-left" => Anchor::TopLeft,
            "top" => Anchor::Top,
            "top-right" => Anchor::TopRight,
            "left" => Anchor::Left,
            "right" => Anchor::Right,
            "bottom-left" => Anchor::BottomLeft,
            "bottom" => Anchor::Bottom,
            "bottom-right" => Anchor::BottomRight,
            _ => {
                return Err(ApiError::bad_param(
                    "anchor",
                    format!(
                        "anchor `{v}` is unknown: send center, top-left, top, top-right, left, right, bottom-left, bottom or bottom-right"
                    ),
                ));
            }
        },
    )
}

/// Reads the multipart form into [`EditForm`].
async fn read_form(mut m: Multipart) -> Result<EditForm, ApiError> {
    let mut f = EditForm::default();
    let (mut have_image, mut have_prompt) = (false, false);
    loop {
        let field = m.next_field().await.map_err(|e| {
            ApiError::new(
                e.status(),
                format!("cannot read the multipart form: {}", e.body_text()),
                "invalid_multipart",
            )
        })?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(|e| {
            ApiError::new(
                e.status(),
                format!("cannot read the form field `{name}`: {}", e.body_text()),
                "invalid_multipart",
            )
        })?;
        let text = || {
            std::str::from_utf8(&bytes)
                .map(str::to_string)
                .map_err(|_| ApiError::bad_param(&name, format!("{name} is not UTF-8 text")))
        };
        match name.as_str() {
            "image" | "image[]" => {
                if have_image {
                    return Err(ApiError::bad_param(
                        "image",
                        "send one image (several images are not served)",
                    ));
                }
                f.image = bytes.to_vec();
                have_image = true;
            }
            "mask" => f.mask = Some(bytes.to_vec()),
            "prompt" => {
                f.prompt = text()?;
                have_prompt = true;
            }
            "model" => f.model = Some(text()?),
            "n" => f.n = Some(parse("n", &text()?, "a whole number 1..=4")?),
            "size" => f.size = Some(text()?),
            "response_format" => f.response_format = Some(text()?),
            "stream" => f.stream = Some(parse_bool("stream", &text()?)?),
            "partial_images" => {
                f.partial_images = Some(parse("partial_images", &text()?, "a whole number")?)
            }
            "output_format" => f.output_format = Some(text()?),
            "background" => f.background = Some(text()?),
            "strength" => f.strength = Some(parse("strength", &text()?, "a number in (0, 1]")?),
            "paste_back" => f.paste_back = Some(parse_bool("paste_back", &text()?)?),
            "outpaint" => f.outpaint = Some(text()?),
            "anchor" => f.anchor = Some(text()?),
            "negative_prompt" => f.negative_prompt = Some(text()?),
            "seed" => f.seed = Some(parse("seed", &text()?, "a whole number")?),
            "steps" => f.steps = Some(parse("steps", &text()?, "a whole number 2..=1000")?),
            "true_cfg_scale" => {
                f.true_cfg_scale = Some(parse("true_cfg_scale", &text()?, "a number")?)
            }
            "quality" | "user" | "input_fidelity" | "safety_identifier" | "output_compression" => {}
            other => {
                return Err(ApiError::bad_param(
                    other,
                    format!(
                        "unknown form field `{other}`: see /openapi.json for the fields of /v1/images/edits"
                    ),
                ));
            }
        }
    }
    if !have_image {
        return Err(ApiError::bad_param(
            "image",
            "image is required: send the picture to edit as a file part",
        ));
    }
    if !have_prompt {
        return Err(ApiError::bad_param("prompt", "prompt is required"));
    }
    Ok(f)
}

/// `LEFT,RIGHT,TOP,BOTTOM`.
fn padding(v: &str) -> Result<[u32; 4], ApiError> {
    let parts: Vec<Option<u32>> = v.split(',').map(|p| p.trim().parse().ok()).collect();
    match parts.as_slice() {
        [Some(l), Some(r), Some(t), Some(b)] => Ok([*l, *r, *t, *b]),
        _ => Err(ApiError::bad_param(
            "outpaint",
            format!(
                "outpaint `{v}` is neither `true` nor LEFT,RIGHT,TOP,BOTTOM pixels (e.g. 0,256,0,0)"
            ),
        )),
    }
}

impl EditForm {
    pub fn into_call(self, served_model: Option<&str>) -> Result<(Call, Output), ApiError> {
        check_formats(
            self.response_format.as_deref(),
            self.output_format.as_deref(),
            self.background.as_deref(),
        )?;
        super::check_model(self.model.as_deref(), served_model)?;
        let (width_px, height_px) = parse_size(self.size.as_deref())?;
        let out = Output::new(
            Kind::Edit,
            self.stream.unwrap_or(false),
            self.partial_images.unwrap_or(0),
            self.steps,
        );
        let settings = |w: u32, h: u32| GenerationSettings {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width_px: w,
            height_px: h,
            steps: self.steps.unwrap_or(0),
            true_cfg_scale: self.true_cfg_scale,
            seed: self.seed,
            preview: out.preview(),
            num_images: self.n.unwrap_or(1),
            ..Default::default()
        };
        let paste_back = self.paste_back.unwrap_or(true);
        let call = match (&self.outpaint, &self.mask) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_param(
                    "outpaint",
                    "outpaint repaints exactly the new area: send no mask with it",
                ));
            }
            (Some(o), None) => {
                let by_canvas = parse_bool("outpaint", o).ok();
                let (settings, [left_px, right_px, top_px, bottom_px], anchor) = match by_canvas {
                    Some(true) => {
                        if (width_px, height_px) == (0, 0) {
                            return Err(ApiError::bad_param(
                                "size",
                                "outpaint=true grows the canvas to `size`: send size as WIDTHxHEIGHT",
                            ));
                        }
                        let a = self.anchor.as_deref().map(anchor).transpose()?;
                        (
                            settings(width_px, height_px),
                            [0; 4],
                            a.unwrap_or(Anchor::Center),
                        )
                    }
                    Some(false) => {
                        return Err(ApiError::bad_param(
                            "outpaint",
                            "outpaint=false: leave the field out for inpaint or img2img",
                        ));
                    }
                    None => {
                        if (width_px, height_px) != (0, 0) {
                            return Err(ApiError::bad_param(
                                "size",
                                "with outpaint padding the canvas size follows from it: leave size out",
                            ));
                        }
                        (settings(0, 0), padding(o)?, Anchor::Unspecified)
                    }
                };
                Call::Outpaint(OutpaintRequest {
                    settings: Some(settings),
                    image: self.image.into(),
                    strength: self.strength,
                    left_px,
                    right_px,
                    top_px,
                    bottom_px,
                    anchor: anchor as i32,
                    paste_back,
                })
            }
            (None, Some(m)) => Call::Inpaint(InpaintRequest {
                settings: Some(settings(width_px, height_px)),
                mask: mask::to_white_on_black(m)?.into(),
                image: self.image.into(),
                strength: Some(self.strength.unwrap_or(1.0)),
                paste_back,
            }),
            (None, None) => Call::Img2Img(Img2ImgRequest {
                settings: Some(settings(width_px, height_px)),
                image: self.image.into(),
                strength: self.strength,
            }),
        };
        Ok((call, out))
    }
}

/// Edit a picture (OpenAI `images.edit`): with a mask, repaint the masked area (inpaint); with `outpaint`,
/// extend the canvas; with neither, restyle the whole picture (img2img). `stream=true` answers with
/// Server-Sent Events (`image_edit.*`).
#[utoipa::path(
    post,
    path = "/v1/images/edits",
    tag = "images",
    request_body(content = EditForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The images (JSON), or with `stream=true` an event stream of \
            `image_edit.progress`, `image_edit.partial_image` and `image_edit.completed` events",
            body = respond::ImagesResponse),
        (status = 400, description = "Invalid request; the message says what to send", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Busy; retry after the `Retry-After` seconds", body = ErrorBody),
        (status = 503, description = "No usable stage replica", body = ErrorBody),
        (status = 504, description = "The request deadline passed", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Multipart,
) -> Response {
    let served = state.served_model();
    let parsed = match read_form(form).await {
        Ok(f) => f.into_call(served.as_deref()),
        Err(e) => Err(e),
    };
    match parsed {
        Ok((call, out)) => respond::run(&state, call, out, &headers).await,
        Err(e) => respond::error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form() -> EditForm {
        EditForm {
            image: vec![1, 2, 3],
            prompt: "p".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_fields_choose_the_flow() {
        let (call, _) = form().into_call(None).expect("img2img");
        assert!(matches!(call, Call::Img2Img(ref r) if r.strength.is_none()));
        let mut f = form();
        f.outpaint = Some("0, 64, 0, 0".into());
        let (call, _) = f.into_call(None).expect("outpaint");
        assert!(matches!(call, Call::Outpaint(ref r) if r.right_px == 64 && r.paste_back));
        let mut f = form();
        f.outpaint = Some("true".into());
        assert!(f.into_call(None).is_err(), "outpaint=true needs a size");
        let mut f = form();
        f.outpaint = Some("true".into());
        f.size = Some("128x64".into());
        f.anchor = Some("left".into());
        let (call, _) = f.into_call(None).expect("outpaint to a canvas");
        assert!(matches!(call, Call::Outpaint(ref r) if r.anchor == Anchor::Left as i32));
        let mut f = form();
        f.outpaint = Some("1,2".into());
        assert_eq!(
            f.into_call(None).expect_err("bad").detail.param.as_deref(),
            Some("outpaint")
        );
    }
}
