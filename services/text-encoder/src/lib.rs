//! The qwen-image text-encoder stage: a gRPC service encoding prompts with Qwen2.5-VL on a worker thread
//! behind a bounded admission queue. `main.rs` parses flags and calls [`run`].

pub mod config;
pub mod error;
pub mod job;
pub mod model;
pub mod server;
pub mod service;
pub mod validate;

pub use config::{Args, DeviceSpec, TextEncoderConfig};
pub use error::TextEncoderError;
pub use server::{SERVICE_NAME, run};
