#!/usr/bin/env python3
"""Render each kustomize overlay in deploy/k8s/overlays (and deploy/k8s/model-download) without a cluster, as
`kubectl kustomize` would.

Rendering uses the real kustomize (its Go API, bundled by the PyPI package pykustomize), not a re-implementation.
Usage: render.py OUT_DIR   -> writes OUT_DIR/<name>.yaml for each of them, prints the paths.
"""

import asyncio
import sys
from pathlib import Path

import pykustomize

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OVERLAYS = K8S / "overlays"
# Applied on its own, beside an overlay.
EXTRAS = [K8S / "model-download"]


def overlays() -> list[Path]:
    return sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file())


async def render(overlay: Path) -> str:
    # LEGACY order: Namespace first, then ServiceAccounts, ConfigMaps, ... as kubectl applies them.
    options = pykustomize.BuildOptions(reorder=pykustomize.ReorderOption.LEGACY)
    return (await pykustomize.build(str(overlay), options)).yaml


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for overlay in overlays() + EXTRAS:
        try:
            text = asyncio.run(render(overlay))
        except pykustomize.KustomizeError as e:
            print(f"kustomize build {overlay} failed: {e}", file=sys.stderr)
            return 1
        target = out / f"{overlay.name}.yaml"
        target.write_text(text)
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
