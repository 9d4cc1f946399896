//! Single-file and quantized weights through the services: a GGUF transformer served by the denoiser
//! process (`--transformer-weights`) against diffusers' GGUF pipeline, what the stages describe and report
//! in `/metrics`, a llama.cpp text encoder served without a snapshot, and wrong files refused at startup.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;
use qwen_image_proto::v1::stage_info_client::StageInfoClient;
use qwen_image_proto::v1::{DescribeRequest, StageDescription};
use qwen_image_testkit::files::{gguf_type_offset, patched_copy};
use qwen_image_testkit::process::{ServiceProcess, sample, scrape, workspace_binary};
use qwen_image_testkit::stack::{Launcher, ProcessStack, StackSpec};
use tonic::transport::Channel;

fn quant(f: &str) -> PathBuf {
    workspace().join("tests/fixtures/quant").join(f)
}

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

async fn describe(url: &str) -> StageDescription {
    let ch = Channel::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    StageInfoClient::new(ch)
        .describe(DescribeRequest {})
        .await
        .expect("describe")
        .into_inner()
}

/// The tiny snapshot with the denoiser on `--transformer-weights FILE`, metrics on every stage.
async fn stack_on_transformer_file(file: &Path) -> ProcessStack {
    let mut spec = StackSpec::model(&snapshot());
    spec.denoiser_args = vec!["--transformer-weights".into(), s(file)];
    spec.common_args = vec!["--metrics-listen".into(), "127.0.0.1:0".into()];
    ProcessStack::serving(Launcher::StageBinaries, &spec)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Levels allowed between our PNG and diffusers' for the same GGUF file (measured: 1 for Q8_0 and Q4_0):
/// diffusers dequantizes GGUF blocks in float16 (`dequantize_blocks_Q8_0` etc.), ggml and we in float32
/// (README, "Quantized weights").
const GGUF_LEVELS: u8 = 2;

#[tokio::test]
async fn gguf_transformers_through_the_denoiser_match_diffusers_gguf_pipeline() {
    let (_, f32_png) = reference("t2i_64");
    for (q, format) in [("Q8_0", "gguf Q8_0 + F32"), ("Q4_0", "gguf Q4_0 + F32")] {
        let file = quant(&format!("transformer/{q}.gguf"));
        let stack = stack_on_transformer_file(&file).await;
        let (req, diffusers_png) = reference_at(&quant("refs").join(format!("t2i_64_{q}")));
        let mut c = client(&stack.gateway_url()).await;
        let r = generate(&mut c, t2i(req))
            .await
            .unwrap_or_else(|e| panic!("{q}: {e:?}"));
        let diff = max_level_diff(&r.png[0], &diffusers_png, q);
        eprintln!("{q}: max {diff} levels from diffusers' GGUF pipeline PNG");
        assert!(
            diff <= GGUF_LEVELS,
            "{q}: {diff} levels (allowed {GGUF_LEVELS})"
        );
        // the quantized weights were really used: the f32 model's picture differs (diffusers' Q8_0 PNG by
        // at most 1 level on 7 % of the values, its Q4_0 PNG by 14 levels)
        let from_f32 = max_level_diff(&r.png[0], &f32_png, q);
        eprintln!("{q}: max {from_f32} levels from the f32 model's PNG");
        let min_from_f32 = if q == "Q4_0" { GGUF_LEVELS + 1 } else { 1 };
        assert!(
            from_f32 >= min_from_f32,
            "{q}: {from_f32} levels from the f32 snapshot's picture"
        );

        // Describe: the file's format, and a digest that is not the snapshot's transformer digest
        let d = describe(&stack.denoiser.url()).await;
        assert_eq!(d.weights_format, format);
        let te = describe(&stack.text_encoder.url()).await;
        assert_eq!(te.weights_format, "safetensors F32");

        // /metrics: the transformer's resident weights by format, and the peak RSS
        let text = scrape(stack.denoiser.metrics_addr.expect("metrics address"))
            .await
            .expect("scrape");
        let labels = |f: &'static str| {
            [
                ("service", "denoiser"),
                ("component", "transformer"),
                ("format", f),
            ]
        };
        let packed = sample(&text, "qwen_image_weights_resident_bytes", &labels(q))
            .unwrap_or_else(|| panic!("{q} weight gauge missing:\n{text}"));
        let dense = sample(&text, "qwen_image_weights_resident_bytes", &labels("F32"))
            .expect("F32 weight gauge");
        assert!(packed > 0.0 && dense > 0.0, "{packed} {dense}");
        let file_bytes = std::fs::metadata(&file).expect("file").len() as f64;
        // the quantized blocks are stored as they are in the file (plus the 1-D tensors' F32 copies)
        assert!(
            packed < file_bytes,
            "{q}: {packed} resident bytes of quantized weights, file {file_bytes}"
        );
        let peak = sample(
            &text,
            "qwen_image_process_peak_rss_bytes",
            &[("service", "denoiser")],
        )
        .expect("peak RSS gauge");
        assert!(peak > packed + dense, "peak RSS {peak}");
        let log = stack.denoiser.log_lines().join("\n");
        assert!(log.is_empty() || !log.contains("ERROR"), "{log}");
    }
}

#[tokio::test]
async fn stages_report_weight_memory_at_startup_and_in_metrics() {
    let mut spec = StackSpec::model(&snapshot());
    spec.common_args = vec!["--metrics-listen".into(), "127.0.0.1:0".into()];
    spec.env = vec![("RUST_LOG".into(), "info".into())];
    let stack = ProcessStack::serving(Launcher::StageBinaries, &spec)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for (p, service, component) in [
        (&stack.text_encoder, "text-encoder", "text_encoder"),
        (&stack.denoiser, "denoiser", "transformer"),
        (&stack.vae, "vae", "vae"),
    ] {
        let text = scrape(p.metrics_addr.expect("metrics"))
            .await
            .expect("scrape");
        let bytes = sample(
            &text,
            "qwen_image_weights_resident_bytes",
            &[
                ("service", service),
                ("component", component),
                ("format", "F32"),
            ],
        )
        .unwrap_or_else(|| panic!("{service}: no weight gauge:\n{text}"));
        assert!(bytes > 0.0);
        let rss = sample(
            &text,
            "qwen_image_process_peak_rss_bytes",
            &[("service", service)],
        )
        .expect("peak RSS");
        assert!(
            rss > bytes,
            "{service}: peak RSS {rss} below the weights {bytes}"
        );
        let log = p.log_lines().join("\n");
        assert!(
            log.contains("memory: weights") && log.contains("peak"),
            "{service}: no memory line at startup:\n{log}"
        );
    }
}

/// A llama.cpp GGUF text encoder with no snapshot: dimensions from the GGUF's metadata, tokenizer apart.
#[tokio::test]
async fn a_llama_cpp_text_encoder_serves_without_a_snapshot() {
    let te = ServiceProcess::spawn(
        &workspace_binary("qwen-image-text-encoder"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--text-encoder-weights",
            &s(&quant("text_encoder/Q8_0.gguf")),
            "--tokenizer",
            &s(&snapshot().join("tokenizer/tokenizer.json")),
        ],
        &[("RUST_LOG", "warn")],
        GUARD,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    qwen_image_testkit::process::wait_serving(&te.url(), GUARD)
        .await
        .expect("SERVING");
    let d = describe(&te.url()).await;
    assert_eq!(d.weights_format, "gguf Q8_0 + F32");
    assert_eq!(d.model_id, "Q8_0.gguf");
    assert!(d.snapshot_digest.is_empty(), "no snapshot");
    let te_desc = d.text_encoder.expect("text encoder");
    // the tiny model's width, read from `qwen2vl.embedding_length`
    assert_eq!(te_desc.hidden_size, 32);
    // another file of the same model is another component
    let snap = describe_snapshot_text_encoder().await;
    assert_ne!(te_desc.digest, snap);
}

async fn describe_snapshot_text_encoder() -> String {
    let p = ServiceProcess::spawn(
        &workspace_binary("qwen-image-text-encoder"),
        &["--listen", "127.0.0.1:0", "--model", &s(&snapshot())],
        &[("RUST_LOG", "warn")],
        GUARD,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    describe(&p.url())
        .await
        .text_encoder
        .expect("text encoder")
        .digest
}

/// Runs a stage binary (or `qwen-image serve --stage X`) that must refuse its weights: (exit code, stderr).
async fn refused(program: &Path, args: &[String]) -> (Option<i32>, String) {
    let child = tokio::process::Command::new(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let out = tokio::time::timeout(GUARD, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} still running: not refused", program.display()))
        .expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_has(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "`{p}` not in:\n{text}");
    }
}

#[tokio::test]
async fn wrong_weight_files_are_refused_at_startup() {
    let tmp = tempfile::tempdir().expect("tmp");
    let denoiser = workspace_binary("qwen-image-denoiser");
    let cli = PathBuf::from(env!("CARGO_BIN_EXE_qwen-image"));
    let model = s(&snapshot());
    let base = |flag: &str, file: &Path| {
        vec![
            "--listen".to_string(),
            "127.0.0.1:0".into(),
            "--model".into(),
            model.clone(),
            flag.into(),
            s(file),
        ]
    };

    // a GGUF of another model (the llama.cpp text encoder given as the transformer)
    let other = quant("text_encoder/Q8_0.gguf");
    let (code, err) = refused(&denoiser, &base("--transformer-weights", &other)).await;
    assert_ne!(code, Some(0));
    assert_has(
        &err,
        &[
            &s(&other),
            "`qwen2vl` model",
            "expected a Qwen-Image transformer",
        ],
    );

    // a truncated file: the tensor whose bytes are missing is named
    let cut = patched_copy(&quant("transformer/Q8_0.gguf"), tmp.path(), |b| {
        let n = b.len() * 3 / 5;
        b.truncate(n);
    });
    let (code, err) = refused(&denoiser, &base("--transformer-weights", &cut)).await;
    assert_ne!(code, Some(0));
    assert_has(&err, &[&s(&cut), "truncated", "tensor `", "needs bytes"]);

    // a quant type candle lacks (IQ4_XS, ggml type 23) on one tensor
    let name = "time_text_embed.timestep_embedder.linear_1.weight";
    let iq_dir = tmp.path().join("iq");
    std::fs::create_dir_all(&iq_dir).expect("mkdir");
    let iq = patched_copy(&quant("transformer/Q8_0.gguf"), &iq_dir, |b| {
        let at = gguf_type_offset(b, name);
        b[at..at + 4].copy_from_slice(&23u32.to_le_bytes());
    });
    let (code, err) = refused(&denoiser, &base("--transformer-weights", &iq)).await;
    assert_ne!(code, Some(0));
    assert_has(&err, &[&s(&iq), name, "IQ4_XS", "Q8_0"]);

    // through `qwen-image serve --stage`: the transformer file given as the VAE, the VAE's as the text encoder
    let mut args = vec!["serve".to_string(), "--stage".into(), "vae".into()];
    args.extend(base("--vae-weights", &quant("transformer/Q8_0.gguf")));
    let (code, err) = refused(&cli, &args).await;
    assert_ne!(code, Some(0));
    assert_has(
        &err,
        &[
            "transformer/Q8_0.gguf",
            "not a Qwen-Image (Wan 2.1) VAE",
            "decoder.conv_in.weight",
        ],
    );
    let mut args = vec!["serve".to_string(), "--stage".into(), "text-encoder".into()];
    args.extend(base(
        "--text-encoder-weights",
        &quant("transformer/Q8_0.gguf"),
    ));
    let (code, err) = refused(&cli, &args).await;
    assert_ne!(code, Some(0));
    assert_has(
        &err,
        &["transformer/Q8_0.gguf", "`qwen_image` model", "Qwen2.5-VL"],
    );

    // the released config (no --model) against the tiny file: the tensor and both shapes are named
    let args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--transformer-weights".into(),
        s(&quant("transformer/Q8_0.gguf")),
    ];
    let (code, err) = refused(&denoiser, &args).await;
    assert_ne!(code, Some(0));
    assert_has(&err, &["Q8_0.gguf", "has shape", "the config expects"]);

    // a flag of another stage is refused by `serve --stage`
    let mut args = vec!["serve".to_string(), "--stage".into(), "vae".into()];
    args.extend(base(
        "--transformer-weights",
        &quant("transformer/Q8_0.gguf"),
    ));
    let (code, err) = refused(&cli, &args).await;
    assert_ne!(code, Some(0));
    assert_has(&err, &["--transformer-weights is a denoiser flag"]);
}

/// `qwen-image parity --transformer-weights` on diffusers' GGUF pipeline dump made with the same file.
/// Measured: one transformer pass 2.9e-4 (Q8_0) / 3.1e-4 (Q4_0) relative max error, final latents 1.2e-4, the
/// decoded image identical; diffusers' float16 dequantization is the residual (README, "Quantized weights").
/// Without the file (the f32 snapshot) the same dumps fail at this tolerance (6e-3 / 1.2e-1 per pass).
#[test]
fn parity_with_a_gguf_transformer_file() {
    let parity = |q: &str, with_file: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_qwen-image"));
        cmd.args(["parity", "--snapshot"])
            .arg(snapshot())
            .arg("--reference")
            .arg(quant("refs").join(format!("t2i_64_{q}")))
            .args(["--tol", "1e-3", "--loop-tol", "1e-3"]);
        if with_file {
            cmd.arg("--transformer-weights")
                .arg(quant(&format!("transformer/{q}.gguf")));
        }
        let out = cmd.output().expect("the qwen-image binary runs");
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    for q in ["Q8_0", "Q4_0"] {
        let (ok, text) = parity(q, true);
        assert!(ok, "{q}:\n{text}");
        assert_has(
            &text,
            &[
                &format!("{q} "),
                "PASS  step.0.transformer.cond.out",
                "PASS  latents_final_packed",
                "PASS  image_uint8",
            ],
        );
    }
    let (ok, text) = parity("Q8_0", false);
    assert!(!ok, "the f32 snapshot passes the GGUF dump:\n{text}");
    assert_has(&text, &["FAIL  step.0.transformer.cond.out"]);
}

/// Two denoiser replicas on the same snapshot, one with `--transformer-weights Q8_0.gguf`: their digests
/// differ, so the gateway accepts one, refuses the other naming both weight formats, and serves on.
#[tokio::test]
async fn replicas_on_different_weight_files_are_told_apart() {
    let model = s(&snapshot());
    let stage = |bin: &str, extra: &[&str]| {
        let mut args = vec!["--listen", "127.0.0.1:0", "--model", model.as_str()];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        let bin = workspace_binary(bin);
        async move {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            ServiceProcess::spawn(&bin, &a, &[("RUST_LOG", "warn")], GUARD)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    let gguf = s(&quant("transformer/Q8_0.gguf"));
    let te = stage("qwen-image-text-encoder", &[]).await;
    let dn_f32 = stage("qwen-image-denoiser", &[]).await;
    let dn_q8 = stage("qwen-image-denoiser", &["--transformer-weights", &gguf]).await;
    let vae = stage("qwen-image-vae", &[]).await;
    let (a, b) = (
        describe(&dn_f32.url()).await.transformer.expect("t").digest,
        describe(&dn_q8.url()).await.transformer.expect("t").digest,
    );
    assert_ne!(a, b, "same digest for the snapshot's weights and the GGUF");
    let denoisers = format!("{},{}", dn_f32.url(), dn_q8.url());
    let gw = ServiceProcess::spawn(
        &workspace_binary("qwen-image-gateway"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--text-encoder",
            &te.url(),
            "--denoiser",
            &denoisers,
            "--vae",
            &vae.url(),
        ],
        &[("RUST_LOG", "warn")],
        GUARD,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    qwen_image_testkit::process::wait_serving(&gw.url(), GUARD)
        .await
        .expect("gateway SERVING");
    // A request is served (by the accepted replica) whichever replica the gateway met first.
    let (req, _) = reference("t2i_64");
    let mut c = client(&gw.url()).await;
    generate(&mut c, t2i(req)).await.expect("served");
    // The refusal is logged once the gateway has described both replicas (it reviews them on its own
    // schedule): wait for the line, bounded by the guard.
    let deadline = std::time::Instant::now() + GUARD;
    let line = loop {
        if let Some(l) = gw
            .log_lines()
            .into_iter()
            .find(|l| l.contains("serves another"))
        {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no refusal logged");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_has(
        &line,
        &[
            "weights gguf Q8_0 + F32",
            "weights safetensors F32",
            "digest",
        ],
    );
}
