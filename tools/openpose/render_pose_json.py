#!/usr/bin/env python3
"""Renders an OpenPose keypoints JSON file to the skeleton PNG with controlnet-aux's own `draw_poses`.

    python render_pose_json.py POSE.json OUT.png WIDTH HEIGHT

Keypoints are handed to controlnet-aux as `imaging::openpose` hands them to its renderer: pixel coordinates
divided by canvas_width / canvas_height (float64), confidence <= 0 = missing; body, hands and face are drawn.
Only pixel-coordinate JSON with a canvas size is supported here (that is what docs/pose-example.json is).
"""
import json
import sys
import warnings

warnings.filterwarnings("ignore")
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from controlnet_aux.open_pose import PoseResult, draw_poses  # noqa: E402
from controlnet_aux.open_pose.body import BodyResult, Keypoint  # noqa: E402


def kps(flat, cw, ch, missing):
    out = []
    for i in range(0, len(flat), 3):
        x, y, c = flat[i:i + 3]
        out.append(Keypoint(x=float(np.float32(x)) / float(cw), y=float(np.float32(y)) / float(ch)) if c > 0
                   else missing)
    return out


def main():
    src, dst, w, h = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    doc = json.load(open(src))
    cw, ch = doc["canvas_width"], doc["canvas_height"]
    poses = []
    for p in doc["people"]:
        body = kps(p["pose_keypoints_2d"], cw, ch, None)
        assert len(body) == 18, "COCO-18 body only"
        hand = lambda k: kps(p[k], cw, ch, Keypoint(x=-1.0, y=-1.0)) if p.get(k) else None  # noqa: E731
        poses.append(PoseResult(BodyResult(keypoints=body, total_score=1.0, total_parts=18),
                                hand("hand_left_keypoints_2d"), hand("hand_right_keypoints_2d"),
                                hand("face_keypoints_2d")))
    canvas = draw_poses(poses, h, w, draw_body=True, draw_hand=True, draw_face=True)
    Image.fromarray(canvas).save(dst, format="PNG")


if __name__ == "__main__":
    main()
