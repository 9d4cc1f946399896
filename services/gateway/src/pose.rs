//! ControlNet pose over the stages (diffusers QwenImageControlNetPipeline, denoiser-and-pipelines.md §9):
//! pose picture or OpenPose keypoints → control image at the output size (LANCZOS, or rendered skeleton) →
//! VAE posterior sampled with the request's generator (first draw), normalised → seeded noise (second draw)
//! → the text-to-image flow with the control latents on the denoise request.

use qwen_image_common::randn::TorchCpuGenerator;
use qwen_image_common::tensor;
use qwen_image_imaging::Image8;
use qwen_image_imaging::openpose::{parse_openpose_json, render};
use qwen_image_imaging::resize::lanczos_resize;
use qwen_image_proto::v1::{
    ControlInput, DataType, EncodeImageRequest, EncodeImageResponse, GenerateResult, Image,
    PoseRequest, Stage, Tensor, TextToImageRequest, pose_request,
};

use crate::error::{GatewayError, StageName};
use crate::t2i::{self, Ctx};
use crate::validate::{
    DEFAULT_SIDE_PX, LATENT_CHANNELS, SIZE_MULTIPLE, T2iParams, VAE_SCALE_FACTOR, validate,
};

/// diffusers' default `controlnet_conditioning_scale`.
pub const DEFAULT_CONDITIONING_SCALE: f32 = 1.0;
/// Largest conditioning scale accepted.
pub const MAX_CONDITIONING_SCALE: f32 = 10.0;
/// Largest side of an uploaded pose picture, in pixels.
pub const MAX_INPUT_SIDE_PX: u32 = 8192;
/// Longest keypoints JSON, in bytes.
pub const MAX_KEYPOINTS_JSON_BYTES: usize = 4 << 20;

/// Where the control image came from (for logs and PNG metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoseSource {
    PoseImage,
    KeypointsJson,
}

impl PoseSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PoseImage => "pose_image",
            Self::KeypointsJson => "keypoints_json",
        }
    }
}

/// A validated pose request.
#[derive(Debug, Clone)]
pub struct PoseParams {
    /// The prompt part, with the output size resolved.
    pub t2i: T2iParams,
    /// The control image, RGB8 at the output size (already resized / rendered).
    pub control: Image8,
    pub source: PoseSource,
    /// Empty = the denoiser's only ControlNet.
    pub controlnet_id: String,
    pub conditioning_scale: f32,
    pub guidance_start: f32,
    pub guidance_end: f32,
}

fn invalid(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument(msg.into())
}

/// PNG or JPEG bytes → RGB8 (alpha dropped, grey replicated, 16-bit scaled to 8), as PIL's convert("RGB").
pub fn decode_image(bytes: &[u8], field: &str) -> Result<Image8, GatewayError> {
    use image::ImageFormat;
    if bytes.is_empty() {
        return Err(invalid(format!(
            "`{field}` is empty; send PNG or JPEG bytes"
        )));
    }
    let format = match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => f,
        Ok(f) => {
            return Err(invalid(format!(
                "`{field}` is {f:?}; send a PNG or JPEG picture"
            )));
        }
        Err(_) => {
            return Err(invalid(format!(
                "`{field}` is not a PNG or JPEG picture (unknown format); send PNG or JPEG bytes"
            )));
        }
    };
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE_PX);
    limits.max_image_height = Some(MAX_INPUT_SIDE_PX);
    limits.max_alloc = Some(1 << 30);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| {
        invalid(format!(
            "`{field}` cannot be decoded as {format:?} ({e}); send an intact PNG or JPEG of at most \
             {MAX_INPUT_SIDE_PX} px per side"
        ))
    })?;
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    Image8::new(w, h, 3, rgb.into_raw()).map_err(invalid)
}

/// Conditioning scale and guidance window with defaults (1.0, 0, 1), checked.
pub fn control_options(
    scale: Option<f32>,
    start: Option<f32>,
    end: Option<f32>,
) -> Result<(f32, f32, f32), GatewayError> {
    let conditioning_scale = scale.unwrap_or(DEFAULT_CONDITIONING_SCALE);
    if !conditioning_scale.is_finite()
        || !(0.0..=MAX_CONDITIONING_SCALE).contains(&conditioning_scale)
    {
        return Err(invalid(format!(
            "conditioning_scale {conditioning_scale} is not allowed; send 0..={MAX_CONDITIONING_SCALE} (e.g. 0.8-1.0)"
        )));
    }
    let guidance_start = start.unwrap_or(0.0);
    let guidance_end = end.unwrap_or(1.0);
    if !(guidance_start.is_finite()
        && guidance_end.is_finite()
        && 0.0 <= guidance_start
        && guidance_start < guidance_end
        && guidance_end <= 1.0)
    {
        return Err(invalid(format!(
            "control guidance window [{guidance_start}, {guidance_end}] is not allowed; send \
             0 <= control_guidance_start < control_guidance_end <= 1"
        )));
    }
    Ok((conditioning_scale, guidance_start, guidance_end))
}

/// The output side: the request's, or the control image's own floored to a multiple of 16.
pub fn side(name: &str, requested: u32, own: usize, max: u32) -> Result<u32, GatewayError> {
    if requested != 0 {
        return Ok(requested);
    }
    let floored = (own as u32 / SIZE_MULTIPLE) * SIZE_MULTIPLE;
    if floored == 0 || floored > max {
        return Err(invalid(format!(
            "the pose is {own} px along {name}, which gives no usable default size (multiples of \
             {SIZE_MULTIPLE} up to {max}); send {name} explicitly"
        )));
    }
    Ok(floored)
}

enum Pose {
    Image(Image8),
    Keypoints(qwen_image_imaging::openpose::PoseKeypoints),
}

/// Checks `req`, decodes / renders the control image at the output size and fills every default.
pub fn validate_pose(
    req: PoseRequest,
    max_side_px: u32,
    fallback_seed: u64,
) -> Result<PoseParams, GatewayError> {
    let (conditioning_scale, guidance_start, guidance_end) = control_options(
        req.conditioning_scale,
        req.control_guidance_start,
        req.control_guidance_end,
    )?;
    let (control, source, width_px, height_px) = match req.pose {
        None => {
            return Err(invalid(
                "no pose: send `pose_image` (PNG/JPEG skeleton picture) or `keypoints_json` (OpenPose JSON)",
            ));
        }
        Some(pose_request::Pose::PoseImage(bytes)) => {
            let img = decode_image(&bytes, "pose_image")?;
            let w = side("width_px", req.width_px, img.width, max_side_px)?;
            let h = side("height_px", req.height_px, img.height, max_side_px)?;
            (Pose::Image(img), PoseSource::PoseImage, w, h)
        }
        Some(pose_request::Pose::KeypointsJson(text)) => {
            if text.len() > MAX_KEYPOINTS_JSON_BYTES {
                return Err(invalid(format!(
                    "keypoints_json is {} bytes; send at most {MAX_KEYPOINTS_JSON_BYTES}",
                    text.len()
                )));
            }
            let default_size = (
                if req.width_px == 0 {
                    DEFAULT_SIDE_PX
                } else {
                    req.width_px
                } as usize,
                if req.height_px == 0 {
                    DEFAULT_SIDE_PX
                } else {
                    req.height_px
                } as usize,
            );
            let pose = parse_openpose_json(&text, Some(default_size))
                .map_err(|e| invalid(format!("keypoints_json: {e}")))?;
            let w = side("width_px", req.width_px, pose.canvas_width, max_side_px)?;
            let h = side("height_px", req.height_px, pose.canvas_height, max_side_px)?;
            (Pose::Keypoints(pose), PoseSource::KeypointsJson, w, h)
        }
    };
    let t2i = validate(
        TextToImageRequest {
            prompt: req.prompt,
            negative_prompt: req.negative_prompt,
            width_px,
            height_px,
            steps: req.steps,
            true_cfg_scale: req.true_cfg_scale,
            seed: req.seed,
            initial_latents: None,
            preview: req.preview,
            num_images: req.num_images,
        },
        max_side_px,
        fallback_seed,
    )?;
    let (w, h) = (t2i.width_px as usize, t2i.height_px as usize);
    let control = match control {
        // Drawn at the output size, as controlnet-aux draws at its detect_resolution.
        Pose::Keypoints(pose) => render(&pose, w, h, true, true),
        // image_processor.preprocess(control_image, height, width): PIL LANCZOS resize to W x H.
        Pose::Image(img) => lanczos_resize(&img, w, h).map_err(invalid)?,
    };
    if (control.width, control.height) != (w, h) {
        return Err(GatewayError::Internal(format!(
            "control image is {}x{}, expected {w}x{h}",
            control.width, control.height
        )));
    }
    Ok(PoseParams {
        t2i,
        control,
        source,
        controlnet_id: req.controlnet_id,
        conditioning_scale,
        guidance_start,
        guidance_end,
    })
}

fn upstream_shape(
    field: &str,
    t: Option<&Tensor>,
) -> Result<tensor::HostTensor<f32>, GatewayError> {
    let bad = |d: String| GatewayError::bad_response(StageName::Vae, d);
    let t = t.ok_or_else(|| bad(format!("no `{field}`")))?;
    tensor::to_f32(t, field, &[DataType::F32], &[5]).map_err(|e| bad(e.to_string()))
}

/// `(mean + exp(logvar / 2) * eps - latents_mean) * (1 / latents_std)` for a batch of `batch` copies of
/// the one encoded image, `eps` drawn from `generator` in one call over `[batch, C, 1, h, w]` (diffusers'
/// `retrieve_latents(vae.encode(image), generator)` on the repeated image, then the normalisation).
pub fn control_latents(
    resp: &EncodeImageResponse,
    batch: usize,
    latent_hw: (usize, usize),
    generator: &mut TorchCpuGenerator,
) -> Result<Tensor, GatewayError> {
    let bad = |d: String| GatewayError::bad_response(StageName::Vae, d);
    let mean = upstream_shape("mean", resp.mean.as_ref())?;
    let logvar = upstream_shape("logvar", resp.logvar.as_ref())?;
    let c = LATENT_CHANNELS;
    let (h, w) = latent_hw;
    if mean.shape != [1, c, 1, h, w] || logvar.shape != mean.shape {
        return Err(bad(format!(
            "posterior mean {:?} / logvar {:?}, expected [1, {c}, 1, {h}, {w}]",
            mean.shape, logvar.shape
        )));
    }
    let (lm, ls) = (&resp.latents_mean, &resp.latents_std);
    if lm.len() != c || ls.len() != c || ls.iter().any(|s| !s.is_finite() || *s == 0.0) {
        return Err(bad(format!(
            "latents_mean / latents_std have {} / {} values (need {c}, std non-zero)",
            lm.len(),
            ls.len()
        )));
    }
    let n = c * h * w;
    let eps = generator
        .randn(batch * n)
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
    let mut out = Vec::with_capacity(batch * n);
    for b in 0..batch {
        for (i, (&m, &lv)) in mean.data.iter().zip(&logvar.data).enumerate() {
            let ch = i / (h * w);
            let z = m + (0.5f32 * lv).exp() * eps[b * n + i];
            out.push((z - lm[ch]) * (1.0f32 / ls[ch]));
        }
    }
    Ok(tensor::from_f32(&[batch, c, 1, h, w], &out))
}

/// Text chunks describing the control, added to the PNGs.
pub fn control_chunks(pp: &PoseParams) -> Vec<(String, String)> {
    vec![
        (
            "controlnet".into(),
            if pp.controlnet_id.is_empty() {
                "(default)".into()
            } else {
                pp.controlnet_id.clone()
            },
        ),
        ("pose_source".into(), pp.source.as_str().into()),
        (
            "controlnet_conditioning_scale".into(),
            pp.conditioning_scale.to_string(),
        ),
        (
            "control_guidance_start".into(),
            pp.guidance_start.to_string(),
        ),
        ("control_guidance_end".into(), pp.guidance_end.to_string()),
    ]
}

/// What a ControlNet flow sends besides the prompt part.
pub struct ControlFlow<'a> {
    /// The control image at the output size, RGB8, as the VAE encodes it.
    pub image: &'a Image8,
    pub controlnet_id: &'a str,
    pub conditioning_scale: f32,
    pub guidance_start: f32,
    pub guidance_end: f32,
    /// Inpainting ControlNet: the mask on the latent grid `[B, 1, h, w]`, 1 = regenerate.
    pub latent_mask: Option<Tensor>,
    /// `true`: the posterior sample is the request generator's first draw, the noise its second
    /// (QwenImageControlNetPipeline). `false`: the sample comes from a second generator seeded with the same
    /// seed (QwenImageControlNetInpaintPipeline samples with torch's default generator).
    pub eps_from_request_generator: bool,
    /// Extra PNG text chunks.
    pub chunks: Vec<(String, String)>,
}

/// The ControlNet flow: prompts and the control image's posterior concurrently, seeded sample and noise,
/// denoise with the ControlInput, decode.
pub async fn run_control(
    ctx: &Ctx<'_>,
    p: &T2iParams,
    f: &ControlFlow<'_>,
) -> Result<GenerateResult, GatewayError> {
    let batch = p.num_images as usize;
    let (h, w) = p.latent_hw();
    if (h * VAE_SCALE_FACTOR as usize, w * VAE_SCALE_FACTOR as usize)
        != (f.image.height, f.image.width)
    {
        return Err(GatewayError::Internal("control image size mismatch".into()));
    }

    // 1. Prompts and the control image's posterior, concurrently.
    let image = Image {
        width_px: f.image.width as u32,
        height_px: f.image.height as u32,
        rgb8: f.image.data.clone().into(),
    };
    let (prompts, posterior) = tokio::join!(t2i::encode_prompts(ctx, p), async {
        ctx.progress(Stage::EncodeImage, 0, 0).await;
        ctx.stages
            .encode_image(
                EncodeImageRequest {
                    images: vec![image],
                },
                ctx.deadline,
            )
            .await
    });
    let mut prompts = prompts?;
    let posterior = posterior?;
    let model_id = std::mem::take(&mut prompts.model_id);
    let truncation = prompts.truncation;

    // 2. The posterior sample, then the initial noise.
    let mut generator = TorchCpuGenerator::new(p.seed);
    let control = if f.eps_from_request_generator {
        control_latents(&posterior, batch, (h, w), &mut generator)?
    } else {
        control_latents(
            &posterior,
            batch,
            (h, w),
            &mut TorchCpuGenerator::new(p.seed),
        )?
    };
    let shape = p.noise_shape();
    let noise = generator
        .randn(shape.iter().product())
        .map_err(|e| GatewayError::Internal(e.to_string()))?;
    let latents = tensor::from_f32(&shape, &noise);

    // 3. Denoise with the ControlNet, 4. decode.
    let start = t2i::Start {
        latents,
        start_noise: None,
        start_step: 0,
        inpaint: None,
        control: vec![ControlInput {
            controlnet_id: f.controlnet_id.to_string(),
            control_latents: Some(control),
            conditioning_scale: f.conditioning_scale,
            guidance_start: f.guidance_start,
            guidance_end: f.guidance_end,
            mask: f.latent_mask.clone(),
        }],
    };
    let final_latents = t2i::denoise(ctx, p, prompts, start).await?;
    let finish = t2i::Finish {
        chunks: f.chunks.to_vec(),
        truncation,
        ..Default::default()
    };
    t2i::decode(ctx, p, model_id, final_latents, finish).await
}

pub async fn run(ctx: &Ctx<'_>, pp: &PoseParams) -> Result<GenerateResult, GatewayError> {
    let flow = ControlFlow {
        image: &pp.control,
        controlnet_id: &pp.controlnet_id,
        conditioning_scale: pp.conditioning_scale,
        guidance_start: pp.guidance_start,
        guidance_end: pp.guidance_end,
        latent_mask: None,
        eps_from_request_generator: true,
        chunks: control_chunks(pp),
    };
    run_control(ctx, &pp.t2i, &flow).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().expect("header");
        wr.write_image_data(&vec![200u8; (w * h * 4) as usize])
            .expect("data");
        wr.finish().expect("finish");
        out
    }

    fn req(pose: pose_request::Pose) -> PoseRequest {
        PoseRequest {
            prompt: "a dancer".into(),
            pose: Some(pose),
            ..Default::default()
        }
    }

    fn err(r: PoseRequest) -> String {
        match validate_pose(r, 2048, 1) {
            Err(GatewayError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn pose_image_defaults_to_its_size_floored() {
        let p = validate_pose(
            req(pose_request::Pose::PoseImage(png(70, 40).into())),
            2048,
            1,
        )
        .expect("valid");
        assert_eq!((p.t2i.width_px, p.t2i.height_px), (64, 32));
        assert_eq!((p.control.width, p.control.height), (64, 32));
        assert_eq!(p.control.data[..3], [200, 200, 200]);
        assert_eq!(
            (p.conditioning_scale, p.guidance_start, p.guidance_end),
            (1.0, 0.0, 1.0)
        );
    }

    #[test]
    fn keypoints_render_at_the_requested_size() {
        let json = include_str!("../../../docs/pose-example.json");
        let mut r = req(pose_request::Pose::KeypointsJson(json.into()));
        let p = validate_pose(r.clone(), 2048, 1).expect("valid");
        assert_eq!((p.t2i.width_px, p.t2i.height_px), (512, 768));
        r.width_px = 64;
        r.height_px = 96;
        let p = validate_pose(r, 2048, 1).expect("valid");
        assert_eq!((p.control.width, p.control.height), (64, 96));
        assert!(p.control.data.iter().any(|&v| v > 0), "skeleton drawn");
    }

    /// The gateway's skeleton for docs/pose-example.json at 64x96 is controlnet-aux's, pixel for pixel (the
    /// control picture diffusers got for refs/controlnet_pose_64x96, see tools/make_fixtures.sh).
    #[test]
    fn keypoints_render_like_controlnet_aux() {
        let json = include_str!("../../../docs/pose-example.json");
        let mut r = req(pose_request::Pose::KeypointsJson(json.into()));
        (r.width_px, r.height_px) = (64, 96);
        let ours = validate_pose(r, 2048, 1).expect("valid").control;
        let png = include_bytes!(
            "../../../tests/fixtures/tiny/refs/controlnet_pose_64x96/input_control.png"
        );
        let theirs = decode_image(png, "reference").expect("png");
        assert_eq!(ours, theirs);
    }

    #[test]
    fn rejects_bad_poses() {
        assert!(
            err(PoseRequest {
                prompt: "x".into(),
                ..Default::default()
            })
            .contains("no pose")
        );
        assert!(
            err(req(pose_request::Pose::PoseImage(
                b"GIF89a....".to_vec().into()
            )))
            .contains("PNG or JPEG")
        );
        assert!(
            err(req(pose_request::Pose::PoseImage(b"hello".to_vec().into())))
                .contains("PNG or JPEG")
        );
        let mut truncated = png(32, 32);
        truncated.truncate(40);
        assert!(err(req(pose_request::Pose::PoseImage(truncated.into()))).contains("decoded"));
        assert!(
            err(req(pose_request::Pose::KeypointsJson("{not json".into())))
                .contains("keypoints_json")
        );
        let outside = r#"{"canvas_width":64,"canvas_height":64,"people":[{"pose_keypoints_2d":[10,10,1,300,10,1]}]}"#;
        assert!(
            err(req(pose_request::Pose::KeypointsJson(outside.into()))).contains("keypoints_json")
        );
        let mut r = req(pose_request::Pose::PoseImage(png(64, 64).into()));
        r.conditioning_scale = Some(f32::NAN);
        assert!(err(r.clone()).contains("conditioning_scale"));
        r.conditioning_scale = None;
        r.control_guidance_start = Some(0.6);
        r.control_guidance_end = Some(0.5);
        assert!(err(r).contains("guidance"));
        let r = req(pose_request::Pose::PoseImage(png(8, 64).into()));
        assert!(err(r).contains("width_px"));
    }

    #[test]
    fn samples_and_normalises_the_posterior() {
        let c = LATENT_CHANNELS;
        let resp = EncodeImageResponse {
            mean: Some(tensor::from_f32(&[1, c, 1, 2, 2], &vec![1.0; c * 4])),
            logvar: Some(tensor::from_f32(&[1, c, 1, 2, 2], &vec![0.0; c * 4])),
            latents_mean: vec![0.5; c],
            latents_std: vec![2.0; c],
        };
        let mut g = TorchCpuGenerator::new(4);
        let t = control_latents(&resp, 2, (2, 2), &mut g).expect("ok");
        let eps = TorchCpuGenerator::new(4).randn(2 * c * 4).expect("n");
        let host = tensor::to_f32(&t, "t", &[DataType::F32], &[5]).expect("f32");
        assert_eq!(host.shape, vec![2, c, 1, 2, 2]);
        assert_eq!(host.data[5], (1.0 + eps[5] - 0.5) * 0.5);
        assert_eq!(host.data[c * 4 + 3], (1.0 + eps[c * 4 + 3] - 0.5) * 0.5);
    }
}
