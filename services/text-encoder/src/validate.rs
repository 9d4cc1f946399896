//! Checks an `EncodeRequest`; every problem is INVALID_ARGUMENT naming the field.

use qwen_image_proto::v1::{EncodeRequest, OverlongPromptPolicy};

use qwen_image_common::stage::StageError;
use qwen_image_imaging::Image8;

use crate::vision::{MAX_PICTURE_SIDE, MAX_PICTURES};

/// Most prompts in one request.
pub const MAX_PROMPTS: usize = 64;
/// Longest prompt in UTF-8 bytes (bounds tokenizer work before the token limit applies).
pub const MAX_PROMPT_BYTES: usize = 64 << 10;
/// diffusers' default `max_sequence_length`.
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;
/// diffusers refuses `max_sequence_length > 1024`.
pub const MAX_SEQUENCE_LENGTH: usize = 1024;

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodeInputs {
    pub prompts: Vec<String>,
    pub max_sequence_length: usize,
    /// Truncate over-long prompts (diffusers) instead of rejecting them.
    pub truncate: bool,
    /// Pictures every prompt is encoded with (Edit template); empty = text-only prompts.
    pub images: Vec<Image8>,
}

fn invalid(msg: String) -> StageError {
    StageError::InvalidArgument(msg)
}

pub fn validate(req: &EncodeRequest) -> Result<EncodeInputs, StageError> {
    let n = req.prompts.len();
    if n == 0 || n > MAX_PROMPTS {
        return Err(invalid(format!(
            "`prompts` has {n} entries; send 1..={MAX_PROMPTS}"
        )));
    }
    if let Some(i) = req.prompts.iter().position(|p| p.len() > MAX_PROMPT_BYTES) {
        return Err(invalid(format!(
            "`prompts[{i}]` is {} bytes; send at most {MAX_PROMPT_BYTES}",
            req.prompts[i].len()
        )));
    }
    let max_sequence_length = match req.max_sequence_length as usize {
        0 => DEFAULT_MAX_SEQUENCE_LENGTH,
        m if m > MAX_SEQUENCE_LENGTH => {
            return Err(invalid(format!(
                "`max_sequence_length` is {m}; send 1..={MAX_SEQUENCE_LENGTH} (0 = 512)"
            )));
        }
        m => m,
    };
    let truncate = match OverlongPromptPolicy::try_from(req.overlong_policy) {
        Ok(OverlongPromptPolicy::Unspecified | OverlongPromptPolicy::Reject) => false,
        Ok(OverlongPromptPolicy::Truncate) => true,
        Err(_) => {
            return Err(invalid(format!(
                "`overlong_policy` {} is unknown; send REJECT or TRUNCATE",
                req.overlong_policy
            )));
        }
    };
    if req.images.len() > MAX_PICTURES {
        return Err(invalid(format!(
            "`images` has {} pictures; send 1..={MAX_PICTURES} (or none for a text-only prompt)",
            req.images.len()
        )));
    }
    let images = req
        .images
        .iter()
        .enumerate()
        .map(|(k, im)| {
            let (w, h) = (im.width_px as usize, im.height_px as usize);
            if w == 0 || h == 0 || w > MAX_PICTURE_SIDE || h > MAX_PICTURE_SIDE {
                return Err(invalid(format!(
                    "`images[{k}]` is {w}x{h}; send sides of 1..={MAX_PICTURE_SIDE} px"
                )));
            }
            Image8::new(w, h, 3, im.rgb8.to_vec())
                .map_err(|e| invalid(format!("`images[{k}].rgb8`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(EncodeInputs {
        prompts: req.prompts.clone(),
        max_sequence_length,
        truncate,
        images,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_limits() {
        let ok = validate(&EncodeRequest {
            prompts: vec!["a".into()],
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(ok.max_sequence_length, 512);
        assert!(!ok.truncate);
        assert!(validate(&EncodeRequest::default()).is_err());
        assert!(
            validate(&EncodeRequest {
                prompts: vec!["a".into()],
                max_sequence_length: 1025,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            validate(&EncodeRequest {
                prompts: vec!["a".into()],
                overlong_policy: 9,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            validate(&EncodeRequest {
                prompts: vec!["x".repeat(MAX_PROMPT_BYTES + 1)],
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn pictures() {
        use qwen_image_proto::v1::Image;
        let pic = |w: u32, h: u32, n: usize| Image {
            width_px: w,
            height_px: h,
            rgb8: vec![7u8; n].into(),
        };
        let req = |images: Vec<Image>| EncodeRequest {
            prompts: vec!["a".into()],
            images,
            ..Default::default()
        };
        let ok = validate(&req(vec![pic(4, 2, 24)])).expect("valid");
        assert_eq!((ok.images[0].width, ok.images[0].height), (4, 2));
        let e = validate(&req(vec![pic(4, 2, 23)])).expect_err("short");
        assert!(e.to_string().contains("images[0].rgb8"), "{e}");
        let e = validate(&req(vec![pic(0, 2, 0)])).expect_err("empty");
        assert!(e.to_string().contains("images[0]"), "{e}");
        let e = validate(&req(vec![pic(1, 1, 3); 4])).expect_err("four");
        assert!(e.to_string().contains("1..=3"), "{e}");
    }
}
