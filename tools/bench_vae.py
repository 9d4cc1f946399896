#!/usr/bin/env python3
"""Time diffusers' AutoencoderKLQwenImage.decode (f32, CPU, untiled) on random latents.

    OMP_WAIT_POLICY=PASSIVE python tools/bench_vae.py SNAPSHOT HEIGHT WIDTH [REPEATS] [THREADS]

Prints one `decode_s` line per run and `median_s`. Used by tools/bench_vae.sh next to our decode.
"""
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from diffusers import AutoencoderKLQwenImage  # noqa: E402


def main() -> int:
    snap, h, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    threads = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    torch.set_num_threads(threads)
    vae = AutoencoderKLQwenImage.from_pretrained(snap, subfolder="vae", torch_dtype=torch.float32).eval()
    f = 2 ** len(vae.config.temperal_downsample)
    g = torch.Generator("cpu").manual_seed(0)
    z = torch.randn(1, vae.config.z_dim, 1, h // f, w // f, generator=g)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            img = vae.decode(z, return_dict=False)[0]
            dt = time.perf_counter() - t0
            print(f"decode_s {dt:.4f} shape {list(img.shape)}", flush=True)
            times.append(dt)
    print(f"median_s {statistics.median(times):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
