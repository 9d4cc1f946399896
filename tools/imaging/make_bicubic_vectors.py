#!/usr/bin/env python3
"""Writes reference outputs of the resize Qwen2VLImageProcessor (transformers 5.23, torchvision backend) runs:
torchvision.transforms.v2.functional.resize(uint8 CHW tensor, [h, w], BICUBIC, antialias=True) on the CPU, for
`qwen-image-imaging`'s bicubic tests. Raw HWC bytes + index.json.

    ~/.venvs/qwen-image-ref/bin/python tools/imaging/make_bicubic_vectors.py tests/fixtures/imaging_bicubic
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.transforms.v2 import functional as tvF

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for f in out.glob("*.bin"):
    f.unlink()
rng = np.random.RandomState(0)
cases = []


def picture(h, w, noise):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), 0.5 + 0.5 * np.sin((xx + 2 * yy) / 5.0)], -1)
    arr = (base * 255).round().astype(np.int32)
    arr[h // 3: h // 2, w // 4: w // 2] = rng.randint(0, 256, size=3)
    return np.clip(arr + rng.randint(-noise, noise + 1, size=arr.shape), 0, 255).astype(np.uint8)


for i, (h, w, nh, nw, noise) in enumerate([
    (128, 192, 140, 196, 20),  # what smart_resize does to a 192x128 condition image (both axes up)
    (200, 280, 196, 280, 20),  # one axis down by a few rows (smart_resize rounding down to a multiple of 28)
    (23, 37, 56, 84, 128),     # strong upscale of pure noise: cubic overshoot hits the 0/255 clamps
    (90, 120, 28, 56, 10),     # downscale, non-integer ratios
    (33, 17, 33, 40, 60),      # width only
    (61, 61, 29, 61, 60),      # height only
]):
    arr = picture(h, w, noise)
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # what TorchvisionBackend.process_image hands over
    res = tvF.resize(t, [nh, nw], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    (out / f"bicubic{i}_in.bin").write_bytes(arr.tobytes())
    (out / f"bicubic{i}_out.bin").write_bytes(res.permute(1, 2, 0).contiguous().numpy().tobytes())
    cases.append({"in": f"bicubic{i}_in.bin", "out": f"bicubic{i}_out.bin", "w": w, "h": h, "new_w": nw, "new_h": nh})
(out / "index.json").write_text(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__,
                                            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                            "cases": cases}, indent=1) + "\n")
print("wrote", len(cases), "cases to", out)
