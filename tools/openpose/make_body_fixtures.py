#!/usr/bin/env python3
"""Builds the OpenPose *body estimator* parity fixtures in tests/fixtures/openpose_body/.

Reference: controlnet-aux 0.0.10, `open_pose/model.py` (bodypose_model) and `open_pose/body.py` (Body.__call__),
called the way `OpenposeDetector.detect_poses` calls it (the RGB picture flipped to BGR first).

The real `body_pose_model.pth` cannot be downloaded here, so the network gets *deterministic random weights* of the
same architecture and key names. Both sides generate them with the same counter-based generator (splitmix64 over
FNV-1a(key) ^ seed, see `uniform()`; Rust: `qwen_image_model::openpose::random_weights`), so no 200 MB weight file
is committed. Fixtures:

  net.safetensors         the network alone on a small seeded input: input [1,3,40,32], paf [1,38,5,4],
                          heat [1,19,5,4] (f32)
  <case>.png              the picture (RGB)
  <case>.safetensors      Body.__call__ on it with the random network:
                            padded   [Hp,Wp,3] u8   the resized + padded picture the network sees (BGR)
                            paf/heat [1,38|19,h,w] f32   the network's outputs
                            heat_avg/paf_avg [.., .., 19|38] f32, every 5th row and column of the full-size maps
                            candidate [N,4] f64, subset [M,20] f64
  synth_<case>.safetensors  Body.__call__ on the same picture with the network replaced by *synthetic* outputs
                          drawn from the picture's true keypoints (so people exist and are assembled):
                            paf/heat f16 (the values fed, exactly), candidate, subset
  manifest.json           the cases, picture sizes and the true keypoints

Run (from the repository root; ~1 min on 2 cores):
    ~/.venvs/qwen-image-ref/bin/python tools/openpose/make_body_fixtures.py
"""
import json
import math
import os
import warnings

warnings.filterwarnings("ignore")
import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

from controlnet_aux.open_pose import util as cn_util
from controlnet_aux.open_pose.body import Body, Keypoint
from controlnet_aux.open_pose.model import bodypose_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "openpose_body")
SEED = 22

M64 = (1 << 64) - 1


def fnv1a(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h ^= b
        h = (h * 0x100000001B3) & M64
    return h


def uniform(name, n, seed=SEED):
    """n values in [-1, 1): splitmix64(FNV-1a(name) ^ seed + i), top 24 bits (exact in f32)."""
    with np.errstate(over="ignore"):
        x = np.uint64(fnv1a(name) ^ seed) + np.arange(n, dtype=np.uint64)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    return u * np.float32(2.0) - np.float32(1.0)


BIAS_BOUND = 0.05


def random_state_dict():
    """Keys as in body_pose_model.pth (bodypose_model's keys without the `modelX_Y.` prefix, util.transfer)."""
    model = bodypose_model()
    sd = {}
    for key, t in model.state_dict().items():
        name = key.split(".", 1)[1]
        n = t.numel()
        if name.endswith(".weight"):
            fan_in = t.shape[1] * t.shape[2] * t.shape[3]
            bound = np.float32(math.sqrt(6.0 / fan_in))  # He-uniform: activations keep their scale through ReLUs
        else:
            bound = np.float32(BIAS_BOUND)
        sd[name] = (uniform(name, n) * bound).reshape(tuple(t.shape))
    return model, sd


def make_body(model, sd):
    model.load_state_dict(cn_util.transfer(model, {k: torch.from_numpy(v) for k, v in sd.items()}))
    model.eval()
    body = Body.__new__(Body)
    body.model = model
    return body


class FakeNet(torch.nn.Module):
    """Stands in for bodypose_model: returns fixed outputs (checks the input size they were made for)."""

    def __init__(self, paf, heat):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.paf, self.heat = paf, heat

    def forward(self, x):
        assert x.shape[2] == self.heat.shape[2] * 8 and x.shape[3] == self.heat.shape[3] * 8, x.shape
        return torch.from_numpy(self.paf.astype(np.float32)), torch.from_numpy(self.heat.astype(np.float32))


# body.py Body.__call__ limbSeq / mapIdx (1-based parts; PAF channels mapIdx-19)
LIMB_SEQ = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
            [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
MAP_IDX = [[31, 32], [39, 40], [33, 34], [35, 36], [41, 42], [43, 44], [19, 20], [21, 22], [23, 24], [25, 26],
           [27, 28], [29, 30], [47, 48], [49, 50], [53, 54], [51, 52], [55, 56], [37, 38], [45, 46]]


def figure(cx, top, h):
    """COCO-18 keypoints of a standing figure, `h` pixels tall, head at `top`, centred on cx (pixels)."""
    u = h / 8.0
    pts = [
        (0.0, 0.6), (0.0, 1.5), (-0.9, 1.5), (-1.3, 2.6), (-1.6, 3.6), (0.9, 1.5), (1.4, 2.5), (1.9, 3.3),
        (-0.5, 4.1), (-0.7, 5.7), (-0.8, 7.4), (0.5, 4.1), (0.9, 5.7), (1.3, 7.4), (-0.25, 0.35), (0.25, 0.35),
        (-0.5, 0.45), (0.5, 0.45),
    ]
    return [(cx + dx * u, top + dy * u) for dx, dy in pts]


def picture(h, w, people, seed):
    """A picture: smooth coloured background + noise, the people's skeletons drawn by controlnet-aux."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([60 + 40 * np.sin(xx / 9.0), 90 + 30 * np.cos(yy / 7.0), 120 + 0 * xx], axis=2)
    img = np.clip(base + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    for p in people:
        kps = [Keypoint(x / w, y / h) if 0 <= x < w and 0 <= y < h else None for x, y in p]
        img = cn_util.draw_bodypose(img, kps)
    return img


def synthetic_outputs(people, h, w, scale, hp, wp):
    """Net outputs at 1/8 of the padded size: Gaussian peaks at the true joints, unit PAFs along the limbs."""
    gh, gw = hp // 8, wp // 8
    heat = np.zeros((19, gh, gw), np.float32)
    paf = np.zeros((38, gh, gw), np.float32)
    gy, gx = np.mgrid[0:gh, 0:gw].astype(np.float32)

    def to_grid(p):
        return ((p[0] * scale - 3.5) / 8.0, (p[1] * scale - 3.5) / 8.0)

    for person in people:
        inside = [0 <= x < w and 0 <= y < h for x, y in person]
        for j, p in enumerate(person):
            if inside[j]:
                x, y = to_grid(p)
                heat[j] = np.maximum(heat[j], np.exp(-((gx - x) ** 2 + (gy - y) ** 2) / 2.0))
        for (a, b), (cx_, cy_) in zip(LIMB_SEQ, MAP_IDX):
            if not (inside[a - 1] and inside[b - 1]):
                continue
            ax, ay = to_grid(person[a - 1])
            bx, by = to_grid(person[b - 1])
            vx, vy = bx - ax, by - ay
            n = math.hypot(vx, vy)
            if n < 1e-3:
                continue
            ux, uy = vx / n, vy / n
            t = ((gx - ax) * ux + (gy - ay) * uy)
            d = np.abs((gx - ax) * uy - (gy - ay) * ux)
            on = (t >= -1.0) & (t <= n + 1.0) & (d <= 1.2)
            paf[cx_ - 19][on] = ux
            paf[cy_ - 19][on] = uy
    heat[18] = 1.0 - heat[:18].max(axis=0)
    # what is fed is exactly what is stored (f16)
    return paf[None].astype(np.float16), heat[None].astype(np.float16)


def run_body(body, bgr):
    """Body.__call__, also returning its network outputs and averaged maps (recorded by wrapping the network)."""
    rec = {}
    net = body.model

    class Rec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            rec["input"] = x.numpy().copy()
            a, b = self.net(x)
            rec["paf"], rec["heat"] = a.numpy().copy(), b.numpy().copy()
            return a, b

    body.model = Rec()
    orig_gauss = __import__("controlnet_aux.open_pose.body", fromlist=["x"]).gaussian_filter
    maps = []

    def spy(m, sigma):
        maps.append(np.array(m))
        return orig_gauss(m, sigma=sigma)

    mod = __import__("controlnet_aux.open_pose.body", fromlist=["x"])
    mod.gaussian_filter = spy
    try:
        candidate, subset = body(bgr)
    finally:
        mod.gaussian_filter = orig_gauss
        body.model = net
    rec["heat_maps"] = np.stack(maps, axis=2)  # the 18 maps handed to gaussian_filter (= heatmap_avg[..., :18])
    return candidate, subset, rec


CASES = {
    # name: (height, width, people as (cx, top, height))
    "one": (64, 64, [(32, 4, 56)]),
    "two": (96, 128, [(36, 10, 78), (92, 14, 74)]),
    "offcanvas": (64, 80, [(70, 20, 60)]),
    "none": (200, 256, []),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    model, sd = random_state_dict()
    body = make_body(model, sd)

    # 1) the network alone
    x = uniform("input", 3 * 40 * 32).reshape(1, 3, 40, 32)
    with torch.no_grad():
        paf, heat = model(torch.from_numpy(x))
    save_file({"input": x, "paf": paf.numpy(), "heat": heat.numpy()}, os.path.join(OUT, "net.safetensors"))
    print("net", paf.shape, heat.shape, float(heat.abs().max()), float(paf.abs().max()))

    manifest = {"seed": SEED, "bias_bound": BIAS_BOUND, "controlnet_aux": "0.0.10", "cases": []}
    for name, (h, w, specs) in CASES.items():
        people = [figure(cx, top, ph) for cx, top, ph in specs]
        rgb = picture(h, w, people, seed=len(name))
        Image.fromarray(rgb).save(os.path.join(OUT, f"{name}.png"))
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # OpenposeDetector.detect_poses: oriImg[:, :, ::-1]

        # 2) Body.__call__ with the random network
        candidate, subset, rec = run_body(body, bgr)
        padded = np.ascontiguousarray(np.round((rec["input"][0].transpose(1, 2, 0) + 0.5) * 256).astype(np.uint8))
        hm = rec["heat_maps"]
        # the PAF average is not observable from outside; recompute it as body.py does (one scale: paf/1)
        save_file({
            "padded": padded,
            "paf": rec["paf"], "heat": rec["heat"],
            "heat_avg": np.ascontiguousarray(hm[::5, ::5, :].astype(np.float32)),
            "candidate": np.asarray(candidate, np.float64).reshape(-1, 4),
            "subset": np.asarray(subset, np.float64).reshape(-1, 20),
        }, os.path.join(OUT, f"{name}.safetensors"))
        print(name, "random net: peaks", len(candidate), "people", len(subset),
              "heat max", float(rec["heat"].max()), "paf absmax", float(np.abs(rec["paf"]).max()))

        # 3) Body.__call__ with synthetic outputs drawn from the true keypoints
        scale = 0.5 * 368 / h
        hp, wp = padded.shape[:2]
        spaf, sheat = synthetic_outputs(people, h, w, scale, hp, wp)
        fake = Body.__new__(Body)
        fake.model = FakeNet(spaf, sheat)
        candidate, subset = fake(bgr)
        save_file({
            "paf": spaf, "heat": sheat,
            "candidate": np.asarray(candidate, np.float64).reshape(-1, 4),
            "subset": np.asarray(subset, np.float64).reshape(-1, 20),
        }, os.path.join(OUT, f"synth_{name}.safetensors"))
        print(name, "synthetic: peaks", len(candidate), "people", len(subset),
              [int(s[19]) for s in subset])
        manifest["cases"].append({"name": name, "height": h, "width": w,
                                  "people": [[[round(x, 3), round(y, 3)] for x, y in p] for p in people]})
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
