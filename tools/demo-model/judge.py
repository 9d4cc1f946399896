"""The judge: a small CNN that reads a 64x64 picture's figure colour, pose, background and prop.

Its weights are saved as safetensors with `judge.json` (label names, architecture), so the Rust end-to-end tests
run the same network with candle (crates/testkit/src/judge.rs). Architecture, input RGB / 255 in NCHW:
    conv{0..3}: 3x3, padding 1, then ReLU; 2x2 max-pool after conv0, conv1 and conv2; mean over the 8x8 map
    head.{colour,pose,background,prop}: linear layers on that 128-vector (logits)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import scene as S

HEADS = {
    "colour": [c[0] for c in S.COLOURS],
    "pose": list(S.POSE_NAMES),
    "background": [b[0] for b in S.BACKGROUNDS],
    "prop": [p[0] for p in S.PROPS],
}
CHANNELS = [3, 32, 64, 64, 128]


class Judge(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.ModuleList(nn.Conv2d(CHANNELS[i], CHANNELS[i + 1], 3, padding=1) for i in range(4))
        self.head = nn.ModuleDict({k: nn.Linear(CHANNELS[-1], len(v)) for k, v in HEADS.items()})

    def forward(self, x):
        for i, c in enumerate(self.conv):
            x = F.relu(c(x))
            if i < 3:
                x = F.max_pool2d(x, 2)
        x = x.mean(dim=(2, 3))
        return {k: h(x) for k, h in self.head.items()}

    def loss(self, x, y):
        out = self(x)
        return sum(F.cross_entropy(out[k], y[:, i]) for i, k in enumerate(HEADS))

    @torch.no_grad()
    def predict(self, x):
        return torch.stack([self(x)[k].argmax(-1) for k in HEADS], dim=1)


def augment(torch, x, g):
    """Robustness to what a small generator draws: blur, noise, colour jitter."""
    b = x.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    w = (torch.rand(b, 1, 1, 1, generator=g) < 0.5).float()
    x = w * blurred + (1 - w) * x
    x = x * (1 + 0.08 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)) + 0.04 * (torch.rand(b, 3, 1, 1, generator=g)
                                                                              - 0.5)
    x = x + 0.03 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


@torch.no_grad()
def accuracy(net, x, y) -> dict:
    pred = torch.cat([net.predict(x[i:i + 256]) for i in range(0, len(x), 256)])
    ok = pred == y
    out = {k: float(ok[:, i].float().mean()) for i, k in enumerate(HEADS)}
    out["all"] = float(ok.all(dim=1).float().mean())
    return out


def save(net, out: Path, acc: dict, acc_round_trip: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {}
    for i, c in enumerate(net.conv):
        sd[f"conv{i}.weight"] = c.weight.detach().contiguous()
        sd[f"conv{i}.bias"] = c.bias.detach().contiguous()
    for k, h in net.head.items():
        sd[f"head.{k}.weight"] = h.weight.detach().contiguous()
        sd[f"head.{k}.bias"] = h.bias.detach().contiguous()
    save_file(sd, str(out / "judge.safetensors"))
    (out / "judge.json").write_text(json.dumps({
        "size": S.SIZE, "input": "RGB / 255, NCHW", "channels": CHANNELS, "pool_after": [0, 1, 2],
        "heads": HEADS, "accuracy_on_renders_of_held_out_combinations": acc,
        "accuracy_on_vae_round_trips_of_those_renders": acc_round_trip}, indent=2, ensure_ascii=False))


def load(path: Path) -> Judge:
    from safetensors.torch import load_file

    sd = load_file(str(path / "judge.safetensors"))
    net = Judge()
    mapped = {}
    for k, v in sd.items():
        if k.startswith("conv"):
            i, rest = k[4:].split(".", 1)
            mapped[f"conv.{i}.{rest}"] = v
        else:
            mapped[k] = v
    net.load_state_dict(mapped)
    return net.eval()


def score(net, images_u8) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 4) predicted indices (colour, pose, background, prop)."""
    import numpy as np

    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float() / 255.0
    return torch.cat([net.predict(x[i:i + 256]) for i in range(0, len(x), 256)])
