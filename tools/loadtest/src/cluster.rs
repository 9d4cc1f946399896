//! The four services as separate processes on loopback (`--listen 127.0.0.1:0`), replicas per stage, and
//! their resident memory read from `/proc/PID/status` (peak `VmHWM`, current `VmRSS`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_testkit::process::{ServiceProcess, scrape, stage_flags, wait_serving};
use tonic::transport::Channel;

/// Longest wait for a process to print its address and report SERVING (model loading included).
const START_GUARD: Duration = Duration::from_secs(300);
/// How often memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// A stage of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    TextEncoder,
    Denoiser,
    Vae,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::TextEncoder, Stage::Denoiser, Stage::Vae];

    fn binary(self) -> &'static str {
        match self {
            Stage::TextEncoder => "qwen-image-text-encoder",
            Stage::Denoiser => "qwen-image-denoiser",
            Stage::Vae => "qwen-image-vae",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stage::TextEncoder => "text-encoder",
            Stage::Denoiser => "denoiser",
            Stage::Vae => "vae",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where the binaries and the model are.
#[derive(Debug, Clone)]
pub struct Setup {
    pub bin_dir: PathBuf,
    pub model: PathBuf,
}

/// Peak and current resident memory (bytes) of every process started, by label (`denoiser#1`, `gateway`).
#[derive(Debug, Default)]
struct Memory {
    /// label -> pid of the running process.
    pids: BTreeMap<String, u32>,
    /// label -> the largest VmHWM seen (kept after the process died or was replaced).
    peak: BTreeMap<String, u64>,
}

/// The running services.
pub struct Cluster {
    setup: Setup,
    /// Replicas per stage, in [`Stage`] order.
    replicas: [Vec<ServiceProcess>; 3],
    pub gateway: ServiceProcess,
    memory: Arc<Mutex<Memory>>,
    sampler: tokio::task::JoinHandle<()>,
}

fn label(stage: Stage, i: usize) -> String {
    format!("{}#{i}", stage.name())
}

/// `VmHWM` and `VmRSS` of `pid`, in bytes.
fn proc_memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

async fn start_process(
    setup: &Setup,
    binary: &str,
    listen: &str,
    args: &[&str],
) -> Result<ServiceProcess> {
    let program = setup.bin_dir.join(binary);
    let mut full = vec!["--listen", listen, "--metrics-listen", "127.0.0.1:0"];
    full.extend_from_slice(args);
    let p = ServiceProcess::spawn(&program, &full, &[("RUST_LOG", "warn")], START_GUARD)
        .await
        .map_err(|e| anyhow!(e))?;
    wait_serving(&p.url(), START_GUARD)
        .await
        .map_err(|e| anyhow!("{binary}: {e}"))?;
    Ok(p)
}

async fn start_stage(setup: &Setup, stage: Stage, listen: &str) -> Result<ServiceProcess> {
    let model = setup.model.to_str().context("model path is not UTF-8")?;
    start_process(setup, stage.binary(), listen, &["--model", model]).await
}

impl Cluster {
    /// `replicas` of each stage (text encoder, denoiser, VAE) and a gateway with `gateway_args`.
    pub async fn start(setup: &Setup, replicas: [usize; 3], gateway_args: &[&str]) -> Result<Self> {
        let memory = Arc::new(Mutex::new(Memory::default()));
        let mut sets: [Vec<ServiceProcess>; 3] = Default::default();
        for stage in Stage::ALL {
            for i in 0..replicas[stage.index()] {
                let p = start_stage(setup, stage, "127.0.0.1:0").await?;
                track(&memory, label(stage, i), &p);
                sets[stage.index()].push(p);
            }
        }
        let flags = stage_flags(&sets[0], &sets[1], &sets[2]);
        let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend_from_slice(gateway_args);
        let gateway = start_process(setup, "qwen-image-gateway", "127.0.0.1:0", &args).await?;
        track(&memory, "gateway".into(), &gateway);
        let sampler = tokio::spawn(sample_forever(memory.clone()));
        Ok(Self {
            setup: setup.clone(),
            replicas: sets,
            gateway,
            memory,
            sampler,
        })
    }

    pub async fn client(&self) -> Result<ImageGeneratorClient<Channel>> {
        let ch = Channel::from_shared(self.gateway.url())?.connect().await?;
        Ok(ImageGeneratorClient::new(ch).max_decoding_message_size(64 << 20))
    }

    /// The URL of replica `i` of `stage`.
    pub fn url(&self, stage: Stage, i: usize) -> String {
        self.replicas[stage.index()][i].url()
    }

    /// Kills replica `i` of `stage` with SIGKILL (no drain; its connections reset).
    pub async fn kill(&mut self, stage: Stage, i: usize) -> Result<()> {
        sample_once(&self.memory);
        self.replicas[stage.index()][i]
            .kill()
            .await
            .map_err(|e| anyhow!(e))
    }

    /// Starts replica `i` of `stage` again on the address it had (the gateway knows it by that address).
    pub async fn restart(&mut self, stage: Stage, i: usize) -> Result<()> {
        let addr = self.replicas[stage.index()][i].addr.to_string();
        let p = start_stage(&self.setup, stage, &addr).await?;
        track(&self.memory, label(stage, i), &p);
        self.replicas[stage.index()][i] = p;
        Ok(())
    }

    /// Successful `Denoise` calls that replica `i` of `stage` served (from its `/metrics`).
    pub async fn served(&self, stage: Stage, i: usize) -> Result<f64> {
        let p = &self.replicas[stage.index()][i];
        let addr = p.metrics_addr.context("no metrics address printed")?;
        let text = scrape(addr).await.map_err(|e| anyhow!(e))?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("qwen_image_grpc_server_requests_total{"))
            .filter(|l| l.contains("code=\"0\"") || l.contains("code=\"OK\""))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum())
    }

    /// Current RSS (bytes) of every running process, by label.
    pub fn rss_now(&self) -> BTreeMap<String, u64> {
        let pids = self
            .memory
            .lock()
            .map(|m| m.pids.clone())
            .unwrap_or_default();
        pids.into_iter()
            .filter_map(|(l, pid)| proc_memory(pid).map(|(_, rss)| (l, rss)))
            .collect()
    }

    /// Peak RSS (bytes) per service (the largest over a stage's replicas and restarts).
    pub fn peaks(&self) -> BTreeMap<String, u64> {
        sample_once(&self.memory);
        let mut out = BTreeMap::new();
        if let Ok(m) = self.memory.lock() {
            for (label, bytes) in &m.peak {
                let service = label.split('#').next().unwrap_or(label).to_string();
                let e = out.entry(service).or_insert(0);
                *e = (*e).max(*bytes);
            }
        }
        out
    }

    /// The gateway's log lines containing every one of `needles`.
    pub fn gateway_log_count(&self, needles: &[&str]) -> usize {
        self.gateway
            .log_lines()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}

fn track(memory: &Mutex<Memory>, label: String, p: &ServiceProcess) {
    if let (Ok(mut m), Some(pid)) = (memory.lock(), p.pid()) {
        m.pids.insert(label, pid);
    }
}

fn sample_once(memory: &Mutex<Memory>) {
    let Ok(mut m) = memory.lock() else { return };
    let pids = m.pids.clone();
    for (label, pid) in pids {
        if let Some((hwm, _)) = proc_memory(pid) {
            let e = m.peak.entry(label).or_insert(0);
            *e = (*e).max(hwm);
        }
    }
}

async fn sample_forever(memory: Arc<Mutex<Memory>>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        sample_once(&memory);
    }
}

/// The directory of this executable (`target/<profile>`), where cargo puts the workspace's binaries.
pub fn own_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("the executable has no directory")
}
