//! Qwen-Image in pure candle: snapshot loading, the MMDiT transformer, the flow-match scheduler, latent
//! packing and the denoising loop, the Qwen2.5-VL text encoder and the VAE.
//!
//! No async, no I/O beyond reading weights and configs, no environment variables, no printing. Errors are
//! `candle_core::Result` with messages naming the file, tensor or shape at fault.

pub mod batch;
pub mod controlnet;
pub mod cpu_kernels;
pub mod denoise;
pub mod device;
pub mod edit;
pub mod edit_prompt;
pub mod interrupt;
pub mod latents;
pub mod lora;
pub mod nn;
pub mod openpose;
pub mod prompt;
pub mod rope;
pub mod scheduler;
pub mod snapshot;
pub mod source;
pub mod text_encoder;
pub mod tokenizer;
pub mod transformer;
pub mod vae;
pub mod vision;
pub mod weights;

pub use candle_core;
