//! Bounded fuzzing of the gateway's request validators: mutated encodings of valid requests of every flow
//! (pictures, masks, pose JSON and settings included) decode and validate without panicking, and what
//! validates stays within the size limits.

use std::io::Cursor;
use std::time::Duration;

use qwen_image_gateway::request::settings::Limits;
use qwen_image_gateway::request::{Geometry, cn_inpaint, edit, pose, t2i};
use qwen_image_proto::v1::pose_request::Pose;
use qwen_image_proto::v1::{
    ControlNetInpaintRequest, ControlNetSettings, GenerationSettings, Img2ImgRequest,
    InpaintRequest, OutpaintRequest, PoseRequest, TextToImageRequest,
};
use qwen_image_testkit::fuzz;

const G: Geometry = Geometry {
    latent_channels: 16,
    vae_scale_factor: 8,
    patch_size: 2,
    max_pixels: 4096 * 4096,
};
const POSE: &str = include_str!("../../../docs/pose-example.json");

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(Cursor::new(&mut out), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().expect("header");
    let data: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
    writer.write_image_data(&data).expect("data");
    writer.finish().expect("finish");
    out
}

fn settings() -> GenerationSettings {
    GenerationSettings {
        prompt: "a cat".into(),
        width_px: 64,
        height_px: 64,
        steps: 4,
        ..Default::default()
    }
}

#[test]
fn mutated_requests_of_every_flow_never_panic() {
    let picture = png(32, 32);
    let control = Some(ControlNetSettings {
        controlnet_id: "pose".into(),
        ..Default::default()
    });
    let seeds = (
        TextToImageRequest {
            settings: Some(settings()),
            initial_latents: None,
        },
        Img2ImgRequest {
            settings: Some(settings()),
            image: picture.clone().into(),
            strength: Some(0.6),
        },
        InpaintRequest {
            settings: Some(settings()),
            image: picture.clone().into(),
            mask: picture.clone().into(),
            strength: Some(0.9),
            paste_back: true,
        },
        OutpaintRequest {
            settings: Some(settings()),
            image: picture.clone().into(),
            left_px: 16,
            ..Default::default()
        },
        PoseRequest {
            settings: Some(settings()),
            pose: Some(Pose::KeypointsJson(POSE.into())),
            control: control.clone(),
        },
        ControlNetInpaintRequest {
            settings: Some(settings()),
            image: picture.clone().into(),
            mask: picture.into(),
            control,
        },
    );
    let limits = Limits::default();
    let cases = fuzz::run(31, Duration::from_secs(8), 20_000, |rng| {
        let size = match rng.below(6) {
            0 => fuzz::mutated(rng, &seeds.0)
                .and_then(|r| t2i::validate(r, &G, &limits, 1).ok())
                .map(|p| (p.settings.width_px, p.settings.height_px)),
            1 => fuzz::mutated(rng, &seeds.1)
                .and_then(|r| edit::validate_img2img(r, &G, &limits, 1).ok())
                .map(|p| (p.settings.width_px, p.settings.height_px)),
            2 => fuzz::mutated(rng, &seeds.2)
                .and_then(|r| edit::validate_inpaint(r, &G, &limits, 1).ok())
                .map(|p| (p.settings.width_px, p.settings.height_px)),
            3 => fuzz::mutated(rng, &seeds.3)
                .and_then(|r| edit::validate_outpaint(r, &G, &limits, 1).ok())
                .map(|p| (p.settings.width_px, p.settings.height_px)),
            4 => fuzz::mutated(rng, &seeds.4)
                .and_then(|r| pose::validate_pose(r, &G, &limits, 1).ok())
                .map(|p| (p.settings.width_px, p.settings.height_px)),
            _ => fuzz::mutated(rng, &seeds.5)
                .and_then(|r| cn_inpaint::validate_cn_inpaint(r, &G, &limits, 1).ok())
                .map(|p| (p.settings.width_px, p.settings.height_px)),
        };
        if let Some((w, h)) = size {
            assert!(
                w <= limits.max_side_px && h <= limits.max_side_px,
                "{w}x{h}"
            );
        }
    });
    assert!(cases > 50, "only {cases} cases ran");
}
