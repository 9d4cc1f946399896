//! `FlowMatchEulerDiscreteScheduler` as the Qwen-Image pipelines use it (diffusers
//! `schedulers/scheduling_flow_match_euler_discrete.py`, 0.42.1), reproducing numpy's float32 arithmetic.
//!
//! `set_timesteps(sigmas=linspace(1, 1/N, N), mu)`: dynamic (exponential or linear) time shift with `mu`
//! computed from the packed image-token count, then the stretch to `shift_terminal`, then a final 0.

use serde::Deserialize;

fn d_1000() -> usize {
    1000
}
fn d_one() -> f64 {
    1.0
}
fn d_base_seq() -> usize {
    256
}
fn d_max_seq() -> usize {
    4096
}
fn d_base_shift() -> f64 {
    0.5
}
fn d_max_shift() -> f64 {
    1.15
}
fn d_exponential() -> String {
    "exponential".into()
}

/// `scheduler/scheduler_config.json`. Defaults are diffusers' class defaults (which differ from the
/// released Qwen-Image config: that one sets `max_image_seq_len 8192`, `max_shift 0.9`,
/// `shift_terminal 0.02`, `use_dynamic_shifting true`). Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "d_1000")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_one")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default = "d_base_shift")]
    pub base_shift: f64,
    #[serde(default = "d_max_shift")]
    pub max_shift: f64,
    #[serde(default = "d_base_seq")]
    pub base_image_seq_len: usize,
    #[serde(default = "d_max_seq")]
    pub max_image_seq_len: usize,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default = "d_exponential")]
    pub time_shift_type: String,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
}

impl SchedulerConfig {
    /// The released Qwen/Qwen-Image `scheduler_config.json` (denoiser-and-pipelines.md §1.2).
    pub fn qwen_image() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: true,
            base_shift: 0.5,
            max_shift: 0.9,
            base_image_seq_len: 256,
            max_image_seq_len: 8192,
            shift_terminal: Some(0.02),
            time_shift_type: "exponential".into(),
            invert_sigmas: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            stochastic_sampling: false,
        }
    }

    /// Rejects options the Qwen pipelines never use and this scheduler does not implement.
    pub fn validate(&self) -> Result<(), String> {
        if self.invert_sigmas
            || self.use_karras_sigmas
            || self.use_exponential_sigmas
            || self.use_beta_sigmas
        {
            return Err(
                "scheduler config: invert/karras/exponential/beta sigmas are not supported".into(),
            );
        }
        if self.stochastic_sampling {
            return Err("scheduler config: stochastic_sampling is not supported".into());
        }
        if !matches!(self.time_shift_type.as_str(), "exponential" | "linear") {
            return Err(format!(
                "scheduler config: unknown time_shift_type `{}`",
                self.time_shift_type
            ));
        }
        Ok(())
    }

    /// `calculate_shift(image_seq_len, base_seq, max_seq, base_shift, max_shift)` with this config's values
    /// (what `QwenImagePipeline.__call__` passes). Not clamped.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }
}

/// `np.linspace(1.0, 1/N, N)` in float64 (the pipeline's default `sigmas`).
pub fn default_input_sigmas(steps: usize) -> Vec<f64> {
    if steps == 1 {
        return vec![1.0];
    }
    let end = 1.0 / steps as f64;
    let step = (end - 1.0) / (steps - 1) as f64;
    let mut v: Vec<f64> = (0..steps).map(|i| 1.0 + i as f64 * step).collect();
    // numpy sets the last sample to `stop` exactly
    if let Some(last) = v.last_mut() {
        *last = end;
    }
    v
}

/// A computed schedule: `sigmas` has `N + 1` entries ending in 0, `timesteps = sigmas[..N] · 1000`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f32>,
    pub mu: Option<f64>,
}

impl Schedule {
    /// `set_timesteps(sigmas=input_sigmas, mu=mu)`.
    pub fn new(
        cfg: &SchedulerConfig,
        input_sigmas: &[f64],
        mu: Option<f64>,
    ) -> Result<Self, String> {
        cfg.validate()?;
        if input_sigmas.is_empty() {
            return Err("at least one sigma is needed".into());
        }
        if input_sigmas.iter().any(|s| !(*s > 0.0 && *s <= 1.0)) {
            return Err("sigmas must lie in (0, 1]".into());
        }
        let s: Vec<f32> = input_sigmas.iter().map(|&v| v as f32).collect();
        let shifted: Vec<f32> = if cfg.use_dynamic_shifting {
            let mu = mu.ok_or("mu must be given when use_dynamic_shifting is set")?;
            match cfg.time_shift_type.as_str() {
                // math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0), numpy f32 with a weak python float
                "exponential" => {
                    let e = mu.exp() as f32;
                    s.iter().map(|&t| e / (e + (1.0f32 / t - 1.0))).collect()
                }
                _ => {
                    let m = mu as f32;
                    s.iter().map(|&t| m / (m + (1.0f32 / t - 1.0))).collect()
                }
            }
        } else {
            let sh = cfg.shift as f32;
            s.iter().map(|&t| sh * t / (1.0 + (sh - 1.0) * t)).collect()
        };
        let mut sigmas: Vec<f32> = match cfg.shift_terminal {
            Some(term) if term != 0.0 => {
                // stretch_shift_to_terminal
                let last = 1.0f32 - shifted[shifted.len() - 1];
                if last <= 0.0 {
                    // diffusers divides 0 by 0 here (a one-step schedule gives NaN sigmas)
                    return Err(format!(
                        "a schedule of {} step(s) ending at sigma 1 cannot be stretched to shift_terminal {term}; \
                         use at least 2 steps",
                        shifted.len()
                    ));
                }
                let scale = last / (1.0f32 - term as f32);
                shifted
                    .iter()
                    .map(|&t| 1.0f32 - (1.0f32 - t) / scale)
                    .collect()
            }
            _ => shifted,
        };
        let n = cfg.num_train_timesteps as f32;
        let timesteps: Vec<f32> = sigmas.iter().map(|&v| v * n).collect();
        sigmas.push(0.0);
        Ok(Self {
            sigmas,
            timesteps,
            mu: if cfg.use_dynamic_shifting { mu } else { None },
        })
    }

    /// The schedule `QwenImagePipeline` uses for `steps` steps at `image_seq_len` packed tokens.
    pub fn for_pipeline(
        cfg: &SchedulerConfig,
        steps: usize,
        image_seq_len: usize,
    ) -> Result<Self, String> {
        if steps == 0 {
            return Err("steps must be at least 1".into());
        }
        Self::new(
            cfg,
            &default_input_sigmas(steps),
            Some(cfg.mu(image_seq_len)),
        )
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    /// `t / 1000` as the transformer receives it (f32 pipeline: `t.expand(B).to(f32) / 1000`).
    pub fn model_timestep(&self, i: usize) -> f32 {
        self.timesteps[i] / 1000.0
    }

    /// `sigma_{i+1} - sigma_i`: the Euler step factor of step `i`.
    pub fn dt(&self, i: usize) -> f32 {
        self.sigmas[i + 1] - self.sigmas[i]
    }
}

/// img2img / inpaint: `t_start = int(max(N - min(N·strength, N), 0))` in float64 with truncation.
pub fn strength_start(steps: usize, strength: f64) -> usize {
    let n = steps as f64;
    let init = (n * strength).min(n);
    (n - init).max(0.0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    // Golden lists: denoiser-and-pipelines.md §11 (diffusers 0.42.1, released config).
    #[test]
    fn sigmas_1024_50_steps() {
        let cfg = SchedulerConfig::qwen_image();
        assert!((cfg.mu(4096) - 0.6935483870967742).abs() < 1e-15);
        let s = Schedule::for_pipeline(&cfg, 50, 4096).unwrap();
        let want = [
            1.00000000, 0.98970091, 0.97919148, 0.96846533, 0.95751566, 0.94633532, 0.93491709,
            0.92325306, 0.91133547, 0.89915574, 0.88670534, 0.87397492, 0.86095506, 0.84763587,
            0.83400667, 0.82005662, 0.80577433, 0.79114771, 0.77616411, 0.76081049, 0.74507278,
            0.72893631, 0.71238601, 0.69540554, 0.67797804, 0.66008556, 0.64170921, 0.62282920,
            0.60342437, 0.58347261, 0.56295049, 0.54183316, 0.52009439, 0.49770635, 0.47463942,
            0.45086229, 0.42634165, 0.40104216, 0.37492591, 0.34795296, 0.32008022, 0.29126203,
            0.26144940, 0.23059005, 0.19862771, 0.16550225, 0.13114905, 0.09549850, 0.05847579,
            0.01999998, 0.00000000,
        ];
        close(&s.sigmas, &want, 2e-7);
        assert_eq!(s.steps(), 50);
    }

    #[test]
    fn sigmas_1328_30_steps() {
        let cfg = SchedulerConfig::qwen_image();
        assert!((cfg.mu(6889) - 0.8343245967741936).abs() < 1e-15);
        let s = Schedule::for_pipeline(&cfg, 30, 6889).unwrap();
        let want = [
            1.00000000, 0.98439640, 0.96818125, 0.95131761, 0.93376601, 0.91548336, 0.89642310,
            0.87653434, 0.85576212, 0.83404619, 0.81132054, 0.78751326, 0.76254529, 0.73632932,
            0.70876968, 0.67976034, 0.64918369, 0.61690927, 0.58279157, 0.54666805, 0.50835657,
            0.46765208, 0.42432302, 0.37810731, 0.32870638, 0.27577919, 0.21893436, 0.15772003,
            0.09161228, 0.01999998, 0.00000000,
        ];
        close(&s.sigmas, &want, 2e-7);
    }

    #[test]
    fn short_schedules() {
        let cfg = SchedulerConfig::qwen_image();
        let s = Schedule::for_pipeline(&cfg, 4, 4096).unwrap();
        close(
            &s.sigmas,
            &[1.0, 0.76670933, 0.45561373, 0.01999998, 0.0],
            2e-7,
        );
        // 512x768: seq 32*48 = 1536
        assert!((cfg.mu(1536) - 0.5645161290322581).abs() < 1e-15);
        let s = Schedule::for_pipeline(&cfg, 8, 1536).unwrap();
        close(
            &s.sigmas,
            &[
                1.0, 0.90787470, 0.80461371, 0.68806779, 0.55549729, 0.40335315, 0.22695476,
                0.01999998, 0.0,
            ],
            2e-7,
        );
        assert!((s.timesteps[1] - 907.8747).abs() < 1e-3);
    }

    #[test]
    fn lightning_config_and_plain_default() {
        // Lightning: base_shift = max_shift = ln 3, no terminal stretch.
        let mut cfg = SchedulerConfig::qwen_image();
        cfg.base_shift = 3f64.ln();
        cfg.max_shift = 3f64.ln();
        cfg.shift_terminal = None;
        let s = Schedule::for_pipeline(&cfg, 8, 4096).unwrap();
        close(
            &s.sigmas,
            &[
                1.0, 0.9545455, 0.9, 0.8333334, 0.75, 0.6428571, 0.5, 0.3, 0.0,
            ],
            2e-7,
        );
        // diffusers' default config (the test suite's scheduler): sigmas unchanged.
        let cfg: SchedulerConfig = serde_json::from_str("{}").unwrap();
        let s = Schedule::for_pipeline(&cfg, 2, 16).unwrap();
        assert_eq!(s.sigmas, vec![1.0, 0.5, 0.0]);
        assert_eq!(s.timesteps, vec![1000.0, 500.0]);
    }

    #[test]
    fn one_step_with_terminal_stretch_is_an_error_not_nan() {
        let cfg = SchedulerConfig::qwen_image();
        let err = Schedule::for_pipeline(&cfg, 1, 4096).unwrap_err();
        assert!(err.contains("at least 2 steps"), "{err}");
        // without the terminal stretch one step is fine: [1, 0]
        let mut plain = cfg.clone();
        plain.shift_terminal = None;
        assert_eq!(
            Schedule::for_pipeline(&plain, 1, 4096).unwrap().sigmas,
            vec![1.0, 0.0]
        );
    }

    #[test]
    fn strength_start_matches_reference() {
        assert_eq!(strength_start(50, 0.6), 20);
        assert_eq!(strength_start(10, 0.7), 3);
        assert_eq!(strength_start(30, 0.9), 3);
        assert_eq!(strength_start(28, 1.0), 0);
    }

    #[test]
    fn config_ignores_unknown_keys() {
        let cfg: SchedulerConfig = serde_json::from_str(
            r#"{"_class_name":"FlowMatchEulerDiscreteScheduler","use_dynamic_shifting":true,"max_shift":0.9,
                "max_image_seq_len":8192,"shift_terminal":0.02,"some_future_key":[1,2]}"#,
        )
        .unwrap();
        assert!(cfg.use_dynamic_shifting);
        assert_eq!(cfg.max_image_seq_len, 8192);
    }
}
