#!/usr/bin/env bash
# CI's GPU build check, without a GPU: builds the CUDA toolkit folder from NVIDIA's PyPI wheels
# (tools/cuda/toolkit.sh, the recipe of ../shared/reference/cuda-build.md), compiles every service binary (the
# four stages with `cuda`; the gateway, which never links candle's GPU code, as is) and the CLI with
# `--features cuda`, then starts the denoiser with `--device cuda:0` against the stub driver and
# requires a clean start-up error (exit status 1, a message naming CUDA), not a crash or a signal.
#   tools/cuda/check.sh            # cache in ~/.cache/qwen-image-cuda (venv + its own target dir)
#   QWEN_IMAGE_CUDA_CACHE=DIR QWEN_IMAGE_CUDA_TARGET_DIR=DIR tools/cuda/check.sh   # elsewhere
# Cold (2026-12-07, 2 cores shared with a niced release build): toolkit venv under a minute, the build 30 min wall,
# 20 min of CPU (candle-kernels' nvcc about 8 of them); warm (only our crates changed): a few minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${QWEN_IMAGE_CUDA_CACHE:-$HOME/.cache/qwen-image-cuda}"
mkdir -p "$CACHE"
"$ROOT/tools/cuda/toolkit.sh" "$CACHE/venv" > "$CACHE/toolkit-env.sh"
# shellcheck disable=SC1091
. "$CACHE/toolkit-env.sh"
export LIBRARY_PATH="$CUDA_HOME/lib:$CUDA_HOME/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
# A target dir of its own (the cuda feature changes candle and every crate above it).
export CARGO_TARGET_DIR="${QWEN_IMAGE_CUDA_TARGET_DIR:-$CACHE/target}"

cd "$ROOT"
start=$(date +%s)
cargo build --locked --bins --features qwen-image-cli/cuda -p qwen-image-denoiser -p qwen-image-text-encoder \
  -p qwen-image-vae -p qwen-image-pose-detector -p qwen-image-gateway -p qwen-image-cli
echo "cuda build: $(( $(date +%s) - start )) s (stages, gateway and CLI, --features cuda, compute capability $CUDA_COMPUTE_CAP)"

# Start-up on a machine without a GPU driver: the stub libcuda answers CUDA_ERROR_STUB_LIBRARY (34).
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
LD_LIBRARY_PATH="$CUDA_HOME/lib/stubs:$CUDA_HOME/lib" timeout 120 \
  "$CARGO_TARGET_DIR/debug/qwen-image-denoiser" --model "$ROOT/tests/fixtures/tiny/snapshot" \
  --listen 127.0.0.1:0 --device cuda:0 >"$log" 2>&1
status=$?
set -e
if [ "$status" -ne 1 ]; then
  echo "the CUDA denoiser on the stub driver exited with $status (want 1, a clean start-up error):" >&2
  cat "$log" >&2
  exit 1
fi
# (`jobs_panicked: 0` in the stage's start-up statistics is not a panic: look for the panic message itself.)
if grep -qE 'panicked at|RUST_BACKTRACE' "$log" || ! grep -q 'cannot open CUDA device cuda:0' "$log"; then
  echo "the CUDA denoiser's start-up error is not a clear CUDA message:" >&2
  cat "$log" >&2
  exit 1
fi
echo "cuda start-up on the stub driver: exit 1, $(grep 'cannot open CUDA device' "$log" | tail -n1)"
