//! Runs `qwen-image parity` on the committed VAE references (and the decode part of a t2i dump); every line
//! must pass.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn parity(snapshot: &str, reference: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-image"))
        .arg("parity")
        .arg("--snapshot")
        .arg(fixtures().join(snapshot))
        .arg("--reference")
        .arg(fixtures().join(reference))
        .output()
        .expect("run qwen-image parity");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "parity {reference} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn vae_parity_tiny_64() {
    parity("tiny/snapshot", "tiny/refs/vae_64");
}

#[test]
fn vae_parity_tiny_96x128() {
    parity("tiny/snapshot", "tiny/refs/vae_96x128");
}

#[test]
fn vae_parity_random_three_levels_z8() {
    parity("random_vae/snapshot", "random_vae/refs/vae_40x72");
}

#[test]
fn t2i_parity_including_decode() {
    parity("tiny/snapshot", "tiny/refs/t2i_batch_64x96");
}
