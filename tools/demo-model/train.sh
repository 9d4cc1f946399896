#!/usr/bin/env bash
# Retrains the demo model from scratch and installs it as the default model (models/qwen-image-demo) with its
# judge (tests/fixtures/judge), then scores it. About 2 hours on 2 CPU cores; needs the reference venv
# (tools/refharness/install.sh).
#   tools/demo-model/train.sh [WORK_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PY:-$HOME/.venvs/qwen-image-ref/bin/python}"
WORK="${1:-$ROOT/target/demo-model}"
mkdir -p "$WORK"
export PYTHONWARNINGS=ignore
"$PY" "$ROOT/tools/demo-model/train.py" all --work "$WORK" --out "$ROOT/models/qwen-image-demo" \
    --judge-out "$ROOT/tests/fixtures/judge" 2>&1 | tee "$WORK/train.log"
"$PY" "$ROOT/tools/demo-model/evaluate.py" --snapshot "$ROOT/models/qwen-image-demo" --judge "$ROOT/tests/fixtures/judge" \
    --out "$ROOT/tools/demo-model/eval.json" --images "$WORK/eval" 2>&1 | tee "$WORK/eval.log"
echo "model: $ROOT/models/qwen-image-demo; scores: tools/demo-model/eval.json; next: tools/make_fixtures.sh demo"
