#!/usr/bin/env python3
"""Writes Pillow reference outputs for the `qwen-image-imaging` crate's tests: LANCZOS resizes (up, down,
non-integer ratios, RGB and L) and RGB->L conversion, as raw bytes + index.json.

    ~/.venvs/qwen-image-ref/bin/python tools/imaging/make_pil_vectors.py tests/fixtures/imaging
"""
import json
import sys
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.RandomState(0)
cases = []


def save(name, arr):
    (out / name).write_bytes(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


# a smooth-ish picture with sharp edges so both smooth and ringing behaviour are exercised
def picture(h, w, channels):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), 0.5 + 0.5 * np.sin((xx + 2 * yy) / 5.0)], -1)
    arr = (base * 255).round().astype(np.uint8)
    arr[h // 3: h // 2, w // 4: w // 2] = rng.randint(0, 256, size=3)
    arr = np.clip(arr.astype(np.int32) + rng.randint(-20, 21, size=arr.shape), 0, 255).astype(np.uint8)
    return arr if channels == 3 else arr[..., 0]


for i, (h, w, nh, nw, mode) in enumerate([
    (23, 37, 48, 64, "RGB"),   # upscale, non-integer ratios
    (50, 70, 16, 24, "RGB"),   # downscale
    (64, 64, 64, 96, "RGB"),   # one axis only
    (41, 29, 80, 32, "L"),     # L up/down mixed
    (120, 90, 47, 33, "L"),    # strong downscale, odd sizes
]):
    arr = picture(h, w, 3 if mode == "RGB" else 1)
    img = Image.fromarray(arr, mode)
    res = np.asarray(img.resize((nw, nh), resample=Image.Resampling.LANCZOS))
    save(f"resize{i}_in.bin", arr)
    save(f"resize{i}_out.bin", res)
    cases.append({"kind": "resize", "in": f"resize{i}_in.bin", "out": f"resize{i}_out.bin", "mode": mode,
                  "w": w, "h": h, "new_w": nw, "new_h": nh})

arr = rng.randint(0, 256, size=(17, 19, 3)).astype(np.uint8)
save("gray_in.bin", arr)
save("gray_out.bin", np.asarray(Image.fromarray(arr, "RGB").convert("L")))
cases.append({"kind": "to_l", "in": "gray_in.bin", "out": "gray_out.bin", "w": 19, "h": 17})
(out / "index.json").write_text(json.dumps({"pillow": PIL.__version__, "cases": cases}, indent=1) + "\n")
print("wrote", len(cases), "cases to", out)
