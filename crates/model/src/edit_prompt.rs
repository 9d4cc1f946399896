//! Prompt encoding with pictures, exactly as diffusers 0.42.1 `QwenImageEditPlusPipeline` does it
//! (`pipelines/qwenimage/pipeline_qwenimage_edit_plus.py`, `_get_qwen_prompt_embeds` + `encode_prompt`) with
//! transformers 5.23's Qwen2.5-VL (`Qwen2VLProcessor`, `Qwen2_5_VLModel.forward`):
//!
//! 1. the text is `EDIT_PROMPT_TEMPLATE` around `"Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2:
//!    ..." + prompt` ([`template_text`]);
//! 2. the processor turns each picture into `pixel_values` ([`crate::vision::processor`]) and each `<|image_pad|>`
//!    into `t·h·w / merge²` copies of itself ([`EditPromptEncoder::input_ids`]);
//! 3. the vision tower's output replaces the embeddings of those tokens, in order (`masked_scatter`);
//! 4. the language model runs with multimodal RoPE positions (`get_rope_index`, [`rope_index`]): text tokens
//!    count up on all three axes, a picture's tokens sit at `(start, start + row, start + column)` and the text
//!    after it continues at `start + max(h, w) / merge`;
//! 5. `hidden_states[-1]` minus its first [`EDIT_TEMPLATE_DROP_IDX`] (64) tokens is the prompt embedding; there
//!    is no truncation (the pipeline cuts nothing at `max_sequence_length`) and, one prompt per call, the mask
//!    is all ones (`encode_prompt` passes `None`).
//!
//! Positions: diffusers 0.42.1 does not pass the processor's `mm_token_type_ids` to the text encoder, so with
//! transformers >= 5 `compute_3d_position_ids` finds no token types and the language model falls back to
//! `0..L` (diffusers issue #14194, fix in PR #14189). Transformers 4.x computed the 3-D positions from the
//! token ids, which is what the model was trained with. [`PositionMode::Multimodal`] (the default) is that;
//! [`PositionMode::Sequential`] reproduces diffusers 0.42.1 + transformers 5 bit for bit.

use candle_core::{DType, Device, Result, Tensor};
use qwen_image_imaging::Image8;
use qwen_image_imaging::edit_sizes::{CONDITION_IMAGE_SIZE, condition_size};
use qwen_image_imaging::resize::lanczos_resize;

use crate::prompt::EncodedPrompts;
use crate::snapshot::Snapshot;
use crate::text_encoder::{MropePosition, Qwen25VlTextModel};
use crate::tokenizer::QwenTokenizer;
use crate::vision::{ImageProcessor, ImageProcessorConfig, PixelValues, VisionTower};

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// `QwenImageEditPlusPipeline.prompt_template_encode` (`__init__`); `{}` is the picture prefix + the prompt.
pub const EDIT_PROMPT_TEMPLATE: &str = "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), then explain how the user's text instruction should alter or modify the image. Generate a new image that meets the user's requirements while maintaining consistency with the original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n";
/// `QwenImageEditPlusPipeline.prompt_template_encode_start_idx`: leading tokens dropped from the embeddings.
pub const EDIT_TEMPLATE_DROP_IDX: usize = 64;
/// `img_prompt_template` of `_get_qwen_prompt_embeds`; `{}` is the 1-based picture number.
pub const IMAGE_PROMPT_TEMPLATE: &str = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>";
/// The processor's image placeholder token (`Qwen2VLProcessor.image_token`).
pub const IMAGE_PAD_TOKEN: &str = "<|image_pad|>";

/// Which positions the language model gets (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PositionMode {
    /// Qwen2.5-VL's 3-D positions (`get_rope_index`): how the model was trained, transformers 4.x, diffusers
    /// PR #14189.
    #[default]
    Multimodal,
    /// `0..L` on all axes: diffusers 0.42.1 with transformers >= 5 (diffusers issue #14194).
    Sequential,
}

/// The template text for `n_images` pictures and a prompt.
pub fn template_text(prompt: &str, n_images: usize) -> String {
    let mut pictures = String::new();
    for i in 1..=n_images {
        let (a, b) = IMAGE_PROMPT_TEMPLATE
            .split_once("{}")
            .unwrap_or((IMAGE_PROMPT_TEMPLATE, ""));
        pictures.push_str(&format!("{a}{i}{b}"));
    }
    let (pre, post) = EDIT_PROMPT_TEMPLATE
        .split_once("{}")
        .unwrap_or((EDIT_PROMPT_TEMPLATE, ""));
    format!("{pre}{pictures}{prompt}{post}")
}

/// `get_rope_index` for one unpadded sample: runs of `image_token` take the grids in order (patch grids
/// `(t, h, w)`, merged by `merge`); everything else is text.
pub fn rope_index(
    ids: &[u32],
    image_token: u32,
    grids: &[(usize, usize, usize)],
    merge: usize,
) -> Result<Vec<MropePosition>> {
    let mut pos = Vec::with_capacity(ids.len());
    let mut current = 0u32;
    let mut next_grid = grids.iter();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != image_token {
            pos.push([current; 3]);
            current += 1;
            i += 1;
            continue;
        }
        let start = i;
        while i < ids.len() && ids[i] == image_token {
            i += 1;
        }
        let &(t, h, w) = next_grid
            .next()
            .ok_or_else(|| err("more runs of image tokens than pictures"))?;
        let (lh, lw) = (h / merge, w / merge);
        if i - start != t * lh * lw {
            return Err(err(format!(
                "a run of {} image tokens does not match the picture grid {:?} ({} tokens)",
                i - start,
                (t, h, w),
                t * lh * lw
            )));
        }
        for ti in 0..t as u32 {
            for y in 0..lh as u32 {
                for x in 0..lw as u32 {
                    pos.push([current + ti, current + y, current + x]);
                }
            }
        }
        current += (h.max(w) / merge) as u32;
    }
    if next_grid.next().is_some() {
        return Err(err("fewer runs of image tokens than pictures"));
    }
    Ok(pos)
}

/// Resizes pictures to the condition size the pipeline gives the text encoder
/// (`calculate_dimensions(area, w / h)` then LANCZOS, `VaeImageProcessor.resize`); `area` is
/// [`CONDITION_IMAGE_SIZE`] in the pipeline.
pub fn condition_images(pictures: &[Image8], area: u64) -> Result<Vec<Image8>> {
    pictures
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let (w, h) = condition_size(p.width, p.height, area)
                .map_err(|e| err(format!("picture {}: {e}", k + 1)))?;
            lanczos_resize(p, w, h).map_err(|e| err(format!("picture {}: {e}", k + 1)))
        })
        .collect()
}

/// Intermediate results of one encode (for tests and diagnostics).
#[derive(Debug, Clone)]
pub struct EditPromptParts {
    /// Template token ids with the image tokens expanded.
    pub input_ids: Vec<u32>,
    pub pixels: PixelValues,
    /// Vision tower output `[image tokens, hidden]`.
    pub vision: Tensor,
    /// Positions given to the language model (`None` in [`PositionMode::Sequential`]).
    pub positions: Option<Vec<MropePosition>>,
    /// `hidden_states[-1]` over the whole template `[1, L, hidden]`.
    pub hidden: Tensor,
}

/// The Qwen-Image-Edit prompt encoder: tokenizer, `Qwen2VLImageProcessor`, vision tower and language model.
#[derive(Debug, Clone)]
pub struct EditPromptEncoder {
    tokenizer: QwenTokenizer,
    model: Qwen25VlTextModel,
    vision: VisionTower,
    processor: ImageProcessor,
    image_token_id: u32,
    positions: PositionMode,
}

impl EditPromptEncoder {
    /// Loads an Edit snapshot's `processor/` (image processor config; its tokenizer files when present, else
    /// `tokenizer/`), and the text model and vision tower of `text_encoder/`.
    pub fn load(snapshot: &Snapshot, dtype: DType, device: &Device) -> Result<Self> {
        let tokenizer = Self::load_tokenizer(snapshot)?;
        let model = Qwen25VlTextModel::load(snapshot, dtype, device)?;
        Self::with_text_model(snapshot, tokenizer, model, dtype, device)
    }

    /// Adds the processor and the vision tower of `snapshot` to an already loaded tokenizer and text model (a
    /// text-encoder stage serving both text-to-image and Edit requests loads the language model once).
    pub fn with_text_model(
        snapshot: &Snapshot,
        tokenizer: QwenTokenizer,
        model: Qwen25VlTextModel,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dir = snapshot.root().join("processor");
        if !dir.is_dir() {
            return Err(err(format!(
                "snapshot {}: no `processor` folder; not a Qwen-Image-Edit snapshot",
                snapshot.root().display()
            )));
        }
        let processor = ImageProcessor::new(ImageProcessorConfig::from_dir(&dir)?)?;
        let vision = VisionTower::load(snapshot, dtype, device)?;
        Self::new(tokenizer, model, vision, processor)
    }

    /// The tokenizer the pipeline's processor uses: `processor/` when it holds tokenizer files, else
    /// `tokenizer/`.
    pub fn load_tokenizer(snapshot: &Snapshot) -> Result<QwenTokenizer> {
        let proc_dir = snapshot.root().join("processor");
        if proc_dir.join("tokenizer.json").is_file() || proc_dir.join("vocab.json").is_file() {
            QwenTokenizer::from_dir(&proc_dir)
        } else {
            QwenTokenizer::from_snapshot(snapshot)
        }
    }

    pub fn new(
        tokenizer: QwenTokenizer,
        model: Qwen25VlTextModel,
        vision: VisionTower,
        processor: ImageProcessor,
    ) -> Result<Self> {
        let image_token_id = tokenizer.token_to_id(IMAGE_PAD_TOKEN).ok_or_else(|| {
            err(format!(
                "the tokenizer has no `{IMAGE_PAD_TOKEN}` token; not a Qwen2.5-VL tokenizer"
            ))
        })?;
        if vision.out_hidden_size() != model.config().hidden_size {
            return Err(err(format!(
                "vision_config.out_hidden_size {} differs from the text hidden size {}",
                vision.out_hidden_size(),
                model.config().hidden_size
            )));
        }
        if vision.config().spatial_merge_size != processor.config().merge_size
            || vision.config().patch_size != processor.config().patch_size
            || vision.config().temporal_patch_size != processor.config().temporal_patch_size
        {
            return Err(err(
                "the processor's patch/merge sizes differ from the vision tower's vision_config",
            ));
        }
        Ok(Self {
            tokenizer,
            model,
            vision,
            processor,
            image_token_id,
            positions: PositionMode::default(),
        })
    }

    /// Chooses the language model's positions (default [`PositionMode::Multimodal`]).
    pub fn with_positions(mut self, positions: PositionMode) -> Self {
        self.positions = positions;
        self
    }

    pub fn positions(&self) -> PositionMode {
        self.positions
    }

    pub fn tokenizer(&self) -> &QwenTokenizer {
        &self.tokenizer
    }

    pub fn model(&self) -> &Qwen25VlTextModel {
        &self.model
    }

    pub fn vision(&self) -> &VisionTower {
        &self.vision
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }

    /// Width of the embeddings (`hidden_size`).
    pub fn hidden_size(&self) -> usize {
        self.model.config().hidden_size
    }

    /// Token ids of the template for `prompt` with the pictures' image tokens expanded (what
    /// `processor(text=..., images=...)["input_ids"]` holds).
    pub fn input_ids(&self, prompt: &str, grids: &[(usize, usize, usize)]) -> Result<Vec<u32>> {
        let ids = self.tokenizer.encode(&template_text(prompt, grids.len()))?;
        let pads = ids.iter().filter(|&&t| t == self.image_token_id).count();
        if pads != grids.len() {
            return Err(err(format!(
                "the prompt must not contain `{IMAGE_PAD_TOKEN}` (the template has {pads} image placeholders for \
                 {} pictures)",
                grids.len()
            )));
        }
        let mut out = Vec::with_capacity(ids.len());
        let mut g = grids.iter();
        for t in ids {
            if t == self.image_token_id {
                let grid = *g
                    .next()
                    .ok_or_else(|| err("image placeholder without a picture"))?;
                out.extend(std::iter::repeat_n(t, self.processor.tokens_for(grid)));
            } else {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Embedding length (template tokens after the first 64) for a prompt and pictures of these sizes
    /// `(width, height)` as the processor will see them (already at the condition size), before any compute.
    pub fn token_count(&self, prompt: &str, sizes: &[(usize, usize)]) -> Result<usize> {
        let p = self.processor.config().patch_size;
        let grids = sizes
            .iter()
            .enumerate()
            .map(|(k, &(w, h))| {
                let (w, h) = self
                    .processor
                    .target_size(w, h)
                    .map_err(|e| err(format!("picture {}: {e}", k + 1)))?;
                Ok((1, h / p, w / p))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(self
            .input_ids(prompt, &grids)?
            .len()
            .saturating_sub(EDIT_TEMPLATE_DROP_IDX))
    }

    /// Runs the whole encoder on `prompt` and RGB `pictures` already at the condition size (see
    /// [`condition_images`]) and returns the intermediate results.
    pub fn encode_parts(&self, prompt: &str, pictures: &[Image8]) -> Result<EditPromptParts> {
        if pictures.is_empty() {
            return Err(err("an Edit prompt needs at least one picture"));
        }
        let device = self.model.device();
        let pixels = self.processor.preprocess(pictures, device)?;
        let input_ids = self.input_ids(prompt, &pixels.grids)?;
        let vision = self.vision.forward(&pixels.pixel_values, &pixels.grids)?; // [n_img_tokens, D]
        let l = input_ids.len();
        // masked_scatter: position j takes text row j, or vision row k for the k-th image token
        let mut k = 0u32;
        let gather: Vec<u32> = input_ids
            .iter()
            .enumerate()
            .map(|(j, &t)| {
                if t == self.image_token_id {
                    k += 1;
                    l as u32 + k - 1
                } else {
                    j as u32
                }
            })
            .collect();
        if k as usize != vision.dim(0)? {
            return Err(err(format!(
                "{k} image tokens but the vision tower gave {} embeddings",
                vision.dim(0)?
            )));
        }
        let ids = Tensor::from_vec(input_ids.clone(), (1, l), device)?;
        let text = self.model.embed(&ids)?.squeeze(0)?; // [L, D]
        let rows = Tensor::cat(&[&text, &vision.to_dtype(text.dtype())?], 0)?;
        let embeds = rows
            .index_select(&Tensor::from_vec(gather, l, device)?, 0)?
            .unsqueeze(0)?; // [1, L, D]
        let positions = match self.positions {
            PositionMode::Multimodal => Some(rope_index(
                &input_ids,
                self.image_token_id,
                &pixels.grids,
                self.processor.config().merge_size,
            )?),
            PositionMode::Sequential => None,
        };
        let hidden = self.model.forward_embeds(
            embeds,
            None,
            positions.as_ref().map(std::slice::from_ref),
        )?;
        Ok(EditPromptParts {
            input_ids,
            pixels,
            vision,
            positions,
            hidden,
        })
    }

    /// `encode_prompt(prompt, image=pictures)`: embeddings `[1, L - 64, hidden]` and an all-ones mask.
    /// `pictures` must already be at the condition size ([`condition_images`]).
    pub fn encode(&self, prompt: &str, pictures: &[Image8]) -> Result<EncodedPrompts> {
        let parts = self.encode_parts(prompt, pictures)?;
        let l = parts.input_ids.len();
        if l <= EDIT_TEMPLATE_DROP_IDX {
            return Err(err(format!(
                "the Edit template gave {l} tokens, not more than the {EDIT_TEMPLATE_DROP_IDX} the pipeline drops"
            )));
        }
        let n = l - EDIT_TEMPLATE_DROP_IDX;
        let embeds = parts.hidden.narrow(1, EDIT_TEMPLATE_DROP_IDX, n)?;
        let mask = Tensor::ones((1, n), DType::F32, embeds.device())?;
        Ok(EncodedPrompts {
            embeds,
            mask,
            mask_all_ones: true,
            token_counts: vec![n],
            truncated: vec![false],
        })
    }

    /// [`Self::encode`] on original pictures: resizes them to [`CONDITION_IMAGE_SIZE`] first, as the pipeline
    /// does.
    pub fn encode_pictures(&self, prompt: &str, pictures: &[Image8]) -> Result<EncodedPrompts> {
        self.encode(prompt, &condition_images(pictures, CONDITION_IMAGE_SIZE)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_with_pictures() {
        let t = template_text("make it night", 2);
        assert!(t.contains(
            "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: \
             <|vision_start|><|image_pad|><|vision_end|>make it night<|im_end|>"
        ));
        assert!(t.starts_with("<|im_start|>system\nDescribe the key features"));
    }

    #[test]
    fn rope_index_places_pictures() -> Result<()> {
        // text(2) image(grid 1x4x6 -> 2x3 merged) text(1)
        let ids = [5, 6, 9, 9, 9, 9, 9, 9, 7];
        let p = rope_index(&ids, 9, &[(1, 4, 6)], 2)?;
        assert_eq!(p[0], [0, 0, 0]);
        assert_eq!(p[1], [1, 1, 1]);
        // image at start 2: (2, 2 + row, 2 + col), row-major
        assert_eq!(
            &p[2..8],
            &[
                [2, 2, 2],
                [2, 2, 3],
                [2, 2, 4],
                [2, 3, 2],
                [2, 3, 3],
                [2, 3, 4]
            ]
        );
        // text after: 2 + max(4, 6) / 2 = 5
        assert_eq!(p[8], [5, 5, 5]);
        assert!(rope_index(&ids, 9, &[(1, 4, 4)], 2).is_err());
        assert!(rope_index(&ids, 9, &[], 2).is_err());
        assert!(rope_index(&ids, 9, &[(1, 4, 6), (1, 2, 2)], 2).is_err());
        Ok(())
    }
}
