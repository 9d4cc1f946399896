//! Where the model comes from when the user names none.

use std::path::PathBuf;

use anyhow::{Result, bail};

/// The embedded default model. For now: the committed tiny fixture snapshot
/// (`tests/fixtures/tiny/snapshot`), found next to the source tree this binary was built from, or relative
/// to the executable (`target/<profile>/qwen-image` → the workspace root two levels up). A later issue
/// replaces it with a trained demo model; keep the lookup here, in one function.
pub fn default_model_dir() -> Result<PathBuf> {
    const RELATIVE: &str = "tests/fixtures/tiny/snapshot";
    let mut candidates = vec![
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(RELATIVE),
    ];
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join(RELATIVE));
        }
    }
    for c in &candidates {
        if c.join("model_index.json").is_file() {
            return Ok(c.canonicalize().unwrap_or_else(|_| c.clone()));
        }
    }
    bail!(
        "no default model found (looked for {RELATIVE} near the source tree and the executable); pass --model DIR \
         (a diffusers Qwen-Image snapshot directory) or --gateway URL"
    )
}
