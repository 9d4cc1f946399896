//! The VAE the worker thread owns: loading, warm-up, decode and encode. The only file that touches the
//! model crate's VAE API.

use candle_core::{DType, Device, Tensor};
use qwen_image_common::tensor::HostTensor;
use qwen_image_model::snapshot::{Snapshot, first_line};
use qwen_image_model::vae::{AutoencoderKLQwenImage, VaeConfig, from_rgb8, to_rgb8};

use crate::config::{DeviceSpec, VaeServiceConfig};
use crate::validate::VaeShape;

pub struct LoadedModel {
    pub vae: AutoencoderKLQwenImage,
    pub device: Device,
}

/// Reads `vae/config.json` (cheap) so `run` can validate requests before the model is loaded.
pub fn read_shape(cfg: &VaeServiceConfig) -> Result<(VaeShape, Vec<f32>, Vec<f32>), String> {
    let snapshot = Snapshot::open(&cfg.model_dir).map_err(|e| first_line(&e))?;
    let vcfg: VaeConfig = snapshot
        .config("vae", "config.json")
        .map_err(|e| first_line(&e))?;
    let mean = vcfg.latents_mean.iter().map(|&v| v as f32).collect();
    let std = vcfg.latents_std.iter().map(|&v| v as f32).collect();
    Ok((
        VaeShape {
            z_dim: vcfg.z_dim,
            scale_factor: vcfg.scale_factor(),
        },
        mean,
        std,
    ))
}

fn device(spec: DeviceSpec) -> candle_core::Result<(Device, DType)> {
    match spec {
        // f32 on CPU: the reference precision (candle has no bf16 conv on CPU).
        DeviceSpec::Cpu => Ok((Device::Cpu, DType::F32)),
        // bf16 on GPU: the published weights' dtype.
        DeviceSpec::Cuda(n) => Ok((Device::new_cuda(n)?, DType::BF16)),
    }
}

/// Loads the VAE and decodes + encodes one small image (warm-up). Runs on the worker.
pub fn load(cfg: &VaeServiceConfig) -> candle_core::Result<LoadedModel> {
    let (device, dtype) = device(cfg.device)?;
    let snapshot = Snapshot::open(&cfg.model_dir)?;
    let vae = AutoencoderKLQwenImage::load(&snapshot, dtype, &device)?;
    let (z, f) = (vae.config().z_dim, vae.config().scale_factor());
    let m = LoadedModel { vae, device };
    let img = decode(
        &m,
        &HostTensor {
            shape: vec![1, z, 1, 1],
            data: vec![0.0; z],
        },
    )?;
    let _ = encode(&m, &[to_rgb8(&img)?.concat()], f, f)?;
    Ok(m)
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

/// RGB8 images of one size → posterior (mean, logvar), each `[B, C, 1, h, w]`.
pub fn encode(
    m: &LoadedModel,
    images: &[Vec<u8>],
    width: usize,
    height: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let xs = images
        .iter()
        .map(|img| from_rgb8(img, width, height, &m.device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let x = Tensor::cat(&xs, 0)?; // [B, 3, H, W]
    let posterior = m.vae.encode(&x)?;
    Ok((posterior.mean, posterior.logvar))
}

/// Host copy as f32: (shape, data).
pub fn host_f32(t: &Tensor) -> candle_core::Result<(Vec<usize>, Vec<f32>)> {
    Ok((
        t.dims().to_vec(),
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
    ))
}
