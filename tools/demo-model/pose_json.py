#!/usr/bin/env python3
"""Writes one OpenPose keypoints JSON per demo pose (a figure of the procedural world, 64x64 canvas), for the
README's pose examples and the end-to-end tests: docs/demo/pose-<name>.json.

    python pose_json.py docs/demo
"""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scene as S  # noqa: E402


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for p, name in enumerate(S.POSE_NAMES):
        r = random.Random(500 + p)
        sc = S.sample_scene(r, 0, p, 0, 0)
        flat = []
        for x, y in S.keypoints(sc):
            flat += [round(float(x), 2), round(float(y), 2), 1.0]
        doc = {"canvas_width": S.SIZE, "canvas_height": S.SIZE, "people": [{"pose_keypoints_2d": flat}]}
        (out / f"pose-{name}.json").write_text(json.dumps(doc) + "\n")


if __name__ == "__main__":
    main()
