//! Bounded fuzzing of the OpenPose keypoints parser: mutated copies of a real pose file and JSON with
//! extreme numbers never panic, and whatever parses respects the canvas bound (no unbounded allocation).

use std::time::Duration;

use qwen_image_imaging::openpose::parse_openpose_json;
use qwen_image_testkit::fuzz;

const EXAMPLE: &str = include_str!("../../../docs/pose-example.json");
/// `MAX_CANVAS` of the parser.
const MAX_CANVAS: usize = 16384;

fn check(text: &str, default_size: Option<(usize, usize)>) {
    if let Ok(p) = parse_openpose_json(text, default_size) {
        assert!(p.canvas_width <= MAX_CANVAS && p.canvas_height <= MAX_CANVAS);
    }
}

#[test]
fn mutated_pose_files_never_panic() {
    let cases = fuzz::run(1, Duration::from_secs(5), 20_000, |rng| {
        let bytes = rng.mutate(EXAMPLE.as_bytes());
        let text = String::from_utf8_lossy(&bytes);
        check(&text, None);
        check(&text, Some((512, 768)));
    });
    assert!(cases > 100, "only {cases} cases ran");
}

#[test]
fn extreme_numbers_never_panic() {
    const NUMBERS: [&str; 12] = [
        "0",
        "-0",
        "1e308",
        "-1e308",
        "1e-320",
        "4294967296",
        "18446744073709551616",
        "-1",
        "0.5",
        "16384",
        "16385",
        "1.0000000000000002",
    ];
    let cases = fuzz::run(2, Duration::from_secs(3), 5_000, |rng| {
        let mut pick = || NUMBERS[rng.below(NUMBERS.len())];
        let points: Vec<&str> = (0..54).map(|_| pick()).collect();
        let text = format!(
            r#"{{"canvas_width": {}, "canvas_height": {}, "people": [{{"pose_keypoints_2d": [{}], "hand_left_keypoints_2d": [{}]}}]}}"#,
            pick(),
            pick(),
            points.join(","),
            points[..9].join(",")
        );
        check(&text, None);
    });
    assert!(cases > 100, "only {cases} cases ran");
}
