"""Instruction editing through the official OpenAI Python SDK (run by crates/cli/tests/e2e_instruct.rs).

Usage: openai_sdk_edit.py BASE_URL MODEL WORK_DIR

WORK_DIR holds what the Rust test wrote: `request.json` (prompt, negative_prompt, size, steps, true_cfg_scale,
seed, request_id) and the pictures `picture_0.png`, `picture_1.png`, ... The script sends them with
`client.images.edit(model=MODEL, image=[...])` (the SDK sends a list as repeated `image[]` parts), our
extensions in `extra_body`, and the request id as the `x-request-id` header; it saves the picture it gets as
`sdk_edit.png`, which the Rust test compares with the gRPC `Edit` result.
"""

import base64
import json
import pathlib
import sys

import openai


def main() -> None:
    base_url, model, work = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
    req = json.loads((work / "request.json").read_text())
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    pictures = sorted(work.glob("picture_*.png"))
    files = [open(p, "rb") for p in pictures]
    try:
        r = client.images.edit(
            model=model,
            image=files,
            prompt=req["prompt"],
            size=req["size"],
            extra_body={
                "negative_prompt": req["negative_prompt"],
                "steps": req["steps"],
                "true_cfg_scale": req["true_cfg_scale"],
                "seed": req["seed"],
            },
            extra_headers={"x-request-id": req["request_id"]},
        )
    finally:
        for f in files:
            f.close()
    assert len(r.data) == 1, r
    (work / "sdk_edit.png").write_bytes(base64.b64decode(r.data[0].b64_json))


if __name__ == "__main__":
    main()
