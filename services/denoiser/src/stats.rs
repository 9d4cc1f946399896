//! Counters of what the worker did, observable by tests (and mirrored in Prometheus metrics).

use std::sync::Arc;

use tokio::sync::watch;

/// A snapshot of the worker's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Jobs the worker started (taken off the queue with the caller still there).
    pub jobs_started: u64,
    /// Jobs that sent their Result.
    pub jobs_finished: u64,
    /// Jobs stopped because the caller went away (before or during the loop).
    pub jobs_cancelled: u64,
    /// Jobs stopped because the deadline passed.
    pub jobs_deadline_exceeded: u64,
    /// Jobs that failed in the model.
    pub jobs_failed: u64,
    /// Denoising steps run, over all jobs.
    pub steps_run: u64,
}

/// Shared handle to the counters; `subscribe` to wait for a change without polling.
#[derive(Clone)]
pub struct Stats(Arc<watch::Sender<StatsSnapshot>>);

impl Default for Stats {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(StatsSnapshot::default())))
    }
}

impl Stats {
    pub fn subscribe(&self) -> watch::Receiver<StatsSnapshot> {
        self.0.subscribe()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        self.0.borrow().clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut StatsSnapshot)) {
        self.0.send_modify(f);
    }
}
