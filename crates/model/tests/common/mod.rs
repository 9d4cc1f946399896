//! Helpers shared by the model crate's parity tests.
#![allow(clippy::unwrap_used, dead_code)] // test code: a failed unwrap is a failed test

use qwen_image_model::candle_core::{DType, Tensor};

/// max|a-b| / max|b|
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let max = |t: &Tensor| t.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    max(&(&a - &b).unwrap()) / max(&b).max(1e-12)
}

/// Relative L2 error `‖a − b‖ / ‖b‖`.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let sq = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (sq(&(&a - &b).unwrap()) / sq(&b).max(1e-30)).sqrt()
}

/// The values of an integer (or integral float) tensor, flattened.
pub fn ints(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
