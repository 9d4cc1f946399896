//! Resuming a denoising loop on another replica from the last latents it streamed: the gateway asks the
//! denoiser for checkpoint latents every [`CHECKPOINT_EVERY_STEPS`] steps (`checkpoint_every_n_steps`;
//! preview latents count too), keeps the last ones, and when the replica dies the retry is the same request
//! with those latents, no `start_noise` and `start_step` advanced by the steps they stand for. The
//! flow-match Euler loop is deterministic and the latents travel as f32 (exact for the model's dtype), so
//! the result is the same bytes as an undisturbed run. The retry's progress events are shifted back to the
//! request's own step numbers.
//!
//! Requests with ControlNets restart from their first step instead: the denoiser places a ControlNet's
//! guidance window relative to the request's first step (as diffusers does for a shortened schedule), so
//! a resumed request would place it differently.

use std::sync::Mutex;

use qwen_image_proto::v1::{DenoiseProgress, DenoiseRequest, Tensor};

/// Steps between checkpoint latents (rounded up to a multiple of the preview period when previews are
/// asked for, so that a resumed loop sends its previews at the same steps).
pub const CHECKPOINT_EVERY_STEPS: u32 = 5;
/// Counts the denoising loops that were resumed from checkpoint latents on another replica.
pub const RESUMED_TOTAL: &str = "qwen_image_gateway_denoise_resumed_total";

/// The last checkpoint of one request's denoising loop.
#[derive(Debug)]
pub struct Resume {
    /// Whether the loop may be resumed mid-way (no ControlNets).
    resumable: bool,
    /// Steps done (counted from the request's first step) and the latents after them.
    last: Mutex<Option<(u32, Tensor)>>,
}

/// One attempt of the loop: how far the replica's own step numbers are shifted.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    resume: &'a Resume,
    /// Steps the attempt starts after (0 = from the request's first step).
    pub offset: u32,
}

impl Resume {
    /// Sets the request's checkpoint period; ControlNet requests are not resumed (see the module).
    pub fn prepare(req: &mut DenoiseRequest) -> Self {
        let resumable = req.control.is_empty();
        if resumable {
            let preview = req.preview_every_n_steps;
            req.checkpoint_every_n_steps = if preview > 0 {
                CHECKPOINT_EVERY_STEPS.div_ceil(preview) * preview
            } else {
                CHECKPOINT_EVERY_STEPS
            };
        }
        Self {
            resumable,
            last: Mutex::new(None),
        }
    }

    /// The request of the next attempt: `base` itself, or resumed from the last checkpoint.
    pub fn attempt(&self, base: &DenoiseRequest) -> (DenoiseRequest, Attempt<'_>) {
        let last = self
            .last
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|(d, t)| (*d, t.clone())));
        let Some((done, latents)) = last else {
            return (
                base.clone(),
                Attempt {
                    resume: self,
                    offset: 0,
                },
            );
        };
        tracing::warn!(
            from_step = done,
            "resuming the denoising loop from checkpoint latents on another replica"
        );
        metrics::counter!(RESUMED_TOTAL).increment(1);
        let req = DenoiseRequest {
            latents: Some(latents),
            start_noise: None,
            start_step: base.start_step + done,
            ..base.clone()
        };
        (
            req,
            Attempt {
                resume: self,
                offset: done,
            },
        )
    }
}

impl Attempt<'_> {
    /// Shifts a progress event of this attempt to the request's step numbers and keeps its latents
    /// (checkpoint or preview) as the last checkpoint, unless it is the last step.
    pub fn observe(&self, pr: &mut DenoiseProgress) {
        pr.step += self.offset;
        pr.total_steps += self.offset;
        let latents = pr
            .checkpoint_latents
            .take()
            .or_else(|| pr.preview_latents.clone());
        if let Some(l) = latents
            && self.resume.resumable
            && pr.step < pr.total_steps
            && let Ok(mut last) = self.resume.last.lock()
        {
            *last = Some((pr.step, l));
        }
    }
}

#[cfg(test)]
mod tests {
    use qwen_image_proto::v1::ControlInput;

    use super::*;

    fn latents(v: u8) -> Tensor {
        Tensor {
            data: vec![v; 4].into(),
            ..Default::default()
        }
    }

    #[test]
    fn resumes_from_the_last_checkpoint_with_shifted_steps() {
        let mut base = DenoiseRequest {
            steps: 20,
            start_step: 2,
            latents: Some(latents(0)),
            start_noise: Some(latents(9)),
            preview_every_n_steps: 4,
            ..Default::default()
        };
        let resume = Resume::prepare(&mut base);
        assert_eq!(
            base.checkpoint_every_n_steps, 8,
            "a multiple of the preview period"
        );
        let (first, a) = resume.attempt(&base);
        assert_eq!((first.start_step, a.offset), (2, 0));
        for (step, ck) in [(8, Some(latents(8))), (9, None), (16, Some(latents(16)))] {
            let mut pr = DenoiseProgress {
                step,
                total_steps: 18,
                checkpoint_latents: ck,
                ..Default::default()
            };
            a.observe(&mut pr);
        }
        // The last step's latents (the result's) are never a checkpoint.
        a.observe(&mut DenoiseProgress {
            step: 18,
            total_steps: 18,
            preview_latents: Some(latents(18)),
            ..Default::default()
        });
        let (second, b) = resume.attempt(&base);
        assert_eq!(b.offset, 16);
        assert_eq!(second.start_step, 18, "2 + 16 steps done");
        assert_eq!(second.latents, Some(latents(16)));
        assert_eq!(second.start_noise, None, "the checkpoint is already noised");
        let mut pr = DenoiseProgress {
            step: 1,
            total_steps: 2,
            ..Default::default()
        };
        b.observe(&mut pr);
        assert_eq!(
            (pr.step, pr.total_steps),
            (17, 18),
            "the request's own numbers"
        );
    }

    #[test]
    fn controlnet_requests_start_over() {
        let mut base = DenoiseRequest {
            steps: 20,
            control: vec![ControlInput::default()],
            ..Default::default()
        };
        let resume = Resume::prepare(&mut base);
        assert_eq!(base.checkpoint_every_n_steps, 0);
        let (_, a) = resume.attempt(&base);
        a.observe(&mut DenoiseProgress {
            step: 5,
            total_steps: 20,
            preview_latents: Some(latents(5)),
            ..Default::default()
        });
        let (again, b) = resume.attempt(&base);
        assert_eq!((again.start_step, b.offset), (0, 0));
    }
}
