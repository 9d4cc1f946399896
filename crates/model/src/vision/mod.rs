//! The image side of Qwen2.5-VL as Qwen-Image-Edit uses it: `Qwen2VLImageProcessor` preprocessing
//! ([`processor`]) and the vision tower ([`tower`], transformers 5.23 `Qwen2_5_VisionTransformerPretrainedModel`),
//! configured by the `vision_config` of `text_encoder/config.json` ([`config`]).

pub mod config;
pub mod processor;
pub mod tower;

pub use config::VisionConfig;
pub use processor::{ImageProcessor, ImageProcessorConfig, PixelValues};
pub use tower::VisionTower;
