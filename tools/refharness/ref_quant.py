#!/usr/bin/env python3
"""Quantized and single-file weight fixtures, with diffusers' / transformers' own outputs on them.

    python ref_quant.py SNAPSHOT OUT_DIR        (SNAPSHOT: the `tiny` fixture snapshot)

Writes into OUT_DIR (tests/fixtures/quant):

  transformer/Q8_0.gguf, transformer/Q4_0.gguf
        the tiny transformer as GGUF, written like city96's ComfyUI-GGUF `tools/convert.py` + quantization: arch
        `qwen_image`, diffusers tensor names, 1-D tensors in F32, 2-D tensors in the quant type (F16 when the row
        length does not fit the type's block). city96 also keeps tensors of <= 1024 values in F32; that rule is
        left out here because the tiny model's attention projections (32x32) would all fall under it.
  transformer/fp8_e4m3fn.safetensors
        Comfy-Org style `diffusion_models/qwen_image_fp8_e4m3fn.safetensors`: 2-D weights cast to float8_e4m3fn,
        everything else bfloat16, diffusers names.
  transformer/fp8_scaled_comfy.safetensors
        ComfyUI "scaled fp8" with the checkpoint prefix: `model.diffusion_model.<name>`, a `scaled_fp8` marker,
        per-layer `scale_weight` = amax/448 and weights `(w / scale).to(float8_e4m3fn)` (comfy/utils.py
        `convert_old_quants`, comfy/quant_ops.py `TensorCoreFP8Layout`).
  transformer256/config.json, transformer256/Q4_K.gguf
        a 1-layer transformer 256 wide (heads 2 x 128, axes 16/56/56, joint dim 256): rows of 256 values, so the
        k-quant Q4_K applies (Q4_K needs rows that are multiples of 256, the tiny transformer has 32).
  text_encoder/Q8_0.gguf, text_encoder/Q4_0.gguf
        the tiny text encoder as a llama.cpp GGUF (`convert_hf_to_gguf.py` layout: arch `qwen2vl`, `token_embd`,
        `blk.N.attn_q`, ..., `output_norm`, `output`, metadata `qwen2vl.*`).
  text_encoder/fp8_scaled_comfy.safetensors
        ComfyUI `text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors` layout: `model.layers.N...`,
        `model.embed_tokens`, `model.norm`, `visual.*`, linear weights scaled fp8, the rest bfloat16.
  vae_wan_keys.json
        for the released VAE layout (num_res_blocks 2, 4 levels): every original Wan 2.1 key and the diffusers key
        `convert_wan_vae_to_diffusers` gives it (checked to cover every AutoencoderKLQwenImage tensor once).
  refs.safetensors, manifest.json
        references (float32, CPU):
        * `<model>.inputs.*` transformer inputs; `<model>.<format>.out`: QwenImageTransformer2DModel output,
          the model loaded by diffusers' own loaders: `from_single_file(gguf, quantization_config=
          GGUFQuantizationConfig(compute_dtype=float32))`, `from_single_file(fp8 file, torch_dtype=float32)`;
          the scaled file is dequantized as ComfyUI does (`w.to(float32) * scale_weight`) and loaded with
          `from_single_file` (diffusers does not read ComfyUI scales); `f32` is the unquantized model.
        * `<model>.denoise.*`: QwenImagePipeline inputs (prompt/negative embeddings and masks, packed start
          latents, 3 steps, true CFG 4, 64x64) and `<model>.<format>.final`: its final packed latents.
        * `te.<format>.prompt_embeds(_mask)`: `QwenImagePipeline.encode_prompt` with the text encoder whose
          weights are the GGUF's (dequantized by gguf-py) / the scaled file's (ComfyUI dequantization); `te.f32.*`
          with the original weights.

Everything is deterministic (fixed seeds; gguf-py's quantizers are the ggml reference ones).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import dump_json, setup_torch, versions  # noqa: E402

torch = None  # set in main()

# float8_e4m3fn's largest finite value (torch.finfo(torch.float8_e4m3fn).max)
FP8_MAX = 448.0
COMFY_PREFIX = "model.diffusion_model."
DEFAULT_PROMPTS = [
    "dance monkey",
    "A cat holding a sign that says hello world",
    "一只可爱的熊猫坐在竹林里，水墨画风格。",
    " ",
]


def quantize_q4_k(arr):
    """ggml Q4_K blocks (ggml-common.h `block_q4_K`: f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales/mins,
    128 bytes of 4-bit values; x = d·sc_j·q - dmin·m_j over 8 sub-blocks of 32) by a plain min/max fit.

    gguf-py 0.19 dequantizes Q4_K but has no quantizer (`Q4_K.quantize_blocks` raises NotImplementedError), and
    llama.cpp's error-minimising search is not needed: any valid block is a valid file, and the parity test is
    about reading and dequantizing it. Checked below against gguf-py's own Q4_K dequantizer.
    """
    import numpy as np

    rows, cols = arr.shape
    x = arr.reshape(-1, 8, 32).astype(np.float32)  # [blocks, sub-block, value]
    lo = np.minimum(x.min(axis=2), 0.0)
    hi = np.maximum(x.max(axis=2), lo + 1e-12)
    scale, mins = (hi - lo) / 15.0, -lo
    d = (scale.max(axis=1) / 63.0).astype(np.float16)
    dmin = (mins.max(axis=1) / 63.0).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(mins, dminf, out=np.zeros_like(mins), where=dminf > 0)), 0, 63).astype(np.uint8)
    step = (df * sc)[:, :, None]
    q = np.divide(x + (dminf * mn)[:, :, None], step, out=np.zeros_like(x), where=step > 0)
    q = np.clip(np.round(q), 0, 15).astype(np.uint8)
    n = x.shape[0]
    scales = np.zeros((n, 12), dtype=np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    q = q.reshape(n, 4, 2, 32)  # chunk of 64 values: sub-blocks 2c (low nibbles) and 2c+1 (high nibbles)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales, qs], axis=1)
    return blocks.reshape(rows, cols // 256 * 144)


def gguf_tensor(writer, gguf, name: str, arr, qtype) -> str:
    """city96 convert.py / llama.cpp rules: 1-D tensors in F32, else qtype, F16 when qtype does not fit."""
    import numpy as np

    arr = np.ascontiguousarray(arr.astype(np.float32))
    if arr.ndim == 1:
        qtype = gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q4_K and arr.ndim == 2 and arr.shape[1] % 256 == 0:
        data = quantize_q4_k(arr)
        back = gguf.quants.dequantize(data, qtype).reshape(arr.shape)
        err = np.abs(back - arr).max() / max(np.abs(arr).max(), 1e-12)
        assert err < 0.1, f"{name}: Q4_K round trip max error {err:.3f} of the range"
        writer.add_tensor(name, data, raw_dtype=qtype)
        return qtype.name
    try:
        data = gguf.quants.quantize(arr, qtype)
    except (AttributeError, gguf.QuantError, NotImplementedError):
        qtype = gguf.GGMLQuantizationType.F16
        data = gguf.quants.quantize(arr, qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)
    return qtype.name


def write_gguf(path: Path, arch: str, tensors: dict, qtype, meta=None) -> dict:
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for k, v in (meta or {}).items():
        v(w)
    types = {}
    for name in sorted(tensors):
        types[name] = gguf_tensor(w, gguf, name, tensors[name].detach().cpu().numpy(), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def dequantized_gguf(path: Path) -> dict:
    """Every tensor of a GGUF as float32 torch tensors (gguf-py's dequantizers), PyTorch shapes."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        out[t.name] = torch.from_numpy(a.copy())
    return out


def fp8_scaled(w):
    """ComfyUI scaled fp8 of one weight: (fp8 values, float32 scalar scale)."""
    scale = (w.abs().amax().to(torch.float32) / FP8_MAX).clamp(min=1e-12)
    q = (w.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.reshape(())


def comfy_dequant(q, scale):
    # comfy/quant_ops.py TensorCoreFP8Layout.dequantize: qdata.to(orig_dtype).mul_(scale)
    return q.to(torch.float32) * scale


# ------------------------------------------------------------------------------------------------------------
# transformer
# ------------------------------------------------------------------------------------------------------------
def transformer_inputs(cfg: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    joint = cfg["joint_attention_dim"]
    s, length = 16, 7  # 64x64 image: 8x8 latent, 4x4 packed tokens; 7 text tokens, the last 2 padding
    mask = torch.ones(2, length)
    mask[1, 5:] = 0
    return {
        "hidden_states": torch.randn(2, s, cfg["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(2, length, joint, generator=g),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([0.7, 0.25]),
    }


def denoise_inputs(cfg: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    joint = cfg["joint_attention_dim"]
    neg_mask = torch.ones(1, 6)
    neg_mask[0, 4:] = 0
    return {
        "prompt_embeds": torch.randn(1, 9, joint, generator=g),
        "prompt_embeds_mask": torch.ones(1, 9),
        "negative_prompt_embeds": torch.randn(1, 6, joint, generator=g),
        "negative_prompt_embeds_mask": neg_mask,
        "latents": torch.randn(1, 16, cfg["in_channels"], generator=g),
    }


def run_transformer(model, inp: dict):
    with torch.no_grad():
        return model(
            hidden_states=inp["hidden_states"],
            encoder_hidden_states=inp["encoder_hidden_states"],
            encoder_hidden_states_mask=inp["encoder_hidden_states_mask"],
            timestep=inp["timestep"],
            img_shapes=[[(1, 4, 4)]] * 2,
            return_dict=False,
        )[0]


def run_denoise(snapshot: Path, transformer, inp: dict):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(snapshot), transformer=transformer, torch_dtype=torch.float32)
    with torch.no_grad():
        out = pipe(
            prompt_embeds=inp["prompt_embeds"],
            prompt_embeds_mask=inp["prompt_embeds_mask"],
            negative_prompt_embeds=inp["negative_prompt_embeds"],
            negative_prompt_embeds_mask=inp["negative_prompt_embeds_mask"],
            true_cfg_scale=4.0,
            height=64,
            width=64,
            num_inference_steps=3,
            latents=inp["latents"],
            output_type="latent",
            return_dict=False,
        )[0]
    return out


def load_single_file(path: Path, config_dir: Path, gguf_file: bool):
    from diffusers import GGUFQuantizationConfig, QwenImageTransformer2DModel

    kw = {"config": str(config_dir), "subfolder": "transformer", "torch_dtype": torch.float32}
    if gguf_file:
        kw["quantization_config"] = GGUFQuantizationConfig(compute_dtype=torch.float32)
    m = QwenImageTransformer2DModel.from_single_file(str(path), **kw).eval()
    return m


def transformer_fixtures(snapshot: Path, out: Path, refs: dict, manifest: dict) -> None:
    import gguf
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    tdir = out / "transformer"
    tdir.mkdir(parents=True, exist_ok=True)
    base = QwenImageTransformer2DModel.from_pretrained(str(snapshot), subfolder="transformer").eval()
    cfg = {k: v for k, v in dict(base.config).items() if not k.startswith("_")}
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    inp = transformer_inputs(cfg, 0)
    dinp = denoise_inputs(cfg, 0)
    for k, v in inp.items():
        refs[f"tiny.inputs.{k}"] = v
    for k, v in dinp.items():
        refs[f"tiny.denoise.{k}"] = v
    files = {}

    for name, qtype in [("Q8_0", gguf.GGMLQuantizationType.Q8_0), ("Q4_0", gguf.GGMLQuantizationType.Q4_0)]:
        p = tdir / f"{name}.gguf"
        types = write_gguf(p, "qwen_image", sd, qtype)
        files[name] = {"file": f"transformer/{p.name}", "types": sorted(set(types.values()))}

    # Comfy-Org fp8_e4m3fn: plain cast of the 2-D weights, the rest bf16
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.to(torch.bfloat16)) for k, v in sd.items()}
    save_file(fp8, str(tdir / "fp8_e4m3fn.safetensors"))
    files["fp8"] = {"file": "transformer/fp8_e4m3fn.safetensors"}

    # ComfyUI scaled fp8 with the checkpoint prefix
    scaled, dequant = {}, {}
    for k, v in sd.items():
        if v.ndim == 2:
            q, s = fp8_scaled(v)
            layer = k[: -len(".weight")]
            scaled[COMFY_PREFIX + k] = q
            scaled[COMFY_PREFIX + layer + ".scale_weight"] = s
            dequant[k] = comfy_dequant(q, s)
        else:
            scaled[COMFY_PREFIX + k] = v.to(torch.bfloat16)
            dequant[k] = v.to(torch.bfloat16).to(torch.float32)
    scaled[COMFY_PREFIX + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(scaled, str(tdir / "fp8_scaled_comfy.safetensors"))
    files["fp8_scaled"] = {"file": "transformer/fp8_scaled_comfy.safetensors"}
    tmp = out / ".tmp_scaled_dequant.safetensors"
    save_file(dequant, str(tmp))

    models = {"f32": base}
    models["Q8_0"] = load_single_file(tdir / "Q8_0.gguf", snapshot, True)
    models["Q4_0"] = load_single_file(tdir / "Q4_0.gguf", snapshot, True)
    models["fp8"] = load_single_file(tdir / "fp8_e4m3fn.safetensors", snapshot, False)
    models["fp8_scaled"] = load_single_file(tmp, snapshot, False)
    tmp.unlink()
    for name, m in models.items():
        refs[f"tiny.{name}.out"] = run_transformer(m, inp)
        refs[f"tiny.{name}.final"] = run_denoise(snapshot, m, dinp)
    manifest["tiny"] = {"config": cfg, "files": files}


def transformer256_fixtures(snapshot: Path, out: Path, refs: dict, manifest: dict) -> None:
    import gguf
    from diffusers import QwenImageTransformer2DModel

    sys.path.insert(0, str(HERE))
    from make_tiny import perturb_

    tdir = out / "transformer256"
    (tdir / "transformer").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(256)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
        num_attention_heads=2, joint_attention_dim=256, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
    ).eval()
    perturb_(torch, model, torch.Generator().manual_seed(257))
    # config only (the weights live in the GGUF); from_single_file reads transformer/config.json
    model.save_config(str(tdir / "transformer"))
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    p = tdir / "Q4_K.gguf"
    types = write_gguf(p, "qwen_image", sd, gguf.GGMLQuantizationType.Q4_K)
    inp = transformer_inputs(cfg, 1)
    dinp = denoise_inputs(cfg, 1)
    for k, v in inp.items():
        refs[f"t256.inputs.{k}"] = v
    for k, v in dinp.items():
        refs[f"t256.denoise.{k}"] = v
    q = load_single_file(p, tdir, True)
    for name, m in {"f32": model, "Q4_K": q}.items():
        refs[f"t256.{name}.out"] = run_transformer(m, inp)
        refs[f"t256.{name}.final"] = run_denoise(snapshot, m, dinp)
    counts = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    manifest["t256"] = {"config": cfg, "files": {"Q4_K": {"file": "transformer256/Q4_K.gguf", "types": counts}}}


# ------------------------------------------------------------------------------------------------------------
# text encoder
# ------------------------------------------------------------------------------------------------------------
LLAMA_CPP = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def hf_to_llama_cpp(name: str):
    """transformers legacy names -> llama.cpp (gguf-py tensor_mapping.py for Qwen2/Qwen2-VL)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    if not name.startswith("model.layers."):
        return None
    rest = name[len("model.layers."):]
    layer, tail = rest.split(".", 1)
    module, param = tail.rsplit(".", 1)
    return f"blk.{layer}.{LLAMA_CPP[module]}.{param}"


def te_legacy_state_dict(te) -> dict:
    """The text model (+ lm_head) under the released checkpoint names."""
    out = {}
    for k, v in te.state_dict().items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model."):]] = v.detach().clone()
        elif k.startswith("lm_head."):
            out[k] = v.detach().clone()
    return out


def load_te_weights(te, legacy: dict) -> None:
    internal = {}
    for k, v in legacy.items():
        internal[k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k] = v
    missing, unexpected = te.load_state_dict(internal, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith("model.visual") or k.startswith("visual") for k in missing), missing


def encode(snapshot: Path, te, prompts):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(snapshot), text_encoder=te, torch_dtype=torch.float32)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt=prompts, device=torch.device("cpu"), max_sequence_length=512)
    if mask is None:
        mask = torch.ones(embeds.shape[:2])
    return embeds, mask


def text_encoder_fixtures(snapshot: Path, out: Path, refs: dict, manifest: dict) -> None:
    import gguf
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    ddir = out / "text_encoder"
    ddir.mkdir(parents=True, exist_ok=True)
    te = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(snapshot / "text_encoder"),
                                                            torch_dtype=torch.float32).eval()
    tc = te.config.text_config
    legacy = te_legacy_state_dict(te)
    files = {}
    embeds, mask = encode(snapshot, te, DEFAULT_PROMPTS)
    refs["te.f32.prompt_embeds"], refs["te.f32.prompt_embeds_mask"] = embeds, mask

    sections = list(tc.rope_scaling["mrope_section"]) + [0]
    meta = {
        "ctx": lambda w: w.add_context_length(tc.max_position_embeddings),
        "emb": lambda w: w.add_embedding_length(tc.hidden_size),
        "blk": lambda w: w.add_block_count(tc.num_hidden_layers),
        "ffn": lambda w: w.add_feed_forward_length(tc.intermediate_size),
        "h": lambda w: w.add_head_count(tc.num_attention_heads),
        "kv": lambda w: w.add_head_count_kv(tc.num_key_value_heads),
        "theta": lambda w: w.add_rope_freq_base(float(tc.rope_theta if hasattr(tc, "rope_theta") else 1e6)),
        "eps": lambda w: w.add_layer_norm_rms_eps(tc.rms_norm_eps),
        "mrope": lambda w: w.add_rope_dimension_sections(sections),
    }
    lc = {hf_to_llama_cpp(k): v for k, v in legacy.items() if hf_to_llama_cpp(k)}
    for name, qtype in [("Q8_0", gguf.GGMLQuantizationType.Q8_0), ("Q4_0", gguf.GGMLQuantizationType.Q4_0)]:
        p = ddir / f"{name}.gguf"
        types = write_gguf(p, "qwen2vl", lc, qtype, meta)
        files[name] = {"file": f"text_encoder/{p.name}", "types": sorted(set(types.values()))}
        deq = dequantized_gguf(p)
        back = {}
        for k in legacy:
            back[k] = deq[hf_to_llama_cpp(k)]
        te_q = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(snapshot / "text_encoder"),
                                                                  torch_dtype=torch.float32).eval()
        load_te_weights(te_q, back)
        e, m = encode(snapshot, te_q, DEFAULT_PROMPTS)
        refs[f"te.{name}.prompt_embeds"], refs[f"te.{name}.prompt_embeds_mask"] = e, m

    # ComfyUI scaled fp8 text encoder file
    scaled, back = {}, {}
    for k, v in legacy.items():
        if k == "lm_head.weight":
            continue
        if v.ndim == 2 and "embed_tokens" not in k:
            q, s = fp8_scaled(v)
            layer = k[: -len(".weight")]
            scaled[k], scaled[layer + ".scale_weight"] = q, s
            back[k] = comfy_dequant(q, s)
        else:
            scaled[k] = v.to(torch.bfloat16)
            back[k] = scaled[k].to(torch.float32)
    for k, v in te.state_dict().items():
        if k.startswith("model.visual."):
            scaled["visual." + k[len("model.visual."):]] = v.to(torch.bfloat16)
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(scaled, str(ddir / "fp8_scaled_comfy.safetensors"))
    files["fp8_scaled"] = {"file": "text_encoder/fp8_scaled_comfy.safetensors"}
    back["lm_head.weight"] = legacy["lm_head.weight"]
    te_s = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(snapshot / "text_encoder"),
                                                              torch_dtype=torch.float32).eval()
    load_te_weights(te_s, back)
    e, m = encode(snapshot, te_s, DEFAULT_PROMPTS)
    refs["te.fp8_scaled.prompt_embeds"], refs["te.fp8_scaled.prompt_embeds_mask"] = e, m
    manifest["text_encoder"] = {"prompts": DEFAULT_PROMPTS, "files": files}


# ------------------------------------------------------------------------------------------------------------
# VAE key names
# ------------------------------------------------------------------------------------------------------------
def diffusers_to_wan(key: str, nrb: int) -> str:
    """Inverse of convert_wan_vae_to_diffusers for a VAE with nrb residual blocks per level."""
    res = [(".norm1.gamma", ".residual.0.gamma"), (".conv1.", ".residual.2."), (".norm2.gamma", ".residual.3.gamma"),
           (".conv2.", ".residual.6."), (".conv_shortcut.", ".shortcut.")]

    def resid(k):
        for a, b in res:
            if a in k:
                return k.replace(a, b)
        return k

    top = {"quant_conv.weight": "conv1.weight", "quant_conv.bias": "conv1.bias",
           "post_quant_conv.weight": "conv2.weight", "post_quant_conv.bias": "conv2.bias"}
    if key in top:
        return top[key]
    side, rest = key.split(".", 1)
    if rest.startswith("conv_in."):
        return f"{side}.conv1.{rest[len('conv_in.'):]}"
    if rest.startswith("norm_out.gamma"):
        return f"{side}.head.0.gamma"
    if rest.startswith("conv_out."):
        return f"{side}.head.2.{rest[len('conv_out.'):]}"
    if rest.startswith("mid_block.resnets."):
        i, tail = rest[len("mid_block.resnets."):].split(".", 1)
        return resid(f"{side}.middle.{0 if i == '0' else 2}.{tail}")
    if rest.startswith("mid_block.attentions.0."):
        return f"{side}.middle.1.{rest[len('mid_block.attentions.0.'):]}"
    if rest.startswith("down_blocks."):
        return resid(f"{side}.downsamples.{rest[len('down_blocks.'):]}")
    if rest.startswith("up_blocks."):
        level, tail = rest[len("up_blocks."):].split(".", 1)
        level = int(level)
        if tail.startswith("resnets."):
            j, t = tail[len("resnets."):].split(".", 1)
            return resid(f"decoder.upsamples.{level * (nrb + 2) + int(j)}.{t}")
        if tail.startswith("upsamplers.0."):
            return f"decoder.upsamples.{level * (nrb + 2) + nrb + 1}.{tail[len('upsamplers.0.'):]}"
    raise ValueError(key)


def vae_key_fixture(out: Path, manifest: dict) -> None:
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        vae = AutoencoderKLQwenImage()  # the released config (num_res_blocks 2, dim_mult 1,2,4,4)
    keys = sorted(vae.state_dict().keys())
    wan = {diffusers_to_wan(k, vae.config.num_res_blocks): k for k in keys}
    assert len(wan) == len(keys), "two diffusers keys map to one Wan key"
    converted = convert_wan_vae_to_diffusers({w: torch.zeros(1) for w in wan})
    back = {}
    for w in wan:
        c = convert_wan_vae_to_diffusers({w: torch.zeros(1)})
        (d,) = c.keys()
        back[w] = d
    assert sorted(converted.keys()) == keys, "diffusers' converter does not give back every key"
    assert all(back[w] == wan[w] for w in wan)
    dump_json(out / "vae_wan_keys.json", {"num_res_blocks": vae.config.num_res_blocks, "keys": back})
    manifest["vae_wan_keys"] = len(back)


def main(argv=None) -> int:
    global torch
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    torch = setup_torch(2)
    torch.manual_seed(0)
    import gguf

    args.out.mkdir(parents=True, exist_ok=True)
    refs: dict = {}
    manifest: dict = {"versions": {**versions(), "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "?"}}
    transformer_fixtures(args.snapshot, args.out, refs, manifest)
    transformer256_fixtures(args.snapshot, args.out, refs, manifest)
    text_encoder_fixtures(args.snapshot, args.out, refs, manifest)
    vae_key_fixture(args.out, manifest)
    from safetensors.torch import save_file

    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in sorted(refs.items())},
              str(args.out / "refs.safetensors"))
    dump_json(args.out / "manifest.json", manifest)
    print(json.dumps({k: v for k, v in manifest.items() if k != "versions"}, indent=1, default=str)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
