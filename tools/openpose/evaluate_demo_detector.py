#!/usr/bin/env python3
"""Measures the default (demo) model's pose detector with our candle code, through the `qwen-image` command:

  1. keypoints: held-out world pictures (tools/demo-model/scene.py, the held-out (colour, pose, background)
     combinations, a seed the detector never trained on) -> `qwen-image detect-pose` -> the share of the visible
     joints (on the canvas) found within 3 px of the truth at 64x64, and the pictures where not exactly one person
     was found; plus a picture with no figure per background (must give no person);
  2. parity: the same weights in torch (tools/openpose/train_demo_detector.py's network) under controlnet-aux
     0.0.10's own `Body.__call__` post-processing, on the first --parity pictures: the same people and keypoints
     as candle (largest coordinate difference reported);
  3. the flow: reference picture -> `qwen-image pose --gateway URL --reference-image REF` (the gateway's
     PoseRequest.reference_image: pose-detector stage, then ControlNet pose on the default model) with a prompt
     that names another colour and background but no pose -> the judge (tests/fixtures/judge) reads the
     reference's pose and the asked colour.

    ~/.venvs/qwen-image-ref/bin/python tools/openpose/evaluate_demo_detector.py \
        --qwen-image target/debug/qwen-image --out R.json

It starts `qwen-image serve` (the default model: its pose_detector/ and controlnet/) on a free port for step 3.
Pictures: 64x64, 20 steps, true CFG 4, negative prompt " ", seed --seed + case (as tools/demo-model/evaluate.py).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "demo-model"))
sys.path.insert(0, str(ROOT / "tools" / "openpose"))

import scene as S  # noqa: E402

EVAL_SEED = 7022  # the detector trained on random.Random(train_demo_detector.SEED) pictures
LANGS = ["en", "zh", "mixed"]


def read_people(path: Path) -> list[np.ndarray]:
    """OpenPose JSON -> per person an (18, 3) array (x, y, present)."""
    doc = json.loads(path.read_text())
    return [np.array(p["pose_keypoints_2d"], np.float64).reshape(18, 3) for p in doc["people"]]


def detect(binary: str, img: np.ndarray, tmp: Path, name: str) -> list[np.ndarray]:
    png, js = tmp / f"{name}.png", tmp / f"{name}.json"
    Image.fromarray(img).save(png)
    r = subprocess.run([binary, "detect-pose", "--image", str(png), "--out", str(js)], capture_output=True,
                       text=True)
    if r.returncode not in (0, 1):  # 1 = nobody found (the JSON is written)
        raise SystemExit(f"detect-pose failed on {name}: {r.stderr}")
    return read_people(js)


def held_out_scenes(n: int, seed: int):
    r = random.Random(seed)
    held = S.held_out_triples()
    out = []
    for i in range(n):
        c, p, b = held[i % len(held)]
        out.append(S.sample_scene(r, c, p, b, r.randrange(len(S.PROPS))))
    return out


def torch_people(img: np.ndarray, weights: Path):
    """controlnet-aux's Body.__call__ with our trained network (f16 weights as shipped, run in f32)."""
    import torch
    from controlnet_aux.open_pose.body import Body
    from safetensors.torch import load_file

    import train_demo_detector as T

    sd = load_file(str(weights))
    T.CFG["stages"] = 1 + sum(f"Mconv1_stage{s}_L1.weight" in sd for s in range(2, 7))
    net = T.build(torch)
    for name, conv in net.convs.items():
        conv.weight.data = sd[f"{name}.weight"].float()
        conv.bias.data = sd[f"{name}.bias"].float()
    net.eval()

    class Last(torch.nn.Module):  # bodypose_model's forward answers the last stage's (PAF, heat map)
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return tuple(self.net(x)[-1])

    body = Body.__new__(Body)
    body.model = Last().eval()
    candidate, subset = body(np.ascontiguousarray(img[:, :, ::-1]))  # detect_poses flips RGB to BGR
    people = []
    for row in subset:
        kp = np.zeros((18, 3))
        for k in range(18):
            i = int(row[k])
            if i >= 0:
                kp[k] = (candidate[i][0], candidate[i][1], 1)
        people.append(kp)
    return people


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qwen-image", required=True, help="the built `qwen-image` binary")
    ap.add_argument("--weights", type=Path, default=ROOT / "models/qwen-image-demo/pose_detector/"
                    "body_pose_model.safetensors", help="the shipped weights (for the torch parity check)")
    ap.add_argument("--judge", type=Path, default=ROOT / "tests/fixtures/judge")
    ap.add_argument("--pictures", type=int, default=280, help="held-out pictures for the keypoint figure")
    ap.add_argument("--parity", type=int, default=28, help="of those, how many also go through torch")
    ap.add_argument("--flow", type=int, default=84, help="reference -> pose -> picture cases")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the pictures (printed: their folder)")
    a = ap.parse_args(argv)

    import torch

    import judge as J

    torch.set_num_threads(1)
    report: dict = {"eval_seed": EVAL_SEED, "size": S.SIZE}
    tmp = Path(tempfile.mkdtemp(prefix="pose-eval-"))
    t0 = time.time()

    # 1. keypoints + 2. parity
    scenes = held_out_scenes(a.pictures, EVAL_SEED)
    within = visible = within_body = visible_body = not_one = 0
    parity_max, parity_people_equal = 0.0, 0
    per_joint = np.zeros((18, 2), np.int64)
    for i, sc in enumerate(scenes):
        img = S.render(sc)
        truth = S.keypoints(sc)
        people = detect(a.qwen_image, img, tmp, f"kp{i}")
        if len(people) != 1:
            not_one += 1
        on = (truth[:, 0] >= 0) & (truth[:, 0] < S.SIZE) & (truth[:, 1] >= 0) & (truth[:, 1] < S.SIZE)
        for k in np.nonzero(on)[0]:
            hit = any(p[k, 2] > 0 and np.hypot(*(p[k, :2] - truth[k])) <= 3.0 for p in people[:1])
            within += hit
            visible += 1
            per_joint[k] += (hit, 1)
            if k < 14:
                within_body += hit
                visible_body += 1
        if i < a.parity:
            ref = torch_people(img, a.weights)
            if len(ref) == len(people):
                parity_people_equal += 1
                for p, q in zip(people, ref):
                    if not np.array_equal(p[:, 2] > 0, q[:, 2] > 0):
                        parity_max = max(parity_max, float("inf"))
                    both = (p[:, 2] > 0) & (q[:, 2] > 0)
                    if both.any():
                        parity_max = max(parity_max, float(np.abs(p[both, :2] - q[both, :2]).max()))
            else:
                parity_max = float("inf")
    empty_found = 0
    for b in range(len(S.BACKGROUNDS)):
        for prop in range(len(S.PROPS)):
            sc = S.sample_scene(random.Random(b * 10 + prop), 0, 0, b, prop)
            import dataclasses

            img = S.render(dataclasses.replace(sc, cx=-1000.0))
            empty_found += len(detect(a.qwen_image, img, tmp, f"empty{b}_{prop}")) > 0
    report["keypoints"] = {
        "pictures": len(scenes), "visible_joints": visible, "within_3px": within / visible,
        "body_joints_within_3px": within_body / visible_body,
        "per_joint_within_3px": {S.KP_NAMES[k]: round(per_joint[k, 0] / max(1, per_joint[k, 1]), 4)
                                 for k in range(18)},
        "pictures_without_exactly_one_person": not_one,
        "pictures_without_figure": len(S.BACKGROUNDS) * len(S.PROPS), "people_found_in_them": empty_found,
        "parity_pictures": a.parity, "parity_same_people": parity_people_equal,
        "parity_max_abs_px": parity_max,
    }
    print(json.dumps(report["keypoints"], indent=1), f"({time.time() - t0:.0f}s)", flush=True)

    # 3. the flow, through a served stack
    if a.flow:
        net = J.load(a.judge)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(tmp / "serve.log", "w")
        serve = subprocess.Popen([a.qwen_image, "serve", "--listen", f"127.0.0.1:{port}"], stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            r = random.Random(EVAL_SEED + 1)
            refs = held_out_scenes(a.flow, EVAL_SEED + 2)
            imgs, want = [], []
            t1 = time.time()
            for k, sc in enumerate(refs):
                ref = tmp / f"ref{k}.png"
                Image.fromarray(S.render(sc)).save(ref)
                colour = (sc.colour + 1 + r.randrange(len(S.COLOURS) - 1)) % len(S.COLOURS)  # another colour
                background = r.randrange(len(S.BACKGROUNDS))
                prompt = S.caption_without_pose(r, colour, background, 0, LANGS[k % 3])
                out = tmp / f"out{k}.png"
                cmd = [a.qwen_image, "pose", "--gateway", url, "--reference-image", str(ref), "--prompt", prompt,
                       "--negative-prompt", " ", "--steps", "20", "--true-cfg-scale", "4", "--seed",
                       str(a.seed + k), "--width", "64", "--height", "64", "--out", str(out), "--quiet"]
                res = subprocess.run(cmd, capture_output=True, text=True)
                deadline = time.time() + 600
                while k == 0 and res.returncode != 0 and time.time() < deadline and serve.poll() is None:
                    time.sleep(2)  # the stack is still loading its models
                    res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise SystemExit(f"pose failed on case {k}: {res.stderr}")
                if k == 0:
                    t1 = time.time()  # time per case after the stack has loaded
                imgs.append(np.asarray(Image.open(out).convert("RGB")))
                want.append((colour, sc.pose, background))
                if k % 12 == 11:
                    print(f"flow {k + 1}/{len(refs)} ({time.time() - t1:.0f}s)", flush=True)
            pred = J.score(net, np.stack(imgs)).numpy()
            want = np.array(want)
            report["flow"] = {
                "cases": len(refs), "pose_as_reference": float((pred[:, 1] == want[:, 1]).mean()),
                "colour_as_asked": float((pred[:, 0] == want[:, 0]).mean()),
                "background_as_asked": float((pred[:, 2] == want[:, 2]).mean()),
                "seconds_per_case": (time.time() - t1) / max(1, len(refs) - 1),
                "steps": 20, "true_cfg_scale": 4.0, "seed": a.seed,
            }
            print(json.dumps(report["flow"], indent=1), flush=True)
        finally:
            serve.terminate()
            serve.wait(timeout=60)
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    if a.keep:
        print(f"pictures kept in {tmp}")
    else:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
