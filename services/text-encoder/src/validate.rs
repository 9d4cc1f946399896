//! Checks an `EncodeRequest`; every problem is INVALID_ARGUMENT naming the field.

use qwen_image_proto::v1::{EncodeRequest, OverlongPromptPolicy};

use qwen_image_common::stage::StageError;

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
    Ok(EncodeInputs {
        prompts: req.prompts.clone(),
        max_sequence_length,
        truncate,
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
}
