//! The body of every service binary's `main`: telemetry, the metrics endpoint, the listener, and serving
//! until SIGTERM / ctrl-c. Machine-readable lines on stdout (`metrics listening on ADDR`, `health listening
//! on ADDR`, `listening on ADDR`) tell scripts and tests the bound addresses; logs go to stderr.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;

use tokio::net::TcpListener;

use crate::args::CommonArgs;
use crate::tls::Listeners;

/// The shutdown signal handed to a service.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Sets the CPU thread defaults every binary runs with, unless the user set them:
///
/// - `CANDLE_NUM_THREADS=1` turns off candle's elementwise thread pool: candle 0.11 runs large elementwise
///   ops on a `BarrierPool` whose caller spin-waits without bound for its workers (and the workers spin
///   25 000 times before parking), which burns the cores other processes and our own matmul threads need on
///   a shared machine. Elementwise results do not depend on the thread count. Measured on the 2-core machine
///   under load 13-19: a whole 256x256 request went from 4.33x to 2.86x of diffusers' time (README,
///   Performance). candle's quantized (GGUF) matmuls also run on that pool: with quantized weights,
///   `CANDLE_NUM_THREADS=2` (the core count) gives them their threads back.
/// - `RAYON_NUM_THREADS` = the cores this process may use (the smaller of the CPUs it may run on and the
///   physical cores). Matmuls fork into that many threads. Without the variable candle 0.11 works the count
///   out again for every matmul (`candle_core::utils::get_num_threads`), reading `/proc/cpuinfo` each time:
///   on the default model at 8 clients that halved the denoiser's throughput (README, Performance).
///
/// Call first in `main`, before any thread exists.
pub fn default_cpu_threads() {
    let cores = || {
        let usable = std::thread::available_parallelism().map_or(1, usize::from);
        usable.min(num_cpus::get_physical()).max(1).to_string()
    };
    let defaults: [(&str, &dyn Fn() -> String); 2] = [
        ("CANDLE_NUM_THREADS", &|| "1".to_string()),
        ("RAYON_NUM_THREADS", &cores),
    ];
    for (name, value) in defaults {
        if std::env::var_os(name).is_none() {
            // SAFETY: called at the top of `main` before any other thread is started, so nothing reads or
            // writes the environment concurrently.
            #[allow(unsafe_code)]
            unsafe {
                std::env::set_var(name, value())
            };
        }
    }
}

/// Runs `serve(listeners, shutdown)` for service `binary` (its OpenTelemetry `service.name`) with the
/// shared flags `common` (TLS files are read before binding: a bad file fails the start). Exit code 0
/// after a clean drain, 1 when serving failed.
pub fn serve_main<F, Fut, E>(binary: &'static str, common: &CommonArgs, serve: F) -> ExitCode
where
    F: FnOnce(Listeners, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    // Created before the runtime, so dropped after it: the guard flushes spans on its own thread.
    let _telemetry = match crate::telemetry::init(binary, common) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async {
        if let Some(addr) = common.metrics_listen {
            let bound = crate::telemetry::serve_metrics(addr)
                .await
                .map_err(|e| e.to_string())?;
            println!("metrics listening on {bound}");
        }
        let listeners = bind(common).await?;
        serve(listeners, Box::pin(crate::shutdown::signal()))
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{binary} stopped with an error");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the TLS files and binds the listeners of `common` (`--listen`, `--health-listen`), printing
/// their addresses (`health listening on ADDR`, then `listening on ADDR`).
pub async fn bind(common: &CommonArgs) -> Result<Listeners, String> {
    let tls = common.tls.load()?;
    let health = match common.tls.health_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (--health-listen): {e}"))?;
            let bound = listener.local_addr().map_err(|e| e.to_string())?;
            println!("health listening on {bound}");
            Some(listener)
        }
        None => None,
    };
    let main = TcpListener::bind(common.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", common.listen))?;
    let addr = main.local_addr().map_err(|e| e.to_string())?;
    println!("listening on {addr}");
    Ok(Listeners {
        main,
        tls,
        health,
        reflection: !common.no_reflection,
    })
}
