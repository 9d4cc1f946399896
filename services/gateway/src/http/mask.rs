//! OpenAI's edit mask to the gRPC API's: OpenAI marks the area to repaint with transparency (alpha 0); the
//! gRPC API with white on black. Both are accepted: when the mask has any pixel that is not fully opaque, the
//! alpha channel decides (alpha < 128 = repaint) and the colours are ignored; otherwise (no alpha channel, or
//! all opaque) the grey level decides (>= 128 = repaint).

use image::{DynamicImage, GenericImageView};

use super::error::ApiError;

/// The mask as a white-on-black grayscale PNG (white = repaint), same size as given.
pub fn to_white_on_black(bytes: &[u8]) -> Result<Vec<u8>, ApiError> {
    let img = image::load_from_memory(bytes).map_err(|e| {
        ApiError::bad_param(
            "mask",
            format!("mask is not a readable PNG or JPEG ({e}): send a PNG the size of the image"),
        )
    })?;
    let (w, h) = img.dimensions();
    let by_alpha = img.color().has_alpha() && img.to_rgba8().pixels().any(|p| p.0[3] < 255);
    let gray: Vec<u8> = if by_alpha {
        img.to_rgba8()
            .pixels()
            .map(|p| if p.0[3] < 128 { 255 } else { 0 })
            .collect()
    } else {
        img.to_luma8()
            .pixels()
            .map(|p| if p.0[0] >= 128 { 255 } else { 0 })
            .collect()
    };
    let out = image::GrayImage::from_raw(w, h, gray)
        .ok_or_else(|| ApiError::bad_param("mask", "mask has no pixels"))?;
    let mut png = Vec::new();
    DynamicImage::ImageLuma8(out)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot re-encode the mask: {e}"),
                "internal",
            )
        })?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .expect("encode");
        out
    }

    fn decoded(bytes: &[u8]) -> Vec<u8> {
        image::load_from_memory(bytes)
            .expect("png")
            .to_luma8()
            .into_raw()
    }

    #[test]
    fn transparent_means_repaint_and_wins_over_colour() {
        // Left pixel transparent white, right pixel opaque white: alpha decides, so only the left repaints.
        let rgba = image::RgbaImage::from_raw(2, 1, vec![255, 255, 255, 0, 255, 255, 255, 255])
            .expect("2x1");
        assert_eq!(
            decoded(&to_white_on_black(&png(DynamicImage::ImageRgba8(rgba))).expect("ok")),
            vec![255, 0]
        );
    }

    #[test]
    fn opaque_masks_use_the_grey_level() {
        let rgba =
            image::RgbaImage::from_raw(2, 1, vec![0, 0, 0, 255, 250, 250, 250, 255]).expect("2x1");
        assert_eq!(
            decoded(&to_white_on_black(&png(DynamicImage::ImageRgba8(rgba))).expect("ok")),
            vec![0, 255]
        );
        let l = image::GrayImage::from_raw(2, 1, vec![200, 10]).expect("2x1");
        assert_eq!(
            decoded(&to_white_on_black(&png(DynamicImage::ImageLuma8(l))).expect("ok")),
            vec![255, 0]
        );
        assert!(to_white_on_black(b"not a picture").is_err());
    }
}
