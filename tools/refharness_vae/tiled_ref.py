#!/usr/bin/env python3
"""Reference for the VAE's tiled decode: diffusers `enable_tiling(64, 64, 48, 48)` on a fixed random latent.

    python tools/refharness_vae/tiled_ref.py SNAPSHOT OUT.safetensors

Writes `z` [1, 16, 1, 12, 20] (randn, seed 0, x0.2), `tiled` (the tiled decode, [1, 3, 1, 96, 160]) and
`untiled` (plain decode).
"""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from diffusers import AutoencoderKLQwenImage  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def main() -> int:
    snap, out = sys.argv[1], sys.argv[2]
    vae = AutoencoderKLQwenImage.from_pretrained(snap, subfolder="vae", torch_dtype=torch.float32).eval()
    g = torch.Generator("cpu").manual_seed(0)
    z = torch.randn(1, vae.config.z_dim, 1, 12, 20, generator=g) * 0.2
    with torch.no_grad():
        untiled = vae.decode(z, return_dict=False)[0]
        vae.enable_tiling(64, 64, 48, 48)
        tiled = vae.decode(z, return_dict=False)[0]
    save_file({"z": z.contiguous(), "tiled": tiled.contiguous(), "untiled": untiled.contiguous()}, out)
    print("mean |tiled - untiled|", float((tiled - untiled).abs().mean()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
