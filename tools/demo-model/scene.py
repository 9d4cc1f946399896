"""The demo model's procedural world: stick-figure characters in named poses, with colours, backgrounds and props,
their captions in English, Chinese and mixed, and their OpenPose COCO-18 keypoints.

Everything here is deterministic given a `random.Random`. Images are drawn 4x supersampled with Pillow and reduced
with a box filter, so edges are anti-aliased.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # the demo model's native resolution (pixels)
SUPERSAMPLE = 4

# (name, EN, ZH, RGB)
COLOURS = [
    ("red", "red", "红色", (215, 35, 35)),
    ("green", "green", "绿色", (30, 165, 55)),
    ("blue", "blue", "蓝色", (35, 75, 225)),
    ("yellow", "yellow", "黄色", (240, 205, 20)),
    ("purple", "purple", "紫色", (140, 50, 195)),
    ("pink", "pink", "粉色", (245, 115, 185)),
]
BACKGROUNDS = [
    ("white", "white", "白色", (250, 250, 250)),
    ("black", "black", "黑色", (15, 15, 15)),
    ("gray", "gray", "灰色", (128, 128, 128)),
    ("sky", "sky blue", "天蓝色", (135, 200, 240)),
]
PROPS = [
    ("none", "", ""),
    ("sun", "the sun", "太阳"),
    ("moon", "the moon", "月亮"),
]
SUN_RGB = (255, 140, 0)
MOON_RGB = (235, 215, 125)

# Limb directions in degrees: 0 points down, 90 points to image-right, 180 up, -90 left. The figure faces the
# viewer, so its right side (OpenPose "R" keypoints) is on the image's left.
# (right upper arm, right forearm, left upper arm, left forearm, right thigh, right shin, left thigh, left shin)
POSES = {
    "standing": (-12, -8, 12, 8, -8, -5, 8, 5),
    "waving": (-12, -8, 115, 170, -8, -5, 8, 5),
    "arms_raised": (-155, -165, 155, 165, -8, -5, 8, 5),
    "kicking": (-70, -95, 45, 20, -3, 0, 75, 88),
    "sitting": (25, 70, 35, 75, 85, 5, 95, -5),
    "jumping": (-130, -140, 130, 140, -38, -42, 38, 42),
    "running": (-40, 30, 50, 130, -45, -100, 55, 5),
}
POSE_NAMES = list(POSES)
POSE_EN = {
    "standing": ["standing", "standing still"],
    "waving": ["waving", "waving a hand"],
    "arms_raised": ["with arms raised", "raising both arms"],
    "kicking": ["kicking", "doing a kick"],
    "sitting": ["sitting", "sitting down"],
    "jumping": ["jumping", "jumping high"],
    "running": ["running", "running fast"],
}
POSE_ZH = {
    "standing": ["站立", "站着"],
    "waving": ["挥手", "在挥手"],
    "arms_raised": ["举起双手", "双手举高"],
    "kicking": ["踢腿", "在踢腿"],
    "sitting": ["坐着", "坐下"],
    "jumping": ["跳跃", "跳起来"],
    "running": ["跑步", "奔跑"],
}

# Body proportions in units of the figure height (head top to feet when standing).
HEAD_R = 0.095
NECK = 0.19  # from the head top to the neck
TORSO = 0.30
UPPER_ARM, FOREARM = 0.15, 0.14
THIGH, SHIN = 0.21, 0.20
SHOULDER_HALF = 0.07
HIP_HALF = 0.05

# OpenPose COCO-18 order.
KP_NAMES = ["nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist", "r_hip",
            "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear"]
FLIP_PERM = [0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16]


@dataclass(frozen=True)
class Scene:
    colour: int
    pose: int
    background: int
    prop: int
    # layout
    height: float  # figure height in pixels at SIZE
    cx: float  # neck x in pixels
    cy: float  # neck y in pixels
    flip: bool
    prop_side: int  # 0 = top-left corner, 1 = top-right
    jitter: tuple  # 8 angle offsets in degrees
    # limb angles (the 8 of POSES, in degrees) replacing POSES[pose] + jitter: the pose detector's training
    # (tools/openpose/train_demo_detector.py) also draws figures in random poses; the demo model never does
    angles: tuple | None = None


def _dir(deg: float) -> tuple[float, float]:
    r = math.radians(deg)
    return math.sin(r), math.cos(r)


def keypoints(s: Scene) -> np.ndarray:
    """COCO-18 keypoints in pixels at SIZE, shape (18, 2)."""
    a = list(s.angles) if s.angles is not None else [x + j for x, j in zip(POSES[POSE_NAMES[s.pose]], s.jitter)]
    h = s.height
    neck = np.array([s.cx, s.cy])
    sitting = POSE_NAMES[s.pose] == "sitting"
    pelvis = neck + np.array([0.0, TORSO * h * (0.95 if sitting else 1.0)])
    head = neck - np.array([0.0, (NECK - HEAD_R) * h])
    kp = np.zeros((18, 2))
    kp[0] = head + np.array([0.0, 0.02 * h])
    kp[1] = neck
    rs, ls = neck + [-SHOULDER_HALF * h, 0.02 * h], neck + [SHOULDER_HALF * h, 0.02 * h]
    rh, lh = pelvis + [-HIP_HALF * h, 0], pelvis + [HIP_HALF * h, 0]

    def chain(start, d1, l1, d2, l2):
        p1 = start + np.array(_dir(d1)) * l1 * h
        return p1, p1 + np.array(_dir(d2)) * l2 * h

    kp[2], (kp[3], kp[4]) = rs, chain(rs, a[0], UPPER_ARM, a[1], FOREARM)
    kp[5], (kp[6], kp[7]) = ls, chain(ls, a[2], UPPER_ARM, a[3], FOREARM)
    kp[8], (kp[9], kp[10]) = rh, chain(rh, a[4], THIGH, a[5], SHIN)
    kp[11], (kp[12], kp[13]) = lh, chain(lh, a[6], THIGH, a[7], SHIN)
    kp[14] = head + [-0.035 * h, -0.015 * h]
    kp[15] = head + [0.035 * h, -0.015 * h]
    kp[16] = head + [-0.075 * h, 0.0]
    kp[17] = head + [0.075 * h, 0.0]
    if s.flip:
        kp[:, 0] = 2 * s.cx - kp[:, 0]
        kp = kp[FLIP_PERM]
    return kp


LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (1, 11), (8, 9), (9, 10), (11, 12), (12, 13),
         (8, 11)]


def render(s: Scene) -> np.ndarray:
    """The scene as uint8 RGB (SIZE, SIZE, 3)."""
    k = SUPERSAMPLE
    n = SIZE * k
    img = Image.new("RGB", (n, n), BACKGROUNDS[s.background][3])
    d = ImageDraw.Draw(img)
    # prop in a top corner
    if PROPS[s.prop][0] != "none":
        px = (11 if s.prop_side == 0 else SIZE - 11) * k
        py = 10 * k
        r = 6 * k
        if PROPS[s.prop][0] == "sun":
            for i in range(8):
                ang = i * math.pi / 4
                d.line([(px + math.cos(ang) * r * 1.2, py + math.sin(ang) * r * 1.2),
                        (px + math.cos(ang) * r * 1.65, py + math.sin(ang) * r * 1.65)], fill=SUN_RGB, width=k * 1)
            d.ellipse([px - r, py - r, px + r, py + r], fill=SUN_RGB)
        else:
            d.ellipse([px - r, py - r, px + r, py + r], fill=MOON_RGB)
            off = r * 0.55 * (1 if s.prop_side == 0 else -1)
            d.ellipse([px - r + off, py - r - r * 0.25, px + r + off, py + r - r * 0.25],
                      fill=BACKGROUNDS[s.background][3])
    kp = keypoints(s) * k
    rgb = COLOURS[s.colour][3]
    width = max(1, round(0.065 * s.height * k))
    for i, j in LIMBS:
        d.line([tuple(kp[i]), tuple(kp[j])], fill=rgb, width=width)
    for i in range(2, 14):
        r = width / 2
        d.ellipse([kp[i][0] - r, kp[i][1] - r, kp[i][0] + r, kp[i][1] + r], fill=rgb)
    # head: the circle through the nose area
    head = (kp[14] + kp[15]) / 2 + [0, 0.015 * s.height * k]
    hr = HEAD_R * s.height * k
    d.ellipse([head[0] - hr, head[1] - hr, head[0] + hr, head[1] + hr], fill=rgb)
    d.line([tuple(kp[1]), (head[0], head[1] + hr * 0.8)], fill=rgb, width=width)
    img = img.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


def sample_scene(r: random.Random, colour: int, pose: int, background: int, prop: int) -> Scene:
    height = r.uniform(38.0, 46.0)
    sitting = POSE_NAMES[pose] == "sitting"
    cx = r.uniform(24.0, 40.0)
    # feet near the bottom for standing figures, the whole figure on the canvas
    top_margin = 6.0 if PROPS[prop][0] == "none" else 10.0
    cy_lo = top_margin + NECK * height
    cy_hi = SIZE - 4.0 - (TORSO + THIGH + SHIN) * height * (0.75 if sitting else 1.0)
    cy = r.uniform(cy_lo, max(cy_lo, cy_hi))
    jitter = tuple(r.uniform(-7.0, 7.0) for _ in range(8))
    return Scene(colour, pose, background, prop, height, cx, cy, r.random() < 0.5, r.randrange(2), jitter)


def caption(r: random.Random, colour: int, pose: int, background: int, prop: int, lang: str) -> str:
    """A caption in 'en', 'zh' or 'mixed' (each slot drawn from either language, both languages present)."""
    if lang == "mixed":
        while True:
            langs = [r.choice(["en", "zh"]) for _ in range(4)]
            if PROPS[prop][0] == "none":
                langs[3] = langs[0]
            if "en" in langs and "zh" in langs:
                break
    else:
        langs = [lang] * 4
    c = COLOURS[colour][1] if langs[0] == "en" else COLOURS[colour][2]
    pname = POSE_NAMES[pose]
    p = r.choice(POSE_EN[pname]) if langs[1] == "en" else r.choice(POSE_ZH[pname])
    b = BACKGROUNDS[background][1] if langs[2] == "en" else BACKGROUNDS[background][2]
    pr = PROPS[prop][1] if langs[3] == "en" else PROPS[prop][2]
    if lang == "zh":
        text = f"{b}背景上一个{p}的{c}小人"
        if pr:
            text += f"，有{pr}"
        return text
    if lang == "en":
        form = r.randrange(2)
        if form == 0:
            text = f"a {c} stick figure {p} on a {b} background"
        else:
            text = f"{c} stick figure {p}, {b} background"
        if pr:
            text += f", with {pr}" if form == 0 else f", {pr} in the sky"
        return text
    text = f"a {c} stick figure {p} on a {b} background"
    if pr:
        text += f", with {pr}"
    return text


def all_triples() -> list[tuple[int, int, int]]:
    return [(c, p, b) for c in range(len(COLOURS)) for p in range(len(POSES)) for b in range(len(BACKGROUNDS))]


def held_out_triples() -> list[tuple[int, int, int]]:
    """14 (colour, pose, background) combinations never shown in training: every colour, pose and background
    appears among them."""
    out = []
    for i in range(14):
        out.append((i % len(COLOURS), (i * 3) % len(POSES), (i * 5 + i // 4) % len(BACKGROUNDS)))
    assert len(set(out)) == len(out)
    return out


def caption_without_pose(r: random.Random, colour: int, background: int, prop: int, lang: str) -> str:
    """A caption that leaves the pose to a control image."""
    if lang == "mixed":
        lang_c, lang_b = r.choice([("en", "zh"), ("zh", "en")])
    else:
        lang_c = lang_b = lang
    c = COLOURS[colour][1] if lang_c == "en" else COLOURS[colour][2]
    b = BACKGROUNDS[background][1] if lang_b == "en" else BACKGROUNDS[background][2]
    if lang == "zh":
        text = f"{b}背景上一个{c}小人"
        pr = PROPS[prop][2]
        return text + (f"，有{pr}" if pr else "")
    pr = PROPS[prop][1]
    text = f"a {c} stick figure on a {b} background"
    return text + (f", with {pr}" if pr else "")
