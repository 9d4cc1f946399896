//! The demo model's judge in candle: the small CNN `tools/demo-model/judge.py` trains on the procedural
//! stick-figure world, scoring a 64x64 picture's figure colour, pose, background and prop. End-to-end tests
//! use it to check that a picture shows what the prompt asked for.
//!
//! Architecture (from `judge.json`): input RGB / 255 as NCHW; `conv{0..3}` 3x3 with padding 1 and ReLU, a 2x2
//! max-pool after the convolutions listed in `pool_after`; mean over the remaining map; one linear head per
//! attribute giving logits.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};

/// What the judge read in one picture (label names from `judge.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub colour: String,
    pub pose: String,
    pub background: String,
    pub prop: String,
}

pub struct Judge {
    convs: Vec<(Tensor, Tensor)>,
    pool_after: Vec<usize>,
    heads: Vec<(String, Vec<String>, Tensor, Tensor)>,
    size: usize,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Judge {
    /// Loads `judge.json` and `judge.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("judge.json")).map_err(|e| format!("judge.json: {e}"))?,
        )
        .map_err(err)?;
        let weights = candle_core::safetensors::load(dir.join("judge.safetensors"), &Device::Cpu)
            .map_err(|e| format!("judge.safetensors: {e}"))?;
        let get = |name: &str| -> Result<Tensor, String> {
            weights
                .get(name)
                .ok_or_else(|| format!("judge.safetensors has no {name}"))?
                .to_dtype(DType::F32)
                .map_err(err)
        };
        let n_conv = meta["channels"]
            .as_array()
            .map(|c| c.len().saturating_sub(1))
            .ok_or("judge.json: no channels")?;
        let convs = (0..n_conv)
            .map(|i| {
                Ok((
                    get(&format!("conv{i}.weight"))?,
                    get(&format!("conv{i}.bias"))?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let pool_after = meta["pool_after"]
            .as_array()
            .ok_or("judge.json: no pool_after")?
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as usize))
            .collect();
        let mut heads = Vec::new();
        for key in ["colour", "pose", "background", "prop"] {
            let labels: Vec<String> = meta["heads"][key]
                .as_array()
                .ok_or_else(|| format!("judge.json: no head {key}"))?
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            heads.push((
                key.to_string(),
                labels,
                get(&format!("head.{key}.weight"))?,
                get(&format!("head.{key}.bias"))?,
            ));
        }
        let size = meta["size"].as_u64().unwrap_or(64) as usize;
        Ok(Self {
            convs,
            pool_after,
            heads,
            size,
        })
    }

    /// The picture size the judge was trained on.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Label names of one head (`colour`, `pose`, `background`, `prop`).
    pub fn labels(&self, head: &str) -> Vec<String> {
        self.heads
            .iter()
            .find(|h| h.0 == head)
            .map(|h| h.1.clone())
            .unwrap_or_default()
    }

    /// Scores one RGB picture given as `size x size x 3` bytes (row-major, like a decoded PNG).
    pub fn judge(&self, rgb: &[u8], width: usize, height: usize) -> Result<Verdict, String> {
        if width != self.size || height != self.size || rgb.len() != width * height * 3 {
            return Err(format!(
                "the judge reads {size}x{size} RGB pictures, got {width}x{height} ({n} bytes)",
                size = self.size,
                n = rgb.len()
            ));
        }
        let x = Tensor::from_vec(
            rgb.iter()
                .map(|&v| f32::from(v) / 255.0)
                .collect::<Vec<_>>(),
            (1, height, width, 3),
            &Device::Cpu,
        )
        .and_then(|t| t.permute((0, 3, 1, 2)))
        .map_err(err)?;
        let mut x = x;
        for (i, (w, b)) in self.convs.iter().enumerate() {
            x = x
                .conv2d(w, 1, 1, 1, 1)
                .and_then(|y| y.broadcast_add(&b.reshape((1, (), 1, 1))?))
                .and_then(|y| y.relu())
                .map_err(err)?;
            if self.pool_after.contains(&i) {
                x = x.max_pool2d(2).map_err(err)?;
            }
        }
        let feat = x
            .mean(D::Minus1)
            .and_then(|y| y.mean(D::Minus1))
            .map_err(err)?;
        let mut picks = BTreeMap::new();
        for (key, labels, w, b) in &self.heads {
            let logits = feat
                .matmul(&w.t().map_err(err)?)
                .and_then(|y| y.broadcast_add(b))
                .and_then(|y| y.argmax(D::Minus1))
                .and_then(|y| y.flatten_all())
                .and_then(|y| y.to_vec1::<u32>())
                .map_err(err)?;
            let label = labels
                .get(logits[0] as usize)
                .cloned()
                .ok_or_else(|| format!("judge head {key} has no label {}", logits[0]))?;
            picks.insert(key.as_str(), label);
        }
        let mut take = |k: &str| picks.remove(k).unwrap_or_default();
        Ok(Verdict {
            colour: take("colour"),
            pose: take("pose"),
            background: take("background"),
            prop: take("prop"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(v: &serde_json::Value) -> Verdict {
        let s = |k: &str| v[k].as_str().expect("label").to_string();
        Verdict {
            colour: s("colour"),
            pose: s("pose"),
            background: s("background"),
            prop: s("prop"),
        }
    }

    /// Fresh renders of held-out combinations (written by `tools/demo-model/train.py judge`): the candle port
    /// must give the PyTorch judge's verdicts, and those must be the truth.
    #[test]
    fn reads_renders_like_the_pytorch_judge() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/judge");
        let judge = Judge::load(&dir).expect("judge loads");
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("samples.json")).expect("samples.json"))
                .expect("json");
        let mut reader = png::Decoder::new(std::io::Cursor::new(
            std::fs::read(dir.join("samples.png")).expect("samples.png"),
        ))
        .read_info()
        .expect("png");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("frame");
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let (w, h) = (info.width as usize, info.height as usize);
        let n = w / h;
        let truth = meta["truth"].as_array().expect("truth");
        let python = meta["python_judge"].as_array().expect("python_judge");
        assert_eq!((truth.len(), python.len()), (n, n));
        let mut right = 0;
        for i in 0..n {
            let mut rgb = Vec::with_capacity(h * h * 3);
            for y in 0..h {
                let row = (y * w + i * h) * 3;
                rgb.extend_from_slice(&buf[row..row + h * 3]);
            }
            let v = judge.judge(&rgb, h, h).expect("judged");
            assert_eq!(
                v,
                verdict(&python[i]),
                "picture {i}: candle and PyTorch judges disagree"
            );
            right += usize::from(v == verdict(&truth[i]));
        }
        assert!(
            right + 1 >= n,
            "the judge is right on only {right}/{n} renders"
        );
        assert!(judge.judge(&[0; 12], 2, 2).is_err());
    }
}
