//! Opening the device and dtype a service chose for a model (the choice itself is the service's).

use candle_core::{DType, Device, Result};

/// `None` = the CPU, `Some(n)` = CUDA device n (an error in a build without the `cuda` feature); `bf16`
/// selects bfloat16 weights and activations, otherwise f32.
pub fn open(cuda_ordinal: Option<usize>, bf16: bool) -> Result<(Device, DType)> {
    let device = match cuda_ordinal {
        None => Device::Cpu,
        Some(n) => Device::new_cuda(n).map_err(|e| cuda_open_error(n, e))?,
    };
    Ok((device, if bf16 { DType::BF16 } else { DType::F32 }))
}

/// Says what a failed `cuda:N` means for the operator; a build without `cuda` keeps candle's own error.
fn cuda_open_error(n: usize, e: candle_core::Error) -> candle_core::Error {
    if matches!(e, candle_core::Error::NotCompiledWithCudaSupport) {
        return e;
    }
    // candle appends a (possibly empty) backtrace after a newline: keep the error's own line.
    let full = e.to_string();
    let text = full.lines().next().unwrap_or_default();
    let hint = if text.contains("CUDA_ERROR_STUB_LIBRARY") {
        "the libcuda.so.1 found is the toolkit's stub, not an NVIDIA driver: run on a GPU host with a \
         CUDA 13 driver (R580 or newer) and keep the stub off LD_LIBRARY_PATH"
    } else if text.contains("CUDA_ERROR_INVALID_DEVICE") || text.contains("CUDA_ERROR_NO_DEVICE") {
        "no such GPU on this host: check `nvidia-smi` and the device the container was given"
    } else {
        "check that this host has an NVIDIA GPU with a CUDA 13 driver (R580 or newer), see `nvidia-smi`"
    };
    candle_core::Error::Msg(format!("cannot open CUDA device cuda:{n}: {text}; {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_cuda_open_names_the_device_and_what_to_check() {
        let stub = candle_core::Error::Msg("DriverError(CUDA_ERROR_STUB_LIBRARY, \"\")".into());
        let msg = cuda_open_error(1, stub).to_string();
        assert!(
            msg.contains("cuda:1") && msg.contains("stub") && msg.contains("R580"),
            "{msg}"
        );
        let not_built = cuda_open_error(0, candle_core::Error::NotCompiledWithCudaSupport);
        assert!(matches!(
            not_built,
            candle_core::Error::NotCompiledWithCudaSupport
        ));
    }
}
