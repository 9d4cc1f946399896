//! `qwen-image-bench-quant`: resident weight memory, RSS, speed and output error of the transformer and the
//! text encoder in f32, bf16, fp8, Q8_0, Q4_0 and Q4_K against f32, on a snapshot (the `small` preset), and
//! the same storage rules projected onto the released 20B transformer and 7B text encoder.
//!
//! ```sh
//! ~/.venvs/qwen-image-ref/bin/python tools/refharness/make_tiny.py /tmp/small --preset small --seed 0
//! cargo build --release -p qwen-image-bench-quant
//! nice -n 10 target/release/qwen-image-bench-quant table --model /tmp/small --work /tmp/bench-quant
//! ```
//!
//! Every case runs in its own child process (`measure`), so its peak RSS (`VmHWM`) is its own.

mod measure;
mod prepare;
mod projection;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::text_encoder::{TextConfig, TextEncoderConfig};
use qwen_image_model::transformer::TransformerConfig;
use qwen_image_model::weights::{QuantMatmul, human_bytes};

use measure::Measurement;
use projection::Format;

#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write the quantized / fp8 files (if missing), measure every case, print the tables.
    Table {
        /// Diffusers snapshot (e.g. the `small` preset of tools/refharness/make_tiny.py).
        #[arg(long)]
        model: PathBuf,
        /// Folder for the written files and the per-case outputs.
        #[arg(long)]
        work: PathBuf,
        /// Image side in pixels for the transformer runs.
        #[arg(long, default_value_t = 512)]
        size: usize,
        /// Denoising steps (true CFG 4) for the final-latents error.
        #[arg(long, default_value_t = 4)]
        steps: usize,
    },
    /// One case (run by `table` in a child process): prints one JSON line.
    Measure {
        #[arg(long)]
        case: String,
        /// `transformer` or `text-encoder`.
        #[arg(long)]
        component: String,
        #[arg(long)]
        model: PathBuf,
        /// A single weights file; the snapshot's own weights when absent.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Stage dtype: f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// auto, dequantize or native.
        #[arg(long, default_value = "auto")]
        matmul: String,
        #[arg(long, default_value_t = 512)]
        size: usize,
        #[arg(long, default_value_t = 4)]
        steps: usize,
        /// Where the outputs go (safetensors).
        #[arg(long)]
        out: PathBuf,
    },
    /// Only the 20B / 7B projection.
    Projection,
}

fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Measure {
            case,
            component,
            model,
            weights,
            dtype,
            matmul,
            size,
            steps,
            out,
        } => {
            let job = measure::Job {
                case: &case,
                component: &component,
                model: &model,
                weights: weights.as_deref(),
                dtype: match dtype.as_str() {
                    "f32" => DType::F32,
                    "bf16" => DType::BF16,
                    d => bail!("--dtype {d}: f32 or bf16"),
                },
                matmul: match matmul.as_str() {
                    "auto" => QuantMatmul::Auto,
                    "dequantize" => QuantMatmul::Dequantize,
                    "native" => QuantMatmul::Native,
                    m => bail!("--matmul {m}: auto, dequantize or native"),
                },
                size,
                steps,
                out: &out,
            };
            let m = measure::run(&job)?;
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        Cmd::Table {
            model,
            work,
            size,
            steps,
        } => table(&model, &work, size, steps),
        Cmd::Projection => {
            print_projection(None);
            Ok(())
        }
    }
}

struct Case {
    name: String,
    component: &'static str,
    weights: Option<PathBuf>,
    dtype: &'static str,
    matmul: &'static str,
    format: Format,
}

fn cases(p: &prepare::Prepared) -> Vec<Case> {
    let mut v = Vec::new();
    for component in ["transformer", "text-encoder"] {
        let files = if component == "transformer" {
            &p.transformer
        } else {
            &p.text_encoder
        };
        v.push(case("f32", component, None, "f32", "auto", Format::F32));
        v.push(case("bf16", component, None, "bf16", "auto", Format::Bf16));
        for (label, path) in files {
            let format = match prepare::QUANTS.iter().find(|(l, _)| l == label) {
                Some((_, t)) => Format::Ggml(*t),
                None => Format::Fp8,
            };
            v.push(case(
                label,
                component,
                Some(path.clone()),
                "f32",
                "dequantize",
                format,
            ));
            if label == "Q8_0" || label == "Q4_K" {
                let n = format!("{label} native");
                v.push(case(
                    &n,
                    component,
                    Some(path.clone()),
                    "f32",
                    "native",
                    format,
                ));
            }
        }
    }
    v
}

fn case(
    name: &str,
    component: &'static str,
    weights: Option<PathBuf>,
    dtype: &'static str,
    matmul: &'static str,
    format: Format,
) -> Case {
    Case {
        name: name.to_string(),
        component,
        weights,
        dtype,
        matmul,
        format,
    }
}

fn out_file(work: &Path, c: &Case) -> PathBuf {
    work.join(format!(
        "out.{}.{}.safetensors",
        c.component,
        c.name.replace(' ', "_")
    ))
}

fn run_case(model: &Path, work: &Path, c: &Case, size: usize, steps: usize) -> Result<Measurement> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("measure")
        .args(["--case", &c.name, "--component", c.component])
        .arg("--model")
        .arg(model)
        .args(["--dtype", c.dtype, "--matmul", c.matmul])
        .args(["--size", &size.to_string(), "--steps", &steps.to_string()])
        .arg("--out")
        .arg(out_file(work, c));
    if let Some(w) = &c.weights {
        cmd.arg("--weights").arg(w);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!(
            "case {} {} failed: {}",
            c.component,
            c.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).with_context(|| format!("case output: {line}"))
}

/// `‖a − b‖ / ‖b‖`.
fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let d = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let n = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((d / n.max(1e-30)).sqrt())
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

fn table(model: &Path, work: &Path, size: usize, steps: usize) -> Result<()> {
    let prepared = prepare::prepare(model, work)?;
    let all = cases(&prepared);
    let mut results: Vec<(usize, Measurement)> = Vec::new();
    for (i, c) in all.iter().enumerate() {
        eprintln!("measuring {} {}", c.component, c.name);
        results.push((i, run_case(model, work, c, size, steps)?));
    }
    std::fs::write(
        work.join("results.json"),
        serde_json::to_string_pretty(&results.iter().map(|(_, m)| m).collect::<Vec<_>>())?,
    )?;
    let snap = Snapshot::open(model)?;
    let tcfg: TransformerConfig = snap.config("transformer", "config.json")?;
    let xcfg: TextEncoderConfig = snap.config("text_encoder", "config.json")?;
    for component in ["transformer", "text-encoder"] {
        let layout = if component == "transformer" {
            projection::transformer(&tcfg)
        } else {
            projection::text_encoder(&xcfg.text)
        };
        let rows: Vec<&(usize, Measurement)> = results
            .iter()
            .filter(|(i, _)| all[*i].component == component)
            .collect();
        let base = rows
            .iter()
            .find(|(i, _)| all[*i].name == "f32")
            .context("no f32 case")?;
        let load = |i: usize| {
            candle_core::safetensors::load(out_file(work, &all[i]), &Device::Cpu)
                .with_context(|| format!("outputs of {}", all[i].name))
        };
        let base_out = load(base.0)?;
        println!(
            "\n### {component} ({} snapshot, {} params{})\n",
            model.display(),
            base.1.weights_params,
            if component == "transformer" {
                format!(", {size}x{size}, {steps} steps with true CFG")
            } else {
                ", 4 prompts".to_string()
            }
        );
        if component == "transformer" {
            println!(
                "| format | weights MiB | x f32 | RSS after load MiB | peak RSS load / run MiB | load s | step s | error out | error final latents | 20B projected GiB | x f32 |"
            );
            println!("|---|---|---|---|---|---|---|---|---|---|---|");
        } else {
            println!(
                "| format | weights MiB | x f32 | RSS after load MiB | peak RSS load / run MiB | load s | encode s | error prompt_embeds | 7B projected GiB | x f32 |"
            );
            println!("|---|---|---|---|---|---|---|---|---|---|");
        }
        let big = if component == "transformer" {
            projection::transformer(&TransformerConfig::qwen_image())
        } else {
            projection::text_encoder(&TextConfig::qwen25_vl_7b())
        };
        let big_f32 = projection::bytes(&big, Format::F32);
        for r in &rows {
            let (i, m) = (r.0, &r.1);
            let c = &all[i];
            let out = load(i)?;
            let errs: Vec<String> = if component == "transformer" {
                vec![
                    format!("{:.1e}", rel(&out["out"], &base_out["out"])?),
                    format!("{:.1e}", rel(&out["final"], &base_out["final"])?),
                ]
            } else {
                vec![format!("{:.1e}", rel(&out["embeds"], &base_out["embeds"])?)]
            };
            let proj = projection::bytes(&big, c.format);
            println!(
                "| {} | {} | {:.3} | {} | {} / {} | {:.2} | {:.3} | {} | {:.2} | {:.3} |",
                c.name,
                mib(m.weights_bytes),
                m.weights_bytes as f64 / base.1.weights_bytes as f64,
                mib(m.rss_after_load),
                mib(m.peak_rss_load),
                mib(m.peak_rss),
                m.load_seconds,
                m.run_seconds,
                errs.join(" | "),
                proj as f64 / (1u64 << 30) as f64,
                proj as f64 / big_f32 as f64,
            );
        }
        println!();
        for (i, m) in results
            .iter()
            .filter(|(i, _)| all[*i].component == component)
        {
            // the projection's storage rules applied to this snapshot, as a check of the projection
            println!(
                "- {} {}: {} (by parameter count: {})",
                component,
                all[*i].name,
                m.formats,
                human_bytes(projection::bytes(&layout, all[*i].format))
            );
        }
    }
    print_projection(Some(&tcfg));
    Ok(())
}

fn print_projection(small: Option<&TransformerConfig>) {
    let t = projection::transformer(&TransformerConfig::qwen_image());
    let x = projection::text_encoder(&TextConfig::qwen25_vl_7b());
    println!(
        "\nProjected resident weights (stage dtype f32 for the non-linear tensors; bf16 for bf16), released \
         transformer {} params, text encoder {} params:\n",
        t.params(),
        x.params()
    );
    if t.params() != projection::QWEN_IMAGE_PARAMS {
        println!(
            "(warning: the transformer count differs from the reference total {})",
            projection::QWEN_IMAGE_PARAMS
        );
    }
    println!("| format | transformer 20B | text encoder 7B |");
    println!("|---|---|---|");
    for (name, f) in [
        ("f32", Format::F32),
        ("bf16", Format::Bf16),
        ("fp8 e4m3fn", Format::Fp8),
        ("Q8_0", Format::Ggml(GgmlDType::Q8_0)),
        ("Q4_0", Format::Ggml(GgmlDType::Q4_0)),
        ("Q4_K", Format::Ggml(GgmlDType::Q4K)),
    ] {
        println!(
            "| {name} | {} | {} |",
            human_bytes(projection::bytes(&t, f)),
            human_bytes(projection::bytes(&x, f))
        );
    }
    if let Some(c) = small {
        let l = projection::transformer(c);
        println!(
            "\n(the measured snapshot's transformer: {} params by the same count)",
            l.params()
        );
    }
}
