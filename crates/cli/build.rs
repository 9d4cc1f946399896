//! Embeds the default model (`models/qwen-image-demo`, the demo model the project trains with
//! `tools/demo-model`) in the `qwen-image` binary, so that a binary copied anywhere still has a model.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(root, &p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest.join("../../models/qwen-image-demo");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut list = Vec::new();
    files(&root, &root, &mut list);
    let mut code = String::from(
        "/// (path relative to the snapshot root, contents)\npub static FILES: &[(&str, &[u8])] = &[\n",
    );
    // FNV-1a over names and contents: names the extracted copy, so a rebuilt binary never reuses a stale one.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for p in &list {
        println!("cargo:rerun-if-changed={}", p.display());
        let rel = p
            .strip_prefix(&root)
            .expect("under root")
            .to_string_lossy()
            .replace('\\', "/");
        mix(rel.as_bytes());
        mix(&std::fs::read(p).expect("readable model file"));
        let abs = p.canonicalize().expect("canonical path");
        writeln!(
            code,
            "    ({rel:?}, include_bytes!({:?})),",
            abs.display().to_string()
        )
        .expect("string");
    }
    code.push_str("];\n");
    writeln!(
        code,
        "/// Content hash of the embedded files.\npub const HASH: u64 = {hash:#x};"
    )
    .expect("string");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("embedded_model.rs");
    std::fs::write(out, code).expect("write embedded_model.rs");
}
