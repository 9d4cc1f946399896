//! The VAE the worker thread owns: loading, warm-up, decode and encode. The only file that touches the
//! model crate's VAE API.

use candle_core::{DType, Device, Tensor};
use qwen_image_common::stage::ComputeDtype;
use qwen_image_common::tensor::HostTensor;
use qwen_image_model::source::{self, LoadOptions};
use qwen_image_model::vae::{AutoencoderKLQwenImage, Posterior, from_rgb8, to_rgb8};
use qwen_image_model::weights::MemoryReport;

use crate::{VaeServiceConfig, VaeState};

pub struct LoadedModel {
    pub vae: AutoencoderKLQwenImage,
    pub device: Device,
    /// The VAE's resident weights, by format.
    pub memory: MemoryReport,
}

/// Loads the VAE (from the snapshot or `--vae-weights`) and decodes + encodes one small image (warm-up).
/// Runs on the worker.
pub fn load(cfg: &VaeServiceConfig, state: &VaeState) -> candle_core::Result<LoadedModel> {
    let (device, dtype) = qwen_image_model::device::open(
        cfg.device.cuda_ordinal(),
        cfg.device.compute_dtype() == ComputeDtype::Bf16,
    )?;
    let loaded = source::load_vae(
        &state.weights,
        &state.config,
        &LoadOptions::new(dtype, &device),
    )?;
    let m = LoadedModel {
        vae: loaded.model,
        device,
        memory: loaded.memory,
    };
    warm_up(&m)?;
    Ok(m)
}

/// Decodes a one-cell latent and encodes the result back (touches every weight).
pub fn warm_up(m: &LoadedModel) -> candle_core::Result<()> {
    let (z, f) = (m.vae.config().z_dim, m.vae.config().scale_factor());
    let img = decode(
        m,
        &HostTensor {
            shape: vec![1, z, 1, 1],
            data: vec![0.0; z],
        },
    )?;
    let latents = encode(m, &[to_rgb8(&img)?.concat()], f, f, None)?;
    let sum = latents
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if !sum.is_finite() {
        candle_core::bail!("warm-up produced non-finite latents");
    }
    Ok(())
}

/// Normalised latents `[B, C, h, w]` → decoded `[B, 3, H, W]` in [-1, 1].
pub fn decode(m: &LoadedModel, latents: &HostTensor<f32>) -> candle_core::Result<Tensor> {
    let z = Tensor::from_slice(&latents.data, latents.shape.as_slice(), &m.device)?;
    let raw = m.vae.denormalize(&z)?;
    m.vae.decode(&raw)
}

/// RGB8 bytes per image of `[B, 3, H, W]`, HWC.
pub fn rgb8(image: &Tensor) -> candle_core::Result<Vec<Vec<u8>>> {
    to_rgb8(image)
}

/// RGB8 images of one size → normalised latents `[N, C, 1, h, w]`: the posterior sampled with `noise`
/// (`[N, C, 1, h, w]`, each image serving N / B consecutive rows) or its mean, then normalised
/// (diffusers' `retrieve_latents` and `(z - latents_mean) * (1 / latents_std)`).
pub fn encode(
    m: &LoadedModel,
    images: &[Vec<u8>],
    width: usize,
    height: usize,
    noise: Option<&HostTensor<f32>>,
) -> candle_core::Result<Tensor> {
    let xs = images
        .iter()
        .map(|img| from_rgb8(img, width, height, &m.device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let x = Tensor::cat(&xs, 0)?; // [B, 3, H, W]
    let posterior = m.vae.encode(&x)?; // [B, C, 1, h, w]
    let z = match noise {
        None => posterior.mode().clone(),
        Some(eps) => {
            let per_image = eps.shape[0] / images.len();
            let repeat = |t: &Tensor| -> candle_core::Result<Tensor> {
                let rows = (0..images.len())
                    .flat_map(|i| std::iter::repeat_n(i, per_image))
                    .map(|i| t.narrow(0, i, 1))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)
            };
            let repeated = Posterior {
                mean: repeat(&posterior.mean)?,
                logvar: repeat(&posterior.logvar)?,
            };
            let eps = Tensor::from_slice(&eps.data, eps.shape.as_slice(), &m.device)?;
            repeated.sample(&eps)?
        }
    };
    m.vae.normalize(&z)
}

/// Host copy as f32: (shape, data).
pub fn host_f32(t: &Tensor) -> candle_core::Result<(Vec<usize>, Vec<f32>)> {
    Ok((
        t.dims().to_vec(),
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
    ))
}
