#!/usr/bin/env bash
# One denoising step with true CFG: our transformer vs diffusers' on the same snapshot, 2 threads each.
# The two alternate ROUNDS times (each round: one process each, REPEATS timed steps after a warm-up), so both
# see the same machine load; prints every round's medians and the median of the per-round ratios.
#   tools/bench/denoise_step.sh SNAPSHOT [WIDTH HEIGHT REPEATS ROUNDS]
# SNAPSHOT: e.g. the refharness `small` preset (tools/refharness/make_tiny.py /tmp/small --preset small --seed 0).
set -euo pipefail
SNAP="${1:?usage: denoise_step.sh SNAPSHOT [WIDTH HEIGHT REPEATS ROUNDS]}"
W="${2:-512}"; H="${3:-512}"; N="${4:-5}"; R="${5:-5}"
PY="${PY:-$HOME/.venvs/qwen-image-ref/bin/python}"
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/../.."
cargo build -q --release -p qwen-image-model --bench denoise_step
BIN=$(ls -t target/release/deps/denoise_step-* | grep -v '\.d$' | head -1)
results=()
for _ in $(seq "$R"); do
  ours=$(BENCH_MALLOPT=1 RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-1}" "$BIN" "$SNAP" "$W" "$H" "$N")
  theirs=$("$PY" "$HERE/denoise_step.py" "$SNAP" --width "$W" --height "$H" --repeats "$N" --threads 2)
  results+=("$ours" "$theirs")
done
python3 - "${results[@]}" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(a) for a in sys.argv[1:]]
pairs = list(zip(rows[0::2], rows[1::2]))
ratios = []
for o, t in pairs:
    r = o["median_s"] / t["median_s"]
    ratios.append(r)
    print(f"round: ours {o['median_s']:.3f}s  diffusers {t['median_s']:.3f}s  ratio {r:.2f}x")
o = pairs[0][0]
print(f"denoise step {o['width']}x{o['height']} ({o['tokens']} tokens, CFG), {len(pairs)} rounds: "
      f"ours median {statistics.median(p[0]['median_s'] for p in pairs):.3f}s, "
      f"diffusers median {statistics.median(p[1]['median_s'] for p in pairs):.3f}s, "
      f"median ratio {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
PYEOF
