//! Opening the device and dtype a service chose for a model (the choice itself is the service's).

use candle_core::{DType, Device, Result};

/// `None` = the CPU, `Some(n)` = CUDA device n (an error in a build without the `cuda` feature); `bf16`
/// selects bfloat16 weights and activations, otherwise f32.
pub fn open(cuda_ordinal: Option<usize>, bf16: bool) -> Result<(Device, DType)> {
    let device = match cuda_ordinal {
        None => Device::Cpu,
        Some(n) => Device::new_cuda(n)?,
    };
    Ok((device, if bf16 { DType::BF16 } else { DType::F32 }))
}
