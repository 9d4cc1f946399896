//! LoRA adapters of the denoiser: the `--lora NAME=FILE` flags, what the handler knows of them before the
//! worker loads (names, scheduler sidecars, the description), a request's adapter list and scheduler checked at
//! admission, the adapters the worker holds, and the transformer a request runs (the base one with the
//! adapters' terms attached; weights shared, see `qwen_image_model::lora`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use qwen_image_common::stage::StageError;
use qwen_image_common::stage::describe::digest;
use qwen_image_model::candle_core;
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

/// One adapter as the handlers know it: its description, the scheduler config it came with, and when a request
/// last named it (for the byte-bounded LRU).
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    pub description: LoraDescription,
    pub scheduler: Option<SchedulerConfig>,
    last_used: u64,
}

#[derive(Debug, Default)]
struct Catalog {
    entries: Vec<CatalogEntry>,
    clock: u64,
}

/// The adapters requests may name, shared by the Denoise handler (checks, LRU clock) and the LoraAdmin handlers
/// (which change it after the worker has); the worker holds the factors ([`HeldLoras`]).
#[derive(Debug, Clone, Default)]
pub struct LoraCatalog(Arc<RwLock<Catalog>>);

impl LoraCatalog {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Catalog> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `` `a`, `b` `` or a hint when none is loaded.
    pub fn names(&self) -> String {
        let c = self.read();
        if c.entries.is_empty() {
            return "none (start the denoiser with --lora NAME=FILE, or use LoraAdmin.LoadLora)"
                .into();
        }
        c.entries
            .iter()
            .map(|e| format!("`{}`", e.description.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn contains(&self, name: &str) -> bool {
        self.read()
            .entries
            .iter()
            .any(|e| e.description.name == name)
    }

    /// Descriptions, least recently used first.
    pub fn list(&self) -> Vec<LoraDescription> {
        let c = self.read();
        let mut v: Vec<&CatalogEntry> = c.entries.iter().collect();
        v.sort_by_key(|e| e.last_used);
        v.into_iter().map(|e| e.description.clone()).collect()
    }

    pub fn insert(&self, mut entry: CatalogEntry) {
        let mut c = self.write();
        c.clock += 1;
        entry.last_used = c.clock;
        c.entries
            .retain(|e| e.description.name != entry.description.name);
        c.entries.push(entry);
    }

    pub fn remove(&self, names: &[String]) {
        self.write()
            .entries
            .retain(|e| !names.contains(&e.description.name));
    }

    /// The adapters to evict, least recently used first, so that `new_bytes` more fit within `budget` (0 =
    /// unbounded); an error when the new adapter alone does not fit.
    pub fn victims(&self, new_bytes: u64, budget: u64) -> Result<Vec<String>, String> {
        if budget == 0 {
            return Ok(Vec::new());
        }
        if new_bytes > budget {
            return Err(format!(
                "the adapter takes {new_bytes} bytes, more than the whole LoRA budget ({budget} bytes,                  --lora-budget-mb)"
            ));
        }
        let c = self.read();
        let mut v: Vec<&CatalogEntry> = c.entries.iter().collect();
        v.sort_by_key(|e| e.last_used);
        let mut used: u64 = v.iter().map(|e| e.description.bytes).sum();
        let mut out = Vec::new();
        for e in v {
            if used + new_bytes <= budget {
                break;
            }
            used -= e.description.bytes;
            out.push(e.description.name.clone());
        }
        Ok(out)
    }
}

/// Reads an adapter's header and sidecar (cheap): its description and scheduler config.
pub fn describe(spec: &LoraSpec, dtype_bytes: usize) -> Result<CatalogEntry, String> {
    let what = |e: &dyn std::fmt::Display| format!("LoRA `{}`: {e}", spec.name);
    let (modules, values) = lora::inspect(&spec.file).map_err(|e| what(&first_line(&e)))?;
    if modules == 0 {
        return Err(what(&format!(
            "{} holds no LoRA tensor",
            spec.file.display()
        )));
    }
    let sidecar = lora::sidecar_path(&spec.file);
    let scheduler = if sidecar.is_file() {
        let cfg: SchedulerConfig =
            qwen_image_model::snapshot::read_json(&sidecar).map_err(|e| what(&first_line(&e)))?;
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
    Ok(CatalogEntry {
        description: LoraDescription {
            name: spec.name.clone(),
            digest,
            modules: modules as u32,
            bytes: (values * dtype_bytes) as u64,
            has_scheduler: scheduler.is_some(),
        },
        scheduler,
        last_used: 0,
    })
}

/// Reads the `--lora` headers and sidecars (cheap): refuses duplicate names, unreadable files and a set larger
/// than `budget` bytes before the service listens; returns the catalog and the `StageDescription.loras`.
pub fn prepare(
    specs: &[LoraSpec],
    dtype_bytes: usize,
    budget: u64,
) -> Result<(LoraCatalog, Vec<LoraDescription>), String> {
    let catalog = LoraCatalog::default();
    let mut described = Vec::new();
    for spec in specs {
        if catalog.contains(&spec.name) {
            return Err(format!(
                "two LoRA adapters are named `{}`; name them apart with --lora NAME=FILE",
                spec.name
            ));
        }
        let entry = describe(spec, dtype_bytes)?;
        described.push(entry.description.clone());
        catalog.insert(entry);
    }
    let total: u64 = described.iter().map(|d| d.bytes).sum();
    if budget > 0 && total > budget {
        return Err(format!(
            "the --lora adapters take {total} bytes, more than --lora-budget-mb ({budget} bytes)"
        ));
    }
    Ok((catalog, described))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A request's adapters (name, scale) and the scheduler config its schedule is built from. Requests with
/// different values here must not share a transformer pass.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLoras {
    pub loras: Vec<(String, f64)>,
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
    let mut out: Vec<(String, f64)> = Vec::with_capacity(loras.len());
    let mut sidecar = None;
    let mut c = catalog.write();
    c.clock += 1;
    let now = c.clock;
    for (i, r) in loras.iter().enumerate() {
        let Some(entry) = c.entries.iter_mut().find(|e| e.description.name == r.name) else {
            drop(c);
            return Err(StageError::NotFound(format!(
                "loras[{i}]: no LoRA adapter `{}` is loaded; loaded: {}",
                r.name,
                catalog.names()
            )));
        };
        entry.last_used = now;
        if sidecar.is_none() {
            sidecar = entry.scheduler.clone();
        }
        if out.iter().any(|(n, _)| *n == r.name) {
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
        out.push((r.name.clone(), f64::from(scale)));
    }
    drop(c);
    let mut cfg = sidecar.unwrap_or_else(|| served.clone());
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
            return Err(bad(
                "shift_terminal",
                format!("{v}; send 0 (none) or a value in (0, 1)"),
            ));
        }
        cfg.shift_terminal = (v != 0.0).then_some(v);
    }
    if let Some(v) = &o.time_shift_type {
        cfg.time_shift_type = v.clone();
    }
    cfg.validate().map_err(|e| {
        bad(
            "time_shift_type",
            format!("{e}; send `exponential` or `linear`"),
        )
    })
}

/// Loads one adapter for `transformer` (on the worker): factors in the transformer's dtype on its device.
pub fn load_one(
    spec: &LoraSpec,
    transformer: &QwenImageTransformer,
) -> candle_core::Result<Arc<LoraAdapter>> {
    let targets = lora::targets(transformer)?;
    let a = LoraAdapter::load(
        &spec.file,
        &targets,
        transformer.dtype(),
        transformer.device(),
    )
    .map_err(|e| candle_core::Error::Msg(format!("LoRA `{}`: {}", spec.name, first_line(&e))))?;
    tracing::info!(name = %spec.name, file = %spec.file.display(), modules = a.modules.len(), bytes = a.bytes,
                   "LoRA adapter loaded");
    Ok(Arc::new(a))
}

/// The adapters the worker holds, by name.
#[derive(Debug, Default)]
pub struct HeldLoras(BTreeMap<String, Arc<LoraAdapter>>);

impl HeldLoras {
    /// Loads every `--lora` (startup).
    pub fn load_all(
        specs: &[LoraSpec],
        transformer: &QwenImageTransformer,
    ) -> candle_core::Result<Self> {
        let mut held = BTreeMap::new();
        for s in specs {
            held.insert(s.name.clone(), load_one(s, transformer)?);
        }
        Ok(Self(held))
    }

    pub fn insert(&mut self, name: String, adapter: Arc<LoraAdapter>) {
        self.0.insert(name, adapter);
    }

    pub fn remove(&mut self, name: &str) -> bool {
        self.0.remove(name).is_some()
    }

    /// The adapters `req` names with their scales; NOT_FOUND when one was unloaded since admission.
    pub fn activate(&self, req: &RequestLoras) -> Result<ActiveLoras, StageError> {
        let adapters = req
            .loras
            .iter()
            .map(|(name, scale)| {
                self.0.get(name).map(|a| (a.clone(), *scale)).ok_or_else(|| {
                    StageError::NotFound(format!(
                        "LoRA adapter `{name}` was unloaded before this request ran; loaded: {}",
                        self.0.keys().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ActiveLoras {
            adapters,
            scheduler: req.scheduler.clone(),
        })
    }
}

/// What one job runs with: the adapters (held for the job's duration even if unloaded meanwhile) and the
/// scheduler config.
#[derive(Debug, Clone)]
pub struct ActiveLoras {
    pub adapters: Vec<(Arc<LoraAdapter>, f64)>,
    pub scheduler: SchedulerConfig,
}

impl ActiveLoras {
    /// The transformer the job runs: `base`, or a copy (weights shared) with the adapters attached.
    pub fn transformer<'a>(
        &self,
        base: &'a QwenImageTransformer,
    ) -> candle_core::Result<Cow<'a, QwenImageTransformer>> {
        if self.adapters.is_empty() {
            return Ok(Cow::Borrowed(base));
        }
        let list: Vec<(&LoraAdapter, f64)> = self
            .adapters
            .iter()
            .map(|(a, s)| (a.as_ref(), *s))
            .collect();
        Ok(Cow::Owned(lora::apply(base, &list)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn entry(name: &str, bytes: u64, scheduler: Option<SchedulerConfig>) -> CatalogEntry {
        CatalogEntry {
            description: LoraDescription {
                name: name.into(),
                bytes,
                ..Default::default()
            },
            scheduler,
            last_used: 0,
        }
    }

    fn catalog() -> LoraCatalog {
        let mut light = SchedulerConfig::qwen_image();
        light.base_shift = 3f64.ln();
        light.max_shift = 3f64.ln();
        light.shift_terminal = None;
        let c = LoraCatalog::default();
        c.insert(entry("style", 10, None));
        c.insert(entry("lightning", 20, Some(light)));
        c
    }

    #[test]
    fn lru_victims_fit_the_budget() {
        let c = catalog();
        assert_eq!(c.victims(5, 0).expect("unbounded"), Vec::<String>::new());
        assert_eq!(c.victims(5, 40).expect("fits"), Vec::<String>::new());
        assert_eq!(c.victims(15, 40).expect("one"), vec!["style".to_string()]);
        // naming `style` in a request makes `lightning` the least recently used
        check(
            &[r("style", None)],
            None,
            &c,
            &SchedulerConfig::qwen_image(),
        )
        .expect("ok");
        assert_eq!(
            c.victims(15, 40).expect("one"),
            vec!["lightning".to_string()]
        );
        assert_eq!(
            c.list().iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["lightning", "style"]
        );
        assert_eq!(c.victims(35, 40).expect("both").len(), 2);
        assert!(c.victims(41, 40).is_err());
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
        assert_eq!(
            (s.name.as_str(), s.file.as_path()),
            ("light", Path::new("/x/a.safetensors"))
        );
        assert_eq!(
            parse_lora("/x/Lightning-4.safetensors").expect("ok").name,
            "Lightning-4"
        );
        assert!(parse_lora("=/x").is_err());
        assert!(parse_lora("a=").is_err());
    }

    #[test]
    fn unknown_adapter_is_not_found_naming_the_loaded_ones() {
        let served = SchedulerConfig::qwen_image();
        let e = check(&[r("nope", None)], None, &catalog(), &served).expect_err("unknown");
        let (c, m) = code(e);
        assert_eq!(c, Code::NotFound);
        assert!(
            m.contains("`nope`") && m.contains("`style`, `lightning`"),
            "{m}"
        );
        let (c, m) =
            code(check(&[r("x", None)], None, &LoraCatalog::default(), &served).expect_err("none"));
        assert_eq!(c, Code::NotFound);
        assert!(m.contains("--lora NAME=FILE"), "{m}");
        assert!(m.contains("LoadLora"), "{m}");
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
        let got = check(
            &[r("style", Some(0.5)), r("lightning", None)],
            None,
            &catalog(),
            &served,
        )
        .expect("ok");
        assert_eq!(
            got.loras,
            vec![("style".to_string(), 0.5), ("lightning".to_string(), 1.0)]
        );
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
        assert_eq!(
            (over.scheduler.base_shift, over.scheduler.shift_terminal),
            (1.0, None)
        );
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
