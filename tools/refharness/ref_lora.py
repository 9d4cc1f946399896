#!/usr/bin/env python3
"""LoRA fixtures: random adapters in every naming diffusers' Qwen-Image loader accepts, and diffusers' own results
with them (QwenImagePipeline.load_lora_weights + set_adapters, PEFT backend).

    python ref_lora.py SNAPSHOT OUT_DIR        (SNAPSHOT: the `tiny` fixture snapshot; OUT_DIR: tests/fixtures/lora)

Writes into OUT_DIR:

  adapters/peft.safetensors
        diffusers / PEFT names (`transformer.transformer_blocks.N.attn.to_q.lora_A.weight` / `lora_B`), rank 4,
        with the PEFT LoraConfig in the safetensors metadata (`lora_adapter_metadata`: lora_alpha 8, a
        rank_pattern and an alpha_pattern), as `QwenImagePipeline.save_lora_weights(...,
        transformer_lora_adapter_metadata=...)` writes it. Targets every block linear, img_in and proj_out.
  adapters/kohya.safetensors
        kohya / musubi names (`lora_unet_transformer_blocks_N_attn_to_q.lora_down.weight`, `lora_up`, `alpha`),
        rank 3, per-module alphas (one module without alpha: scale 1), plus top-level modules
        (`lora_unet_norm_out_linear`, `lora_unet_txt_in`, `lora_unet_time_text_embed_timestep_embedder_linear_1`).
  adapters/comfy.safetensors
        ComfyUI names (`diffusion_model.transformer_blocks.N.attn.to_q.lora_down.weight`, `lora_up`, `alpha`),
        rank 2, bfloat16 (alpha/rank a power of two, so diffusers' folding of alpha into the bf16 factors is exact).
  adapters/lightning.safetensors, adapters/lightning.scheduler.json
        a PEFT-named adapter without the `transformer.` prefix (rank 4, `.alpha` tensors = 2: scale 1/2) with the scheduler config the lightx2v
        Qwen-Image-Lightning LoRAs are used with (their README: FlowMatchEulerDiscreteScheduler with
        base_shift = max_shift = ln 3, shift_terminal None, use_dynamic_shifting, exponential time shift).
  tensors.safetensors, manifest.json (mode "lora": `qwen-image parity --reference OUT_DIR` recomputes every case)
        `denoise.*`: the pipeline inputs (prompt / negative embeddings and masks, packed start latents; 64x64);
        `<case>.final`: QwenImagePipeline's final packed latents (output_type="latent") for each case of
        manifest["cases"]: adapters and scales, steps, CFG, scheduler.
  png/<case>.png
        the whole QwenImagePipeline (prompt strings through the tiny text encoder, 64x64, seed 0 on
        torch.Generator("cpu"), output_type="pil" as reference.py saves it) for each case of manifest["pngs"]: what
        the four services must give with the adapters named in the request (within 1 level).

Everything is deterministic (fixed seeds, CPU float32).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import LIGHTNING_SCHEDULER_CONFIG, dump_json, setup_torch, versions  # noqa: E402

torch = None  # set in main()

LIGHTNING_SCHEDULER = LIGHTNING_SCHEDULER_CONFIG


def linears(snapshot: Path) -> dict:
    """diffusers module name -> (in, out) of every nn.Linear of the transformer."""
    from diffusers import QwenImageTransformer2DModel

    m = QwenImageTransformer2DModel.from_pretrained(str(snapshot / "transformer"), torch_dtype=torch.float32)
    return {n: (mod.in_features, mod.out_features) for n, mod in m.named_modules()
            if isinstance(mod, torch.nn.Linear)}


def factors(g, in_dim: int, out_dim: int, rank: int):
    down = torch.randn(rank, in_dim, generator=g) / math.sqrt(in_dim)
    up = torch.randn(out_dim, rank, generator=g) * (0.4 / math.sqrt(rank))
    return down, up


def kohya_flat(module: str) -> str:
    return module.replace(".", "_")


def make_adapters(lin: dict, out: Path) -> dict:
    from safetensors.torch import save_file

    d = out / "adapters"
    d.mkdir(parents=True, exist_ok=True)
    blocks = sorted(n for n in lin if n.startswith("transformer_blocks."))
    info = {}

    # 1. diffusers / PEFT with LoraConfig metadata
    g = torch.Generator().manual_seed(101)
    targets = blocks + ["img_in", "proj_out"]
    rank_pattern = {"img_in": 2}
    alpha_pattern = {"proj_out": 3.0}
    sd = {}
    for n in targets:
        r = rank_pattern.get(n, 4)
        a, b = factors(g, *lin[n], r)
        sd[f"transformer.{n}.lora_A.weight"] = a
        sd[f"transformer.{n}.lora_B.weight"] = b
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "use_dora": False, "init_lora_weights": True}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                                sort_keys=True)}
    save_file(sd, str(d / "peft.safetensors"), metadata=meta)
    info["peft"] = {"tensors": len(sd), "metadata": config}

    # 2. kohya / musubi: lora_unet_..., lora_down / lora_up / alpha
    g = torch.Generator().manual_seed(202)
    targets = [n for n in blocks if ".attn." in n or "_mlp." in n] + [
        "norm_out.linear", "txt_in", "time_text_embed.timestep_embedder.linear_1"]
    sd = {}
    for i, n in enumerate(targets):
        a, b = factors(g, *lin[n], 3)
        k = "lora_unet_" + kohya_flat(n)
        sd[f"{k}.lora_down.weight"] = a
        sd[f"{k}.lora_up.weight"] = b
        if i != 1:  # one module without alpha: diffusers scales it by 1
            sd[f"{k}.alpha"] = torch.tensor(float(1 + i % 5))
    save_file(sd, str(d / "kohya.safetensors"))
    info["kohya"] = {"tensors": len(sd)}

    # 3. ComfyUI: diffusion_model. prefix, dotted names, bf16
    g = torch.Generator().manual_seed(303)
    targets = [n for n in blocks if ".attn.to_" in n or ".attn.add_" in n or "_mod." in n]
    sd = {}
    for n in targets:
        a, b = factors(g, *lin[n], 2)
        sd[f"diffusion_model.{n}.lora_down.weight"] = a.to(torch.bfloat16)
        sd[f"diffusion_model.{n}.lora_up.weight"] = b.to(torch.bfloat16)
        sd[f"diffusion_model.{n}.alpha"] = torch.tensor(1.0, dtype=torch.bfloat16)  # alpha/rank = 1/2
    save_file(sd, str(d / "comfy.safetensors"))
    info["comfy"] = {"tensors": len(sd)}

    # 4. Lightning-style: PEFT names with alpha tensors, and the scheduler sidecar
    g = torch.Generator().manual_seed(404)
    sd = {}
    for n in blocks:
        a, b = factors(g, *lin[n], 4)
        # with `.alpha` tensors diffusers converts the names and adds `transformer.` itself: no prefix here
        sd[f"{n}.lora_A.weight"] = a
        sd[f"{n}.lora_B.weight"] = b
        sd[f"{n}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(d / "lightning.safetensors"))
    dump_json(d / "lightning.scheduler.json", {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                               **LIGHTNING_SCHEDULER})
    info["lightning"] = {"tensors": len(sd), "scheduler": LIGHTNING_SCHEDULER}
    return info


# name -> (adapters [(file stem, scale)], steps, true_cfg_scale, scheduler: None = the snapshot's)
CASES = {
    "base": ([], 3, 4.0, None),
    "peft": ([("peft", 1.0)], 3, 4.0, None),
    "kohya": ([("kohya", 1.0)], 3, 4.0, None),
    "comfy_0.8": ([("comfy", 0.8)], 3, 4.0, None),
    "two": ([("peft", 0.7), ("kohya", -0.5)], 3, 4.0, None),
    "lightning_4": ([("lightning", 1.0)], 4, 1.0, "lightning"),
    "lightning_8": ([("lightning", 1.0)], 8, 1.0, "lightning"),
}


# PNG cases through the whole pipeline: name -> (adapters, steps, true_cfg_scale, negative prompt, scheduler)
PNG_PROMPT = "A cat holding a sign that says hello world"
PNGS = {
    "peft": ([("peft", 1.0)], 4, 4.0, " ", None),
    "two": ([("peft", 0.7), ("kohya", -0.5)], 4, 4.0, " ", None),
    "lightning_4": ([("lightning", 1.0)], 4, 1.0, None, "lightning"),
}


def run_png(snapshot: Path, out: Path, adapters, steps: int, cfg: float, neg, scheduler, dest: Path) -> None:
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(snapshot), torch_dtype=torch.float32)
    for stem, _ in adapters:
        pipe.load_lora_weights(str(out / "adapters" / f"{stem}.safetensors"), adapter_name=stem)
    pipe.set_adapters([s for s, _ in adapters], adapter_weights=[w for _, w in adapters])
    if scheduler == "lightning":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER)
    g = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        res = pipe(prompt=PNG_PROMPT, negative_prompt=neg, true_cfg_scale=cfg, height=64, width=64,
                   num_inference_steps=steps, generator=g, output_type="np", max_sequence_length=512)
    pil = pipe.numpy_to_pil(res.images)[0]
    pil.save(dest, format="PNG", optimize=False, compress_level=6)
    return float(np.asarray(pil).std())


def run_case(snapshot: Path, out: Path, inp: dict, adapters, steps: int, cfg: float, scheduler) -> "torch.Tensor":
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(snapshot), torch_dtype=torch.float32)
    for stem, _ in adapters:
        pipe.load_lora_weights(str(out / "adapters" / f"{stem}.safetensors"), adapter_name=stem)
    if adapters:
        pipe.set_adapters([s for s, _ in adapters], adapter_weights=[w for _, w in adapters])
    if scheduler == "lightning":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER)
    kw = {}
    if cfg > 1.0:
        kw = {"negative_prompt_embeds": inp["negative_prompt_embeds"],
              "negative_prompt_embeds_mask": inp["negative_prompt_embeds_mask"]}
    with torch.no_grad():
        return pipe(prompt_embeds=inp["prompt_embeds"], prompt_embeds_mask=inp["prompt_embeds_mask"],
                    true_cfg_scale=cfg, height=64, width=64, num_inference_steps=steps, latents=inp["latents"],
                    output_type="latent", return_dict=False, **kw)[0]


def main(argv=None) -> int:
    global torch
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    torch = setup_torch(2)
    import peft

    args.out.mkdir(parents=True, exist_ok=True)
    lin = linears(args.snapshot)
    cfg = json.loads((args.snapshot / "transformer" / "config.json").read_text())
    manifest = {"mode": "lora", "versions": {**versions(), "peft": peft.__version__},
                "adapters": make_adapters(lin, args.out),
                "cases": {}}
    # ref_quant's QwenImagePipeline inputs (64x64, a padded negative prompt), drawn from manual_seed(7)
    import ref_quant

    ref_quant.torch = torch
    inp = ref_quant.denoise_inputs(cfg, 6)
    refs = {f"denoise.{k}": v for k, v in inp.items()}
    base = None
    for name, (adapters, steps, true_cfg, scheduler) in CASES.items():
        final = run_case(args.snapshot, args.out, inp, adapters, steps, true_cfg, scheduler)
        refs[f"{name}.final"] = final
        if name == "base":
            base = final
        diff = float((final - base).norm() / base.norm()) if base is not None and final.shape == base.shape else None
        manifest["cases"][name] = {"adapters": adapters, "steps": steps, "true_cfg_scale": true_cfg,
                                   "scheduler": scheduler, "rel_change_vs_base": diff}
    (args.out / "png").mkdir(exist_ok=True)
    manifest["pngs"] = {}
    for name, (adapters, steps, true_cfg, neg, scheduler) in PNGS.items():
        std = run_png(args.snapshot, args.out, adapters, steps, true_cfg, neg, scheduler,
                      args.out / "png" / f"{name}.png")
        manifest["pngs"][name] = {"adapters": adapters, "steps": steps, "true_cfg_scale": true_cfg,
                                  "negative_prompt": neg, "scheduler": scheduler, "prompt": PNG_PROMPT,
                                  "width": 64, "height": 64, "seed": 0, "pixel_std": std}
    from safetensors.torch import save_file

    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in sorted(refs.items())},
              str(args.out / "tensors.safetensors"))
    dump_json(args.out / "manifest.json", manifest)
    print(json.dumps(manifest["cases"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
