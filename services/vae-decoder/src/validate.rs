//! Checks Decode / Encode requests; every problem is INVALID_ARGUMENT naming the field.

use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::tensor::{self, HostTensor, TensorError, expect_dim, required};
use qwen_image_proto::v1::{DataType, DecodeRequest, EncodeImageRequest};

use qwen_image_common::stage::StageError;

/// Most images per request.
pub const MAX_BATCH: usize = 16;
/// Largest image side in pixels.
pub const MAX_SIDE_PX: usize = 4096;
/// Room left in a response for everything but the payload.
const RESPONSE_SLACK_BYTES: usize = 1 << 20;

/// What requests are checked against (from `vae/config.json`).
#[derive(Debug, Clone, Copy)]
pub struct VaeShape {
    /// Latent channels (`z_dim`).
    pub z_dim: usize,
    /// Pixels per latent cell along each side (2 ** len(temperal_downsample): 8, or 4 for 3-level VAEs).
    pub scale_factor: usize,
}

/// A checked decode request: normalised latents `[B, C, h, w]`.
#[derive(Debug, Clone)]
pub struct DecodeInputs {
    pub latents: HostTensor<f32>,
    pub return_float: bool,
}

/// A checked encode request: RGB8 HWC images of one size, and the posterior noise if sampling.
#[derive(Debug, Clone)]
pub struct EncodeInputs {
    pub width_px: usize,
    pub height_px: usize,
    pub images: Vec<Vec<u8>>,
    /// `[N, C, 1, h, w]`, N a multiple of the number of images; `None` = the posterior mean.
    pub noise: Option<HostTensor<f32>>,
}

fn invalid(msg: String) -> StageError {
    StageError::InvalidArgument(msg)
}

pub fn validate_decode(req: &DecodeRequest, vae: VaeShape) -> Result<DecodeInputs, StageError> {
    let field = "latents";
    let mut h = tensor::to_f32(
        required(req.latents.as_ref(), field)?,
        field,
        &[DataType::F32],
        &[4, 5],
    )?;
    if h.rank() == 5 {
        expect_dim(field, &h.shape, 2, "frames", 1)?;
        h.shape = vec![h.shape[0], h.shape[1], h.shape[3], h.shape[4]];
    }
    expect_dim(
        field,
        &h.shape,
        1,
        "latent channels = the VAE's z_dim",
        vae.z_dim,
    )?;
    let (b, lh, lw) = (h.shape[0], h.shape[2], h.shape[3]);
    if b == 0 || b > MAX_BATCH {
        return Err(
            TensorError::new(field, format!("batch size is {b}; send 1..={MAX_BATCH}")).into(),
        );
    }
    let max_latent = MAX_SIDE_PX / vae.scale_factor;
    if lh == 0 || lw == 0 || lh > max_latent || lw > max_latent {
        return Err(TensorError::new(
            field,
            format!("latent grid is {lh}x{lw}; each side must be in 1..={max_latent}"),
        )
        .into());
    }
    let pixels = b * lh * lw * vae.scale_factor * vae.scale_factor;
    let response_bytes = pixels * 3 + if req.return_float { pixels * 3 * 4 } else { 0 };
    if response_bytes > MAX_MESSAGE_BYTES - RESPONSE_SLACK_BYTES {
        return Err(invalid(format!(
            "the response would be {response_bytes} bytes, over the {MAX_MESSAGE_BYTES}-byte message limit; \
             send fewer latents per request or leave return_float unset"
        )));
    }
    Ok(DecodeInputs {
        latents: h,
        return_float: req.return_float,
    })
}

pub fn validate_encode(
    req: &EncodeImageRequest,
    vae: VaeShape,
) -> Result<EncodeInputs, StageError> {
    let n = req.images.len();
    if n == 0 || n > MAX_BATCH {
        return Err(invalid(format!(
            "`images` has {n} entries; send 1..={MAX_BATCH}"
        )));
    }
    let (w, h) = (
        req.images[0].width_px as usize,
        req.images[0].height_px as usize,
    );
    let f = vae.scale_factor;
    if w == 0
        || h == 0
        || w > MAX_SIDE_PX
        || h > MAX_SIDE_PX
        || !w.is_multiple_of(f)
        || !h.is_multiple_of(f)
    {
        return Err(invalid(format!(
            "`images[0]` is {w}x{h} px; width and height must be multiples of {f} in {f}..={MAX_SIDE_PX}"
        )));
    }
    let mut images = Vec::with_capacity(n);
    for (i, img) in req.images.iter().enumerate() {
        if (img.width_px as usize, img.height_px as usize) != (w, h) {
            return Err(invalid(format!(
                "`images[{i}]` is {}x{} px but images[0] is {w}x{h}; send images of one size",
                img.width_px, img.height_px
            )));
        }
        if img.rgb8.len() != w * h * 3 {
            return Err(invalid(format!(
                "`images[{i}].rgb8` holds {} bytes; a {w}x{h} RGB8 image needs {}",
                img.rgb8.len(),
                w * h * 3
            )));
        }
        images.push(img.rgb8.to_vec());
    }
    let noise = match &req.posterior_noise {
        None => None,
        Some(t) => Some(posterior_noise(t, n, [vae.z_dim, h / f, w / f])?),
    };
    Ok(EncodeInputs {
        width_px: w,
        height_px: h,
        images,
        noise,
    })
}

/// `posterior_noise`: F32 `[N, C, 1, h, w]` for `images` images (N a multiple of it, at most
/// [`MAX_BATCH`]), finite.
fn posterior_noise(
    t: &qwen_image_proto::v1::Tensor,
    images: usize,
    [c, h, w]: [usize; 3],
) -> Result<HostTensor<f32>, StageError> {
    let field = "posterior_noise";
    let noise = tensor::to_f32(t, field, &[DataType::F32], &[5])?;
    let s = &noise.shape;
    let n = s[0];
    if s[1..] != [c, 1, h, w] || n == 0 || n % images != 0 || n > MAX_BATCH {
        return Err(invalid(format!(
            "`{field}` has shape {s:?}; send [N, {c}, 1, {h}, {w}] with N a multiple of the {images} image(s), at most {MAX_BATCH}"
        )));
    }
    if let Some(i) = noise.data.iter().position(|v| !v.is_finite()) {
        return Err(invalid(format!(
            "`{field}` element {i} is {}; send finite values",
            noise.data[i]
        )));
    }
    Ok(noise)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_image_common::tensor::from_f32;
    use qwen_image_proto::v1::Image;

    const V: VaeShape = VaeShape {
        z_dim: 16,
        scale_factor: 8,
    };

    #[test]
    fn decode_checks() {
        let ok = DecodeRequest {
            latents: Some(from_f32(&[1, 16, 1, 2, 3], &[0.0; 96])),
            return_float: true,
        };
        assert_eq!(
            validate_decode(&ok, V).expect("valid").latents.shape,
            vec![1, 16, 2, 3]
        );
        let bad = DecodeRequest {
            latents: Some(from_f32(&[1, 15, 2, 3], &[0.0; 90])),
            return_float: false,
        };
        assert!(validate_decode(&bad, V).is_err());
        let frames = DecodeRequest {
            latents: Some(from_f32(&[1, 16, 2, 1, 3], &[0.0; 96])),
            return_float: false,
        };
        assert!(validate_decode(&frames, V).is_err());
    }

    #[test]
    fn encode_checks() {
        let img = |w: u32, h: u32, n: usize| Image {
            width_px: w,
            height_px: h,
            rgb8: vec![0; n].into(),
        };
        assert!(
            validate_encode(
                &EncodeImageRequest {
                    images: vec![img(8, 16, 8 * 16 * 3)],
                    ..Default::default()
                },
                V
            )
            .is_ok()
        );
        assert!(
            validate_encode(
                &EncodeImageRequest {
                    images: vec![img(9, 16, 9 * 16 * 3)],
                    ..Default::default()
                },
                V
            )
            .is_err()
        );
        assert!(
            validate_encode(
                &EncodeImageRequest {
                    images: vec![img(8, 8, 10)],
                    ..Default::default()
                },
                V
            )
            .is_err()
        );
        assert!(
            validate_encode(
                &EncodeImageRequest {
                    images: vec![img(8, 8, 192), img(16, 8, 384)],
                    ..Default::default()
                },
                V
            )
            .is_err()
        );
        assert!(validate_encode(&EncodeImageRequest::default(), V).is_err());
        let with_noise = |shape: &[usize]| EncodeImageRequest {
            images: vec![img(16, 8, 16 * 8 * 3)],
            posterior_noise: Some(from_f32(shape, &vec![0.5; shape.iter().product()])),
        };
        let ok = validate_encode(&with_noise(&[3, 16, 1, 1, 2]), V).expect("valid");
        assert_eq!(ok.noise.map(|n| n.shape), Some(vec![3, 16, 1, 1, 2]));
        assert!(validate_encode(&with_noise(&[1, 16, 1, 2, 1]), V).is_err());
        assert!(validate_encode(&with_noise(&[1, 8, 1, 1, 2]), V).is_err());
        assert!(validate_encode(&with_noise(&[17, 16, 1, 1, 2]), V).is_err());
        let mut nan = with_noise(&[1, 16, 1, 1, 2]);
        nan.posterior_noise = Some(from_f32(&[1, 16, 1, 1, 2], &[f32::NAN; 32]));
        assert!(validate_encode(&nan, V).is_err());
    }
}
