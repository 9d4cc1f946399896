//! Waiting for a replica slot, oldest first: a stage call that finds every replica full waits in its
//! pool's queue (bounded by the request's deadline) until a call ends or a replica comes back, instead of
//! failing. Each waiter holds a ticket (its first arrival), so a call that has to wait again after a
//! failed attempt keeps its place; the waiter's place in the queue is reported to a [`QueueObserver`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::pool::{Choice, Lease, Shared};
use crate::error::{GatewayError, StageName};

/// Told where a waiting call stands (the gateway turns it into a `queue_position` progress event).
pub trait QueueObserver: Sync {
    /// The call waits for a `stage` slot; `position` 1 is next.
    fn waiting(&self, stage: StageName, position: usize);
}

/// An observer that ignores positions.
#[cfg(test)]
pub struct Unobserved;

#[cfg(test)]
impl QueueObserver for Unobserved {
    fn waiting(&self, _: StageName, _: usize) {}
}

/// The calls of one pool waiting for a slot, by ticket.
#[derive(Debug, Default)]
pub struct Queue {
    waiters: VecDeque<Waiter>,
    next_ticket: u64,
}

impl Queue {
    /// No call is waiting.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    avoid: Vec<usize>,
    tx: oneshot::Sender<Result<Lease, GatewayError>>,
    position: watch::Sender<usize>,
}

/// Removes its waiter from the queue when the wait ends (granted, deadline, or the call dropped).
struct Waiting<'a> {
    shared: &'a Arc<Shared>,
    ticket: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let removed = match self.shared.queue.lock() {
            Ok(mut q) => {
                let before = q.waiters.len();
                q.waiters.retain(|w| w.ticket != self.ticket);
                q.waiters.len() != before
            }
            Err(_) => false,
        };
        if removed {
            // The others move up.
            self.shared.dispatch();
        }
    }
}

impl Shared {
    /// A new place in the queue (older tickets go first).
    pub(super) fn ticket(&self) -> u64 {
        self.queue.lock().map_or(0, |mut q| {
            q.next_ticket += 1;
            q.next_ticket
        })
    }

    /// A slot now, only when no older call waits and a replica has room (previews, which are dropped
    /// rather than queued).
    pub(super) fn try_acquire(self: &Arc<Self>, avoid: &[usize]) -> Option<Lease> {
        let q = self.queue.lock().ok()?;
        if !q.waiters.is_empty() {
            return None;
        }
        match self.choose(avoid) {
            Choice::Go(i) => Some(self.reserve(i)),
            Choice::Wait | Choice::NoReplica => None,
        }
    }

    /// Waits (until `deadline`) for a slot on a replica not in `avoid` (see [`Shared::choose`]), behind
    /// every call with an older ticket. UNAVAILABLE / FAILED_PRECONDITION when no replica is accepted.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        ticket: u64,
        avoid: &[usize],
        deadline: Instant,
        observer: &dyn QueueObserver,
    ) -> Result<Lease, GatewayError> {
        let (tx, mut rx) = oneshot::channel();
        let (position, mut position_rx) = watch::channel(0usize);
        {
            let mut q = self
                .queue
                .lock()
                .map_err(|_| GatewayError::Internal("slot queue lock poisoned".into()))?;
            let at = q
                .waiters
                .iter()
                .position(|w| w.ticket > ticket)
                .unwrap_or(q.waiters.len());
            q.waiters.insert(
                at,
                Waiter {
                    ticket,
                    avoid: avoid.to_vec(),
                    tx,
                    position,
                },
            );
        }
        let _waiting = Waiting {
            shared: self,
            ticket,
        };
        self.dispatch();
        let mut reported = 0;
        loop {
            tokio::select! {
                biased;
                granted = &mut rx => {
                    return granted.unwrap_or_else(|_| Err(GatewayError::Internal("slot queue dropped a waiter".into())));
                }
                () = tokio::time::sleep_until(deadline.into()) => return Err(GatewayError::DeadlineExceeded),
                changed = position_rx.changed() => {
                    if changed.is_err() {
                        // Removed from the queue: the answer is in `rx`.
                        continue;
                    }
                    let p = *position_rx.borrow_and_update();
                    if p > 0 && p != reported {
                        reported = p;
                        observer.waiting(self.stage, p);
                    }
                }
            }
        }
    }

    /// Hands free slots to waiting calls, oldest first (a waiter whose allowed replicas are all full is
    /// passed over, not blocking younger ones that can go elsewhere), fails the waiters when no replica is
    /// accepted, and tells the rest their new place.
    pub(super) fn dispatch(self: &Arc<Self>) {
        // Leases handed to waiters that are gone: dropped after the lock is released (their drop
        // dispatches again).
        let mut unclaimed = Vec::new();
        {
            let Ok(mut q) = self.queue.lock() else {
                return;
            };
            let mut i = 0;
            while i < q.waiters.len() {
                if q.waiters[i].tx.is_closed() {
                    q.waiters.remove(i);
                    continue;
                }
                let answer = match self.choose(&q.waiters[i].avoid) {
                    Choice::Go(r) => Ok(self.reserve(r)),
                    Choice::NoReplica => Err(self.no_replica()),
                    Choice::Wait => {
                        i += 1;
                        continue;
                    }
                };
                if let Some(w) = q.waiters.remove(i)
                    && let Err(Ok(lease)) = w.tx.send(answer)
                {
                    unclaimed.push(lease);
                }
            }
            for (k, w) in q.waiters.iter().enumerate() {
                w.position.send_if_modified(|p| {
                    let changed = *p != k + 1;
                    *p = k + 1;
                    changed
                });
            }
        }
        drop(unclaimed);
    }

    /// Dispatches again once `period` has passed (a replica considered full for that long gets room).
    pub(super) fn dispatch_after(self: &Arc<Self>, period: Duration) {
        let shared = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(period).await;
            shared.dispatch();
        });
    }
}
