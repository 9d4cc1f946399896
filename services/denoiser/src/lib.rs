//! The qwen-image denoiser stage: a gRPC service running the Qwen-Image transformer's denoising loop on
//! a worker thread behind a bounded admission queue. `main.rs` parses flags and calls [`run`].

pub mod config;
pub mod error;
pub mod job;
pub mod model;
pub mod server;
pub mod service;
pub mod stats;
pub mod validate;

pub use config::{Args, DenoiserConfig, DeviceSpec};
pub use error::DenoiserError;
pub use server::{SERVICE_NAME, run, run_with_stats};
pub use stats::{Stats, StatsSnapshot};
