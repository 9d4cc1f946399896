//! Bounded fuzzing of the Decode and Encode request validators: mutated encodings of valid requests never
//! panic, and what validates matches its declared shape.

use std::time::Duration;

use qwen_image_common::tensor::from_f32;
use qwen_image_proto::v1::{DecodeRequest, EncodeImageRequest, Image};
use qwen_image_testkit::fuzz;
use qwen_image_vae::validate::{VaeShape, validate_decode, validate_encode};

const V: VaeShape = VaeShape {
    z_dim: 16,
    scale_factor: 8,
};

#[test]
fn mutated_vae_requests_never_panic() {
    let decode = DecodeRequest {
        latents: Some(from_f32(&[1, 16, 1, 2, 3], &[0.1; 96])),
        return_float: true,
    };
    let encode = EncodeImageRequest {
        images: vec![Image {
            width_px: 16,
            height_px: 8,
            rgb8: vec![7; 16 * 8 * 3].into(),
        }],
        posterior_noise: Some(from_f32(&[2, 16, 1, 1, 2], &[0.5; 64])),
    };
    let cases = fuzz::run(51, Duration::from_secs(4), 20_000, |rng| {
        if rng.below(2) == 0 {
            if let Some(r) = fuzz::mutated(rng, &decode)
                && let Ok(d) = validate_decode(&r, V)
            {
                assert_eq!(
                    d.latents.data.len(),
                    d.latents.shape.iter().product::<usize>()
                );
            }
        } else if let Some(r) = fuzz::mutated(rng, &encode)
            && let Ok(e) = validate_encode(&r, V)
        {
            let px = e.width_px * e.height_px * 3;
            assert!(e.images.iter().all(|i| i.len() == px));
        }
    });
    assert!(cases > 100, "only {cases} cases ran");
}
