//! Prompt encoding exactly as diffusers 0.42.1 `pipelines/qwenimage/pipeline_qwenimage.py`
//! (`QwenImagePipeline._get_qwen_prompt_embeds` + `encode_prompt`, reference §2.4):
//!
//! 1. each prompt is put in the chat template [`PROMPT_TEMPLATE`];
//! 2. the batch is tokenized with truncation at `1024 + 34` tokens and right-padded to the longest;
//! 3. the text encoder runs with that mask; `hidden_states[-1]` is kept on the valid tokens;
//! 4. the first [`TEMPLATE_DROP_IDX`] (34) tokens of each sample are dropped, the rest right-padded with
//!    zeros, with a 0/1 mask;
//! 5. `encode_prompt` cuts both at `max_sequence_length` (default 512, at most 1024); an all-ones mask is
//!    passed on as `None` by diffusers ([`EncodedPrompts::mask_all_ones`]).
//!
//! Long prompts: the embedding length of a prompt is its token count + 5 (the template suffix
//! `<|im_end|>\n<|im_start|>assistant\n` stays). diffusers silently truncates what exceeds
//! `max_sequence_length`. [`PromptEncoder::encode`] does the same and reports it per prompt
//! ([`EncodedPrompts::token_counts`], [`EncodedPrompts::truncated`]); [`PromptEncoder::token_counts`] lets a
//! caller reject over-long prompts before any compute (the service rejects by default).

use candle_core::{DType, Device, Result, Tensor};

use crate::snapshot::Snapshot;
use crate::text_encoder::Qwen25VlTextModel;
use crate::tokenizer::QwenTokenizer;

/// `QwenImagePipeline.prompt_template_encode` (pipeline_qwenimage.py, `__init__`); `{}` is the prompt.
pub const PROMPT_TEMPLATE: &str = "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n";
/// `QwenImagePipeline.prompt_template_encode_start_idx`: template tokens dropped from the front (the system
/// part up to and including `user\n`, reference §2.4).
pub const TEMPLATE_DROP_IDX: usize = 34;
/// `QwenImagePipeline.tokenizer_max_length`; the tokenizer truncates at this + [`TEMPLATE_DROP_IDX`].
pub const TOKENIZER_MAX_LENGTH: usize = 1024;
/// `check_inputs`: "`max_sequence_length` cannot be greater than 1024".
pub const MAX_SEQUENCE_LENGTH_LIMIT: usize = 1024;
/// `QwenImagePipeline.__call__` default `max_sequence_length`.
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// `PROMPT_TEMPLATE.format(prompt)` (Python's `format` does not re-read braces inside the argument).
pub fn apply_template(prompt: &str) -> String {
    let (pre, post) = PROMPT_TEMPLATE
        .split_once("{}")
        .unwrap_or((PROMPT_TEMPLATE, ""));
    format!("{pre}{prompt}{post}")
}

/// A tokenized, right-padded template batch (what `self.tokenizer(txt, ...)` returns).
#[derive(Debug, Clone)]
pub struct TemplateBatch {
    /// `[B, L]` u32, padded with the pad token.
    pub input_ids: Tensor,
    /// `[B, L]` u32 0/1.
    pub attention_mask: Tensor,
    /// Valid tokens per sample (after truncation at `1024 + 34`).
    pub lengths: Vec<usize>,
    /// Template tokens per sample before truncation.
    pub full_lengths: Vec<usize>,
}

/// Encoded prompts, as `encode_prompt` returns them (one image per prompt).
#[derive(Debug, Clone)]
pub struct EncodedPrompts {
    /// `[B, L, hidden]`, right-padded with zeros, in the encoder dtype.
    pub embeds: Tensor,
    /// `[B, L]` f32 0/1.
    pub mask: Tensor,
    /// Every mask entry is 1 (diffusers passes `prompt_embeds_mask=None` then).
    pub mask_all_ones: bool,
    /// Per prompt: embedding length (prompt tokens + 5 template-suffix tokens) before any cut.
    pub token_counts: Vec<usize>,
    /// Per prompt: the embedding was cut (at `max_sequence_length`, or by the tokenizer's `1024 + 34` limit).
    pub truncated: Vec<bool>,
}

/// The Qwen-Image prompt encoder: Qwen2 tokenizer + Qwen2.5-VL text model + diffusers' template handling.
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    tokenizer: QwenTokenizer,
    model: Qwen25VlTextModel,
}

impl PromptEncoder {
    /// Loads `tokenizer/` and `text_encoder/` of a snapshot (text weights only).
    pub fn load(snapshot: &Snapshot, dtype: DType, device: &Device) -> Result<Self> {
        let tokenizer = QwenTokenizer::from_snapshot(snapshot)?;
        let model = Qwen25VlTextModel::load(snapshot, dtype, device)?;
        Ok(Self::new(tokenizer, model))
    }

    pub fn new(tokenizer: QwenTokenizer, model: Qwen25VlTextModel) -> Self {
        Self { tokenizer, model }
    }

    pub fn tokenizer(&self) -> &QwenTokenizer {
        &self.tokenizer
    }

    pub fn model(&self) -> &Qwen25VlTextModel {
        &self.model
    }

    /// Width of the embeddings (`hidden_size`, 3584 for Qwen-Image).
    pub fn hidden_size(&self) -> usize {
        self.model.config().hidden_size
    }

    /// Embedding length (template suffix included, prefix dropped) of each prompt, before any cut.
    pub fn token_counts(&self, prompts: &[&str]) -> Result<Vec<usize>> {
        prompts
            .iter()
            .map(|p| {
                Ok(self
                    .template_ids(p)?
                    .len()
                    .saturating_sub(TEMPLATE_DROP_IDX))
            })
            .collect()
    }

    fn template_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(&apply_template(prompt))
    }

    /// `tokenizer([template.format(p) for p in prompts], max_length=1024+34, padding=True, truncation=True)`.
    pub fn tokenize_template(&self, prompts: &[&str]) -> Result<TemplateBatch> {
        if prompts.is_empty() {
            return Err(err("prompt encoder: no prompts given"));
        }
        let max_len = TOKENIZER_MAX_LENGTH + TEMPLATE_DROP_IDX;
        let mut rows = Vec::with_capacity(prompts.len());
        let mut full_lengths = Vec::with_capacity(prompts.len());
        for p in prompts {
            let mut ids = self.template_ids(p)?;
            full_lengths.push(ids.len());
            ids.truncate(max_len); // truncation side: right
            rows.push(ids);
        }
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        let width = lengths.iter().copied().max().unwrap_or(0);
        let pad = self.tokenizer.pad_id();
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut mask = Vec::with_capacity(rows.len() * width);
        for row in &rows {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(pad, width - row.len()));
            mask.extend(std::iter::repeat_n(1u32, row.len()));
            mask.extend(std::iter::repeat_n(0u32, width - row.len()));
        }
        let device = self.model.device();
        Ok(TemplateBatch {
            input_ids: Tensor::from_vec(ids, (rows.len(), width), device)?,
            attention_mask: Tensor::from_vec(mask, (rows.len(), width), device)?,
            lengths,
            full_lengths,
        })
    }

    /// `_get_qwen_prompt_embeds`: `(prompt_embeds [B, L, hidden], mask [B, L] f32)` with the template prefix
    /// dropped and zero right-padding, plus the template batch it came from and the encoder output.
    pub fn prompt_embeds(&self, prompts: &[&str]) -> Result<(Tensor, Tensor, TemplateBatch)> {
        let batch = self.tokenize_template(prompts)?;
        let hidden = self
            .model
            .forward(&batch.input_ids, Some(&batch.attention_mask))?; // [B, Lt, hidden]
        let (embeds, mask) = drop_template_prefix(&hidden, &batch.lengths)?;
        Ok((embeds, mask, batch))
    }

    /// `encode_prompt(prompts, max_sequence_length=..)` with one image per prompt. Prompts longer than
    /// `max_sequence_length` are cut like diffusers does, and flagged in [`EncodedPrompts::truncated`].
    pub fn encode(&self, prompts: &[&str], max_sequence_length: usize) -> Result<EncodedPrompts> {
        if max_sequence_length == 0 || max_sequence_length > MAX_SEQUENCE_LENGTH_LIMIT {
            return Err(err(format!(
                "max_sequence_length must be in 1..={MAX_SEQUENCE_LENGTH_LIMIT}, got {max_sequence_length}"
            )));
        }
        let (embeds, mask, batch) = self.prompt_embeds(prompts)?;
        let token_counts: Vec<usize> = batch
            .full_lengths
            .iter()
            .map(|n| n.saturating_sub(TEMPLATE_DROP_IDX))
            .collect();
        let truncated = token_counts
            .iter()
            .map(|&n| n > max_sequence_length)
            .collect();
        // prompt_embeds[:, :max_sequence_length], mask likewise
        let len = embeds.dim(1)?.min(max_sequence_length);
        let embeds = embeds.narrow(1, 0, len)?;
        let mask = mask.narrow(1, 0, len)?;
        let mask_all_ones = mask.min_all()?.to_scalar::<f32>()? >= 0.5;
        Ok(EncodedPrompts {
            embeds,
            mask,
            mask_all_ones,
            token_counts,
            truncated,
        })
    }
}

/// From the encoder output `[B, Lt, hidden]` and each sample's valid length (right padding), keeps rows
/// `TEMPLATE_DROP_IDX..len` of each sample and right-pads them with zeros to the longest:
/// `([B, L, hidden], mask [B, L] f32)` with `L = max(len) - 34`.
pub fn drop_template_prefix(hidden: &Tensor, lengths: &[usize]) -> Result<(Tensor, Tensor)> {
    let (b, lt, d) = hidden.dims3()?;
    if lengths.len() != b {
        return Err(err(format!("{} lengths for a batch of {b}", lengths.len())));
    }
    let kept: Vec<usize> = lengths
        .iter()
        .map(|&n| {
            if n < TEMPLATE_DROP_IDX || n > lt {
                Err(err(format!(
                    "valid length {n} is outside {TEMPLATE_DROP_IDX}..={lt}"
                )))
            } else {
                Ok(n - TEMPLATE_DROP_IDX)
            }
        })
        .collect::<Result<_>>()?;
    let width = kept.iter().copied().max().unwrap_or(0);
    let mut rows = Vec::with_capacity(b);
    let mut mask = Vec::with_capacity(b * width);
    for (i, &n) in kept.iter().enumerate() {
        let valid = hidden.get(i)?.narrow(0, TEMPLATE_DROP_IDX, n)?; // [n, hidden]
        let row = if n < width {
            let zeros = Tensor::zeros((width - n, d), hidden.dtype(), hidden.device())?;
            Tensor::cat(&[&valid, &zeros], 0)? // [width, hidden]
        } else {
            valid
        };
        rows.push(row);
        mask.extend(std::iter::repeat_n(1f32, n));
        mask.extend(std::iter::repeat_n(0f32, width - n));
    }
    let embeds = Tensor::stack(&rows, 0)?; // [B, width, hidden]
    let mask = Tensor::from_vec(mask, (b, width), hidden.device())?;
    Ok((embeds, mask))
}
