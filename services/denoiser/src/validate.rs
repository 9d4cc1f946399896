//! Checks a `DenoiseRequest` against the loaded model and turns it into host tensors. Every problem is an
//! INVALID_ARGUMENT whose message names the field and what to send instead.

use qwen_image_common::tensor::{
    self, HostTensor, TensorError, expect_binary, expect_dim, required,
};
use qwen_image_common::wire_guard::clip;
use qwen_image_proto::v1::{ControlInput, DataType, DenoiseRequest, InpaintInputs, Tensor};

use qwen_image_common::stage::StageError;

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

/// Most ControlInputs in one request.
pub const MAX_CONTROL_INPUTS: usize = 8;
/// Largest |conditioning_scale| accepted (diffusers has no cap; beyond this the output is noise).
pub const MAX_CONDITIONING_SCALE: f32 = 100.0;
/// Longest piece of a client string echoed in an error.
const ECHO_BYTES: usize = 200;
/// Largest `true_cfg_scale` (diffusers' default is 4.0; a huge scale only overflows the guided velocity).
pub const MAX_TRUE_CFG_SCALE: f32 = 100.0;

/// What a request's ControlInputs are checked against: one loaded ControlNet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlNetInfo {
    pub id: String,
    /// Packed condition channels (64, or 68 for the inpainting variant).
    pub cond_channels: usize,
    /// extra_condition_channels 4: the condition carries a mask channel.
    pub takes_mask: bool,
}

/// One checked ControlInput.
#[derive(Debug, Clone)]
pub struct HostControl {
    /// Index into the loaded ControlNets.
    pub net: usize,
    /// Control latents `[B, C, h, w]` like the latents.
    pub latents: HostTensor<f32>,
    /// Inpainting variant: mask `[B, 1, h, w]`, 1 = regenerate.
    pub mask: Option<HostTensor<f32>>,
    pub scale: f64,
    pub start: f64,
    pub end: f64,
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
    /// 0 = no checkpoint latents.
    pub checkpoint_every_n_steps: usize,
    pub inpaint: Option<HostInpaint>,
    /// ControlNets to run, in request order.
    pub control: Vec<HostControl>,
    /// Instruction editing: reference latents `[1, C, h_k, w_k]`, one per picture ([`crate::references`]).
    pub references: Vec<HostTensor<f32>>,
}

const F32: &[DataType] = &[DataType::F32];
const MASK_DTYPES: &[DataType] = &[DataType::U8, DataType::I64, DataType::F32];

fn invalid(msg: impl Into<String>) -> StageError {
    StageError::InvalidArgument(msg.into())
}

/// Validates the whole request for a denoiser without ControlNets.
pub fn validate(req: &DenoiseRequest, model: ModelShape) -> Result<DenoiseInputs, StageError> {
    validate_with_controlnets(req, model, &[])
}

/// Validates the whole request; `nets` are the loaded ControlNets (FAILED_PRECONDITION for another id).
pub fn validate_with_controlnets(
    req: &DenoiseRequest,
    model: ModelShape,
    nets: &[ControlNetInfo],
) -> Result<DenoiseInputs, StageError> {
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
    if !scale.is_finite() || !(0.0..=MAX_TRUE_CFG_SCALE).contains(&scale) {
        return Err(invalid(format!(
            "`true_cfg_scale` is {scale}; send a value in 0..={MAX_TRUE_CFG_SCALE} (<= 1 disables CFG)"
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
    if req.control.len() > MAX_CONTROL_INPUTS {
        return Err(invalid(format!(
            "`control` has {} entries; send at most {MAX_CONTROL_INPUTS}",
            req.control.len()
        )));
    }
    let control = req
        .control
        .iter()
        .enumerate()
        .map(|(k, c)| control(k, c, nets, &latents.shape, model, batch))
        .collect::<Result<Vec<_>, _>>()?;
    let references = crate::references::validate(req, model)?;
    Ok(DenoiseInputs {
        positive,
        negative,
        true_cfg_scale: f64::from(scale),
        latents,
        schedule,
        start_step,
        start_noise,
        preview_every_n_steps: req.preview_every_n_steps as usize,
        checkpoint_every_n_steps: req.checkpoint_every_n_steps as usize,
        inpaint,
        control,
        references,
    })
}

fn control(
    k: usize,
    c: &ControlInput,
    nets: &[ControlNetInfo],
    shape: &[usize],
    model: ModelShape,
    batch: usize,
) -> Result<HostControl, StageError> {
    let ids = || {
        let v: Vec<&str> = nets.iter().map(|n| n.id.as_str()).collect();
        format!("{v:?}")
    };
    if nets.is_empty() {
        let which = if c.controlnet_id.is_empty() {
            "a ControlNet".to_string()
        } else {
            format!("ControlNet `{}`", clip(&c.controlnet_id, ECHO_BYTES))
        };
        return Err(StageError::FailedPrecondition(format!(
            "`control[{k}]` asks for {which} but the denoiser has none loaded, it has [] (start it with \
             --controlnet [NAME=]DIR)"
        )));
    }
    let net = if c.controlnet_id.is_empty() {
        if nets.len() != 1 {
            return Err(StageError::FailedPrecondition(format!(
                "`control[{k}].controlnet_id` is empty but the denoiser has {} ControlNets {}; name one \
                 (start the denoiser with --controlnet [NAME=]DIR to load one)",
                nets.len(),
                ids()
            )));
        }
        0
    } else {
        nets.iter()
            .position(|n| n.id == c.controlnet_id)
            .ok_or_else(|| {
                StageError::FailedPrecondition(format!(
                    "the denoiser has no ControlNet `{}`; it has {} (start it with --controlnet [NAME=]DIR)",
                    clip(&c.controlnet_id, ECHO_BYTES),
                    ids()
                ))
            })?
    };
    let info = &nets[net];
    let field = format!("control[{k}].control_latents");
    let lat = latents(
        required(c.control_latents.as_ref(), &field)?,
        &field,
        model,
        batch,
    )?;
    if lat.shape != shape {
        return Err(TensorError::new(
            &field,
            format!(
                "shape {:?} must equal the latents' shape {shape:?}",
                lat.shape
            ),
        )
        .into());
    }
    if let Some(i) = lat.data.iter().position(|v| !v.is_finite()) {
        return Err(TensorError::new(&field, format!("element {i} is not finite")).into());
    }
    let mask_field = format!("control[{k}].mask");
    let mask = match (&c.mask, info.takes_mask) {
        (None, false) => None,
        (Some(_), false) => {
            return Err(invalid(format!(
                "`{mask_field}` was sent but ControlNet `{}` takes no mask (extra_condition_channels 0); \
                 leave it out",
                info.id
            )));
        }
        (None, true) => {
            return Err(invalid(format!(
                "ControlNet `{}` is an inpainting ControlNet and needs `{mask_field}` ([B, 1, h, w], 1 = regenerate)",
                info.id
            )));
        }
        (Some(m), true) => {
            let mut m = tensor::to_f32(m, &mask_field, F32, &[4, 5])?;
            if m.rank() == 5 {
                if m.shape[2] != 1 {
                    return Err(TensorError::new(
                        &mask_field,
                        format!("shape {:?} is not [B, 1, 1, h, w]", m.shape),
                    )
                    .into());
                }
                m.shape = vec![m.shape[0], m.shape[1], m.shape[3], m.shape[4]];
            }
            let want = [shape[0], 1, shape[2], shape[3]];
            if m.shape != want {
                return Err(TensorError::new(
                    &mask_field,
                    format!(
                        "shape {:?} must be {want:?} (one channel on the latent grid)",
                        m.shape
                    ),
                )
                .into());
            }
            expect_binary(&mask_field, &m.data)?;
            Some(m)
        }
    };
    let packed = 4 * (shape[1] + usize::from(mask.is_some()));
    if packed != info.cond_channels {
        return Err(StageError::FailedPrecondition(format!(
            "ControlNet `{}` takes {} packed condition channels but `{field}` packs to {packed}",
            info.id, info.cond_channels
        )));
    }
    let scale = c.conditioning_scale;
    if !scale.is_finite() || scale.abs() > MAX_CONDITIONING_SCALE {
        return Err(invalid(format!(
            "`control[{k}].conditioning_scale` is {scale}; send a finite value within ±{MAX_CONDITIONING_SCALE}"
        )));
    }
    let (start, end) = match (c.guidance_start, c.guidance_end) {
        (s, e) if s == 0.0 && e == 0.0 => (0.0, 1.0),
        (s, e) => (s, e),
    };
    if !(start.is_finite() && end.is_finite() && 0.0 <= start && start < end && end <= 1.0) {
        return Err(invalid(format!(
            "`control[{k}]` guidance window is [{start}, {end}]; send 0 <= guidance_start < guidance_end <= 1"
        )));
    }
    Ok(HostControl {
        net,
        latents: lat,
        mask,
        scale: f64::from(scale),
        start: f64::from(start),
        end: f64::from(end),
    })
}

fn conditioning(
    embeds: Option<&Tensor>,
    mask: Option<&Tensor>,
    field: &str,
    mask_field: &str,
    model: ModelShape,
    batch: Option<usize>,
) -> Result<HostConditioning, StageError> {
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

/// [`latents`] for other modules (reference latents).
pub(crate) fn latents_of(
    t: &Tensor,
    field: &str,
    model: ModelShape,
    batch: usize,
) -> Result<HostTensor<f32>, StageError> {
    latents(t, field, model, batch)
}

/// Accepts `[B, C, h, w]`, `[B, C, 1, h, w]` or `[B, 1, C, h, w]` (the same memory layout) and returns the
/// tensor with its shape normalised to `[B, C, h, w]`.
fn latents(
    t: &Tensor,
    field: &str,
    model: ModelShape,
    batch: usize,
) -> Result<HostTensor<f32>, StageError> {
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

fn schedule(req: &DenoiseRequest) -> Result<ScheduleInput, StageError> {
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
) -> Result<HostTensor<f32>, StageError> {
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
) -> Result<HostInpaint, StageError> {
    let one = |t: Option<&Tensor>, field: &str| -> Result<HostTensor<f32>, StageError> {
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
            Err(StageError::InvalidArgument(m)) => m,
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
        r.true_cfg_scale = 3.4e38;
        assert!(err(&r).contains("true_cfg_scale"));
        let mut r = good();
        r.latents = Some(from_f32(&[1, 1, 16, 2, 4], &[1e30; 128]));
        assert!(err(&r).contains("within"), "{}", err(&r));
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

    fn nets() -> Vec<ControlNetInfo> {
        vec![
            ControlNetInfo {
                id: "union".into(),
                cond_channels: 64,
                takes_mask: false,
            },
            ControlNetInfo {
                id: "inpaint".into(),
                cond_channels: 68,
                takes_mask: true,
            },
        ]
    }

    fn with_control(id: &str) -> DenoiseRequest {
        DenoiseRequest {
            control: vec![ControlInput {
                controlnet_id: id.into(),
                control_latents: Some(from_f32(&[1, 16, 1, 2, 4], &[0.2; 128])),
                conditioning_scale: 0.8,
                ..Default::default()
            }],
            ..good()
        }
    }

    fn control_err(req: &DenoiseRequest, nets: &[ControlNetInfo]) -> StageError {
        validate_with_controlnets(req, M, nets).expect_err("invalid")
    }

    #[test]
    fn checks_control_inputs() {
        let v = validate_with_controlnets(&with_control("union"), M, &nets()).expect("valid");
        let c = &v.control[0];
        assert_eq!((c.net, c.start, c.end), (0, 0.0, 1.0));
        assert_eq!(c.latents.shape, vec![1, 16, 2, 4]);
        // Empty id = the only one.
        assert!(validate_with_controlnets(&with_control(""), M, &nets()[..1]).is_ok());
        match control_err(&with_control(""), &nets()) {
            StageError::FailedPrecondition(m) => assert!(m.contains("name one"), "{m}"),
            e => panic!("{e:?}"),
        }
        match control_err(&with_control("depth"), &nets()) {
            StageError::FailedPrecondition(m) => assert!(
                m.contains("no ControlNet `depth`; it has [\"union\", \"inpaint\"]"),
                "{m}"
            ),
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            validate(&with_control("union"), M),
            Err(StageError::FailedPrecondition(_))
        ));
        let bad = |f: &dyn Fn(&mut ControlInput)| {
            let mut r = with_control("union");
            f(&mut r.control[0]);
            match control_err(&r, &nets()) {
                StageError::InvalidArgument(m) => m,
                e => panic!("{e:?}"),
            }
        };
        assert!(bad(&|c| c.conditioning_scale = f32::NAN).contains("conditioning_scale"));
        assert!(bad(&|c| (c.guidance_start, c.guidance_end) = (0.5, 0.5)).contains("guidance"));
        assert!(bad(&|c| c.guidance_end = 1.5).contains("guidance"));
        assert!(
            bad(&|c| c.control_latents = Some(from_f32(&[1, 16, 1, 2, 2], &[0.0; 64])))
                .contains("latents' shape")
        );
        assert!(bad(&|c| c.control_latents = None).contains("control_latents"));
        assert!(
            bad(&|c| c.mask = Some(from_f32(&[1, 1, 2, 4], &[1.0; 8]))).contains("takes no mask")
        );
        // The inpainting variant needs the mask.
        let mut r = with_control("inpaint");
        assert!(matches!(
            control_err(&r, &nets()),
            StageError::InvalidArgument(m) if m.contains("needs")
        ));
        r.control[0].mask = Some(from_f32(&[1, 1, 1, 2, 4], &[1.0; 8]));
        let v = validate_with_controlnets(&r, M, &nets()).expect("valid");
        assert_eq!(
            v.control[0].mask.as_ref().map(|m| m.shape.clone()),
            Some(vec![1, 1, 2, 4])
        );
    }
}
