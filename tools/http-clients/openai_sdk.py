"""Drives the gateway's HTTP API with the official OpenAI Python SDK (run by crates/cli/tests/http_clients.rs).

Usage: openai_sdk.py BASE_URL API_KEY WORK_DIR

WORK_DIR holds the inputs the Rust test wrote (`pose.json`: OpenPose keypoints; `mask.png`: an RGBA mask,
transparent = repaint). The script saves every picture it gets into WORK_DIR and writes `results.json`; the
Rust test judges the pictures and checks the answers. It asserts only what the SDK itself must show (the call
shapes, the exception classes); a failing call raises and exits non-zero.
"""

import base64
import json
import pathlib
import sys

import openai

# The demo model's settings (crates/cli/tests/e2e_demo.rs `demo_t2i`): our extensions, sent with extra_body.
DEMO = {"negative_prompt": " ", "steps": 20, "true_cfg_scale": 4.0}


def main() -> None:
    base_url, key, work = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)
    out: dict = {"openai_version": openai.__version__}

    def save(name: str, b64: str) -> str:
        (work / name).write_bytes(base64.b64decode(b64))
        return name

    models = client.models.list()
    model = models.data[0].id
    out["models"] = [m.id for m in models.data]

    r = client.images.generate(
        model=model,
        prompt="a red stick figure standing on a white background",
        size="64x64",
        response_format="b64_json",
        extra_body={**DEMO, "seed": 7},
    )
    assert len(r.data) == 1, r
    out["generate"] = save("generate.png", r.data[0].b64_json)

    keypoints = json.loads((work / "pose.json").read_text())
    r = client.images.generate(
        model=model,
        prompt="a blue stick figure on a white background",
        size="64x64",
        extra_body={**DEMO, "seed": 1, "keypoints": keypoints},
    )
    out["pose"] = save("pose.png", r.data[0].b64_json)

    r = client.images.generate(
        model=model,
        prompt="a green stick figure kicking on a black background",
        size="64x64",
        n=2,
        extra_body=DEMO,
    )
    out["n2"] = [save(f"n2-{i}.png", d.b64_json) for i, d in enumerate(r.data)]

    with open(work / "generate.png", "rb") as image, open(work / "mask.png", "rb") as mask:
        r = client.images.edit(
            model=model,
            image=image,
            mask=mask,
            prompt="a blue stick figure standing on a white background",
            size="64x64",
            extra_body={**DEMO, "seed": 1},
        )
    out["edit"] = save("edit.png", r.data[0].b64_json)

    stream = client.images.generate(
        model=model,
        prompt="a yellow stick figure running on a gray background",
        size="64x64",
        stream=True,
        partial_images=2,
        extra_body={**DEMO, "seed": 3},
    )
    types = []
    for event in stream:
        types.append(event.type)
        if event.type == "image_generation.completed":
            out["stream"] = save("stream.png", event.b64_json)
    out["stream_types"] = types

    wrong = openai.OpenAI(base_url=base_url, api_key="sk-wrong-key-0123456789", max_retries=0, timeout=60)
    try:
        wrong.images.generate(model=model, prompt="a red stick figure", size="64x64")
        out["wrong_key"] = {"status": 200}
    except openai.AuthenticationError as e:
        out["wrong_key"] = {"status": e.status_code, "message": e.message}

    try:
        client.images.generate(model=model, prompt="a red stick figure", size="64")
        out["bad_size"] = {"status": 200}
    except openai.BadRequestError as e:
        out["bad_size"] = {"status": e.status_code, "message": e.message, "param": getattr(e, "param", None)}

    (work / "results.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
