//! Encoding the prompt and (only when CFG will run, as diffusers does) the negative prompt.

use qwen_image_proto::v1::{EncodeResponse, Image, Stage, Tensor};

use super::{Ctx, phase, repeat_batch};
use crate::error::{GatewayError, StageName};
use crate::request::Settings;
use crate::stages::Patience;

/// Conditioning for the denoiser: embeddings repeated to the batch, mask dropped when all ones (diffusers
/// then passes `None`).
fn conditioning(
    resp: EncodeResponse,
    batch: usize,
) -> Result<(Tensor, Option<Tensor>), GatewayError> {
    let bad = |d: String| GatewayError::bad_response(StageName::TextEncoder, d);
    let embeds = resp
        .prompt_embeds
        .ok_or_else(|| bad("no prompt_embeds".into()))?;
    let embeds = repeat_batch(&embeds, batch).map_err(bad)?;
    let mask = match (resp.mask_all_ones, resp.prompt_embeds_mask) {
        (true, _) => None,
        (false, Some(m)) => Some(repeat_batch(&m, batch).map_err(bad)?),
        (false, None) => return Err(bad("mask not all ones but no mask sent".into())),
    };
    Ok((embeds, mask))
}

/// The denoiser's prompt conditioning for one request.
pub struct Prompts {
    pub prompt_embeds: Tensor,
    pub prompt_embeds_mask: Option<Tensor>,
    pub negative_prompt_embeds: Option<Tensor>,
    pub negative_prompt_embeds_mask: Option<Tensor>,
    /// The text encoder's model id (PNG metadata when the gateway has no model name).
    pub model_id: String,
    /// Whether the prompts were cut at max_sequence_length (reported to the caller in the result).
    pub truncation: Truncation,
}

/// Which prompts the text encoder cut at diffusers' max_sequence_length.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Truncation {
    pub prompt: bool,
    pub negative_prompt: bool,
}

/// Encodes the prompt and (only when CFG will run, as diffusers does) the negative prompt, concurrently.
pub async fn encode(ctx: &Ctx<'_>, p: &Settings) -> Result<Prompts, GatewayError> {
    encode_with_pictures(ctx, p, &[]).await
}

/// [`encode`] with pictures (instruction editing): both prompts are encoded with the same pictures, as
/// `QwenImageEditPlusPipeline.encode_prompt` is called with `image=condition_images` for each.
pub async fn encode_with_pictures(
    ctx: &Ctx<'_>,
    p: &Settings,
    pictures: &[Image],
) -> Result<Prompts, GatewayError> {
    let batch = p.num_images as usize;
    let stages = ctx.stages;
    ctx.progress(Stage::EncodePrompt, 0, 0).await;
    let negative = p.negative_prompt.as_deref().filter(|_| p.uses_cfg());
    let (pos, neg) = tokio::join!(
        phase(
            "encode_prompt",
            StageName::TextEncoder,
            "Encode",
            stages.encode_with_pictures(&p.prompt, pictures, ctx.deadline, Patience::Wait(ctx))
        ),
        async {
            match negative {
                Some(n) => phase(
                    "encode_negative_prompt",
                    StageName::TextEncoder,
                    "Encode",
                    stages.encode_with_pictures(n, pictures, ctx.deadline, Patience::Wait(ctx)),
                )
                .await
                .map(Some),
                None => Ok(None),
            }
        }
    );
    let pos = pos?;
    let neg = neg?;
    let truncation = Truncation {
        prompt: pos.truncated.iter().any(|t| *t),
        negative_prompt: neg.as_ref().is_some_and(|r| r.truncated.iter().any(|t| *t)),
    };
    if truncation.prompt || truncation.negative_prompt {
        tracing::warn!(
            ?truncation,
            "prompt longer than 512 tokens: cut as diffusers does (reported in the result)"
        );
    }
    let model_id = pos.model_id.clone();
    if ctx.model_name.is_none() {
        tracing::Span::current().record("model", model_id.as_str());
    }
    let (prompt_embeds, prompt_embeds_mask) = conditioning(pos, batch)?;
    let (negative_prompt_embeds, negative_prompt_embeds_mask) = match neg {
        Some(r) => {
            let (e, m) = conditioning(r, batch)?;
            (Some(e), m)
        }
        None => (None, None),
    };
    Ok(Prompts {
        prompt_embeds,
        prompt_embeds_mask,
        negative_prompt_embeds,
        negative_prompt_embeds_mask,
        model_id,
        truncation,
    })
}
