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

/// Bytes `range` of the tensor `name` whose data (`len` bytes) starts at byte `start` of `file` (`path`): one
/// positioned read, bounds checked.
fn read_tensor_bytes(
    path: &std::path::Path,
    file: &std::sync::Mutex<std::fs::File>,
    name: &str,
    start: u64,
    len: u64,
    range: std::ops::Range<u64>,
) -> candle_core::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    if range.start > range.end || range.end > len {
        return Err(err(format!(
            "{}: byte range {range:?} is outside tensor `{name}` ({len} bytes)",
            path.display()
        )));
    }
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    let mut f = file
        .lock()
        .map_err(|_| err(format!("{}: file handle poisoned", path.display())))?;
    f.seek(SeekFrom::Start(start + range.start))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| {
            err(format!(
                "{}: cannot read tensor `{name}`: {e}",
                path.display()
            ))
        })?;
    Ok(buf)
}
