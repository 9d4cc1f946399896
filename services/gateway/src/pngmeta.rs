//! PNG encoding with the generation parameters in text chunks.
//!
//! Keys: `prompt`, `negative_prompt` (when given), `seed`, `steps`, `true_cfg_scale`, `width`, `height`,
//! `model`, `request_id`, and `parameters` in the A1111 layout (prompt, `Negative prompt: ...` line,
//! one settings line) that image viewers and tools already parse. Values that are Latin-1 go in `tEXt`
//! chunks; others (e.g. Chinese prompts) in uncompressed UTF-8 `iTXt` chunks, as the PNG spec requires.

use crate::request::Settings;

/// Text chunks for one image.
pub fn text_chunks(p: &Settings, model: &str, request_id: &str) -> Vec<(String, String)> {
    let mut v = vec![("prompt".to_string(), p.prompt.clone())];
    if let Some(n) = &p.negative_prompt {
        v.push(("negative_prompt".into(), n.clone()));
    }
    v.extend([
        ("seed".into(), p.seed.to_string()),
        ("steps".into(), p.steps.to_string()),
        ("true_cfg_scale".into(), p.true_cfg_scale.to_string()),
        ("width".into(), p.width_px.to_string()),
        ("height".into(), p.height_px.to_string()),
        ("model".into(), model.to_string()),
        ("request_id".into(), request_id.to_string()),
        ("parameters".into(), a1111(p, model)),
    ]);
    if !p.loras.is_empty() {
        let list: Vec<String> = p
            .loras
            .iter()
            .map(|l| format!("{}:{}", l.name, l.scale.unwrap_or(1.0)))
            .collect();
        v.push(("loras".into(), list.join(",")));
    }
    v
}

/// `prompt\nNegative prompt: ...\nSteps: 20, Sampler: ..., CFG scale: 4, Seed: 1, Size: WxH, Model: m`.
pub fn a1111(p: &Settings, model: &str) -> String {
    let mut s = p.prompt.replace('\n', " ");
    if let Some(n) = &p.negative_prompt {
        s.push_str("\nNegative prompt: ");
        s.push_str(&n.replace('\n', " "));
    }
    s.push_str(&format!(
        "\nSteps: {}, Sampler: FlowMatchEuler, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        p.steps, p.true_cfg_scale, p.seed, p.width_px, p.height_px, model
    ));
    s
}

/// Adds the image flows' chunks (e.g. `mode`, `strength`) before `parameters`, and their settings
/// (e.g. `Denoising strength: 0.6`) to the end of its A1111 settings line.
pub fn add_extras(
    chunks: &mut Vec<(String, String)>,
    extra: &[(String, String)],
    a1111_settings: &[(String, String)],
) {
    let at = chunks
        .iter()
        .position(|(k, _)| k == "parameters")
        .unwrap_or(chunks.len());
    for (k, v) in a1111_settings {
        if let Some((_, params)) = chunks.get_mut(at) {
            params.push_str(&format!(", {k}: {v}"));
        }
    }
    for (i, kv) in extra.iter().enumerate() {
        chunks.insert(at + i, kv.clone());
    }
}

fn is_latin1(s: &str) -> bool {
    s.chars().all(|c| (c as u32) < 256)
}

/// RGB8 pixels (`width * height * 3` bytes) to a PNG carrying `chunks`.
pub fn encode_png(
    width: u32,
    height: u32,
    rgb8: &[u8],
    chunks: &[(String, String)],
) -> Result<Vec<u8>, String> {
    if rgb8.len() != width as usize * height as usize * 3 {
        return Err(format!("{} bytes of RGB8 for {width}x{height}", rgb8.len()));
    }
    let mut out = Vec::with_capacity(rgb8.len() / 2 + 1024);
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in chunks {
        let r = if is_latin1(v) {
            enc.add_text_chunk(k.clone(), v.clone())
        } else {
            enc.add_itxt_chunk(k.clone(), v.clone())
        };
        r.map_err(|e| format!("text chunk `{k}`: {e}"))?;
    }
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(rgb8).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Reads back the text chunks (tEXt and iTXt) of a PNG.
#[cfg(test)]
fn read_text_chunks(png_bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let reader = decoder.read_info().map_err(|e| e.to_string())?;
    let info = reader.info();
    let mut v: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for c in &info.utf8_text {
        v.push((c.keyword.clone(), c.get_text().map_err(|e| e.to_string())?));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text_chunks() {
        let p = Settings {
            prompt: "一只猫 holding a sign".into(),
            negative_prompt: Some(" ".into()),
            width_px: 16,
            height_px: 16,
            steps: 4,
            true_cfg_scale: 4.0,
            seed: 9,
            seed_was_random: false,
            num_images: 1,
            preview: None,
            loras: Vec::new(),
            scheduler: None,
            model: String::new(),
        };
        let chunks = text_chunks(&p, "tiny", "rid");
        let png = encode_png(16, 16, &[7u8; 16 * 16 * 3], &chunks).expect("encodes");
        let back = read_text_chunks(&png).expect("decodes");
        let get = |k: &str| back.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
        assert_eq!(get("prompt").as_deref(), Some("一只猫 holding a sign"));
        assert_eq!(get("seed").as_deref(), Some("9"));
        assert_eq!(get("true_cfg_scale").as_deref(), Some("4"));
        assert_eq!(get("model").as_deref(), Some("tiny"));
        let params = get("parameters").expect("parameters chunk");
        assert!(
            params.ends_with(
                "Steps: 4, Sampler: FlowMatchEuler, CFG scale: 4, Seed: 9, Size: 16x16, Model: tiny"
            ),
            "{params}"
        );
        assert!(params.contains("\nNegative prompt:  \n"), "{params}");
        assert!(encode_png(2, 2, &[0; 5], &[]).is_err());
    }
}

#[cfg(test)]
mod long_text_tests {
    /// Prompts of thousands of characters (cut by the text encoder at 512 tokens) still go into the PNG.
    #[test]
    fn long_text_values_encode() {
        let long = "a very long prompt about a red lantern, ".repeat(200);
        let chunks = vec![
            ("prompt".to_string(), long.clone()),
            ("parameters".to_string(), long),
        ];
        let r = super::encode_png(2, 2, &[0u8; 12], &chunks);
        assert!(r.is_ok(), "{r:?}");
    }
}
