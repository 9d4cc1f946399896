#!/usr/bin/env bash
# The README's pictures of the default model, made with our own CLI (`qwen-image`, local stack on the embedded
# default model), then laid out 3x enlarged in contact sheets under docs/demo/.
#   tools/demo-model/readme_pictures.sh [path/to/qwen-image]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
Q="${1:-$ROOT/target/release/qwen-image}"
PY="${PY:-$HOME/.venvs/qwen-image-ref/bin/python}"
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
gen() { "$Q" generate --quiet --negative-prompt " " --seed "$1" --prompt "$2" --out "$T/$3.png" > /dev/null; }
gen 1 "a purple stick figure jumping on a gray background, with the moon" t2i_1
gen 2 "天蓝色背景上一个踢腿的黄色小人" t2i_2
gen 3 "a 红色 stick figure 挥手 on a white background, with the sun" t2i_3
gen 4 "a green stick figure sitting on a black background" t2i_4
gen 5 "灰色背景上一个举起双手的粉色小人，有太阳" t2i_5
gen 6 "blue stick figure running, sky blue background" t2i_6
i=0
for p in kicking arms_raised sitting running; do
  i=$((i + 1))
  "$Q" pose --quiet --keypoints "$ROOT/docs/demo/pose-$p.json" --negative-prompt " " --seed "$i" \
    --prompt "a blue stick figure on a white background" --out "$T/pose_$p.png" > /dev/null
  "$PY" "$ROOT/tools/openpose/render_pose_json.py" "$ROOT/docs/demo/pose-$p.json" "$T/skel_$p.png" 64 64 2> /dev/null
done
# inpaint: repaint the figure of t2i_1 in another colour (mask = the middle of the picture)
"$PY" - "$T/mask.png" <<'PYEOF'
import sys
from PIL import Image, ImageDraw
m = Image.new("L", (64, 64), 0)
ImageDraw.Draw(m).rectangle([12, 4, 51, 61], fill=255)
m.save(sys.argv[1])
PYEOF
"$Q" inpaint --quiet --image "$T/t2i_1.png" --mask "$T/mask.png" --strength 1.0 --negative-prompt " " --seed 7 \
  --prompt "a yellow stick figure jumping on a gray background, with the moon" --out "$T/inpaint.png" > /dev/null
# outpaint: 32 px more on each side of t2i_2
"$Q" outpaint --quiet --image "$T/t2i_2.png" --left 32 --right 32 --negative-prompt " " --seed 8 \
  --prompt "天蓝色背景上一个踢腿的黄色小人" --out "$T/outpaint.png" > /dev/null
cp "$T/mask.png" "$ROOT/docs/demo/inpaint-mask.png"
"$PY" - "$T" "$ROOT/docs/demo" <<'PYEOF'
import sys
from pathlib import Path
from PIL import Image
t, out = Path(sys.argv[1]), Path(sys.argv[2])
def sheet(names, dst, scale=3, gap=6):
    ims = [Image.open(t / f"{n}.png").convert("RGB") for n in names]
    w = sum(i.width * scale for i in ims) + gap * (len(ims) - 1)
    h = max(i.height * scale for i in ims)
    s = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for i in ims:
        s.paste(i.resize((i.width * scale, i.height * scale), Image.NEAREST), (x, 0))
        x += i.width * scale + gap
    s.save(out / dst)
sheet([f"t2i_{k}" for k in range(1, 7)], "t2i.png")
sheet([x for p in ["kicking", "arms_raised", "sitting", "running"] for x in (f"skel_{p}", f"pose_{p}")], "pose.png")
sheet(["t2i_1", "mask", "inpaint"], "inpaint.png")
sheet(["t2i_2", "outpaint"], "outpaint.png")
PYEOF
echo "wrote docs/demo/{t2i,pose,inpaint,outpaint}.png"
