//! controlnet-aux's OpenPose body network (`open_pose/model.py`, `bodypose_model`) in candle.
//!
//! A VGG-19-style backbone (`model0`: conv1_1 .. conv4_4_CPM, three 2x2 max pools) then six stages of two branches:
//! L1 = part affinity fields (38 channels), L2 = part heat maps (19 channels). Stage 1 (`conv5_*_CPM_L1/L2`) reads the
//! backbone's features; stages 2-6 (`Mconv1..7_stageN_L1/L2`) read `cat([L1, L2, features])` (model.py `forward`).
//! Every conv is followed by a ReLU except those in model.py's `no_relu_layers`, which lists `Mconv7_stage6_L1`
//! twice and never `Mconv7_stage6_L2`: the final heat-map conv *is* followed by a ReLU, reproduced here.
//!
//! Weights use the key names of `body_pose_model.pth` (`conv1_1.weight`, `Mconv7_stage6_L2.bias`, ...: the model's
//! state-dict keys without the `modelX_Y.` prefix, as `util.transfer` maps them). Channel counts and kernel sizes are
//! read from the weights, and so is the number of stages (stage 1, then stages 2, 3, ... while their
//! `Mconv1_stageN_L1` is there, at most [`STAGES`]): a smaller configuration with the same names and topology (the
//! demo model's, tools/openpose/train_demo_detector.py: narrower, 3 stages, 5x5 kernels) loads too. Only the outputs
//! (38 PAF / 19 heat-map channels) are fixed; the last stage's heat-map conv keeps its ReLU whatever the count.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Result, Tensor, bail};

/// Backbone layers in order (`model.py` `block0`); `None` = 2x2 max pool, stride 2.
const BACKBONE: [Option<&str>; 15] = [
    Some("conv1_1"),
    Some("conv1_2"),
    None,
    Some("conv2_1"),
    Some("conv2_2"),
    None,
    Some("conv3_1"),
    Some("conv3_2"),
    Some("conv3_3"),
    Some("conv3_4"),
    None,
    Some("conv4_1"),
    Some("conv4_2"),
    Some("conv4_3_CPM"),
    Some("conv4_4_CPM"),
];

/// Number of stages of `bodypose_model` (`model.py`: stage 1 + `for i in range(2, 7)`); a smaller configuration
/// may have fewer.
pub const STAGES: usize = 6;

/// The stages a set of tensor names holds: 1, then each further stage while its first layer is there.
fn stage_count(has: impl Fn(&str) -> bool) -> usize {
    (2..=STAGES)
        .take_while(|s| has(&format!("Mconv1_stage{s}_L1.weight")))
        .count()
        + 1
}
/// PAF channels (L1) and heat-map channels (L2: 18 parts + background).
pub const PAF_CHANNELS: usize = 38;
pub const HEAT_CHANNELS: usize = 19;

#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    relu: bool,
}

impl Conv {
    fn load(t: &HashMap<String, Tensor>, name: &str, relu: bool, device: &Device) -> Result<Self> {
        let get = |suffix: &str| -> Result<Tensor> {
            let key = format!("{name}.{suffix}");
            match t.get(&key) {
                Some(v) => v.to_dtype(DType::F32)?.to_device(device),
                None => bail!(
                    "openpose body weights: missing tensor `{key}` (body_pose_model.pth key names expected)"
                ),
            }
        };
        let weight = get("weight")?;
        let bias = get("bias")?;
        let (o, _i, kh, kw) = match weight.dims() {
            [o, i, kh, kw] => (*o, *i, *kh, *kw),
            d => bail!(
                "openpose body weights: `{name}.weight` has shape {d:?}, expected [out, in, k, k]"
            ),
        };
        if kh != kw || kh % 2 == 0 {
            bail!(
                "openpose body weights: `{name}.weight` has a {kh}x{kw} kernel, expected an odd square one"
            );
        }
        if bias.dims() != [o] {
            bail!(
                "openpose body weights: `{name}.bias` has shape {:?}, expected [{o}]",
                bias.dims()
            );
        }
        Ok(Self {
            bias: bias.reshape((1, o, 1, 1))?,
            weight,
            padding: kh / 2, // model.py: 3x3 → padding 1, 7x7 → 3, 1x1 → 0
            relu,
        })
    }

    fn in_channels(&self) -> usize {
        self.weight.dims()[1]
    }

    fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x
            .conv2d(&self.weight, self.padding, 1, 1, 1)?
            .broadcast_add(&self.bias)?;
        if self.relu { y.relu() } else { Ok(y) }
    }
}

/// `bodypose_model`: `forward(x [N,3,H,W]) → (paf [N,38,H/8,W/8], heat [N,19,H/8,W/8])`.
#[derive(Debug, Clone)]
pub struct BodyPoseNet {
    backbone: Vec<Option<Conv>>,
    /// `[stage][branch]`: branch 0 = L1 (PAF), 1 = L2 (heat map).
    stages: Vec<[Vec<Conv>; 2]>,
}

fn stage_layer_names(stage: usize, branch: usize) -> Vec<String> {
    let l = branch + 1;
    if stage == 1 {
        (1..=5).map(|i| format!("conv5_{i}_CPM_L{l}")).collect()
    } else {
        (1..=7)
            .map(|i| format!("Mconv{i}_stage{stage}_L{l}"))
            .collect()
    }
}

impl BodyPoseNet {
    /// Loads a safetensors file converted from `body_pose_model.pth` (tools/openpose/convert_body_pose_model.py).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            candle_core::Error::Msg(format!("openpose body weights {}: {e}", path.display()))
        })?;
        Self::from_tensors(&tensors, device)
    }

    pub fn from_tensors(t: &HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let backbone = BACKBONE
            .iter()
            .map(|l| l.map(|name| Conv::load(t, name, true, device)).transpose())
            .collect::<Result<Vec<_>>>()?;
        let n_stages = stage_count(|k| t.contains_key(k));
        let mut stages = Vec::with_capacity(n_stages);
        for stage in 1..=n_stages {
            let mut branches: [Vec<Conv>; 2] = [Vec::new(), Vec::new()];
            for (branch, convs) in branches.iter_mut().enumerate() {
                let names = stage_layer_names(stage, branch);
                let last = names.len() - 1;
                for (i, name) in names.iter().enumerate() {
                    // model.py no_relu_layers: every stage's last conv, except Mconv7_stage6_L2 (listed as _L1 twice):
                    // the last stage's heat map keeps its ReLU
                    let relu = i != last || (stage == n_stages && branch == 1);
                    convs.push(Conv::load(t, name, relu, device)?);
                }
            }
            stages.push(branches);
        }
        let net = Self { backbone, stages };
        net.check_topology()?;
        Ok(net)
    }

    fn check_topology(&self) -> Result<()> {
        let feat = self
            .backbone
            .iter()
            .flatten()
            .next_back()
            .map(Conv::out_channels)
            .unwrap_or(0);
        if self.backbone.iter().flatten().next().map(Conv::in_channels) != Some(3) {
            bail!("openpose body weights: conv1_1 must take 3 input channels");
        }
        for (s, branches) in self.stages.iter().enumerate() {
            let expect_in = if s == 0 {
                feat
            } else {
                PAF_CHANNELS + HEAT_CHANNELS + feat
            };
            for (b, convs) in branches.iter().enumerate() {
                let out = [PAF_CHANNELS, HEAT_CHANNELS][b];
                if convs[0].in_channels() != expect_in {
                    bail!(
                        "openpose body weights: stage {} L{} takes {} channels, expected {expect_in}",
                        s + 1,
                        b + 1,
                        convs[0].in_channels()
                    );
                }
                if convs.last().map(Conv::out_channels) != Some(out) {
                    bail!(
                        "openpose body weights: stage {} L{} must output {out} channels",
                        s + 1,
                        b + 1
                    );
                }
            }
        }
        Ok(())
    }

    /// `x`: `[N, 3, H, W]` f32 (the picture as body.py feeds it: BGR, `/256 - 0.5`, H and W multiples of 8).
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = x.clone();
        for layer in &self.backbone {
            h = match layer {
                Some(conv) => conv.forward(&h)?,
                None => h.max_pool2d_with_stride(2, 2)?,
            };
        }
        let features = h;
        let mut input = features.clone();
        let mut out = (features.clone(), features.clone());
        for (s, branches) in self.stages.iter().enumerate() {
            let run = |convs: &[Conv]| -> Result<Tensor> {
                let mut y = input.clone();
                for conv in convs {
                    y = conv.forward(&y)?;
                }
                Ok(y)
            };
            let paf = run(&branches[0])?;
            let heat = run(&branches[1])?;
            if s + 1 < self.stages.len() {
                input = Tensor::cat(&[&paf, &heat, &features], D::Minus(3))?;
            }
            out = (paf, heat);
        }
        Ok(out)
    }
}

/// Reads only the header of a weights file: refuses a file that is not a body network (a missing layer), and
/// names its architecture: `bodypose_model` (controlnet-aux's widths, conv1_1 with 64 filters) or a smaller one
/// (narrower, fewer stages).
pub fn inspect(path: &Path) -> Result<String> {
    use std::io::Read;
    let fail = |what: String| {
        candle_core::Error::Msg(format!("openpose body weights {}: {what}", path.display()))
    };
    let mut f = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| fail("not a safetensors file".into()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(fail("not a safetensors file (header too large)".into()));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|_| fail("truncated safetensors header".into()))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|_| fail("not a safetensors file".into()))?;
    let mut names: Vec<String> = BACKBONE.iter().flatten().map(|s| s.to_string()).collect();
    let n_stages = stage_count(|k| header.get(k).is_some());
    for stage in 1..=n_stages {
        for branch in 0..2 {
            names.extend(stage_layer_names(stage, branch));
        }
    }
    for name in &names {
        for suffix in ["weight", "bias"] {
            if header.get(format!("{name}.{suffix}")).is_none() {
                return Err(fail(format!(
                    "no tensor `{name}.{suffix}`: not controlnet-aux's body_pose_model (convert the .pth with \
                     tools/openpose/convert_body_pose_model.py)"
                )));
            }
        }
    }
    let width = header["conv1_1.weight"]["shape"][0].as_u64().unwrap_or(0);
    Ok(if width != 64 {
        format!("bodypose_model, narrower (conv1_1: {width} filters, {n_stages} stages)")
    } else if n_stages != STAGES {
        format!("bodypose_model, {n_stages} stages")
    } else {
        "bodypose_model".to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openpose::random::{BodyNetShape, random_body_weights};

    const NARROW: BodyNetShape = BodyNetShape {
        backbone: [4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8],
        stage: 8,
        stage1_wide: 8,
    };

    #[test]
    fn fewer_stages_load_and_the_last_heat_map_keeps_its_relu() -> Result<()> {
        let mut t = random_body_weights(&NARROW, 5)?;
        t.retain(|k, _| !(4..=STAGES).any(|s| k.contains(&format!("_stage{s}_"))));
        // stage 3's heat-map conv: zero weights, negative bias → negative before the ReLU
        let w = t["Mconv7_stage3_L2.weight"].zeros_like()?;
        t.insert("Mconv7_stage3_L2.weight".into(), w);
        t.insert(
            "Mconv7_stage3_L2.bias".into(),
            Tensor::full(-1f32, HEAT_CHANNELS, &Device::Cpu)?,
        );
        t.insert(
            "Mconv7_stage3_L1.bias".into(),
            Tensor::full(-1f32, PAF_CHANNELS, &Device::Cpu)?,
        );
        let w = t["Mconv7_stage3_L1.weight"].zeros_like()?;
        t.insert("Mconv7_stage3_L1.weight".into(), w);
        let net = BodyPoseNet::from_tensors(&t, &Device::Cpu)?;
        assert_eq!(net.stages.len(), 3);
        let x = Tensor::zeros((1, 3, 16, 24), DType::F32, &Device::Cpu)?;
        let (paf, heat) = net.forward(&x)?;
        assert_eq!(paf.dims(), [1, PAF_CHANNELS, 2, 3]);
        assert_eq!(heat.dims(), [1, HEAT_CHANNELS, 2, 3]);
        // the last stage's PAF conv has no ReLU (-1 everywhere), its heat map has one (0 everywhere)
        assert_eq!(paf.flatten_all()?.max(0)?.to_scalar::<f32>()?, -1.0);
        assert_eq!(heat.flatten_all()?.min(0)?.to_scalar::<f32>()?, 0.0);

        // a gap (stage 2 missing) leaves stage 1 only
        let mut gap = random_body_weights(&NARROW, 5)?;
        gap.retain(|k, _| !k.contains("_stage2_"));
        assert_eq!(
            BodyPoseNet::from_tensors(&gap, &Device::Cpu)?.stages.len(),
            1
        );
        Ok(())
    }
}
