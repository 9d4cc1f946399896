//! Test support for tests that run the services as separate processes (never linked by a service).

pub mod judge;
pub mod otlp_sink;
pub mod process;
