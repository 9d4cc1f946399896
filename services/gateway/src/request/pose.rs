//! `PoseRequest` → [`PoseParams`]: the pose picture or OpenPose keypoints as the control image at the
//! output size (LANCZOS, or the skeleton rendered as controlnet-aux draws it), diffusers
//! QwenImageControlNetPipeline's preprocessing (denoiser-and-pipelines.md §9).

use qwen_image_imaging::Image8;
use qwen_image_imaging::openpose::{parse_openpose_json, render};
use qwen_image_imaging::resize::lanczos_resize;
use qwen_image_proto::v1::{PoseRequest, pose_request};

use super::control::{self, ControlOptions};
use super::settings::{self, Settings};
use super::{Geometry, Limits, invalid};
use crate::error::GatewayError;
use crate::images;

/// Longest keypoints JSON, in bytes.
pub const MAX_KEYPOINTS_JSON_BYTES: usize = 4 << 20;

/// Where the control image came from (for logs and PNG metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoseSource {
    PoseImage,
    KeypointsJson,
}

impl PoseSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PoseImage => "pose_image",
            Self::KeypointsJson => "keypoints_json",
        }
    }
}

/// A validated pose request.
#[derive(Debug, Clone)]
pub struct PoseParams {
    /// The common settings, with the output size resolved.
    pub settings: Settings,
    /// The control image, RGB8 at the output size (already resized / rendered).
    pub control: Image8,
    pub source: PoseSource,
    pub options: ControlOptions,
}

enum Pose {
    Image(Image8),
    Keypoints(qwen_image_imaging::openpose::PoseKeypoints),
}

/// Checks `req`, decodes / renders the control image at the output size and fills every default.
pub fn validate_pose(
    req: PoseRequest,
    g: &Geometry,
    limits: &Limits,
    fallback_seed: u64,
) -> Result<PoseParams, GatewayError> {
    let options = control::options(req.control)?;
    let s = req.settings.unwrap_or_default();
    let (control, source, width_px, height_px) = match req.pose {
        None => {
            return Err(invalid(
                "no pose: send `pose_image` (PNG/JPEG skeleton picture) or `keypoints_json` (OpenPose JSON)",
            ));
        }
        Some(pose_request::Pose::PoseImage(bytes)) => {
            let img = images::decode_rgb("pose_image", &bytes)?;
            let w = control::side("width_px", s.width_px, img.width, g, limits)?;
            let h = control::side("height_px", s.height_px, img.height, g, limits)?;
            (Pose::Image(img), PoseSource::PoseImage, w, h)
        }
        Some(pose_request::Pose::KeypointsJson(text)) => {
            if text.len() > MAX_KEYPOINTS_JSON_BYTES {
                return Err(invalid(format!(
                    "keypoints_json is {} bytes; send at most {MAX_KEYPOINTS_JSON_BYTES}",
                    text.len()
                )));
            }
            let or_default = |v: u32| if v == 0 { g.default_side_px() } else { v } as usize;
            let default_size = (or_default(s.width_px), or_default(s.height_px));
            let pose = parse_openpose_json(&text, Some(default_size))
                .map_err(|e| invalid(format!("keypoints_json: {e}")))?;
            let w = control::side("width_px", s.width_px, pose.canvas_width, g, limits)?;
            let h = control::side("height_px", s.height_px, pose.canvas_height, g, limits)?;
            (Pose::Keypoints(pose), PoseSource::KeypointsJson, w, h)
        }
        Some(pose_request::Pose::ReferenceImage(_)) => {
            // crate::reference_pose::resolve turns it into keypoints_json before validation
            return Err(GatewayError::Internal(
                "reference_image reached validation unresolved".into(),
            ));
        }
    };
    let settings = settings::convert(
        s,
        (width_px, height_px),
        "the pose's own size",
        g,
        limits,
        fallback_seed,
    )?;
    let (w, h) = (settings.width_px as usize, settings.height_px as usize);
    let control = match control {
        // Drawn at the output size, as controlnet-aux draws at its detect_resolution.
        Pose::Keypoints(pose) => render(&pose, w, h, true, true),
        // image_processor.preprocess(control_image, height, width): PIL LANCZOS resize to W x H.
        Pose::Image(img) => lanczos_resize(&img, w, h).map_err(invalid)?,
    };
    if (control.width, control.height) != (w, h) {
        return Err(GatewayError::Internal(format!(
            "control image is {}x{}, expected {w}x{h}",
            control.width, control.height
        )));
    }
    Ok(PoseParams {
        settings,
        control,
        source,
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().expect("header");
        wr.write_image_data(&vec![200u8; (w * h * 4) as usize])
            .expect("data");
        wr.finish().expect("finish");
        out
    }

    const G: Geometry = Geometry {
        latent_channels: 16,
        vae_scale_factor: 8,
        patch_size: 2,
        max_pixels: 0,
    };

    fn req(pose: pose_request::Pose) -> PoseRequest {
        PoseRequest {
            settings: Some(qwen_image_proto::v1::GenerationSettings {
                prompt: "a dancer".into(),
                ..Default::default()
            }),
            pose: Some(pose),
            ..Default::default()
        }
    }

    fn validate(r: PoseRequest) -> Result<PoseParams, GatewayError> {
        validate_pose(r, &G, &Limits::default(), 1)
    }

    fn sized(mut r: PoseRequest, w: u32, h: u32) -> PoseRequest {
        if let Some(s) = r.settings.as_mut() {
            (s.width_px, s.height_px) = (w, h);
        }
        r
    }

    fn err(r: PoseRequest) -> String {
        match validate(r) {
            Err(GatewayError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn pose_image_defaults_to_its_size_floored() {
        let p = validate(req(pose_request::Pose::PoseImage(png(70, 40).into()))).expect("valid");
        assert_eq!((p.settings.width_px, p.settings.height_px), (64, 32));
        assert_eq!((p.control.width, p.control.height), (64, 32));
        assert_eq!(p.control.data[..3], [200, 200, 200]);
        assert_eq!(
            (
                p.options.conditioning_scale,
                p.options.guidance_start,
                p.options.guidance_end
            ),
            (1.0, 0.0, 1.0)
        );
    }

    #[test]
    fn keypoints_render_at_the_requested_size() {
        let json = include_str!("../../../../docs/pose-example.json");
        let r = req(pose_request::Pose::KeypointsJson(json.into()));
        let p = validate(r.clone()).expect("valid");
        assert_eq!((p.settings.width_px, p.settings.height_px), (512, 768));
        let p = validate(sized(r, 64, 96)).expect("valid");
        assert_eq!((p.control.width, p.control.height), (64, 96));
        assert!(p.control.data.iter().any(|&v| v > 0), "skeleton drawn");
    }

    /// The gateway's skeleton for docs/pose-example.json at 64x96 is controlnet-aux's, pixel for pixel (the
    /// control picture diffusers got for refs/controlnet_pose_64x96, see tools/make_fixtures.sh).
    #[test]
    fn keypoints_render_like_controlnet_aux() {
        let json = include_str!("../../../../docs/pose-example.json");
        let r = sized(req(pose_request::Pose::KeypointsJson(json.into())), 64, 96);
        let ours = validate(r).expect("valid").control;
        let png = include_bytes!(
            "../../../../tests/fixtures/tiny/refs/controlnet_pose_64x96/input_control.png"
        );
        let theirs = images::decode_rgb("reference", png).expect("png");
        assert_eq!(ours, theirs);
    }

    #[test]
    fn rejects_bad_poses() {
        assert!(
            err(PoseRequest {
                settings: Some(qwen_image_proto::v1::GenerationSettings {
                    prompt: "x".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .contains("no pose")
        );
        assert!(
            err(req(pose_request::Pose::PoseImage(
                b"GIF89a....".to_vec().into()
            )))
            .contains("PNG or JPEG")
        );
        assert!(
            err(req(pose_request::Pose::PoseImage(b"hello".to_vec().into())))
                .contains("PNG or JPEG")
        );
        let mut truncated = png(32, 32);
        truncated.truncate(40);
        assert!(err(req(pose_request::Pose::PoseImage(truncated.into()))).contains("decoded"));
        assert!(
            err(req(pose_request::Pose::KeypointsJson("{not json".into())))
                .contains("keypoints_json")
        );
        let outside = r#"{"canvas_width":64,"canvas_height":64,"people":[{"pose_keypoints_2d":[10,10,1,300,10,1]}]}"#;
        assert!(
            err(req(pose_request::Pose::KeypointsJson(outside.into()))).contains("keypoints_json")
        );
        let mut r = req(pose_request::Pose::PoseImage(png(64, 64).into()));
        r.control = Some(qwen_image_proto::v1::ControlNetSettings {
            conditioning_scale: Some(f32::NAN),
            ..Default::default()
        });
        assert!(err(r).contains("conditioning_scale"));
        let r = req(pose_request::Pose::PoseImage(png(8, 64).into()));
        assert!(err(r).contains("width_px"));
    }
}
