#!/usr/bin/env python3
"""Scores the demo model's prompt following with the judge, on held-out (colour, pose, background) combinations.

    python evaluate.py --snapshot models/qwen-image-demo --judge tests/fixtures/judge [--per-lang 56] [--out R.json]

Pictures come from diffusers' own pipelines (QwenImagePipeline, QwenImageControlNetPipeline) on the snapshot, at
64x64, 20 steps, true CFG 4 with negative prompt " ", one seed per picture. Reports, per language (en, zh, mixed):
  text-to-image           colour / pose / background / prop / all four right
  ControlNet pose         pose accuracy with the skeleton of the asked pose and the pose named in the prompt,
                          and with the skeleton only (the prompt does not name the pose)
Optionally (--images DIR) writes a contact sheet of every picture.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scene as S  # noqa: E402

LANGS = ["en", "zh", "mixed"]


def prompts(per_lang: int, seed: int):
    """per_lang (colour, pose, background, prop) cases per language over the held-out triples."""
    r = random.Random(seed)
    held = S.held_out_triples()
    cases = []
    for lang in LANGS:
        for i in range(per_lang):
            c, p, b = held[i % len(held)]
            prop = (i // len(held)) % len(S.PROPS)
            cases.append((lang, (c, p, b, prop), S.caption(r, c, p, b, prop, lang),
                          S.caption_without_pose(r, c, b, prop, lang)))
    return cases


def skeleton_for(pose: int, seed: int):
    import train

    r = random.Random(seed)
    sc = S.sample_scene(r, 0, pose, 0, 0)
    return train.render_skeleton(S.keypoints(sc))


def summarise(pred, want, cols=("colour", "pose", "background", "prop")):
    ok = pred == want
    out = {k: float(ok[:, i].mean()) for i, k in enumerate(cols)}
    out["all"] = float(ok.all(axis=1).mean())
    out["n"] = int(len(want))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--judge", type=Path, required=True)
    ap.add_argument("--per-lang", type=int, default=56)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0, help="true CFG scale")
    ap.add_argument("--modes", default="t2i,pose_with_skeleton,skeleton_only")
    ap.add_argument("--conditioning-scale", type=float, default=1.0, help="ControlNet conditioning scale")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora", type=Path, help="a LoRA (safetensors) to load; its STEM.scheduler.json, when present, "
                    "replaces the scheduler (e.g. loras/lightning.safetensors with --steps 4 --cfg 1)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--images", type=Path, help="write contact sheets here")
    a = ap.parse_args(argv)

    import torch
    from diffusers import QwenImageControlNetModel, QwenImageControlNetPipeline, QwenImagePipeline
    from PIL import Image

    import judge as J

    torch.set_num_threads(a.threads)
    net = J.load(a.judge)
    pipe = QwenImagePipeline.from_pretrained(str(a.snapshot), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if a.lora:
        pipe.load_lora_weights(str(a.lora), adapter_name="lora")
        sidecar = a.lora.with_suffix(".scheduler.json")
        if sidecar.is_file():
            from diffusers import FlowMatchEulerDiscreteScheduler

            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.loads(sidecar.read_text()))
    cn = QwenImageControlNetModel.from_pretrained(str(a.snapshot / "controlnet"), torch_dtype=torch.float32)
    cpipe = QwenImageControlNetPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer, transformer=pipe.transformer, controlnet=cn)
    cpipe.set_progress_bar_config(disable=True)
    cases = prompts(a.per_lang, a.seed)
    common = dict(height=S.SIZE, width=S.SIZE, num_inference_steps=a.steps, true_cfg_scale=a.cfg,
                  negative_prompt=" ", output_type="np")
    modes = a.modes.split(",")
    report = {"steps": a.steps, "true_cfg_scale": a.cfg, "lora": str(a.lora) if a.lora else None, "conditioning_scale": a.conditioning_scale, "size": S.SIZE, "held_out_triples": S.held_out_triples()}
    t0 = time.time()
    sheets = {}
    confusion = {m: np.zeros((len(S.POSE_NAMES), len(S.POSE_NAMES)), np.int64) for m in modes}
    for mode in modes:
        report[mode] = {}
        t_mode = time.time()
        for lang in LANGS:
            sub = [c for c in cases if c[0] == lang]
            want = np.array([c[1] for c in sub])
            imgs = []
            for k, (_, attrs, cap, cap_nopose) in enumerate(sub):
                g = torch.Generator("cpu").manual_seed(a.seed + k)
                if mode == "t2i":
                    out = pipe(prompt=cap, generator=g, **common).images
                else:
                    sk = Image.fromarray(skeleton_for(attrs[1], a.seed * 7 + k))
                    out = cpipe(prompt=cap if mode == "pose_with_skeleton" else cap_nopose, control_image=sk,
                                controlnet_conditioning_scale=a.conditioning_scale, generator=g, **common).images
                imgs.append((np.clip(out[0], 0, 1) * 255).round().astype(np.uint8))
            imgs = np.stack(imgs)
            pred = J.score(net, imgs).numpy()
            report[mode][lang] = summarise(pred, want)
            confusion[mode] += np.bincount(want[:, 1] * len(S.POSE_NAMES) + pred[:, 1],
                                           minlength=len(S.POSE_NAMES) ** 2).reshape(len(S.POSE_NAMES), -1)
            sheets[(mode, lang)] = imgs
            print(f"{mode:20s} {lang:5s} {report[mode][lang]} ({time.time() - t0:.0f}s)", flush=True)
        report[mode]["seconds_per_image"] = (time.time() - t_mode) / len(cases)
    for mode in modes:
        allp = [report[mode][lang] for lang in LANGS]
        report[mode]["total"] = {k: float(np.mean([x[k] for x in allp])) for k in allp[0] if k != "n"}
        report[mode]["total"]["n"] = sum(x["n"] for x in allp)
        # rows: the asked pose, columns: the pose the judge saw
        report[mode]["pose_confusion"] = {"poses": list(S.POSE_NAMES), "counts": confusion[mode].tolist()}
        print(mode, "pose confusion (rows asked, columns seen):", S.POSE_NAMES)
        print(confusion[mode])
    print(json.dumps({m: report[m]["total"] for m in modes}, indent=1))
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))
    if a.images:
        a.images.mkdir(parents=True, exist_ok=True)
        for (mode, lang), imgs in sheets.items():
            rows = [np.concatenate(list(imgs[i:i + 14]), axis=1) for i in range(0, len(imgs) - len(imgs) % 14, 14)]
            if rows:
                Image.fromarray(np.concatenate(rows, axis=0)).save(a.images / f"{mode}_{lang}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
