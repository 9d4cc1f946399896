//! A TLS config rebuilt from its files on SIGHUP or when their contents change, swapped atomically: each
//! new handshake takes the current config; connections already open keep theirs.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::files::Snapshot;

/// How often the files are re-read to notice a change (cert-manager / kubelet swap Secret volumes
/// atomically; a SIGHUP reloads at once).
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

type Build<T> = dyn Fn(&Snapshot) -> Result<T, String> + Send + Sync;

struct Inner<T> {
    /// What the files are, for logs (`server certificate`, `stage client`).
    what: &'static str,
    paths: Vec<PathBuf>,
    build: Box<Build<T>>,
    current: RwLock<(Snapshot, Arc<T>)>,
}

/// A config built from files, reloadable.
pub struct Reloadable<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Reloadable<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloadable")
            .field("what", &self.inner.what)
            .field("paths", &self.inner.paths)
            .finish()
    }
}

/// Whether a reload found something new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Reloaded,
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// Reads `paths` and builds the first config; an error names the file and the problem.
    pub fn load(
        what: &'static str,
        paths: Vec<PathBuf>,
        build: impl Fn(&Snapshot) -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let snapshot = Snapshot::read(&paths)?;
        let config = Arc::new(build(&snapshot)?);
        Ok(Self {
            inner: Arc::new(Inner {
                what,
                paths,
                build: Box::new(build),
                current: RwLock::new((snapshot, config)),
            }),
        })
    }

    /// The config new handshakes use.
    pub fn current(&self) -> Arc<T> {
        let guard = self
            .inner
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.1.clone()
    }

    /// Re-reads the files; when they changed (or `force`), rebuilds and swaps the config. On an error
    /// (a file missing or half-written, a key that does not match its certificate) the previous config
    /// stays.
    pub fn reload(&self, force: bool) -> Result<Reload, String> {
        let snapshot = Snapshot::read(&self.inner.paths)?;
        {
            let guard = self
                .inner
                .current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if !force && guard.0 == snapshot {
                return Ok(Reload::Unchanged);
            }
        }
        let config = Arc::new((self.inner.build)(&snapshot)?);
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = (snapshot, config);
        Ok(Reload::Reloaded)
    }

    /// Reloads on SIGHUP and on file changes until the returned guard is dropped. Needs a tokio runtime.
    /// The SIGHUP handler is installed before this returns (a SIGHUP after it never kills the process).
    pub fn watch(&self) -> WatchGuard {
        let this = self.clone();
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(POLL_INTERVAL);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                #[cfg(unix)]
                let force = tokio::select! {
                    _ = ticker.tick() => false,
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                #[cfg(not(unix))]
                let force = {
                    ticker.tick().await;
                    false
                };
                let what = this.inner.what;
                match this.reload(force) {
                    Ok(Reload::Reloaded) => {
                        tracing::info!(what, paths = ?this.inner.paths, sighup = force, "TLS files reloaded")
                    }
                    Ok(Reload::Unchanged) => {}
                    Err(e) => tracing::warn!(what, error = %e,
                        "TLS files changed but cannot be used; keeping the previous ones"),
                }
            }
        });
        WatchGuard(task)
    }
}

/// Stops a [`Reloadable::watch`] when dropped.
#[derive(Debug)]
pub struct WatchGuard(JoinHandle<()>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}
