//! Reading weights: diffusers snapshot folders, single safetensors files (diffusers names, ComfyUI names, fp8
//! e4m3fn and ComfyUI "scaled" fp8, the original Wan VAE layout) and GGUF files (city96/QuantStack transformers,
//! llama.cpp text encoders).
//!
//! - [`store::WeightStore`]: the tensors of one component under the model's names, read with positioned reads
//!   (nothing stays memory-mapped: each tensor is copied once into its final storage, so resident memory is the
//!   weights the model keeps).
//! - [`VarBuilder`]: what the model files load through; dense tensors arrive in the stage dtype, linear weights
//!   stored as ggml blocks or fp8 stay that way ([`packed`]) and are turned into the activation dtype per layer
//!   at forward time.
//! - [`MemoryReport`]: resident bytes by storage format.

pub mod builder;
pub mod gguf;
pub mod naming;
pub mod packed;
pub mod report;
pub mod safetensors;
pub mod store;

pub use builder::VarBuilder;
pub use packed::{PackedWeight, Part, QuantMatmul};
pub use report::{FormatUsage, MemoryReport, human_bytes};
pub use store::{EmbeddingTable, LinearWeight, WeightStore};

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}
