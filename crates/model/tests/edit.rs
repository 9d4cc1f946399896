//! Instruction editing (Qwen-Image-Edit-2509 / -2511) against diffusers' `QwenImageEditPlusPipeline` dumps
//! (tests/fixtures/edit-tiny, made by tools/refharness/ref_edit.py via tools/make_fixtures.sh): processor output,
//! vision tower, 3-D positions, prompt embeddings, reference latents, the transformer at step 0, final latents and
//! the decoded picture, for one and two pictures, with and without `zero_cond_t`; the picture sizes diffusers
//! derives at the real constants; bad pictures and prompts.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{ints, rel_err};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use qwen_image_imaging::Image8;
use qwen_image_imaging::edit_sizes::{condition_size, default_output_size, vae_size};
use qwen_image_model::candle_core::{DType, Device, Tensor};
use qwen_image_model::denoise::{
    Conditioning, DenoiseParams, Flow, Outcome, denoise_with_references,
};
use qwen_image_model::edit::{ReferenceLatents, encode_references, vae_pictures};
use qwen_image_model::edit_prompt::{
    EDIT_TEMPLATE_DROP_IDX, EditPromptEncoder, PositionMode, condition_images,
};
use qwen_image_model::latents::unpack;
use qwen_image_model::scheduler::{Schedule, SchedulerConfig};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::transformer::{QwenImageTransformer, TransformerConfig, TransformerInputs};
use qwen_image_model::vae::{AutoencoderKLQwenImage, to_rgb8};
use qwen_image_model::vision::processor::smart_resize;

const TOL: f64 = 1e-4;
const TOL_FINAL: f64 = 1e-3;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/edit-tiny")
}

struct Ref {
    dir: PathBuf,
    manifest: serde_json::Value,
    tensors: HashMap<String, Tensor>,
}

impl Ref {
    fn load(name: &str) -> Self {
        let dir = root().join("refs").join(name);
        let manifest =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap())
                .unwrap();
        let tensors = qwen_image_model::candle_core::safetensors::load(
            dir.join("tensors.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        Self {
            dir,
            manifest,
            tensors,
        }
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn t(&self, name: &str) -> Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: no tensor {name}", self.dir.display()))
            .clone()
    }

    fn f(&self, name: &str) -> Tensor {
        self.t(name).to_dtype(DType::F32).unwrap()
    }

    fn scalar(&self, key: &str) -> &serde_json::Value {
        &self.manifest["scalars"][key]
    }

    fn snapshot(&self) -> PathBuf {
        if self.scalar("zero_cond_t").as_bool().unwrap() {
            root().join("snapshot-2511")
        } else {
            root().join("snapshot")
        }
    }

    fn pictures(&self) -> Vec<Image8> {
        let n = self.scalar("input_sizes").as_array().unwrap().len();
        (0..n)
            .map(|k| read_png(&self.dir.join(format!("input_{k}.png"))))
            .collect()
    }

    fn area(&self, key: &str) -> u64 {
        self.scalar(key).as_u64().unwrap()
    }

    fn has_negative(&self) -> bool {
        !self.scalar("negative_prompt").is_null()
    }
}

fn read_png(path: &Path) -> Image8 {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    buf.truncate(info.buffer_size());
    Image8::new(info.width as usize, info.height as usize, 3, buf).unwrap()
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> f64 {
    let r = rel_err(a, b);
    assert!(r <= tol, "{what}: relative error {r:e} > {tol:e}");
    println!("{what}: relative error {r:.2e}");
    r
}

fn encoder(snapshot: &Path, positions: PositionMode) -> EditPromptEncoder {
    EditPromptEncoder::load(&Snapshot::open(snapshot).unwrap(), DType::F32, &Device::Cpu)
        .unwrap()
        .with_positions(positions)
}

fn positions_of(r: &Ref) -> PositionMode {
    match r.scalar("positions").as_str().unwrap() {
        "mrope" => PositionMode::Multimodal,
        _ => PositionMode::Sequential,
    }
}

/// Processor, vision tower, positions and prompt embeddings of one reference.
fn check_prompt_side(name: &str) {
    let r = Ref::load(name);
    let enc = encoder(&r.snapshot(), positions_of(&r));
    let cond = condition_images(&r.pictures(), r.area("condition_area")).unwrap();
    let sizes: Vec<Vec<usize>> =
        serde_json::from_value(r.scalar("condition_sizes").clone()).unwrap();
    let ours: Vec<Vec<usize>> = cond.iter().map(|p| vec![p.width, p.height]).collect();
    assert_eq!(ours, sizes, "{name}: condition sizes");

    let prompts = [
        r.scalar("prompt").as_str().unwrap().to_string(),
        r.scalar("negative_prompt")
            .as_str()
            .unwrap_or_default()
            .to_string(),
    ];
    let calls = if r.has_negative() { 2 } else { 1 };
    for (k, prompt) in prompts.iter().enumerate().take(calls) {
        let parts = enc.encode_parts(prompt, &cond).unwrap();
        let grids: Vec<i64> = parts
            .pixels
            .grids
            .iter()
            .flat_map(|&(t, h, w)| [t as i64, h as i64, w as i64])
            .collect();
        assert_eq!(
            grids,
            ints(&r.t("processor.0.image_grid_thw")),
            "{name}: grids"
        );
        assert_eq!(
            parts
                .input_ids
                .iter()
                .map(|&i| i64::from(i))
                .collect::<Vec<_>>(),
            ints(&r.t(&format!("processor.{k}.input_ids"))),
            "{name}: input ids of call {k}"
        );
        if k == 0 && r.has("processor.0.pixel_values") {
            let rows: Vec<u32> = ints(&r.t("processor.0.pixel_rows"))
                .into_iter()
                .map(|v| v as u32)
                .collect();
            let n = rows.len();
            let ours = parts
                .pixels
                .pixel_values
                .index_select(&Tensor::from_vec(rows, n, &Device::Cpu).unwrap(), 0)
                .unwrap();
            let d = (&ours - &r.f("processor.0.pixel_values"))
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d <= 1e-6, "{name}: pixel_values differ by {d}");
        }
        assert_close(
            &format!("{name}: vision tower (call {k})"),
            &parts.vision,
            &r.f(&format!("te.{k}.vision.pooler_output")),
            TOL,
        );
        match &parts.positions {
            Some(p) => {
                let want = ints(&r.t(&format!("te.{k}.position_ids"))); // [3, 1, L]
                let l = p.len();
                for axis in 0..3 {
                    let got: Vec<i64> = p.iter().map(|q| i64::from(q[axis])).collect();
                    assert_eq!(
                        got,
                        want[axis * l..(axis + 1) * l],
                        "{name}: positions axis {axis}"
                    );
                }
            }
            None => assert!(
                r.scalar(&format!("te.{k}.position_ids_is_none"))
                    .as_bool()
                    .unwrap(),
                "{name}: diffusers passed positions"
            ),
        }
        assert_close(
            &format!("{name}: hidden_states[-1] (call {k})"),
            &parts.hidden,
            &r.f(&format!("te.{k}.hidden_states_last")),
            TOL,
        );
        let e = enc.encode(prompt, &cond).unwrap();
        let key = if k == 0 {
            "prompt_embeds"
        } else {
            "negative_prompt_embeds"
        };
        assert_close(&format!("{name}: {key}"), &e.embeds, &r.f(key), TOL);
        assert!(e.mask_all_ones);
        assert!(r.scalar(&format!("{key}_mask_is_none")).as_bool().unwrap());
        assert_eq!(
            e.token_counts,
            vec![parts.input_ids.len() - EDIT_TEMPLATE_DROP_IDX]
        );
        let counted = enc
            .token_count(
                prompt,
                &cond.iter().map(|p| (p.width, p.height)).collect::<Vec<_>>(),
            )
            .unwrap();
        assert_eq!(counted, e.token_counts[0]);
    }
}

#[test]
fn prompt_one_picture() {
    check_prompt_side("edit1_64");
}

#[test]
fn prompt_two_pictures() {
    check_prompt_side("edit2_64x48");
}

#[test]
fn prompt_real_condition_area() {
    // CONDITION_IMAGE_SIZE = 384*384: a 4:3 picture becomes 448x320, then 448x308 in the processor
    check_prompt_side("edit1_cond384");
}

#[test]
fn prompt_sequential_positions_as_diffusers_0_42() {
    check_prompt_side("edit1_seq");
    // the two position modes really differ (on the same inputs, the 3-D positions change the embeddings)
    let seq = Ref::load("edit1_seq");
    let mrope = Ref::load("edit1_64");
    assert_eq!(
        ints(&seq.t("te.0.input_ids")),
        ints(&mrope.t("te.0.input_ids"))
    );
    let r = rel_err(&seq.f("prompt_embeds"), &mrope.f("prompt_embeds"));
    assert!(
        r > 10.0 * TOL,
        "position modes give the same embeddings ({r:e})"
    );
}

struct Pipeline {
    transformer: QwenImageTransformer,
    vae: AutoencoderKLQwenImage,
    scheduler: SchedulerConfig,
}

fn pipeline(snapshot: &Path) -> Pipeline {
    let s = Snapshot::open(snapshot).unwrap();
    let cfg: TransformerConfig = s.config("transformer", "config.json").unwrap();
    let vb = s.weights("transformer", DType::F32, &Device::Cpu).unwrap();
    Pipeline {
        transformer: QwenImageTransformer::new(&cfg, vb).unwrap(),
        vae: AutoencoderKLQwenImage::load(&s, DType::F32, &Device::Cpu).unwrap(),
        scheduler: s.config("scheduler", "scheduler_config.json").unwrap(),
    }
}

fn img_shapes(r: &Ref) -> Vec<(usize, usize, usize)> {
    let v: Vec<Vec<Vec<usize>>> =
        serde_json::from_value(r.scalar("step.0.transformer.cond.img_shapes").clone()).unwrap();
    v[0].iter().map(|s| (s[0], s[1], s[2])).collect()
}

/// Reference latents, the transformer at step 0, the whole denoise and the decoded picture of one reference.
fn check_denoise_side(name: &str) {
    let r = Ref::load(name);
    let p = pipeline(&r.snapshot());
    assert_eq!(
        p.transformer.config().zero_cond_t,
        r.scalar("zero_cond_t").as_bool().unwrap(),
        "{name}: zero_cond_t read from the transformer config"
    );
    let scale = p.vae.config().scale_factor();
    let vae_in = vae_pictures(&r.pictures(), r.area("vae_area"), scale).unwrap();
    let sizes: Vec<Vec<usize>> = serde_json::from_value(r.scalar("vae_sizes").clone()).unwrap();
    assert_eq!(
        vae_in
            .iter()
            .map(|p| vec![p.width, p.height])
            .collect::<Vec<_>>(),
        sizes
    );
    let refs = encode_references(&p.vae, &vae_in, &Device::Cpu).unwrap();
    assert_close(
        &format!("{name}: image latents"),
        &refs.latents,
        &r.f("image_latents_packed"),
        TOL,
    );
    let shapes = img_shapes(&r);
    assert_eq!(
        &shapes[1..],
        refs.shapes.as_slice(),
        "{name}: reference img_shapes"
    );

    // conditioning from our own encoder (checked against diffusers in the prompt tests)
    let enc = encoder(&r.snapshot(), positions_of(&r));
    let cond = condition_images(&r.pictures(), r.area("condition_area")).unwrap();
    let pos = enc
        .encode(r.scalar("prompt").as_str().unwrap(), &cond)
        .unwrap();
    let positive = Conditioning {
        embeds: pos.embeds,
        mask: None,
    };
    let negative = r.scalar("negative_prompt").as_str().map(|n| {
        let e = enc.encode(n, &cond).unwrap();
        Conditioning {
            embeds: e.embeds,
            mask: None,
        }
    });
    let cfg_scale = r.manifest["args"]["true_cfg_scale"].as_f64().unwrap();

    // step 0, conditional branch, noise + reference tokens
    let noise = r.f("latents_init_packed");
    let s = noise.dim(1).unwrap();
    let t0 = r.f("step.0.transformer.cond.timestep");
    let x = Tensor::cat(&[&noise, &refs.latents], 1).unwrap();
    let out = p
        .transformer
        .forward(&TransformerInputs {
            hidden_states: &x,
            encoder_hidden_states: &positive.embeds,
            encoder_mask: None,
            timestep: &t0,
            img_shapes: &shapes,
            controlnet_residuals: &[],
        })
        .unwrap();
    if r.has("step.0.transformer.cond.out") {
        assert_close(
            &format!("{name}: transformer step 0"),
            &out,
            &r.f("step.0.transformer.cond.out"),
            TOL,
        );
    }

    // the whole denoise from the reference's noise
    let steps = r.manifest["args"]["steps"].as_u64().unwrap() as usize;
    // mu from the noise tokens alone (the pipeline's `latents.shape[1]`)
    let schedule = Schedule::for_pipeline(&p.scheduler, steps, s).unwrap();
    let mu = r.scalar("scheduler_set_timesteps_kwargs")["mu"]
        .as_f64()
        .unwrap();
    assert!((schedule.mu.unwrap() - mu).abs() < 1e-12, "{name}: mu");
    assert_close(
        &format!("{name}: sigmas"),
        &Tensor::new(schedule.sigmas.as_slice(), &Device::Cpu).unwrap(),
        &r.f("sched.sigmas"),
        1e-6,
    );
    let params = DenoiseParams {
        positive: &positive,
        negative: negative.as_ref(),
        true_cfg_scale: cfg_scale,
        latents: noise.clone(),
        img_shapes: &shapes[..1],
        schedule: &schedule,
        start_step: 0,
        inpaint: None,
        controlnet: &[],
    };
    let mut first_v = None;
    let outcome = denoise_with_references(&p.transformer, &params, Some(&refs), |info| {
        if info.done == 0 {
            first_v = Some(info.noise_pred.clone());
        }
        Flow::Continue
    })
    .unwrap();
    let Outcome::Finished(latents) = outcome else {
        panic!("stopped")
    };
    assert_close(
        &format!("{name}: step 0 velocity"),
        first_v.as_ref().unwrap(),
        &r.f("step.0.noise_pred"),
        TOL,
    );
    assert_close(
        &format!("{name}: final latents"),
        &latents,
        &r.f("latents_final_packed"),
        TOL_FINAL,
    );

    // decode
    let out_size: Vec<usize> = serde_json::from_value(r.scalar("output_size").clone()).unwrap();
    let (w, h) = (out_size[0], out_size[1]);
    let z = p
        .vae
        .denormalize(&unpack(&latents, h / scale, w / scale).unwrap())
        .unwrap();
    let image = p.vae.decode(&z).unwrap();
    let ours = &to_rgb8(&image).unwrap()[0];
    let want: Vec<i64> = ints(&r.t("image_uint8"));
    let worst = ours
        .iter()
        .zip(&want)
        .map(|(&a, &b)| (i64::from(a) - b).abs())
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "{name}: decoded picture differs by {worst} levels"
    );
    println!("{name}: decoded picture within {worst} level(s)");
}

#[test]
fn denoise_one_picture() {
    check_denoise_side("edit1_64");
}

#[test]
fn denoise_two_pictures() {
    check_denoise_side("edit2_64x48");
}

#[test]
fn denoise_zero_cond_t_one_picture() {
    check_prompt_side("edit1_2511");
    check_denoise_side("edit1_2511");
}

#[test]
fn denoise_zero_cond_t_two_pictures_cfg() {
    check_prompt_side("edit2_2511");
    check_denoise_side("edit2_2511");
}

#[test]
fn zero_cond_t_changes_the_condition_tokens_only() {
    // the same weights with and without zero_cond_t: the velocity differs (so the flag is honoured) and
    // without reference tokens (one img_shape) both configs agree exactly.
    let s = Snapshot::open(root().join("snapshot")).unwrap();
    let vb = s.weights("transformer", DType::F32, &Device::Cpu).unwrap();
    let mut cfg: TransformerConfig = s.config("transformer", "config.json").unwrap();
    assert!(!cfg.zero_cond_t);
    let plain = QwenImageTransformer::new(&cfg, vb.clone()).unwrap();
    cfg.zero_cond_t = true;
    let zero = QwenImageTransformer::new(&cfg, vb).unwrap();
    let dim = cfg.in_channels;
    let x = Tensor::randn(0f32, 1.0, (1, 4 + 6, dim), &Device::Cpu).unwrap();
    let c = Tensor::randn(0f32, 1.0, (1, 5, cfg.joint_attention_dim), &Device::Cpu).unwrap();
    let t = Tensor::new(&[0.7f32], &Device::Cpu).unwrap();
    let run = |m: &QwenImageTransformer, x: &Tensor, shapes: &[(usize, usize, usize)]| {
        m.forward(&TransformerInputs {
            hidden_states: x,
            encoder_hidden_states: &c,
            encoder_mask: None,
            timestep: &t,
            img_shapes: shapes,
            controlnet_residuals: &[],
        })
        .unwrap()
    };
    let two = [(1, 2, 2), (1, 2, 3)];
    assert!(rel_err(&run(&plain, &x, &two), &run(&zero, &x, &two)) > 1e-3);
    let x4 = x.narrow(1, 0, 4).unwrap();
    assert_eq!(
        rel_err(&run(&plain, &x4, &two[..1]), &run(&zero, &x4, &two[..1])),
        0.0
    );
}

#[test]
fn sizes_match_diffusers_at_the_real_constants() {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("refs/geometry.json")).unwrap())
            .unwrap();
    let area = |k: &str| g[k].as_u64().unwrap();
    let vsf = g["vae_scale_factor"].as_u64().unwrap() as usize;
    let rows = g["rows"].as_array().unwrap();
    assert!(rows.len() >= 15);
    let check = |what: &str,
                 size: &serde_json::Value,
                 got: Result<(usize, usize), String>,
                 want: &serde_json::Value| {
        match want.as_array() {
            Some(v) => {
                let v: Vec<usize> = v.iter().map(|x| x.as_u64().unwrap() as usize).collect();
                assert_eq!(got, Ok((v[0], v[1])), "{what} of {size}");
            }
            None => assert!(
                got.is_err(),
                "{what} of {size}: diffusers failed ({want}), we gave {got:?}"
            ),
        }
    };
    for row in rows {
        let s = &row["size"];
        let (w, h) = (
            s[0].as_u64().unwrap() as usize,
            s[1].as_u64().unwrap() as usize,
        );
        let cond = condition_size(w, h, area("condition_area"));
        check("condition size", s, cond.clone(), &row["condition"]);
        check(
            "vae size",
            s,
            vae_size(w, h, area("vae_area"), vsf),
            &row["vae"],
        );
        check(
            "default output",
            s,
            default_output_size(w, h, vsf),
            &row["default_output"],
        );
        if let Ok((cw, ch)) = cond {
            let sm = smart_resize(ch, cw, 28, 3136, 12845056).map(|(h, w)| (w, h));
            check("smart_resize", s, sm, &row["smart_resize_of_condition"]);
        }
    }
}

#[test]
fn bad_pictures_and_prompts_are_clear_errors() {
    let enc = encoder(&root().join("snapshot"), PositionMode::Multimodal);
    let ok = Image8::new(32, 32, 3, vec![100; 32 * 32 * 3]).unwrap();
    // a picture so elongated that its condition size rounds a side to 0
    let thin = Image8::new(2000, 1, 3, vec![0; 2000 * 3]).unwrap();
    let e = enc.encode_pictures("x", &[thin]).unwrap_err().to_string();
    assert!(
        e.contains("picture 1") && e.contains("too elongated"),
        "{e}"
    );
    // sized, but beyond the processor's 200:1 aspect ratio (575:1 -> 9216x32)
    let long = Image8::new(575, 1, 3, vec![0; 575 * 3]).unwrap();
    let e = enc
        .encode_pictures("x", &[ok.clone(), long])
        .unwrap_err()
        .to_string();
    assert!(e.contains("picture 2") && e.contains("aspect ratio"), "{e}");
    // a tiny picture is not an error: smart_resize scales it up to min_pixels (56x56 for 1x1)
    let dot = Image8::new(1, 1, 3, vec![9, 9, 9]).unwrap();
    let parts = enc.encode_parts("x", &[dot]).unwrap();
    assert_eq!(parts.pixels.grids, vec![(1, 4, 4)]);
    // grayscale is refused with the channel count
    let gray = Image8::new(28, 28, 1, vec![0; 28 * 28]).unwrap();
    let e = enc.encode("x", &[gray]).unwrap_err().to_string();
    assert!(e.contains("3 channels"), "{e}");
    // no picture, and a prompt smuggling an image placeholder
    assert!(enc.encode("x", &[]).is_err());
    let e = enc
        .encode("see <|image_pad|>", std::slice::from_ref(&ok))
        .unwrap_err()
        .to_string();
    assert!(e.contains("<|image_pad|>"), "{e}");
    // a text-to-image snapshot is not an Edit snapshot
    let base = Snapshot::open(root().join("../tiny/snapshot")).unwrap();
    let e = EditPromptEncoder::load(&base, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("processor"), "{e}");
    // reference latents whose shapes do not add up
    let z = Tensor::zeros((1, 10, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(ReferenceLatents::new(z, vec![(1, 2, 2)]).is_err());
}
