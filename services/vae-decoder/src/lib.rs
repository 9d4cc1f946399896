//! The qwen-image VAE stage: a gRPC service decoding latents to RGB8 images and encoding images to the
//! latent posterior, on a worker thread behind a bounded admission queue. `main.rs` parses flags and
//! calls [`run`].

pub mod config;
pub mod error;
pub mod job;
pub mod model;
pub mod server;
pub mod service;
pub mod validate;

pub use config::{Args, DeviceSpec, VaeServiceConfig};
pub use error::VaeError;
pub use server::{SERVICE_NAME, run};
