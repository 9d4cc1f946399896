//! One Denoise job on the worker thread: the loop, a Progress event per step, the Result. Stops when the
//! caller goes away or the deadline passes: after the current step, or sooner at the model's next
//! interrupt check (between transformer blocks and attention chunks).

use std::time::Instant;

use candle_core::{DType, Tensor};
use qwen_image_common::metric_names as m;
use qwen_image_common::stage::{JobCtx, StageError};
use qwen_image_common::tensor::{self, HostTensor};
use qwen_image_model::controlnet::ControlUnit;
use qwen_image_model::denoise::{self, Conditioning, DenoiseParams, Flow, InpaintBlend, Outcome};
use qwen_image_model::interrupt::{self, Interrupt};
use qwen_image_model::latents::{pack, unpack};
use qwen_image_model::nn::all_finite;
use qwen_image_model::scheduler::{Schedule, SchedulerConfig};
use qwen_image_model::snapshot::first_line;
use qwen_image_proto::v1::{DenoiseEvent, DenoiseProgress, DenoiseResult, denoise_event::Event};
use tokio::sync::mpsc;
use tonic::Status;

use crate::adapters::ActiveLoras;
use crate::model::LoadedModel;
use crate::validate::{DenoiseInputs, HostConditioning, HostControl, ScheduleInput};

const SERVICE: &str = "denoiser";

/// The response stream of a job; a failed send means the caller went away.
pub type Events = mpsc::Sender<Result<DenoiseEvent, Status>>;

enum Ended {
    Finished(DenoiseResult),
    NonFinite,
    Cancelled,
    DeadlineExceeded { steps_done: usize },
}

/// Runs the loop, streaming a Progress event per step; returns the Result event (sent by the skeleton).
pub fn run(
    model: &LoadedModel,
    inputs: &DenoiseInputs,
    loras: &ActiveLoras,
    ctx: &JobCtx<'_>,
    events: &Events,
) -> Result<DenoiseEvent, StageError> {
    let interrupt = Interrupt::new(ctx.cancel_flag(), ctx.deadline);
    match interrupt::scoped(interrupt, || execute(model, inputs, loras, ctx, events)) {
        Ok(Ended::Finished(result)) => Ok(DenoiseEvent {
            event: Some(Event::Result(result)),
        }),
        Ok(Ended::NonFinite) => Err(StageError::non_finite_output("final latents")),
        Ok(Ended::Cancelled) => {
            tracing::info!("caller went away; job stopped");
            Err(StageError::Cancelled)
        }
        Ok(Ended::DeadlineExceeded { steps_done }) => {
            tracing::info!(steps_done, "deadline passed; job stopped");
            Err(StageError::DeadlineExceeded(format!(
                "after {steps_done} steps; allow more time (grpc-timeout) or request fewer steps"
            )))
        }
        Err(e) => {
            let msg = first_line(&e);
            if !interrupt::is_interrupted(&e) {
                tracing::error!(error = %msg, "denoising failed");
            }
            Err(StageError::Model(msg))
        }
    }
}

/// The request's schedule (its `mu` from the packed token count); the handler builds it once at admission
/// so that a schedule the scheduler refuses is INVALID_ARGUMENT.
pub fn schedule(cfg: &SchedulerConfig, inp: &DenoiseInputs) -> Result<Schedule, String> {
    let seq_len = (inp.latents.shape[2] / 2) * (inp.latents.shape[3] / 2);
    match &inp.schedule {
        ScheduleInput::Steps(n) => Schedule::for_pipeline(cfg, *n, seq_len),
        ScheduleInput::Sigmas(s) => Schedule::new(cfg, s, Some(cfg.mu(seq_len))),
    }
}

pub(crate) fn device_tensor(
    h: &HostTensor<f32>,
    model: &LoadedModel,
) -> candle_core::Result<Tensor> {
    Tensor::from_slice(&h.data, h.shape.as_slice(), &model.device)
}

pub(crate) fn conditioning(
    c: &HostConditioning,
    model: &LoadedModel,
) -> candle_core::Result<Conditioning> {
    let embeds = device_tensor(&c.embeds, model)?;
    let mask = c
        .mask
        .as_ref()
        .map(|m| device_tensor(m, model))
        .transpose()?;
    Ok(Conditioning { embeds, mask })
}

/// Unpacked `[B, C, 1, h, w]` f32 latents as a wire tensor.
pub(crate) fn wire_latents(
    packed: &Tensor,
    h: usize,
    w: usize,
) -> candle_core::Result<qwen_image_proto::v1::Tensor> {
    let t = unpack(packed, h, w)?.to_dtype(DType::F32)?;
    let shape = t.dims().to_vec();
    let data = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(tensor::from_f32(&shape, &data))
}

/// A checked ControlInput as the model's unit: latents (plus `1 - mask` as the last channel for the
/// inpainting variant) packed to `[B, S, cond_channels]`.
fn control_unit<'a>(
    c: &HostControl,
    model: &'a LoadedModel,
) -> candle_core::Result<ControlUnit<'a>> {
    let (_, net) = model
        .controlnets
        .get(c.net)
        .ok_or_else(|| candle_core::Error::Msg(format!("no ControlNet #{}", c.net)))?;
    let lat = device_tensor(&c.latents, model)?;
    let cond = match &c.mask {
        Some(m) => {
            let keep = device_tensor(m, model)?.affine(-1.0, 1.0)?;
            Tensor::cat(&[&lat, &keep], 1)?
        }
        None => lat,
    };
    Ok(ControlUnit {
        net,
        cond: pack(&cond)?,
        scale: c.scale,
        start: c.start,
        end: c.end,
    })
}

/// The packed start latents `[B, S, 4C]`; for img2img / inpaint the image latents noised to
/// `sigma[start_step]` in the model's dtype (diffusers' prepare_latents: scheduler.scale_noise with
/// begin_index = start_step).
pub(crate) fn start_latents(
    model: &LoadedModel,
    inp: &DenoiseInputs,
    schedule: &Schedule,
) -> candle_core::Result<Tensor> {
    let latents = pack(&device_tensor(&inp.latents, model)?)?;
    match &inp.start_noise {
        Some(n) => {
            let dtype = model.transformer.dtype();
            let noise = pack(&device_tensor(n, model)?)?.to_dtype(dtype)?;
            let sigma = schedule
                .sigmas
                .get(inp.start_step)
                .copied()
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("no sigma for start step {}", inp.start_step))
                })?;
            denoise::scale_noise(&latents.to_dtype(dtype)?, &noise, sigma)
        }
        None => Ok(latents),
    }
}

/// The inpaint blending of the request, packed.
pub(crate) fn inpaint_blend(
    model: &LoadedModel,
    inp: &DenoiseInputs,
) -> candle_core::Result<Option<InpaintBlend>> {
    inp.inpaint
        .as_ref()
        .map(|i| {
            Ok(InpaintBlend {
                image_latents: pack(&device_tensor(&i.image_latents, model)?)?,
                noise: pack(&device_tensor(&i.noise, model)?)?,
                mask: pack(&device_tensor(&i.mask, model)?)?,
            })
        })
        .transpose()
}

/// The Progress event after the `done`-th step of `total` (1-based), with the latents as a preview every
/// `every` steps and at the last one (0 = never), and as a checkpoint every `checkpoint_every` steps.
pub(crate) fn progress(
    done: usize,
    total: usize,
    started: Instant,
    timestep: f32,
    latents: &Tensor,
    (lh, lw): (usize, usize),
    every: usize,
    checkpoint_every: usize,
) -> DenoiseProgress {
    let preview_latents = if every > 0 && (done % every == 0 || done == total) {
        match wire_latents(latents, lh, lw) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %first_line(&e), "preview skipped");
                None
            }
        }
    } else {
        None
    };
    // Checkpoints for a caller that may resume elsewhere: not on the last step (the Result has those
    // latents) nor when the preview already carries them.
    let checkpoint_latents = if checkpoint_every > 0
        && done % checkpoint_every == 0
        && done < total
        && preview_latents.is_none()
    {
        match wire_latents(latents, lh, lw) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %first_line(&e), "checkpoint skipped");
                None
            }
        }
    } else {
        None
    };
    DenoiseProgress {
        step: done as u32,
        total_steps: total as u32,
        elapsed_ms: started.elapsed().as_millis() as u64,
        timestep,
        preview_latents,
        checkpoint_latents,
    }
}

fn execute(
    model: &LoadedModel,
    inp: &DenoiseInputs,
    loras: &ActiveLoras,
    ctx: &JobCtx<'_>,
    events: &Events,
) -> candle_core::Result<Ended> {
    let started = ctx.started;
    let (lh, lw) = (inp.latents.shape[2], inp.latents.shape[3]);
    let positive = conditioning(&inp.positive, model)?;
    let negative = inp
        .negative
        .as_ref()
        .map(|n| conditioning(n, model))
        .transpose()?;
    let schedule = schedule(&loras.scheduler, inp).map_err(candle_core::Error::Msg)?;
    let transformer = loras.transformer(&model.transformer)?;
    let latents = start_latents(model, inp, &schedule)?;
    let blend = inpaint_blend(model, inp)?;
    let units = inp
        .control
        .iter()
        .map(|c| control_unit(c, model))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let references = crate::references::to_model(&inp.references, &model.device)?;
    let img_shapes = [(1, lh / 2, lw / 2)];
    let params = DenoiseParams {
        positive: &positive,
        negative: negative.as_ref(),
        true_cfg_scale: inp.true_cfg_scale,
        latents,
        img_shapes: &img_shapes,
        schedule: &schedule,
        start_step: inp.start_step,
        inpaint: blend.as_ref(),
        controlnet: &units,
    };
    let every = inp.preview_every_n_steps;
    let checkpoint_every = inp.checkpoint_every_n_steps;
    let mut stopped_for_deadline = false;
    // One span per step: entered before the step's compute, closed in the callback that ends it (the
    // callback runs on this thread right after the step) once it has recorded the step's timestep.
    let step_span = |step: usize| {
        (
            tracing::info_span!("denoise_step", step, timestep = tracing::field::Empty).entered(),
            Instant::now(),
        )
    };
    let step_seconds = metrics::histogram!(m::DENOISE_STEP_SECONDS, "service" => SERVICE);
    let steps_total = metrics::counter!(m::DENOISE_STEPS_TOTAL, "service" => SERVICE);
    let mut current_step = Some(step_span(inp.start_step));
    let outcome =
        denoise::denoise_with_references(&transformer, &params, references.as_ref(), |s| {
            if let Some((span, step_started)) = current_step.take() {
                step_seconds.record(step_started.elapsed().as_secs_f64());
                span.record("timestep", f64::from(s.timestep));
            }
            let done = s.done + 1;
            ctx.step_done();
            steps_total.increment(1);
            let progress = progress(
                done,
                s.total,
                started,
                s.timestep,
                s.latents,
                (lh, lw),
                every,
                checkpoint_every,
            );
            tracing::debug!(step = done, total = s.total, "denoise step");
            if events
                .blocking_send(Ok(DenoiseEvent {
                    event: Some(Event::Progress(progress)),
                }))
                .is_err()
            {
                return Flow::Stop;
            }
            if ctx.past_deadline() {
                stopped_for_deadline = true;
                return Flow::Stop;
            }
            if done < s.total {
                current_step = Some(step_span(s.step + 1));
            }
            Flow::Continue
        })?;
    Ok(match outcome {
        Outcome::Finished(final_latents) if !all_finite(&final_latents)? => Ended::NonFinite,
        Outcome::Finished(final_latents) => Ended::Finished(DenoiseResult {
            latents: Some(wire_latents(&final_latents, lh, lw)?),
            sigmas: schedule.sigmas.clone(),
            elapsed_ms: started.elapsed().as_millis() as u64,
        }),
        Outcome::Stopped { steps_done } if stopped_for_deadline => {
            Ended::DeadlineExceeded { steps_done }
        }
        Outcome::Stopped { .. } => Ended::Cancelled,
    })
}
