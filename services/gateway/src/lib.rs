//! The qwen-image gateway: the public `qwen_image.v1.ImageGenerator` API, orchestrating the text-encoder,
//! denoiser and VAE stage services over gRPC. Never links candle.
//!
//! Layers, top to bottom: the gRPC front end ([`service`]) validates requests through the request API
//! ([`request`], public: typed parameters for every flow) and runs a flow ([`flows`], siblings); the flows
//! are sequences of the shared steps of [`pipeline`]; the pipeline calls the stage clients ([`stages`]:
//! replicas, balancing, retries, and the model the stages describe, checked by [`geometry`]).

mod admit_gate;
pub mod auth;
pub mod config;
pub mod error;
mod flows;
pub mod geometry;
mod http;
mod images;
pub mod limits;
pub mod models;
mod pipeline;
mod pngmeta;
mod reference_pose;
pub mod request;
mod server;
mod service;
mod stages;

pub use config::{Args, GatewayArgs, GatewayConfig, ModelSpec};
pub use error::{GatewayError, StageName};
pub use server::{SERVICE_NAME, run, run_with_http};
pub use service::REQUEST_ID_KEY;
