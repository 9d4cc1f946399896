//! Message-size limits, explicit and bounded, set on both the server and the client side of every stage.
//!
//! Sizing for a 2048x2048 image (the largest size the gateway accepts):
//! - latents `[1, 16, 1, 256, 256]` f32 = 4 MiB; prompt embeddings `[1, 1024, 3584]` f32 = 14 MiB;
//! - a decoded float image `[1, 3, 2048, 2048]` f32 = 48 MiB; its RGB8 bytes = 12 MiB.
//!
//! 128 MiB carries a batch of two 2048x2048 float images (96 MiB) plus framing; larger requests get
//! OUT_OF_RANGE from tonic before any work is done.

/// Largest gRPC message a stage service or stage client sends or accepts.
pub const MAX_MESSAGE_BYTES: usize = 128 << 20;

/// Largest element count of one tensor (bounds allocations before the byte-length check):
/// 32 Mi elements = 128 MiB of f32.
pub const MAX_TENSOR_ELEMENTS: usize = 32 << 20;
