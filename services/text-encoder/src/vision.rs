//! Prompts with pictures (instruction editing, diffusers `QwenImageEditPlusPipeline`): whether the snapshot
//! can do it (a `processor/` folder and the text encoder's vision tower weights), loading the model crate's
//! `EditPromptEncoder` over the already loaded language model, and encoding one prompt with its pictures.
//! The only file of the stage that touches the model crate's Edit API.

use std::path::Path;

use candle_core::{DType, Device};
use qwen_image_common::stage::StageError;
use qwen_image_imaging::Image8;
use qwen_image_model::edit_prompt::EditPromptEncoder;
use qwen_image_model::prompt::{EncodedPrompts, PromptEncoder};
use qwen_image_model::snapshot::{Snapshot, Weights};
use qwen_image_model::vision::tower::detect_prefix;

/// Most pictures per request (the Edit-2509 / -2511 model cards: one to three input images).
pub const MAX_PICTURES: usize = 3;
/// Largest side of a picture in pixels (the gateway sends pictures at about 384 x 384 px).
pub const MAX_PICTURE_SIDE: usize = 4096;

/// True when `snapshot` (the stage's `--model`, and no separate text-encoder weights file) has what an Edit
/// prompt needs: `processor/` and `visual.*` (or `model.visual.*`) weights in `text_encoder/`. Reads headers
/// only.
pub fn available(snapshot: Option<&Path>, weights_file: Option<&Path>) -> bool {
    let Some(dir) = snapshot.filter(|_| weights_file.is_none()) else {
        return false;
    };
    if !dir.join("processor").is_dir() {
        return false;
    }
    Weights::open_dir(&dir.join("text_encoder"))
        .map(|w| detect_prefix(&w).is_some())
        .unwrap_or(false)
}

/// Loads the processor and the vision tower of `snapshot` over the loaded tokenizer and language model
/// (shared, not loaded twice).
pub fn load(
    snapshot: &Path,
    text: &PromptEncoder,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<EditPromptEncoder> {
    let snapshot = Snapshot::open(snapshot)?;
    let tokenizer = EditPromptEncoder::load_tokenizer(&snapshot)?;
    EditPromptEncoder::with_text_model(&snapshot, tokenizer, text.model().clone(), dtype, device)
}

/// Checks that every picture can be sized by the processor (`smart_resize`: aspect ratio at most 200:1)
/// before any compute; INVALID_ARGUMENT naming the picture otherwise.
pub fn check_pictures(edit: &EditPromptEncoder, pictures: &[Image8]) -> Result<(), StageError> {
    for (k, p) in pictures.iter().enumerate() {
        edit.processor()
            .target_size(p.width, p.height)
            .map_err(|e| {
                StageError::InvalidArgument(format!(
                    "`images[{k}]` ({}x{}) cannot be sized by the image processor: {e}; send a less elongated \
                     picture",
                    p.width, p.height
                ))
            })?;
    }
    Ok(())
}

/// `encode_prompt(prompt, image=pictures)` of the Edit pipeline, pictures already at the condition size.
pub fn encode(
    edit: &EditPromptEncoder,
    prompt: &str,
    pictures: &[Image8],
) -> candle_core::Result<EncodedPrompts> {
    edit.encode(prompt, pictures)
}
