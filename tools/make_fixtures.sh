#!/usr/bin/env bash
# Regenerates the committed test fixtures under tests/fixtures/ (needs the reference venv).
# Run from the repository root. Each team member's fixtures sit in their own delimited block.
set -euo pipefail
PY="${PY:-$HOME/.venvs/qwen-image-ref/bin/python}"

# ---- BEGIN textenc fixtures (text encoder stage) ----------------------------------------------------------------
# random preset, seed 46: text model with 4 heads / 2 KV heads (GQA group 2), 3 layers, vocab 2048; transformers-5
# (`text_config` + `rope_parameters`) config; no tokenizer.json (vocab.json + merges.txt only, like the released
# Qwen-Image); bf16 weights in 100 KB shards. About 2 MB with its textenc reference.
F=tests/fixtures/random_v5
rm -rf "$F"
"$PY" tools/refharness/make_tiny.py "$F/snapshot" --preset random --seed 46 --te-config-style v5 --no-tokenizer-json \
    --dtype bf16 --max-shard-size 100KB
"$PY" tools/refharness/reference.py "$F/snapshot" "$F/refs/textenc" --mode textenc
# ---- END textenc fixtures ---------------------------------------------------------------------------------------
