//! Text-encoder parity: the `textenc` dump (tokenizer ids, `hidden_states[-1]`, `_get_qwen_prompt_embeds`,
//! `encode_prompt`, each prompt alone) and the text-encoder part of `t2i` dumps (`te.K.*`, `prompt_embeds`,
//! `negative_prompt_embeds`, masks and the `*_mask_is_none` flags).

use anyhow::{Context, Result};
use qwen_image_model::candle_core::{DType, Tensor};
use qwen_image_model::prompt::{PromptEncoder, TemplateBatch};

use super::{ParityArgs, Reference, Report};

/// The snapshot's prompt encoder, or `--text-encoder-weights` / `--tokenizer` (config from the snapshot).
fn load_encoder(args: &ParityArgs) -> Result<PromptEncoder> {
    let te = &args.weights.text_encoder;
    let (weights, config) =
        args.sources(te.text_encoder_weights.as_deref(), "--text-encoder-weights")?;
    let tokenizer =
        qwen_image_text_encoder::tokenizer_dir(te.tokenizer.as_deref(), Some(&args.snapshot))
            .map_err(anyhow::Error::msg)?;
    let loaded = qwen_image_model::source::load_prompt_encoder(
        &weights,
        &config,
        &tokenizer,
        &args.load_options(),
    )?;
    println!("text encoder weights: {}", loaded.memory);
    Ok(loaded.model)
}

fn ids_of(t: &Tensor) -> Result<Vec<i64>> {
    Ok(t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?)
}

fn max_sequence_length(reference: &Reference) -> usize {
    reference
        .arg("max_sequence_length")
        .as_u64()
        .map(|v| v as usize)
        .unwrap_or(512)
}

/// Compares a dumped text-encoder call `te.{k}.*` with ours on the same prompts: ids and mask exactly,
/// `hidden_states_last` on the valid (unpadded) tokens.
fn check_te_call(
    args: &ParityArgs,
    reference: &Reference,
    report: &mut Report,
    enc: &PromptEncoder,
    k: usize,
    prompts: &[&str],
) -> Result<()> {
    let p = format!("te.{k}");
    let batch: TemplateBatch = enc.tokenize_template(prompts)?;
    report.compare_ids(
        &format!("{p}.input_ids"),
        &ids_of(&batch.input_ids)?,
        &ids_of(reference.get(&format!("{p}.input_ids"))?)?,
    );
    report.compare_ids(
        &format!("{p}.attention_mask"),
        &ids_of(&batch.attention_mask)?,
        &ids_of(reference.get(&format!("{p}.attention_mask"))?)?,
    );
    let ours = enc
        .model()
        .forward(&batch.input_ids, Some(&batch.attention_mask))?; // [B, L, hidden]
    let theirs = reference.f32(&format!("{p}.hidden_states_last"))?;
    let ref_mask = ids_of(reference.get(&format!("{p}.attention_mask"))?)?;
    let (b, l, _) = theirs.dims3()?;
    if ours.dims3()?.0 != b || ours.dims3()?.1 != l {
        report.check(
            &format!("{p}.hidden_states_last"),
            false,
            format!("shape {:?} vs reference {:?}", ours.dims(), theirs.dims()),
        );
        return Ok(());
    }
    // valid tokens only: pads are never read downstream (diffusers drops them)
    let (mut a, mut r) = (Vec::new(), Vec::new());
    for i in 0..b {
        let n = ref_mask[i * l..(i + 1) * l]
            .iter()
            .filter(|&&m| m != 0)
            .count();
        a.push(ours.get(i)?.narrow(0, 0, n)?);
        r.push(theirs.get(i)?.narrow(0, 0, n)?);
    }
    report.compare(
        &format!("{p}.hidden_states_last (valid tokens)"),
        &Tensor::cat(&a, 0)?,
        &Tensor::cat(&r, 0)?,
        args.tol,
    )?;
    Ok(())
}

/// The `textenc` dump of `tools/refharness/reference.py` (`run_textenc`).
pub fn check(args: &ParityArgs, reference: &Reference, report: &mut Report) -> Result<()> {
    let enc = load_encoder(args)?;
    let prompts: Vec<String> = serde_json::from_value(reference.scalar("prompts").clone())
        .context("manifest scalars.prompts")?;
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();

    // --- tokenizer: raw text and full template, per prompt
    for (i, p) in prompts.iter().enumerate() {
        for (key, text) in [
            ("raw_token_ids", p.to_string()),
            (
                "template_token_ids",
                qwen_image_model::prompt::apply_template(p),
            ),
        ] {
            let want: Vec<i64> = serde_json::from_value(reference.scalar(key)[*p].clone())
                .with_context(|| format!("manifest {key}"))?;
            let ours: Vec<i64> = enc
                .tokenizer()
                .encode(&text)?
                .into_iter()
                .map(i64::from)
                .collect();
            report.compare_ids(&format!("tokenizer.{key}.{i}"), &ours, &want);
        }
    }

    // --- text-encoder calls: te.0 = _get_qwen_prompt_embeds(batch), te.1 = encode_prompt(batch), te.{2+i} = prompt i
    check_te_call(args, reference, report, &enc, 0, &prompts)?;
    if reference.has("te.1.input_ids") {
        check_te_call(args, reference, report, &enc, 1, &prompts)?;
    }
    for (i, p) in prompts.iter().enumerate() {
        if reference.has(&format!("te.{}.input_ids", i + 2)) {
            check_te_call(args, reference, report, &enc, i + 2, &[p])?;
        }
    }

    // --- _get_qwen_prompt_embeds on the batch
    let (embeds, mask, _) = enc.prompt_embeds(&prompts)?;
    report.compare(
        "batch.prompt_embeds",
        &embeds,
        &reference.f32("batch.prompt_embeds")?,
        args.tol,
    )?;
    report.compare_ids(
        "batch.prompt_embeds_mask",
        &ids_of(&mask)?,
        &ids_of(reference.get("batch.prompt_embeds_mask")?)?,
    );

    // --- encode_prompt(max_sequence_length)
    let msl = max_sequence_length(reference);
    let e = enc.encode(&prompts, msl)?;
    report.compare(
        &format!("batch.encode_prompt.embeds (msl {msl})"),
        &e.embeds,
        &reference.f32("batch.encode_prompt.embeds")?,
        args.tol,
    )?;
    let none = reference
        .scalar("batch.encode_prompt.mask_is_none")
        .as_bool()
        .unwrap_or(false);
    report.check(
        "batch.encode_prompt.mask_is_none",
        e.mask_all_ones == none,
        format!("ours {} reference {none}", e.mask_all_ones),
    );
    if reference.has("batch.encode_prompt.mask") {
        report.compare_ids(
            "batch.encode_prompt.mask",
            &ids_of(&e.mask)?,
            &ids_of(reference.get("batch.encode_prompt.mask")?)?,
        );
    }

    // --- each prompt alone, and batched == single on the valid rows
    for (i, p) in prompts.iter().enumerate() {
        let (single, _, _) = enc.prompt_embeds(&[p])?;
        let name = format!("single.{i}.prompt_embeds");
        if reference.has(&name) {
            report.compare(&name, &single, &reference.f32(&name)?, args.tol)?;
        }
        let n = single.dim(1)?;
        let row = embeds.get(i)?.narrow(0, 0, n)?.unsqueeze(0)?;
        report.compare(
            &format!("ours batch[{i}] == ours single.{i} (valid rows)"),
            &row,
            &single,
            args.tol,
        )?;
    }
    Ok(())
}

/// Prompt of a pipeline dump when `args.prompt` is null: the defaults of `reference.py` `prompts_arg` callers.
fn default_prompt(mode: &str) -> &'static str {
    match mode {
        "inpaint" => "a red lantern in the middle",
        "controlnet" => "a blue bird on a branch",
        _ => "A cat holding a sign that says hello world",
    }
}

/// The text-encoder tensors of a t2i dump (`te.K.*`, `prompt_embeds`, masks).
pub fn check_t2i_part(args: &ParityArgs, reference: &Reference, report: &mut Report) -> Result<()> {
    let enc = load_encoder(args)?;
    let prompts: Vec<String> = match reference.arg("prompt") {
        serde_json::Value::Null => vec![default_prompt(reference.mode()).to_string()],
        v => serde_json::from_value(v.clone()).context("manifest args.prompt")?,
    };
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let negative: Option<String> =
        serde_json::from_value(reference.arg("negative_prompt").clone()).unwrap_or(None);
    let negatives: Option<Vec<&str>> = negative.as_deref().map(|n| vec![n; prompts.len()]);
    let msl = max_sequence_length(reference);

    let mut k = 0;
    for (name, ps) in [
        ("prompt", Some(prompts.clone())),
        ("negative_prompt", negatives),
    ] {
        let Some(ps) = ps else { continue };
        let embeds_name = format!("{name}_embeds");
        if !reference.has(&embeds_name) {
            // diffusers skips the negative encode when CFG is off
            continue;
        }
        if reference.has(&format!("te.{k}.input_ids")) {
            check_te_call(args, reference, report, &enc, k, &ps)?;
        }
        k += 1;
        let e = enc.encode(&ps, msl)?;
        report.compare(
            &embeds_name,
            &e.embeds,
            &reference.f32(&embeds_name)?,
            args.tol,
        )?;
        report.compare_ids(
            &format!("{name}_embeds_mask"),
            &ids_of(&e.mask)?,
            &ids_of(reference.get(&format!("{name}_embeds_mask"))?)?,
        );
        let none = reference
            .scalar(&format!("{name}_embeds_mask_is_none"))
            .as_bool()
            .unwrap_or(false);
        report.check(
            &format!("{name}_embeds_mask_is_none"),
            e.mask_all_ones == none,
            format!("ours {} reference {none}", e.mask_all_ones),
        );
    }
    Ok(())
}
