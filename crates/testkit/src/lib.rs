//! Test support (never linked by a service): the one harness that starts services in-process or as
//! processes and waits for SERVING ([`service`], [`process`], [`stack`]), an OTLP receiver, the demo
//! judge, and what the whole-stack benchmarks share ([`bench`]).

pub mod bench;
pub mod certs;
pub mod files;
pub mod fuzz;
pub mod http;
pub mod judge;
pub mod otlp_sink;
pub mod process;
pub mod raw;
pub mod service;
pub mod stack;
