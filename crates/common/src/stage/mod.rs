//! The stage skeleton: everything a model stage service does besides its model call and its request
//! validation, written once for every stage (text encoder, denoiser, VAE, and later ones).
//!
//! A stage implements [`StageDef`]: its flags, what it reads from the snapshot before loading (the facts
//! requests are validated against and the components it describes), how its worker loads and checks the
//! model, and its gRPC service(s), whose handlers use a [`StageHandle`] to admit jobs. The skeleton gives it
//! `run` ([`serve::run`]: health, `StageInfo.Describe`, reflection, telemetry, drain, worker supervision),
//! the worker ([`worker`]: job prologue, metrics, panic handling), one error type ([`StageError`]) and the
//! binary's `main` ([`main`]).

pub mod args;
pub mod describe;
pub mod error;
pub mod gate;
pub mod handle;
pub mod memory;
pub mod serve;
pub mod worker;

use std::fmt::Debug;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches};
use qwen_image_proto::v1::{StageDescription, StageKind};
use tonic::service::Routes;

pub use args::{ComputeDtype, DeviceSpec, StageArgs};
pub use error::StageError;
pub use handle::{JobStream, SharedReply, StageHandle};
pub use memory::WeightsUsage;
pub use serve::run;
pub use worker::{Cancelled, Faults, JobCtx, Stats, StatsSnapshot};

use crate::args::CommonArgs;

/// What `run` needs besides the listener and the shutdown signal.
#[derive(Debug, Clone)]
pub struct StageConfig<A> {
    /// Diffusers snapshot directory (`--model`); `None` when the stage's weights come from a single file
    /// (`--transformer-weights`, ...) with the released model's config.
    pub model_dir: Option<PathBuf>,
    /// Requests admitted at once (running + waiting), at least 1.
    pub queue_capacity: usize,
    pub device: DeviceSpec,
    /// Most image pixels per request, summed over the batch (`--max-pixels`).
    pub max_pixels: u64,
    /// The stage's own flags.
    pub own: A,
    /// The worker's counters (tests observe them).
    pub stats: Stats,
    /// Test-only fault injection (see [`Faults`]); never set from flags.
    pub faults: Faults,
}

/// What a stage reads from its snapshot before the worker starts (cheap config reads).
pub struct Preparation<P> {
    /// What handlers validate requests against, and what `load` needs.
    pub state: P,
    /// The stage's part of its description: its component(s) and limits. The skeleton fills the rest.
    pub description: StageDescription,
}

/// One model stage.
pub trait StageDef: 'static {
    /// The stage's own flags, flattened beside [`CommonArgs`] and [`StageArgs`] into its binary and into
    /// `qwen-image serve`.
    type Args: clap::Args + Clone + Debug + Default + Send + Sync + 'static;
    /// What the worker thread owns (loaded there; it need not be `Send`).
    type Model: 'static;
    /// What `prepare` reads for the handlers and for `load`.
    type State: Clone + Send + Sync + 'static;

    /// Short name: logs, metrics `service` label, worker thread name (`denoiser`).
    const NAME: &'static str;
    /// Binary name and OpenTelemetry `service.name` (`qwen-image-denoiser`).
    const BINARY: &'static str;
    /// Full proto name of the stage's service, as health checks name it (`qwen_image.v1.Denoiser`).
    const SERVICE_NAME: &'static str;
    const KIND: StageKind;
    const DEFAULT_QUEUE_CAPACITY: usize;
    /// `cfg!(feature = "cuda")` of the stage crate.
    const CUDA_BUILT: bool;

    /// Reads the configs the stage needs before loading; an error names what is wrong with the snapshot.
    fn prepare(config: &StageConfig<Self::Args>) -> Result<Preparation<Self::State>, String>;
    /// Loads the model on the worker thread and warms it up.
    fn load(config: &StageConfig<Self::Args>, state: &Self::State) -> Result<Self::Model, String>;
    /// Checks that the model still works (a small warm-up pass); run after a job panicked.
    fn probe(model: &mut Self::Model) -> Result<(), String>;
    /// Adds the stage's gRPC service(s), whose handlers admit jobs through `handle`.
    fn routes(routes: Routes, handle: StageHandle<Self::Model>, state: Self::State) -> Routes;
    /// The weight memory the loaded model keeps resident, by component and format (reported in `/metrics`
    /// and logged once loaded, see [`memory`]).
    fn weights(_model: &Self::Model) -> Vec<WeightsUsage> {
        Vec::new()
    }

    /// A CPU configuration of `model_dir` with the default queue capacity and default own flags.
    fn config(model_dir: impl Into<PathBuf>) -> StageConfig<Self::Args> {
        StageConfig {
            model_dir: Some(model_dir.into()),
            queue_capacity: Self::DEFAULT_QUEUE_CAPACITY,
            device: DeviceSpec::Cpu,
            max_pixels: DeviceSpec::Cpu.default_max_pixels(),
            own: Self::Args::default(),
            stats: Stats::default(),
            faults: Faults::default(),
        }
    }

    /// The configuration from the shared stage flags and the stage's own. Without `--model` the stage's
    /// `prepare` needs its weights file flag (and says so).
    fn config_from(stage: &StageArgs, own: Self::Args) -> Result<StageConfig<Self::Args>, String> {
        let device = stage.device.check_built(Self::CUDA_BUILT)?;
        Ok(StageConfig {
            model_dir: stage.model.clone(),
            queue_capacity: stage.queue_capacity.unwrap_or(Self::DEFAULT_QUEUE_CAPACITY),
            device,
            max_pixels: stage.max_pixels.unwrap_or(device.default_max_pixels()),
            own,
            stats: Stats::default(),
            faults: Faults::default(),
        })
    }
}

/// The command line of a stage binary.
#[derive(Debug, clap::Parser)]
struct StageCli<A: clap::Args> {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    stage: StageArgs,
    #[command(flatten)]
    own: A,
}

/// The `main` of every stage binary: flags, telemetry, metrics, bind, serve until SIGTERM / ctrl-c; exit
/// code non-zero when the model cannot load or the worker stops.
pub fn main<D: StageDef>() -> std::process::ExitCode {
    crate::launch::default_cpu_threads();
    let command = StageCli::<D::Args>::command()
        .name(D::BINARY)
        .about(format!("The qwen-image {} stage service.", D::NAME));
    let cli = match StageCli::<D::Args>::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let config = match D::config_from(&cli.stage, cli.own) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    crate::launch::serve_main(D::BINARY, &cli.common, move |listener, shutdown| {
        tracing::info!(?config, "starting");
        run::<D>(config, listener, shutdown)
    })
}
