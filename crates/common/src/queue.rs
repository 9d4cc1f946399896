//! Bounded admission in front of a model worker thread.
//!
//! The model lives on its own OS thread (it is loaded there, so it need not be `Send`), fed by a bounded
//! `tokio::sync::mpsc` channel of jobs. `capacity` bounds the requests admitted and not finished, waiting
//! or running. Each job holds a [`Slot`] (a semaphore permit) that the handler releases before its last
//! reply (or that is released when the handler returns). So a finished, cancelled or failed job frees
//! its slot, and a caller that sends its next request right after a reply is admitted. When all slots
//! are taken, [`Admission::try_submit`] fails at once with [`AdmitError::Overloaded`] carrying a retry
//! hint (the last job's duration).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::metric_names as m;

/// Smallest retry hint given to a rejected caller.
pub const MIN_RETRY_AFTER: Duration = Duration::from_millis(100);

struct Job<P> {
    payload: P,
    span: tracing::Span,
    enqueued_at: Instant,
    slot: Slot,
}

/// One admission slot. Dropping it (or [`Slot::release`]) lets the next request in.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    service: &'static str,
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!(m::IN_FLIGHT, "service" => self.service).decrement(1);
    }
}

impl Slot {
    /// Frees the slot now (call it before sending the last reply).
    pub fn release(self) {}
}

/// Why a job was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("all {capacity} queue slots are taken")]
    Overloaded {
        capacity: usize,
        retry_after: Duration,
    },
    #[error("the model worker has stopped")]
    WorkerGone,
}

/// The sending side of the queue; cheap to clone. The worker exits once every clone is dropped.
pub struct Admission<P> {
    tx: mpsc::Sender<Job<P>>,
    permits: Arc<Semaphore>,
    capacity: usize,
    service: &'static str,
    last_job_ms: Arc<AtomicU64>,
}

impl<P> Clone for Admission<P> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            permits: self.permits.clone(),
            capacity: self.capacity,
            service: self.service,
            last_job_ms: self.last_job_ms.clone(),
        }
    }
}

impl<P: Send + 'static> Admission<P> {
    /// Admits `payload` if a slot is free; the worker runs it inside `span`.
    pub fn try_submit(&self, payload: P, span: tracing::Span) -> Result<(), AdmitError> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            metrics::counter!(m::ADMISSIONS_TOTAL, "service" => self.service, "outcome" => m::OUTCOME_OVERLOADED)
                .increment(1);
            let last = Duration::from_millis(self.last_job_ms.load(Ordering::Relaxed));
            return Err(AdmitError::Overloaded {
                capacity: self.capacity,
                retry_after: last.max(MIN_RETRY_AFTER),
            });
        };
        metrics::gauge!(m::IN_FLIGHT, "service" => self.service).increment(1);
        let job = Job {
            payload,
            span,
            enqueued_at: Instant::now(),
            slot: Slot {
                _permit: permit,
                service: self.service,
            },
        };
        // Never full: the channel holds `capacity` jobs and each job holds one of `capacity` permits.
        self.tx.try_send(job).map_err(|_| AdmitError::WorkerGone)?;
        metrics::counter!(m::ADMISSIONS_TOTAL, "service" => self.service, "outcome" => m::OUTCOME_ADMITTED).increment(1);
        metrics::gauge!(m::QUEUE_DEPTH, "service" => self.service).increment(1);
        Ok(())
    }

    /// Requests admitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// A started worker: the queue, the load result, and the thread.
pub struct Worker<P> {
    pub admission: Admission<P>,
    /// Resolves once the model is loaded (and warmed up by `load`), or with the load error.
    pub ready: oneshot::Receiver<Result<(), String>>,
    pub thread: JoinHandle<()>,
}

/// Starts the worker thread `name`: it calls `load` (model + warm-up), reports on `ready`, then runs
/// `handle(&mut model, payload, slot)` for each admitted job, in order, inside a `job` span (child of
/// the span given at admission) that records the queue wait.
pub fn spawn_worker<P, M, L, H>(
    service: &'static str,
    capacity: usize,
    load: L,
    mut handle: H,
) -> std::io::Result<Worker<P>>
where
    P: Send + 'static,
    L: FnOnce() -> Result<M, String> + Send + 'static,
    H: FnMut(&mut M, P, Slot) + Send + 'static,
{
    let capacity = capacity.max(1);
    let (tx, mut rx) = mpsc::channel::<Job<P>>(capacity);
    let (ready_tx, ready) = oneshot::channel();
    let last_job_ms = Arc::new(AtomicU64::new(0));
    let last = last_job_ms.clone();
    let thread = std::thread::Builder::new()
        .name(format!("{service}-worker"))
        .spawn(move || {
            let load_started = Instant::now();
            let loaded = load();
            metrics::gauge!(m::MODEL_LOAD_SECONDS, "service" => service)
                .set(load_started.elapsed().as_secs_f64());
            let mut model = match loaded {
                Ok(model) => {
                    let _ = ready_tx.send(Ok(()));
                    model
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while let Some(job) = rx.blocking_recv() {
                let wait = job.enqueued_at.elapsed();
                metrics::gauge!(m::QUEUE_DEPTH, "service" => service).decrement(1);
                metrics::histogram!(m::QUEUE_WAIT_SECONDS, "service" => service)
                    .record(wait.as_secs_f64());
                let _entered = tracing::info_span!(
                    parent: &job.span,
                    "job",
                    queue_wait_ms = wait.as_secs_f64() * 1e3,
                )
                .entered();
                let started = Instant::now();
                handle(&mut model, job.payload, job.slot);
                last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        })?;
    let admission = Admission {
        tx,
        permits: Arc::new(Semaphore::new(capacity)),
        capacity,
        service,
        last_job_ms,
    };
    Ok(Worker {
        admission,
        ready,
        thread,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_queue_is_overloaded_and_slots_free_up() {
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let gate_rx = std::sync::Mutex::new(gate_rx);
        let w = spawn_worker::<oneshot::Sender<u32>, u32, _, _>(
            "test",
            1,
            || Ok(7),
            move |model, reply, slot| {
                let _ = gate_rx.lock().map(|rx| rx.recv());
                slot.release();
                let _ = reply.send(*model);
            },
        )
        .expect("thread");
        w.ready.await.expect("sent").expect("loaded");
        let (a_tx, a_rx) = oneshot::channel();
        w.admission
            .try_submit(a_tx, tracing::Span::none())
            .expect("first fits");
        let (b_tx, _b_rx) = oneshot::channel();
        let err = w
            .admission
            .try_submit(b_tx, tracing::Span::none())
            .expect_err("full");
        assert!(matches!(err, AdmitError::Overloaded { capacity: 1, .. }));
        gate_tx.send(()).expect("worker waiting");
        assert_eq!(a_rx.await.expect("reply"), 7);
        // the slot was released before the reply: the next request is admitted at once
        let (c_tx, c_rx) = oneshot::channel();
        w.admission
            .try_submit(c_tx, tracing::Span::none())
            .expect("slot free after the reply");
        gate_tx.send(()).expect("worker waiting");
        assert_eq!(c_rx.await.expect("reply"), 7);
    }

    #[tokio::test]
    async fn load_error_is_reported() {
        let w =
            spawn_worker::<(), (), _, _>("test", 1, || Err("no weights".to_string()), |_, _, _| {})
                .expect("thread");
        assert_eq!(w.ready.await.expect("sent"), Err("no weights".to_string()));
        w.thread.join().expect("no panic");
        assert_eq!(
            w.admission.try_submit((), tracing::Span::none()),
            Err(AdmitError::WorkerGone)
        );
    }
}
