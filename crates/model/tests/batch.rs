//! Continuous batching at the model level: one transformer pass over several requests (each its own
//! latents, timestep, prompt length, mask and true-CFG scale) gives each the velocity it gets alone.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use qwen_image_model::batch::{BatchItem, predict_batch};
use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::denoise::{Conditioning, predict};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::transformer::{QwenImageTransformer, TransformerConfig};

use common::rel_err;

const SNAPSHOT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tiny/snapshot"
);

fn transformer() -> QwenImageTransformer {
    let s = Snapshot::open(SNAPSHOT).unwrap();
    let cfg: TransformerConfig = s.config("transformer", "config.json").unwrap();
    QwenImageTransformer::new(
        &cfg,
        s.weights("transformer", DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap()
}

/// Deterministic pseudo-random values in [-1, 1) (a small LCG: no RNG dependency).
fn values(seed: u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn prompt(seed: u64, len: usize, valid: Option<usize>) -> Conditioning {
    let mask = valid.map(|v| {
        let m: Vec<f32> = (0..len).map(|i| if i < v { 1.0 } else { 0.0 }).collect();
        Tensor::from_vec(m, (1, len), &Device::Cpu).unwrap()
    });
    Conditioning {
        embeds: values(seed, &[1, len, 32]),
        mask,
    }
}

/// One request of a batch test: latents, `t`, positive and negative prompts, CFG scale.
struct Request {
    latents: Tensor,
    t: f32,
    positive: Conditioning,
    negative: Conditioning,
    scale: f64,
}

/// `(latents seed, t, positive len, its valid tokens when masked, negative len, CFG scale)`.
type Spec = (u64, f32, usize, Option<usize>, usize, f64);

/// Requests from their [`Spec`]s.
fn requests(specs: &[Spec]) -> Vec<Request> {
    specs
        .iter()
        .map(|&(seed, t, lp, mask, ln, scale)| Request {
            latents: values(seed, &[1, 16, 64]),
            t,
            positive: prompt(seed + 10, lp, mask),
            negative: prompt(seed + 20, ln, None),
            scale,
        })
        .collect()
}

fn items(requests: &[Request]) -> Vec<BatchItem<'_>> {
    requests
        .iter()
        .map(|r| BatchItem {
            latents: &r.latents,
            t_model: r.t,
            positive: &r.positive,
            negative: Some(&r.negative),
            true_cfg_scale: r.scale,
        })
        .collect()
}

/// Checks each batched velocity against the request's pass alone (run by `alone`), within 1e-5 relative,
/// and that the check can fail (two requests' velocities differ).
fn assert_each_as_alone(
    items: &[BatchItem],
    batched: &[Tensor],
    alone: impl Fn(&BatchItem) -> Tensor,
) {
    assert_eq!(batched.len(), items.len());
    for (i, (item, got)) in items.iter().zip(batched).enumerate() {
        let err = rel_err(got, &alone(item));
        eprintln!("request {i}: relative difference {err:e}");
        assert!(
            err <= 1e-5,
            "request {i}: batched differs from alone by {err:e}"
        );
    }
    assert!(rel_err(&batched[0], &batched[1]) > 1e-2);
}

fn predict_alone(model: &QwenImageTransformer, item: &BatchItem) -> Tensor {
    predict(
        model,
        item.latents,
        item.t_model,
        item.positive,
        item.negative,
        item.true_cfg_scale,
        &[(1, 4, 4)],
        &[],
    )
    .unwrap()
}

#[test]
fn a_batched_pass_gives_each_request_its_velocity_alone() {
    let model = transformer();
    let requests = requests(&[
        (1, 1.0, 7, None, 3, 4.0),
        (2, 0.55, 12, Some(9), 5, 2.5),
        (3, 0.2, 4, None, 4, 1.0), // scale 1: no CFG
        (4, 0.8, 20, None, 11, 6.0),
    ]);
    let items = items(&requests);
    let batched = predict_batch(&model, &items, &[(1, 4, 4)]).unwrap();
    assert_each_as_alone(&items, &batched, |item| predict_alone(&model, item));
}

/// A pass over an even batch on a CPU pool of two threads runs half the rows on each thread
/// (`cpu_kernels::on_own_threads`); on one thread it runs whole. The rows are independent, so both give the
/// same numbers: each thread's GEMMs and attention see the same rows in the same order.
#[test]
fn a_pass_split_across_threads_equals_the_pass_on_one_thread() {
    use qwen_image_model::transformer::TransformerInputs;
    let model = transformer();
    let (b, len) = (4, 9);
    let hidden = values(1, &[b, 16, 64]);
    let text = values(2, &[b, len, 32]);
    // rows with 9, 6, 9 and 3 valid tokens: padding and masks as a batch of prompts
    let mask: Vec<f32> = [9, 6, 9, 3]
        .iter()
        .flat_map(|&v| (0..len).map(move |i| if i < v { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (b, len), &Device::Cpu).unwrap();
    let t = Tensor::new(&[1.0f32, 0.7, 0.4, 0.1], &Device::Cpu).unwrap();
    let pass = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            model.forward(&TransformerInputs {
                hidden_states: &hidden,
                encoder_hidden_states: &text,
                encoder_mask: Some(&mask),
                timestep: &t,
                img_shapes: &[(1, 4, 4)],
                controlnet_residuals: &[],
            })
        })
        .unwrap()
    };
    let (one, two) = (pass(1), pass(2));
    assert_eq!(one.dims(), [b, 16, 64]);
    let diff = (&one - &two)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    eprintln!("largest difference between one and two threads: {diff:e}");
    assert!(diff == 0.0, "split pass differs by {diff:e}");
    // the rows differ from each other, so a pass that mixed them up would fail the check
    let rows = one.chunk(b, 0).unwrap();
    assert!(rel_err(&rows[0], &rows[1]) > 1e-2);
}

/// With true CFG on every item the batch is all positive rows, then all negative rows; on two CPU threads
/// each half runs on its own thread without the text padding none of its rows needs (the negative prompts
/// here are shorter than every positive one). Each request still gets its velocity alone.
#[test]
fn a_batch_split_across_threads_gives_each_request_its_velocity_alone() {
    let model = transformer();
    let requests = requests(&[
        (5, 1.0, 14, None, 3, 4.0),
        (6, 0.6, 9, None, 2, 3.0),
        (7, 0.3, 17, None, 5, 5.0),
        (8, 0.1, 11, None, 4, 2.0),
    ]);
    let items = items(&requests);
    let pool = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    };
    let batched = pool(2).install(|| predict_batch(&model, &items, &[(1, 4, 4)]).unwrap());
    let one_thread = pool(1);
    assert_each_as_alone(&items, &batched, |item| {
        one_thread.install(|| predict_alone(&model, item))
    });
}

/// Text positions that are padding in every row change nothing but rounding: the pass drops them (their
/// keys are masked and their outputs unused).
#[test]
fn text_padding_in_every_row_changes_nothing() {
    use qwen_image_model::transformer::TransformerInputs;
    let model = transformer();
    let (b, len, pad) = (2, 6, 5);
    let hidden = values(3, &[b, 16, 64]);
    let text = values(4, &[b, len, 32]);
    // the same text with `pad` more positions of other values, masked out in both rows
    let padded = Tensor::cat(&[&text, &values(9, &[b, pad, 32])], 1).unwrap();
    let mask = |valid: usize, total: usize| {
        let m: Vec<f32> = (0..b)
            .flat_map(|r| (0..total).map(move |i| if i < valid - r { 1.0 } else { 0.0 }))
            .collect();
        Tensor::from_vec(m, (b, total), &Device::Cpu).unwrap()
    };
    let t = Tensor::new(&[0.9f32, 0.3], &Device::Cpu).unwrap();
    let pass = |text: &Tensor, mask: &Tensor| {
        model
            .forward(&TransformerInputs {
                hidden_states: &hidden,
                encoder_hidden_states: text,
                encoder_mask: Some(mask),
                timestep: &t,
                img_shapes: &[(1, 4, 4)],
                controlnet_residuals: &[],
            })
            .unwrap()
    };
    let short = pass(&text, &mask(len, len));
    let long = pass(&padded, &mask(len, len + pad));
    let err = rel_err(&long, &short);
    eprintln!("padded vs unpadded: relative difference {err:e}");
    assert!(err <= 1e-6, "padding changed the output by {err:e}");
    // the mask matters: unmasking the padding changes the output
    let unmasked = pass(&padded, &mask(len + pad, len + pad));
    assert!(rel_err(&unmasked, &short) > 1e-3);
}
