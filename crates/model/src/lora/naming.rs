//! LoRA tensor names → (transformer module, role), as diffusers' Qwen-Image loader reads them
//! (`QwenImageLoraLoaderMixin.lora_state_dict` and `_convert_non_diffusers_qwen_lora_to_diffusers` in
//! `diffusers/loaders/lora_conversion_utils.py`, 0.42.1):
//!
//! - diffusers / PEFT: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` / `.lora_B.weight` (the
//!   `transformer.` prefix optional, PEFT's `.lora_A.default.weight` accepted);
//! - kohya / ComfyUI / musubi: `lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight` / `.lora_up.weight`
//!   / `.alpha`, or the same in dot notation, with or without a `diffusion_model.` prefix.

/// What one tensor of a LoRA file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// `lora_A` / `lora_down`: `[rank, in]`.
    Down,
    /// `lora_B` / `lora_up`: `[out, rank]`.
    Up,
    /// `alpha`: a scalar.
    Alpha,
}

/// The two key families diffusers tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `lora_A` / `lora_B`.
    Peft,
    /// `lora_down` / `lora_up` (+ `alpha`).
    Kohya,
}

/// A parsed key: the module path in diffusers' names (`transformer_blocks.0.attn.to_q`), its role and family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub module: String,
    pub role: Role,
    pub family: Option<Family>,
}

// `_convert_non_diffusers_qwen_lora_to_diffusers.convert_key`: n-grams of a kohya name that keep their
// underscores (the longest match wins).
const PROTECTED: &[&[&str]] = &[
    &["add", "q", "proj"],
    &["add", "k", "proj"],
    &["add", "v", "proj"],
    &["to", "add", "out"],
    &["to", "q"],
    &["to", "k"],
    &["to", "v"],
    &["to", "out"],
    &["add", "q"],
    &["add", "k"],
    &["add", "v"],
    &["txt", "mlp"],
    &["img", "mlp"],
    &["txt", "mod"],
    &["img", "mod"],
];

// `convert_key`'s `top_level_modules`: the linears outside the blocks.
const TOP_LEVEL: &[(&str, &str)] = &[
    ("img_in", "img_in"),
    ("txt_in", "txt_in"),
    ("proj_out", "proj_out"),
    ("norm_out_linear", "norm_out.linear"),
    (
        "time_text_embed_timestep_embedder_linear_1",
        "time_text_embed.timestep_embedder.linear_1",
    ),
    (
        "time_text_embed_timestep_embedder_linear_2",
        "time_text_embed.timestep_embedder.linear_2",
    ),
];

/// `transformer_blocks_0_attn_to_q` → `transformer_blocks.0.attn.to_q`, `norm_out_linear` → `norm_out.linear`
/// (diffusers' `convert_key`, applied to the part before the first dot). `None` for other names, which diffusers
/// cannot convert either.
fn kohya_module(base: &str) -> Option<String> {
    if let Some((_, dotted)) = TOP_LEVEL.iter().find(|(flat, _)| *flat == base) {
        return Some((*dotted).to_string());
    }
    let rest = base.strip_prefix("transformer_blocks_")?;
    let parts: Vec<&str> = rest.split('_').collect();
    let mut merged: Vec<String> = Vec::new();
    let mut i = 0;
    'outer: while i < parts.len() {
        for len in [3, 2] {
            if i + len <= parts.len() && PROTECTED.iter().any(|p| *p == &parts[i..i + len]) {
                merged.push(parts[i..i + len].join("_"));
                i += len;
                continue 'outer;
            }
        }
        merged.push(parts[i].to_string());
        i += 1;
    }
    Some(format!("transformer_blocks.{}", merged.join(".")))
}

/// Parses one tensor name; `None` when it is not a LoRA tensor of the transformer.
pub fn parse(key: &str) -> Option<Parsed> {
    let k = key.strip_prefix("diffusion_model.").unwrap_or(key);
    let k = k.strip_prefix("transformer.").unwrap_or(k);
    // PEFT's adapter-named keys: `.lora_A.default.weight`
    let k = k.replace("default.", "");
    let (stem, role, family) = [
        (".lora_A.weight", Role::Down, Some(Family::Peft)),
        (".lora_B.weight", Role::Up, Some(Family::Peft)),
        (".lora_down.weight", Role::Down, Some(Family::Kohya)),
        (".lora_up.weight", Role::Up, Some(Family::Kohya)),
        (".alpha", Role::Alpha, None),
    ]
    .into_iter()
    .find_map(|(suffix, role, family)| {
        k.strip_suffix(suffix)
            .map(|s| (s.to_string(), role, family))
    })?;
    let module = match stem.strip_prefix("lora_unet_") {
        Some(kohya) => {
            // kohya keys put the whole module path before the first dot
            if kohya.contains('.') {
                return None;
            }
            kohya_module(kohya)?
        }
        None => stem,
    };
    if module.is_empty() {
        return None;
    }
    Some(Parsed {
        module,
        role,
        family,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(k: &str) -> (String, Role) {
        let p = parse(k).unwrap_or_else(|| panic!("{k} not parsed"));
        (p.module, p.role)
    }

    #[test]
    fn diffusers_peft_names() {
        assert_eq!(
            m("transformer.transformer_blocks.3.attn.to_q.lora_A.weight"),
            ("transformer_blocks.3.attn.to_q".into(), Role::Down)
        );
        assert_eq!(
            m("transformer_blocks.3.attn.to_out.0.lora_B.weight"),
            ("transformer_blocks.3.attn.to_out.0".into(), Role::Up)
        );
        assert_eq!(
            m("transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.default.weight"),
            ("transformer_blocks.0.img_mlp.net.0.proj".into(), Role::Down)
        );
        assert_eq!(m("proj_out.lora_B.weight"), ("proj_out".into(), Role::Up));
    }

    #[test]
    fn kohya_names() {
        for (k, want) in [
            (
                "lora_unet_transformer_blocks_0_attn_to_q",
                "transformer_blocks.0.attn.to_q",
            ),
            (
                "lora_unet_transformer_blocks_12_attn_add_k_proj",
                "transformer_blocks.12.attn.add_k_proj",
            ),
            (
                "lora_unet_transformer_blocks_1_attn_to_add_out",
                "transformer_blocks.1.attn.to_add_out",
            ),
            (
                "lora_unet_transformer_blocks_1_attn_to_out_0",
                "transformer_blocks.1.attn.to_out.0",
            ),
            (
                "lora_unet_transformer_blocks_2_img_mlp_net_0_proj",
                "transformer_blocks.2.img_mlp.net.0.proj",
            ),
            (
                "lora_unet_transformer_blocks_2_txt_mlp_net_2",
                "transformer_blocks.2.txt_mlp.net.2",
            ),
            (
                "lora_unet_transformer_blocks_5_img_mod_1",
                "transformer_blocks.5.img_mod.1",
            ),
            ("lora_unet_norm_out_linear", "norm_out.linear"),
            ("lora_unet_img_in", "img_in"),
            (
                "lora_unet_time_text_embed_timestep_embedder_linear_2",
                "time_text_embed.timestep_embedder.linear_2",
            ),
        ] {
            assert_eq!(
                m(&format!("{k}.lora_down.weight")),
                (want.into(), Role::Down)
            );
            assert_eq!(m(&format!("{k}.lora_up.weight")), (want.into(), Role::Up));
            assert_eq!(m(&format!("{k}.alpha")), (want.into(), Role::Alpha));
        }
        assert_eq!(
            m("diffusion_model.transformer_blocks.7.attn.add_v_proj.lora_down.weight"),
            ("transformer_blocks.7.attn.add_v_proj".into(), Role::Down)
        );
        assert_eq!(
            m("diffusion_model.transformer_blocks.7.attn.add_v_proj.alpha"),
            ("transformer_blocks.7.attn.add_v_proj".into(), Role::Alpha)
        );
    }

    #[test]
    fn non_lora_names() {
        assert!(parse("transformer_blocks.0.attn.to_q.weight").is_none());
        assert!(parse("lora_unet_img_out.lora_down.weight").is_none());
        assert!(parse(".lora_A.weight").is_none());
    }
}
