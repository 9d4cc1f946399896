//! The bicubic resize against torchvision's (tests/fixtures/imaging_bicubic, made by
//! tools/imaging/make_bicubic_vectors.py: `tvF.resize(uint8, BICUBIC, antialias=True)` as Qwen2VLImageProcessor
//! calls it): byte-exact.

use std::path::PathBuf;

use qwen_image_imaging::Image8;
use qwen_image_imaging::bicubic::bicubic_resize;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/imaging_bicubic")
}

#[test]
fn bicubic_matches_torchvision_exactly() {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("index.json")).expect("index.json"))
            .expect("json");
    let cases = index["cases"].as_array().expect("cases");
    assert!(cases.len() >= 6);
    for case in cases {
        let n = |k: &str| case[k].as_u64().expect("size") as usize;
        let read =
            |k: &str| std::fs::read(dir().join(case[k].as_str().expect("name"))).expect("bin");
        let src = Image8::new(n("w"), n("h"), 3, read("in")).expect("input");
        let want = read("out");
        let got = bicubic_resize(&src, n("new_w"), n("new_h")).expect("resize");
        assert_eq!((got.width, got.height), (n("new_w"), n("new_h")));
        let diff = got.data.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{case}: {diff} of {} bytes differ", want.len());
    }
}
