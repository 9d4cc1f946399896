//! Identities of what a stage serves: digests of snapshot folders (see `StageDescription` in
//! `proto/qwen_image/v1/stage.proto` for what they cover).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bytes read from each end of a weight file for its digest (the safetensors header is at the start).
pub const WEIGHT_SAMPLE_BYTES: u64 = 64 << 10;

/// Text files (configs, tokenizer files) are hashed whole; everything else is a weight file and sampled.
fn is_text(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("json" | "txt" | "model" | "jinja")
    )
}

fn files_below(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files_below(&path, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn feed_file(h: &mut Sha256, path: &Path, name: &str, whole: bool) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(size.to_le_bytes());
    if whole || size <= 2 * WEIGHT_SAMPLE_BYTES {
        let mut buf = Vec::with_capacity(size as usize);
        f.read_to_end(&mut buf)?;
        h.update(&buf);
    } else {
        let mut buf = vec![0u8; WEIGHT_SAMPLE_BYTES as usize];
        f.read_exact(&mut buf)?;
        h.update(&buf);
        f.seek(SeekFrom::End(-(WEIGHT_SAMPLE_BYTES as i64)))?;
        f.read_exact(&mut buf)?;
        h.update(&buf);
    }
    Ok(())
}

/// Digest of the files below `root`/`dir` for each of `dirs` (names relative to `root`, so two copies of
/// a snapshot in different places agree): text files whole, weight files by name, size and both ends.
/// `text_only` skips weight files entirely.
pub fn digest(root: &Path, dirs: &[&str], text_only: bool) -> std::io::Result<String> {
    let mut files = Vec::new();
    for d in dirs {
        let dir = root.join(d);
        if dir.is_dir() {
            files_below(&dir, &mut files)?;
        } else if dir.is_file() {
            files.push(dir);
        }
    }
    let mut named: Vec<(String, PathBuf)> = files
        .into_iter()
        .filter(|p| !text_only || is_text(p))
        .map(|p| {
            let name = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .replace('\\', "/");
            (name, p)
        })
        .collect();
    named.sort();
    let mut h = Sha256::new();
    for (name, path) in &named {
        feed_file(&mut h, path, name, is_text(path))?;
    }
    Ok(hex(&h.finalize()))
}

/// Marker digested in place of the config files when a stage runs the released model's config (no snapshot).
pub const RELEASED_CONFIG: &str = "released-config";

/// Digest of a component whose weights may come from a single file (`--transformer-weights FILE`, ...):
/// without `file`, [`digest`] of the snapshot folders `dirs`; with it, the snapshot's text files of `dirs`
/// (configs; [`RELEASED_CONFIG`] without a snapshot), then the file by size and both ends under a fixed name
/// (two copies of one file in different places agree), then `extra` folders or files (a tokenizer) by their
/// own digest.
pub fn component_digest(
    snapshot: Option<&Path>,
    dirs: &[&str],
    file: Option<&Path>,
    extra: &[&Path],
) -> std::io::Result<String> {
    let Some(file) = file else {
        if let Some(root) = snapshot
            && extra.is_empty()
        {
            return digest(root, dirs, false);
        }
        let mut h = Sha256::new();
        if let Some(root) = snapshot {
            h.update(digest(root, dirs, false)?.as_bytes());
        }
        feed_extra(&mut h, extra)?;
        return Ok(hex(&h.finalize()));
    };
    let mut h = Sha256::new();
    match snapshot {
        Some(root) => h.update(digest(root, dirs, true)?.as_bytes()),
        None => h.update(RELEASED_CONFIG.as_bytes()),
    }
    feed_file(&mut h, file, "weights-file", false)?;
    feed_extra(&mut h, extra)?;
    Ok(hex(&h.finalize()))
}

fn feed_extra(h: &mut Sha256, extra: &[&Path]) -> std::io::Result<()> {
    for p in extra {
        let d = match (p.parent(), p.file_name().and_then(|n| n.to_str())) {
            (Some(parent), Some(name)) => digest(parent, &[name], false)?,
            _ => digest(p, &["."], false)?,
        };
        h.update(d.as_bytes());
    }
    Ok(())
}

/// What a stage without a snapshot calls its model: the weights file's name.
pub fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The snapshot's identity: its `model_index.json` and every config and tokenizer file of its folders
/// (not the weights), so every stage started from one snapshot reports the same value.
pub fn snapshot_digest(snapshot: &Path) -> std::io::Result<String> {
    digest(snapshot, &["."], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_name_content_and_sampled_weights() {
        let dir = std::env::temp_dir().join(format!("qwen-image-digest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("vae")).expect("mkdir");
        std::fs::write(dir.join("vae/config.json"), b"{\"z_dim\": 16}").expect("write");
        let big = vec![7u8; 3 * WEIGHT_SAMPLE_BYTES as usize];
        std::fs::write(dir.join("vae/w.safetensors"), &big).expect("write");
        let a = digest(&dir, &["vae"], false).expect("digest");
        assert_eq!(a.len(), 64);
        assert_eq!(a, digest(&dir, &["vae"], false).expect("again"));
        let configs = snapshot_digest(&dir).expect("snapshot");
        // a change in the middle of a weight file is not seen (sampled), one at its end is
        let mut mid = big.clone();
        mid[WEIGHT_SAMPLE_BYTES as usize + 5] = 8;
        std::fs::write(dir.join("vae/w.safetensors"), &mid).expect("write");
        assert_eq!(a, digest(&dir, &["vae"], false).expect("digest"));
        let mut end = big;
        *end.last_mut().expect("bytes") = 9;
        std::fs::write(dir.join("vae/w.safetensors"), &end).expect("write");
        assert_ne!(a, digest(&dir, &["vae"], false).expect("digest"));
        assert_eq!(
            configs,
            snapshot_digest(&dir).expect("weights do not count")
        );
        std::fs::write(dir.join("vae/config.json"), b"{\"z_dim\": 4}").expect("write");
        assert_ne!(configs, snapshot_digest(&dir).expect("configs count"));
        // a single weights file: its content counts, not its place or name; the config counts too
        let a = dir.join("a.gguf");
        std::fs::write(&a, &mid).expect("write");
        let other = dir.join("vae/b.gguf");
        std::fs::write(&other, &mid).expect("write");
        let one = component_digest(Some(&dir), &["vae"], Some(&a), &[]).expect("digest");
        assert_eq!(
            one,
            component_digest(Some(&dir), &["vae"], Some(&other), &[]).expect("copy")
        );
        let released = component_digest(None, &["vae"], Some(&a), &[]).expect("released");
        assert_ne!(one, released);
        std::fs::write(&other, &end).expect("write");
        assert_ne!(
            one,
            component_digest(Some(&dir), &["vae"], Some(&other), &[]).expect("other file")
        );
        // the tokenizer folder given apart counts
        let tok = dir.join("tok");
        std::fs::create_dir_all(&tok).expect("mkdir");
        std::fs::write(tok.join("tokenizer.json"), b"{}").expect("write");
        let with_tok = component_digest(None, &[], Some(&a), &[&tok]).expect("tok");
        std::fs::write(tok.join("tokenizer.json"), b"{\"x\": 1}").expect("write");
        assert_ne!(
            with_tok,
            component_digest(None, &[], Some(&a), &[&tok]).expect("tok")
        );
        assert_eq!(
            digest(&dir, &["vae"], false).expect("digest"),
            component_digest(Some(&dir), &["vae"], None, &[]).expect("snapshot only")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
