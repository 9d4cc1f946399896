//! Bounded fuzzing of the wire tensor decoder: random dtypes, shapes (edge dimensions included) and data
//! lengths, and mutated copies of valid tensors, never panic; a decoded tensor always matches its shape
//! and holds only finite values within the magnitude bound.

use std::time::Duration;

use prost::Message;
use qwen_image_common::tensor::{self, MAX_ABS_VALUE};
use qwen_image_proto::v1::{DataType, Tensor};
use qwen_image_testkit::fuzz::{self, Rng};

const FLOATS: &[DataType] = &[
    DataType::F32,
    DataType::F16,
    DataType::Bf16,
    DataType::U8,
    DataType::I64,
];

fn check(t: &Tensor, rng: &mut Rng) {
    let ranks: &[usize] = [&[1usize, 2, 3, 4, 5][..], &[4, 5], &[3]][rng.below(3)];
    if let Ok(h) = tensor::to_f32(t, "t", FLOATS, ranks) {
        assert_eq!(h.data.len(), h.shape.iter().product::<usize>());
        assert!(
            h.data
                .iter()
                .all(|v| v.is_finite() && v.abs() <= MAX_ABS_VALUE)
        );
    }
    if let Ok(h) = tensor::to_u8(t, "t", ranks) {
        assert_eq!(h.data.len(), h.shape.iter().product::<usize>());
    }
}

#[test]
fn random_tensors_never_panic() {
    let cases = fuzz::run(11, Duration::from_secs(4), 50_000, |rng| {
        let rank = rng.below(7);
        let shape: Vec<u64> = (0..rank)
            .map(|_| {
                if rng.below(4) == 0 {
                    rng.edge_u64()
                } else {
                    rng.below(6) as u64
                }
            })
            .collect();
        let elements: u64 = shape.iter().fold(1u64, |a, &d| a.saturating_mul(d));
        let size = [1usize, 2, 4, 8][rng.below(4)];
        let len = if elements <= 4096 && rng.below(3) > 0 {
            elements as usize * size
        } else {
            rng.below(256)
        };
        let t = Tensor {
            dtype: [0, 1, 2, 3, 4, 5, 6, 7, -1, i32::MAX][rng.below(10)],
            shape,
            data: rng.bytes(len).into(),
        };
        check(&t, rng);
    });
    assert!(cases > 100, "only {cases} cases ran");
}

#[test]
fn mutated_encoded_tensors_never_panic() {
    let valid = tensor::from_f32(&[1, 16, 2, 2], &[0.25; 64]).encode_to_vec();
    let cases = fuzz::run(12, Duration::from_secs(3), 50_000, |rng| {
        let bytes = rng.mutate(&valid);
        if let Ok(t) = Tensor::decode(bytes.as_slice()) {
            check(&t, rng);
        }
    });
    assert!(cases > 100, "only {cases} cases ran");
}
