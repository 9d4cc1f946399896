//! End to end on models whose geometry is not Qwen-Image's (the stage contracts): the four stage binaries
//! on `random` snapshots whose VAE has 3 levels (scale factor 4, sizes in multiples of 8) with 4 and 8
//! latent channels, each with a ControlNet; text-to-image, inpaint and ControlNet pose give diffusers'
//! PNGs (tests/fixtures/random-{8,16}, made by tools/make_fixtures_geometry.sh). And stages started from
//! two different snapshots: the gateway never turns SERVING and names the mismatch.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use qwen_image_proto::v1::{
    ControlNetSettings, GenerationSettings, InpaintRequest, PoseRequest, pose_request,
};
use qwen_image_testkit::service::health;
use qwen_image_testkit::stack::{Launcher, ProcessStack, StackSpec};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn fixture(name: &str) -> PathBuf {
    workspace().join("tests/fixtures").join(name)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The stage binaries on `snapshot`, the denoiser with its ControlNet.
async fn stack_on(snapshot: &Path) -> ProcessStack {
    let mut spec = StackSpec::model(snapshot);
    spec.denoiser_args = vec![
        "--controlnet".into(),
        format!("union={}", snapshot.join("controlnet").display()),
    ];
    ProcessStack::serving(Launcher::StageBinaries, &spec)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Text-to-image, inpaint and ControlNet pose through the four services equal diffusers' PNGs (1 level).
async fn flows_match_diffusers(name: &str) {
    let dir = fixture(name);
    let stack = stack_on(&dir.join("snapshot")).await;
    let mut c = client(&stack.gateway_url()).await;

    let (settings, png) = reference_at(&dir.join("refs/t2i_40x48"));
    let r = generate(&mut c, t2i(settings))
        .await
        .unwrap_or_else(|e| panic!("{name} t2i: {e:?}"));
    assert_eq!((r.width_px, r.height_px), (40, 48));
    assert_close(&r.png[0], &png, &format!("{name} t2i_40x48"));

    let refs = dir.join("refs/inpaint_48x40");
    let (settings, png) = reference_at(&refs);
    let strength = serde_json::from_slice::<serde_json::Value>(&read(&refs.join("manifest.json")))
        .expect("manifest")["args"]["strength"]
        .as_f64();
    let req = InpaintRequest {
        settings: Some(settings),
        image: read(&refs.join("input_image.png")).into(),
        mask: read(&refs.join("input_mask.png")).into(),
        strength,
        paste_back: false,
    };
    let r = result_of(c.inpaint(req).await.expect("accepted").into_inner())
        .await
        .unwrap_or_else(|e| panic!("{name} inpaint: {e:?}"));
    assert_close(&r.png[0], &png, &format!("{name} inpaint_48x40"));

    let refs = dir.join("refs/controlnet_40x40");
    let (settings, png) = reference_at(&refs);
    let scale = serde_json::from_slice::<serde_json::Value>(&read(&refs.join("manifest.json")))
        .expect("manifest")["args"]["conditioning_scale"]
        .as_f64()
        .map(|v| v as f32);
    let req = PoseRequest {
        settings: Some(settings),
        pose: Some(pose_request::Pose::PoseImage(
            read(&refs.join("input_control.png")).into(),
        )),
        control: Some(ControlNetSettings {
            controlnet_id: "union".into(),
            conditioning_scale: scale,
            ..Default::default()
        }),
    };
    let r = result_of(c.pose(req).await.expect("accepted").into_inner())
        .await
        .unwrap_or_else(|e| panic!("{name} pose: {e:?}"));
    assert_close(&r.png[0], &png, &format!("{name} controlnet_40x40"));
}

#[tokio::test]
async fn three_level_vae_with_four_latent_channels_matches_diffusers() {
    flows_match_diffusers("random-8").await;
}

#[tokio::test]
async fn three_level_vae_with_eight_latent_channels_matches_diffusers() {
    flows_match_diffusers("random-16").await;
}

/// The text encoder of one snapshot (random-8: hidden size 16) with the denoiser and VAE of another (tiny:
/// joint_attention_dim 32): the gateway refuses the text encoder, stays NOT_SERVING, and a request gets
/// FAILED_PRECONDITION naming both stages and the field.
#[tokio::test]
async fn stages_of_two_snapshots_are_refused_with_the_field_named() {
    let spec = StackSpec {
        text_encoder_model: Some(fixture("random-8/snapshot")),
        denoiser_model: Some(snapshot()),
        vae_model: Some(snapshot()),
        ..StackSpec::default()
    };
    let stack = ProcessStack::start(Launcher::StageBinaries, &spec)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The stages themselves load and serve.
    for url in [
        stack.text_encoder.url(),
        stack.denoiser.url(),
        stack.vae.url(),
    ] {
        qwen_image_testkit::service::wait_serving(&url, "", GUARD)
            .await
            .expect("stage SERVING");
    }
    // The gateway describes the replicas on its own schedule: until it has, a request is UNAVAILABLE
    // ("retry in a few seconds"). Wait for its refusal of the text encoder, which it logs.
    stack
        .gateway
        .wait_log_line(
            0,
            |l| l.contains("does not fit the other stages") && l.contains("text-encoder"),
            GUARD,
        )
        .await
        .unwrap_or_else(|e| panic!("the gateway's refusal: {e}"));
    let mut c = client(&stack.gateway_url()).await;
    let (settings, _) = reference("t2i_64");
    let e = generate(&mut c, t2i(GenerationSettings { ..settings }))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let te = stack.text_encoder.url();
    let want = format!("text-encoder hidden size 16 ({te}), denoiser expects 32");
    assert!(e.message().contains(&want), "{}", e.message());
    assert_eq!(
        health(&stack.gateway_url(), "").await.expect("health"),
        ServingStatus::NotServing as i32
    );
}
