#!/usr/bin/env python3
"""Distils a Lightning-style 4-step LoRA from the demo model (the recipe of lightx2v/Qwen-Image-Lightning, in
miniature): the student (the demo transformer + a LoRA) sampled with the Lightning scheduler settings at 4 steps
and CFG 1 learns to land on the teacher's final latents (the demo model itself at 20 steps, true CFG 4 with
negative prompt " "), from the same noise and prompt.

    python lightning.py --snapshot models/qwen-image-demo --out models/qwen-image-demo/loras [--iters 400]

Writes OUT/lightning.safetensors (diffusers/PEFT names `transformer.<module>.lora_A.weight` / `lora_B.weight`,
rank --rank, alpha = rank) and OUT/lightning.scheduler.json (FlowMatchEulerDiscreteScheduler with base_shift =
max_shift = ln 3, shift_terminal None: lightx2v/Qwen-Image-Lightning's README). Prompts are training captions
(the held-out triples of evaluate.py are left out). Backpropagates through the 4 unrolled Euler steps (loss: MSE
of the final packed latents). Deterministic for a given --seed on one CPU type.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "refharness"))

import scene as S  # noqa: E402
from _common import LIGHTNING_SCHEDULER_CONFIG  # noqa: E402

LIGHTNING_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", **LIGHTNING_SCHEDULER_CONFIG}
STEPS = 4


def captions(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    held = set(S.held_out_triples())
    triples = [t for t in S.all_triples() if t not in held]
    out = []
    for i in range(n):
        c, p, b = r.choice(triples)
        prop = r.randrange(len(S.PROPS))
        out.append(S.caption(r, c, p, b, prop, ["en", "zh", "mixed"][i % 3]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=384, help="teacher (prompt, noise) pairs")
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    pipe = QwenImagePipeline.from_pretrained(str(a.snapshot), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()

    # teacher pairs: prompt embeddings, start noise, final latents of the 20-step CFG-4 pipeline
    caps = captions(a.pairs, a.seed)
    with torch.no_grad():
        emb, mask = pipe.encode_prompt(prompt=caps, device=torch.device("cpu"), max_sequence_length=512)
        neg, neg_mask = pipe.encode_prompt(prompt=[" "] * len(caps), device=torch.device("cpu"),
                                           max_sequence_length=512)
        g = torch.Generator("cpu").manual_seed(a.seed)
        noise = pipe.prepare_latents(len(caps), pipe.transformer.config.in_channels // 4, S.SIZE, S.SIZE,
                                     torch.float32, torch.device("cpu"), g)
        targets = []
        for i in range(0, len(caps), 64):
            sl = slice(i, i + 64)
            targets.append(pipe(prompt_embeds=emb[sl], prompt_embeds_mask=None if mask is None else mask[sl],
                                negative_prompt_embeds=neg[sl],
                                negative_prompt_embeds_mask=None if neg_mask is None else neg_mask[sl],
                                true_cfg_scale=4.0, height=S.SIZE, width=S.SIZE, num_inference_steps=20,
                                latents=noise[sl], output_type="latent", return_dict=False)[0])
        targets = torch.cat(targets)
    print(f"teacher: {len(caps)} pairs in {time.time() - t0:.0f}s", flush=True)

    # the Lightning schedule at 4 steps (mu does not matter: base_shift = max_shift)
    sched = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=math.log(3))
    sigmas = sched.sigmas.to(torch.float32)
    timesteps = sched.timesteps.to(torch.float32)
    print("sigmas", sigmas.tolist(), flush=True)

    tr = pipe.transformer
    targets_modules = sorted({n.rsplit(".", 1)[0] if n.endswith(".weight") else n
                              for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)
                              and n.startswith("transformer_blocks.")})
    tr.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights=True, target_modules=targets_modules))
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    n_tok = (S.SIZE // 16) ** 2
    side = S.SIZE // 16
    gen = torch.Generator().manual_seed(a.seed + 1)

    def student(idx):
        x = noise[idx]
        b = x.shape[0]
        for i in range(STEPS):
            v = tr(hidden_states=x, timestep=(timesteps[i] / 1000).expand(b), encoder_hidden_states=emb[idx],
                   encoder_hidden_states_mask=None if mask is None else mask[idx],
                   img_shapes=[[(1, side, side)]] * b, return_dict=False)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return x

    with torch.no_grad():
        base_loss = float(torch.nn.functional.mse_loss(student(torch.arange(64)), targets[:64]))
    print(f"4-step student before training: mse {base_loss:.4f} (tokens {n_tok})", flush=True)
    for it in range(a.iters):
        idx = torch.randperm(len(caps), generator=gen)[: a.batch]
        loss = torch.nn.functional.mse_loss(student(idx), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 50 == 0 or it == a.iters - 1:
            print(f"iter {it} mse {float(loss):.4f} ({time.time() - t0:.0f}s)", flush=True)
    tr.eval()
    with torch.no_grad():
        after = float(torch.nn.functional.mse_loss(student(torch.arange(64)), targets[:64]))
    print(f"4-step student after training: mse {after:.4f} (before {base_loss:.4f})", flush=True)

    sd = get_peft_model_state_dict(tr)
    sd = {f"transformer.{k}": v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}  # bf16: half the bytes
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(a.out / "lightning.safetensors"), metadata={"format": "pt"})
    (a.out / "lightning.scheduler.json").write_text(json.dumps(LIGHTNING_SCHEDULER, indent=2, sort_keys=True) + "\n")
    info = {"pairs": a.pairs, "iters": a.iters, "batch": a.batch, "rank": a.rank, "lr": a.lr, "seed": a.seed,
            "mse_before": base_loss, "mse_after": after, "seconds": time.time() - t0, "tensors": len(sd)}
    (a.out / "lightning.train.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
