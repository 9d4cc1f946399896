//! The qwen-image gateway: the public `qwen_image.v1.ImageGenerator` API, orchestrating the text-encoder,
//! denoiser and VAE stage services over gRPC. Never links candle.

pub mod cn_inpaint;
pub mod config;
pub mod edit;
pub mod error;
pub mod images;
pub mod pngmeta;
pub mod pool;
pub mod pose;
pub mod server;
pub mod service;
pub mod stages;
pub mod t2i;
pub mod validate;

pub use config::{Args, GatewayArgs, GatewayConfig};
pub use error::{GatewayError, StageName};
pub use server::{SERVICE_NAME, run};
pub use service::REQUEST_ID_KEY;
