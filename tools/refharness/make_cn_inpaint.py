#!/usr/bin/env python3
"""Derives a tiny ControlNet-Inpainting model (extra_condition_channels 4) from a tiny snapshot's controlnet/:
same weights, controlnet_x_embedder widened from 64 to 68 inputs with seeded random columns for the mask
channels. Writes SNAPSHOT/controlnet_inpaint/.

    python make_cn_inpaint.py SNAPSHOT [--seed 11]
"""
import argparse
import json
from pathlib import Path

import torch
from diffusers import QwenImageControlNetModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("snapshot", type=Path)
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args()
    src = QwenImageControlNetModel.from_pretrained(str(a.snapshot / "controlnet"), dtype=torch.float32)
    cfg = {k: v for k, v in dict(src.config).items() if not k.startswith("_")}
    cfg["extra_condition_channels"] = 4
    net = QwenImageControlNetModel(**cfg).eval()
    sd = src.state_dict()
    w = sd["controlnet_x_embedder.weight"]
    g = torch.Generator("cpu").manual_seed(a.seed)
    extra = torch.randn((w.shape[0], 4), generator=g) * w.std()
    sd["controlnet_x_embedder.weight"] = torch.cat([w, extra], dim=1)
    net.load_state_dict(sd)
    out = a.snapshot / "controlnet_inpaint"
    net.save_pretrained(str(out))
    print(json.dumps({"out": str(out), "x_embedder": list(sd["controlnet_x_embedder.weight"].shape)}))


if __name__ == "__main__":
    main()
