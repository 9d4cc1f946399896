#!/usr/bin/env python3
"""Run diffusers' QwenImageEditPlusPipeline (Qwen-Image-Edit-2509 / -2511) on a snapshot and dump reference tensors.

    python ref_edit.py SNAPSHOT OUT_DIR [--image PNG | --image-size WxH]... --prompt P [--negative-prompt N | --no-negative]
                       [--true-cfg-scale 4] [--steps 2] [--seed 0] [--height H --width W]
                       [--condition-area N] [--vae-area N] [--positions mrope|sequential]
                       [--pixel-values full|strided|none] [--max-dump-numel N]

Same output layout as reference.py (tensors.safetensors, manifest.json, timing.json, PNGs) and the same tensor
names where the tensors mean the same thing (te.K.*, prompt_embeds, rng.K, sched.*, step.*, vae.*, image_uint8).
Edit-specific tensors:

    input_{k}.png                      the input pictures (synthetic unless --image)
    processor.{K}.pixel_values         Qwen2VLProcessor output for text-encoder call K (0 = prompt; the negative prompt
                                       gets the same pictures, not dumped again): [sum(t*h*w), 3*2*14*14]; all rows,
                                       every --pixel-stride'th row (strided), or none
    processor.{K}.pixel_rows           the row indices kept in processor.K.pixel_values
    processor.{K}.image_grid_thw       [n_images, 3]
    processor.{K}.mm_token_type_ids    0 text, 1 image
    te.{K}.position_ids                [3, 1, L] positions the language model used (--positions mrope), absent when
                                       the model fell back to 0..L-1 (--positions sequential)
    te.{K}.vision.pooler_output        the vision tower's merged output [sum(t*h*w)/4, text hidden]
    te.{K}.vision.patch_embed          patch embedding output (only with --pixel-values full)
    image_latents_packed               prepare_latents(): normalised VAE latents (posterior mode) of every image, packed
                                       and concatenated along the sequence
    latents_init_packed                prepare_latents(): the packed noise

--positions: diffusers 0.42.1 does not forward the processor's `mm_token_type_ids` to the text encoder, so with
transformers >= 5 the language model falls back to sequential positions 0..L-1 (diffusers issue #14194). `mrope`
(default) forwards them, as diffusers PR #14189 does and as transformers 4.x computed without them: the 3-D
multimodal RoPE positions Qwen2.5-VL was trained with. `sequential` runs diffusers 0.42.1 unchanged.

--condition-area / --vae-area replace the pipeline's module constants CONDITION_IMAGE_SIZE (384*384) and
VAE_IMAGE_SIZE (1024*1024) for small, fast fixtures; the manifest records the values used.

    python ref_edit.py --geometry OUT.json

writes, for a list of picture sizes, the sizes the pipeline derives at its real constants (condition size,
VAE size, default output size with vae_scale_factor 8) and what smart_resize makes of the condition size, each
computed by diffusers'/transformers' own functions; errors are recorded as strings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import reference as R  # noqa: E402
from _common import dump_json, setup_torch, tree_digest, versions  # noqa: E402

torch = None  # set in main()


def parse_size(s: str) -> tuple[int, int]:
    w, h = s.lower().split("x")
    return int(w), int(h)


def install_edit_hooks(pipe, rec, args):
    """Processor outputs, position ids, vision tower outputs, image latents; forwards mm_token_type_ids when
    --positions mrope."""
    from transformers import Qwen2VLProcessor

    stash = {}
    orig_call = Qwen2VLProcessor.__call__

    def processor_call(self, *a, **kw):
        out = orig_call(self, *a, **kw)
        k = rec.next("proc")
        stash["mm_token_type_ids"] = out.get("mm_token_type_ids")
        if k == 0 and kw.get("images") is not None:
            rec.scalars["condition_sizes"] = [[im.width, im.height] for im in kw["images"]]
        pv = out.get("pixel_values")
        if pv is not None and k == 0:  # the negative prompt gets the same pictures
            n = pv.shape[0]
            if args.pixel_values == "full":
                rows = torch.arange(n)
            elif args.pixel_values == "strided":
                rows = torch.cat([torch.arange(0, n, args.pixel_stride), torch.tensor([n - 1])]).unique()
            else:
                rows = None
            if rows is not None:
                rec.add(f"processor.{k}.pixel_values", pv[rows], "Qwen2VLProcessor pixel_values (rows listed in "
                        f"processor.{k}.pixel_rows) [rows, 3*2*14*14]")
                rec.add(f"processor.{k}.pixel_rows", rows, "row indices of processor.K.pixel_values")
            rec.scalars[f"processor.{k}.pixel_values_shape"] = list(pv.shape)
            rec.add(f"processor.{k}.image_grid_thw", out["image_grid_thw"], "image_grid_thw [n_images, 3]")
        rec.add(f"processor.{k}.input_ids", out["input_ids"], "processor input_ids (image tokens expanded)")
        rec.add(f"processor.{k}.mm_token_type_ids", out["mm_token_type_ids"], "0 text, 1 image")
        return out

    Qwen2VLProcessor.__call__ = processor_call

    te = pipe.text_encoder
    orig_fwd = te.forward

    def te_forward(*a, **kw):
        if args.positions == "mrope" and kw.get("mm_token_type_ids") is None:
            kw["mm_token_type_ids"] = stash["mm_token_type_ids"]
        return orig_fwd(*a, **kw)

    te.forward = te_forward

    def lm_hook(module, a, kw, output):
        k = rec.next("lm")
        pos = kw.get("position_ids")
        if pos is not None:
            rec.add(f"te.{k}.position_ids", pos, "position_ids given to the language model [3, B, L]")
        rec.scalars[f"te.{k}.position_ids_is_none"] = pos is None

    te.model.language_model.register_forward_hook(lm_hook, with_kwargs=True)

    def vis_hook(module, a, kw, output):
        k = rec.next("vis")
        rec.add(f"te.{k}.vision.pooler_output", output.pooler_output,
                "vision tower output (merged, in image order) [sum(t*h*w)/merge^2, out_hidden_size]")

    te.model.visual.register_forward_hook(vis_hook, with_kwargs=True)
    if args.pixel_values == "full":
        def pe_hook(module, a, output):
            rec.add(f"te.{rec.next('pe')}.vision.patch_embed", output, "patch embedding output [N, hidden]")

        te.model.visual.patch_embed.register_forward_hook(pe_hook)

    def preprocess_after(a, kw, res):
        rec.scalars.setdefault("vae_sizes", []).append([int(res.shape[-1]), int(res.shape[-2])])

    R.wrap(pipe.image_processor, "preprocess", preprocess_after)

    def prep_after(a, kw, res):
        latents, image_latents = res
        rec.add("latents_init_packed", latents, "prepare_latents(): packed noise (B, h/2*w/2, 4C)")
        rec.add("image_latents_packed", image_latents,
                "prepare_latents(): normalised posterior-mode latents of every image, packed, concatenated")

    R.wrap(pipe, "prepare_latents", prep_after)


def install_rng_recorder(rec):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as m

    R.install_rng_recorder(rec)
    orig = m.randn_tensor

    def recorded(shape, generator=None, device=None, dtype=None, layout=None):
        out = orig(shape, generator=generator, device=device, dtype=dtype, layout=layout)
        k = rec.next("rng")
        rec.add(f"rng.{k}", out, f"torch randn draw #{k}: noise, shape {list(out.shape)}")
        return out

    m.randn_tensor = recorded


GEOMETRY_SIZES = [(80, 56), (120, 90), (90, 120), (1, 1), (64, 48), (48, 80), (96, 64), (333, 777), (1024, 1024),
                  (3000, 2000), (17, 1000), (1000, 17), (575, 1), (577, 1), (1, 575), (1, 577), (2000, 1), (7, 1500),
                  (1500, 7), (1920, 1080)]


def geometry(path: Path) -> int:
    """Sizes derived by QwenImageEditPlusPipeline at its real constants (see --geometry)."""
    import diffusers
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as m
    import transformers
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    vae_scale_factor = 8
    multiple_of = vae_scale_factor * 2  # __call__: multiple_of = self.vae_scale_factor * 2
    vae_proc = VaeImageProcessor(vae_scale_factor=multiple_of)  # the pipeline's image_processor

    def attempt(f):
        try:
            return list(f())
        except Exception as e:  # recorded, the Rust side must fail too
            return f"{type(e).__name__}: {e}"

    rows = []
    for w, h in GEOMETRY_SIZES:
        img = Image.new("RGB", (w, h))
        cond = attempt(lambda: m.calculate_dimensions(m.CONDITION_IMAGE_SIZE, w / h))
        cond = cond if isinstance(cond, str) or min(cond) > 0 else f"ValueError: size {cond}"

        def vae():
            vw, vh = m.calculate_dimensions(m.VAE_IMAGE_SIZE, w / h)
            hh, ww = vae_proc.get_default_height_width(img, vh, vw)
            if min(hh, ww) <= 0:
                raise ValueError(f"size {ww}x{hh}")
            return ww, hh

        def default_out():
            cw, ch = m.calculate_dimensions(1024 * 1024, w / h)  # __call__: image_size = image[-1].size
            ww, hh = cw // multiple_of * multiple_of, ch // multiple_of * multiple_of
            if min(hh, ww) <= 0:
                raise ValueError(f"size {ww}x{hh}")
            return ww, hh

        smart = attempt(lambda: smart_resize(cond[1], cond[0], factor=28, min_pixels=3136, max_pixels=12845056)
                        [::-1]) if not isinstance(cond, str) else None
        rows.append({"size": [w, h], "condition": cond, "vae": attempt(vae), "default_output": attempt(default_out),
                     "smart_resize_of_condition": smart})
    dump_json(path, {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "condition_area": m.CONDITION_IMAGE_SIZE, "vae_area": m.VAE_IMAGE_SIZE,
                     "vae_scale_factor": vae_scale_factor, "rows": rows})
    print("wrote", len(rows), "rows to", path)
    return 0


def main(argv=None) -> int:
    global torch
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--geometry":
        setup_torch(1)
        return geometry(Path(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--image", action="append", help="input picture (repeat for several)")
    ap.add_argument("--image-size", action="append", type=parse_size,
                    help="WxH of a synthetic input picture (repeat for several; used when --image is not given)")
    ap.add_argument("--image-seed", type=int, default=0, help="seed of the first synthetic picture (+k for the k-th)")
    ap.add_argument("--prompt", default="make it a moonlit night")
    ap.add_argument("--negative-prompt", default=" ")
    ap.add_argument("--no-negative", action="store_true", help="pass negative_prompt=None (no true CFG)")
    ap.add_argument("--true-cfg-scale", type=float, default=4.0)
    ap.add_argument("--height", type=int, default=None, help="default: the pipeline's (from the last picture)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--condition-area", type=int, default=None, help="override CONDITION_IMAGE_SIZE (384*384)")
    ap.add_argument("--vae-area", type=int, default=None, help="override VAE_IMAGE_SIZE (1024*1024)")
    ap.add_argument("--positions", default="mrope", choices=["mrope", "sequential"])
    ap.add_argument("--pixel-values", default="full", choices=["full", "strided", "none"])
    ap.add_argument("--pixel-stride", type=int, default=37)
    ap.add_argument("--max-dump-numel", type=int, default=1 << 20,
                    help="drop recorded tensors larger than this (VAE inputs at 1024x1024), listed in the manifest")
    ap.add_argument("--drop", action="append", default=[],
                    help="regular expression (full match) of recorded tensor names to leave out (repeatable)")
    ap.add_argument("--dump-steps", default="all", choices=["all", "first"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if args.no_negative:
        args.negative_prompt = None

    torch = setup_torch(args.threads)
    R.torch = torch
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_mod
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image

    if args.condition_area is not None:
        edit_mod.CONDITION_IMAGE_SIZE = args.condition_area
    if args.vae_area is not None:
        edit_mod.VAE_IMAGE_SIZE = args.vae_area

    out: Path = args.out_dir
    if out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"{out} is not empty (use --force)")
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()

    images = []
    if args.image:
        for k, p in enumerate(args.image):
            images.append(R.load_or_make_image(p, 0, 0, 0, out, f"input_{k}.png"))
    else:
        for k, (w, h) in enumerate(args.image_size or [(64, 48)]):
            images.append(R.load_or_make_image(None, h, w, args.image_seed + k, out, f"input_{k}.png"))

    timing = {"threads": args.threads}
    t0 = time.perf_counter()
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(args.snapshot), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    timing["load_s"] = time.perf_counter() - t0

    rec = R.Recorder()
    st = R.StepState()
    install_rng_recorder(rec)
    cb = R.install_common_hooks(pipe, rec, st, args.dump_steps == "all")
    install_edit_hooks(pipe, rec, args)

    g = torch.Generator("cpu").manual_seed(args.seed)
    t1 = time.perf_counter()
    st.t_marks.append(t1)
    with torch.no_grad():
        res = pipe(image=images, prompt=args.prompt, negative_prompt=args.negative_prompt,
                   true_cfg_scale=args.true_cfg_scale, height=args.height, width=args.width,
                   num_inference_steps=args.steps, generator=g, output_type="np", callback_on_step_end=cb,
                   callback_on_step_end_tensor_inputs=["latents"])
    timing["pipeline_s"] = time.perf_counter() - t1
    last = st.step - 1
    rec.add("latents_final_packed", rec.tensors[f"step.{last}.latents_end"], "latents after the last step (packed)")
    pngs = R.finish_images(pipe, rec, res.images, out)

    import re

    dropped = {}
    for name in sorted(rec.tensors):
        t = rec.tensors[name]
        if t.numel() > args.max_dump_numel or any(re.fullmatch(d, name) for d in args.drop):
            dropped[name] = list(t.shape)
            del rec.tensors[name]
            del rec.desc[name]
    img = rec.tensors["image_uint8"]
    rec.scalars.update({
        "output_size": [int(img.shape[2]), int(img.shape[1])],
        "condition_area": edit_mod.CONDITION_IMAGE_SIZE,
        "vae_area": edit_mod.VAE_IMAGE_SIZE,
        "positions": args.positions,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "template": pipe.prompt_template_encode,
        "template_drop_idx": pipe.prompt_template_encode_start_idx,
        "zero_cond_t": bool(pipe.transformer.config.zero_cond_t),
        "input_sizes": [[im.width, im.height] for im in images],
        "dropped_tensors": dropped,
    })

    snap = Path(args.snapshot)
    manifest = {
        "mode": "edit",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("snapshot", "out_dir", "force", "threads")},
        "snapshot": {"files_sha256": {k: v for k, v in tree_digest(snap).items() if k != "refharness.json"}},
        "versions": {k: v for k, v in versions().items() if k != "platform"},
        "scalars": rec.scalars,
        "vae_scale_factor": pipe.vae_scale_factor,
        "scheduler_config": dict(pipe.scheduler.config),
        "pngs": pngs,
        "tensors": rec.tensor_index(),
    }
    rec.save(out)
    dump_json(out / "manifest.json", json.loads(json.dumps(manifest, default=R._json_default)))
    dump_json(out / "timing.json", timing)
    print(json.dumps({"out": str(out), "tensors": len(rec.tensors), "pngs": pngs, "dropped": dropped,
                      "timing": {k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
