//! The gateway's request API: every public request validated into typed parameters, with every default
//! filled in and its pictures preprocessed as diffusers does, before any stage call. Errors are
//! INVALID_ARGUMENT naming the field and what to send. Front ends (the gRPC service, and any other) share
//! it, and tools can check what the gateway computes (`qwen-image parity` compares its preprocessing and
//! the generator's draws with diffusers').
//!
//! The model's geometry ([`Geometry`]) comes from the stages' descriptions; the gateway's own bounds are
//! [`Limits`].

pub mod cn_inpaint;
pub mod control;
pub mod edit;
pub mod instruct;
pub mod pose;
pub mod settings;
pub mod t2i;

pub use crate::geometry::Geometry;
pub use settings::{Limits, Settings};

use crate::error::GatewayError;

pub(crate) fn invalid(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument(msg.into())
}
