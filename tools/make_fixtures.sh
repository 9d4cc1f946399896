#!/usr/bin/env bash
# Regenerates every committed test fixture under tests/fixtures/ with diffusers itself (tiny random-weight
# snapshots + reference dumps). Needs the reference venv: tools/refharness/install.sh (about 3 min, 6 GB).
# Outputs are deterministic for the pinned versions on the same CPU type (see tools/refharness/README.md).
#   tools/make_fixtures.sh            # all fixtures
#   tools/make_fixtures.sh demo       # only the default (demo) model's references
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$HOME/.venvs/qwen-image-ref/bin/python}"
H="$ROOT/tools/refharness"
F="$ROOT/tests/fixtures"
ref() { local snap="$1" out="$2"; shift 2; "$PY" "$H/reference.py" "$snap" "$out" --force "$@" > /dev/null; echo "ok $out"; }

# --- the default model (models/qwen-image-demo, made by tools/demo-model/train.sh): diffusers references
demo_refs() {
  local D="$ROOT/models/qwen-image-demo" R="$F/demo/refs"
  rm -rf "$R" && mkdir -p "$R"
  ref "$D" "$R/t2i_64_en" --mode t2i --height 64 --width 64 --steps 20 --seed 1 --negative-prompt " " \
    --prompt "a purple stick figure jumping on a gray background, with the moon" --dump-steps first
  ref "$D" "$R/t2i_64_zh" --mode t2i --height 64 --width 64 --steps 20 --seed 2 --negative-prompt " " \
    --prompt "天蓝色背景上一个踢腿的黄色小人" --dump-steps first
  local T; T="$(mktemp -d)"
  "$PY" "$ROOT/tools/openpose/render_pose_json.py" "$ROOT/docs/demo/pose-kicking.json" "$T/pose.png" 64 64
  ref "$D" "$R/controlnet_pose_64" --mode controlnet --image "$T/pose.png" --height 64 --width 64 --steps 20 \
    --seed 3 --conditioning-scale 1.0 --negative-prompt " " --prompt "a blue stick figure on a white background" \
    --dump-steps first
  rm -rf "$T" "$R"/*/*.log
}
if [ "${1:-}" = demo ]; then demo_refs; exit 0; fi

# --- tiny: the standard suite (snapshot with ControlNet; t2i, inpaint, controlnet, vae, textenc refs)
PY="$PY" bash "$H/make_suite.sh" "$F/tiny" tiny 0
rm -f "$F"/tiny/refs/*.log

# --- quantized / single-file weights (GGUF, fp8, ComfyUI layouts) made from the tiny snapshot, with diffusers'
# and transformers' own loaders' outputs on them (tools/refharness/ref_quant.py)
rm -rf "$F/quant" && "$PY" "$H/ref_quant.py" "$F/tiny/snapshot" "$F/quant" > /dev/null && echo "ok $F/quant"

# --- tiny in bf16, sharded into many small files, without tokenizer.json (the released snapshot's shape)
"$PY" "$H/make_tiny.py" "$F/tiny-bf16-sharded/snapshot" --preset tiny --seed 7 --dtype bf16 --max-shard-size 60KB \
    --no-tokenizer-json --force > /dev/null
ref "$F/tiny-bf16-sharded/snapshot" "$F/tiny-bf16-sharded/refs/t2i_64x48" --mode t2i --height 64 --width 48 --steps 3 \
    --true-cfg-scale 3.5 --negative-prompt " " --seed 11

# --- random preset, seed 3: z_dim 4, 3 heads x 32, 3 layers, VAE dim_mult [1,1,2,2], 3-level temporal flags
"$PY" "$H/make_tiny.py" "$F/random-3/snapshot" --preset random --seed 3 --force > /dev/null
ref "$F/random-3/snapshot" "$F/random-3/refs/t2i_48x80" --mode t2i --height 48 --width 80 --steps 3 --true-cfg-scale 4 \
    --negative-prompt "blurry, 模糊" --seed 5 --prompt "a red kite over the sea, 海边的红色风筝"
ref "$F/random-3/snapshot" "$F/random-3/refs/vae_48x80" --mode vae --height 48 --width 80 --seed 6
ref "$F/random-3/snapshot" "$F/random-3/refs/textenc" --mode textenc

# --- random preset, seed 5: z_dim 8, head_dim 48 (axes 8/20/20), VAE temporal flags [true,false,false]
"$PY" "$H/make_tiny.py" "$F/random-5/snapshot" --preset random --seed 5 --force > /dev/null
ref "$F/random-5/snapshot" "$F/random-5/refs/t2i_80x32" --mode t2i --height 80 --width 32 --steps 2 --no-negative \
    --true-cfg-scale 1 --seed 9 --prompt "一个穿红衣服的人在跳舞 a person dancing"
ref "$F/random-5/snapshot" "$F/random-5/refs/vae_80x32" --mode vae --height 80 --width 32 --seed 3
ref "$F/random-5/snapshot" "$F/random-5/refs/textenc" --mode textenc

# --- random preset, seed 46 (text encoder): 4 heads / 2 KV heads (GQA group 2), 3 layers, vocab 2048;
# transformers-5 (`text_config` + `rope_parameters`) config; no tokenizer.json; bf16 weights in 100 KB shards
rm -rf "$F/random_v5"
"$PY" "$H/make_tiny.py" "$F/random_v5/snapshot" --preset random --seed 46 --te-config-style v5 --no-tokenizer-json \
    --dtype bf16 --max-shard-size 100KB > /dev/null
ref "$F/random_v5/snapshot" "$F/random_v5/refs/textenc" --mode textenc

# --- random preset, seed 17 (VAE only): 3 levels (spatial factor 4), z_dim 8, 2 res blocks, temporal
# [true, false]; only model_index.json + vae/ are kept, with a 40x72 `vae` reference
TMP="$(mktemp -d)"
"$PY" "$H/make_tiny.py" "$TMP/snapshot" --preset random --seed 17 --force > /dev/null
ref "$TMP/snapshot" "$TMP/vae_40x72" --mode vae --height 40 --width 72 --seed 9 --image-seed 2
rm -rf "$F/random_vae" && mkdir -p "$F/random_vae/snapshot" "$F/random_vae/refs"
cp "$TMP/snapshot/model_index.json" "$F/random_vae/snapshot/"
cp -r "$TMP/snapshot/vae" "$F/random_vae/snapshot/"
cp -r "$TMP/vae_40x72" "$F/random_vae/refs/"
rm -rf "$TMP"

# --- diffusers' tiled decode (enable_tiling(64, 64, 48, 48)) of a fixed latent on the tiny VAE
mkdir -p "$F/vae_tiled"
"$PY" "$ROOT/tools/refharness_vae/tiled_ref.py" "$F/tiny/snapshot" "$F/vae_tiled/tiny_96x160.safetensors"

# --- Pillow reference outputs for the imaging crate (LANCZOS resize, RGB->L)
"$PY" "$ROOT/tools/imaging/make_pil_vectors.py" "$F/imaging"

# --- BEGIN gateway end-to-end references (crates/cli/tests/e2e.rs; t2i_64 above is reused as is)
# Text-to-image without a negative prompt (no CFG) and with a Chinese+English prompt, 64x64, 4 steps.
"$PY" "$ROOT/tools/refharness/reference.py" "$F/tiny/snapshot" "$F/tiny/refs/t2i_64_nocfg" --mode t2i \
  --height 64 --width 64 --steps 4 --seed 7 --prompt 'A red fox in the snow' --no-negative --true-cfg-scale 1 \
  --dump-steps first --force
"$PY" "$ROOT/tools/refharness/reference.py" "$F/tiny/snapshot" "$F/tiny/refs/t2i_64_zh" --mode t2i \
  --height 64 --width 64 --steps 4 --seed 3 --prompt '一只猫举着写有 hello world 的牌子' --negative-prompt " " \
  --dump-steps first --force
# --- END gateway end-to-end references

# --- BEGIN ControlNet pose end-to-end references (crates/cli/tests/e2e_pose.rs; controlnet_64 above is reused)
# docs/pose-example.json drawn by controlnet-aux's draw_poses at 64x96, then diffusers' ControlNet pipeline on it.
POSE_TMP="$(mktemp -d)"
"$PY" "$ROOT/tools/openpose/render_pose_json.py" "$ROOT/docs/pose-example.json" "$POSE_TMP/pose_64x96.png" 64 96
"$PY" "$ROOT/tools/refharness/reference.py" "$F/tiny/snapshot" "$F/tiny/refs/controlnet_pose_64x96" --mode controlnet \
  --image "$POSE_TMP/pose_64x96.png" --height 96 --width 64 --steps 3 --seed 5 --conditioning-scale 1.0 \
  --negative-prompt " " --prompt "a dancer on a stage" --dump-steps first --force
rm -rf "$POSE_TMP"
# ControlNet inpaint: a tiny inpainting ControlNet (the tiny ControlNet widened to 68 inputs) and diffusers'
# QwenImageControlNetInpaintPipeline on the synthetic picture + centred mask (torch.manual_seed(seed) first).
"$PY" "$H/make_cn_inpaint.py" "$F/tiny/snapshot" --seed 11 > /dev/null
"$PY" "$ROOT/tools/refharness/reference.py" "$F/tiny/snapshot" "$F/tiny/refs/controlnet_inpaint_64" \
  --mode controlnet-inpaint --height 64 --width 64 --steps 3 --seed 6 --conditioning-scale 0.9 --negative-prompt " " \
  --dump-steps first --force
# --- END ControlNet pose end-to-end references
# --- BEGIN inpaint / img2img / outpaint end-to-end references (crates/cli/tests/e2e_inpaint.rs)
# img2img: the 64x64 inpaint input picture resized (LANCZOS) to 64 wide x 48 high, strength 0.7 of 4 steps.
"$PY" "$ROOT/tools/refharness/reference.py" "$F/tiny/snapshot" "$F/tiny/refs/img2img_64x48" --mode img2img \
  --image "$F/tiny/refs/inpaint_64/input_image.png" --height 48 --width 64 --steps 4 --strength 0.7 --seed 5 \
  --prompt 'a watercolour painting of a harbour' --negative-prompt " " --dump-steps first --force
# inpaint at a non-square size: synthetic picture (image seed 4) and centred-rectangle mask, 96 wide x 64 high.
"$PY" "$ROOT/tools/refharness/reference.py" "$F/tiny/snapshot" "$F/tiny/refs/inpaint_96x64" --mode inpaint \
  --height 64 --width 96 --image-seed 4 --steps 4 --strength 0.7 --seed 11 --prompt 'a boat on a lake' \
  --negative-prompt " " --dump-steps first --force
# outpaint-shaped inpaint: the 64x64 inpaint input on an 80x96 canvas (left 16, top 8, right 0, bottom 24),
# the new area filled with RGB (128,128,128) as the gateway does, mask white over the new area, strength 1.
TMP="$(mktemp -d)"
"$PY" - "$F/tiny/refs/inpaint_64/input_image.png" "$TMP" <<'PYEOF'
import sys
from PIL import Image
src, tmp = sys.argv[1], sys.argv[2]
img = Image.open(src).convert("RGB")
left, top, right, bottom = 16, 8, 0, 24
W, H = img.width + left + right, img.height + top + bottom
canvas = Image.new("RGB", (W, H), (128, 128, 128))
canvas.paste(img, (left, top))
mask = Image.new("L", (W, H), 255)
mask.paste(Image.new("L", img.size, 0), (left, top))
canvas.save(f"{tmp}/canvas.png")
mask.save(f"{tmp}/mask.png")
PYEOF
"$PY" "$ROOT/tools/refharness/reference.py" "$F/tiny/snapshot" "$F/tiny/refs/outpaint_80x96" --mode inpaint \
  --image "$TMP/canvas.png" --mask "$TMP/mask.png" --height 96 --width 80 --steps 3 --strength 1.0 --seed 21 \
  --prompt 'a wide landscape' --negative-prompt " " --dump-steps first --force
rm -rf "$TMP"
# --- END inpaint / img2img / outpaint end-to-end references

demo_refs

du -sh "$F"/*
