#!/usr/bin/env python3
"""Writes docs/demo/reference-<pose>.png: one world picture per pose (tools/demo-model/scene.py, held-out
(colour, pose, background) combinations, fixed seed), the reference pictures of README's "Pose from a reference
picture" and of crates/cli/tests/e2e_reference_pose.rs; docs/demo/no-person.png (a background and the sun,
nobody); and their true COCO-18 keypoints in tests/fixtures/openpose_body/demo_references.json (pixels, for
services/pose-detector/tests/demo_detector.rs).

    python3 tools/openpose/demo_references.py        (Pillow and numpy only)
"""
import dataclasses
import json
import random
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "demo-model"))

import scene as S  # noqa: E402

SEED = 2022


def main() -> int:
    out = ROOT / "docs" / "demo"
    r = random.Random(SEED)
    held = S.held_out_triples()
    truth = {}
    for pose, name in enumerate(S.POSE_NAMES):
        c, _, b = next(t for t in held if t[1] == pose)
        sc = S.sample_scene(r, c, pose, b, 0)
        Image.fromarray(S.render(sc)).save(out / f"reference-{name}.png")
        truth[f"reference-{name}"] = [[round(float(x), 3), round(float(y), 3)] for x, y in S.keypoints(sc)]
        print(out / f"reference-{name}.png", S.COLOURS[c][0], name, S.BACKGROUNDS[b][0])
    sc = S.sample_scene(r, 0, 0, 3, 1)
    Image.fromarray(S.render(dataclasses.replace(sc, cx=-1000.0))).save(out / "no-person.png")
    print(out / "no-person.png")
    truth["no-person"] = []
    fixture = ROOT / "tests" / "fixtures" / "openpose_body" / "demo_references.json"
    fixture.write_text(json.dumps(truth, indent=1) + "\n")
    print(fixture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
