//! End to end for instruction editing and several models behind one gateway: one text-encoder process and
//! one VAE process on the edit-tiny snapshot, shared by three denoisers — a base model (the edit-tiny
//! transformer in a `QwenImagePipeline` snapshot), Edit-2509 and Edit-2511 (`zero_cond_t`) — behind one
//! gateway. The Edit PNGs are compared with diffusers' `QwenImageEditPlusPipeline`
//! (tests/fixtures/edit-tiny/refs, made by tools/refharness/ref_edit.py with `--condition-area 28672
//! --vae-area 16384`, which the gateway is given as `--edit-condition-area` / `--edit-vae-area`).

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

use common::{client, max_level_diff, result_of, workspace};

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
    drop((te, vae, dn_base, dn_2509, dn_2511, gateway));
}
