//! Service binaries as child processes: the addresses they print, health, SIGTERM, `/metrics`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// A service process (killed if dropped while running) and the addresses it printed on stdout:
/// `metrics listening on ADDR` (with `--metrics-listen`) and `listening on ADDR`.
pub struct ServiceProcess {
    child: Child,
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    /// The stdout lines before `listening on ADDR` (`health listening on ADDR`, `qwen-image serve`'s
    /// `STAGE listening on ADDR`, ...).
    pub printed: Vec<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// How many log lines were kept so far (wakes [`ServiceProcess::wait_log_line`]).
    stderr_count: tokio::sync::watch::Receiver<usize>,
    /// `http listening on ADDR` (the gateway's `--http-listen`), printed after `listening on`.
    http_addr: tokio::sync::watch::Receiver<Option<SocketAddr>>,
}

impl ServiceProcess {
    /// Starts `program args...` with `env` and waits (at most `timeout`) for its `listening on` line.
    pub async fn spawn(
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Self, String> {
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        // Logs: kept for assertions and echoed to the test's stderr.
        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        let (count_tx, stderr_count) = tokio::sync::watch::channel(0usize);
        if let Some(err) = child.stderr.take() {
            let keep = stderr_lines.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("{line}");
                    if let Ok(mut v) = keep.lock() {
                        v.push(line);
                        count_tx.send_replace(v.len());
                    }
                }
            });
        }
        let mut lines = BufReader::new(stdout).lines();
        let (mut metrics_addr, mut printed) = (None, Vec::new());
        let addr = tokio::time::timeout(timeout, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(a) = line.strip_prefix("metrics listening on ") {
                    metrics_addr = a.trim().parse().ok();
                } else if let Some(a) = line.strip_prefix("listening on ") {
                    return a.trim().parse::<SocketAddr>().map_err(|e| e.to_string());
                }
                printed.push(line);
            }
            Err(format!(
                "{} exited without printing its address",
                program.display()
            ))
        })
        .await
        .map_err(|_| format!("{} printed no address in {timeout:?}", program.display()))??;
        // Keep draining stdout so the child never blocks on a full pipe; note the HTTP address.
        // (`qwen-image serve` may print it before the gateway's `listening on`.)
        let printed_http = printed
            .iter()
            .find_map(|l| l.strip_prefix("http listening on ")?.trim().parse().ok());
        let (http_tx, http_addr) = tokio::sync::watch::channel(printed_http);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(a) = line.strip_prefix("http listening on ") {
                    http_tx.send_replace(a.trim().parse().ok());
                }
            }
        });
        Ok(Self {
            child,
            addr,
            metrics_addr,
            printed,
            stderr: stderr_lines,
            stderr_count,
            http_addr,
        })
    }

    /// The HTTP API address the process printed (`http listening on ADDR`), waiting at most `timeout`.
    pub async fn http_addr(&self, timeout: Duration) -> Result<SocketAddr, String> {
        let mut rx = self.http_addr.clone();
        let got = tokio::time::timeout(timeout, rx.wait_for(|a| a.is_some()))
            .await
            .map_err(|_| format!("no `http listening on` line in {timeout:?}"))?
            .map_err(|_| "the process closed stdout without an HTTP address".to_string())?;
        (*got).ok_or_else(|| "unparsable HTTP address".to_string())
    }

    /// The address of a `WHAT listening on ADDR` line printed before `listening on` (e.g. `health`).
    pub fn printed_addr(&self, what: &str) -> Option<SocketAddr> {
        let prefix = format!("{what} listening on ");
        self.printed
            .iter()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
    }

    /// The log lines (stderr) printed so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.stderr.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits (at most `timeout`) until a log line after the first `skip` satisfies `matches`, and returns
    /// it: for what a process logs after an event the test cannot otherwise observe the end of. `skip` is
    /// a `log_lines().len()` taken before the event, so an older line does not count.
    pub async fn wait_log_line(
        &self,
        skip: usize,
        matches: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        let mut count = self.stderr_count.clone();
        let look = || self.log_lines().into_iter().skip(skip).find(|l| matches(l));
        let found = tokio::time::timeout(timeout, async {
            loop {
                if let Some(line) = look() {
                    return Some(line);
                }
                if count.changed().await.is_err() {
                    // stderr closed: one last look at what was kept.
                    return look();
                }
            }
        })
        .await
        .map_err(|_| format!("no such log line in {timeout:?}"))?;
        found.ok_or_else(|| "the process closed stderr without such a log line".to_string())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id while it runs (`None` once it was reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the process at once (SIGKILL, like `kill -9`: no drain, connections reset) and reaps it.
    pub async fn kill(&mut self) -> Result<(), String> {
        self.child.kill().await.map_err(|e| format!("kill: {e}"))
    }

    /// Sends `signal` (`HUP`, `TERM`, ... as `kill -SIGNAL` takes it) to the process.
    pub async fn signal(&self, signal: &str) -> Result<(), String> {
        let pid = self.child.id().ok_or("already exited")?;
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .await
            .map_err(|e| format!("kill: {e}"))?;
        if !status.success() {
            return Err(format!("kill -{signal} {pid} failed"));
        }
        Ok(())
    }

    /// Waits for the process to exit (after a signal sent with [`signal`](Self::signal)).
    pub async fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| format!("still running after {timeout:?}"))?
            .map_err(|e| e.to_string())
    }

    /// Whether the process is still running (not exited, not reaped).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM (graceful drain, telemetry flush) and waits for the exit.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let pid = self.child.id().ok_or("already exited")?;
        self.signal("TERM").await?;
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| format!("pid {pid} still running after {timeout:?}"))?
            .map_err(|e| e.to_string())
    }
}

/// The gateway's stage flags for these replicas: `--text-encoder URL,URL --denoiser ... --vae ...`.
pub fn stage_flags(
    text_encoder: &[ServiceProcess],
    denoiser: &[ServiceProcess],
    vae: &[ServiceProcess],
) -> Vec<String> {
    let urls = |set: &[ServiceProcess]| {
        set.iter()
            .map(ServiceProcess::url)
            .collect::<Vec<_>>()
            .join(",")
    };
    vec![
        "--text-encoder".into(),
        urls(text_encoder),
        "--denoiser".into(),
        urls(denoiser),
        "--vae".into(),
        urls(vae),
    ]
}

/// Waits until `url` reports SERVING (whole server); see [`crate::service::wait_serving`].
pub async fn wait_serving(url: &str, timeout: Duration) -> Result<(), String> {
    crate::service::wait_serving(url, "", timeout).await
}

/// A binary of this workspace built beside the running test (`target/<profile>/NAME`): the stage and
/// gateway binaries of the other packages, which `cargo test --workspace` builds with their own tests.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: build the workspace's binaries first (`cargo build --bins`, or run `cargo test --workspace`)",
        path.display()
    );
    path
}

/// GET `/metrics` (HTTP/1.1, one connection) and return the body.
pub async fn scrape(addr: SocketAddr) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("scrape failed: {head}"));
    }
    Ok(body.to_string())
}

/// The value of the first sample line of `metric` whose labels contain every `labels` pair
/// (`name{..} value`), e.g. `sample(&text, "qwen_image_grpc_server_requests_total", &[("code", "0")])`.
pub fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, rest) = series.split_once('{').unwrap_or((series, ""));
            (name == metric).then_some((rest, value))
        })
        .find(|(rest, _)| {
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|(_, v)| v.parse().ok())
}
