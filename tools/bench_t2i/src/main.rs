//! `qwen-image-bench-t2i`: wall time of one text-to-image request through the four services over gRPC
//! (separate `qwen-image serve --stage ...` processes on loopback, client → gateway → stages) against a
//! reference, in one run, rounds alternating which side goes first:
//!
//! - `--reference in-process` (default): the same work in this process with the model crate (encode
//!   prompt + negative, seeded noise, denoise with true CFG, decode, PNG): what the split into services
//!   costs;
//! - `--reference diffusers`: diffusers' `QwenImagePipeline` on the same snapshot, kept loaded in a
//!   Python process (`diffusers_t2i.py`, torch with `--threads` threads), same prompt, negative prompt,
//!   true CFG, seed and size: our stack against the reference.
//!
//! Every round sends a prompt not sent before (the text encoder's prompt-embedding cache serves only
//! the negative prompt " ", as it does for every CFG request in service). Prints each round's times and
//! ratio, then the medians and the median of the per-round ratios, with the load average.
//!
//! cargo build --release -p qwen-image-cli -p qwen-image-bench-t2i
//! target/release/qwen-image-bench-t2i --model /tmp/small --width 256 --height 256 --steps 20 --runs 5 \
//!     --reference diffusers

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use qwen_image_common::randn::TorchCpuGenerator;
use qwen_image_model::denoise::{self, Conditioning, DenoiseParams, Flow, Outcome};
use qwen_image_model::latents::{pack, unpack};
use qwen_image_model::prompt::PromptEncoder;
use qwen_image_model::scheduler::{Schedule, SchedulerConfig};
use qwen_image_model::snapshot::Snapshot;
use qwen_image_model::transformer::{QwenImageTransformer, TransformerConfig};
use qwen_image_model::vae::{AutoencoderKLQwenImage, to_rgb8};
use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_testkit::bench::{
    Geometry, NEGATIVE_PROMPT, PROMPTS, TRUE_CFG_SCALE, gateway_client, load_average,
    max_level_difference, median, t2i_request, timed_t2i,
};
use qwen_image_testkit::stack::{Launcher, ProcessStack, StackSpec};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tonic::transport::Channel;

#[derive(Parser, Debug)]
struct Args {
    /// Diffusers snapshot directory.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 512)]
    width: u32,
    #[arg(long, default_value_t = 512)]
    height: u32,
    #[arg(long, default_value_t = 20)]
    steps: u32,
    /// Timed rounds, one request per side each (after one warm-up request each).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// What the stack is compared with.
    #[arg(long, value_enum, default_value_t = Reference::InProcess)]
    reference: Reference,
    /// Python with torch and diffusers (`--reference diffusers`); default
    /// `$HOME/.venvs/qwen-image-ref/bin/python` (tools/refharness/install.sh).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Torch threads of the diffusers side (our stages use every core, 2 on the project's machine).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// The `qwen-image` binary; default: next to this executable.
    #[arg(long)]
    qwen_image: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Reference {
    InProcess,
    Diffusers,
}

const SEED: u64 = 0;

/// The prompt of round `i` (the warm-up is round 0): never sent before in this run.
fn prompt(i: usize) -> String {
    format!("{}, take {i}", PROMPTS[i % PROMPTS.len()])
}

struct InProcess {
    encoder: PromptEncoder,
    transformer: QwenImageTransformer,
    scheduler: SchedulerConfig,
    vae: AutoencoderKLQwenImage,
}

impl InProcess {
    fn load(model: &Path) -> Result<Self> {
        let dev = Device::Cpu;
        let snap = Snapshot::open(model)?;
        let encoder = PromptEncoder::load(&snap, DType::F32, &dev)?;
        let tcfg: TransformerConfig = snap.config("transformer", "config.json")?;
        let transformer =
            QwenImageTransformer::new(&tcfg, snap.weights("transformer", DType::F32, &dev)?)?;
        let scheduler: SchedulerConfig = snap.config("scheduler", "scheduler_config.json")?;
        let vae = AutoencoderKLQwenImage::load(&snap, DType::F32, &dev)?;
        Ok(Self {
            encoder,
            transformer,
            scheduler,
            vae,
        })
    }

    /// The gateway's work without gRPC: encode, noise, denoise (true CFG), decode, PNG.
    fn run(&self, a: &Args, prompt: &str) -> Result<Vec<u8>> {
        let pos = self.encoder.encode(&[prompt], 512)?;
        let neg = self.encoder.encode(&[NEGATIVE_PROMPT], 512)?;
        let cond = |e: qwen_image_model::prompt::EncodedPrompts| Conditioning {
            mask: if e.mask_all_ones { None } else { Some(e.mask) },
            embeds: e.embeds,
        };
        let (pos, neg) = (cond(pos), cond(neg));
        let (h, w) = ((a.height / 8) as usize, (a.width / 8) as usize);
        let noise = TorchCpuGenerator::new(SEED)
            .randn(16 * h * w)
            .map_err(|e| anyhow!("{e}"))?;
        let latents = pack(&Tensor::from_vec(noise, (1, 16, h, w), &Device::Cpu)?)?;
        let schedule = Schedule::for_pipeline(&self.scheduler, a.steps as usize, (h / 2) * (w / 2))
            .map_err(|e| anyhow!(e))?;
        let shapes = [(1, h / 2, w / 2)];
        let params = DenoiseParams {
            positive: &pos,
            negative: Some(&neg),
            true_cfg_scale: TRUE_CFG_SCALE as f64,
            latents,
            img_shapes: &shapes,
            schedule: &schedule,
            start_step: 0,
            inpaint: None,
            controlnet: &[],
        };
        let out = match denoise::denoise(&self.transformer, &params, |_| Flow::Continue)? {
            Outcome::Finished(t) => t,
            Outcome::Stopped { .. } => bail!("stopped"),
        };
        let z = unpack(&out, h, w)?;
        let image = self.vae.decode(&self.vae.denormalize(&z)?)?;
        let rgb = to_rgb8(&image)?;
        encode_png(a.width, a.height, &rgb[0])
    }
}

/// RGB8 → PNG, as the gateway encodes its results (the same encoder and settings, no text chunks).
fn encode_png(width: u32, height: u32, rgb8: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(rgb8.len() / 2 + 1024);
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| anyhow!(e))?;
    writer.write_image_data(rgb8).map_err(|e| anyhow!(e))?;
    writer.finish().map_err(|e| anyhow!(e))?;
    Ok(out)
}

/// diffusers' pipeline in a Python process (`diffusers_t2i.py`), loaded once, one run per stdin line.
struct Diffusers {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    png: PathBuf,
}

impl Diffusers {
    async fn start(a: &Args) -> Result<Self> {
        let python = match &a.python {
            Some(p) => p.clone(),
            None => PathBuf::from(std::env::var("HOME").context("HOME")?)
                .join(".venvs/qwen-image-ref/bin/python"),
        };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("diffusers_t2i.py");
        let mut child = Command::new(&python)
            .arg(&script)
            .arg(&a.model)
            .args([
                "--width",
                &a.width.to_string(),
                "--height",
                &a.height.to_string(),
            ])
            .args([
                "--steps",
                &a.steps.to_string(),
                "--threads",
                &a.threads.to_string(),
            ])
            .args(["--true-cfg-scale", &TRUE_CFG_SCALE.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", python.display()))?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        match stdout.next_line().await? {
            Some(l) if l == "ready" => {}
            other => bail!(
                "{} {}: expected `ready`, got {other:?}",
                python.display(),
                script.display()
            ),
        }
        let png =
            std::env::temp_dir().join(format!("bench-t2i-diffusers-{}.png", std::process::id()));
        Ok(Self {
            _child: child,
            stdin,
            stdout,
            png,
        })
    }

    /// One pipeline call: the wall time seen from here (pipe round trip included) and the PNG.
    async fn run(&mut self, prompt: &str) -> Result<(Duration, Vec<u8>)> {
        let started = Instant::now();
        let line = format!("{SEED} {} {prompt}\n", self.png.display());
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        let reply = self
            .stdout
            .next_line()
            .await?
            .context("diffusers_t2i.py ended")?;
        let elapsed = started.elapsed();
        if !reply.starts_with("{\"seconds\"") {
            bail!("diffusers_t2i.py: unexpected reply {reply:?}");
        }
        let png = std::fs::read(&self.png)?;
        Ok((elapsed, png))
    }
}

impl Drop for Diffusers {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.png);
    }
}

/// The side the stack is compared with.
enum Other {
    InProcess(Box<InProcess>),
    Diffusers(Diffusers),
}

impl Other {
    async fn run(&mut self, a: &Args, prompt: &str) -> Result<(Duration, Vec<u8>)> {
        match self {
            Other::InProcess(local) => {
                let started = Instant::now();
                let png = tokio::task::block_in_place(|| local.run(a, prompt))?;
                Ok((started.elapsed(), png))
            }
            Other::Diffusers(d) => d.run(prompt).await,
        }
    }
}

/// One request through the stack: the time to its result and the PNG.
async fn ours(
    client: &mut ImageGeneratorClient<Channel>,
    g: Geometry,
    i: usize,
) -> Result<(Duration, Vec<u8>)> {
    timed_t2i(client, t2i_request(g, &prompt(i), SEED))
        .await
        .map_err(anyhow::Error::msg)
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if a.runs == 0 {
        bail!("--runs must be positive");
    }
    let bin = match &a.qwen_image {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("qwen-image"),
    };
    let load_start = load_average();
    let stack = ProcessStack::serving(Launcher::Cli(bin), &StackSpec::model(&a.model))
        .await
        .map_err(anyhow::Error::msg)?;
    let mut client = gateway_client(&stack.gateway_url());
    let (mut other, name) = match a.reference {
        Reference::InProcess => (
            Other::InProcess(Box::new(tokio::task::block_in_place(|| {
                InProcess::load(&a.model)
            })?)),
            "in-process",
        ),
        Reference::Diffusers => (Other::Diffusers(Diffusers::start(&a).await?), "diffusers"),
    };
    let g = Geometry {
        width: a.width,
        height: a.height,
        steps: a.steps,
    };

    // Warm-up (allocators, caches, the negative prompt's embedding), and the pictures compared.
    let (_, png_ours) = ours(&mut client, g, 0).await?;
    let (_, png_other) = other.run(&a, &prompt(0)).await?;
    let diff = max_level_difference(&png_ours, &png_other).map_err(anyhow::Error::msg)?;
    let (mut t_ours, mut t_other, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 1..=a.runs {
        let p = prompt(i);
        let (o, r) = if i % 2 == 1 {
            let o = ours(&mut client, g, i).await?.0;
            (o, other.run(&a, &p).await?.0)
        } else {
            let r = other.run(&a, &p).await?.0;
            (ours(&mut client, g, i).await?.0, r)
        };
        let ratio = o.as_secs_f64() / r.as_secs_f64();
        println!(
            "round {i}: ours {:.3}s  {name} {:.3}s  ratio {ratio:.2}x",
            o.as_secs_f64(),
            r.as_secs_f64()
        );
        t_ours.push(o.as_secs_f64());
        t_other.push(r.as_secs_f64());
        ratios.push(ratio);
    }
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(0.0, f64::max);
    println!(
        "text-to-image {}x{}, {} steps, true CFG {TRUE_CFG_SCALE}, {} rounds: ours (gRPC, 4 processes) median {:.3}s, \
         {name} median {:.3}s, median per-round ratio {:.2}x (min {min:.2}x, max {max:.2}x); \
         max pixel difference {diff} levels; load average {load_start} (start), {} (end)",
        a.width,
        a.height,
        a.steps,
        a.runs,
        median(&t_ours),
        median(&t_other),
        median(&ratios),
        load_average()
    );
    Ok(())
}
