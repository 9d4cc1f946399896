//! Pixel preprocessing for the gateway, reproducing what diffusers' `VaeImageProcessor` does with Pillow:
//! LANCZOS resizing bit-exact with Pillow's 8-bit resampler, RGB → L conversion, mask binarisation and the
//! nearest downsampling of a mask to the latent grid; and the uint8 bicubic resize of Qwen2-VL's image processor
//! (torchvision/PyTorch-exact, [`bicubic`]). Pure Rust: the gateway never links candle.

pub mod bicubic;
pub mod convert;
pub mod edit_sizes;
pub mod mask;
pub mod openpose;
pub mod resize;

/// An 8-bit image, row-major, interleaved channels (`channels` = 1 for L, 3 for RGB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Image8 {
    /// Wraps `data`; errors when its length is not `width·height·channels`.
    pub fn new(
        width: usize,
        height: usize,
        channels: usize,
        data: Vec<u8>,
    ) -> Result<Self, String> {
        if data.len() != width * height * channels {
            return Err(format!(
                "image data has {} bytes, expected {width}x{height}x{channels} = {}",
                data.len(),
                width * height * channels
            ));
        }
        Ok(Self {
            width,
            height,
            channels,
            data,
        })
    }

    pub fn pixel(&self, x: usize, y: usize) -> &[u8] {
        let i = (y * self.width + x) * self.channels;
        &self.data[i..i + self.channels]
    }
}
