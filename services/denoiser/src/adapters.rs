//! LoRA adapters of the denoiser: the `--lora NAME=FILE` flags, what the handler knows of them before the
//! worker loads (names, scheduler sidecars, the description), a request's adapter list and scheduler checked at
//! admission, the adapters the worker holds, and the transformer a request runs (the base one with the
//! adapters' terms attached; weights shared, see `qwen_image_model::lora`).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use qwen_image_common::stage::StageError;
use qwen_image_common::stage::describe::digest;
use qwen_image_model::candle_core::{self, DType, Device};
use qwen_image_model::lora::{self, LoraAdapter};
use qwen_image_model::scheduler::SchedulerConfig;
use qwen_image_model::snapshot::first_line;
use qwen_image_model::transformer::QwenImageTransformer;
use qwen_image_proto::v1::{LoraDescription, LoraRef, SchedulerOverride};

/// Most adapters in one request.
pub const MAX_LORAS: usize = 8;
/// Largest |scale| a request may give an adapter.
pub const MAX_SCALE: f32 = 100.0;

/// One `--lora NAME=FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraSpec {
    pub name: String,
    pub file: PathBuf,
}

/// `--lora` parser: `NAME=FILE`, or `FILE` (name = the file name without its extension).
pub fn parse_lora(s: &str) -> Result<LoraSpec, String> {
    let (name, file) = match s.split_once('=') {
        Some((n, f)) => (n.to_string(), PathBuf::from(f)),
        None => {
            let file = PathBuf::from(s);
            let stem = file
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (stem, file)
        }
    };
    if name.is_empty() || file.as_os_str().is_empty() {
        return Err(format!(
            "`{s}`: use NAME=FILE (e.g. lightning=/loras/Qwen-Image-Lightning-4steps.safetensors)"
        ));
    }
    Ok(LoraSpec { name, file })
}

/// What requests are checked against: each adapter's name and the scheduler config it came with.
#[derive(Debug, Clone, Default)]
pub struct LoraCatalog {
    pub entries: Vec<(String, Option<SchedulerConfig>)>,
}

impl LoraCatalog {
    fn names(&self) -> String {
        if self.entries.is_empty() {
            return "none (start the denoiser with --lora NAME=FILE)".into();
        }
        self.entries
            .iter()
            .map(|(n, _)| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Reads the `--lora` headers and sidecars (cheap): refuses duplicate names and unreadable files before the
/// service listens; returns the catalog and the `StageDescription.loras`.
pub fn prepare(
    specs: &[LoraSpec],
    dtype_bytes: usize,
) -> Result<(LoraCatalog, Vec<LoraDescription>), String> {
    let mut catalog = LoraCatalog::default();
    let mut described = Vec::new();
    for spec in specs {
        if catalog.entries.iter().any(|(n, _)| *n == spec.name) {
            return Err(format!(
                "two LoRA adapters are named `{}`; name them apart with --lora NAME=FILE",
                spec.name
            ));
        }
        let what = |e: &dyn std::fmt::Display| format!("LoRA `{}`: {e}", spec.name);
        let (modules, values) = lora::inspect(&spec.file).map_err(|e| what(&first_line(&e)))?;
        let sidecar = lora::sidecar_path(&spec.file);
        let scheduler = if sidecar.is_file() {
            let cfg: SchedulerConfig = qwen_image_model::snapshot::read_json(&sidecar)
                .map_err(|e| what(&first_line(&e)))?;
            cfg.validate()
                .map_err(|e| what(&format!("{}: {e}", sidecar.display())))?;
            Some(cfg)
        } else {
            None
        };
        let dir = spec.file.parent().unwrap_or(Path::new("."));
        let mut files = vec![file_name(&spec.file)];
        if scheduler.is_some() {
            files.push(file_name(&sidecar));
        }
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        let digest = digest(dir, &files, false).map_err(|e| what(&e))?;
        described.push(LoraDescription {
            name: spec.name.clone(),
            digest,
            modules: modules as u32,
            bytes: (values * dtype_bytes) as u64,
            has_scheduler: scheduler.is_some(),
        });
        catalog.entries.push((spec.name.clone(), scheduler));
    }
    Ok((catalog, described))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A request's adapters (index in the catalog, scale) and the scheduler config its schedule is built from.
#[derive(Debug, Clone)]
pub struct RequestLoras {
    pub loras: Vec<(usize, f64)>,
    pub scheduler: SchedulerConfig,
}

/// Checks `loras` and `scheduler` of a request: names the catalog holds (NOT_FOUND listing them), at most
/// [`MAX_LORAS`], distinct, finite scales; the scheduler is the first named adapter's sidecar config, else
/// `served`, with the request's override on top.
pub fn check(
    loras: &[LoraRef],
    scheduler: Option<&SchedulerOverride>,
    catalog: &LoraCatalog,
    served: &SchedulerConfig,
) -> Result<RequestLoras, StageError> {
    if loras.len() > MAX_LORAS {
        return Err(StageError::InvalidArgument(format!(
            "loras: {} adapters given, at most {MAX_LORAS}",
            loras.len()
        )));
    }
    let mut out = Vec::with_capacity(loras.len());
    for (i, r) in loras.iter().enumerate() {
        let Some(idx) = catalog.entries.iter().position(|(n, _)| *n == r.name) else {
            return Err(StageError::NotFound(format!(
                "loras[{i}]: no LoRA adapter `{}` is loaded; loaded: {}",
                r.name,
                catalog.names()
            )));
        };
        if out.iter().any(|(j, _)| *j == idx) {
            return Err(StageError::InvalidArgument(format!(
                "loras[{i}]: `{}` is named twice; give each adapter once with its scale",
                r.name
            )));
        }
        let scale = r.scale.unwrap_or(1.0);
        if !scale.is_finite() || scale.abs() > MAX_SCALE {
            return Err(StageError::InvalidArgument(format!(
                "loras[{i}].scale: {scale} for `{}`; send a finite value within ±{MAX_SCALE} (absent = 1)",
                r.name
            )));
        }
        out.push((idx, f64::from(scale)));
    }
    let mut cfg = out
        .iter()
        .find_map(|(i, _)| catalog.entries[*i].1.clone())
        .unwrap_or_else(|| served.clone());
    if let Some(o) = scheduler {
        apply_override(&mut cfg, o)?;
    }
    Ok(RequestLoras {
        loras: out,
        scheduler: cfg,
    })
}

/// Sets the fields `o` gives; refuses values the scheduler cannot use.
pub fn apply_override(cfg: &mut SchedulerConfig, o: &SchedulerOverride) -> Result<(), StageError> {
    let bad = |field: &str, what: String| {
        StageError::InvalidArgument(format!("scheduler.{field}: {what}"))
    };
    let finite = |field: &str, v: f64| {
        if v.is_finite() && v.abs() <= 1e3 {
            Ok(v)
        } else {
            Err(bad(field, format!("{v}; send a finite value within ±1000")))
        }
    };
    if let Some(v) = o.shift {
        let v = finite("shift", v)?;
        if v <= 0.0 {
            return Err(bad("shift", format!("{v}; must be > 0")));
        }
        cfg.shift = v;
    }
    if let Some(v) = o.use_dynamic_shifting {
        cfg.use_dynamic_shifting = v;
    }
    if let Some(v) = o.base_shift {
        cfg.base_shift = finite("base_shift", v)?;
    }
    if let Some(v) = o.max_shift {
        cfg.max_shift = finite("max_shift", v)?;
    }
    if let Some(v) = o.base_image_seq_len {
        cfg.base_image_seq_len = v as usize;
    }
    if let Some(v) = o.max_image_seq_len {
        cfg.max_image_seq_len = v as usize;
    }
    if cfg.base_image_seq_len == cfg.max_image_seq_len && cfg.use_dynamic_shifting {
        return Err(bad(
            "max_image_seq_len",
            format!(
                "equals base_image_seq_len ({}); mu would divide by zero",
                cfg.base_image_seq_len
            ),
        ));
    }
    if let Some(v) = o.shift_terminal {
        let v = finite("shift_terminal", v)?;
        if !(0.0..1.0).contains(&v) {
            return Err(bad("shift_terminal", format!("{v}; send 0 (none) or a value in (0, 1)")));
        }
        cfg.shift_terminal = (v != 0.0).then_some(v);
    }
    if let Some(v) = &o.time_shift_type {
        cfg.time_shift_type = v.clone();
    }
    cfg.validate()
        .map_err(|e| bad("time_shift_type", format!("{e}; send `exponential` or `linear`")))
}

/// Loads every `--lora` for `transformer` (on the worker): factors in the stage dtype on its device.
pub fn load_all(
    specs: &[LoraSpec],
    transformer: &QwenImageTransformer,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Vec<LoraAdapter>> {
    let targets = lora::targets(transformer)?;
    specs
        .iter()
        .map(|s| {
            let a = LoraAdapter::load(&s.file, &targets, dtype, device).map_err(|e| {
                candle_core::Error::Msg(format!("LoRA `{}`: {}", s.name, first_line(&e)))
            })?;
            tracing::info!(name = %s.name, file = %s.file.display(), modules = a.modules.len(), bytes = a.bytes,
                           "LoRA adapter loaded");
            Ok(a)
        })
        .collect()
}

/// The transformer a request runs: the base one, or a copy (weights shared) with its adapters attached.
pub fn transformer_for<'a>(
    base: &'a QwenImageTransformer,
    adapters: &[LoraAdapter],
    req: &RequestLoras,
) -> candle_core::Result<Cow<'a, QwenImageTransformer>> {
    if req.loras.is_empty() {
        return Ok(Cow::Borrowed(base));
    }
    let list: Vec<(&LoraAdapter, f64)> = req
        .loras
        .iter()
        .map(|(i, s)| {
            adapters
                .get(*i)
                .map(|a| (a, *s))
                .ok_or_else(|| candle_core::Error::Msg(format!("no LoRA adapter #{i}")))
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(Cow::Owned(lora::apply(base, &list)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn catalog() -> LoraCatalog {
        let mut light = SchedulerConfig::qwen_image();
        light.base_shift = 3f64.ln();
        light.max_shift = 3f64.ln();
        light.shift_terminal = None;
        LoraCatalog {
            entries: vec![("style".into(), None), ("lightning".into(), Some(light))],
        }
    }

    fn r(name: &str, scale: Option<f32>) -> LoraRef {
        LoraRef {
            name: name.into(),
            scale,
        }
    }

    fn code(e: StageError) -> (Code, String) {
        let s = tonic::Status::from(e);
        (s.code(), s.message().to_string())
    }

    #[test]
    fn parses_lora_flags() {
        let s = parse_lora("light=/x/a.safetensors").expect("ok");
        assert_eq!((s.name.as_str(), s.file.as_path()), ("light", Path::new("/x/a.safetensors")));
        assert_eq!(parse_lora("/x/Lightning-4.safetensors").expect("ok").name, "Lightning-4");
        assert!(parse_lora("=/x").is_err());
        assert!(parse_lora("a=").is_err());
    }

    #[test]
    fn unknown_adapter_is_not_found_naming_the_loaded_ones() {
        let served = SchedulerConfig::qwen_image();
        let e = check(&[r("nope", None)], None, &catalog(), &served).expect_err("unknown");
        let (c, m) = code(e);
        assert_eq!(c, Code::NotFound);
        assert!(m.contains("`nope`") && m.contains("`style`, `lightning`"), "{m}");
        let (c, m) = code(check(&[r("x", None)], None, &LoraCatalog::default(), &served).expect_err("none"));
        assert_eq!(c, Code::NotFound);
        assert!(m.contains("--lora NAME=FILE"), "{m}");
    }

    #[test]
    fn bad_scales_and_duplicates_are_invalid_argument() {
        let served = SchedulerConfig::qwen_image();
        for bad in [
            vec![r("style", Some(f32::NAN))],
            vec![r("style", Some(1e3))],
            vec![r("style", None), r("style", Some(0.5))],
            (0..9).map(|_| r("style", None)).collect(),
        ] {
            let (c, _) = code(check(&bad, None, &catalog(), &served).expect_err("bad"));
            assert_eq!(c, Code::InvalidArgument);
        }
    }

    #[test]
    fn scheduler_comes_from_the_first_adapter_with_a_sidecar_then_the_override() {
        let served = SchedulerConfig::qwen_image();
        let got = check(&[r("style", Some(0.5)), r("lightning", None)], None, &catalog(), &served)
            .expect("ok");
        assert_eq!(got.loras, vec![(0, 0.5), (1, 1.0)]);
        assert_eq!(got.scheduler.max_shift, 3f64.ln());
        assert_eq!(got.scheduler.shift_terminal, None);
        let plain = check(&[r("style", None)], None, &catalog(), &served).expect("ok");
        assert_eq!(plain.scheduler.shift_terminal, Some(0.02));
        let o = SchedulerOverride {
            shift_terminal: Some(0.0),
            base_shift: Some(1.0),
            max_shift: Some(1.0),
            ..Default::default()
        };
        let over = check(&[], Some(&o), &catalog(), &served).expect("ok");
        assert_eq!((over.scheduler.base_shift, over.scheduler.shift_terminal), (1.0, None));
        for bad in [
            SchedulerOverride {
                time_shift_type: Some("cubic".into()),
                ..Default::default()
            },
            SchedulerOverride {
                shift_terminal: Some(1.5),
                ..Default::default()
            },
            SchedulerOverride {
                max_image_seq_len: Some(256),
                ..Default::default()
            },
            SchedulerOverride {
                base_shift: Some(f64::INFINITY),
                ..Default::default()
            },
        ] {
            let (c, m) = code(check(&[], Some(&bad), &catalog(), &served).expect_err("bad"));
            assert_eq!(c, Code::InvalidArgument, "{m}");
            assert!(m.starts_with("scheduler."), "{m}");
        }
    }
}
