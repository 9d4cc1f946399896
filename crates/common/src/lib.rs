//! Plumbing shared by the qwen-image stage services and the gateway, and the stage skeleton ([`stage`]).
//! Never links candle.

pub mod admit_gate;
pub mod args;
pub mod deadline;
pub mod grpc;
pub mod health;
pub mod launch;
pub mod limits;
pub mod metric_names;
pub mod queue;
pub mod randn;
pub mod shutdown;
pub mod stage;
pub mod status;
pub mod telemetry;
pub mod tensor;
pub mod tls;
pub mod transport;
pub mod wire_guard;
