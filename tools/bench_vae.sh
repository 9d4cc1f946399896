#!/usr/bin/env bash
# Our VAE decode vs diffusers' on the same snapshot, 2 threads each, in one run; prints medians and the ratio.
#   tools/bench_vae.sh SNAPSHOT [SIZE=512] [REPEATS=5]
# SNAPSHOT: e.g. /tmp/small from `tools/refharness/make_tiny.py /tmp/small --preset small --seed 0`.
# Runs the two alternately (ours, theirs, ours, ...) so background load hits both alike.
set -euo pipefail
SNAP="${1:?usage: bench_vae.sh SNAPSHOT [SIZE] [REPEATS]}"
SIZE="${2:-512}"
REPEATS="${3:-5}"
PY="${PY:-$HOME/.venvs/qwen-image-ref/bin/python}"
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/.."
cargo build -q --release -p qwen-image-model --example vae_decode
OURS=()
THEIRS=()
for _ in $(seq "$REPEATS"); do
  OURS+=("$(RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-1}" ./target/release/examples/vae_decode "$SNAP" "$SIZE" "$SIZE" 1 | awk '/^decode_s/{print $2}')")
  THEIRS+=("$(OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 "$PY" "$HERE/bench_vae.py" "$SNAP" "$SIZE" "$SIZE" 1 2 | awk '/^decode_s/{print $2}')")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
MO=$(median "${OURS[@]}")
MT=$(median "${THEIRS[@]}")
echo "size ${SIZE}x${SIZE}, ${REPEATS} runs each, 2 threads"
echo "ours (candle)      runs: ${OURS[*]}  median ${MO} s"
echo "diffusers (torch)  runs: ${THEIRS[*]}  median ${MT} s"
awk -v a="$MO" -v b="$MT" 'BEGIN{printf "ratio ours/diffusers: %.3f\n", a/b}'
