#!/usr/bin/env bash
# One denoising step with true CFG: our transformer vs diffusers' on the same snapshot, 2 threads each, in one run.
#   tools/bench/denoise_step.sh SNAPSHOT [WIDTH HEIGHT REPEATS]
# SNAPSHOT: e.g. the refharness `small` preset (tools/refharness/make_tiny.py /tmp/small --preset small --seed 0).
set -euo pipefail
SNAP="${1:?usage: denoise_step.sh SNAPSHOT [WIDTH HEIGHT REPEATS]}"
W="${2:-512}"; H="${3:-512}"; N="${4:-5}"
PY="${PY:-$HOME/.venvs/qwen-image-ref/bin/python}"
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/../.."
cargo build -q --release -p qwen-image-model --bench denoise_step
BIN=$(ls -t target/release/deps/denoise_step-* | grep -v '\.d$' | head -1)
ours=$(RAYON_NUM_THREADS=2 "$BIN" "$SNAP" "$W" "$H" "$N")
theirs=$("$PY" "$HERE/denoise_step.py" "$SNAP" --width "$W" --height "$H" --repeats "$N" --threads 2)
echo "$ours"
echo "$theirs"
python3 - "$ours" "$theirs" <<'PYEOF'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"denoise step {o['width']}x{o['height']} ({o['tokens']} tokens, CFG): ours {o['median_s']:.3f}s  diffusers {t['median_s']:.3f}s  ratio {o['median_s']/t['median_s']:.2f}x")
PYEOF
