//! Damaged copies of weight files for the refusal tests (model crate and services).

use std::path::{Path, PathBuf};

/// A copy of `src` in `dir` (same file name) with its bytes changed by `f`.
pub fn patched_copy(src: &Path, dir: &Path, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(src).expect("read");
    f(&mut bytes);
    let out = dir.join(src.file_name().expect("name"));
    std::fs::write(&out, bytes).expect("write");
    out
}

/// Byte offset of the type id of tensor `name` in a GGUF header (after `len name n_dims dims`).
pub fn gguf_type_offset(bytes: &[u8], name: &str) -> usize {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat.as_slice())
        .unwrap_or_else(|| panic!("{name} not in header"));
    let dims_at = at + pat.len();
    let n_dims =
        u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().expect("4 bytes")) as usize;
    dims_at + 4 + 8 * n_dims
}
