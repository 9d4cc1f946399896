"""Times diffusers' QwenImagePipeline.encode_prompt (tokenizer + transformers text encoder) on CPU, f32.

    python tools/bench_textenc.py SNAPSHOT ITERS PROMPT [THREADS]

Prints one JSON line like crates/model/examples/bench_textenc.rs.
"""
import json
import statistics
import sys
import time

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, AutoTokenizer
from diffusers import QwenImagePipeline


def main():
    snap, iters, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    te = Qwen2_5_VLForConditionalGeneration.from_pretrained(f"{snap}/text_encoder", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(f"{snap}/tokenizer")
    # only the text path of the pipeline is used; encode_prompt never touches the transformer / vae
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=tok, transformer=None)
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        emb, _ = pipe.encode_prompt([prompt], device="cpu", max_sequence_length=512)  # warm-up
        ms = []
        for _ in range(iters):
            t = time.perf_counter()
            pipe.encode_prompt([prompt], device="cpu", max_sequence_length=512)
            ms.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"impl": "transformers", "load_s": round(load_s, 3), "tokens": emb.shape[1], "iters": iters,
                      "median_ms": round(statistics.median(ms), 3), "min_ms": round(min(ms), 3),
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
