#!/usr/bin/env python3
"""Times one diffusers QwenImage denoising step with true CFG (cond + uncond transformer passes, the
pipeline's norm-rescaled CFG, scheduler.step) on a snapshot, float32, CPU, N threads. Prints one JSON line.

    python denoise_step.py SNAPSHOT [--width 512 --height 512 --repeats 5 --threads 2 --cond-len 24 --uncond-len 6]
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see refharness/_common.py: spin-waiting ruins 2-core timings


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("snapshot")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cond-len", type=int, default=24)
    ap.add_argument("--uncond-len", type=int, default=6)
    a = ap.parse_args()
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.set_num_threads(a.threads)
    tr = QwenImageTransformer2DModel.from_pretrained(a.snapshot, subfolder="transformer", torch_dtype=torch.float32).eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(a.snapshot, subfolder="scheduler")
    h, w = 2 * (a.height // 16), 2 * (a.width // 16)
    seq = (h // 2) * (w // 2)
    cfg = tr.config
    g = torch.Generator("cpu").manual_seed(0)
    lat = torch.randn(1, seq, cfg.in_channels, generator=g)
    pos = torch.randn(1, a.cond_len, cfg.joint_attention_dim, generator=g)
    neg = torch.randn(1, a.uncond_len, cfg.joint_attention_dim, generator=g)
    import numpy as np

    m = (sched.config.max_shift - sched.config.base_shift) / (sched.config.max_image_seq_len - sched.config.base_image_seq_len)
    mu = seq * m + sched.config.base_shift - m * sched.config.base_image_seq_len
    shapes = [[(1, h // 2, w // 2)]]

    def step():
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=mu)
        sched.set_begin_index(0)
        t = sched.timesteps[0]
        tm = t.expand(1).to(lat.dtype) / 1000
        with torch.no_grad():
            c = tr(hidden_states=lat, timestep=tm, encoder_hidden_states=pos, encoder_hidden_states_mask=None,
                   img_shapes=shapes, return_dict=False)[0]
            u = tr(hidden_states=lat, timestep=tm, encoder_hidden_states=neg, encoder_hidden_states_mask=None,
                   img_shapes=shapes, return_dict=False)[0]
            comb = u + 4.0 * (c - u)
            v = comb * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
            return sched.step(v, t, lat, return_dict=False)[0]

    step()  # warm-up
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"impl": "diffusers", "width": a.width, "height": a.height, "tokens": seq,
                      "median_s": round(times[len(times) // 2], 4), "runs": [round(x, 4) for x in times]}))


if __name__ == "__main__":
    sys.exit(main())
