//! `POST /v1/images/edits`: OpenAI's multipart form to a request of the gRPC API, by the target model's
//! kind. An Edit model (Qwen-Image-Edit-2509 / -2511) edits 1-3 pictures by instruction (`Edit`); a base
//! model repaints one picture: `Inpaint` with a mask, `Outpaint` with our `outpaint` field, `Img2Img` with
//! neither. Masks and outpaint on an Edit model, several pictures for a base model, and more than three
//! pictures are 400 saying what to send.

use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use qwen_image_proto::v1::{Anchor, EditRequest, Img2ImgRequest, InpaintRequest, OutpaintRequest};
use utoipa::ToSchema;

use super::call::Call;
use super::error::{ApiError, ErrorBody};
use super::mask;
use super::options::{ImageOptions, parse, parse_bool};
use super::respond::{self, Kind, Output};
use super::{AppState, Target};

/// Pictures an Edit model takes (`QwenImageEditPlusPipeline`; the gRPC `EditRequest` says the same).
pub const MAX_IMAGES: usize = 3;

/// The form fields (multipart/form-data; files as file parts, the rest as text): the shared fields
/// ([`ImageOptions`]) and those of editing. OpenAI fields that do not apply (`quality`, `user`,
/// `input_fidelity`, `safety_identifier`, `output_compression`) are accepted and ignored; unknown fields are
/// refused.
/// (`serde(flatten)` here only shapes the OpenAPI schema: the form is read by [`read_form`].)
#[derive(Debug, Default, ToSchema)]
pub struct EditForm {
    /// The picture(s) to edit, PNG or JPEG, as `image` or `image[]` file parts (the OpenAI SDK sends
    /// `image[]` for a list): 1..=3 for an Edit model, in the order the prompt calls "Picture 1", "Picture
    /// 2", ...; exactly one for a base model.
    #[schema(value_type = Vec<String>, format = Binary)]
    pub image: Vec<Vec<u8>>,
    /// Base models only (inpaint): where to repaint: transparent pixels (OpenAI's convention) or, in a mask
    /// without transparency, white pixels. With any transparent pixel the alpha decides and the colours are
    /// ignored. Same size as the image. Absent = img2img of the whole picture (base) or an edit by
    /// instruction (Edit model).
    #[schema(value_type = Option<String>, format = Binary)]
    pub mask: Option<Vec<u8>>,
    #[serde(flatten)]
    pub options: ImageOptions,
    /// Extension, base models: how much to change, (0, 1]. Absent = 1.0 with a mask (the masked area is
    /// replaced, as OpenAI does), 0.6 without (diffusers' img2img default), 1.0 for outpaint.
    pub strength: Option<f64>,
    /// Extension, base models: with a mask or outpaint, paste the kept pixels back so only the repainted
    /// area changes. Absent = true.
    pub paste_back: Option<bool>,
    /// Extension, base models: extend the canvas: `LEFT,RIGHT,TOP,BOTTOM` pixels to add, or `true` to grow
    /// the canvas to `size` with the picture placed by `anchor`.
    pub outpaint: Option<String>,
    /// Extension, with `outpaint=true`: `center` (default), `top-left`, `top`, `top-right`, `left`, `right`,
    /// `bottom-left`, `bottom`, `bottom-right`.
    pub anchor: Option<String>,
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
    let mut have_prompt = false;
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
        if name == "image" || name == "image[]" {
            if f.image.len() == MAX_IMAGES {
                return Err(too_many_images());
            }
            f.image.push(bytes.to_vec());
            continue;
        }
        if name == "mask" {
            f.mask = Some(bytes.to_vec());
            continue;
        }
        let text = text()?;
        if name == "prompt" {
            have_prompt = true;
        }
        if f.options.set_form_field(&name, text.clone())? {
            continue;
        }
        match name.as_str() {
            "strength" => f.strength = Some(parse("strength", &text, "a number in (0, 1]")?),
            "paste_back" => f.paste_back = Some(parse_bool("paste_back", &text)?),
            "outpaint" => f.outpaint = Some(text),
            "anchor" => f.anchor = Some(text),
            "input_fidelity" => {}
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
    if f.image.is_empty() {
        return Err(ApiError::bad_param(
            "image",
            "image is required: send the picture(s) to edit as `image` or `image[]` file parts",
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

fn too_many_images() -> ApiError {
    ApiError::bad_param(
        "image",
        format!(
            "more than {MAX_IMAGES} images: send 1 to {MAX_IMAGES} `image` / `image[]` parts (an Edit model \
             edits up to {MAX_IMAGES} pictures, a base model one)"
        ),
    )
}

impl EditForm {
    /// The gRPC request for the model `target` (its kind picks the flow) and the output options.
    pub fn into_call(self, target: &Target) -> Result<(Call, Output), ApiError> {
        let (width_px, height_px) = self.options.check()?;
        if self.image.len() > MAX_IMAGES {
            return Err(too_many_images());
        }
        let name = &target.name;
        let Some(edit_model) = target.edit else {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the denoiser of model `{name}` has not described its model yet (base or Edit decides the \
                     flow); retry shortly"
                ),
                "unavailable",
            );
            e.retry_after_secs = Some(1);
            return Err(e);
        };
        let out = self.options.output(Kind::Edit);
        let settings = |w: u32, h: u32| self.options.settings(&target.asked, &out, w, h);
        if edit_model {
            let base_only = [
                ("mask", self.mask.is_some(), "inpaint (a mask)"),
                ("outpaint", self.outpaint.is_some(), "outpaint"),
                ("strength", self.strength.is_some(), "strength"),
                ("paste_back", self.paste_back.is_some(), "paste_back"),
                ("anchor", self.anchor.is_some(), "anchor"),
            ];
            if let Some((field, _, what)) = base_only.iter().find(|(_, given, _)| *given) {
                return Err(ApiError::bad_param(
                    field,
                    format!(
                        "model `{name}` edits by instruction (QwenImageEditPlusPipeline takes no mask, \
                         strength or canvas): {what} is served by base models; send `model` naming a model \
                         of kind `base` (GET /v1/models), or leave `{field}` out to edit the picture(s) as \
                         the prompt says"
                    ),
                ));
            }
            let call = Call::Edit(EditRequest {
                settings: Some(settings(width_px, height_px)),
                images: self.image.into_iter().map(Into::into).collect(),
            });
            return Ok((call, out));
        }
        if self.image.len() > 1 {
            return Err(ApiError::bad_param(
                "image",
                format!(
                    "model `{name}` is a base model and edits one picture (img2img, inpaint, outpaint): send \
                     one image, or send several to a model of kind `edit` (GET /v1/models)"
                ),
            ));
        }
        let image: bytes::Bytes = self.image.into_iter().next().unwrap_or_default().into();
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
                    image,
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
                image,
                strength: Some(self.strength.unwrap_or(1.0)),
                paste_back,
            }),
            (None, None) => Call::Img2Img(Img2ImgRequest {
                settings: Some(settings(width_px, height_px)),
                image,
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
    let parsed = match read_form(form).await {
        Ok(f) => state
            .target(f.options.model.as_deref())
            .and_then(|t| f.into_call(&t)),
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
            image: vec![vec![1, 2, 3]],
            options: ImageOptions {
                prompt: "p".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn model(edit: Option<bool>) -> Target {
        Target {
            asked: String::new(),
            name: if edit == Some(true) { "edit" } else { "base" }.into(),
            edit,
        }
    }

    #[test]
    fn the_fields_choose_the_flow_of_a_base_model() {
        let base = model(Some(false));
        let (call, _) = form().into_call(&base).expect("img2img");
        assert!(matches!(call, Call::Img2Img(ref r) if r.strength.is_none()));
        let mut f = form();
        f.outpaint = Some("0, 64, 0, 0".into());
        let (call, _) = f.into_call(&base).expect("outpaint");
        assert!(matches!(call, Call::Outpaint(ref r) if r.right_px == 64 && r.paste_back));
        let mut f = form();
        f.outpaint = Some("true".into());
        assert!(f.into_call(&base).is_err(), "outpaint=true needs a size");
        let mut f = form();
        f.outpaint = Some("true".into());
        f.options.size = Some("128x64".into());
        f.anchor = Some("left".into());
        let (call, _) = f.into_call(&base).expect("outpaint to a canvas");
        assert!(matches!(call, Call::Outpaint(ref r) if r.anchor == Anchor::Left as i32));
        let mut f = form();
        f.outpaint = Some("1,2".into());
        assert_eq!(
            f.into_call(&base).expect_err("bad").detail.param.as_deref(),
            Some("outpaint")
        );
        let mut f = form();
        f.image.push(vec![4, 5]);
        let e = f
            .into_call(&base)
            .expect_err("two pictures to a base model");
        assert!(
            e.status == 400 && e.detail.message.contains("kind `edit`"),
            "{e:?}"
        );
    }

    #[test]
    fn an_edit_model_edits_up_to_three_pictures_by_instruction() {
        let edit = model(Some(true));
        let mut f = form();
        f.image.push(vec![4, 5]);
        f.options.seed = Some(9);
        let (call, _) = f.into_call(&edit).expect("edit");
        let Call::Edit(r) = call else {
            panic!("Edit expected: {call:?}")
        };
        assert_eq!(r.images.len(), 2);
        assert_eq!(r.images[1].as_ref(), &[4, 5]);
        assert_eq!(r.settings.and_then(|s| s.seed), Some(9));
        let mut f = form();
        f.mask = Some(vec![0]);
        let e = f.into_call(&edit).expect_err("mask on an Edit model");
        assert_eq!(
            (e.status.as_u16(), e.detail.param.as_deref()),
            (400, Some("mask"))
        );
        assert!(e.detail.message.contains("kind `base`"), "{e:?}");
        let mut f = form();
        f.strength = Some(0.5);
        assert_eq!(
            f.into_call(&edit)
                .expect_err("strength")
                .detail
                .param
                .as_deref(),
            Some("strength")
        );
        let mut f = form();
        f.image = vec![vec![1]; 4];
        let e = f.into_call(&edit).expect_err("four pictures");
        assert!(e.detail.message.contains("1 to 3"), "{e:?}");
        let e = form()
            .into_call(&model(None))
            .expect_err("kind not known yet");
        assert_eq!((e.status.as_u16(), e.retry_after_secs), (503, Some(1)));
    }
}
