#!/usr/bin/env bash
# Regenerate committed test fixtures (random weights, made locally; nothing is downloaded).
#   tools/make_fixtures.sh            # from the repository root
set -euo pipefail
PY="${PY:-$HOME/.venvs/qwen-image-ref/bin/python}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
H="$ROOT/tools/refharness"

# ---- BEGIN vae fixtures (owner: vae branch) ----------------------------------------------------------------
# tests/fixtures/random_vae: a `random`-preset VAE that the tiny preset does not cover: 3 levels (spatial factor
# 4), z_dim 8, num_res_blocks 2, temperal_downsample [true, false]; only model_index.json + vae/ are kept
# (2.6 MB with the reference). The reference is a 40x72 (non-square) `vae` mode dump.
TMP="$(mktemp -d)"
"$PY" "$H/make_tiny.py" "$TMP/snapshot" --preset random --seed 17 --force
"$PY" "$H/reference.py" "$TMP/snapshot" "$TMP/vae_40x72" --mode vae --height 40 --width 72 --seed 9 --image-seed 2 --force
OUT="$ROOT/tests/fixtures/random_vae"
rm -rf "$OUT"
mkdir -p "$OUT/snapshot" "$OUT/refs"
cp "$TMP/snapshot/model_index.json" "$OUT/snapshot/"
cp -r "$TMP/snapshot/vae" "$OUT/snapshot/"
cp -r "$TMP/vae_40x72" "$OUT/refs/"
rm -rf "$TMP"
# tests/fixtures/vae_tiled: diffusers' tiled decode (enable_tiling(64, 64, 48, 48)) of a fixed latent on the tiny VAE.
mkdir -p "$ROOT/tests/fixtures/vae_tiled"
"$PY" "$ROOT/tools/refharness_vae/tiled_ref.py" "$ROOT/tests/fixtures/tiny/snapshot" "$ROOT/tests/fixtures/vae_tiled/tiny_96x160.safetensors"
du -sh "$OUT" "$ROOT/tests/fixtures/vae_tiled"
# ---- END vae fixtures ----------------------------------------------------------------------------------------
