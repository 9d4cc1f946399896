//! Deterministic random weights for the body network, generated identically by
//! `tools/openpose/make_body_fixtures.py` (`uniform()`, `random_state_dict()`): the parity fixtures need no
//! 200 MB weight file, and tests of the loader and the stage build a file of the real architecture on the fly.
//!
//! Value `i` of tensor `name`: `z = splitmix64(FNV-1a(name) ^ seed + i)`, `u = (z >> 40) / 2^24` (exact in f32),
//! `(2u - 1) * bound`, with `bound = sqrt(6 / fan_in)` for weights (He-uniform) and 0.05 for biases.

use std::collections::HashMap;

use candle_core::{Device, Result, Tensor};

/// Bias bound (make_body_fixtures.py `BIAS_BOUND`).
pub const BIAS_BOUND: f32 = 0.05;

fn fnv1a(s: &str) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// `n` values in [-1, 1) for `name`.
pub fn uniform(name: &str, n: usize, seed: u64) -> Vec<f32> {
    let base = fnv1a(name) ^ seed;
    (0..n as u64)
        .map(|i| {
            let x = base.wrapping_add(i).wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f32 * (1.0 / 16_777_216.0);
            u * 2.0 - 1.0
        })
        .collect()
}

/// Channel widths of a body network. [`BodyNetShape::CONTROLNET_AUX`] is `bodypose_model`; narrower shapes keep
/// its layer names, kernels and topology (the demo model's detector is one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyNetShape {
    /// Outputs of conv1_1..conv4_4_CPM (12 convs).
    pub backbone: [usize; 12],
    /// Width of conv5_1..3_CPM and Mconv1..6 (128 in model.py).
    pub stage: usize,
    /// Width of conv5_4_CPM (512 in model.py).
    pub stage1_wide: usize,
}

impl BodyNetShape {
    /// model.py `block0`, `block1_*`, `block%d_*`.
    pub const CONTROLNET_AUX: Self = Self {
        backbone: [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 256, 128],
        stage: 128,
        stage1_wide: 512,
    };

    /// Every conv as `(name, in, out, kernel)`, in model.py's order.
    pub fn layers(&self) -> Vec<(String, usize, usize, usize)> {
        const NAMES: [&str; 12] = [
            "conv1_1",
            "conv1_2",
            "conv2_1",
            "conv2_2",
            "conv3_1",
            "conv3_2",
            "conv3_3",
            "conv3_4",
            "conv4_1",
            "conv4_2",
            "conv4_3_CPM",
            "conv4_4_CPM",
        ];
        let mut out = Vec::new();
        let mut c = 3;
        for (name, &o) in NAMES.iter().zip(&self.backbone) {
            out.push((name.to_string(), c, o, 3));
            c = o;
        }
        let feat = c;
        for (l, n_out) in [
            (1, super::net::PAF_CHANNELS),
            (2, super::net::HEAT_CHANNELS),
        ] {
            let s = self.stage;
            out.push((format!("conv5_1_CPM_L{l}"), feat, s, 3));
            out.push((format!("conv5_2_CPM_L{l}"), s, s, 3));
            out.push((format!("conv5_3_CPM_L{l}"), s, s, 3));
            out.push((format!("conv5_4_CPM_L{l}"), s, self.stage1_wide, 1));
            out.push((format!("conv5_5_CPM_L{l}"), self.stage1_wide, n_out, 1));
        }
        let stage_in = super::net::PAF_CHANNELS + super::net::HEAT_CHANNELS + feat;
        for i in 2..=super::net::STAGES {
            for (l, n_out) in [
                (1, super::net::PAF_CHANNELS),
                (2, super::net::HEAT_CHANNELS),
            ] {
                let s = self.stage;
                out.push((format!("Mconv1_stage{i}_L{l}"), stage_in, s, 7));
                for m in 2..=5 {
                    out.push((format!("Mconv{m}_stage{i}_L{l}"), s, s, 7));
                }
                out.push((format!("Mconv6_stage{i}_L{l}"), s, s, 1));
                out.push((format!("Mconv7_stage{i}_L{l}"), s, n_out, 1));
            }
        }
        out
    }
}

/// The random state dict (body_pose_model.pth key names) for `shape`.
pub fn random_body_weights(shape: &BodyNetShape, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut map = HashMap::new();
    for (name, i, o, k) in shape.layers() {
        let wname = format!("{name}.weight");
        let bound = (6.0f64 / (i * k * k) as f64).sqrt() as f32;
        let w: Vec<f32> = uniform(&wname, o * i * k * k, seed)
            .into_iter()
            .map(|v| v * bound)
            .collect();
        map.insert(wname, Tensor::from_vec(w, (o, i, k, k), &Device::Cpu)?);
        let bname = format!("{name}.bias");
        let b: Vec<f32> = uniform(&bname, o, seed)
            .into_iter()
            .map(|v| v * BIAS_BOUND)
            .collect();
        map.insert(bname, Tensor::from_vec(b, o, &Device::Cpu)?);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controlnet_aux_shape_has_bodypose_models_parameter_count() {
        let n: usize = BodyNetShape::CONTROLNET_AUX
            .layers()
            .iter()
            .map(|(_, i, o, k)| o * i * k * k + o)
            .sum();
        // sum(p.numel() for p in bodypose_model().parameters())
        assert_eq!(n, 52_311_446);
    }
}
