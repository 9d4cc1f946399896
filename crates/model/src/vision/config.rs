//! `vision_config` of `text_encoder/config.json`: field names and defaults of transformers 5.23
//! `Qwen2_5_VLVisionConfig` (`models/qwen2_5_vl/configuration_qwen2_5_vl.py`), plus the transformers-4 names
//! of the released snapshot (`in_chans`, `spatial_patch_size`). Unknown keys are ignored.

use candle_core::Result;
use serde::Deserialize;

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

fn default_depth() -> usize {
    32
}
fn default_hidden_size() -> usize {
    3584
}
fn default_hidden_act() -> String {
    "silu".to_string()
}
fn default_intermediate_size() -> usize {
    3420
}
fn default_num_heads() -> usize {
    16
}
fn default_in_channels() -> usize {
    3
}
fn default_patch_size() -> usize {
    14
}
fn default_spatial_merge_size() -> usize {
    2
}
fn default_temporal_patch_size() -> usize {
    2
}
fn default_window_size() -> usize {
    112
}
fn default_out_hidden_size() -> usize {
    3584
}
fn default_fullatt_block_indexes() -> Vec<usize> {
    vec![7, 15, 23, 31]
}

/// RoPE theta of the vision tower when the config names none: `Qwen2_5_VLVisionRotaryEmbedding` reads
/// `rope_parameters["rope_theta"]`, which transformers fills with the axial default 10000 (checked on the
/// refharness snapshots: `inv_freq = 1 / 10000^(2k / (head_dim/2))`).
pub const DEFAULT_VISION_ROPE_THETA: f64 = 10000.0;

/// `Qwen2_5_VLVisionConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "default_depth")]
    pub depth: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_num_heads")]
    pub num_heads: usize,
    /// Use [`VisionConfig::in_channels`] (this or the transformers-4 `in_chans`).
    #[serde(default)]
    in_channels: Option<usize>,
    /// transformers-4 name of `in_channels` (the released configs write both).
    #[serde(default)]
    in_chans: Option<usize>,
    /// (transformers-4 configs also write the same value as `spatial_patch_size`, ignored here.)
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_spatial_merge_size")]
    pub spatial_merge_size: usize,
    #[serde(default = "default_temporal_patch_size")]
    pub temporal_patch_size: usize,
    #[serde(default = "default_window_size")]
    pub window_size: usize,
    #[serde(default = "default_out_hidden_size")]
    pub out_hidden_size: usize,
    #[serde(default = "default_fullatt_block_indexes")]
    pub fullatt_block_indexes: Vec<usize>,
    /// transformers-5 style `{rope_type: "axial", rope_theta: ..}`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
}

impl VisionConfig {
    /// The `vision_config` object of a `text_encoder/config.json` (either transformers style).
    pub fn from_text_encoder_config(cfg: &serde_json::Value) -> Result<Self> {
        let v = cfg.get("vision_config").ok_or_else(|| {
            err("text_encoder/config.json has no `vision_config`: this text encoder has no vision tower")
        })?;
        let c: Self = serde_json::from_value(v.clone())
            .map_err(|e| err(format!("text_encoder/config.json vision_config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// `in_channels`, else `in_chans`, else 3.
    pub fn in_channels(&self) -> usize {
        self.in_channels
            .or(self.in_chans)
            .unwrap_or_else(default_in_channels)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .unwrap_or(DEFAULT_VISION_ROPE_THETA)
    }

    /// Merged tokens per side of an attention window (`window_size // spatial_merge_size // patch_size`,
    /// `get_vision_window_index`): 4 for the released 112 / 2 / 14.
    pub fn merger_window(&self) -> usize {
        self.window_size / self.spatial_merge_size / self.patch_size
    }

    /// Length of one flattened patch (`in_channels · temporal_patch_size · patch_size²`, 1176 for Qwen2.5-VL).
    pub fn patch_len(&self) -> usize {
        self.in_channels() * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(err(format!(
                "vision_config: hidden_size {} is not divisible by num_heads {}",
                self.hidden_size, self.num_heads
            )));
        }
        // head_dim/2 is split into a row half and a column half, each of even length
        if !self.head_dim().is_multiple_of(4) {
            return Err(err(format!(
                "vision_config: head_dim {} must be a multiple of 4 for the 2-D rotary embedding",
                self.head_dim()
            )));
        }
        if self.hidden_act != "silu" {
            return Err(err(format!(
                "vision_config: hidden_act `{}` is not supported (only silu)",
                self.hidden_act
            )));
        }
        if self.spatial_merge_size == 0 || self.patch_size == 0 || self.temporal_patch_size == 0 {
            return Err(err("vision_config: patch and merge sizes must be positive"));
        }
        if self.merger_window() == 0 {
            return Err(err(format!(
                "vision_config: window_size {} is smaller than one merged patch ({} px)",
                self.window_size,
                self.spatial_merge_size * self.patch_size
            )));
        }
        if let Some(ty) = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_type"))
            .and_then(|t| t.as_str())
            && ty != "axial"
            && ty != "default"
        {
            return Err(err(format!(
                "vision_config: rope type `{ty}` is not supported (axial only)"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_config_styles() -> Result<()> {
        // transformers-4 style of the released Qwen2.5-VL-7B / Qwen-Image text_encoder
        let legacy = serde_json::json!({"vision_config": {
            "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
            "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
            "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2, "temporal_patch_size": 2}});
        let c = VisionConfig::from_text_encoder_config(&legacy)?;
        assert_eq!(
            (c.head_dim(), c.merger_window(), c.patch_len()),
            (80, 4, 1176)
        );
        assert_eq!(c.rope_theta(), 10000.0);
        let v5 = serde_json::json!({"vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 2,
            "in_channels": 3, "rope_parameters": {"rope_type": "axial", "rope_theta": 500.0}}});
        let c = VisionConfig::from_text_encoder_config(&v5)?;
        assert_eq!(
            (c.depth, c.rope_theta(), c.out_hidden_size),
            (2, 500.0, 3584)
        );
        assert!(VisionConfig::from_text_encoder_config(&serde_json::json!({})).is_err());
        let bad = serde_json::json!({"vision_config": {"hidden_size": 30, "num_heads": 2}});
        assert!(VisionConfig::from_text_encoder_config(&bad).is_err());
        Ok(())
    }
}
