//! Text-encoder stage against diffusers/transformers reference dumps (tests/fixtures/*/refs/textenc and the
//! t2i dumps), plus the loader variants: no tokenizer.json, transformers-5 config, `model.language_model.*`
//! weight names, a missing tensor, over-long prompts.

mod common;
use common::{ints, rel_err};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::prompt::{PromptEncoder, TEMPLATE_DROP_IDX, apply_template};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::text_encoder::TextEncoderConfig;
use qwen_image_model::tokenizer::QwenTokenizer;

const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Dump {
    manifest: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

fn dump(dir: &Path) -> Dump {
    let manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let tensors = qwen_image_model::candle_core::safetensors::load(
        dir.join("tensors.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    Dump { manifest, tensors }
}

impl Dump {
    fn t(&self, name: &str) -> Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
            .to_dtype(DType::F32)
            .unwrap()
    }
    fn prompts(&self) -> Vec<String> {
        serde_json::from_value(self.manifest["scalars"]["prompts"].clone()).unwrap()
    }
}

fn assert_close(name: &str, a: &Tensor, b: &Tensor) {
    let r = rel_err(a, b);
    assert!(r <= TOL, "{name}: relative error {r:e} > {TOL:e}");
}

fn encoder(snapshot: &Path) -> PromptEncoder {
    PromptEncoder::load(&Snapshot::open(snapshot).unwrap(), DType::F32, &Device::Cpu).unwrap()
}

/// Every check of a `textenc` dump: ids, hidden states, batch and single embeddings, encode_prompt.
fn check_textenc_dump(fixture: &str) {
    let root = fixtures().join(fixture);
    let enc = encoder(&root.join("snapshot"));
    let d = dump(&root.join("refs/textenc"));
    let prompts = d.prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    // The set covers English, Chinese, mixed with emoji, blank (" ") and a long prompt (reference.py).
    assert!(prompts.len() >= 6);

    for p in &prompts {
        let raw: Vec<i64> =
            serde_json::from_value(d.manifest["scalars"]["raw_token_ids"][*p].clone()).unwrap();
        let ours: Vec<i64> = enc
            .tokenizer()
            .encode(p)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(ours, raw, "raw ids of {p:?}");
        let tpl: Vec<i64> =
            serde_json::from_value(d.manifest["scalars"]["template_token_ids"][*p].clone())
                .unwrap();
        let ours: Vec<i64> = enc
            .tokenizer()
            .encode(&apply_template(p))
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(ours, tpl, "template ids of {p:?}");
    }

    // te.0: the padded batch of _get_qwen_prompt_embeds
    let batch = enc.tokenize_template(&prompts).unwrap();
    assert_eq!(ints(&batch.input_ids), ints(&d.t("te.0.input_ids")));
    assert_eq!(
        ints(&batch.attention_mask),
        ints(&d.t("te.0.attention_mask"))
    );
    let hidden = enc
        .model()
        .forward(&batch.input_ids, Some(&batch.attention_mask))
        .unwrap();
    let reference = d.t("te.0.hidden_states_last");
    for (i, &n) in batch.lengths.iter().enumerate() {
        let a = hidden.get(i).unwrap().narrow(0, 0, n).unwrap();
        let b = reference.get(i).unwrap().narrow(0, 0, n).unwrap();
        assert_close(&format!("te.0.hidden_states_last[{i}]"), &a, &b);
    }

    let (embeds, mask, _) = enc.prompt_embeds(&prompts).unwrap();
    assert_close("batch.prompt_embeds", &embeds, &d.t("batch.prompt_embeds"));
    assert_eq!(ints(&mask), ints(&d.t("batch.prompt_embeds_mask")));

    let e = enc.encode(&prompts, 512).unwrap();
    assert_close(
        "batch.encode_prompt.embeds",
        &e.embeds,
        &d.t("batch.encode_prompt.embeds"),
    );
    assert_eq!(
        e.mask_all_ones,
        d.manifest["scalars"]["batch.encode_prompt.mask_is_none"]
            .as_bool()
            .unwrap()
    );
    assert_eq!(ints(&e.mask), ints(&d.t("batch.encode_prompt.mask")));
    assert!(e.truncated.iter().all(|t| !t));

    for (i, p) in prompts.iter().enumerate() {
        let (single, _, _) = enc.prompt_embeds(&[p]).unwrap();
        assert_close(
            &format!("single.{i}"),
            &single,
            &d.t(&format!("single.{i}.prompt_embeds")),
        );
        assert_eq!(
            e.token_counts[i],
            single.dim(1).unwrap(),
            "token count of prompt {i}"
        );
        let row = embeds
            .get(i)
            .unwrap()
            .narrow(0, 0, single.dim(1).unwrap())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        assert_close(&format!("batch row {i} == single"), &row, &single);
    }
    assert_eq!(enc.token_counts(&prompts).unwrap(), e.token_counts);
}

#[test]
fn textenc_dump_tiny_matches_diffusers() {
    check_textenc_dump("tiny");
}

/// transformers-5 config (`text_config` + `rope_parameters`), no tokenizer.json, bf16 weights in shards, GQA 2.
#[test]
fn textenc_dump_random_v5_matches_diffusers() {
    check_textenc_dump("random_v5");
}

#[test]
fn t2i_dumps_prompt_embeds_match_diffusers() {
    let root = fixtures().join("tiny");
    let enc = encoder(&root.join("snapshot"));
    for case in ["t2i_64", "t2i_batch_64x96", "t2i_nocfg_256"] {
        let d = dump(&root.join("refs").join(case));
        let prompts: Vec<String> = match &d.manifest["args"]["prompt"] {
            serde_json::Value::Null => {
                vec!["A cat holding a sign that says hello world".to_string()]
            } // reference.py run_t2i default
            v => serde_json::from_value(v.clone()).unwrap(),
        };
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let neg = d.manifest["args"]["negative_prompt"]
            .as_str()
            .map(|n| vec![n; prompts.len()]);
        for (name, k, ps) in [
            ("prompt", 0, Some(prompts.clone())),
            ("negative_prompt", 1, neg),
        ] {
            let Some(ps) = ps else { continue };
            if !d.tensors.contains_key(&format!("{name}_embeds")) {
                continue;
            }
            let batch = enc.tokenize_template(&ps).unwrap();
            assert_eq!(
                ints(&batch.input_ids),
                ints(&d.t(&format!("te.{k}.input_ids"))),
                "{case} te.{k} ids"
            );
            let e = enc.encode(&ps, 512).unwrap();
            assert_close(
                &format!("{case} {name}_embeds"),
                &e.embeds,
                &d.t(&format!("{name}_embeds")),
            );
            assert_eq!(
                ints(&e.mask),
                ints(&d.t(&format!("{name}_embeds_mask"))),
                "{case} {name} mask"
            );
            let none = d.manifest["scalars"][format!("{name}_embeds_mask_is_none")]
                .as_bool()
                .unwrap();
            assert_eq!(e.mask_all_ones, none, "{case} {name} mask_is_none");
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// loader variants, built in temp dirs from the tiny snapshot

fn copy_dir(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if skip.contains(&name.as_str()) {
            continue;
        }
        std::fs::copy(e.path(), to.join(&name)).unwrap();
    }
}

/// A temp snapshot with model_index.json, tokenizer/ and text_encoder/ of the tiny fixture.
fn temp_snapshot() -> tempfile::TempDir {
    let src = fixtures().join("tiny/snapshot");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("model_index.json"),
        tmp.path().join("model_index.json"),
    )
    .unwrap();
    copy_dir(&src.join("tokenizer"), &tmp.path().join("tokenizer"), &[]);
    copy_dir(
        &src.join("text_encoder"),
        &tmp.path().join("text_encoder"),
        &[],
    );
    tmp
}

fn textenc_prompts() -> Vec<String> {
    let mut p = dump(&fixtures().join("tiny/refs/textenc")).prompts();
    // edge cases beyond the dump: typed special tokens, newlines, digits, NFC, empty, braces
    p.extend(
        [
            "",
            "\n\nleading newlines",
            "It's 2025!  Don't   stop\n\nnow",
            "café Ａｂｃ e\u{301}",
            "<|im_start|>user typed <|im_end|> tokens <tool_call>",
            "{} braces {0}",
        ]
        .map(String::from),
    );
    p
}

#[test]
fn tokenizer_without_tokenizer_json_gives_same_ids() {
    let src = fixtures().join("tiny/snapshot/tokenizer");
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&src, tmp.path(), &["tokenizer.json"]);
    let with = QwenTokenizer::from_dir(&src).unwrap();
    let without = QwenTokenizer::from_dir(tmp.path()).unwrap();
    assert_eq!(with.pad_id(), without.pad_id());
    assert_eq!(without.token_to_id("<|endoftext|>"), Some(1024)); // tiny added_tokens.json
    for p in textenc_prompts() {
        for text in [p.clone(), apply_template(&p)] {
            assert_eq!(
                with.encode(&text).unwrap(),
                without.encode(&text).unwrap(),
                "ids of {text:?}"
            );
        }
    }
    // decoding round-trips
    let ids = without.encode("一只可爱的熊猫 😊").unwrap();
    assert_eq!(without.decode(&ids).unwrap(), "一只可爱的熊猫 😊");
}

#[test]
fn tokenizer_rejects_added_token_ids_that_do_not_follow_the_vocab() {
    let src = fixtures().join("tiny/snapshot/tokenizer");
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(
        &src,
        tmp.path(),
        &["tokenizer.json", "tokenizer_config.json"],
    );
    // added_tokens.json with a gap: every id shifted by one (1025.. instead of 1024..)
    let at: HashMap<String, u32> =
        serde_json::from_str(&std::fs::read_to_string(src.join("added_tokens.json")).unwrap())
            .unwrap();
    let shifted: HashMap<String, u32> = at.into_iter().map(|(k, v)| (k, v + 1)).collect();
    std::fs::write(
        tmp.path().join("added_tokens.json"),
        serde_json::to_string(&shifted).unwrap(),
    )
    .unwrap();
    let e = QwenTokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("should have id"), "{e}");
}

#[test]
fn v5_style_config_gives_same_embeddings() {
    let tmp = temp_snapshot();
    let cfg_path = tmp.path().join("text_encoder/config.json");
    let legacy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    // transformers-5 layout: text fields only under text_config, rope under rope_parameters
    let mut text = legacy["text_config"].as_object().unwrap().clone();
    let theta = text.remove("rope_theta").unwrap();
    let mut rope = text
        .remove("rope_scaling")
        .unwrap()
        .as_object()
        .unwrap()
        .clone();
    rope.insert("rope_theta".into(), theta);
    text.insert("rope_parameters".into(), serde_json::Value::Object(rope));
    let v5 = serde_json::json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": text,
        "vision_config": legacy["vision_config"],
        "some_future_key": {"ignored": true},
    });
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&v5).unwrap()).unwrap();
    let parsed: TextEncoderConfig = serde_json::from_value(v5).unwrap();
    assert_eq!(parsed.text.rope_theta(), 1_000_000.0);

    // flat transformers-4 layout without text_config also parses
    let mut flat = legacy.as_object().unwrap().clone();
    flat.remove("text_config");
    let parsed: TextEncoderConfig =
        serde_json::from_value(serde_json::Value::Object(flat)).unwrap();
    assert_eq!(parsed.text.hidden_size, 32);

    let prompts = ["dance monkey", "一只可爱的熊猫坐在竹林里，水墨画风格。"];
    let a = encoder(&fixtures().join("tiny/snapshot"))
        .encode(&prompts, 512)
        .unwrap();
    let b = encoder(tmp.path()).encode(&prompts, 512).unwrap();
    assert_eq!(rel_err(&b.embeds, &a.embeds), 0.0);
}

fn rewrite_weights(dir: &Path, f: impl Fn(&str) -> Option<String>) {
    let path = dir.join("text_encoder/model.safetensors");
    let tensors = qwen_image_model::candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .filter_map(|(k, v)| f(&k).map(|n| (n, v)))
        .collect();
    qwen_image_model::candle_core::safetensors::save(&renamed, &path).unwrap();
}

#[test]
fn language_model_weight_names_give_same_embeddings() {
    let tmp = temp_snapshot();
    // transformers-5 in-memory names: ^model -> model.language_model, ^visual -> model.visual
    rewrite_weights(tmp.path(), |k| {
        Some(if let Some(rest) = k.strip_prefix("model.") {
            format!("model.language_model.{rest}")
        } else if k.starts_with("visual.") {
            format!("model.{k}")
        } else {
            k.to_string()
        })
    });
    let prompts = ["A cat holding a sign that says hello world", " "];
    let a = encoder(&fixtures().join("tiny/snapshot"))
        .encode(&prompts, 512)
        .unwrap();
    let b = encoder(tmp.path()).encode(&prompts, 512).unwrap();
    assert_eq!(rel_err(&b.embeds, &a.embeds), 0.0);
}

#[test]
fn missing_tensor_is_a_clear_error() {
    let tmp = temp_snapshot();
    rewrite_weights(tmp.path(), |k| {
        (k != "model.layers.1.mlp.up_proj.weight").then(|| k.to_string())
    });
    let e = PromptEncoder::load(
        &Snapshot::open(tmp.path()).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );

    let tmp = temp_snapshot();
    rewrite_weights(tmp.path(), |k| {
        k.starts_with("visual.").then(|| k.to_string())
    });
    let e = PromptEncoder::load(
        &Snapshot::open(tmp.path()).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("embed_tokens"), "{e}");
}

#[test]
fn visual_and_lm_head_weights_are_not_needed() {
    let tmp = temp_snapshot();
    rewrite_weights(tmp.path(), |k| {
        (!k.starts_with("visual.") && !k.starts_with("lm_head")).then(|| k.to_string())
    });
    let a = encoder(&fixtures().join("tiny/snapshot"))
        .encode(&["dance monkey"], 512)
        .unwrap();
    let b = encoder(tmp.path()).encode(&["dance monkey"], 512).unwrap();
    assert_eq!(rel_err(&b.embeds, &a.embeds), 0.0);
}

#[test]
fn over_long_prompts_are_cut_and_reported() {
    let enc = encoder(&fixtures().join("tiny/snapshot"));
    let long = "A very long prompt, ".repeat(12);
    let prompts = [long.as_str(), "dance monkey"];
    let counts = enc.token_counts(&prompts).unwrap();
    let full = enc.encode(&prompts, 512).unwrap();
    assert_eq!(full.token_counts, counts);
    assert_eq!(full.embeds.dim(1).unwrap(), counts[0]);
    assert_eq!(full.truncated, vec![false, false]);

    // cut at 16: diffusers' prompt_embeds[:, :16]; the long prompt is flagged, the short one (13) is not
    let cut = enc.encode(&prompts, 16).unwrap();
    assert_eq!(counts[1], 13);
    assert_eq!(cut.truncated, vec![true, false]);
    assert_eq!(cut.embeds.dims(), &[2, 16, 32]);
    assert_eq!(
        rel_err(&cut.embeds, &full.embeds.narrow(1, 0, 16).unwrap()),
        0.0
    );
    assert!(!cut.mask_all_ones);
    // both cut below their length: mask all ones (diffusers passes None)
    let cut = enc.encode(&prompts, 8).unwrap();
    assert!(cut.mask_all_ones && cut.truncated == vec![true, true]);

    // limits of encode_prompt/check_inputs
    assert!(enc.encode(&prompts, 0).is_err());
    let e = enc.encode(&prompts, 1025).unwrap_err().to_string();
    assert!(e.contains("1024"), "{e}");

    // past the tokenizer limit (1024 + 34 template tokens) the template suffix is lost, as in diffusers
    let huge = "a ".repeat(1100);
    let e = enc.encode(&[huge.as_str()], 1024).unwrap();
    assert!(e.token_counts[0] > 1024 && e.truncated[0]);
    assert_eq!(e.embeds.dim(1).unwrap(), 1024);
    assert_eq!(TEMPLATE_DROP_IDX, 34);
}

/// Reduced precision runs the same code path with bf16 activations (RMSNorm statistics in f32): not a
/// diffusers comparison (the dumps are f32), only a guard against a broken bf16 path.
#[test]
fn bf16_encoding_stays_close_to_f32() {
    let snap = Snapshot::open(fixtures().join("tiny/snapshot")).unwrap();
    let prompts = [
        "A cat holding a sign that says hello world",
        "一只可爱的熊猫坐在竹林里，水墨画风格。",
    ];
    let f32 = PromptEncoder::load(&snap, DType::F32, &Device::Cpu)
        .unwrap()
        .encode(&prompts, 512)
        .unwrap();
    let bf16 = PromptEncoder::load(&snap, DType::BF16, &Device::Cpu)
        .unwrap()
        .encode(&prompts, 512)
        .unwrap();
    assert_eq!(bf16.embeds.dtype(), DType::BF16);
    let r = rel_err(&bf16.embeds, &f32.embeds);
    assert!(r < 5e-2, "bf16 vs f32 relative error {r:e}");
}
