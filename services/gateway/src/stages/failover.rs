//! One stage call with failover: it waits for a slot ([`super::slots`]), runs, and when the replica is
//! dead or unreachable or its stream breaks (UNAVAILABLE, a transport error, a stream that ends without
//! a result) it runs again from the start on another replica, each replica about once; when the replica
//! says it is busy (RESOURCE_EXHAUSTED) the call waits for a slot again, as long as the deadline allows.
//! A status the stage itself sent (INVALID_ARGUMENT, FAILED_PRECONDITION, DEADLINE_EXCEEDED, ...) ends
//! the call as it is.

use std::error::Error as _;
use std::future::Future;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::Instrument;
use tracing::field::Empty;

use super::pool::{Lease, Pool};
use super::slots::QueueObserver;
use crate::error::GatewayError;

/// Shortest and longest time a replica that answered RESOURCE_EXHAUSTED is considered full.
const BUSY_MIN: Duration = Duration::from_millis(20);
const BUSY_MAX: Duration = Duration::from_secs(1);
/// Busy period when the replica gave no `retry-after-ms` hint.
const BUSY_DEFAULT: Duration = Duration::from_millis(100);

/// How a call waits for a slot.
#[derive(Clone, Copy)]
pub enum Patience<'a> {
    /// Waits its turn (until the deadline), its place reported to the observer.
    Wait(&'a dyn QueueObserver),
    /// Only a free slot now; otherwise the call is not made (previews: dropped rather than queued).
    Now,
}

/// What a failed attempt means for the call.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// The replica is full: wait for a slot (this replica is considered full for the period).
    Busy(Duration),
    /// The replica is dead or unreachable, or the connection broke: run the call again elsewhere.
    Dead,
    /// The stage's own answer: it ends the call.
    Final,
}

/// A status carrying a source error was made locally from a transport failure (the connection was
/// refused, reset or timed out, or the stream broke); the stage itself sent none.
fn classify(status: &Status) -> Failure {
    match status.code() {
        Code::ResourceExhausted => Failure::Busy(
            qwen_image_common::status::retry_after(status)
                .unwrap_or(BUSY_DEFAULT)
                .clamp(BUSY_MIN, BUSY_MAX),
        ),
        Code::Unavailable | Code::Unknown => Failure::Dead,
        _ if status.source().is_some() => Failure::Dead,
        _ => Failure::Final,
    }
}

impl Pool {
    /// Runs `call` on a replica with failover (see the module). `call` gets the replica's channel and may
    /// stream to the request's caller: a retry runs it again from the start, so what it streams must be
    /// the same again (the stages are deterministic for the same request). The lease is returned with the
    /// result so a streaming call keeps counting as outstanding.
    ///
    /// Each attempt runs in a client span `stage.attempt` (stage, rpc, replica address, gRPC status) that
    /// is current when `call` builds its request, so the trace context goes out with it.
    pub async fn call<T, F, Fut>(
        &self,
        rpc: &'static str,
        deadline: Instant,
        patience: Patience<'_>,
        mut call: F,
    ) -> Result<(T, Lease), GatewayError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let shared = &self.shared;
        let ticket = shared.ticket();
        let mut avoid: Vec<usize> = Vec::new();
        let mut dead = 0usize;
        let mut attempt = 0usize;
        loop {
            let lease = match patience {
                Patience::Wait(observer) => {
                    shared.acquire(ticket, &avoid, deadline, observer).await?
                }
                Patience::Now => shared.try_acquire(&avoid).ok_or_else(|| {
                    GatewayError::Unavailable(format!("no {} slot free right now", self.stage))
                })?,
            };
            attempt += 1;
            let span = tracing::info_span!(
                "stage.attempt",
                otel.name = %format_args!("{} {rpc}", self.stage),
                otel.kind = "client",
                stage = self.stage.as_str(),
                rpc,
                replica = lease.uri(),
                attempt,
                rpc.grpc.status_code = Empty,
                otel.status_code = Empty,
            );
            let result = call(lease.channel()).instrument(span.clone()).await;
            let code = result.as_ref().map_or_else(|s| s.code() as i32, |_| 0);
            span.record("rpc.grpc.status_code", code);
            if code != 0 {
                span.record("otel.status_code", "ERROR");
            }
            drop(span);
            let status = match result {
                Ok(v) => return Ok((v, lease)),
                Err(status) => status,
            };
            match classify(&status) {
                Failure::Final => return Err(GatewayError::upstream(self.stage, status)),
                Failure::Busy(period) => {
                    tracing::info!(stage = %self.stage, uri = lease.uri(), message = status.message(),
                        wait_ms = period.as_millis() as u64, "stage replica busy; waiting for a slot");
                    lease.replica().saturate(period);
                    shared.dispatch_after(period);
                    if matches!(patience, Patience::Now) {
                        return Err(GatewayError::upstream(self.stage, status));
                    }
                }
                Failure::Dead => {
                    lease.replica().set_healthy(false);
                    avoid.push(lease.index());
                    dead += 1;
                    tracing::warn!(stage = %self.stage, uri = lease.uri(), code = ?status.code(),
                        message = status.message(), attempt, "stage replica failed the call; running it on another");
                    if dead > self.replicas().len() {
                        return Err(GatewayError::upstream(
                            self.stage,
                            Status::unavailable(status.message().to_string()),
                        ));
                    }
                }
            }
            drop(lease);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use qwen_image_proto::v1::StageDescription;

    use super::*;
    use crate::error::StageName;
    use crate::stages::pool::Described;
    use crate::stages::slots::Unobserved;

    /// `n` accepted, healthy replicas taking `capacity` calls each.
    fn pool(n: usize, capacity: u32) -> Pool {
        let uris: Vec<String> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}", 1 + i))
            .collect();
        let p = Pool::new(StageName::Denoiser, &uris, None).expect("valid uris");
        for r in p.replicas().iter() {
            r.set_described(Described::Accepted(Arc::new(StageDescription {
                queue_capacity: capacity,
                ..Default::default()
            })));
            r.set_healthy(true);
        }
        p
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(20)
    }

    #[test]
    fn classifies_failures() {
        assert_eq!(classify(&Status::unavailable("down")), Failure::Dead);
        assert_eq!(classify(&Status::invalid_argument("bad")), Failure::Final);
        assert_eq!(classify(&Status::internal("bug")), Failure::Final);
        let broken = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )));
        assert_eq!(classify(&broken), Failure::Dead, "{broken:?}");
        let busy = qwen_image_common::status::overloaded("denoiser", 1, Duration::from_millis(300));
        assert_eq!(classify(&busy), Failure::Busy(Duration::from_millis(300)));
    }

    #[tokio::test]
    async fn balances_by_outstanding_and_prefers_healthy() {
        let p = pool(3, 1);
        let s = &p.shared;
        let a = s.try_acquire(&[]).expect("room");
        let b = s.try_acquire(&[]).expect("room");
        let c = s.try_acquire(&[]).expect("room");
        let mut all = vec![a.index(), b.index(), c.index()];
        all.sort();
        assert_eq!(all, vec![0, 1, 2], "each replica gets one call");
        assert!(s.try_acquire(&[]).is_none(), "every replica is full");
        let freed = c.index();
        drop(c);
        let d = s.try_acquire(&[]).expect("room again");
        assert_eq!(d.index(), freed, "the replica whose call ended has room");
        drop((a, b, d));
        p.replicas()[0].set_healthy(false);
        for _ in 0..4 {
            let l = s.try_acquire(&[]).expect("room");
            assert_ne!(
                l.index(),
                0,
                "unhealthy replicas are skipped while healthy ones exist"
            );
        }
        p.replicas()[1].set_described(Described::Refused {
            description: Arc::default(),
            reason: "vae latent channels 4, denoiser expects 16".into(),
        });
        for _ in 0..4 {
            let l = s.try_acquire(&[0, 2]).expect("room");
            assert_eq!(
                l.index(),
                2,
                "refused replicas are never picked; avoid ignored when nothing else"
            );
        }
        assert!(
            p.refusals()
                .expect("refused")
                .contains("denoiser expects 16")
        );
        assert_eq!(p.capacity(), 2, "accepted replicas' capacities");
    }

    #[tokio::test]
    async fn waiters_get_slots_oldest_first_and_learn_their_place() {
        struct Places(std::sync::Mutex<Vec<usize>>);
        impl QueueObserver for Places {
            fn waiting(&self, _: StageName, position: usize) {
                self.0.lock().expect("lock").push(position);
            }
        }
        let p = Arc::new(pool(1, 1));
        let held = p.shared.try_acquire(&[]).expect("room");
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let places: Arc<Vec<Places>> = Arc::new(
            (0..3)
                .map(|_| Places(std::sync::Mutex::new(Vec::new())))
                .collect(),
        );
        let mut tasks = Vec::new();
        for k in 0..3 {
            let (p, order, task_places) = (p.clone(), order.clone(), places.clone());
            let ticket = p.shared.ticket();
            tasks.push(tokio::spawn(async move {
                let lease = p
                    .shared
                    .acquire(ticket, &[], far(), &task_places[k])
                    .await
                    .expect("a slot");
                order.lock().expect("lock").push(k);
                tokio::task::yield_now().await;
                drop(lease);
            }));
            // The waiter is queued before the next one takes its ticket and queues.
            while places[k].0.lock().expect("lock").is_empty() {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(*places[2].0.lock().expect("lock"), vec![3]);
        drop(held);
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(*order.lock().expect("lock"), vec![0, 1, 2], "oldest first");
        assert_eq!(
            *places[2].0.lock().expect("lock"),
            vec![3, 2, 1],
            "the last waiter moved up to the front"
        );
        let e = p
            .shared
            .acquire(p.shared.ticket(), &[], Instant::now(), &Unobserved)
            .await;
        assert!(e.is_ok(), "a free slot is granted even at the deadline");
    }

    #[tokio::test]
    async fn a_full_stage_waits_until_the_deadline() {
        let p = pool(1, 1);
        let _held = p.shared.try_acquire(&[]).expect("room");
        let e = p
            .shared
            .acquire(
                p.shared.ticket(),
                &[],
                Instant::now() + Duration::from_millis(50),
                &Unobserved,
            )
            .await
            .expect_err("no slot in time");
        assert!(matches!(e, GatewayError::DeadlineExceeded));
        assert!(
            p.shared.queue.lock().expect("lock").is_empty(),
            "the waiter left the queue"
        );
    }

    #[tokio::test]
    async fn dead_replicas_are_failed_over_and_busy_ones_waited_for() {
        let p = pool(2, 1);
        let calls = AtomicUsize::new(0);
        let (v, lease) = p
            .call("Test", far(), Patience::Wait(&Unobserved), |_ch| {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    match n {
                        1 => Err(Status::unavailable("down")),
                        2 => Err(qwen_image_common::status::overloaded(
                            "denoiser",
                            1,
                            Duration::from_millis(30),
                        )),
                        _ => Ok(n),
                    }
                }
            })
            .await
            .expect("a replica answers");
        assert_eq!(v, 3, "dead, then busy, then served");
        drop(lease);
        let e = p
            .call("Test", far(), Patience::Wait(&Unobserved), |_ch| async {
                Err::<(), _>(Status::unavailable("down"))
            })
            .await
            .expect_err("all down");
        assert!(
            matches!(e, GatewayError::Upstream { ref status, .. } if status.code() == Code::Unavailable)
        );
        let count = AtomicUsize::new(0);
        let e = p
            .call("Test", far(), Patience::Wait(&Unobserved), |_ch| {
                count.fetch_add(1, Ordering::Relaxed);
                async { Err::<(), _>(Status::invalid_argument("bad")) }
            })
            .await
            .expect_err("not retried");
        assert!(
            matches!(e, GatewayError::Upstream { ref status, .. } if status.code() == Code::InvalidArgument)
        );
        assert_eq!(
            count.load(Ordering::Relaxed),
            1,
            "the stage's own answers are not retried"
        );
        assert!(p.replicas().iter().all(|r| r.outstanding() == 0));
    }
}
