//! What the ControlNet flows share: `ControlNetSettings` → [`ControlOptions`], and the output size that
//! defaults to the control picture's own.

use qwen_image_proto::v1::ControlNetSettings;

use super::{Geometry, Limits, invalid};
use crate::error::GatewayError;

/// diffusers' default `controlnet_conditioning_scale`.
pub const DEFAULT_CONDITIONING_SCALE: f32 = 1.0;
/// Largest conditioning scale accepted.
pub const MAX_CONDITIONING_SCALE: f32 = 10.0;

/// Which ControlNet runs and how, with defaults (scale 1.0, window 0..1) filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlOptions {
    /// Empty = the denoiser's only ControlNet.
    pub controlnet_id: String,
    pub conditioning_scale: f32,
    pub guidance_start: f32,
    pub guidance_end: f32,
}

impl ControlOptions {
    /// PNG text chunks describing the control (`mode` says which kind).
    pub fn chunks(&self, mode: (&str, &str)) -> Vec<(String, String)> {
        vec![
            (
                "controlnet".into(),
                if self.controlnet_id.is_empty() {
                    "(default)".into()
                } else {
                    self.controlnet_id.clone()
                },
            ),
            (mode.0.into(), mode.1.into()),
            (
                "controlnet_conditioning_scale".into(),
                self.conditioning_scale.to_string(),
            ),
            (
                "control_guidance_start".into(),
                self.guidance_start.to_string(),
            ),
            ("control_guidance_end".into(), self.guidance_end.to_string()),
        ]
    }
}

/// Checks the ControlNet settings and fills their defaults.
pub fn options(c: Option<ControlNetSettings>) -> Result<ControlOptions, GatewayError> {
    let c = c.unwrap_or_default();
    let conditioning_scale = c.conditioning_scale.unwrap_or(DEFAULT_CONDITIONING_SCALE);
    if !conditioning_scale.is_finite()
        || !(0.0..=MAX_CONDITIONING_SCALE).contains(&conditioning_scale)
    {
        return Err(invalid(format!(
            "conditioning_scale {conditioning_scale} is not allowed; send 0..={MAX_CONDITIONING_SCALE} (e.g. 0.8-1.0)"
        )));
    }
    let guidance_start = c.guidance_start.unwrap_or(0.0);
    let guidance_end = c.guidance_end.unwrap_or(1.0);
    if !(guidance_start.is_finite()
        && guidance_end.is_finite()
        && 0.0 <= guidance_start
        && guidance_start < guidance_end
        && guidance_end <= 1.0)
    {
        return Err(invalid(format!(
            "control guidance window [{guidance_start}, {guidance_end}] is not allowed; send \
             0 <= guidance_start < guidance_end <= 1"
        )));
    }
    Ok(ControlOptions {
        controlnet_id: c.controlnet_id,
        conditioning_scale,
        guidance_start,
        guidance_end,
    })
}

/// The output side: the request's, or the control picture's own floored to the size multiple.
pub fn side(
    name: &str,
    requested: u32,
    own: usize,
    g: &Geometry,
    limits: &Limits,
) -> Result<u32, GatewayError> {
    if requested != 0 {
        return Ok(requested);
    }
    let floored = g.floor_to_multiple(own as u32);
    if floored == 0 || floored > limits.max_side_px {
        return Err(invalid(format!(
            "the control picture is {own} px along {name}, which gives no usable default size (multiples of \
             {} up to {}); send {name} explicitly",
            g.size_multiple(),
            limits.max_side_px
        )));
    }
    Ok(floored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_and_checks_options() {
        let o = options(None).expect("defaults");
        assert_eq!(
            (o.conditioning_scale, o.guidance_start, o.guidance_end),
            (1.0, 0.0, 1.0)
        );
        let bad = |c: ControlNetSettings| match options(Some(c)) {
            Err(GatewayError::InvalidArgument(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(
            bad(ControlNetSettings {
                conditioning_scale: Some(f32::NAN),
                ..Default::default()
            })
            .contains("conditioning_scale")
        );
        assert!(
            bad(ControlNetSettings {
                guidance_start: Some(0.6),
                guidance_end: Some(0.5),
                ..Default::default()
            })
            .contains("guidance")
        );
    }
}
