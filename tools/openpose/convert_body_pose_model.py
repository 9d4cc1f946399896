#!/usr/bin/env python3
"""Converts controlnet-aux's OpenPose body weights (`body_pose_model.pth`, from lllyasviel/Annotators) to the
safetensors file the pose-detector stage loads (`--weights`).

Keys are kept exactly as in the .pth (`conv1_1.weight`, ..., `Mconv7_stage6_L2.bias`: bodypose_model's state-dict
keys without the `modelX_Y.` prefix, which controlnet-aux's `util.transfer` adds back); values become contiguous
float32. The file is checked against controlnet-aux's `bodypose_model` (every key present, every shape equal).

Run:
    ~/.venvs/qwen-image-ref/bin/python tools/openpose/convert_body_pose_model.py body_pose_model.pth \
        body_pose_model.safetensors
"""
import sys

import torch
from safetensors.torch import save_file


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    sd = torch.load(src, map_location="cpu", weights_only=True)
    out = {k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()}
    try:
        from controlnet_aux.open_pose.model import bodypose_model

        want = {k.split(".", 1)[1]: tuple(v.shape) for k, v in bodypose_model().state_dict().items()}
        missing = sorted(set(want) - set(out))
        wrong = sorted(k for k in want if k in out and tuple(out[k].shape) != want[k])
        if missing or wrong:
            sys.exit(f"not a body_pose_model state dict: missing {missing[:5]}, wrong shapes {wrong[:5]}")
    except ImportError:
        print("controlnet-aux not installed: shapes not checked", file=sys.stderr)
    save_file(out, dst)
    print(f"{dst}: {len(out)} tensors, {sum(v.numel() for v in out.values())} parameters")


if __name__ == "__main__":
    main()
