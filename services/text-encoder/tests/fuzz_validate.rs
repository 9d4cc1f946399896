//! Bounded fuzzing of the Encode request validator: mutated encodings of a valid request (prompts with
//! multi-byte characters) never panic.

use std::time::Duration;

use qwen_image_proto::v1::EncodeRequest;
use qwen_image_testkit::fuzz;
use qwen_image_text_encoder::validate::validate;

#[test]
fn mutated_encode_requests_never_panic() {
    let seed = EncodeRequest {
        prompts: vec!["a cat on a mat".into(), "一只猫 🐈".into()],
        max_sequence_length: 512,
        ..Default::default()
    };
    let cases = fuzz::run(61, Duration::from_secs(3), 20_000, |rng| {
        if let Some(r) = fuzz::mutated(rng, &seed)
            && let Ok(inputs) = validate(&r)
        {
            assert!(!inputs.prompts.is_empty());
            assert!(inputs.max_sequence_length <= 1024);
        }
    });
    assert!(cases > 100, "only {cases} cases ran");
}
