//! Input pictures of every flow: the one PNG/JPEG decoder (one set of limits) into Pillow's modes, and
//! diffusers' preprocessing (`VaeImageProcessor`): LANCZOS resize to the working size, mask binarisation
//! and latent-grid downsampling, the outpaint canvas, and the optional paste-back of the kept pixels.

use std::io::Cursor;
use std::sync::{Condvar, Mutex};

use image::{DynamicImage, ImageFormat, ImageReader, Limits};
use qwen_image_imaging::{Image8, convert, mask, resize};

use crate::error::GatewayError;
use crate::geometry::Geometry;

/// Largest accepted input side in pixels, for every picture of every flow.
pub const MAX_INPUT_SIDE_PX: u32 = 4096;
/// Largest encoded input picture, for every picture field of every flow (a 4096x4096 photograph is about
/// 20-30 MiB as PNG, a few MiB as JPEG); it sizes the public message limit ([`crate::limits`]).
pub const MAX_PICTURE_BYTES: usize = 32 << 20;
/// Largest allocation the decoder may make for one picture (a 4096x4096 RGBA16 picture needs 128 MiB).
pub const MAX_DECODE_ALLOC_BYTES: u64 = 256 << 20;
/// Fill of the new outpaint area before VAE encoding: mid grey (0.0039 after `2x - 1`).
pub const OUTPAINT_FILL: u8 = 128;

fn invalid(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument(msg.into())
}

/// Pictures decoded at once across every request (each may hold up to [`MAX_DECODE_ALLOC_BYTES`]).
pub const DECODE_SLOTS: usize = 2;

/// A counting semaphore for the blocking threads that decode pictures.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

static DECODERS: Slots = Slots {
    free: Mutex::new(DECODE_SLOTS),
    freed: Condvar::new(),
};

/// One of the [`DECODE_SLOTS`], released when dropped.
struct DecodeSlot;

impl DecodeSlot {
    /// Waits (on the calling blocking thread) for a free slot.
    fn acquire() -> Self {
        let mut free = DECODERS.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = DECODERS.freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        DecodeSlot
    }
}

impl Drop for DecodeSlot {
    fn drop(&mut self) {
        *DECODERS.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        DECODERS.freed.notify_one();
    }
}

/// Checks that a JPEG holds all its pixels, then decodes it strictly (every scan complete, no marker out of
/// place) and drops the pixels: the image crate fills a cut or corrupt JPEG with grey instead of failing.
///
/// A header claiming more pixels than the file can hold is refused before any pixel is allocated: every
/// 8x8 luma block costs at least one bit of Huffman-coded data (its DC code, in baseline and progressive
/// JPEGs alike), so a JPEG of `w` x `h` pixels has at least `ceil(w/8)·ceil(h/8)/8` bytes.
fn check_jpeg(field: &str, bytes: &[u8]) -> Result<(), GatewayError> {
    let corrupt = |e: zune_jpeg::errors::DecodeErrors| {
        invalid(format!(
            "`{field}` is a cut or corrupt JPEG ({}); send the complete file",
            qwen_image_common::wire_guard::clip(&format!("{e:?}"), 200)
        ))
    };
    let options = zune_core::options::DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(MAX_INPUT_SIDE_PX as usize)
        .set_max_height(MAX_INPUT_SIDE_PX as usize);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(
        zune_core::bytestream::ZCursor::new(bytes),
        options,
    );
    decoder.decode_headers().map_err(corrupt)?;
    if let Some((w, h)) = decoder.dimensions() {
        let min_bytes = w.div_ceil(8) * h.div_ceil(8) / 8;
        if bytes.len() < min_bytes {
            return Err(invalid(format!(
                "`{field}` is a cut or corrupt JPEG: its header claims {w}x{h} px but the file has only {} \
                 bytes, fewer than the {min_bytes} such a picture needs; send the complete file",
                bytes.len()
            )));
        }
    }
    decoder.decode().map(drop).map_err(corrupt)
}

/// Decodes PNG or JPEG bytes; `field` names the request field in errors. At most [`DECODE_SLOTS`]
/// pictures are decoded at once (the caller's blocking thread waits for a slot), each within
/// [`MAX_INPUT_SIDE_PX`] per side and [`MAX_DECODE_ALLOC_BYTES`], whatever the flow.
pub fn decode(field: &str, bytes: &[u8]) -> Result<DynamicImage, GatewayError> {
    if bytes.is_empty() {
        return Err(invalid(format!(
            "`{field}` is empty; send the picture as PNG or JPEG bytes"
        )));
    }
    if bytes.len() > MAX_PICTURE_BYTES {
        return Err(invalid(format!(
            "`{field}` is {} MiB; send at most {} MiB (a JPEG, or a smaller picture)",
            bytes.len().div_ceil(1 << 20),
            MAX_PICTURE_BYTES >> 20
        )));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| invalid(format!("`{field}` cannot be read: {e}")))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => {}
        Some(f) => {
            return Err(invalid(format!(
                "`{field}` is {f:?}; send PNG or JPEG bytes"
            )));
        }
        None => {
            return Err(invalid(format!(
                "`{field}` is not a PNG or JPEG picture; send PNG or JPEG bytes"
            )));
        }
    }
    let _slot = DecodeSlot::acquire();
    if reader.format() == Some(ImageFormat::Jpeg) {
        check_jpeg(field, bytes)?;
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE_PX);
    limits.max_image_height = Some(MAX_INPUT_SIDE_PX);
    limits.max_alloc = Some(MAX_DECODE_ALLOC_BYTES);
    let mut reader = reader;
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => invalid(format!(
            "`{field}` is larger than {MAX_INPUT_SIDE_PX}x{MAX_INPUT_SIDE_PX} px; send a smaller picture"
        )),
        e => invalid(format!("`{field}` cannot be decoded: {e}")),
    })
}

/// PNG or JPEG bytes as RGB8 ([`decode`] then [`to_rgb`]).
pub fn decode_rgb(field: &str, bytes: &[u8]) -> Result<Image8, GatewayError> {
    to_rgb(&decode(field, bytes)?)
}

/// 16-bit samples to 8 bits by keeping the high byte (Pillow's `;16B` unpackers).
fn high_bytes(v: &[u16]) -> Vec<u8> {
    v.iter().map(|s| (s >> 8) as u8).collect()
}

/// `PIL.Image.convert("RGB")`: alpha dropped (not composited), grey replicated.
pub fn to_rgb(img: &DynamicImage) -> Result<Image8, GatewayError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data = match img {
        DynamicImage::ImageRgb16(b) => high_bytes(b.as_raw()),
        DynamicImage::ImageRgba16(b) => high_bytes(b.as_raw())
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        DynamicImage::ImageLuma16(b) => high_bytes(b.as_raw())
            .into_iter()
            .flat_map(|v| [v, v, v])
            .collect(),
        DynamicImage::ImageLumaA16(b) => high_bytes(b.as_raw())
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        // 8-bit RGB(A)/L(A) and anything else: the image crate drops alpha and replicates grey.
        other => other.to_rgb8().into_raw(),
    };
    Image8::new(w, h, 3, data).map_err(GatewayError::Internal)
}

/// `PIL.Image.convert("L")`: grey as is, colour by Pillow's fixed-point ITU-R 601-2 luma.
pub fn to_l(img: &DynamicImage) -> Result<Image8, GatewayError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    match img {
        DynamicImage::ImageLuma8(b) => {
            Image8::new(w, h, 1, b.as_raw().clone()).map_err(GatewayError::Internal)
        }
        DynamicImage::ImageLumaA8(b) => {
            let data = b.as_raw().chunks_exact(2).map(|p| p[0]).collect();
            Image8::new(w, h, 1, data).map_err(GatewayError::Internal)
        }
        other => convert::rgb_to_l(&to_rgb(other)?).map_err(GatewayError::Internal),
    }
}

/// The picture resized (LANCZOS, as Pillow) to the working size.
pub fn resize_to(img: &Image8, width: u32, height: u32) -> Result<Image8, GatewayError> {
    resize::lanczos_resize(img, width as usize, height as usize).map_err(GatewayError::Internal)
}

/// A mask prepared as QwenImageInpaintPipeline does.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedMask {
    /// {0, 1} per pixel of the working size (1 = repaint).
    pub pixels: Vec<u8>,
    /// {0, 1} per latent cell, `(height / 8) x (width / 8)`.
    pub latent: Vec<u8>,
}

/// Grey mask → LANCZOS to the working size → binarised at 0.5 → nearest to the latent grid.
pub fn prepare_mask(
    l: &Image8,
    width: u32,
    height: u32,
    geometry: &Geometry,
) -> Result<PreparedMask, GatewayError> {
    let resized = resize_to(l, width, height)?;
    let pixels = mask::binarize(&resized).map_err(GatewayError::Internal)?;
    if pixels.iter().all(|&v| v == 0) {
        return Err(invalid(
            "`mask` is all black at the working size: nothing to repaint; paint the area to change white",
        ));
    }
    let (lh, lw) = geometry.latent_hw(width, height);
    let f = geometry.vae_scale_factor;
    let latent = mask::to_latent_grid(&pixels, width as usize, height as usize, lw, lh)
        .map_err(GatewayError::Internal)?;
    if latent.iter().all(|&v| v == 0) {
        return Err(invalid(format!(
            "`mask` has no white pixel at the top-left corner of any {f}x{f} cell, so the model would change nothing; make the white area larger"
        )));
    }
    Ok(PreparedMask { pixels, latent })
}

/// Per-side padding in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pad {
    pub left: u32,
    pub right: u32,
    pub top: u32,
    pub bottom: u32,
}

/// The outpaint canvas: the image unscaled at (`left`, `top`), the rest `OUTPAINT_FILL`; the L mask is
/// 255 over the new area and 0 over the image.
pub fn outpaint_canvas(img: &Image8, pad: Pad) -> Result<(Image8, Image8), GatewayError> {
    let (iw, ih) = (img.width, img.height);
    let w = iw + (pad.left + pad.right) as usize;
    let h = ih + (pad.top + pad.bottom) as usize;
    let mut rgb = vec![OUTPAINT_FILL; w * h * 3];
    let mut m = vec![255u8; w * h];
    let (l, t) = (pad.left as usize, pad.top as usize);
    for y in 0..ih {
        let src = &img.data[y * iw * 3..(y + 1) * iw * 3];
        let row = (y + t) * w;
        rgb[(row + l) * 3..(row + l + iw) * 3].copy_from_slice(src);
        m[row + l..row + l + iw].fill(0);
    }
    Ok((
        Image8::new(w, h, 3, rgb).map_err(GatewayError::Internal)?,
        Image8::new(w, h, 1, m).map_err(GatewayError::Internal)?,
    ))
}

/// Keeps `original` where the mask is 0 (diffusers' `apply_overlay` at the working size).
pub fn paste_back(out: &mut [u8], original: &Image8, mask_px: &[u8]) -> Result<(), String> {
    if out.len() != original.data.len() || mask_px.len() * 3 != out.len() {
        return Err(format!(
            "paste-back sizes differ: {} output bytes, {} original bytes, {} mask pixels",
            out.len(),
            original.data.len(),
            mask_px.len()
        ));
    }
    for (i, &m) in mask_px.iter().enumerate() {
        if m == 0 {
            out[i * 3..i * 3 + 3].copy_from_slice(&original.data[i * 3..i * 3 + 3]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).expect("encode");
        out.into_inner()
    }

    #[test]
    fn decodes_pngs_into_pillow_modes() {
        let rgba = image::RgbaImage::from_fn(3, 2, |x, y| image::Rgba([x as u8, y as u8, 7, 0]));
        let d = decode("image", &png(DynamicImage::ImageRgba8(rgba))).expect("png");
        let rgb = to_rgb(&d).expect("rgb");
        assert_eq!((rgb.width, rgb.height, rgb.channels), (3, 2, 3));
        assert_eq!(rgb.pixel(2, 1), &[2, 1, 7]); // alpha 0 dropped, not composited
        let l16 = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(1, 1, vec![0x80ffu16])
            .expect("buffer");
        let d = decode("mask", &png(DynamicImage::ImageLuma16(l16))).expect("png");
        assert_eq!(to_rgb(&d).expect("rgb").data, vec![0x80; 3]);
        assert_eq!(to_l(&d).expect("l").data, vec![0x80]);
        let c = image::RgbImage::from_raw(1, 1, vec![255, 0, 0]).expect("buffer");
        let d = decode("mask", &png(DynamicImage::ImageRgb8(c))).expect("png");
        assert_eq!(to_l(&d).expect("l").data, vec![76]); // Pillow: (255*19595 + 0x8000) >> 16
    }

    #[test]
    fn decodes_jpeg() {
        let img = image::RgbImage::from_fn(16, 8, |x, _| image::Rgb([x as u8 * 16, 100, 200]));
        let mut out = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(img)
            .write_to(&mut out, ImageFormat::Jpeg)
            .expect("encode");
        let d = decode("image", out.get_ref()).expect("jpeg");
        let rgb = to_rgb(&d).expect("rgb");
        assert_eq!((rgb.width, rgb.height), (16, 8));
        // lossy, but close
        assert!(
            rgb.pixel(0, 0)[2].abs_diff(200) < 8,
            "{:?}",
            rgb.pixel(0, 0)
        );
    }

    #[test]
    fn rejects_unreadable_pictures() {
        let msg = |r: Result<DynamicImage, GatewayError>| match r {
            Err(GatewayError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        assert!(msg(decode("image", b"")).contains("empty"));
        assert!(msg(decode("image", b"hello")).contains("PNG or JPEG"));
        let mut truncated = png(DynamicImage::ImageRgb8(image::RgbImage::new(8, 8)));
        truncated.truncate(40);
        assert!(msg(decode("mask", &truncated)).contains("`mask` cannot be decoded"));
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 9]));
        let mut out = Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(img)
            .write_to(&mut out, ImageFormat::Jpeg)
            .expect("encode");
        out.into_inner()
    }

    #[test]
    fn rejects_cut_and_lying_jpegs() {
        let msg = |r: Result<DynamicImage, GatewayError>| match r {
            Err(GatewayError::InvalidArgument(m)) => m,
            Err(e) => panic!("expected InvalidArgument, got {e:?}"),
            Ok(img) => panic!(
                "expected InvalidArgument, got a {}x{} picture",
                img.width(),
                img.height()
            ),
        };
        // A JPEG cut in half (the image crate alone decodes it, filling the rest with grey).
        let mut cut = jpeg(64, 64);
        cut.truncate(cut.len() / 2);
        assert!(msg(decode("image", &cut)).contains("cut or corrupt JPEG"));
        // A small JPEG whose frame header claims 4000x4000.
        let mut lying = jpeg(16, 16);
        let sof = lying
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("baseline SOF0");
        // FF C0, length (2), precision (1), height (2), width (2)
        lying[sof + 5..sof + 9].copy_from_slice(&[0x0F, 0xA0, 0x0F, 0xA0]);
        assert!(msg(decode("image", &lying)).contains("cut or corrupt JPEG"));
        // The complete file still decodes.
        assert!(decode("image", &jpeg(64, 64)).is_ok());
    }

    /// Bounded fuzzing: mutated PNGs and JPEGs never panic, and what decodes is within the size limit.
    #[test]
    fn mutated_pictures_never_panic() {
        let seeds = [
            png(DynamicImage::ImageRgba8(image::RgbaImage::from_fn(
                24,
                16,
                |x, y| image::Rgba([x as u8, y as u8, 3, 200]),
            ))),
            jpeg(32, 24),
        ];
        let cases =
            qwen_image_testkit::fuzz::run(71, std::time::Duration::from_secs(5), 5_000, |rng| {
                let seed = &seeds[rng.below(seeds.len())];
                let bytes = rng.mutate(seed);
                if let Ok(img) = decode("image", &bytes) {
                    assert!(img.width() <= MAX_INPUT_SIDE_PX && img.height() <= MAX_INPUT_SIDE_PX);
                    let rgb = to_rgb(&img).expect("rgb");
                    assert_eq!(rgb.data.len(), rgb.width * rgb.height * 3);
                    to_l(&img).expect("l");
                }
            });
        assert!(cases > 100, "only {cases} cases ran");
    }

    const G: Geometry = Geometry {
        latent_channels: 16,
        vae_scale_factor: 8,
        patch_size: 2,
        max_pixels: 0,
    };

    #[test]
    fn masks_are_binarised_and_downsampled() {
        let mut l = Image8::new(16, 16, 1, vec![0; 256]).expect("image");
        let err = |r: Result<PreparedMask, GatewayError>| match r {
            Err(GatewayError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        assert!(err(prepare_mask(&l, 16, 16, &G)).contains("all black"));
        l.data[1] = 255; // white, but not the top-left pixel of a cell
        assert!(err(prepare_mask(&l, 16, 16, &G)).contains("top-left"));
        l.data[8 * 16 + 8] = 255;
        let m = prepare_mask(&l, 16, 16, &G).expect("mask");
        assert_eq!(m.latent, vec![0, 0, 0, 1]);
        assert_eq!(m.pixels.iter().map(|&v| v as usize).sum::<usize>(), 2);
    }

    #[test]
    fn builds_the_outpaint_canvas_and_pastes_back() {
        let img = Image8::new(2, 1, 3, vec![1, 2, 3, 4, 5, 6]).expect("image");
        let pad = Pad {
            left: 1,
            right: 0,
            top: 0,
            bottom: 1,
        };
        let (c, m) = outpaint_canvas(&img, pad).expect("canvas");
        assert_eq!((c.width, c.height), (3, 2));
        assert_eq!(c.pixel(0, 0), &[128; 3]);
        assert_eq!(c.pixel(1, 0), &[1, 2, 3]);
        assert_eq!(c.pixel(2, 0), &[4, 5, 6]);
        assert_eq!(m.data, vec![255, 0, 0, 255, 255, 255]);
        let mut out = vec![9u8; 18];
        let bin: Vec<u8> = m.data.iter().map(|&v| u8::from(v > 0)).collect();
        paste_back(&mut out, &c, &bin).expect("same sizes");
        assert_eq!(&out[..9], &[9, 9, 9, 1, 2, 3, 4, 5, 6]);
        assert!(paste_back(&mut out, &c, &bin[..2]).is_err());
    }
}
