//! The request fields `/v1/images/generations` (JSON) and `/v1/images/edits` (multipart form) share:
//! OpenAI's (`prompt`, `model`, `n`, `size`, `response_format`, `stream`, `partial_images`, `output_format`,
//! `background`, and the accepted-but-ignored ones) and our extensions (`negative_prompt`, `seed`, `steps`,
//! `true_cfg_scale`), with their parsing, checks and translation to [`GenerationSettings`] in one place.

use qwen_image_proto::v1::GenerationSettings;
use serde::Deserialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::respond::{Kind, Output};

/// The fields both image endpoints take.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ImageOptions {
    /// The prompt (Chinese, English or mixed); for an Edit model, the instruction ("Picture 1", "Picture 2"
    /// name the images in their order).
    pub prompt: String,
    /// One of the served models (`GET /v1/models`); absent = the first one listed.
    pub model: Option<String>,
    /// Number of images, 1..=4 (one batch, one seed: image i uses the generator's following noise).
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT` in pixels, multiples of the model's size multiple (16 for Qwen-Image), or `auto`
    /// (the flow's default size; see each endpoint).
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
    /// Accepted and ignored (as are `user`, `safety_identifier` and `output_compression`).
    #[allow(dead_code)]
    pub quality: Option<String>,
    #[allow(dead_code)]
    pub user: Option<String>,
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
}

/// `name`'s text as a `T`.
pub fn parse<T: std::str::FromStr>(name: &str, v: &str, what: &str) -> Result<T, ApiError> {
    v.trim()
        .parse()
        .map_err(|_| ApiError::bad_param(name, format!("{name} `{v}` is not {what}")))
}

pub fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ApiError::bad_param(
            name,
            format!("{name} `{v}` is not a boolean: send true or false"),
        )),
    }
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

impl ImageOptions {
    /// Sets the form field `name` from its text (multipart bodies): `Ok(false)` when it is not one of
    /// these fields.
    pub fn set_form_field(&mut self, name: &str, text: String) -> Result<bool, ApiError> {
        match name {
            "prompt" => self.prompt = text,
            "model" => self.model = Some(text),
            "n" => self.n = Some(parse("n", &text, "a whole number 1..=4")?),
            "size" => self.size = Some(text),
            "response_format" => self.response_format = Some(text),
            "stream" => self.stream = Some(parse_bool("stream", &text)?),
            "partial_images" => {
                self.partial_images = Some(parse("partial_images", &text, "a whole number")?)
            }
            "output_format" => self.output_format = Some(text),
            "background" => self.background = Some(text),
            "negative_prompt" => self.negative_prompt = Some(text),
            "seed" => self.seed = Some(parse("seed", &text, "a whole number")?),
            "steps" => self.steps = Some(parse("steps", &text, "a whole number 2..=1000")?),
            "true_cfg_scale" => {
                self.true_cfg_scale = Some(parse("true_cfg_scale", &text, "a number")?)
            }
            "quality" | "user" | "safety_identifier" | "output_compression" => {}
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Checks the output options (`response_format`, `output_format`, `background`) and parses `size`:
    /// the asked (width, height), 0x0 for the flow's default.
    pub fn check(&self) -> Result<(u32, u32), ApiError> {
        if let Some(f) = self.response_format.as_deref().filter(|f| *f != "b64_json") {
            return Err(ApiError::bad_param(
                "response_format",
                format!(
                    "response_format `{f}` is not served: send \"b64_json\" (images come inline)"
                ),
            ));
        }
        if let Some(f) = self.output_format.as_deref().filter(|f| *f != "png") {
            return Err(ApiError::bad_param(
                "output_format",
                format!("output_format `{f}` is not served: send \"png\""),
            ));
        }
        if let Some(b) = self
            .background
            .as_deref()
            .filter(|b| !matches!(*b, "auto" | "opaque"))
        {
            return Err(ApiError::bad_param(
                "background",
                format!("background `{b}` is not served: send \"auto\" or \"opaque\""),
            ));
        }
        parse_size(self.size.as_deref())
    }

    /// How the endpoint `kind` answers (JSON or SSE, partial images).
    pub fn output(&self, kind: Kind) -> Output {
        Output::new(
            kind,
            self.stream.unwrap_or(false),
            self.partial_images.unwrap_or(0),
            self.steps,
        )
    }

    /// The gRPC settings for `model` (the request's name for it, which the gRPC service selects by; empty =
    /// the first model) at the given size.
    pub fn settings(
        &self,
        model: &str,
        out: &Output,
        width_px: u32,
        height_px: u32,
    ) -> GenerationSettings {
        GenerationSettings {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width_px,
            height_px,
            steps: self.steps.unwrap_or(0),
            true_cfg_scale: self.true_cfg_scale,
            seed: self.seed,
            preview: out.preview(),
            num_images: self.n.unwrap_or(1),
            model: model.to_string(),
            ..Default::default()
        }
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
    fn shared_fields_parse_and_check() {
        let mut o = ImageOptions::default();
        assert!(o.set_form_field("seed", "7".into()).expect("seed"));
        assert!(o.set_form_field("user", "u".into()).expect("ignored"));
        assert!(!o.set_form_field("mask", String::new()).expect("not shared"));
        assert_eq!(
            o.set_form_field("n", "two".into())
                .expect_err("bad n")
                .detail
                .param
                .as_deref(),
            Some("n")
        );
        o.size = Some("64x48".into());
        assert_eq!(o.check().expect("size"), (64, 48));
        o.response_format = Some("url".into());
        assert_eq!(
            o.check().expect_err("url").detail.param.as_deref(),
            Some("response_format")
        );
        let out = o.output(Kind::Edit);
        let s = o.settings("edit", &out, 64, 48);
        assert_eq!(
            (s.seed, s.model.as_str(), s.num_images),
            (Some(7), "edit", 1)
        );
    }
}
