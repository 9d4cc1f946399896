//! `qwen-image-bench-t2i`: median wall time of one text-to-image request through the four services over
//! gRPC (separate `qwen-image serve --stage ...` processes on loopback, client → gateway → stages) against
//! the same work in this process with the model crate (encode prompt + negative, seeded noise, denoise
//! with true CFG, decode, PNG). Runs alternate between the two paths so machine noise hits both.
//!
//! cargo build --release -p qwen-image-cli -p qwen-image-bench-t2i
//! target/release/qwen-image-bench-t2i --model /tmp/gsmall --width 512 --height 512 --steps 20 --runs 5

use std::path::PathBuf;
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
use qwen_image_proto::v1::{GenerationSettings, TextToImageRequest, generate_event};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

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
    /// Timed runs per path (after one warm-up run each).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value = "A cat holding a sign that says hello world")]
    prompt: String,
    /// The `qwen-image` binary; default: next to this executable.
    #[arg(long)]
    qwen_image: Option<PathBuf>,
}

const NEGATIVE: &str = " ";
const CFG: f32 = 4.0;
const SEED: u64 = 0;

struct InProcess {
    encoder: PromptEncoder,
    transformer: QwenImageTransformer,
    scheduler: SchedulerConfig,
    vae: AutoencoderKLQwenImage,
}

impl InProcess {
    fn load(model: &PathBuf) -> Result<Self> {
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
    fn run(&self, a: &Args) -> Result<Vec<u8>> {
        let pos = self.encoder.encode(&[a.prompt.as_str()], 512)?;
        let neg = self.encoder.encode(&[NEGATIVE], 512)?;
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
            true_cfg_scale: CFG as f64,
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

struct Service {
    _child: Child,
    url: String,
}

async fn spawn(bin: &PathBuf, args: &[&str]) -> Result<Service> {
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    while let Some(line) = lines.next_line().await? {
        if let Some(addr) = line.strip_prefix("listening on ") {
            let url = format!("http://{}", addr.trim());
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok(Service { _child: child, url });
        }
    }
    bail!(
        "{} {args:?} exited without printing its address",
        bin.display()
    )
}

async fn wait_serving(url: &str) -> Result<()> {
    let ch = Channel::from_shared(url.to_string())?.connect().await?;
    let mut s = HealthClient::new(ch)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    while let Some(m) = s.message().await? {
        if m.status == ServingStatus::Serving as i32 {
            return Ok(());
        }
    }
    bail!("health stream ended")
}

async fn grpc_run(c: &mut ImageGeneratorClient<Channel>, a: &Args) -> Result<Vec<u8>> {
    let req = TextToImageRequest {
        settings: Some(GenerationSettings {
            prompt: a.prompt.clone(),
            negative_prompt: Some(NEGATIVE.into()),
            width_px: a.width,
            height_px: a.height,
            steps: a.steps,
            true_cfg_scale: Some(CFG),
            seed: Some(SEED),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut s = c.text_to_image(req).await?.into_inner();
    while let Some(ev) = s.message().await? {
        if let Some(generate_event::Event::Result(r)) = ev.event {
            return r.png.first().map(|p| p.to_vec()).context("no png");
        }
    }
    bail!("no result")
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let bin = match &a.qwen_image {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("qwen-image"),
    };
    let model = a.model.to_str().context("utf-8 model path")?;
    let te = spawn(
        &bin,
        &[
            "serve",
            "--stage",
            "text-encoder",
            "--listen",
            "127.0.0.1:0",
            "--model",
            model,
        ],
    )
    .await?;
    let dn = spawn(
        &bin,
        &[
            "serve",
            "--stage",
            "denoiser",
            "--listen",
            "127.0.0.1:0",
            "--model",
            model,
        ],
    )
    .await?;
    let vae = spawn(
        &bin,
        &[
            "serve",
            "--stage",
            "vae",
            "--listen",
            "127.0.0.1:0",
            "--model",
            model,
        ],
    )
    .await?;
    let gw = spawn(
        &bin,
        &[
            "serve",
            "--stage",
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--text-encoder",
            &te.url,
            "--denoiser",
            &dn.url,
            "--vae",
            &vae.url,
        ],
    )
    .await?;
    wait_serving(&gw.url).await?;
    let ch = Channel::from_shared(gw.url.clone())?.connect().await?;
    let mut client = ImageGeneratorClient::new(ch).max_decoding_message_size(128 << 20);
    let local = tokio::task::block_in_place(|| InProcess::load(&a.model))?;

    // Warm-up (allocator, caches), and a check that both paths make the same image.
    let png_grpc = grpc_run(&mut client, &a).await?;
    let png_local = tokio::task::block_in_place(|| local.run(&a))?;
    let same = decode_rgb(&png_grpc)? == decode_rgb(&png_local)?;
    let (mut t_grpc, mut t_local) = (Vec::new(), Vec::new());
    for i in 0..a.runs {
        let t = Instant::now();
        grpc_run(&mut client, &a).await?;
        t_grpc.push(t.elapsed());
        let t = Instant::now();
        tokio::task::block_in_place(|| local.run(&a))?;
        t_local.push(t.elapsed());
        eprintln!("run {i}: grpc {:?} in-process {:?}", t_grpc[i], t_local[i]);
    }
    let (g, l) = (median(&mut t_grpc), median(&mut t_local));
    let overhead = (g.as_secs_f64() / l.as_secs_f64() - 1.0) * 100.0;
    println!(
        "{}x{} {} steps, true CFG {CFG}, {} runs: median grpc {:.3}s, in-process {:.3}s, overhead {overhead:+.2}% (identical pixels: {same})",
        a.width,
        a.height,
        a.steps,
        a.runs,
        g.as_secs_f64(),
        l.as_secs_f64()
    );
    Ok(())
}

/// The IDAT payload of a PNG (same encoder and settings on both paths, so equal pixels give equal
/// bytes; the text chunks differ and are skipped).
fn decode_rgb(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 8; // PNG signature
    while i + 8 <= bytes.len() {
        let len = u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]) as usize;
        let end = i + 8 + len;
        let data = bytes.get(i + 8..end).context("truncated PNG chunk")?;
        if &bytes[i + 4..i + 8] == b"IDAT" {
            out.extend_from_slice(data);
        }
        i = end + 4; // CRC
    }
    Ok(out)
}
