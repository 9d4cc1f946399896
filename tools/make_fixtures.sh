#!/usr/bin/env bash
# Regenerates every committed test fixture under tests/fixtures/ with diffusers itself (tiny random-weight
# snapshots + reference dumps). Needs the reference venv: tools/refharness/install.sh (about 3 min, 6 GB).
# Outputs are deterministic for the pinned versions on the same CPU type (see tools/refharness/README.md).
#   tools/make_fixtures.sh            # all fixtures
#   tools/make_fixtures.sh demo       # only the default (demo) model's references
#   tools/make_fixtures.sh edit       # only the instruction-editing (Qwen-Image-Edit) fixtures
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

# --- BEGIN instruction editing (QwenImageEditPlusPipeline; crates/model/tests/edit.rs)
# snapshot: the tiny preset as a Qwen-Image-Edit-2509 snapshot (processor/ folder, a 3-block vision tower);
# snapshot-2511: the same files (symlinks) with transformer/config.json zero_cond_t=true (Edit-2511).
# Most references shrink the pipeline's CONDITION_IMAGE_SIZE / VAE_IMAGE_SIZE (--condition-area 28672 -> 192x128
# for 3:2, --vae-area 16384) to keep them small; edit1_cond384 keeps the real 384*384 condition area, and
# geometry.json holds the sizes diffusers derives at the real constants.
edit_refs() {
  local E="$F/edit-tiny" S="$F/edit-tiny/snapshot" S11="$F/edit-tiny/snapshot-2511"
  local edit="$H/ref_edit.py" small=(--condition-area 28672 --vae-area 16384)
  # inputs of the transformer (= latents_init_packed + image_latents_packed) and of the VAE are left out except in
  # edit1_64, to keep the fixtures small
  local lean=(--drop 'step\.0\.transformer\..*\.hidden_states' --drop 'vae\.encode\..*\.in' --drop 'vae\.decode\.0\.out' --drop image)
  rm -rf "$E" && mkdir -p "$E/refs"
  "$PY" "$H/make_tiny.py" "$S" --preset tiny --seed 0 --edit > "$E/make_tiny.log"
  mkdir -p "$S11/transformer"
  for c in model_index.json processor scheduler text_encoder tokenizer vae; do ln -s "../snapshot/$c" "$S11/$c"; done
  ln -s ../../snapshot/transformer/diffusion_pytorch_model.safetensors "$S11/transformer/"
  "$PY" - "$S/transformer/config.json" "$S11/transformer/config.json" <<'PYEOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["zero_cond_t"] = True
open(sys.argv[2], "w").write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
PYEOF
  ed() { local snap="$1" out="$2"; shift 2; "$PY" "$edit" "$snap" "$E/refs/$out" --force "$@" > /dev/null; echo "ok $out"; }
  ed "$S" edit1_64 --image-size 80x56 --image-seed 1 "${small[@]}" --height 64 --width 64 --steps 3 --seed 1 \
    --negative-prompt " " --prompt "make it a moonlit night" --pixel-values strided
  ed "$S" edit2_64x48 "${lean[@]}" --image-size 96x64 --image-size 48x80 --image-seed 2 "${small[@]}" --height 48 --width 64 \
    --steps 2 --seed 2 --negative-prompt "blurry, 模糊" --prompt "put the figure of picture 2 into picture 1, 画面明亮" \
    --pixel-values strided
  ed "$S11" edit1_2511 "${lean[@]}" --image-size 80x56 --image-seed 3 "${small[@]}" --height 64 --width 64 --steps 3 --seed 3 \
    --no-negative --true-cfg-scale 1 --prompt "turn the sun into a moon" --pixel-values none
  ed "$S11" edit2_2511 "${lean[@]}" --image-size 96x64 --image-size 48x80 --image-seed 2 "${small[@]}" --height 48 --width 64 \
    --steps 2 --seed 4 --negative-prompt " " --prompt "put the figure of picture 2 into picture 1" --pixel-values none
  ed "$S" edit1_seq "${lean[@]}" --image-size 80x56 --image-seed 1 "${small[@]}" --height 64 --width 64 --steps 2 --seed 1 \
    --negative-prompt " " --prompt "make it a moonlit night" --positions sequential --pixel-values none \
    --dump-steps first
  ed "$S" edit1_cond384 "${lean[@]}" --image-size 120x90 --image-seed 5 --vae-area 16384 --height 64 --width 64 --steps 2 \
    --seed 5 --no-negative --true-cfg-scale 1 --prompt "add a red hat" --pixel-values strided --dump-steps first
  "$PY" "$edit" --geometry "$E/refs/geometry.json" > /dev/null
  rm -f "$E"/refs/*/timing.json
}
if [ "${1:-}" = edit ]; then edit_refs; exit 0; fi
# --- END instruction editing

# --- tiny: the standard suite (snapshot with ControlNet; t2i, inpaint, controlnet, vae, textenc refs)
PY="$PY" bash "$H/make_suite.sh" "$F/tiny" tiny 0
rm -f "$F"/tiny/refs/*.log

# --- quantized / single-file weights (GGUF, fp8, ComfyUI layouts) made from the tiny snapshot, with diffusers'
# and transformers' own loaders' outputs on them (tools/refharness/ref_quant.py)
rm -rf "$F/quant" && "$PY" "$H/ref_quant.py" "$F/tiny/snapshot" "$F/quant" > /dev/null && echo "ok $F/quant"
# diffusers' QwenImagePipeline with those GGUF transformers (from_single_file + GGUFQuantizationConfig): the
# PNGs the services must give with `--transformer-weights` (crates/cli/tests/e2e_quant.rs)
for q in Q8_0 Q4_0; do
  "$PY" "$H/reference.py" "$F/tiny/snapshot" "$F/quant/refs/t2i_64_$q" --force \
    --transformer-file "$F/quant/transformer/$q.gguf" > /dev/null && echo "ok $F/quant/refs/t2i_64_$q"
done

# --- LoRA adapters in every naming diffusers' Qwen-Image loader reads, made for the tiny snapshot, with
# QwenImagePipeline.load_lora_weights + set_adapters results (crates/model/tests/lora.rs, crates/cli/tests/e2e_lora.rs)
rm -rf "$F/lora" && "$PY" "$H/ref_lora.py" "$F/tiny/snapshot" "$F/lora" > /dev/null && echo "ok $F/lora"

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

edit_refs
demo_refs

du -sh "$F"/*
