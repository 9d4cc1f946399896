//! `qwen-image generate`: one text-to-image request, to a running gateway or to a stack started in this
//! process, with a progress bar on stderr; writes the PNG(s).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::{
    ControlNetInpaintRequest, DataType, EditRequest, GenerateResult, Img2ImgRequest,
    InpaintRequest, OutpaintRequest, PoseRequest, PreviewSettings, Stage, Tensor,
    TextToImageRequest, generate_event,
};

use crate::model_dir::{default_model_dir, model_default_size};
use crate::settings::SettingsArgs;
use crate::stack::{LocalStack, StageOptions};

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// Initial latents instead of seeded noise: a safetensors file with one F32 tensor (or one named
    /// `latents`) of shape [N, 1, C, H/f, W/f] or [N, C, 1, H/f, W/f] (C latent channels, f the VAE scale
    /// factor: 16 and 8 for Qwen-Image).
    #[arg(long, env = "QWEN_IMAGE_LATENTS")]
    pub latents: Option<PathBuf>,
    /// Also write a preview every N denoising steps (and of the last step), decoded by the VAE stage, as
    /// OUT_STEM.stepNNN.png next to --out.
    #[arg(long, env = "QWEN_IMAGE_PREVIEW_EVERY")]
    pub preview_every: Option<u32>,
    /// Longest side of the previews in pixels (default 256; never enlarged).
    #[arg(long, env = "QWEN_IMAGE_PREVIEW_MAX_SIDE", requires = "preview_every")]
    pub preview_max_side: Option<u32>,
    #[command(flatten)]
    pub target: TargetArgs,
}

pub fn run(args: GenerateArgs) -> Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(generate(args))?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn generate(args: GenerateArgs) -> Result<()> {
    let request = ApiRequest::TextToImage(build_request(&args)?);
    let t = &args.target;
    let mut options = StageOptions::default();
    options.denoiser.loras = args.settings.lora_files();
    execute(request, &t.to_target(t.model.clone(), options), &t.out).await?;
    Ok(())
}

/// Where a command's request goes and where its PNG is written (every request command flattens it).
#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// Where to write the PNG.
    #[arg(long, env = "QWEN_IMAGE_OUT")]
    pub out: PathBuf,
    /// A running gateway (e.g. http://127.0.0.1:50051). Without it, a local stack is started for the call.
    #[arg(long, env = "QWEN_IMAGE_GATEWAY")]
    pub gateway: Option<String>,
    /// Model for the local stack (diffusers snapshot directory). Default: the embedded default model, or
    /// none when weight files are given (the released Qwen-Image configs).
    #[arg(long, env = "QWEN_IMAGE_MODEL", conflicts_with = "gateway")]
    pub model: Option<PathBuf>,
    /// Single weight files for the local stack's stages (`--transformer-weights`, `--text-encoder-weights`,
    /// `--tokenizer`, `--vae-weights`; the same flags as `serve`'s).
    #[command(flatten)]
    pub weights: crate::weights::WeightFilesArgs,
    /// PEM CA bundle that verifies an https:// --gateway (default: the system's roots).
    #[arg(long, env = "QWEN_IMAGE_CA_CERT", requires = "gateway")]
    pub ca_cert: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, env = "QWEN_IMAGE_TIMEOUT_SECS", default_value_t = 3600)]
    pub timeout_secs: u64,
    /// No progress bar.
    #[arg(long, env = "QWEN_IMAGE_QUIET")]
    pub quiet: bool,
    /// API key for a gateway started with `--api-keys-file`, sent as `authorization: Bearer KEY`.
    #[arg(long, env = "QWEN_IMAGE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl TargetArgs {
    /// The target for a local stack on `model` with `options` (and the weight-file flags), or the gateway
    /// when one is named.
    pub fn to_target(&self, model: Option<PathBuf>, options: StageOptions) -> Target {
        Target {
            gateway: self.gateway.clone(),
            ca_cert: self.ca_cert.clone(),
            model,
            timeout: Duration::from_secs(self.timeout_secs),
            quiet: self.quiet,
            api_key: self.api_key.clone(),
            options: options.with_weight_files(&self.weights),
        }
    }
}

/// The ControlNet flags of `pose` and `controlnet-inpaint`.
#[derive(Args, Debug, Clone)]
pub struct ControlArgs {
    /// The ControlNet. Local stack: `DIR` or `NAME=DIR` for the denoiser to load (default: MODEL/controlnet
    /// for `pose`, MODEL/controlnet_inpaint for `controlnet-inpaint`). With --gateway: which of the
    /// denoiser's ControlNets to use (NAME, or the folder name of DIR; default: its only one).
    #[arg(long, env = "QWEN_IMAGE_CONTROLNET", value_parser = qwen_image_denoiser::args::parse_controlnet)]
    pub controlnet: Option<qwen_image_denoiser::ControlNetSpec>,
    /// diffusers' controlnet_conditioning_scale (server default 1.0; the InstantX cards suggest 0.8-1.0).
    #[arg(long, env = "QWEN_IMAGE_CONDITIONING_SCALE")]
    pub conditioning_scale: Option<f32>,
    /// First fraction of the schedule where the ControlNet runs (default 0).
    #[arg(long, env = "QWEN_IMAGE_CONTROL_GUIDANCE_START")]
    pub control_guidance_start: Option<f32>,
    /// Last fraction of the schedule where the ControlNet runs (default 1).
    #[arg(long, env = "QWEN_IMAGE_CONTROL_GUIDANCE_END")]
    pub control_guidance_end: Option<f32>,
}

impl ControlArgs {
    /// The request's ControlNet settings, naming the ControlNet `controlnet_id`.
    pub fn to_proto(&self, controlnet_id: String) -> qwen_image_proto::v1::ControlNetSettings {
        qwen_image_proto::v1::ControlNetSettings {
            controlnet_id,
            conditioning_scale: self.conditioning_scale,
            guidance_start: self.control_guidance_start,
            guidance_end: self.control_guidance_end,
        }
    }
}

/// A request to one of the gateway's flows.
pub enum ApiRequest {
    TextToImage(TextToImageRequest),
    Img2Img(Img2ImgRequest),
    Inpaint(InpaintRequest),
    Outpaint(OutpaintRequest),
    Pose(PoseRequest),
    ControlNetInpaint(ControlNetInpaintRequest),
    Edit(EditRequest),
}

/// Where a command sends its request: a running gateway, or a local stack on `model` (default model when
/// absent) started for the call.
pub struct Target {
    pub gateway: Option<String>,
    /// CA bundle verifying an https:// gateway.
    pub ca_cert: Option<PathBuf>,
    pub model: Option<PathBuf>,
    pub timeout: Duration,
    pub quiet: bool,
    /// Sent as `authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Options of the local stack's stages (e.g. the ControlNets its denoiser loads).
    pub options: StageOptions,
}

/// Fills a text-to-image or pose request's unset size with the size the model declares (the demo model
/// draws at 64x64; the gateway's own default is 1024x1024).
fn with_model_default_size(request: ApiRequest, model: &Path) -> ApiRequest {
    let Some((w, h)) = model_default_size(model) else {
        return request;
    };
    let fill = |s: &mut Option<qwen_image_proto::v1::GenerationSettings>| {
        if let Some(s) = s.as_mut()
            && s.width_px == 0
            && s.height_px == 0
        {
            (s.width_px, s.height_px) = (w, h);
        }
    };
    match request {
        ApiRequest::TextToImage(mut r) => {
            fill(&mut r.settings);
            ApiRequest::TextToImage(r)
        }
        ApiRequest::Pose(mut r) => {
            fill(&mut r.settings);
            ApiRequest::Pose(r)
        }
        other => other,
    }
}

/// Sends `request`, writes the PNG(s) to `out` (numbered after the first) and prints a summary.
pub async fn execute(request: ApiRequest, target: &Target, out: &Path) -> Result<GenerateResult> {
    let (timeout, quiet) = (target.timeout, target.quiet);
    let result = match &target.gateway {
        Some(url) => {
            send(
                url,
                target.ca_cert.as_deref(),
                request,
                timeout,
                quiet,
                target.api_key.as_deref(),
                out,
            )
            .await?
        }
        None => {
            let model = match &target.model {
                Some(m) => Some(m.clone()),
                // weight files alone: the released configs, no snapshot
                None if target.options.has_weight_files() => None,
                None => Some(default_model_dir()?),
            };
            if !quiet {
                match &model {
                    Some(m) => eprintln!("starting a local stack on {} ...", m.display()),
                    None => eprintln!("starting a local stack on the weight files ..."),
                }
            }
            let request = match &model {
                Some(m) => with_model_default_size(request, m),
                None => request,
            };
            let mut options = target.options.clone();
            if let Some(m) = &model {
                options.denoiser.loras =
                    crate::model_dir::model_loras(m, &options.denoiser.loras, &request);
            }
            let mut stack = LocalStack::start_with(model, "127.0.0.1:0", options).await?;
            let out = async {
                stack.wait_ready(timeout).await?;
                send(
                    &stack.gateway_url(),
                    stack.ca.as_deref(),
                    request,
                    timeout,
                    quiet,
                    None,
                    out,
                )
                .await
            }
            .await;
            stack.shutdown().await?;
            out?
        }
    };
    for (i, png) in result.png.iter().enumerate() {
        let path = numbered(out, i);
        std::fs::write(&path, png).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    println!(
        "seed {} size {}x{} request {} in {:.1}s",
        result.seed,
        result.width_px,
        result.height_px,
        result.request_id,
        result.elapsed_ms as f64 / 1000.0
    );
    Ok(result)
}

impl ApiRequest {
    /// The request's common settings.
    pub fn settings(&self) -> Option<&qwen_image_proto::v1::GenerationSettings> {
        match self {
            Self::TextToImage(r) => r.settings.as_ref(),
            Self::Img2Img(r) => r.settings.as_ref(),
            Self::Inpaint(r) => r.settings.as_ref(),
            Self::Outpaint(r) => r.settings.as_ref(),
            Self::Pose(r) => r.settings.as_ref(),
            Self::ControlNetInpaint(r) => r.settings.as_ref(),
            Self::Edit(r) => r.settings.as_ref(),
        }
    }
}

/// `out.png`, `out-1.png`, `out-2.png`, ...
fn numbered(out: &Path, i: usize) -> PathBuf {
    if i == 0 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}-{i}.{ext}"))
}

fn build_request(args: &GenerateArgs) -> Result<TextToImageRequest> {
    let initial_latents = match &args.latents {
        Some(p) => Some(read_latents(p)?),
        None => None,
    };
    let preview = args.preview_every.map(|n| PreviewSettings {
        every_n_steps: n,
        max_side_px: args.preview_max_side.unwrap_or(0),
    });
    Ok(TextToImageRequest {
        settings: Some(args.settings.to_proto(preview)),
        initial_latents,
    })
}

/// One F32 tensor from a safetensors file (the only one, or the one named `latents`).
pub fn read_latents(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let names = st.names();
    let name = match names.as_slice() {
        [one] => one.to_string(),
        _ if names.iter().any(|n| *n == "latents") => "latents".to_string(),
        _ => bail!(
            "{} holds {} tensors; keep one, or name it `latents`",
            path.display(),
            names.len()
        ),
    };
    let view = st.tensor(&name)?;
    if view.dtype() != safetensors::Dtype::F32 {
        bail!(
            "tensor `{name}` in {} is {:?}; save it as float32",
            path.display(),
            view.dtype()
        );
    }
    Ok(Tensor {
        dtype: DataType::F32 as i32,
        shape: view.shape().iter().map(|&d| d as u64).collect(),
        data: bytes::Bytes::copy_from_slice(view.data()),
    })
}

/// Sends the request and follows its stream; preview PNGs (requested with `--preview-every`) are written
/// next to `out` as `STEM.stepNNN.png`.
async fn send(
    url: &str,
    ca_cert: Option<&Path>,
    request: ApiRequest,
    timeout: Duration,
    quiet: bool,
    api_key: Option<&str>,
    out: &Path,
) -> Result<GenerateResult> {
    let authorization = api_key
        .map(|k| {
            tonic::metadata::MetadataValue::try_from(format!("Bearer {}", k.trim()))
                .context("--api-key must be printable ASCII")
        })
        .transpose()?;
    let channel = qwen_image_common::tls::client::endpoint(url, ca_cert)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("`{url}` is not a usable gateway URL"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to the gateway at {url}"))?;
    let mut client = ImageGeneratorClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    type Auth = Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>;
    fn call<T>(msg: T, timeout: Duration, authorization: &Auth) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(timeout);
        if let Some(v) = authorization {
            req.metadata_mut().insert("authorization", v.clone());
        }
        req
    }
    let stream = match request {
        ApiRequest::TextToImage(r) => client.text_to_image(call(r, timeout, &authorization)).await,
        ApiRequest::Edit(r) => client.edit(call(r, timeout, &authorization)).await,
        ApiRequest::Img2Img(r) => client.img2_img(call(r, timeout, &authorization)).await,
        ApiRequest::Inpaint(r) => client.inpaint(call(r, timeout, &authorization)).await,
        ApiRequest::Outpaint(r) => client.outpaint(call(r, timeout, &authorization)).await,
        ApiRequest::Pose(r) => client.pose(call(r, timeout, &authorization)).await,
        ApiRequest::ControlNetInpaint(r) => {
            client
                .control_net_inpaint(call(r, timeout, &authorization))
                .await
        }
    };
    let mut stream = stream.map_err(status_error)?.into_inner();
    let mut bar = Progress::new(quiet);
    while let Some(ev) = stream.message().await.map_err(status_error)? {
        match ev.event {
            Some(generate_event::Event::Progress(p)) => {
                if !p.preview_png.is_empty() {
                    let path = preview_path(out, p.step);
                    std::fs::write(&path, &p.preview_png)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                bar.update(p.stage, p.step, p.total_steps, p.queue_position)
            }
            Some(generate_event::Event::Result(r)) => {
                bar.finish();
                return Ok(r);
            }
            None => {}
        }
    }
    bar.finish();
    bail!("the gateway ended the stream without a result")
}

/// `dir/name.png` → `dir/name.step007.png`.
fn preview_path(out: &Path, step: u32) -> PathBuf {
    let stem = out
        .file_stem()
        .map_or_else(|| "out".into(), |s| s.to_string_lossy());
    out.with_file_name(format!("{stem}.step{step:03}.png"))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("gateway answered {:?}: {}", s.code(), s.message())
}

/// A one-line progress bar on stderr.
struct Progress {
    quiet: bool,
    started: Instant,
    drawn: bool,
}

impl Progress {
    const WIDTH: u32 = 30;

    fn new(quiet: bool) -> Self {
        Self {
            quiet,
            started: Instant::now(),
            drawn: false,
        }
    }

    fn update(&mut self, stage: i32, step: u32, total: u32, queue_position: u32) {
        if self.quiet {
            return;
        }
        let label = match Stage::try_from(stage) {
            Ok(Stage::EncodePrompt) => "encoding prompt",
            Ok(Stage::EncodeImage) => "encoding image",
            Ok(Stage::Denoise) => "denoising",
            Ok(Stage::Decode) => "decoding",
            Ok(Stage::Queued) => "queued",
            _ => "working",
        };
        let label = if queue_position > 0 {
            format!("{label} (position {queue_position})")
        } else {
            label.to_string()
        };
        let filled = if total > 0 {
            (step.min(total) * Self::WIDTH) / total
        } else {
            0
        };
        let bar: String = (0..Self::WIDTH)
            .map(|i| if i < filled { '#' } else { '.' })
            .collect();
        let counts = if total > 0 {
            format!(" {step}/{total}")
        } else {
            String::new()
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{bar}]{counts} {label} {:.1}s\x1b[K",
            self.started.elapsed().as_secs_f64()
        );
        let _ = err.flush();
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_extra_images() {
        assert_eq!(numbered(Path::new("a/b.png"), 0), PathBuf::from("a/b.png"));
        assert_eq!(
            numbered(Path::new("a/b.png"), 2),
            PathBuf::from("a/b-2.png")
        );
    }
}
