#!/usr/bin/env python3
"""The diffusers side of `qwen-image-bench-t2i --reference diffusers`: diffusers' `QwenImagePipeline` on a
snapshot (float32, CPU, N torch threads), kept loaded and driven over stdin/stdout by the Rust bench so
that its runs alternate with the stack's in one process lifetime each.

    python diffusers_t2i.py SNAPSHOT --width 256 --height 256 --steps 20 [--true-cfg-scale 4] [--threads 2]

Prints `ready` once the pipeline is loaded. Then, per stdin line `SEED OUT.png PROMPT`: runs the pipeline
(prompt, negative prompt " ", true CFG, `torch.Generator("cpu").manual_seed(SEED)` — the noise the gateway
draws for the same seed), encodes the picture as PNG in memory (the gateway returns PNG too), writes it to
OUT.png and prints one JSON line `{"seconds": ...}`: the pipeline call plus the PNG encoding, not the file
write. An empty line ends it.
"""
import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "refharness"))

from _common import setup_torch  # noqa: E402  (sets OMP_WAIT_POLICY=PASSIVE before torch loads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot")
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--true-cfg-scale", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch = setup_torch(a.threads)
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(a.snapshot, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    print("ready", flush=True)
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line:
            break
        seed, out, prompt = line.split(" ", 2)
        started = time.perf_counter()
        with torch.no_grad():
            image = pipe(prompt=prompt, negative_prompt=" ", true_cfg_scale=a.true_cfg_scale, height=a.height,
                         width=a.width, num_inference_steps=a.steps,
                         generator=torch.Generator("cpu").manual_seed(int(seed)), output_type="pil").images[0]
        png = io.BytesIO()
        image.save(png, format="PNG")
        seconds = time.perf_counter() - started
        Path(out).write_bytes(png.getvalue())
        print(json.dumps({"seconds": seconds}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
