//! Reference latents of instruction editing (diffusers 0.42.1 `QwenImageEditPlusPipeline`,
//! `pipelines/qwenimage/pipeline_qwenimage_edit_plus.py`): every input picture is resized to about
//! [`VAE_IMAGE_SIZE`] pixels (`calculate_dimensions` + `VaeImageProcessor.preprocess`, LANCZOS), VAE-encoded,
//! reduced to the posterior mode (`retrieve_latents(..., sample_mode="argmax")` in `_encode_vae_image`),
//! normalised with the VAE's `latents_mean`/`latents_std`, packed in 2x2 patches (`prepare_latents`) and appended
//! to the noise tokens; each picture adds `(1, h/2, w/2)` to `img_shapes`. The transformer's output for them is
//! dropped (`noise_pred[:, : latents.size(1)]`, [`crate::denoise::denoise_with_references`]).

use candle_core::{Device, Result, Tensor};
use qwen_image_imaging::Image8;
use qwen_image_imaging::edit_sizes::vae_size;
use qwen_image_imaging::resize::lanczos_resize;

use crate::latents::pack;
use crate::rope::ImgShape;
use crate::vae::{AutoencoderKLQwenImage, from_rgb8};

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

pub use qwen_image_imaging::edit_sizes::{
    CONDITION_IMAGE_SIZE, DEFAULT_OUTPUT_AREA, VAE_IMAGE_SIZE, calculate_dimensions,
    default_output_size,
};

/// Packed reference latents and their token grids.
#[derive(Debug, Clone)]
pub struct ReferenceLatents {
    /// `[B, Σ (h/2)(w/2), 4C]`, pictures in order (a batch of 1 serves any batch).
    pub latents: Tensor,
    /// `(1, h/2, w/2)` per picture, in order.
    pub shapes: Vec<ImgShape>,
}

impl ReferenceLatents {
    /// Checks that `shapes` describe the tokens of `latents`.
    pub fn new(latents: Tensor, shapes: Vec<ImgShape>) -> Result<Self> {
        let (_, s, _) = latents.dims3()?;
        let tokens: usize = shapes.iter().map(|(f, h, w)| f * h * w).sum();
        if shapes.is_empty() || tokens != s {
            return Err(err(format!(
                "reference latents have {s} tokens, their shapes {shapes:?} describe {tokens}"
            )));
        }
        Ok(Self { latents, shapes })
    }

    /// Packs normalised latents `[B, C, 1, h, w]` (or `[B, C, h, w]`), one tensor per picture.
    pub fn from_unpacked(latents: &[Tensor]) -> Result<Self> {
        if latents.is_empty() {
            return Err(err("no reference latents"));
        }
        let mut packed = Vec::with_capacity(latents.len());
        let mut shapes = Vec::with_capacity(latents.len());
        for z in latents {
            let dims = z.dims();
            let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
            packed.push(pack(z)?);
            shapes.push((1, h / 2, w / 2));
        }
        Self::new(Tensor::cat(&packed, 1)?, shapes)
    }

    /// Number of reference tokens.
    pub fn tokens(&self) -> usize {
        self.shapes.iter().map(|(f, h, w)| f * h * w).sum()
    }
}

/// Resizes RGB pictures to the size the pipeline VAE-encodes them at (`area` is [`VAE_IMAGE_SIZE`] in the
/// pipeline).
pub fn vae_pictures(
    pictures: &[Image8],
    area: u64,
    vae_scale_factor: usize,
) -> Result<Vec<Image8>> {
    pictures
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let (w, h) = vae_size(p.width, p.height, area, vae_scale_factor)
                .map_err(|e| err(format!("picture {}: {e}", k + 1)))?;
            lanczos_resize(p, w, h).map_err(|e| err(format!("picture {}: {e}", k + 1)))
        })
        .collect()
}

/// `_encode_vae_image` + packing for pictures already at the VAE size: posterior mode, normalised, packed.
pub fn encode_references(
    vae: &AutoencoderKLQwenImage,
    pictures: &[Image8],
    device: &Device,
) -> Result<ReferenceLatents> {
    let mut zs = Vec::with_capacity(pictures.len());
    for (k, p) in pictures.iter().enumerate() {
        if p.channels != 3 {
            return Err(err(format!(
                "picture {}: expected RGB, got {} channels",
                k + 1,
                p.channels
            )));
        }
        let x = from_rgb8(&p.data, p.width, p.height, device)?; // [1, 3, H, W] in [-1, 1]
        let posterior = vae.encode(&x)?;
        zs.push(vae.normalize(posterior.mode())?); // [1, z, 1, h, w]
    }
    ReferenceLatents::from_unpacked(&zs)
}
