//! End to end for instruction editing and several models behind one gateway: one text-encoder process and
//! one VAE process on the edit-tiny snapshot, shared by three denoisers — a base model (the edit-tiny
//! transformer in a `QwenImagePipeline` snapshot), Edit-2509 and Edit-2511 (`zero_cond_t`) — behind one
//! gateway. The Edit PNGs are compared with diffusers' `QwenImageEditPlusPipeline`
//! (tests/fixtures/edit-tiny/refs, made by tools/refharness/ref_edit.py with `--condition-area 28672
//! --vae-area 16384`, which the gateway is given as `--edit-condition-area` / `--edit-vae-area`).
//! The same gateway's HTTP API (`--http-listen`) must give the gRPC answers' very bytes, also through the
//! official OpenAI Python SDK (`tools/http-clients/openai_sdk_edit.py`; its venv as for http_clients.rs:
//! `QWEN_IMAGE_TEST_PYTHON`, or `QWEN_IMAGE_SKIP_HTTP_CLIENT_TESTS=1` to skip that part).

mod common;

use std::path::{Path, PathBuf};

use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::{
    EditRequest, GenerateResult, GenerationSettings, ListModelsRequest, TextToImageRequest,
};
use qwen_image_testkit::process::{ServiceProcess, workspace_binary};
use qwen_image_testkit::service::{GUARD, wait_serving};
use tonic::Code;
use tonic::transport::Channel;

use common::{client, max_level_diff, python, result_of, run_python, workspace};

fn edit_tiny() -> PathBuf {
    workspace().join("tests/fixtures/edit-tiny")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A base-model snapshot with the edit-tiny transformer: `transformer/` and `scheduler/` copied, a
/// `QwenImagePipeline` model index.
fn base_snapshot(dir: &Path) -> PathBuf {
    let src = edit_tiny().join("snapshot");
    for component in ["transformer", "scheduler"] {
        std::fs::create_dir_all(dir.join(component)).expect("mkdir");
        for entry in std::fs::read_dir(src.join(component)).expect("read_dir") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), dir.join(component).join(entry.file_name())).expect("copy");
        }
    }
    let index = String::from_utf8(read(&src.join("model_index.json")))
        .expect("utf-8")
        .replace("QwenImageEditPlusPipeline", "QwenImagePipeline");
    std::fs::write(dir.join("model_index.json"), index).expect("write");
    dir.to_path_buf()
}

async fn spawn(binary: &str, args: &[&str]) -> ServiceProcess {
    let mut full = vec!["--listen", "127.0.0.1:0"];
    full.extend_from_slice(args);
    ServiceProcess::spawn(
        &workspace_binary(binary),
        &full,
        &[("RUST_LOG", "warn")],
        GUARD,
    )
    .await
    .unwrap_or_else(|e| panic!("{binary}: {e}"))
}

/// The options and PNGs of a ref_edit.py dump.
struct EditRef {
    settings: GenerationSettings,
    images: Vec<bytes::Bytes>,
    expected: Vec<u8>,
}

fn edit_reference(name: &str) -> EditRef {
    let dir = edit_tiny().join("refs").join(name);
    let manifest: serde_json::Value =
        serde_json::from_slice(&read(&dir.join("manifest.json"))).expect("json");
    let n = manifest["args"]["image_size"]
        .as_array()
        .map_or(1, Vec::len);
    let (settings, expected) = common::reference_at(&dir);
    EditRef {
        settings,
        images: (0..n)
            .map(|k| read(&dir.join(format!("input_{k}.png"))).into())
            .collect(),
        expected,
    }
}

async fn edit(
    c: &mut ImageGeneratorClient<Channel>,
    req: EditRequest,
) -> Result<GenerateResult, tonic::Status> {
    result_of(c.edit(req).await?.into_inner()).await
}

#[tokio::test]
async fn edit_models_beside_a_base_model_match_diffusers() {
    let snap = edit_tiny().join("snapshot");
    let snap_2511 = edit_tiny().join("snapshot-2511");
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = base_snapshot(tmp.path());
    let (snap, snap_2511, base) = (
        snap.to_str().expect("utf-8").to_string(),
        snap_2511.to_str().expect("utf-8").to_string(),
        base.to_str().expect("utf-8").to_string(),
    );
    let te = spawn("qwen-image-text-encoder", &["--model", &snap]).await;
    let vae = spawn("qwen-image-vae", &["--model", &snap]).await;
    let dn_base = spawn("qwen-image-denoiser", &["--model", &base]).await;
    let dn_2509 = spawn("qwen-image-denoiser", &["--model", &snap]).await;
    let dn_2511 = spawn("qwen-image-denoiser", &["--model", &snap_2511]).await;
    let edit_2509 = format!("edit-2509={}", dn_2509.url());
    let edit_2511 = format!("edit-2511={}", dn_2511.url());
    let gateway = spawn(
        "qwen-image-gateway",
        &[
            "--text-encoder",
            &te.url(),
            "--denoiser",
            &dn_base.url(),
            "--vae",
            &vae.url(),
            "--model-name",
            "base",
            "--extra-model",
            &edit_2509,
            "--extra-model",
            &edit_2511,
            "--edit-condition-area",
            "28672",
            "--edit-vae-area",
            "16384",
            "--http-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    wait_serving(&gateway.url(), "", GUARD)
        .await
        .expect("gateway SERVING");
    let mut c = client(&gateway.url()).await;

    // ListModels: three models, one text-encoder pool and one VAE pool shared by all.
    let listed = c
        .list_models(ListModelsRequest {})
        .await
        .expect("ListModels")
        .into_inner()
        .models;
    let names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["base", "edit-2509", "edit-2511"]);
    assert!(!listed[0].instruction_edit, "{:?}", listed[0]);
    assert_eq!(listed[0].pipeline_class, "QwenImagePipeline");
    for m in &listed {
        assert!(m.ready && m.shared_text_encoder && m.shared_vae, "{m:?}");
    }
    assert!(listed[1].instruction_edit && listed[2].instruction_edit);

    // Edit PNGs against diffusers' QwenImageEditPlusPipeline: one and two pictures, 2509 and 2511.
    for (model, reference) in [
        ("edit-2509", "edit1_64"),
        ("edit-2509", "edit2_64x48"),
        ("edit-2511", "edit1_2511"),
        ("edit-2511", "edit2_2511"),
    ] {
        let r = edit_reference(reference);
        let req = EditRequest {
            settings: Some(GenerationSettings {
                model: model.into(),
                ..r.settings.clone()
            }),
            images: r.images.clone(),
        };
        let out = edit(&mut c, req)
            .await
            .unwrap_or_else(|e| panic!("{model} {reference}: {e:?}"));
        let diff = max_level_diff(&out.png[0], &r.expected, reference);
        assert!(
            diff <= 1,
            "{model} {reference}: {diff} levels from diffusers (allowed 1)"
        );
        assert_eq!(
            out.parameters.as_ref().map(|p| p.model.as_str()),
            Some(model)
        );
    }

    // The base model serves text-to-image through the same text-encoder and VAE processes (the default
    // model: settings.model empty).
    let t2i = common::generate(
        &mut c,
        TextToImageRequest {
            settings: Some(GenerationSettings {
                prompt: "a lighthouse".into(),
                width_px: 32,
                height_px: 32,
                steps: 2,
                seed: Some(1),
                ..Default::default()
            }),
            initial_latents: None,
        },
    )
    .await
    .expect("text to image on the base model");
    assert_eq!((t2i.width_px, t2i.height_px), (32, 32));

    // Client errors: an Edit request to the base model, an unknown model, four pictures.
    let r = edit_reference("edit1_64");
    let with = |model: &str, images: Vec<bytes::Bytes>| EditRequest {
        settings: Some(GenerationSettings {
            model: model.into(),
            ..r.settings.clone()
        }),
        images,
    };
    let e = edit(&mut c, with("base", r.images.clone()))
        .await
        .expect_err("base model");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .contains("`base` is not an instruction-editing model"),
        "{e:?}"
    );
    let e = edit(&mut c, with("edit-2512", r.images.clone()))
        .await
        .expect_err("unknown model");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("base, edit-2509, edit-2511"), "{e:?}");
    let e = common::generate(
        &mut c,
        TextToImageRequest {
            settings: Some(GenerationSettings {
                prompt: "x".into(),
                model: "nope".into(),
                ..Default::default()
            }),
            initial_latents: None,
        },
    )
    .await
    .expect_err("unknown model");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let four = vec![r.images[0].clone(); 4];
    let e = edit(&mut c, with("edit-2509", four))
        .await
        .expect_err("four pictures");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("1..=3"), "{e:?}");

    http_api_serves_both_models(&gateway, &mut c).await;
    drop((te, vae, dn_base, dn_2509, dn_2511, gateway));
}

/// The request with the caller's `x-request-id` (which the PNG text chunks record: the same id on both APIs
/// makes the same bytes).
fn with_id<T>(msg: T, id: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("x-request-id", id.parse().expect("ascii id"));
    r
}

/// The first picture of an OpenAI `ImagesResponse` body.
fn first_png(body: &str) -> Vec<u8> {
    use base64::Engine;
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["b64_json"].as_str().expect("b64_json"))
        .expect("base64")
}

/// The OpenAI-compatible HTTP API of the same gateway: `GET /v1/models` lists the three models with their
/// kinds; `/v1/images/edits` with two `image[]` parts and `model=edit-2509` gives the very PNG bytes of the
/// gRPC `Edit` with the same inputs and request id; `/v1/images/generations` with `model=base` those of
/// `TextToImage`; an unknown model is 404 `model_not_found`.
async fn http_api_serves_both_models(
    gateway: &ServiceProcess,
    c: &mut ImageGeneratorClient<Channel>,
) {
    use qwen_image_testkit::http::{multipart, request, request_bytes};
    let addr = gateway.http_addr(GUARD).await.expect("HTTP address");
    let (status, list) = request(addr, "GET", "/v1/models", &[], "").await;
    assert_eq!(status, 200, "{list}");
    let list: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    let kinds: Vec<(String, String)> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| (m["id"].to_string(), m["kind"].to_string()))
        .collect();
    let want: Vec<(String, String)> = [
        ("base", "base"),
        ("edit-2509", "edit"),
        ("edit-2511", "edit"),
    ]
    .iter()
    .map(|(a, b)| (format!("\"{a}\""), format!("\"{b}\"")))
    .collect();
    assert_eq!(kinds, want);

    // Instruction editing, two pictures: HTTP form == gRPC Edit, byte for byte.
    let r = edit_reference("edit2_64x48");
    let s = &r.settings;
    let (steps, cfg, seed) = (
        s.steps.to_string(),
        s.true_cfg_scale.expect("cfg").to_string(),
        s.seed.expect("seed").to_string(),
    );
    let size = format!("{}x{}", s.width_px, s.height_px);
    let fields = [
        ("prompt", s.prompt.as_str()),
        (
            "negative_prompt",
            s.negative_prompt.as_deref().expect("negative"),
        ),
        ("model", "edit-2509"),
        ("size", size.as_str()),
        ("steps", steps.as_str()),
        ("true_cfg_scale", cfg.as_str()),
        ("seed", seed.as_str()),
    ];
    let files: Vec<(&str, &str, &[u8])> = r
        .images
        .iter()
        .map(|b| ("image[]", "picture.png", b.as_ref()))
        .collect();
    let (content_type, body) = multipart(&fields, &files);
    let id = "e2e-instruct-http-edit";
    let (status, answer) = request_bytes(
        addr,
        "POST",
        "/v1/images/edits",
        &[
            ("content-type", content_type.as_str()),
            ("x-request-id", id),
        ],
        &body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let req = EditRequest {
        settings: Some(GenerationSettings {
            model: "edit-2509".into(),
            ..s.clone()
        }),
        images: r.images.clone(),
    };
    let grpc = result_of(c.edit(with_id(req, id)).await.expect("Edit").into_inner())
        .await
        .expect("Edit result");
    assert!(
        first_png(&answer) == grpc.png[0],
        "the HTTP edit differs from the gRPC Edit"
    );
    // The same edit through the official OpenAI Python SDK: `images.edit(image=[a, b])`.
    if let Some(python) = python() {
        let work = tempfile::tempdir().expect("tempdir");
        for (k, b) in r.images.iter().enumerate() {
            std::fs::write(work.path().join(format!("picture_{k}.png")), b).expect("write");
        }
        let request = serde_json::json!({
            "prompt": s.prompt, "negative_prompt": s.negative_prompt, "size": size, "steps": s.steps,
            "true_cfg_scale": s.true_cfg_scale, "seed": s.seed, "request_id": id,
        });
        std::fs::write(work.path().join("request.json"), request.to_string()).expect("write");
        let args = [
            format!("http://{addr}/v1"),
            "edit-2509".to_string(),
            work.path().display().to_string(),
        ];
        run_python(&python, "openai_sdk_edit.py", &args).await;
        let sdk = read(&work.path().join("sdk_edit.png"));
        assert!(
            sdk == grpc.png[0],
            "the OpenAI SDK's edit differs from the gRPC Edit"
        );
    }
    let diff = max_level_diff(&grpc.png[0], &r.expected, "edit2_64x48 over HTTP");
    assert!(diff <= 1, "{diff} levels from diffusers");

    // Text to image on the base model: HTTP JSON == gRPC TextToImage.
    let id = "e2e-instruct-http-t2i";
    let json =
        r#"{"prompt": "a lighthouse", "model": "base", "size": "32x32", "steps": 2, "seed": 5}"#;
    let (status, answer) = request(
        addr,
        "POST",
        "/v1/images/generations",
        &[("content-type", "application/json"), ("x-request-id", id)],
        json,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let t2i = TextToImageRequest {
        settings: Some(GenerationSettings {
            prompt: "a lighthouse".into(),
            model: "base".into(),
            width_px: 32,
            height_px: 32,
            steps: 2,
            seed: Some(5),
            ..Default::default()
        }),
        initial_latents: None,
    };
    let grpc = result_of(
        c.text_to_image(with_id(t2i, id))
            .await
            .expect("TextToImage")
            .into_inner(),
    )
    .await
    .expect("TextToImage result");
    assert!(
        first_png(&answer) == grpc.png[0],
        "the HTTP generation differs from the gRPC TextToImage"
    );

    let (status, err) = request(
        addr,
        "POST",
        "/v1/images/generations",
        &[("content-type", "application/json")],
        r#"{"prompt": "x", "model": "edit-2512"}"#,
    )
    .await;
    assert!(
        status == 404
            && err.contains("model_not_found")
            && err.contains("base, edit-2509, edit-2511"),
        "{status} {err}"
    );
}
