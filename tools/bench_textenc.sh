#!/usr/bin/env bash
# Text-encoder benchmark: our PromptEncoder::encode vs diffusers' encode_prompt (transformers) on the same
# snapshot and prompt, 2 threads each, CPU f32. Prints both JSON lines and the ours/theirs median ratio.
#   tools/bench_textenc.sh [SNAPSHOT=/tmp/small] [ITERS=30]
# Make the snapshot with: $PY tools/refharness/make_tiny.py /tmp/small --preset small --seed 0
set -euo pipefail
SNAP="${1:-/tmp/small}"
ITERS="${2:-30}"
PY="${PY:-$HOME/.venvs/qwen-image-ref/bin/python}"
PROFILE="${PROFILE:-dev}"   # dev builds dependencies (candle, gemm) at opt-level 3; PROFILE=release for a full release build
# ~100-token prompt (the token count depends on the snapshot's vocabulary; both sides print it)
PROMPT="${PROMPT:-A cozy coffee shop at dawn, warm light through tall windows, a chalkboard menu reading \"Fresh Espresso\", steam rising from ceramic cups, a smiling barista, a cat asleep on a stool, rain outside, cinematic, photorealistic.}"
export OMP_WAIT_POLICY=PASSIVE RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-1}" OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
cd "$(dirname "$0")/.."
cargo build -q --profile "$PROFILE" -p qwen-image-model --example bench_textenc
DIR=debug; [ "$PROFILE" = release ] && DIR=release
ours=$("target/$DIR/examples/bench_textenc" "$SNAP" "$ITERS" "$PROMPT")
theirs=$("$PY" tools/bench_textenc.py "$SNAP" "$ITERS" "$PROMPT" 2)
echo "$ours"
echo "$theirs"
"$PY" - "$ours" "$theirs" <<'PYEOF'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert o["tokens"] == t["tokens"], (o["tokens"], t["tokens"])
print(f"tokens {o['tokens']}  median: ours {o['median_ms']:.2f} ms  transformers {t['median_ms']:.2f} ms  "
      f"ratio ours/theirs {o['median_ms'] / t['median_ms']:.2f}x | min: ours {o['min_ms']:.2f} ms  "
      f"transformers {t['min_ms']:.2f} ms  ratio {o['min_ms'] / t['min_ms']:.2f}x ({o['iters']} runs, 2 threads)")
PYEOF
