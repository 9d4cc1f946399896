//! `Qwen2VLImageProcessor` as transformers 5.23 runs it (`models/qwen2_vl/image_processing_qwen2_vl.py`, the
//! torchvision backend `image_processing_backends.TorchvisionBackend`), in pure Rust:
//!
//! 1. `smart_resize`: both sides to multiples of `patch_size · merge_size` (28), the area kept within
//!    `[min_pixels, max_pixels]` (the config's `min_pixels`/`max_pixels`, else `size.shortest_edge`/`longest_edge`);
//! 2. resize of the uint8 picture with torchvision's antialiased BICUBIC ([`qwen_image_imaging::bicubic`]);
//! 3. rescale and normalise fused as `TorchvisionBackend.rescale_and_normalize` does it in f32:
//!    `(x - mean/rescale_factor) / (std/rescale_factor)`;
//! 4. `patchify`: rows ordered by merge block (`[h/m, w/m, m, m]`), each row `[C, temporal, P, P]` with the frame
//!    repeated `temporal_patch_size` times → `pixel_values [Σ h·w, C·T·P·P]` and `image_grid_thw (1, h, w)`.

use std::path::Path;

use candle_core::{Device, Result, Tensor};
use qwen_image_imaging::Image8;
use qwen_image_imaging::bicubic::bicubic_resize;
use serde::Deserialize;

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// transformers `image_utils.OPENAI_CLIP_MEAN` (the `Qwen2VLImageProcessor.image_mean` default).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// transformers `image_utils.OPENAI_CLIP_STD` (the `Qwen2VLImageProcessor.image_std` default).
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// `Qwen2VLImageProcessor.size["shortest_edge"]` default (`56 * 56`): the smallest area after resizing.
pub const DEFAULT_MIN_PIXELS: u64 = 56 * 56;
/// `Qwen2VLImageProcessor.size["longest_edge"]` default (`28 * 28 * 1280`): the largest area after resizing.
pub const DEFAULT_MAX_PIXELS: u64 = 28 * 28 * 1280;
/// `smart_resize`: "absolute aspect ratio must be smaller than 200".
pub const MAX_ASPECT_RATIO: f64 = 200.0;
/// `PILImageResampling.BICUBIC`, the processor's `resample` (the only one implemented here).
pub const RESAMPLE_BICUBIC: u64 = 3;

fn default_patch_size() -> usize {
    14
}
fn default_temporal_patch_size() -> usize {
    2
}
fn default_merge_size() -> usize {
    2
}
fn default_true() -> bool {
    true
}
fn default_rescale_factor() -> f64 {
    1.0 / 255.0
}
fn default_resample() -> u64 {
    RESAMPLE_BICUBIC
}

/// `size` of a transformers-5 processor config.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SizeConfig {
    #[serde(default)]
    pub shortest_edge: Option<u64>,
    #[serde(default)]
    pub longest_edge: Option<u64>,
}

/// `preprocessor_config.json` (flat, transformers 4) or the `image_processor` object of `processor_config.json`
/// (transformers 5); field names and defaults of `Qwen2VLImageProcessor`. Unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageProcessorConfig {
    /// Wins over `size.shortest_edge` (`Qwen2VLImageProcessor.__init__`).
    #[serde(default)]
    pub min_pixels: Option<u64>,
    /// Wins over `size.longest_edge`.
    #[serde(default)]
    pub max_pixels: Option<u64>,
    #[serde(default)]
    pub size: Option<SizeConfig>,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_temporal_patch_size")]
    pub temporal_patch_size: usize,
    #[serde(default = "default_merge_size")]
    pub merge_size: usize,
    #[serde(default)]
    pub image_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub image_std: Option<Vec<f64>>,
    #[serde(default = "default_true")]
    pub do_resize: bool,
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale_factor")]
    pub rescale_factor: f64,
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    #[serde(default = "default_resample")]
    pub resample: u64,
}

impl Default for ImageProcessorConfig {
    /// The `Qwen2VLImageProcessor` class defaults.
    fn default() -> Self {
        Self {
            min_pixels: None,
            max_pixels: None,
            size: None,
            patch_size: default_patch_size(),
            temporal_patch_size: default_temporal_patch_size(),
            merge_size: default_merge_size(),
            image_mean: None,
            image_std: None,
            do_resize: true,
            do_rescale: true,
            rescale_factor: default_rescale_factor(),
            do_normalize: true,
            resample: RESAMPLE_BICUBIC,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads a processor folder: `preprocessor_config.json` (the released snapshots) or, failing that,
    /// `processor_config.json`'s `image_processor` (what transformers 5 writes).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let flat = dir.join("preprocessor_config.json");
        let cfg: Self = if flat.is_file() {
            crate::snapshot::read_json(&flat)?
        } else {
            let nested = dir.join("processor_config.json");
            if !nested.is_file() {
                return Err(err(format!(
                    "{}: neither preprocessor_config.json nor processor_config.json found (the Edit snapshot's \
                     `processor` folder)",
                    dir.display()
                )));
            }
            let v: serde_json::Value = crate::snapshot::read_json(&nested)?;
            let ip = v
                .get("image_processor")
                .ok_or_else(|| err(format!("{}: no `image_processor` object", nested.display())))?;
            serde_json::from_value(ip.clone())
                .map_err(|e| err(format!("{} image_processor: {e}", nested.display())))?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn min_pixels(&self) -> u64 {
        self.min_pixels
            .or(self.size.as_ref().and_then(|s| s.shortest_edge))
            .unwrap_or(DEFAULT_MIN_PIXELS)
    }

    pub fn max_pixels(&self) -> u64 {
        self.max_pixels
            .or(self.size.as_ref().and_then(|s| s.longest_edge))
            .unwrap_or(DEFAULT_MAX_PIXELS)
    }

    /// `patch_size · merge_size`: the multiple both resized sides have (28).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    pub fn mean(&self) -> [f64; 3] {
        three(self.image_mean.as_deref()).unwrap_or(OPENAI_CLIP_MEAN)
    }

    pub fn std(&self) -> [f64; 3] {
        three(self.image_std.as_deref()).unwrap_or(OPENAI_CLIP_STD)
    }

    pub fn validate(&self) -> Result<()> {
        if self.patch_size == 0 || self.merge_size == 0 || self.temporal_patch_size == 0 {
            return Err(err(
                "image processor: patch_size, merge_size and temporal_patch_size must be positive",
            ));
        }
        if !self.do_resize {
            return Err(err("image processor: do_resize=false is not supported"));
        }
        if self.resample != RESAMPLE_BICUBIC {
            return Err(err(format!(
                "image processor: resample {} is not supported (only 3 = BICUBIC)",
                self.resample
            )));
        }
        for (name, v) in [
            ("image_mean", &self.image_mean),
            ("image_std", &self.image_std),
        ] {
            if v.as_ref().is_some_and(|v| v.len() != 3) {
                return Err(err(format!("image processor: {name} must have 3 values")));
            }
        }
        if self.std().contains(&0.0) || self.rescale_factor == 0.0 {
            return Err(err(
                "image processor: image_std and rescale_factor must be non-zero",
            ));
        }
        if self.min_pixels() > self.max_pixels() {
            return Err(err(format!(
                "image processor: min_pixels {} > max_pixels {}",
                self.min_pixels(),
                self.max_pixels()
            )));
        }
        Ok(())
    }
}

fn three(v: Option<&[f64]>) -> Option<[f64; 3]> {
    match v {
        Some([a, b, c]) => Some([*a, *b, *c]),
        _ => None,
    }
}

/// `smart_resize(height, width, factor, min_pixels, max_pixels)` → `(height, width)`, with Python's
/// round-half-to-even `round`. Small pictures are scaled up to `min_pixels` (a 1x1 picture becomes 56x56); the
/// errors are an empty picture and an aspect ratio above 200, as in transformers.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: u64,
    max_pixels: u64,
) -> std::result::Result<(usize, usize), String> {
    if height == 0 || width == 0 {
        return Err(format!("the picture is empty ({width}x{height})"));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_ASPECT_RATIO {
        return Err(format!(
            "absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio} ({width}x{height})"
        ));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// The processor's output for a list of pictures.
#[derive(Debug, Clone)]
pub struct PixelValues {
    /// `[Σ t·h·w, C·T·P·P]` f32.
    pub pixel_values: Tensor,
    /// `(t, h, w)` in patches per picture (`image_grid_thw`).
    pub grids: Vec<(usize, usize, usize)>,
}

/// `Qwen2VLImageProcessor`.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    cfg: ImageProcessorConfig,
}

impl ImageProcessor {
    pub fn new(cfg: ImageProcessorConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    pub fn config(&self) -> &ImageProcessorConfig {
        &self.cfg
    }

    /// `smart_resize` with this processor's factor and pixel bounds: the size a `width x height` picture is
    /// resized to, as `(width, height)`. The error names the picture's size.
    pub fn target_size(
        &self,
        width: usize,
        height: usize,
    ) -> std::result::Result<(usize, usize), String> {
        let (h, w) = smart_resize(
            height,
            width,
            self.cfg.factor(),
            self.cfg.min_pixels(),
            self.cfg.max_pixels(),
        )?;
        Ok((w, h))
    }

    /// Number of `<|image_pad|>` tokens a picture of this grid becomes (`t·h·w / merge²`).
    pub fn tokens_for(&self, grid: (usize, usize, usize)) -> usize {
        grid.0 * grid.1 * grid.2 / (self.cfg.merge_size * self.cfg.merge_size)
    }

    /// Resizes one RGB picture as the processor does (uint8 in, uint8 out).
    pub fn resize(&self, img: &Image8) -> Result<Image8> {
        if img.channels != 3 {
            return Err(err(format!(
                "image processor: expected an RGB picture (3 channels), got {} channels",
                img.channels
            )));
        }
        let (w, h) = self
            .target_size(img.width, img.height)
            .map_err(|e| err(format!("image processor: {e}")))?;
        bicubic_resize(img, w, h).map_err(err)
    }

    /// Normalises and patchifies an already resized picture: `(rows [h·w, C·T·P·P], (1, h, w))`.
    pub fn patchify(&self, img: &Image8) -> Result<(Vec<f32>, (usize, usize, usize))> {
        let c = &self.cfg;
        let (p, m, t) = (c.patch_size, c.merge_size, c.temporal_patch_size);
        if img.channels != 3
            || !img.width.is_multiple_of(p * m)
            || !img.height.is_multiple_of(p * m)
        {
            return Err(err(format!(
                "image processor: cannot patchify a {}x{}x{} picture (RGB, sides multiple of {})",
                img.width,
                img.height,
                img.channels,
                p * m
            )));
        }
        let (gh, gw) = (img.height / p, img.width / p);
        // rescale_and_normalize: fused into (x - mean') / std' with mean' = f32(mean) * f32(1 / rescale_factor)
        // when both are on (TorchvisionBackend._fuse_mean_std_and_rescale_factor); all maths in f32.
        let inv = (1.0 / c.rescale_factor) as f32;
        let (mean, std) = (c.mean(), c.std());
        let norm: Vec<(f32, f32)> = (0..3)
            .map(|ch| match (c.do_rescale, c.do_normalize) {
                (true, true) => (mean[ch] as f32 * inv, std[ch] as f32 * inv),
                (false, true) => (mean[ch] as f32, std[ch] as f32),
                _ => (0.0, 1.0),
            })
            .collect();
        let scale = if c.do_rescale && !c.do_normalize {
            c.rescale_factor as f32
        } else {
            1.0
        };
        let row_len = 3 * t * p * p;
        let mut out = vec![0f32; gh * gw * row_len];
        let mut r = 0;
        // patch order of `patchify`: [gh/m, gw/m, m, m]
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for ih in 0..m {
                    for iw in 0..m {
                        let (py0, px0) = ((bh * m + ih) * p, (bw * m + iw) * p);
                        let row = &mut out[r * row_len..(r + 1) * row_len];
                        for ch in 0..3 {
                            let (mu, sd) = norm[ch];
                            for ti in 0..t {
                                for y in 0..p {
                                    for x in 0..p {
                                        let v = f32::from(
                                            img.data[((py0 + y) * img.width + px0 + x) * 3 + ch],
                                        );
                                        row[((ch * t + ti) * p + y) * p + x] =
                                            (v * scale - mu) / sd;
                                    }
                                }
                            }
                        }
                        r += 1;
                    }
                }
            }
        }
        Ok((out, (1, gh, gw)))
    }

    /// `processor(images=...)`: pixel values and grids of RGB pictures, in order.
    pub fn preprocess(&self, images: &[Image8], device: &Device) -> Result<PixelValues> {
        if images.is_empty() {
            return Err(err("image processor: no pictures given"));
        }
        let mut rows = Vec::new();
        let mut grids = Vec::with_capacity(images.len());
        for (k, img) in images.iter().enumerate() {
            let resized = self
                .resize(img)
                .map_err(|e| err(format!("picture {}: {e}", k + 1)))?;
            let (r, g) = self.patchify(&resized)?;
            rows.extend(r);
            grids.push(g);
        }
        let n: usize = grids.iter().map(|(t, h, w)| t * h * w).sum();
        let len = 3 * self.cfg.temporal_patch_size * self.cfg.patch_size * self.cfg.patch_size;
        Ok(PixelValues {
            pixel_values: Tensor::from_vec(rows, (n, len), device)?,
            grids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_transformers() {
        // values from transformers' smart_resize (factor 28, min 3136, max 12845056)
        let f = |h, w| smart_resize(h, w, 28, 3136, 12845056);
        assert_eq!(f(128, 192), Ok((140, 196)));
        assert_eq!(f(320, 448), Ok((308, 448)));
        assert_eq!(f(40, 60), Ok((56, 84)));
        // tiny pictures are scaled up to min_pixels, not rejected
        assert_eq!(f(1, 1), Ok((56, 56)));
        assert_eq!(f(10, 3), Ok((112, 56)));
        // round half to even: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2
        assert_eq!(f(42, 70), Ok((56, 56)));
        // above max_pixels: scaled down
        assert_eq!(smart_resize(1000, 1000, 28, 3136, 100_000), Ok((308, 308)));
        assert!(f(0, 5).is_err());
        assert!(matches!(f(1, 201), Err(e) if e.contains("aspect ratio")));
        assert_eq!(f(1, 200), Ok((28, 812)));
    }

    #[test]
    fn config_styles_and_defaults() -> Result<()> {
        let flat: ImageProcessorConfig = serde_json::from_value(serde_json::json!({
            "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "processor_class": "Qwen2_5_VLProcessor"}))
        .map_err(err)?;
        assert_eq!((flat.min_pixels(), flat.max_pixels()), (3136, 12845056));
        assert_eq!(flat.mean(), [0.5; 3]);
        assert_eq!(flat.std(), OPENAI_CLIP_STD);
        let v5: ImageProcessorConfig = serde_json::from_value(serde_json::json!({
            "size": {"shortest_edge": 1000, "longest_edge": 50000}, "resample": 3}))
        .map_err(err)?;
        assert_eq!((v5.min_pixels(), v5.max_pixels()), (1000, 50000));
        let d = ImageProcessorConfig::default();
        assert_eq!(
            (d.min_pixels(), d.max_pixels(), d.factor()),
            (3136, 1003520, 28)
        );
        let bad: ImageProcessorConfig =
            serde_json::from_value(serde_json::json!({"resample": 2})).map_err(err)?;
        assert!(bad.validate().is_err());
        Ok(())
    }

    #[test]
    fn patchify_layout() -> Result<()> {
        // 56x28 picture: grid 2x4 patches (h=2, w=4) of 14 px; merge blocks of 2x2
        let (w, h) = (56, 28);
        let mut data = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    data[(y * w + x) * 3 + c] = ((x / 14) * 10 + (y / 14) * 100 + c) as u8;
                }
            }
        }
        let proc = ImageProcessor::new(ImageProcessorConfig {
            do_normalize: false,
            do_rescale: false,
            ..ImageProcessorConfig::default()
        })?;
        let (rows, grid) = proc.patchify(&Image8::new(w, h, 3, data).map_err(err)?)?;
        assert_eq!(grid, (1, 2, 4));
        let row_len = 3 * 2 * 14 * 14;
        // row order: block (0,0): patches (0,0) (0,1) (1,0) (1,1); then block (0,1): (0,2) (0,3) (1,2) (1,3)
        let expect = [
            (0, 0),
            (0, 1),
            (1, 0),
            (1, 1),
            (0, 2),
            (0, 3),
            (1, 2),
            (1, 3),
        ];
        for (r, (py, px)) in expect.iter().enumerate() {
            for (c, t) in [(0, 0), (2, 1)] {
                let v = rows[r * row_len + (c * 2 + t) * 196];
                assert_eq!(
                    v,
                    (px * 10 + py * 100 + c) as f32,
                    "row {r} channel {c} frame {t}"
                );
            }
        }
        Ok(())
    }
}
