//! `qwen-image parity`: recompute a refharness dump (`tensors.safetensors` + `manifest.json`) with our code
//! and print one line per compared tensor. Exit code 0 when every comparison passes, 1 otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use qwen_image_model::candle_core::{DType, Device, Tensor};

mod controlnet;
mod edit;
mod image_prep;
mod inpaint;
mod lora;
mod t2i;
mod textenc;
mod vae;

#[derive(Args, Debug)]
pub struct ParityArgs {
    /// The diffusers snapshot the reference was made from.
    #[arg(long)]
    pub snapshot: PathBuf,
    /// A reference dump directory (holds `manifest.json` and `tensors.safetensors`).
    #[arg(long)]
    pub reference: PathBuf,
    /// Relative tolerance for f32 tensors of a single network pass (max |a-b| / max |ref|).
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f64,
    /// Relative tolerance for tensors at the end of a multi-step loop (final latents).
    #[arg(long, default_value_t = 1e-3)]
    pub loop_tol: f64,
    /// Single weight files replacing the snapshot's (`--transformer-weights`, `--text-encoder-weights`,
    /// `--tokenizer`, `--vae-weights`; configs still from `--snapshot`), for references made on those files.
    #[command(flatten)]
    pub weights: crate::weights::WeightFilesArgs,
}

impl ParityArgs {
    /// The weights and config of a component: the `file` flag's file when given, else the snapshot's.
    pub fn sources(
        &self,
        file: Option<&Path>,
        flag: &str,
    ) -> Result<(
        qwen_image_model::source::WeightsSource,
        qwen_image_model::source::ConfigSource,
    )> {
        qwen_image_model::source::sources(file, Some(&self.snapshot), flag)
            .map_err(anyhow::Error::msg)
    }

    /// f32 on the CPU, the reference's precision.
    pub fn load_options(&self) -> qwen_image_model::source::LoadOptions {
        qwen_image_model::source::LoadOptions::new(DType::F32, &Device::Cpu)
    }
}

/// A loaded reference dump.
pub struct Reference {
    pub dir: PathBuf,
    pub manifest: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Reference {
    pub fn load(dir: &Path) -> Result<Self> {
        let manifest_path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?;
        let manifest: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", manifest_path.display()))?;
        let tpath = dir.join("tensors.safetensors");
        let tensors = qwen_image_model::candle_core::safetensors::load(&tpath, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", tpath.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            tensors,
        })
    }

    pub fn mode(&self) -> &str {
        self.manifest["mode"].as_str().unwrap_or("")
    }

    pub fn arg(&self, name: &str) -> &serde_json::Value {
        &self.manifest["args"][name]
    }

    pub fn scalar(&self, name: &str) -> &serde_json::Value {
        &self.manifest["scalars"][name]
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A reference tensor by name.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .with_context(|| format!("reference {} has no tensor `{name}`", self.dir.display()))
    }

    /// A reference tensor converted to f32.
    pub fn f32(&self, name: &str) -> Result<Tensor> {
        Ok(self.get(name)?.to_dtype(DType::F32)?)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Pass,
    Fail,
    Skip,
}

/// Collected comparison lines.
#[derive(Default)]
pub struct Report {
    rows: Vec<(Verdict, String)>,
}

impl Report {
    fn push(&mut self, v: Verdict, line: String) {
        let tag = match v {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        };
        println!("{tag}  {line}");
        self.rows.push((v, line));
    }

    /// Compares float tensors: max abs error and relative error `max|a-b| / max|ref|`.
    pub fn compare(
        &mut self,
        name: &str,
        ours: &Tensor,
        reference: &Tensor,
        rel_tol: f64,
    ) -> Result<()> {
        if ours.dims() != reference.dims() {
            self.push(
                Verdict::Fail,
                format!(
                    "{name:<48} shape {:?} vs reference {:?}",
                    ours.dims(),
                    reference.dims()
                ),
            );
            return Ok(());
        }
        let a = ours.to_dtype(DType::F64)?.flatten_all()?;
        let b = reference.to_dtype(DType::F64)?.flatten_all()?;
        let max_abs = (&a - &b)?.abs()?.max(0)?.to_scalar::<f64>()?;
        let scale = b.abs()?.max(0)?.to_scalar::<f64>()?.max(1e-12);
        let rel = max_abs / scale;
        let ok = rel <= rel_tol && max_abs.is_finite();
        self.push(
            if ok { Verdict::Pass } else { Verdict::Fail },
            format!("{name:<48} max_abs {max_abs:.3e}  rel {rel:.3e}  (tol {rel_tol:.0e})"),
        );
        Ok(())
    }

    /// Compares 8-bit images: passes when no channel differs by more than `max_levels`.
    pub fn compare_u8(&mut self, name: &str, ours: &[u8], reference: &[u8], max_levels: u8) {
        if ours.len() != reference.len() {
            self.push(
                Verdict::Fail,
                format!(
                    "{name:<48} {} bytes vs reference {}",
                    ours.len(),
                    reference.len()
                ),
            );
            return;
        }
        let worst = ours
            .iter()
            .zip(reference)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        let differing = ours.iter().zip(reference).filter(|(a, b)| a != b).count();
        self.push(
            if worst <= max_levels { Verdict::Pass } else { Verdict::Fail },
            format!("{name:<48} max level diff {worst}  ({differing} of {} values differ; tol {max_levels})", ours.len()),
        );
    }

    /// Exact equality of integer sequences (token ids).
    pub fn compare_ids(&mut self, name: &str, ours: &[i64], reference: &[i64]) {
        if ours == reference {
            self.push(
                Verdict::Pass,
                format!("{name:<48} {} ids identical", ours.len()),
            );
        } else {
            let first = ours
                .iter()
                .zip(reference)
                .position(|(a, b)| a != b)
                .unwrap_or(ours.len().min(reference.len()));
            self.push(
                Verdict::Fail,
                format!(
                    "{name:<48} ids differ (ours {} vs reference {}, first difference at {first})",
                    ours.len(),
                    reference.len()
                ),
            );
        }
    }

    /// Exact equality of a scalar value.
    pub fn check(&mut self, name: &str, ok: bool, detail: String) {
        self.push(
            if ok { Verdict::Pass } else { Verdict::Fail },
            format!("{name:<48} {detail}"),
        );
    }

    /// Something this mode cannot check (yet): reported, never counted as passed.
    #[allow(dead_code)] // every current mode checks all its parts; kept for dump parts a mode cannot check
    pub fn skip(&mut self, name: &str, why: &str) {
        self.push(Verdict::Skip, format!("{name:<48} {why}"));
    }

    fn summary(&self) -> (usize, usize, usize) {
        let count = |v| self.rows.iter().filter(|(r, _)| *r == v).count();
        (
            count(Verdict::Pass),
            count(Verdict::Fail),
            count(Verdict::Skip),
        )
    }
}

pub fn run(args: &ParityArgs) -> Result<ExitCode> {
    let reference = Reference::load(&args.reference)?;
    let mut report = Report::default();
    println!(
        "parity: mode {} | snapshot {} | reference {}",
        reference.mode(),
        args.snapshot.display(),
        args.reference.display()
    );
    match reference.mode() {
        "t2i" => t2i::check(args, &reference, &mut report)?,
        "textenc" => textenc::check(args, &reference, &mut report)?,
        "vae" => vae::check(args, &reference, &mut report)?,
        "inpaint" | "img2img" => inpaint::check(args, &reference, &mut report)?,
        "controlnet" => controlnet::check(args, &reference, &mut report)?,
        "lora" => lora::check(args, &reference, &mut report)?,
        "edit" => edit::check(args, &reference, &mut report)?,
        other => bail!("unknown reference mode `{other}`"),
    }
    let (pass, fail, skip) = report.summary();
    println!("{pass} passed, {fail} failed, {skip} skipped");
    if fail > 0 || pass == 0 {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
