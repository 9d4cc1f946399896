#!/usr/bin/env bash
# Fixtures for the stage contracts (issue 15): full `random` snapshots whose geometry differs from
# Qwen-Image's, each with a ControlNet, and diffusers' references for text-to-image, inpaint and ControlNet
# pose through the four services (crates/cli/tests/e2e_geometry.rs) and for `qwen-image parity`:
#   random-8   VAE with 3 levels (scale factor 4), z_dim 4
#   random-16  VAE with 3 levels (scale factor 4), z_dim 8
# Small sizes (multiples of 8) and 2-3 steps keep the end-to-end tests fast. Needs the reference venv.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$HOME/.venvs/qwen-image-ref/bin/python}"
H="$ROOT/tools/refharness"
F="$ROOT/tests/fixtures"
ref() { local snap="$1" out="$2"; shift 2; "$PY" "$H/reference.py" "$snap" "$out" --force "$@" > /dev/null; echo "ok $out"; }

for seed in 8 16; do
  D="$F/random-$seed"
  rm -rf "$D" && mkdir -p "$D/refs"
  "$PY" "$H/make_tiny.py" "$D/snapshot" --preset random --seed "$seed" --controlnet --force > /dev/null
  ref "$D/snapshot" "$D/refs/t2i_40x48" --mode t2i --height 48 --width 40 --steps 3 --seed 5 \
    --negative-prompt " " --prompt "a red kite over the sea, 海边的红色风筝" --dump-steps first
  ref "$D/snapshot" "$D/refs/inpaint_48x40" --mode inpaint --height 40 --width 48 --steps 3 --strength 0.7 \
    --seed 11 --image-seed 3 --negative-prompt " " --prompt "a boat on a lake" --dump-steps first
  ref "$D/snapshot" "$D/refs/controlnet_40x40" --mode controlnet --height 40 --width 40 --steps 2 --seed 4 \
    --image-seed 2 --conditioning-scale 0.8 --negative-prompt " " --prompt "a dancer on a stage" --dump-steps first
  rm -f "$D"/refs/*/*.log "$D"/refs/*/timing.json
done
du -sh "$F"/random-8 "$F"/random-16
