//! Tensor-name conversions between the layouts community single files use and the diffusers/transformers names
//! the model code loads.

/// Prefix ComfyUI puts before diffusion-model tensors in its checkpoints; city96's GGUF loader strips it when
/// present (ComfyUI-GGUF `loader.py` `gguf_sd_loader(handle_prefix="model.diffusion_model.")`).
pub const COMFY_DIFFUSION_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the VAE inside ComfyUI / original-layout full checkpoints.
pub const COMFY_VAE_PREFIX: &str = "first_stage_model.";

/// The first of `prefixes` that some name starts with.
pub fn detect_prefix<'a>(names: &[&str], prefixes: &[&'a str]) -> Option<&'a str> {
    prefixes
        .iter()
        .copied()
        .find(|p| names.iter().any(|n| n.starts_with(p)))
}

/// With a prefix: names under it, stripped (others dropped, like ComfyUI-GGUF does for mixed state dicts).
/// Without: every name unchanged.
pub fn strip_prefix(prefix: Option<&str>, name: &str) -> Option<String> {
    match prefix {
        None => Some(name.to_string()),
        Some(p) => name.strip_prefix(p).map(str::to_string),
    }
}

/// The diffusers name (`AutoencoderKLQwenImage` / `AutoencoderKLWan`) of a tensor of the original Wan 2.1 VAE
/// layout (`encoder.downsamples.N.residual.K`, `decoder.upsamples.N`, `encoder.middle.K`, `head`, `conv1`...),
/// as diffusers 0.42.1 `loaders/single_file_utils.py` `convert_wan_vae_to_diffusers` renames them.
///
/// diffusers hard-codes the decoder's flat `upsamples` index for `num_res_blocks = 2` (indices 0-2, 4-6, 8-10,
/// 12-14 are residual blocks, 3/7/11 the upsamplers); this function derives the same grouping from
/// `num_res_blocks` (each decoder level has `num_res_blocks + 1` residual blocks followed by one upsampler),
/// so it agrees with diffusers key for key on the released VAE and also handles other depths.
pub fn wan_vae_to_diffusers(key: &str, num_res_blocks: usize) -> String {
    // fixed renames (middle blocks, heads, quant convs, first convs)
    if let Some(rest) = key
        .strip_prefix("encoder.")
        .map(|r| ("encoder", r))
        .or_else(|| key.strip_prefix("decoder.").map(|r| ("decoder", r)))
    {
        let (side, r) = rest;
        if let Some(m) = r.strip_prefix("middle.") {
            // middle.0 / middle.2: residual blocks, middle.1: attention
            let (idx, tail) = m.split_once('.').unwrap_or((m, ""));
            return match idx {
                "0" => format!("{side}.mid_block.resnets.0.{}", residual_tail(tail)),
                "2" => format!("{side}.mid_block.resnets.1.{}", residual_tail(tail)),
                "1" => format!("{side}.mid_block.attentions.0.{tail}"),
                _ => key.to_string(),
            };
        }
        if let Some(t) = r.strip_prefix("head.") {
            return match t {
                "0.gamma" => format!("{side}.norm_out.gamma"),
                "2.weight" => format!("{side}.conv_out.weight"),
                "2.bias" => format!("{side}.conv_out.bias"),
                _ => key.to_string(),
            };
        }
        if let Some(t) = r.strip_prefix("conv1.") {
            return format!("{side}.conv_in.{t}");
        }
        if side == "encoder" {
            if let Some(t) = r.strip_prefix("downsamples.") {
                // the encoder's flat list keeps its indices: downsamples.N -> down_blocks.N
                let (idx, tail) = t.split_once('.').unwrap_or((t, ""));
                return format!("encoder.down_blocks.{idx}.{}", residual_tail(tail));
            }
        } else if let Some(t) = r.strip_prefix("upsamples.") {
            let (idx, tail) = t.split_once('.').unwrap_or((t, ""));
            let Ok(flat) = idx.parse::<usize>() else {
                return key.to_string();
            };
            let per_level = num_res_blocks + 2; // resnets + 1 upsampler
            let (level, j) = (flat / per_level, flat % per_level);
            return if j <= num_res_blocks {
                format!(
                    "decoder.up_blocks.{level}.resnets.{j}.{}",
                    residual_tail(tail)
                )
            } else {
                format!("decoder.up_blocks.{level}.upsamplers.0.{tail}")
            };
        }
        return key.to_string();
    }
    match key {
        "conv1.weight" => "quant_conv.weight".to_string(),
        "conv1.bias" => "quant_conv.bias".to_string(),
        "conv2.weight" => "post_quant_conv.weight".to_string(),
        "conv2.bias" => "post_quant_conv.bias".to_string(),
        _ => key.to_string(),
    }
}

/// Inside a Wan residual block: `residual.0.gamma` -> `norm1.gamma`, `residual.2` -> `conv1`,
/// `residual.3.gamma` -> `norm2.gamma`, `residual.6` -> `conv2`, `shortcut` -> `conv_shortcut`; anything else
/// (attention, resample, time_conv) unchanged.
fn residual_tail(tail: &str) -> String {
    const MAP: [(&str, &str); 5] = [
        ("residual.0.", "norm1."),
        ("residual.2.", "conv1."),
        ("residual.3.", "norm2."),
        ("residual.6.", "conv2."),
        ("shortcut.", "conv_shortcut."),
    ];
    for (from, to) in MAP {
        if let Some(rest) = tail.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    tail.to_string()
}

/// True when the names look like the original Wan VAE layout (`decoder.upsamples.*` / `encoder.downsamples.*`).
pub fn is_wan_vae_layout(names: &[&str]) -> bool {
    names
        .iter()
        .any(|n| n.starts_with("decoder.upsamples.") || n.starts_with("encoder.downsamples."))
}

/// llama.cpp module names of a Qwen2 / Qwen2-VL decoder layer and their transformers names (gguf-py
/// `tensor_mapping.py`; the same table as ComfyUI-GGUF `loader.py` `LLAMA_SD_MAP`).
const LLAMA_CPP_LAYER: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];
/// Tensors outside the layers.
const LLAMA_CPP_TOP: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The transformers name (`Qwen2_5_VLForConditionalGeneration` legacy layout, `model.layers.N...`) of a tensor
/// of a llama.cpp GGUF of Qwen2.5-VL (`convert_hf_to_gguf.py`). Qwen2 uses rotate-half RoPE, so llama.cpp
/// stores q/k unpermuted. Unknown names are dropped.
pub fn llama_cpp_to_transformers(name: &str) -> Option<String> {
    if let Some((_, hf)) = LLAMA_CPP_TOP.iter().find(|(ll, _)| *ll == name) {
        return Some(hf.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, param) = tail.rsplit_once('.')?;
    let (_, hf) = LLAMA_CPP_LAYER.iter().find(|(ll, _)| *ll == module)?;
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// The inverse of [`llama_cpp_to_transformers`] (for writing llama.cpp-layout files).
pub fn transformers_to_llama_cpp(name: &str) -> Option<String> {
    if let Some((ll, _)) = LLAMA_CPP_TOP.iter().find(|(_, hf)| *hf == name) {
        return Some(ll.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, param) = tail.rsplit_once('.')?;
    let (ll, _) = LLAMA_CPP_LAYER.iter().find(|(_, hf)| *hf == module)?;
    Some(format!("blk.{layer}.{ll}.{param}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan_names_follow_diffusers() {
        let n = |k| wan_vae_to_diffusers(k, 2);
        assert_eq!(n("encoder.conv1.weight"), "encoder.conv_in.weight");
        assert_eq!(
            n("encoder.downsamples.3.resample.1.weight"),
            "encoder.down_blocks.3.resample.1.weight"
        );
        assert_eq!(
            n("encoder.downsamples.4.residual.6.bias"),
            "encoder.down_blocks.4.conv2.bias"
        );
        assert_eq!(
            n("decoder.upsamples.4.shortcut.weight"),
            "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
        );
        assert_eq!(
            n("decoder.upsamples.11.resample.1.bias"),
            "decoder.up_blocks.2.upsamplers.0.resample.1.bias"
        );
        assert_eq!(
            n("decoder.upsamples.7.time_conv.weight"),
            "decoder.up_blocks.1.upsamplers.0.time_conv.weight"
        );
        assert_eq!(
            n("decoder.upsamples.14.residual.3.gamma"),
            "decoder.up_blocks.3.resnets.2.norm2.gamma"
        );
        assert_eq!(
            n("decoder.middle.1.to_qkv.weight"),
            "decoder.mid_block.attentions.0.to_qkv.weight"
        );
        assert_eq!(
            n("decoder.middle.2.residual.0.gamma"),
            "decoder.mid_block.resnets.1.norm1.gamma"
        );
        assert_eq!(n("decoder.head.0.gamma"), "decoder.norm_out.gamma");
        assert_eq!(n("conv2.bias"), "post_quant_conv.bias");
        // one residual block per level: 2 resnets + 1 upsampler per level
        assert_eq!(
            wan_vae_to_diffusers("decoder.upsamples.3.residual.2.weight", 1),
            "decoder.up_blocks.1.resnets.0.conv1.weight"
        );
        assert_eq!(
            wan_vae_to_diffusers("decoder.upsamples.2.resample.1.weight", 1),
            "decoder.up_blocks.0.upsamplers.0.resample.1.weight"
        );
    }

    #[test]
    fn llama_cpp_names() {
        assert_eq!(
            llama_cpp_to_transformers("blk.3.attn_q.bias").as_deref(),
            Some("model.layers.3.self_attn.q_proj.bias")
        );
        assert_eq!(
            llama_cpp_to_transformers("blk.0.ffn_down.weight").as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(
            llama_cpp_to_transformers("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(llama_cpp_to_transformers("rope_freqs.weight"), None);
        for n in [
            "blk.3.attn_q.bias",
            "blk.0.ffn_down.weight",
            "token_embd.weight",
            "output_norm.weight",
        ] {
            let hf = llama_cpp_to_transformers(n).expect("maps");
            assert_eq!(transformers_to_llama_cpp(&hf).as_deref(), Some(n));
        }
        assert_eq!(llama_cpp_to_transformers("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn prefixes() {
        let names = ["model.diffusion_model.img_in.weight", "scaled_fp8"];
        let p = detect_prefix(&names, &[COMFY_DIFFUSION_PREFIX]);
        assert_eq!(p, Some(COMFY_DIFFUSION_PREFIX));
        assert_eq!(strip_prefix(p, names[0]).as_deref(), Some("img_in.weight"));
        assert_eq!(strip_prefix(p, names[1]), None);
        assert_eq!(strip_prefix(None, "a.b").as_deref(), Some("a.b"));
    }
}
