//! Checks a `DenoiseRequest` against the loaded model and turns it into host tensors. Every problem is an
//! INVALID_ARGUMENT whose message names the field and what to send instead.

use qwen_image_common::tensor::{
    self, HostTensor, TensorError, expect_binary, expect_dim, required,
};
use qwen_image_proto::v1::{DataType, DenoiseRequest, InpaintInputs, Tensor};

use crate::error::DenoiserError;

/// Most steps a request may ask for (diffusers has no cap; 1000 = the scheduler's training timesteps).
pub const MAX_STEPS: usize = 1000;
/// Largest batch in one request.
pub const MAX_BATCH: usize = 16;
/// Longest prompt embedding sequence (diffusers caps max_sequence_length at 1024).
pub const MAX_PROMPT_TOKENS: usize = 1024;
/// Largest latent side: 512 latent pixels = 4096 image pixels.
pub const MAX_LATENT_SIDE: usize = 512;

/// The model facts requests are checked against.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    /// Embedding width D (transformer `joint_attention_dim`).
    pub joint_attention_dim: usize,
    /// Latent channels C (transformer `out_channels`).
    pub latent_channels: usize,
}

/// Prompt conditioning as host tensors: embeds `[B, L, D]`, mask `[B, L]` of 0/1.
#[derive(Debug, Clone)]
pub struct HostConditioning {
    pub embeds: HostTensor<f32>,
    pub mask: Option<HostTensor<f32>>,
}

/// How the schedule is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum ScheduleInput {
    Steps(usize),
    Sigmas(Vec<f64>),
}

impl ScheduleInput {
    pub fn steps(&self) -> usize {
        match self {
            Self::Steps(n) => *n,
            Self::Sigmas(s) => s.len(),
        }
    }
}

/// Inpaint tensors, each `[B, C, h, w]` like the latents.
#[derive(Debug, Clone)]
pub struct HostInpaint {
    pub image_latents: HostTensor<f32>,
    pub noise: HostTensor<f32>,
    pub mask: HostTensor<f32>,
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct DenoiseInputs {
    pub positive: HostConditioning,
    pub negative: Option<HostConditioning>,
    pub true_cfg_scale: f64,
    /// Start latents with the shape normalised to `[B, C, h, w]`.
    pub latents: HostTensor<f32>,
    pub schedule: ScheduleInput,
    pub start_step: usize,
    /// img2img / inpaint: noise to mix into the (clean image) `latents` at `sigma[start_step]`.
    pub start_noise: Option<HostTensor<f32>>,
    /// 0 = no previews.
    pub preview_every_n_steps: usize,
    pub inpaint: Option<HostInpaint>,
}

const F32: &[DataType] = &[DataType::F32];
const MASK_DTYPES: &[DataType] = &[DataType::U8, DataType::I64, DataType::F32];

fn invalid(msg: impl Into<String>) -> DenoiserError {
    DenoiserError::InvalidArgument(msg.into())
}

/// Validates the whole request.
pub fn validate(req: &DenoiseRequest, model: ModelShape) -> Result<DenoiseInputs, DenoiserError> {
    let positive = conditioning(
        req.prompt_embeds.as_ref(),
        req.prompt_embeds_mask.as_ref(),
        "prompt_embeds",
        "prompt_embeds_mask",
        model,
        None,
    )?;
    let batch = positive.embeds.shape[0];
    let negative = match &req.negative_prompt_embeds {
        Some(neg) => Some(conditioning(
            Some(neg),
            req.negative_prompt_embeds_mask.as_ref(),
            "negative_prompt_embeds",
            "negative_prompt_embeds_mask",
            model,
            Some(batch),
        )?),
        None if req.negative_prompt_embeds_mask.is_some() => {
            return Err(invalid(
                "`negative_prompt_embeds_mask` was sent without `negative_prompt_embeds`; send both or neither",
            ));
        }
        None => None,
    };
    let scale = req.true_cfg_scale;
    if !scale.is_finite() || scale < 0.0 {
        return Err(invalid(format!(
            "`true_cfg_scale` is {scale}; send a finite value >= 0 (<= 1 disables CFG)"
        )));
    }
    let latents = latents(
        required(req.latents.as_ref(), "latents")?,
        "latents",
        model,
        batch,
    )?;
    let schedule = schedule(req)?;
    let start_step = req.start_step as usize;
    if start_step >= schedule.steps() {
        return Err(invalid(format!(
            "`start_step` is {start_step} but the schedule has {} steps; send a start_step below the step count",
            schedule.steps()
        )));
    }
    let start_noise = req
        .start_noise
        .as_ref()
        .map(|t| same_shape(t, "start_noise", &latents.shape, model, batch))
        .transpose()?;
    let inpaint = req
        .inpaint
        .as_ref()
        .map(|i| inpaint(i, &latents.shape, model, batch))
        .transpose()?;
    Ok(DenoiseInputs {
        positive,
        negative,
        true_cfg_scale: f64::from(scale),
        latents,
        schedule,
        start_step,
        start_noise,
        preview_every_n_steps: req.preview_every_n_steps as usize,
        inpaint,
    })
}

fn conditioning(
    embeds: Option<&Tensor>,
    mask: Option<&Tensor>,
    field: &str,
    mask_field: &str,
    model: ModelShape,
    batch: Option<usize>,
) -> Result<HostConditioning, DenoiserError> {
    let embeds = tensor::to_f32(required(embeds, field)?, field, F32, &[3])?;
    let (b, l) = (embeds.shape[0], embeds.shape[1]);
    if b == 0 || b > MAX_BATCH {
        return Err(TensorError::new(
            field,
            format!("batch size is {b}; send 1..={MAX_BATCH} rows"),
        )
        .into());
    }
    if let Some(expected) = batch {
        expect_dim(
            field,
            &embeds.shape,
            0,
            "batch, must match prompt_embeds",
            expected,
        )?;
    }
    if l == 0 || l > MAX_PROMPT_TOKENS {
        return Err(TensorError::new(
            field,
            format!("has {l} tokens; send 1..={MAX_PROMPT_TOKENS}"),
        )
        .into());
    }
    expect_dim(
        field,
        &embeds.shape,
        2,
        "embedding width = the transformer's joint_attention_dim",
        model.joint_attention_dim,
    )?;
    let mask = match mask {
        None => None,
        Some(m) => {
            let m = tensor::to_f32(m, mask_field, MASK_DTYPES, &[2])?;
            expect_dim(mask_field, &m.shape, 0, "batch", b)?;
            expect_dim(mask_field, &m.shape, 1, "tokens", l)?;
            expect_binary(mask_field, &m.data)?;
            if let Some(row) = m.data.chunks(l).position(|r| r.iter().all(|&v| v == 0.0)) {
                return Err(TensorError::new(
                    mask_field,
                    format!("row {row} masks every token; each row needs at least one 1"),
                )
                .into());
            }
            Some(m)
        }
    };
    Ok(HostConditioning { embeds, mask })
}

/// Accepts `[B, C, h, w]`, `[B, C, 1, h, w]` or `[B, 1, C, h, w]` (the same memory layout) and returns the
/// tensor with its shape normalised to `[B, C, h, w]`.
fn latents(
    t: &Tensor,
    field: &str,
    model: ModelShape,
    batch: usize,
) -> Result<HostTensor<f32>, DenoiserError> {
    let mut h = tensor::to_f32(t, field, F32, &[4, 5])?;
    let c = model.latent_channels;
    if h.rank() == 5 {
        let s = &h.shape;
        let frame_ok = (s[1] == c && s[2] == 1) || (s[1] == 1 && s[2] == c);
        if !frame_ok {
            return Err(TensorError::new(
                field,
                format!("shape {s:?} is not [B, {c}, 1, h, w] or [B, 1, {c}, h, w] (one frame, {c} latent channels)"),
            )
            .into());
        }
        h.shape = vec![s[0], c, s[3], s[4]];
    }
    expect_dim(field, &h.shape, 0, "batch, must match prompt_embeds", batch)?;
    expect_dim(
        field,
        &h.shape,
        1,
        "latent channels = the transformer's out_channels",
        c,
    )?;
    let (lh, lw) = (h.shape[2], h.shape[3]);
    if lh == 0
        || lw == 0
        || lh % 2 != 0
        || lw % 2 != 0
        || lh > MAX_LATENT_SIDE
        || lw > MAX_LATENT_SIDE
    {
        return Err(TensorError::new(
            field,
            format!("latent grid is {lh}x{lw}; height and width must be even and in 2..={MAX_LATENT_SIDE} (image size / 8)"),
        )
        .into());
    }
    Ok(h)
}

fn schedule(req: &DenoiseRequest) -> Result<ScheduleInput, DenoiserError> {
    if req.sigmas.is_empty() {
        let n = req.steps as usize;
        if n == 0 || n > MAX_STEPS {
            return Err(invalid(format!(
                "`steps` is {n}; send 1..={MAX_STEPS} (or explicit `sigmas`)"
            )));
        }
        return Ok(ScheduleInput::Steps(n));
    }
    let s = &req.sigmas;
    if s.len() > MAX_STEPS {
        return Err(invalid(format!(
            "`sigmas` has {} values; send 1..={MAX_STEPS}",
            s.len()
        )));
    }
    if let Some(i) = s
        .iter()
        .position(|v| !(v.is_finite() && *v > 0.0 && *v <= 1.0))
    {
        return Err(invalid(format!(
            "`sigmas[{i}]` is {}; every sigma must lie in (0, 1]",
            s[i]
        )));
    }
    if let Some(i) = s.windows(2).position(|w| w[1] >= w[0]) {
        return Err(invalid(format!(
            "`sigmas` must be strictly decreasing; sigmas[{}] >= sigmas[{i}]",
            i + 1
        )));
    }
    Ok(ScheduleInput::Sigmas(
        s.iter().map(|&v| f64::from(v)).collect(),
    ))
}

/// A latents-like tensor that must have the (normalised) shape of `latents`.
fn same_shape(
    t: &Tensor,
    field: &str,
    shape: &[usize],
    model: ModelShape,
    batch: usize,
) -> Result<HostTensor<f32>, DenoiserError> {
    let h = latents(t, field, model, batch)?;
    if h.shape != shape {
        return Err(TensorError::new(
            field,
            format!(
                "shape {:?} must equal the latents' shape {shape:?}",
                h.shape
            ),
        )
        .into());
    }
    Ok(h)
}

fn inpaint(
    i: &InpaintInputs,
    shape: &[usize],
    model: ModelShape,
    batch: usize,
) -> Result<HostInpaint, DenoiserError> {
    let one = |t: Option<&Tensor>, field: &str| -> Result<HostTensor<f32>, DenoiserError> {
        same_shape(required(t, field)?, field, shape, model, batch)
    };
    let mask = one(i.mask.as_ref(), "inpaint.mask")?;
    if let Some(k) = mask.data.iter().position(|v| !(0.0..=1.0).contains(v)) {
        return Err(invalid(format!(
            "`inpaint.mask` element {k} is {}; send values in [0, 1]",
            mask.data[k]
        )));
    }
    Ok(HostInpaint {
        image_latents: one(i.image_latents.as_ref(), "inpaint.image_latents")?,
        noise: one(i.noise.as_ref(), "inpaint.noise")?,
        mask,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_image_common::tensor::from_f32;

    const M: ModelShape = ModelShape {
        joint_attention_dim: 4,
        latent_channels: 16,
    };

    fn good() -> DenoiseRequest {
        DenoiseRequest {
            prompt_embeds: Some(from_f32(&[1, 3, 4], &[0.5; 12])),
            latents: Some(from_f32(&[1, 1, 16, 2, 4], &[0.1; 128])),
            steps: 4,
            true_cfg_scale: 4.0,
            ..Default::default()
        }
    }

    fn err(req: &DenoiseRequest) -> String {
        match validate(req, M) {
            Err(DenoiserError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_good_request_and_normalises_layouts() {
        let v = validate(&good(), M).expect("valid");
        assert_eq!(v.latents.shape, vec![1, 16, 2, 4]);
        let mut r = good();
        r.latents = Some(from_f32(&[1, 16, 1, 2, 4], &[0.1; 128]));
        assert_eq!(
            validate(&r, M).expect("valid").latents.shape,
            vec![1, 16, 2, 4]
        );
    }

    #[test]
    fn rejects_bad_requests_with_field_names() {
        let mut r = good();
        r.steps = 0;
        assert!(err(&r).contains("`steps`"));
        r.steps = 1001;
        assert!(err(&r).contains("`steps`"));
        let mut r = good();
        r.prompt_embeds = Some(from_f32(&[1, 3, 5], &[0.5; 15]));
        assert!(err(&r).contains("joint_attention_dim"));
        let mut r = good();
        r.latents = Some(from_f32(&[1, 16, 3, 2], &[0.1; 96]));
        assert!(err(&r).contains("even"));
        let mut r = good();
        r.true_cfg_scale = f32::NAN;
        assert!(err(&r).contains("true_cfg_scale"));
        let mut r = good();
        r.prompt_embeds_mask = Some(from_f32(&[1, 3], &[1.0, 0.5, 0.0]));
        assert!(err(&r).contains("0 or 1"));
        let mut r = good();
        r.negative_prompt_embeds = Some(from_f32(&[2, 3, 4], &[0.5; 24]));
        assert!(err(&r).contains("batch"));
        let mut r = good();
        r.sigmas = vec![1.0, 0.5, 0.7];
        assert!(err(&r).contains("decreasing"));
        let mut r = good();
        r.start_step = 4;
        assert!(err(&r).contains("start_step"));
        let mut r = good();
        r.latents = None;
        assert!(err(&r).contains("`latents`"));
        let mut r = good();
        r.start_noise = Some(from_f32(&[1, 16, 2, 2], &[0.1; 64]));
        assert!(err(&r).contains("start_noise"));
        r.start_noise = Some(from_f32(&[1, 16, 2, 4], &[0.1; 128]));
        assert!(validate(&r, M).expect("valid").start_noise.is_some());
    }
}
