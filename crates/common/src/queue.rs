//! Bounded admission in front of a model worker thread ([`crate::stage::worker`]).
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
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::metric_names as m;

/// Smallest retry hint given to a rejected caller.
pub const MIN_RETRY_AFTER: Duration = Duration::from_millis(100);

/// An admitted job as the worker receives it.
pub struct Queued<P> {
    pub payload: P,
    /// The handler's span; the worker's `job` span is its child.
    pub span: tracing::Span,
    pub enqueued_at: Instant,
    pub slot: Slot,
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
    #[error("all {capacity} queue slots of the {service} are taken")]
    Overloaded {
        service: &'static str,
        capacity: usize,
        retry_after: Duration,
    },
    #[error("the model worker has stopped")]
    WorkerGone,
}

/// The sending side of the queue; cheap to clone. The worker exits once every clone is dropped.
pub struct Admission<P> {
    tx: mpsc::Sender<Queued<P>>,
    slots: Reserver,
}

impl<P> Clone for Admission<P> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            slots: self.slots.clone(),
        }
    }
}

impl<P> Admission<P> {
    /// The slot-taking half of the queue, for the layer that admits calls before decoding them
    /// ([`crate::stage::gate`]: the slot is taken before the request's message is read; [`Self::submit`]
    /// later puts the job in it).
    pub fn reserver(&self) -> Reserver {
        self.slots.clone()
    }
}

impl<P: Send + 'static> Admission<P> {
    /// Admits `payload` if a slot is free; the worker runs it inside `span`.
    pub fn try_submit(&self, payload: P, span: tracing::Span) -> Result<(), AdmitError> {
        self.submit(None, payload, span)
    }

    /// Admits `payload` into `reserved` (a slot taken earlier by [`Reserver::try_reserve`]) or, without one,
    /// into a free slot if there is one.
    pub fn submit(
        &self,
        reserved: Option<Slot>,
        payload: P,
        span: tracing::Span,
    ) -> Result<(), AdmitError> {
        let slot = match reserved {
            Some(slot) => slot,
            None => self.slots.try_reserve()?,
        };
        let job = Queued {
            payload,
            span,
            enqueued_at: Instant::now(),
            slot,
        };
        // Never full: the channel holds `capacity` jobs and each job holds one of `capacity` permits.
        self.tx.try_send(job).map_err(|_| AdmitError::WorkerGone)?;
        let service = self.slots.service;
        metrics::counter!(m::ADMISSIONS_TOTAL, "service" => service, "outcome" => m::OUTCOME_ADMITTED).increment(1);
        metrics::gauge!(m::QUEUE_DEPTH, "service" => service).increment(1);
        Ok(())
    }

    /// Requests admitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.slots.capacity - self.slots.permits.available_permits()
    }

    pub fn capacity(&self) -> usize {
        self.slots.capacity
    }
}

/// Takes slots of one queue without submitting jobs; cheap to clone.
#[derive(Clone)]
pub struct Reserver {
    permits: Arc<Semaphore>,
    capacity: usize,
    service: &'static str,
    last_job_ms: Arc<AtomicU64>,
}

impl Reserver {
    /// A free slot, or Overloaded with a retry hint.
    pub fn try_reserve(&self) -> Result<Slot, AdmitError> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            metrics::counter!(m::ADMISSIONS_TOTAL, "service" => self.service, "outcome" => m::OUTCOME_OVERLOADED)
                .increment(1);
            let last = Duration::from_millis(self.last_job_ms.load(Ordering::Relaxed));
            return Err(AdmitError::Overloaded {
                service: self.service,
                capacity: self.capacity,
                retry_after: last.max(MIN_RETRY_AFTER),
            });
        };
        metrics::gauge!(m::IN_FLIGHT, "service" => self.service).increment(1);
        Ok(Slot {
            _permit: permit,
            service: self.service,
        })
    }
}

/// A bounded queue of `capacity` jobs for a worker (`service` is the metrics label); the worker reads
/// the receiver, and records `last_job` (milliseconds) for the retry hint of rejected callers.
pub fn channel<P>(
    service: &'static str,
    capacity: usize,
) -> (Admission<P>, mpsc::Receiver<Queued<P>>, Arc<AtomicU64>) {
    let capacity = capacity.max(1);
    let (tx, rx) = mpsc::channel::<Queued<P>>(capacity);
    let last_job_ms = Arc::new(AtomicU64::new(0));
    let admission = Admission {
        tx,
        slots: Reserver {
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            service,
            last_job_ms: last_job_ms.clone(),
        },
    };
    (admission, rx, last_job_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queue_is_overloaded_and_slots_free_up() {
        let (admission, mut rx, _) = channel::<u32>("test", 1);
        admission
            .try_submit(1, tracing::Span::none())
            .expect("first fits");
        let err = admission
            .try_submit(2, tracing::Span::none())
            .expect_err("full");
        assert!(matches!(
            err,
            AdmitError::Overloaded {
                capacity: 1,
                service: "test",
                ..
            }
        ));
        let job = rx.try_recv().expect("queued");
        assert_eq!(job.payload, 1);
        assert_eq!(admission.in_flight(), 1);
        job.slot.release();
        assert_eq!(admission.in_flight(), 0);
        admission
            .try_submit(3, tracing::Span::none())
            .expect("slot free after release");
        // a reserved slot counts as taken until its job is submitted into it (or it is dropped)
        let job = rx.try_recv().expect("queued");
        job.slot.release();
        let reserved = admission.reserver().try_reserve().expect("a free slot");
        assert!(matches!(
            admission.try_submit(4, tracing::Span::none()),
            Err(AdmitError::Overloaded { .. })
        ));
        admission
            .submit(Some(reserved), 5, tracing::Span::none())
            .expect("the reserved slot takes the job");
        assert_eq!(rx.try_recv().expect("queued").payload, 5);
        drop(rx);
        // the worker is gone once its receiver is
        let (admission, rx, _) = channel::<u32>("test", 1);
        drop(rx);
        assert_eq!(
            admission.try_submit(1, tracing::Span::none()),
            Err(AdmitError::WorkerGone)
        );
    }
}
