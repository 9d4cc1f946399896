//! Bounded fuzzing of the Denoise request validator: mutated encodings of valid requests (with CFG,
//! explicit sigmas, inpainting and a ControlNet input) never panic, and what validates is consistent.

use std::time::Duration;

use qwen_image_common::tensor::from_f32;
use qwen_image_denoiser::validate::{ControlNetInfo, ModelShape, validate_with_controlnets};
use qwen_image_proto::v1::{ControlInput, DenoiseRequest, InpaintInputs};
use qwen_image_testkit::fuzz;

const M: ModelShape = ModelShape {
    joint_attention_dim: 4,
    latent_channels: 16,
};

#[test]
fn mutated_denoise_requests_never_panic() {
    let lat = || Some(from_f32(&[1, 16, 2, 2], &[0.1; 64]));
    let seeds = [
        DenoiseRequest {
            prompt_embeds: Some(from_f32(&[1, 3, 4], &[0.5; 12])),
            negative_prompt_embeds: Some(from_f32(&[1, 2, 4], &[0.5; 8])),
            true_cfg_scale: 4.0,
            latents: lat(),
            steps: 4,
            preview_every_n_steps: 2,
            ..Default::default()
        },
        DenoiseRequest {
            prompt_embeds: Some(from_f32(&[1, 3, 4], &[0.5; 12])),
            prompt_embeds_mask: Some(from_f32(&[1, 3], &[1.0, 1.0, 0.0])),
            latents: lat(),
            sigmas: vec![1.0, 0.5, 0.25],
            start_step: 1,
            start_noise: lat(),
            inpaint: Some(InpaintInputs {
                image_latents: lat(),
                noise: lat(),
                mask: lat(),
            }),
            control: vec![ControlInput {
                controlnet_id: "pose".into(),
                control_latents: lat(),
                conditioning_scale: 1.0,
                guidance_end: 1.0,
                ..Default::default()
            }],
            ..Default::default()
        },
    ];
    let nets = [ControlNetInfo {
        id: "pose".into(),
        cond_channels: 64,
        takes_mask: false,
    }];
    let cases = fuzz::run(41, Duration::from_secs(5), 20_000, |rng| {
        let seed = &seeds[rng.below(seeds.len())];
        if let Some(req) = fuzz::mutated(rng, seed)
            && let Ok(inputs) = validate_with_controlnets(&req, M, &nets)
        {
            let s = &inputs.latents.shape;
            assert_eq!(inputs.latents.data.len(), s.iter().product::<usize>());
            assert!(inputs.start_step < inputs.schedule.steps());
        }
    });
    assert!(cases > 100, "only {cases} cases ran");
}
