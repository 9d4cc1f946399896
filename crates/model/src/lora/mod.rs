//! LoRA adapters for the transformer, applied on the fly: each targeted linear computes
//! `y = x·Wᵀ + b + Σ scale·(alpha/rank)·(x·Aᵀ)·Bᵀ` (PEFT's `lora.Linear.forward`), with the base weight shared,
//! never copied, whatever its format (dense, GGUF blocks, fp8).
//!
//! - [`LoraAdapter::load`] reads a safetensors file in any naming diffusers' Qwen-Image loader accepts
//!   ([`naming`]), with rank and alpha per module; a tensor that is not a LoRA factor of a transformer linear
//!   is an error listing the names.
//! - [`apply`] returns a copy of a transformer (tensors shared) whose linears carry the adapters' terms at the
//!   given scales, so that requests with different adapters run side by side on one set of weights.
//! - An adapter may carry a scheduler config ([`sidecar_path`]): the settings it was distilled with
//!   (Lightning).

pub mod naming;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};

use crate::scheduler::SchedulerConfig;
use crate::transformer::QwenImageTransformer;
use crate::weights::WeightStore;
use naming::{Family, Role};

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// One adapter's term on one linear: `delta(x) = (x·Aᵀ)·Bᵀ · scale`.
#[derive(Debug, Clone)]
pub struct LoraTerm {
    /// `Aᵀ`, `[in, rank]`.
    a_t: Tensor,
    /// `Bᵀ`, `[rank, out]`.
    b_t: Tensor,
    /// Request scale x alpha / rank.
    scale: f64,
}

impl LoraTerm {
    /// `lora_B(lora_A(x)) · scaling` for `x` `[.., in]`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.broadcast_matmul(&self.a_t.to_dtype(x.dtype())?)?;
        h.broadcast_matmul(&self.b_t.to_dtype(x.dtype())?)? * self.scale
    }
}

/// The factors of one targeted linear.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// `Aᵀ` `[in, rank]` (stored transposed once at load).
    a_t: Tensor,
    /// `Bᵀ` `[rank, out]`.
    b_t: Tensor,
    pub rank: usize,
    /// `alpha / rank` as diffusers applies it (the `.alpha` tensor, the adapter metadata's `lora_alpha`, or 1).
    pub alpha_over_rank: f64,
}

impl LoraModule {
    pub fn in_dim(&self) -> usize {
        self.a_t.dims()[0]
    }

    pub fn out_dim(&self) -> usize {
        self.b_t.dims()[1]
    }
}

/// One loaded adapter: its modules by diffusers module name, and an optional scheduler config.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub modules: BTreeMap<String, LoraModule>,
    /// Bytes of the factors as held.
    pub bytes: usize,
    /// `FILE.scheduler.json` beside the adapter, when present ([`sidecar_path`]).
    pub scheduler: Option<SchedulerConfig>,
    pub path: PathBuf,
}

/// `lightning.safetensors` → `lightning.scheduler.json`: the scheduler config an adapter was distilled with,
/// a diffusers `scheduler_config.json` (missing keys take `FlowMatchEulerDiscreteScheduler`'s defaults).
pub fn sidecar_path(adapter: &Path) -> PathBuf {
    adapter.with_extension("scheduler.json")
}

/// What an adapter file holds, from its header alone (nothing is loaded): LoRA modules by parsed name and the
/// values of their factors. A cheap look for a service's description; [`LoraAdapter::load`] does the checks.
pub fn inspect(path: &Path) -> Result<(usize, usize)> {
    let store = WeightStore::open(
        &[path.to_path_buf()],
        format!("LoRA {}", path.display()),
        &|n: &str| Some(n.to_string()),
    )?;
    let mut modules = std::collections::BTreeSet::new();
    let mut values = 0;
    for n in store.names() {
        if let Some(p) = naming::parse(n) {
            if p.role != Role::Alpha {
                values += store.stored(n)?.shape.iter().product::<usize>();
            }
            modules.insert(p.module);
        }
    }
    Ok((modules.len(), values))
}

/// Linear names of a transformer and their `(in, out)`: what an adapter may target.
pub fn targets(model: &QwenImageTransformer) -> Result<BTreeMap<String, (usize, usize)>> {
    let mut m = model.clone();
    m.linears_mut()
        .into_iter()
        .map(|(name, l)| Ok((name, l.dims()?)))
        .collect()
}

/// PEFT `LoraConfig` fields diffusers saves in the safetensors metadata (`lora_adapter_metadata`, keys prefixed
/// `transformer.`).
#[derive(Debug, Default, serde::Deserialize)]
struct PeftMeta {
    #[serde(default)]
    lora_alpha: Option<f64>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
}

/// PEFT `get_pattern_key`: a pattern matches a module equal to it or ending in `.pattern` (`^` anchors it).
fn pattern_alpha(meta: &PeftMeta, module: &str) -> Option<f64> {
    meta.alpha_pattern.iter().find_map(|(p, a)| {
        let hit = match p.strip_prefix('^') {
            Some(anchored) => module == anchored,
            None => module == p || module.ends_with(&format!(".{p}")),
        };
        hit.then_some(*a)
    })
}

fn read_meta(store: &WeightStore, path: &Path) -> Result<Option<PeftMeta>> {
    let Some(raw) = store
        .files()
        .first()
        .and_then(|f| f.safetensors_metadata())
        .and_then(|m| m.get("lora_adapter_metadata"))
    else {
        return Ok(None);
    };
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw).map_err(|e| {
        err(format!(
            "{}: lora_adapter_metadata is not a JSON object: {e}",
            path.display()
        ))
    })?;
    // diffusers `load_lora_adapter`: keep the `transformer.` entries, prefix removed
    let own: serde_json::Map<String, serde_json::Value> = v
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("transformer.").map(|k| (k.to_string(), v)))
        .collect();
    if own.is_empty() {
        return Ok(None);
    }
    let meta: PeftMeta = serde_json::from_value(serde_json::Value::Object(own))
        .map_err(|e| err(format!("{}: lora_adapter_metadata: {e}", path.display())))?;
    if meta.use_dora {
        return Err(err(format!(
            "{}: DoRA adapters (use_dora) are not supported",
            path.display()
        )));
    }
    Ok(Some(meta))
}

fn list(names: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

impl LoraAdapter {
    /// Reads `path` (safetensors) for a transformer whose linears are `targets` ([`targets`]); the factors are
    /// held in `dtype` on `device`. Reads `path`'s [`sidecar_path`] when it exists.
    pub fn load(
        path: &Path,
        targets: &BTreeMap<String, (usize, usize)>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let store = WeightStore::open(
            &[path.to_path_buf()],
            format!("LoRA {}", path.display()),
            &|n: &str| Some(n.to_string()),
        )?;
        let meta = read_meta(&store, path)?;
        let mut names: Vec<String> = store.names().map(str::to_string).collect();
        names.sort();

        // group by module
        let mut unmatched = Vec::new();
        let mut groups: BTreeMap<String, BTreeMap<Role, String>> = BTreeMap::new();
        let mut families = (false, false);
        for n in &names {
            let parsed = naming::parse(n).filter(|p| targets.contains_key(&p.module));
            let Some(p) = parsed else {
                unmatched.push(n.clone());
                continue;
            };
            match p.family {
                Some(Family::Peft) => families.0 = true,
                Some(Family::Kohya) => families.1 = true,
                None => {}
            }
            if let Some(prev) = groups
                .entry(p.module.clone())
                .or_default()
                .insert(p.role, n.clone())
            {
                return Err(err(format!(
                    "{}: tensors `{prev}` and `{n}` are the same LoRA factor of `{}`",
                    path.display(),
                    p.module
                )));
            }
        }
        if !unmatched.is_empty() {
            return Err(err(format!(
                "{}: {} tensor(s) are not LoRA factors of a Qwen-Image transformer linear (expected \
                 `transformer.<module>.lora_A.weight` / `lora_B.weight`, `lora_unet_<module>.lora_down.weight` / \
                 `lora_up.weight` / `alpha`, or `diffusion_model.<module>...`): {}",
                path.display(),
                unmatched.len(),
                list(&unmatched)
            )));
        }
        if families.0 && families.1 {
            return Err(err(format!(
                "{}: mixes lora_A/lora_B and lora_down/lora_up tensors; diffusers refuses such files too",
                path.display()
            )));
        }
        let mut modules = BTreeMap::new();
        let mut bytes = 0;
        for (module, roles) in groups {
            let (Some(down), Some(up)) = (roles.get(&Role::Down), roles.get(&Role::Up)) else {
                let have: Vec<String> = roles.values().cloned().collect();
                return Err(err(format!(
                    "{}: `{module}` needs both a down (lora_A) and an up (lora_B) factor; the file has only {}",
                    path.display(),
                    list(&have)
                )));
            };
            let (in_dim, out_dim) = targets[&module];
            let a = store.dense(down, dtype, device)?;
            let b = store.dense(up, dtype, device)?;
            let (rank, a_in) = a.dims2().map_err(|_| {
                err(format!(
                    "{}: `{down}` must be 2-D [rank, {in_dim}], got {:?}",
                    path.display(),
                    a.dims()
                ))
            })?;
            if a_in != in_dim || b.dims() != [out_dim, rank] || rank == 0 {
                return Err(err(format!(
                    "{}: `{module}` is {in_dim} -> {out_dim}; its factors are {:?} and {:?} (want [rank, {in_dim}] \
                     and [{out_dim}, rank])",
                    path.display(),
                    a.dims(),
                    b.dims()
                )));
            }
            // diffusers `_convert_non_diffusers_qwen_lora_to_diffusers.get_alpha_scales`: alpha / rank folded
            // into the factors (1 when the file has no alpha)
            let mut alpha_over_rank = match roles.get(&Role::Alpha) {
                Some(name) => {
                    let alpha = store
                        .dense(name, DType::F32, &Device::Cpu)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    let [alpha] = alpha[..] else {
                        return Err(err(format!(
                            "{}: `{name}` must hold one value",
                            path.display()
                        )));
                    };
                    alpha as f64 / rank as f64
                }
                None => 1.0,
            };
            // then PEFT's scaling from the saved LoraConfig: lora_alpha / r (or / sqrt(r) with rsLoRA)
            if let Some(meta) = &meta {
                if let Some(alpha) = pattern_alpha(meta, &module).or(meta.lora_alpha) {
                    let r = rank as f64;
                    alpha_over_rank *= if meta.use_rslora {
                        alpha / r.sqrt()
                    } else {
                        alpha / r
                    };
                }
            }
            if !alpha_over_rank.is_finite() {
                return Err(err(format!(
                    "{}: `{module}` has a non-finite alpha",
                    path.display()
                )));
            }
            bytes += (a.elem_count() + b.elem_count()) * dtype.size_in_bytes();
            modules.insert(
                module,
                LoraModule {
                    a_t: a.t()?.contiguous()?,
                    b_t: b.t()?.contiguous()?,
                    rank,
                    alpha_over_rank,
                },
            );
        }
        if modules.is_empty() {
            return Err(err(format!("{}: holds no LoRA tensor", path.display())));
        }
        let sidecar = sidecar_path(path);
        let scheduler = if sidecar.is_file() {
            let cfg: SchedulerConfig = crate::snapshot::read_json(&sidecar)?;
            cfg.validate()
                .map_err(|e| err(format!("{}: {e}", sidecar.display())))?;
            Some(cfg)
        } else {
            None
        };
        Ok(Self {
            modules,
            bytes,
            scheduler,
            path: path.to_path_buf(),
        })
    }
}

/// A copy of `model` (weights shared) whose targeted linears add each adapter's term at its scale, in order
/// (PEFT sums active adapters in the order they were added).
pub fn apply(
    model: &QwenImageTransformer,
    adapters: &[(&LoraAdapter, f64)],
) -> Result<QwenImageTransformer> {
    let mut out = model.clone();
    if adapters.is_empty() {
        return Ok(out);
    }
    let mut seen = 0usize;
    for (name, linear) in out.linears_mut() {
        let terms: Vec<LoraTerm> = adapters
            .iter()
            .filter_map(|(a, scale)| {
                a.modules.get(&name).map(|m| LoraTerm {
                    a_t: m.a_t.clone(),
                    b_t: m.b_t.clone(),
                    scale: scale * m.alpha_over_rank,
                })
            })
            .collect();
        if !terms.is_empty() {
            seen += terms.len();
            *linear = linear.with_lora(terms);
        }
    }
    let want: usize = adapters.iter().map(|(a, _)| a.modules.len()).sum();
    if seen != want {
        return Err(err(format!(
            "LoRA: {want} module(s) to attach, {seen} found in this transformer (was the adapter loaded for \
             another model?)"
        )));
    }
    Ok(out)
}
