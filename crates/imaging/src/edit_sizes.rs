//! Picture sizes of the instruction-editing pipeline, diffusers 0.42.1
//! `pipelines/qwenimage/pipeline_qwenimage_edit_plus.py` (`QwenImageEditPlusPipeline`): each input picture is
//! resized twice with the same aspect ratio: to about [`CONDITION_IMAGE_SIZE`] pixels for the text encoder's vision
//! tower and to about [`VAE_IMAGE_SIZE`] pixels for the VAE (reference latents); the output size defaults to about
//! [`DEFAULT_OUTPUT_AREA`] pixels with the aspect ratio of the LAST picture. Pure arithmetic, shared by the gateway
//! (which resizes) and the model crate.

/// `CONDITION_IMAGE_SIZE = 384 * 384`: area of the pictures given to the text encoder (Qwen2-VL processor).
pub const CONDITION_IMAGE_SIZE: u64 = 384 * 384;
/// `VAE_IMAGE_SIZE = 1024 * 1024`: area of the pictures VAE-encoded into reference latents.
pub const VAE_IMAGE_SIZE: u64 = 1024 * 1024;
/// `calculate_dimensions(1024 * 1024, ...)` in `__call__`: area of the default output size.
pub const DEFAULT_OUTPUT_AREA: u64 = 1024 * 1024;
/// `calculate_dimensions` rounds both sides to multiples of 32.
pub const SIZE_MULTIPLE: u64 = 32;

/// `calculate_dimensions(target_area, ratio)` with `ratio = width / height` of the picture → `(width, height)`:
/// `width = sqrt(area · ratio)`, `height = width / ratio`, each rounded to a multiple of 32 with Python's
/// `round` (half to even). Errors when a side rounds to 0 (an aspect ratio beyond about `area / 256 : 1`).
pub fn calculate_dimensions(
    target_area: u64,
    width: usize,
    height: usize,
) -> Result<(usize, usize), String> {
    if width == 0 || height == 0 {
        return Err(format!("the picture is empty ({width}x{height})"));
    }
    let ratio = width as f64 / height as f64;
    let w = (target_area as f64 * ratio).sqrt();
    let h = w / ratio;
    let m = SIZE_MULTIPLE as f64;
    let (w, h) = ((w / m).round_ties_even() * m, (h / m).round_ties_even() * m);
    if w < 1.0 || h < 1.0 {
        return Err(format!(
            "a {width}x{height} picture is too elongated: resized to an area of {target_area} pixels, one side \
             rounds to 0 (keep the aspect ratio within about {}:1)",
            target_area / (SIZE_MULTIPLE * SIZE_MULTIPLE / 4)
        ));
    }
    Ok((w as usize, h as usize))
}

/// Size `(width, height)` the pipeline gives the text encoder for a `width x height` picture
/// (`calculate_dimensions(CONDITION_IMAGE_SIZE, w / h)`, then `VaeImageProcessor.resize`, LANCZOS).
pub fn condition_size(width: usize, height: usize, area: u64) -> Result<(usize, usize), String> {
    calculate_dimensions(area, width, height)
}

/// Size `(width, height)` the pipeline VAE-encodes a `width x height` picture at
/// (`calculate_dimensions(VAE_IMAGE_SIZE, w / h)`, then `VaeImageProcessor.preprocess`, which floors both sides
/// to a multiple of `2 · vae_scale_factor` before its LANCZOS resize).
pub fn vae_size(
    width: usize,
    height: usize,
    area: u64,
    vae_scale_factor: usize,
) -> Result<(usize, usize), String> {
    let (w, h) = calculate_dimensions(area, width, height)?;
    floor_to(w, h, 2 * vae_scale_factor)
}

/// The output size `(width, height)` when the request names none: `calculate_dimensions(1024 * 1024, w / h)` of
/// the LAST picture, floored to a multiple of `2 · vae_scale_factor` (what `__call__` does with `height or ...`).
pub fn default_output_size(
    last_width: usize,
    last_height: usize,
    vae_scale_factor: usize,
) -> Result<(usize, usize), String> {
    let (w, h) = calculate_dimensions(DEFAULT_OUTPUT_AREA, last_width, last_height)?;
    floor_to(w, h, 2 * vae_scale_factor)
}

fn floor_to(w: usize, h: usize, multiple: usize) -> Result<(usize, usize), String> {
    if multiple == 0 {
        return Err("the VAE scale factor must be positive".to_string());
    }
    let (w, h) = (w / multiple * multiple, h / multiple * multiple);
    if w == 0 || h == 0 {
        return Err(format!(
            "the size rounds to {w}x{h} at a multiple of {multiple}"
        ));
    }
    Ok((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sizes() {
        // 4:3 -> 1184x896 for the VAE (refharness: vae_sizes of a 120x90 picture), 448x320 for the text encoder
        assert_eq!(vae_size(120, 90, VAE_IMAGE_SIZE, 8), Ok((1184, 896)));
        assert_eq!(
            condition_size(120, 90, CONDITION_IMAGE_SIZE),
            Ok((448, 320))
        );
        assert_eq!(calculate_dimensions(1024 * 1024, 1, 1), Ok((1024, 1024)));
        assert_eq!(default_output_size(90, 120, 8), Ok((896, 1184)));
        // small areas used by the test fixtures (ref_edit.py --condition-area 28672 --vae-area 16384)
        assert_eq!(condition_size(80, 56, 28672), Ok((192, 128)));
        assert_eq!(vae_size(80, 56, 16384, 8), Ok((160, 96)));
        assert!(calculate_dimensions(CONDITION_IMAGE_SIZE, 2000, 1).is_err());
        assert!(calculate_dimensions(CONDITION_IMAGE_SIZE, 0, 10).is_err());
    }
}
