#!/usr/bin/env bash
# Validates the deployment files offline (no cluster, no Docker engine):
#   1. renders every overlay in deploy/k8s/overlays with kustomize (tools/deploy/render.py; the PyPI package
#      pykustomize bundles kustomize's Go API) and validates the output with `kubernetes-validate --strict`
#      against the Kubernetes 1.31 schemas (cert-manager kinds have no schema there: deploy/tests checks them);
#   2. hadolint on every Dockerfile; yamllint on every YAML file under deploy/;
#   3. deploy/tests/test_manifests.py (pytest): probes, GPU requests, HPAs, PDBs, security contexts,
#      NetworkPolicies, TLS certificates of the rendered manifests.
# The tools live in a venv of their own (pinned in tools/deploy/requirements.txt), created on first use:
# QWEN_IMAGE_DEPLOY_VENV (default ~/.cache/qwen-image-deploy/venv); re-created when the pins change.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REQ="$ROOT/tools/deploy/requirements.txt"
VENV="${QWEN_IMAGE_DEPLOY_VENV:-$HOME/.cache/qwen-image-deploy/venv}"
K8S_VERSION=1.31
PYTHON="${PYTHON:-python3}"

stamp="$(sha256sum "$REQ" | cut -c1-16)"
if [ "$(cat "$VENV/.requirements-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "creating $VENV (tools/deploy/requirements.txt)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --ignore-requires-python -r "$REQ"
  echo "$stamp" > "$VENV/.requirements-stamp"
fi
BIN="$VENV/bin"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
mapfile -t rendered < <("$BIN/python" "$ROOT/tools/deploy/render.py" "$OUT")
[ ${#rendered[@]} -gt 0 ] || { echo "no overlay rendered" >&2; exit 1; }
for f in "${rendered[@]}"; do
  "$BIN/kubernetes-validate" --strict --quiet --no-warn -k "$K8S_VERSION" "$f"
  echo "$(basename "$f" .yaml): $(grep -c '^kind:' "$f") objects render and validate (Kubernetes $K8S_VERSION, strict)"
done

cd "$ROOT"
mapfile -t dockerfiles < <(ls deploy/Dockerfile*)
# DL3008: apt packages are not pinned to versions (Debian's security updates would break the pins).
"$BIN/hadolint" --ignore DL3008 "${dockerfiles[@]}"
echo "hadolint: ${dockerfiles[*]} ok"
"$BIN/yamllint" --strict -d '{extends: default, rules: {line-length: {max: 130}, document-start: disable, comments: {min-spaces-from-content: 1}, braces: {max-spaces-inside: 1}, truthy: {check-keys: false}}}' deploy/
echo "yamllint: deploy/ ok"

"$BIN/python" -m pytest -q -p no:cacheprovider deploy/tests
