//! Where the model comes from when the user names none: the demo model (`models/qwen-image-demo`, trained by
//! `tools/demo-model`), embedded in this binary.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_model.rs"));
}

/// The default model's directory in the source tree, relative to the workspace root.
pub const DEFAULT_MODEL_RELATIVE: &str = "models/qwen-image-demo";

/// The default model as a snapshot directory: the source tree's copy when this binary runs from the tree it
/// was built in (`cargo run`, tests), otherwise the copy embedded in the binary, written once to
/// `$QWEN_IMAGE_CACHE_DIR` (default `$XDG_CACHE_HOME/qwen-image-serve`, `~/.cache/qwen-image-serve`) under
/// a name carrying its content hash.
pub fn default_model_dir() -> Result<PathBuf> {
    let tree = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(DEFAULT_MODEL_RELATIVE);
    if tree.join("model_index.json").is_file() {
        return Ok(tree.canonicalize().unwrap_or(tree));
    }
    extract_embedded(&cache_root()?)
}

fn cache_root() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("QWEN_IMAGE_CACHE_DIR") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(d).join("qwen-image-serve"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        return Ok(PathBuf::from(h).join(".cache/qwen-image-serve"));
    }
    bail!(
        "no place to unpack the embedded default model: set QWEN_IMAGE_CACHE_DIR, or pass --model DIR (a \
         diffusers Qwen-Image snapshot directory)"
    )
}

/// Writes the embedded snapshot under `root` (atomically: a temporary directory renamed into place) unless
/// it is there already, and returns its directory.
pub fn extract_embedded(root: &Path) -> Result<PathBuf> {
    if embedded::FILES.is_empty() {
        bail!(
            "this binary was built without the default model ({DEFAULT_MODEL_RELATIVE} was missing); pass --model \
             DIR (a diffusers Qwen-Image snapshot directory) or --gateway URL"
        );
    }
    let dir = root.join(format!("qwen-image-demo-{:016x}", embedded::HASH));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(root)
        .with_context(|| format!("cannot create {} for the default model", root.display()))?;
    let tmp = root.join(format!(
        ".qwen-image-demo-{}-{}",
        std::process::id(),
        embedded::HASH
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    for (rel, bytes) in embedded::FILES {
        let path = tmp.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // another process unpacked it first
        Err(_) if dir.join("model_index.json").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot move the default model to {}", dir.display()))
        }
    }
}

/// Defaults a snapshot declares for its requests (`qwen-image-serve.json`: `{"default_size": [W, H]}`); the
/// demo model draws at 64x64, where the gateway's own default is 1024x1024.
pub fn model_default_size(model: &Path) -> Option<(u32, u32)> {
    let text = std::fs::read(model.join("qwen-image-serve.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let s = v.get("default_size")?.as_array()?;
    let w = u32::try_from(s.first()?.as_u64()?).ok()?;
    let h = u32::try_from(s.get(1)?.as_u64()?).ok()?;
    Some((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_model_unpacks_once_and_loads_like_the_tree_copy() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = extract_embedded(root.path()).expect("unpacks");
        let tree = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/qwen-image-demo");
        for (rel, bytes) in embedded::FILES {
            let on_disk = std::fs::read(tree.join(rel)).expect("tree file");
            assert_eq!(&on_disk[..], *bytes, "{rel} differs from the tree copy");
            assert_eq!(std::fs::read(dir.join(rel)).expect("unpacked"), on_disk);
        }
        assert!(dir.join("transformer/config.json").is_file());
        // second call reuses it
        assert_eq!(extract_embedded(root.path()).expect("again"), dir);
        assert_eq!(model_default_size(&dir), Some((64, 64)));
    }
}

/// The adapters a local stack's denoiser loads for `request`: `given` (the `--lora FILE` ones), then for each
/// adapter the request names that `given` lacks, `MODEL/loras/NAME.safetensors` when it exists (a name found
/// nowhere reaches the denoiser, which answers NOT_FOUND naming what it loaded).
pub fn model_loras(
    model: &Path,
    given: &[qwen_image_denoiser::adapters::LoraSpec],
    request: &crate::generate::ApiRequest,
) -> Vec<qwen_image_denoiser::adapters::LoraSpec> {
    let mut out = given.to_vec();
    for r in request
        .settings()
        .map(|s| s.loras.as_slice())
        .unwrap_or_default()
    {
        let file = model.join("loras").join(format!("{}.safetensors", r.name));
        if !out.iter().any(|l| l.name == r.name) && file.is_file() {
            out.push(qwen_image_denoiser::adapters::LoraSpec {
                name: r.name.clone(),
                file,
            });
        }
    }
    out
}
