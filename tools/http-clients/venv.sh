#!/usr/bin/env bash
# Creates (once, and again when the pins change) the venv of the HTTP API's client tests from
# tools/http-clients/requirements.txt and prints its python: QWEN_IMAGE_HTTP_CLIENTS_VENV (default
# ~/.cache/qwen-image-http-clients/venv). Usage: export QWEN_IMAGE_TEST_PYTHON="$(bash tools/http-clients/venv.sh)"
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
REQ="$ROOT/tools/http-clients/requirements.txt"
VENV="${QWEN_IMAGE_HTTP_CLIENTS_VENV:-$HOME/.cache/qwen-image-http-clients/venv}"
PYTHON="${PYTHON:-python3}"

stamp="$(sha256sum "$REQ" | cut -c1-16)"
if [ "$(cat "$VENV/.requirements-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "creating $VENV (tools/http-clients/requirements.txt)" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$REQ" >&2
  "$VENV/bin/python" -c 'import openai, websockets.sync.client' >&2
  echo "$stamp" > "$VENV/.requirements-stamp"
fi
echo "$VENV/bin/python"
