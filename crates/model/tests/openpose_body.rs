//! Parity with controlnet-aux 0.0.10's OpenPose body estimator (`open_pose/body.py`, `model.py`) on the fixtures of
//! tools/openpose/make_body_fixtures.py (tests/fixtures/openpose_body): the network on deterministic random weights
//! (heat maps and PAFs within 1e-4 relative), the resize/pad it is fed (exact), the averaged full-size heat maps
//! (1e-4 relative), and `Body.__call__`'s peaks and people (same people, keypoints within 0.5 px) — with the random
//! network and with synthetic network outputs drawn from each picture's true keypoints.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::rel_err;
use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::openpose::body::{
    self, BodyEstimate, estimate_from_maps, multipliers, prepare,
};
use qwen_image_model::openpose::random::{BodyNetShape, random_body_weights};
use qwen_image_model::openpose::{BodyPoseNet, detect_people, people_from_estimate};

const SEED: u64 = 22; // make_body_fixtures.py SEED
const CASES: [&str; 4] = ["one", "two", "offcanvas", "none"];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/openpose_body")
}

fn fixture(name: &str) -> HashMap<String, Tensor> {
    candle_core_load(&dir().join(format!("{name}.safetensors")))
}

fn candle_core_load(p: &Path) -> HashMap<String, Tensor> {
    qwen_image_model::candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

/// The random network, written to a safetensors file and loaded back through the loader (once per test binary).
fn net() -> &'static BodyPoseNet {
    static NET: OnceLock<BodyPoseNet> = OnceLock::new();
    NET.get_or_init(|| {
        let weights = random_body_weights(&BodyNetShape::CONTROLNET_AUX, SEED).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("body_pose_model.safetensors");
        qwen_image_model::candle_core::safetensors::save(&weights, &path).unwrap();
        BodyPoseNet::load(&path, &Device::Cpu).unwrap()
    })
}

fn read_rgb(name: &str) -> (usize, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(dir().join(format!("{name}.png"))).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

fn bgr(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect()
}

fn rows<const N: usize>(t: &Tensor) -> Vec<[f64; N]> {
    let v: Vec<f64> = t
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    v.chunks_exact(N).map(|c| c.try_into().unwrap()).collect()
}

/// Same people with the same parts, every keypoint within 0.5 px, same peaks.
fn assert_same_estimate(what: &str, got: &BodyEstimate, want: &HashMap<String, Tensor>) {
    let cand: Vec<[f64; 4]> = rows(&want["candidate"]);
    let subset: Vec<[f64; 20]> = rows(&want["subset"]);
    assert_eq!(got.candidate.len(), cand.len(), "{what}: number of peaks");
    for (g, w) in got.candidate.iter().zip(&cand) {
        assert!(
            (g[0] - w[0]).abs() <= 0.5 && (g[1] - w[1]).abs() <= 0.5,
            "{what}: peak {g:?} vs {w:?}"
        );
        assert!(
            (g[2] - w[2]).abs() <= 1e-4 * w[2].abs().max(1e-3),
            "{what}: peak score {g:?} vs {w:?}"
        );
        assert_eq!(g[3], w[3], "{what}: peak id");
    }
    assert_eq!(got.subset.len(), subset.len(), "{what}: number of people");
    for (p, (g, w)) in got.subset.iter().zip(&subset).enumerate() {
        assert_eq!(g[..18], w[..18], "{what}: person {p}'s parts");
        assert_eq!(g[19], w[19], "{what}: person {p}'s part count");
        assert!(
            (g[18] - w[18]).abs() <= 1e-4 * w[18].abs().max(1.0),
            "{what}: person {p}'s score"
        );
    }
}

#[test]
fn the_network_matches_bodypose_model_on_random_weights() {
    let f = fixture("net");
    let (paf, heat) = net().forward(&f["input"]).unwrap();
    let (ep, eh) = (rel_err(&paf, &f["paf"]), rel_err(&heat, &f["heat"]));
    println!("net: paf {ep:.2e}, heat {eh:.2e}");
    assert!(ep <= 1e-4 && eh <= 1e-4, "paf {ep:e} / heat {eh:e} > 1e-4");
}

#[test]
fn body_call_matches_controlnet_aux_end_to_end_with_the_random_network() {
    for name in CASES {
        let f = fixture(name);
        let (w, h, rgb) = read_rgb(name);
        let pix = bgr(&rgb);
        // the resized + padded picture the network sees (cv2 LANCZOS4 / AREA on 8-bit)
        let m = multipliers(h);
        assert_eq!(m.len(), 1);
        let p = prepare(&pix, h, w, m[0]).unwrap();
        let want = f["padded"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(f["padded"].dims(), [p.hp, p.wp, 3], "{name}: padded size");
        let off = p.padded.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            off,
            0,
            "{name}: {off} of {} padded values differ",
            want.len()
        );
        // the network on it (on the two pictures whose resizes go opposite ways, to keep the test short; the
        // others continue from controlnet-aux's own network outputs)
        let (paf, heat, ep, eh) = if name == "one" || name == "none" {
            let (paf, heat) = net().forward(&p.to_tensor(&Device::Cpu).unwrap()).unwrap();
            let (ep, eh) = (rel_err(&paf, &f["paf"]), rel_err(&heat, &f["heat"]));
            assert!(
                ep <= 1e-4 && eh <= 1e-4,
                "{name}: paf {ep:e} / heat {eh:e} > 1e-4"
            );
            (paf, heat, ep, eh)
        } else {
            (f["paf"].clone(), f["heat"].clone(), 0.0, 0.0)
        };
        // the averaged full-size heat maps (every 5th row and column)
        let maps = body::body_maps(&pix, h, w, |_| Ok((paf.clone(), heat.clone()))).unwrap();
        let sub: Vec<f32> = (0..h)
            .step_by(5)
            .flat_map(|y| (0..w).step_by(5).map(move |x| (y, x)))
            .flat_map(|(y, x)| (0..18).map(move |c| (y, x, c)))
            .map(|(y, x, c)| maps.heat[(y * w + x) * 19 + c] as f32)
            .collect();
        let sub = Tensor::from_vec(sub, f["heat_avg"].dims(), &Device::Cpu).unwrap();
        let ea = rel_err(&sub, &f["heat_avg"]);
        assert!(ea <= 1e-4, "{name}: averaged heat maps {ea:e} > 1e-4");
        let est = estimate_from_maps(&maps);
        println!(
            "{name}: net paf {ep:.2e} heat {eh:.2e}, maps {ea:.2e}, {} peaks, {} people",
            est.candidate.len(),
            est.subset.len()
        );
        assert_same_estimate(name, &est, &f);
    }
}

#[test]
fn people_are_assembled_as_controlnet_aux_does_from_synthetic_network_outputs() {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap())
            .unwrap();
    for name in CASES {
        let f = fixture(&format!("synth_{name}"));
        let (w, h, rgb) = read_rgb(name);
        let (paf, heat) = (
            f["paf"].to_dtype(DType::F32).unwrap(),
            f["heat"].to_dtype(DType::F32).unwrap(),
        );
        let maps = body::body_maps(&bgr(&rgb), h, w, |_| Ok((paf.clone(), heat.clone()))).unwrap();
        let est = estimate_from_maps(&maps);
        assert_same_estimate(&format!("synth_{name}"), &est, &f);
        // and the people are where the picture has them (within 3 px of the true joints; a joint near the border is pulled inwards)
        let case = manifest["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap();
        let truth = case["people"].as_array().unwrap();
        let people = people_from_estimate(&est);
        assert_eq!(people.len(), truth.len(), "{name}: people found");
        for person in &people {
            let found = person.body.iter().flatten().count();
            assert!(found >= 4, "{name}: a person with {found} parts");
            let near = truth.iter().any(|t| {
                person.body.iter().enumerate().all(|(j, kp)| match kp {
                    None => true,
                    Some((x, y)) => {
                        let tx = t[j][0].as_f64().unwrap();
                        let ty = t[j][1].as_f64().unwrap();
                        (*x as f64 - tx).hypot(*y as f64 - ty) <= 3.0
                    }
                })
            });
            assert!(near, "{name}: {person:?} is not one of the true people");
        }
        println!(
            "{name}: {} people, parts {:?}",
            people.len(),
            est.subset.iter().map(|r| r[19]).collect::<Vec<_>>()
        );
    }
}

#[test]
fn detect_people_flips_rgb_to_bgr_as_detect_poses_does() {
    // the public entry point on the `none` picture: the RGB → BGR flip gives the same estimate as the fixture
    let (w, h, rgb) = read_rgb("none");
    let pose = detect_people(net(), &rgb, w, h, &Device::Cpu).unwrap();
    assert_eq!((pose.canvas_width, pose.canvas_height), (w, h));
    let want: Vec<[f64; 20]> = rows(&fixture("none")["subset"]);
    assert_eq!(pose.people.len(), want.len());
    assert!(
        detect_people(net(), &rgb[1..], w, h, &Device::Cpu).is_err(),
        "a short buffer is an error"
    );
}
