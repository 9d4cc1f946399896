//! The gateway's own bounded queue: at most `--max-queued` requests are in the gateway at once (running
//! or waiting for a stage slot). A request beyond that is refused at once with RESOURCE_EXHAUSTED and a
//! `retry-after-ms` hint: the time in which one of the requests in the gateway is expected to end (the
//! mean duration of recent requests divided by the number admitted).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// Hint given before any request has completed, and the bounds of every hint.
const FIRST_HINT: Duration = Duration::from_secs(1);
const MIN_HINT: Duration = Duration::from_millis(100);
const MAX_HINT: Duration = Duration::from_secs(60);

/// The requests admitted into the gateway.
#[derive(Debug)]
pub struct RequestQueue {
    permits: Arc<Semaphore>,
    max: usize,
    /// Exponentially weighted mean duration of admitted requests, in ms (0 = none ended yet).
    mean_ms: AtomicU64,
}

/// An admitted request's place in the gateway; frees it when dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    queue: Arc<RequestQueue>,
    since: Instant,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let ms = self.since.elapsed().as_millis() as u64;
        // mean += (sample - mean) / 8; the first sample sets it.
        let _ = self
            .queue
            .mean_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
                Some(if m == 0 { ms.max(1) } else { (m * 7 + ms) / 8 })
            });
    }
}

impl RequestQueue {
    /// Room for `max` requests (at least 1).
    pub fn new(max: usize) -> Arc<Self> {
        let max = max.max(1);
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            mean_ms: AtomicU64::new(0),
        })
    }

    /// Admits a request, or RESOURCE_EXHAUSTED with `retry-after-ms` when `max` are in the gateway.
    pub fn admit(self: &Arc<Self>) -> Result<Admitted, Status> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(Admitted {
                _permit: permit,
                queue: self.clone(),
                since: Instant::now(),
            }),
            Err(_) => {
                let hint = self.retry_hint();
                tracing::info!(
                    max_queued = self.max,
                    retry_after_ms = hint.as_millis() as u64,
                    "gateway queue full: request refused"
                );
                Err(qwen_image_common::status::overloaded(
                    "gateway", self.max, hint,
                ))
            }
        }
    }

    fn retry_hint(&self) -> Duration {
        match self.mean_ms.load(Ordering::Acquire) {
            0 => FIRST_HINT,
            ms => Duration::from_millis(ms / self.max as u64).clamp(MIN_HINT, MAX_HINT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn refuses_beyond_max_with_a_hint_and_frees_on_drop() {
        let q = RequestQueue::new(2);
        let a = q.admit().expect("room");
        let _b = q.admit().expect("room");
        let e = q.admit().expect_err("full");
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert_eq!(qwen_image_common::status::retry_after(&e), Some(FIRST_HINT));
        assert!(e.message().contains("gateway"), "{}", e.message());
        drop(a);
        let _c = q.admit().expect("a place was freed");
        let hint = q.retry_hint();
        assert!((MIN_HINT..=MAX_HINT).contains(&hint), "{hint:?}");
    }
}
