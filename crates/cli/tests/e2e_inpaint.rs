//! End to end for the image flows: Img2Img, Inpaint and Outpaint through the gateway and the three stage
//! processes, compared with diffusers' QwenImageImg2ImgPipeline / QwenImageInpaintPipeline PNGs for the same
//! seed (tests/fixtures/tiny/refs/{img2img_64x48, inpaint_64, inpaint_96x64, outpaint_80x96}).

mod common;

use std::path::PathBuf;

use qwen_image_common::randn::TorchCpuGenerator;
use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::vae_client::VaeClient;
use qwen_image_proto::v1::{
    DecodeRequest, EncodeImageRequest, GenerateResult, GenerationSettings, Image, Img2ImgRequest,
    InpaintRequest, OutpaintRequest, Stage, generate_event,
};
use tonic::Code;
use tonic::transport::Channel;

use common::{DEFAULT_PROMPT, client, decode_rgb, max_level_diff, start_stack, workspace};

fn refs(name: &str) -> PathBuf {
    workspace().join("tests/fixtures/tiny/refs").join(name)
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The options of a reference dump (reference.py's arguments).
struct Ref {
    prompt: String,
    negative_prompt: Option<String>,
    width: u32,
    height: u32,
    steps: u32,
    cfg: f32,
    seed: u64,
    strength: f64,
    image: Vec<u8>,
    mask: Option<Vec<u8>>,
    expected: Vec<u8>,
}

fn reference(name: &str) -> Ref {
    let dir = refs(name);
    let manifest: serde_json::Value =
        serde_json::from_slice(&read(dir.join("manifest.json"))).expect("json");
    let a = &manifest["args"];
    let mask = dir.join("input_mask.png");
    Ref {
        prompt: a["prompt"][0]
            .as_str()
            .or_else(|| a["prompt"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| {
                // reference.py's per-mode default prompts
                match manifest["mode"].as_str() {
                    Some("inpaint") => "a red lantern in the middle".into(),
                    Some("img2img") => "a watercolour painting".into(),
                    _ => DEFAULT_PROMPT.into(),
                }
            }),
        negative_prompt: if a["no_negative"].as_bool().unwrap_or(false) {
            None
        } else {
            a["negative_prompt"].as_str().map(str::to_string)
        },
        width: a["width"].as_u64().expect("width") as u32,
        height: a["height"].as_u64().expect("height") as u32,
        steps: a["steps"].as_u64().expect("steps") as u32,
        cfg: a["true_cfg_scale"].as_f64().expect("cfg") as f32,
        seed: a["seed"].as_u64().expect("seed"),
        strength: a["strength"].as_f64().expect("strength"),
        image: read(dir.join("input_image.png")),
        mask: mask.exists().then(|| read(mask)),
        expected: read(dir.join("image_0.png")),
    }
}

impl Ref {
    fn inpaint(&self) -> InpaintRequest {
        InpaintRequest {
            settings: Some(GenerationSettings {
                prompt: self.prompt.clone(),
                negative_prompt: self.negative_prompt.clone(),
                width_px: self.width,
                height_px: self.height,
                steps: self.steps,
                true_cfg_scale: Some(self.cfg),
                seed: Some(self.seed),
                ..Default::default()
            }),
            image: self.image.clone().into(),
            mask: self.mask.clone().expect("inpaint dump has a mask").into(),
            strength: Some(self.strength),
            ..Default::default()
        }
    }
}

/// Reads a flow's stream: the stages it reported and its result.
async fn collect(
    stream: Result<
        tonic::Response<tonic::Streaming<qwen_image_proto::v1::GenerateEvent>>,
        tonic::Status,
    >,
) -> Result<(Vec<i32>, GenerateResult), tonic::Status> {
    let mut stream = stream?.into_inner();
    let mut stages = Vec::new();
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(generate_event::Event::Progress(p)) => stages.push(p.stage),
            Some(generate_event::Event::Result(r)) => return Ok((stages, r)),
            None => {}
        }
    }
    Err(tonic::Status::internal("no result"))
}

async fn inpaint(
    c: &mut ImageGeneratorClient<Channel>,
    req: InpaintRequest,
) -> Result<GenerateResult, tonic::Status> {
    collect(c.inpaint(req).await).await.map(|(_, r)| r)
}

/// diffusers' VAE round trip of the picture with the posterior sample the inpaint request draws first:
/// decode(normalise(mean + exp(logvar/2)·eps)), through the VAE service (which samples and normalises with
/// the noise it is given). Where the mask is 0 the final latents of an inpaint equal exactly these latents
/// (the last blend uses the clean image latents).
async fn vae_round_trip(vae_url: &str, rgb8: &[u8], w: u32, h: u32, seed: u64) -> Vec<u8> {
    let ch = Channel::from_shared(vae_url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut vae = VaeClient::new(ch).max_decoding_message_size(64 << 20);
    // The tiny snapshot: 16 latent channels, VAE scale factor 8.
    let shape = [1, 16, 1, (h / 8) as usize, (w / 8) as usize];
    let eps = TorchCpuGenerator::new(seed)
        .randn(shape.iter().product())
        .expect("n >= 16");
    let latents = vae
        .encode(EncodeImageRequest {
            images: vec![Image {
                width_px: w,
                height_px: h,
                rgb8: rgb8.to_vec().into(),
            }],
            posterior_noise: Some(qwen_image_common::tensor::from_f32(&shape, &eps)),
        })
        .await
        .expect("encode")
        .into_inner()
        .latents;
    let out = vae
        .decode(DecodeRequest {
            latents,
            return_float: false,
        })
        .await
        .expect("decode")
        .into_inner();
    out.images[0].rgb8.to_vec()
}

fn gray_mask(png_bytes: &[u8]) -> Vec<bool> {
    let (_, _, rgb) = decode_rgb_any(png_bytes);
    rgb.iter().map(|&v| v >= 128).collect()
}

/// PNG of any 8-bit colour type → one grey value per pixel (first channel).
fn decode_rgb_any(png_bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(png_bytes))
        .read_info()
        .expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    let ch = info.color_type.samples();
    buf.truncate(info.buffer_size());
    let first = buf.chunks_exact(ch).map(|p| p[0]).collect();
    (info.width, info.height, first)
}

/// Mean absolute level difference over the pixels where `select` holds.
fn mean_abs(a: &[u8], b: &[u8], sel: &[bool], want: bool) -> f64 {
    let (mut sum, mut n) = (0u64, 0u64);
    for (i, &s) in sel.iter().enumerate() {
        if s == want {
            for c in 0..3 {
                sum += u64::from(a[i * 3 + c].abs_diff(b[i * 3 + c]));
                n += 1;
            }
        }
    }
    sum as f64 / n.max(1) as f64
}

#[tokio::test]
async fn image_flows_match_diffusers() {
    let stack = start_stack(None).await;
    let mut c = client(&stack.gateway.url).await;

    // Img2Img: 64x64 input LANCZOS-resized to 64x48 by the gateway.
    let r = reference("img2img_64x48");
    let req = Img2ImgRequest {
        settings: Some(GenerationSettings {
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            width_px: r.width,
            height_px: r.height,
            steps: r.steps,
            true_cfg_scale: Some(r.cfg),
            seed: Some(r.seed),
            ..Default::default()
        }),
        image: r.image.clone().into(),
        strength: Some(r.strength),
    };
    let (stages, res) = collect(c.img2_img(req).await).await.expect("img2img");
    assert!(stages.contains(&(Stage::EncodeImage as i32)), "{stages:?}");
    assert_eq!((res.width_px, res.height_px), (64, 48));
    assert_eq!(res.strength, Some(0.7));
    let d = max_level_diff(&res.png[0], &r.expected, "img2img_64x48");
    eprintln!("img2img_64x48: max difference {d} levels");
    assert!(d <= 1, "img2img_64x48: {d} levels");
    let chunks: Vec<(String, String)> = png::Decoder::new(std::io::Cursor::new(&res.png[0][..]))
        .read_info()
        .expect("png")
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    let get = |k: &str| {
        chunks
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("mode"), Some("img2img"));
    assert!(
        get("parameters").is_some_and(|p| p.ends_with("Denoising strength: 0.7")),
        "{chunks:?}"
    );

    // Inpaint, square and non-square.
    for name in ["inpaint_64", "inpaint_96x64"] {
        let r = reference(name);
        let (stages, res) = collect(c.inpaint(r.inpaint()).await)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert!(stages.contains(&(Stage::EncodeImage as i32)), "{stages:?}");
        assert_eq!((res.width_px, res.height_px), (r.width, r.height));
        let d = max_level_diff(&res.png[0], &r.expected, name);
        eprintln!("{name}: max difference {d} levels");
        assert!(d <= 1, "{name}: {d} levels");
    }

    // Outpaint: the 64x64 picture + left 16, top 8, bottom 24 = diffusers' inpaint of the padded canvas.
    let r = reference("outpaint_80x96");
    let picture = read(refs("inpaint_64").join("input_image.png"));
    let req = OutpaintRequest {
        settings: Some(GenerationSettings {
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            steps: r.steps,
            true_cfg_scale: Some(r.cfg),
            seed: Some(r.seed),
            ..Default::default()
        }),
        image: picture.into(),
        left_px: 16,
        top_px: 8,
        bottom_px: 24,
        ..Default::default()
    };
    let (_, res) = collect(c.outpaint(req).await).await.expect("outpaint");
    assert_eq!((res.width_px, res.height_px), (80, 96));
    let pad = res.padding.expect("padding");
    assert_eq!(
        (pad.left_px, pad.right_px, pad.top_px, pad.bottom_px),
        (16, 0, 8, 24)
    );
    assert_eq!(res.strength, Some(1.0));
    let d = max_level_diff(&res.png[0], &r.expected, "outpaint_80x96");
    eprintln!("outpaint_80x96: max difference {d} levels");
    assert!(d <= 1, "outpaint_80x96: {d} levels");
}

/// What "the unmasked region stays close to the input" can honestly mean on the random tiny model: its VAE
/// is not faithful (decode(encode(x)) is far from x), so distance to the input picture measures the VAE,
/// not the inpaint. Where the mask is 0 the inpaint's final latents are exactly the image's posterior
/// latents, so the output there must equal the VAE round trip of the input (same eps) up to the decoder's
/// spatial mixing near the mask edge, while the masked area differs. And with `paste_back` the unmasked
/// pixels are the input's exactly.
#[tokio::test]
async fn unmasked_region_keeps_the_picture() {
    let stack = start_stack(None).await;
    let mut c = client(&stack.gateway.url).await;
    let r = reference("inpaint_96x64");
    let (w, h) = (r.width, r.height);
    let (_, _, input) = decode_rgb(&r.image);
    let mask = gray_mask(r.mask.as_ref().expect("mask"));
    assert_eq!(mask.len(), (w * h) as usize);

    let res = inpaint(&mut c, r.inpaint()).await.expect("inpaint");
    let (_, _, ours) = decode_rgb(&res.png[0]);
    let round_trip = vae_round_trip(&stack.stages[2].url, &input, w, h, r.seed).await;

    // Pixels at least 16 px (2 latent cells) from any masked pixel.
    let far: Vec<bool> = (0..(w * h) as usize)
        .map(|i| {
            let (x, y) = ((i as u32 % w) as i64, (i as u32 / w) as i64);
            !mask.iter().enumerate().any(|(j, &m)| {
                m && ((j as u32 % w) as i64 - x).abs() < 16
                    && ((j as u32 / w) as i64 - y).abs() < 16
            })
        })
        .collect();
    let kept_vs_round_trip = mean_abs(&ours, &round_trip, &mask, false);
    let far_vs_round_trip = mean_abs(&ours, &round_trip, &far, true);
    let repainted_vs_round_trip = mean_abs(&ours, &round_trip, &mask, true);
    let kept_vs_input = mean_abs(&ours, &input, &mask, false);
    let round_trip_vs_input = mean_abs(&round_trip, &input, &mask, false);
    eprintln!(
        "unmasked vs VAE round trip {kept_vs_round_trip:.3} (>= 16 px from the mask {far_vs_round_trip:.3}), \
         masked vs round trip {repainted_vs_round_trip:.3}; unmasked vs input {kept_vs_input:.3} \
         (the round trip alone: {round_trip_vs_input:.3})"
    );
    // Measured on the tiny fixture: 12.8 / 10.1 / 17.7 and 77.26 vs 77.18 levels. The tiny decoder's
    // receptive field spans the whole 96x64 picture, so even far from the mask the kept area moves by ~10
    // levels; the honest claims are relative ones (the exact latent-space claim is in `qwen-image parity`:
    // "unmasked final latents == image latents").
    assert!(
        kept_vs_round_trip * 1.2 <= repainted_vs_round_trip,
        "the kept area should change less than the repainted one: {kept_vs_round_trip} vs {repainted_vs_round_trip}"
    );
    assert!(
        (kept_vs_input - round_trip_vs_input).abs() <= 1.0,
        "the kept area should be as faithful to the input as the VAE round trip: {kept_vs_input} vs {round_trip_vs_input}"
    );

    // paste_back: the unmasked pixels are the input's, the masked ones the plain result's.
    let pasted = inpaint(
        &mut c,
        InpaintRequest {
            paste_back: true,
            ..r.inpaint()
        },
    )
    .await
    .expect("inpaint with paste-back");
    let (_, _, pasted) = decode_rgb(&pasted.png[0]);
    assert_eq!(mean_abs(&pasted, &input, &mask, false), 0.0);
    assert_eq!(mean_abs(&pasted, &ours, &mask, true), 0.0);
}

#[tokio::test]
async fn bad_image_requests_are_invalid_argument() {
    let stack = start_stack(None).await;
    let mut c = client(&stack.gateway.url).await;
    let r = reference("inpaint_64");
    let good = r.inpaint();
    let other_size = read(refs("inpaint_96x64").join("input_mask.png"));
    let black = {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, 64, 64);
        enc.set_color(png::ColorType::Grayscale);
        let mut wr = enc.write_header().expect("header");
        wr.write_image_data(&[0u8; 64 * 64]).expect("data");
        wr.finish().expect("finish");
        out
    };
    let cases: Vec<(&str, InpaintRequest, &str)> = vec![
        (
            "mask size",
            InpaintRequest {
                mask: other_size.into(),
                ..good.clone()
            },
            "send a mask of the image's size",
        ),
        (
            "black mask",
            InpaintRequest {
                mask: black.into(),
                ..good.clone()
            },
            "all black",
        ),
        (
            "empty mask",
            InpaintRequest {
                mask: Vec::new().into(),
                ..good.clone()
            },
            "`mask` is empty",
        ),
        (
            "unreadable image",
            InpaintRequest {
                image: b"GIF89a not really".to_vec().into(),
                ..good.clone()
            },
            "`image`",
        ),
        (
            "strength 0",
            InpaintRequest {
                strength: Some(0.0),
                ..good.clone()
            },
            "(0, 1]",
        ),
        (
            "strength 1.5",
            InpaintRequest {
                strength: Some(1.5),
                ..good.clone()
            },
            "(0, 1]",
        ),
        (
            "no step runs",
            InpaintRequest {
                strength: Some(1e-17),
                ..good.clone()
            },
            "runs no denoising step",
        ),
    ];
    for (what, req, says) in cases {
        let e = inpaint(&mut c, req).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {}", e.message());
        assert!(e.message().contains(says), "{what}: {}", e.message());
    }
    let e = collect(
        c.outpaint(OutpaintRequest {
            settings: Some(GenerationSettings {
                prompt: "x".into(),
                ..Default::default()
            }),
            image: r.image.clone().into(),
            left_px: 4000,
            ..Default::default()
        })
        .await,
    )
    .await
    .expect_err("too large");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("at most"), "{}", e.message());
    let e = collect(
        c.img2_img(Img2ImgRequest {
            settings: Some(GenerationSettings {
                prompt: "x".into(),
                ..Default::default()
            }),
            image: r.image.clone().into(),
            strength: Some(f64::NAN),
        })
        .await,
    )
    .await
    .expect_err("NaN strength");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    // still serving
    inpaint(&mut c, good).await.expect("still works");
}

/// The commands as a user runs them, with a local stack on the fixture snapshot (`--model`).
#[test]
fn cli_commands_write_pngs_matching_diffusers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = common::snapshot();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_qwen-image"))
            .args(args)
            .args(["--model", snap.to_str().expect("utf-8"), "--quiet"])
            .env("RUST_LOG", "warn")
            .output()
            .expect("qwen-image runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let path = |p: PathBuf| p.to_str().expect("utf-8").to_string();
    let inp = refs("inpaint_64");
    let out = path(dir.path().join("inpaint.png"));
    run(&[
        "inpaint",
        "--image",
        &path(inp.join("input_image.png")),
        "--mask",
        &path(inp.join("input_mask.png")),
        "--prompt",
        "a red lantern in the middle",
        "--negative-prompt",
        " ",
        "--strength",
        "0.6",
        "--steps",
        "4",
        "--seed",
        "3",
        "--out",
        &out,
    ]);
    let d = max_level_diff(
        &read(out.into()),
        &reference("inpaint_64").expected,
        "cli inpaint",
    );
    assert!(d <= 1, "cli inpaint: {d} levels");

    let out = path(dir.path().join("outpaint.png"));
    let stdout = run(&[
        "outpaint",
        "--image",
        &path(inp.join("input_image.png")),
        "--left",
        "16",
        "--top",
        "8",
        "--bottom",
        "24",
        "--prompt",
        "a wide landscape",
        "--negative-prompt",
        " ",
        "--steps",
        "3",
        "--seed",
        "21",
        "--out",
        &out,
    ]);
    assert!(stdout.contains("size 80x96"), "{stdout}");
    assert!(
        stdout.contains("padding left 16 right 0 top 8 bottom 24"),
        "{stdout}"
    );
    let d = max_level_diff(
        &read(out.into()),
        &reference("outpaint_80x96").expected,
        "cli outpaint",
    );
    assert!(d <= 1, "cli outpaint: {d} levels");

    let out = path(dir.path().join("img2img.png"));
    run(&[
        "img2img",
        "--image",
        &path(inp.join("input_image.png")),
        "--width",
        "64",
        "--height",
        "48",
        "--strength",
        "0.7",
        "--prompt",
        "a watercolour painting of a harbour",
        "--negative-prompt",
        " ",
        "--steps",
        "4",
        "--seed",
        "5",
        "--out",
        &out,
    ]);
    let d = max_level_diff(
        &read(out.into()),
        &reference("img2img_64x48").expected,
        "cli img2img",
    );
    assert!(d <= 1, "cli img2img: {d} levels");
}
