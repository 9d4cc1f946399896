//! Our resize and grayscale conversion against Pillow's outputs (tests/fixtures/imaging, made by
//! tools/imaging/make_pil_vectors.py): bit-exact.

use std::path::PathBuf;

use qwen_image_imaging::{Image8, convert, resize};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/imaging")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).expect("fixture")
}

#[test]
fn lanczos_resize_is_bit_exact_with_pillow() {
    let index: serde_json::Value = serde_json::from_slice(&read("index.json")).expect("index");
    let mut checked = 0;
    for case in index["cases"].as_array().expect("cases") {
        let n = |k: &str| case[k].as_u64().expect("size") as usize;
        match case["kind"].as_str() {
            Some("resize") => {
                let channels = if case["mode"] == "RGB" { 3 } else { 1 };
                let src = Image8::new(
                    n("w"),
                    n("h"),
                    channels,
                    read(case["in"].as_str().expect("in")),
                )
                .expect("src");
                let ours = resize::lanczos_resize(&src, n("new_w"), n("new_h")).expect("resize");
                let want = read(case["out"].as_str().expect("out"));
                let diff = ours.data.iter().zip(&want).filter(|(a, b)| a != b).count();
                assert_eq!(ours.data.len(), want.len());
                assert_eq!(diff, 0, "{case}: {diff} bytes differ");
                checked += 1;
            }
            Some("to_l") => {
                let src = Image8::new(n("w"), n("h"), 3, read(case["in"].as_str().expect("in")))
                    .expect("src");
                let ours = convert::rgb_to_l(&src).expect("convert");
                assert_eq!(
                    ours.data,
                    read(case["out"].as_str().expect("out")),
                    "{case}"
                );
                checked += 1;
            }
            other => panic!("unknown case kind {other:?}"),
        }
    }
    assert_eq!(checked, 6);
}

#[test]
fn same_size_resize_is_a_copy() {
    let src = Image8::new(3, 2, 1, vec![1, 2, 3, 4, 5, 6]).expect("src");
    assert_eq!(resize::lanczos_resize(&src, 3, 2).expect("resize"), src);
    assert!(resize::lanczos_resize(&src, 0, 2).is_err());
}
