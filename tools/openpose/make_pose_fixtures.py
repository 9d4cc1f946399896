#!/usr/bin/env python3
"""Builds the OpenPose renderer parity fixtures in tests/fixtures/openpose/.

For every case it writes `<name>.json` (OpenPose JSON as a user would upload it) and `<name>.png`, the skeleton
drawn by controlnet-aux's own `draw_poses` (-> util.draw_bodypose / draw_handpose / draw_facepose, OpenCV
rasterisation), plus `manifest.json` listing render size and the draw_hands/draw_face flags for each case.

The keypoints handed to controlnet-aux are built exactly as the Rust side builds them: pixel coordinates relative
to the JSON canvas (float32 values, written to JSON losslessly) divided by canvas_width/height in float64; points
with confidence 0 are None (hands/face: Keypoint(-1, -1), which draw_handpose/draw_facepose skip by their
`x > eps` test). Normalised-coordinate JSON is handed over as-is (x, y already in [0, 1]).

Run (from the repository root):
    ~/.venvs/qwen-image-ref/bin/python tools/openpose/make_pose_fixtures.py
"""
import json
import math
import os
import sys
import warnings

warnings.filterwarnings("ignore")
import numpy as np
from PIL import Image

from controlnet_aux.open_pose import PoseResult, draw_poses
from controlnet_aux.open_pose.body import BodyResult, Keypoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "openpose")

# COCO-18 standing figure in a unit frame: x in [-0.3, 0.3] (0 = body axis), y in [0, 1] (top of head .. feet).
STANDING = [
    (0.0, 0.08), (0.0, 0.18), (-0.10, 0.19), (-0.13, 0.35), (-0.14, 0.50), (0.10, 0.19), (0.13, 0.35),
    (0.14, 0.50), (-0.06, 0.52), (-0.07, 0.73), (-0.07, 0.95), (0.06, 0.52), (0.07, 0.73), (0.07, 0.95),
    (-0.02, 0.06), (0.02, 0.06), (-0.045, 0.075), (0.045, 0.075),
]


def variant(**changes):
    pts = list(STANDING)
    for k, v in changes.items():
        pts[int(k[1:])] = v
    return pts


ARMS_RAISED = variant(p3=(-0.17, 0.08), p4=(-0.19, -0.04), p6=(0.17, 0.08), p7=(0.19, -0.04))
WAVING = variant(p6=(0.24, 0.16), p7=(0.27, 0.02), p3=(-0.15, 0.34), p4=(-0.11, 0.48))
KICKING = variant(p12=(0.22, 0.62), p13=(0.40, 0.60), p9=(-0.06, 0.74), p10=(-0.08, 0.96),
                  p4=(-0.26, 0.30), p7=(0.05, 0.42))
SITTING = variant(p9=(0.12, 0.55), p10=(0.13, 0.80), p12=(0.24, 0.55), p13=(0.25, 0.80),
                  p8=(-0.05, 0.55), p11=(0.07, 0.55), p4=(0.05, 0.50), p7=(0.18, 0.48))
JUMPING = variant(p3=(-0.20, 0.12), p4=(-0.28, 0.02), p6=(0.20, 0.12), p7=(0.28, 0.02),
                  p9=(-0.16, 0.66), p10=(-0.10, 0.80), p12=(0.16, 0.66), p13=(0.10, 0.80))


def place(unit_pts, cx, top, height, rng, jitter=0.004):
    """Unit-frame figure -> canvas pixels (float32-exact), with a little jitter so fractions vary."""
    out = []
    for x, y in unit_pts:
        px = cx + (x + rng.normal(0, jitter)) * height
        py = top + (y + rng.normal(0, jitter)) * height
        out.append((float(np.float32(px)), float(np.float32(py))))
    return out


def hand(wrist, direction, size, rng):
    """21 hand points fanning out of the wrist."""
    wx, wy = wrist
    pts = [(wx, wy)]
    for f in range(5):
        ang = direction + (f - 2) * 0.35
        for j in range(1, 5):
            r = size * (0.35 + 0.17 * j) * (0.8 if f == 0 else 1.0)
            pts.append((wx + r * math.cos(ang) + rng.normal(0, 0.5), wy + r * math.sin(ang) + rng.normal(0, 0.5)))
    return [(float(np.float32(x)), float(np.float32(y))) for x, y in pts]


def face(center, rx, ry, rng):
    """70 face points: jaw arc, brows, nose, eyes, mouth, pupils (only the count and spread matter here)."""
    cx, cy = center
    pts = []
    for i in range(17):  # jaw
        a = math.pi * (0.05 + 0.9 * i / 16)
        pts.append((cx - rx * math.cos(a), cy + ry * 0.2 + ry * 0.8 * math.sin(a)))
    for i in range(10):  # brows
        pts.append((cx - rx * 0.8 + rx * 1.6 * i / 9, cy - ry * 0.45 - 0.1 * ry * math.sin(math.pi * (i % 5) / 4)))
    for i in range(9):  # nose
        pts.append((cx + (i - 4) * rx * 0.06 * (i >= 4), cy - ry * 0.3 + ry * 0.08 * min(i, 4)))
    for e in (-1, 1):  # eyes
        for i in range(6):
            a = 2 * math.pi * i / 6
            pts.append((cx + e * rx * 0.4 + rx * 0.18 * math.cos(a), cy - ry * 0.25 + ry * 0.07 * math.sin(a)))
    for i in range(20):  # mouth
        a = 2 * math.pi * i / 20
        pts.append((cx + rx * 0.35 * math.cos(a), cy + ry * 0.45 + ry * 0.1 * math.sin(a)))
    pts.append((cx - rx * 0.4, cy - ry * 0.25))
    pts.append((cx + rx * 0.4, cy - ry * 0.25))
    pts = [(x + rng.normal(0, 0.3), y + rng.normal(0, 0.3)) for x, y in pts]
    return [(float(np.float32(x)), float(np.float32(y))) for x, y in pts]


def flat(points, rng, missing=()):
    out = []
    for i, p in enumerate(points):
        if p is None or i in missing:
            out += [0.0, 0.0, 0.0]
        else:
            out += [p[0], p[1], round(float(rng.uniform(0.3, 1.0)), 3)]
    return out


def to_kps(points, cw, ch, missing=(), none_value=None):
    res = []
    for i, p in enumerate(points):
        if p is None or i in missing:
            res.append(none_value)
        else:
            res.append(Keypoint(x=p[0] / float(cw), y=p[1] / float(ch)))
    return res


BODY25_FROM_COCO = list(range(8)) + [None] + list(range(8, 18)) + [None] * 6  # body25 index -> coco index


def person(body, cw, ch, rng, missing=(), lhand=None, rhand=None, face_pts=None, body25=False):
    """Returns (json person dict, PoseResult)."""
    if body25:
        b25 = []
        for ci in BODY25_FROM_COCO:
            if ci is None:  # MidHip / feet: plausible values that the COCO mapping must drop
                b25.append((body[8][0] + 3.0, body[8][1] + 1.0))
            else:
                b25.append(None if ci in missing else body[ci])
        pose_flat = flat(b25, rng)
    else:
        pose_flat = flat(body, rng, missing)
    js = {"pose_keypoints_2d": pose_flat}
    miss_kp = Keypoint(x=-1.0, y=-1.0)
    lh = rh = fc = None
    if lhand is not None:
        js["hand_left_keypoints_2d"] = flat(lhand[0], rng, lhand[1])
        lh = to_kps(lhand[0], cw, ch, lhand[1], miss_kp)
    if rhand is not None:
        js["hand_right_keypoints_2d"] = flat(rhand[0], rng, rhand[1])
        rh = to_kps(rhand[0], cw, ch, rhand[1], miss_kp)
    if face_pts is not None:
        js["face_keypoints_2d"] = flat(face_pts[0], rng, face_pts[1])
        fc = to_kps(face_pts[0], cw, ch, face_pts[1], miss_kp)
    pr = PoseResult(BodyResult(keypoints=to_kps(body, cw, ch, missing), total_score=1.0, total_parts=18), lh, rh, fc)
    return js, pr


def write_case(manifest, name, cw, ch, people, render_w=None, render_h=None, hands=True, faces=True,
               normalised=False):
    render_w = render_w or cw
    render_h = render_h or ch
    js_people = [p[0] for p in people]
    poses = [p[1] for p in people]
    if normalised:
        for pj in js_people:
            for key, arr in pj.items():
                for i in range(0, len(arr), 3):
                    if arr[i + 2] > 0:
                        arr[i] = arr[i] / float(cw)
                        arr[i + 1] = arr[i + 1] / float(ch)
    doc = {"people": js_people, "canvas_width": cw, "canvas_height": ch}
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    canvas = draw_poses(poses, render_h, render_w, draw_body=True, draw_hand=hands, draw_face=faces)
    Image.fromarray(canvas).save(os.path.join(OUT, name + ".png"), optimize=True)
    manifest.append({"name": name, "width": render_w, "height": render_h, "draw_hands": hands, "draw_face": faces})


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(20240611)
    manifest = []

    # 1-5: single figures, 512x768 portrait
    for name, pts in [("standing", STANDING), ("arms_raised", ARMS_RAISED), ("waving", WAVING),
                      ("kicking", KICKING), ("sitting", SITTING)]:
        body = place(pts, 256, 60, 640, rng)
        write_case(manifest, name, 512, 768, [person(body, 512, 768, rng)])

    # 6: jumping on an odd landscape canvas 333x250
    body = place(JUMPING, 166.5, 12, 220, rng)
    write_case(manifest, "jumping_333x250", 333, 250, [person(body, 333, 250, rng)])

    # 7: two people, 768x512
    a = place(WAVING, 230, 40, 440, rng)
    b = place(KICKING, 520, 60, 420, rng)
    write_case(manifest, "two_people", 768, 512, [person(a, 768, 512, rng), person(b, 768, 512, rng)])

    # 8: partial person (legs cut off, one eye/ear missing), 512x512
    body = place(ARMS_RAISED, 256, 80, 560, rng)
    write_case(manifest, "partial", 512, 512,
               [person(body, 512, 512, rng, missing={9, 10, 12, 13, 15, 17})])

    # 9: hands and face, 512x768 (+ same JSON rendered without hands/face)
    body = place(WAVING, 256, 60, 640, rng)
    lw, rw = body[7], body[4]
    lh = hand(lw, -1.3, 45, rng)
    rh = hand(rw, 1.6, 45, rng)
    fc = face((body[0][0], body[0][1] + 4), 26, 32, rng)
    p = person(body, 512, 768, rng, lhand=(lh, {20}), rhand=(rh, ()), face_pts=(fc, {3, 40}))
    write_case(manifest, "hands_face", 512, 768, [p])
    write_case(manifest, "hands_face_body_only", 512, 768, [p], hands=False, faces=False)

    # 10: BODY_25 input on 333x250 (MidHip and feet dropped by the COCO mapping)
    body = place(STANDING, 120, 10, 230, rng)
    write_case(manifest, "body25_333x250", 333, 250, [person(body, 333, 250, rng, missing={14}, body25=True)])

    # 11: normalised coordinates, 512x512
    body = place(KICKING, 256, 40, 440, rng)
    rng_state = rng.bit_generator.state
    js, _ = person(body, 512, 512, rng)
    rng.bit_generator.state = rng_state
    norm_body = [(x / 512.0, y / 512.0) for x, y in body]
    pr = PoseResult(BodyResult(keypoints=[Keypoint(x=x, y=y) for x, y in norm_body], total_score=1.0,
                               total_parts=18), None, None, None)
    write_case(manifest, "normalised", 512, 512, [(js, pr)], normalised=True)

    # 12: canvas 1024x1536, rendered at 512x768 (coordinates scale through the canvas size)
    body = place(JUMPING, 512, 100, 1300, rng)
    write_case(manifest, "scaled_render", 1024, 1536, [person(body, 1024, 1536, rng)], 512, 768)

    # 13: stress: random limbs at every angle, points up to the tolerated margin outside the canvas
    people = []
    for _ in range(8):
        body = [(float(np.float32(rng.uniform(-0.05, 1.05) * 333)), float(np.float32(rng.uniform(-0.05, 1.05) * 250)))
                for _ in range(18)]
        hnd = [(float(np.float32(rng.uniform(-0.05, 1.05) * 333)), float(np.float32(rng.uniform(-0.05, 1.05) * 250)))
               for _ in range(21)]
        people.append(person(body, 333, 250, rng, missing=set(rng.choice(18, 3, replace=False).tolist()),
                             rhand=(hnd, set())))
    write_case(manifest, "stress_333x250", 333, 250, people)

    # 14: stress with short limbs (length < 2 px, equal points) on 257x191
    people = []
    for _ in range(6):
        c = (rng.uniform(10, 247), rng.uniform(10, 181))
        body = [(float(np.float32(c[0] + rng.uniform(-3, 3))), float(np.float32(c[1] + rng.uniform(-3, 3))))
                for _ in range(18)]
        body[2] = body[1]
        people.append(person(body, 257, 191, rng))
    write_case(manifest, "short_limbs_257x191", 257, 191, people)

    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {len(manifest)} cases to {OUT} ({total} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
