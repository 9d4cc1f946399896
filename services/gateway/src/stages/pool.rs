//! Replicas of one stage: health checks, what each replica describes (and whether it was refused for not
//! fitting the others), how many calls each may take at once (the `queue_capacity` it describes), and
//! which replica a call goes to (least outstanding among the healthy accepted ones with room). Waiting
//! for a slot is [`super::slots`], retry on another replica [`super::failover`]; the replica list of a
//! stage given by DNS name changes as the name resolves to other addresses ([`super::discovery`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use qwen_image_proto::v1::StageDescription;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::slots::Queue;
use crate::error::{GatewayError, StageName};

/// Timeout of one health check.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One replica of a stage.
#[derive(Debug)]
pub struct Replica {
    /// Unique in its pool (0, 1, ... for the configured endpoints, in order; more as DNS names resolve).
    pub id: usize,
    /// Which configured endpoint it comes from (an address, or one address of a DNS name).
    pub(super) target: usize,
    pub uri: String,
    channel: Channel,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
    /// What the replica said it serves (read when it turns healthy), and whether it was refused.
    described: Mutex<Described>,
    /// Until when the replica is considered full although the gateway counts room on it: it answered
    /// RESOURCE_EXHAUSTED (other clients use it too, or it is still finishing a cancelled call).
    saturated_until: Mutex<Option<Instant>>,
}

/// What is known about a replica's model.
#[derive(Debug, Clone, Default)]
pub enum Described {
    /// Not read yet (or the replica went away since).
    #[default]
    Unknown,
    /// It fits the other stages.
    Accepted(Arc<StageDescription>),
    /// It does not fit: the mismatch, named.
    Refused {
        description: Arc<StageDescription>,
        reason: String,
    },
}

impl Replica {
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Records a health check; true when the replica just came back (or was seen for the first time).
    pub(super) fn set_healthy(&self, healthy: bool) -> bool {
        let was = self.healthy.swap(healthy, Ordering::AcqRel);
        if was != healthy {
            tracing::info!(uri = %self.uri, healthy, "stage replica health changed");
        }
        healthy && !was
    }

    pub fn described(&self) -> Described {
        self.described.lock().map(|d| d.clone()).unwrap_or_default()
    }

    pub fn set_described(&self, d: Described) {
        if let Ok(mut slot) = self.described.lock() {
            *slot = d;
        }
    }

    /// Accepted: its model fits the others.
    pub fn is_accepted(&self) -> bool {
        matches!(self.described(), Described::Accepted(_))
    }

    /// Calls the replica takes at once: the `queue_capacity` it describes (at least 1); 0 while it is not
    /// accepted.
    pub fn capacity(&self) -> usize {
        match self.described() {
            Described::Accepted(d) => (d.queue_capacity as usize).max(1),
            _ => 0,
        }
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Considers the replica full for `period` (it answered RESOURCE_EXHAUSTED).
    pub(super) fn saturate(&self, period: Duration) {
        if let Ok(mut until) = self.saturated_until.lock() {
            *until = Some(Instant::now() + period);
        }
    }

    fn has_room(&self, now: Instant) -> bool {
        let saturated = self
            .saturated_until
            .lock()
            .map(|u| u.is_some_and(|t| t > now))
            .unwrap_or(false);
        !saturated && self.outstanding() < self.capacity()
    }
}

/// What the pool can do for a call right now.
#[derive(Debug)]
pub(super) enum Choice {
    /// This replica has room.
    Go(Arc<Replica>),
    /// Every replica the call may use is full: wait for a slot.
    Wait,
    /// No replica is accepted (none reachable, or all refused): waiting will not help.
    NoReplica,
}

/// A call in progress on a replica; counts as outstanding until dropped, which lets the next waiting
/// call in.
#[derive(Debug)]
pub struct Lease {
    shared: Arc<Shared>,
    replica: Arc<Replica>,
}

impl Lease {
    pub fn channel(&self) -> Channel {
        self.replica().channel.clone()
    }

    pub fn uri(&self) -> &str {
        &self.replica().uri
    }

    /// The replica's [`Replica::id`].
    pub fn index(&self) -> usize {
        self.replica.id
    }

    pub(super) fn replica(&self) -> &Replica {
        &self.replica
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.replica().outstanding.fetch_sub(1, Ordering::AcqRel);
        self.shared.dispatch();
    }
}

/// What a pool and its leases share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) stage: StageName,
    /// The current replicas (replaced as a whole when DNS names resolve differently; a replica that left
    /// lives on in the leases of its calls in flight).
    pub(super) replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    /// The next [`Replica::id`].
    pub(super) next_id: AtomicUsize,
    next: AtomicUsize,
    /// Calls waiting for a slot, oldest first.
    pub(super) queue: Mutex<Queue>,
    /// TLS towards the replicas (`--stage-ca`, ...); `None`: plaintext.
    tls: Option<qwen_image_common::tls::StageClientTls>,
}

impl Shared {
    /// The current replicas.
    pub(super) fn list(&self) -> Arc<Vec<Arc<Replica>>> {
        self.replicas
            .read()
            .map(|l| l.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// A new replica at `uri` (lazily connected; unhealthy until its first health check passes). Over TLS
    /// its certificate must name `server_name` (the DNS name `uri`'s address was resolved from), or else
    /// `uri`'s host.
    pub(super) fn new_replica(
        &self,
        target: usize,
        uri: &str,
        server_name: Option<&str>,
    ) -> Result<Arc<Replica>, GatewayError> {
        let channel = qwen_image_common::tls::client::channel(uri, self.tls.as_ref(), server_name)
            .map_err(|e| GatewayError::Internal(format!("{} endpoint: {e}", self.stage)))?;
        Ok(Arc::new(Replica {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            target,
            uri: uri.to_string(),
            channel,
            outstanding: AtomicUsize::new(0),
            healthy: AtomicBool::new(false),
            described: Mutex::new(Described::Unknown),
            saturated_until: Mutex::new(None),
        }))
    }

    /// Where a call that should avoid the replicas in `avoid` (they failed it) can go now. Only accepted
    /// replicas are used; `avoid` is ignored when it names all of them. Healthy replicas first (health
    /// may be stale, so an unhealthy one is still used when no healthy one is left); among those with
    /// room, the one with the fewest outstanding calls, ties round-robin.
    pub(super) fn choose(&self, avoid: &[usize]) -> Choice {
        let replicas = self.list();
        let accepted: Vec<usize> = (0..replicas.len())
            .filter(|&i| replicas[i].is_accepted())
            .collect();
        if accepted.is_empty() {
            return Choice::NoReplica;
        }
        let mut allowed: Vec<usize> = accepted
            .iter()
            .copied()
            .filter(|&i| !avoid.contains(&replicas[i].id))
            .collect();
        if allowed.is_empty() {
            allowed = accepted;
        }
        let healthy: Vec<usize> = allowed
            .iter()
            .copied()
            .filter(|&i| replicas[i].is_healthy())
            .collect();
        let candidates = if healthy.is_empty() { allowed } else { healthy };
        let now = Instant::now();
        let n = candidates.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|k| candidates[(start + k) % n])
            .filter(|&i| replicas[i].has_room(now))
            .min_by_key(|&i| replicas[i].outstanding())
            .map_or(Choice::Wait, |i| Choice::Go(replicas[i].clone()))
    }

    /// Counts a call on `replica` (call with the queue locked, after [`Shared::choose`]).
    pub(super) fn reserve(self: &Arc<Self>, replica: Arc<Replica>) -> Lease {
        replica.outstanding.fetch_add(1, Ordering::AcqRel);
        Lease {
            shared: self.clone(),
            replica,
        }
    }

    /// Why no replica can be used when some were refused: their reasons; `None` when none was refused.
    pub(super) fn refusals(&self) -> Option<String> {
        let reasons: Vec<String> = self
            .list()
            .iter()
            .filter_map(|r| match r.described() {
                Described::Refused { reason, .. } => Some(reason),
                _ => None,
            })
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// The error of a call for which no replica is accepted.
    pub(super) fn no_replica(&self) -> GatewayError {
        match self.refusals() {
            Some(reasons) => GatewayError::FailedPrecondition(format!(
                "no usable {} replica: {reasons}",
                self.stage
            )),
            None => GatewayError::Unavailable(format!(
                "no {} replica is reachable right now (none has described its model); retry in a few seconds",
                self.stage
            )),
        }
    }
}

/// The replicas of one stage.
#[derive(Debug)]
pub struct Pool {
    pub stage: StageName,
    /// The configured endpoints (addresses or DNS names).
    pub(super) targets: Vec<String>,
    pub(super) shared: Arc<Shared>,
}

impl Pool {
    /// Lazily connected channels to `uris` (nothing is dialled until the first call or health check).
    /// Replicas start unhealthy until their first health check passes. A URI whose host is a DNS name
    /// is one replica until [`Pool::rediscover`] resolves it to one replica per address. With `tls`, the
    /// URLs are https:// and the stages are verified against its CA.
    pub fn new(
        stage: StageName,
        uris: &[String],
        tls: Option<&qwen_image_common::tls::StageClientTls>,
    ) -> Result<Self, GatewayError> {
        if uris.is_empty() {
            return Err(GatewayError::Internal(format!(
                "no endpoint configured for the {stage} stage"
            )));
        }
        let shared = Arc::new(Shared {
            stage,
            replicas: RwLock::new(Arc::new(Vec::new())),
            next_id: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            tls: tls.cloned(),
        });
        let replicas = uris
            .iter()
            .enumerate()
            .map(|(target, uri)| shared.new_replica(target, uri, None))
            .collect::<Result<Vec<_>, GatewayError>>()?;
        if let Ok(mut l) = shared.replicas.write() {
            *l = Arc::new(replicas);
        }
        Ok(Self {
            stage,
            targets: uris.to_vec(),
            shared,
        })
    }

    /// The current replicas.
    pub fn replicas(&self) -> Arc<Vec<Arc<Replica>>> {
        self.shared.list()
    }

    /// Some replica is healthy and its model fits the other stages.
    pub fn any_usable(&self) -> bool {
        self.replicas()
            .iter()
            .any(|r| r.is_healthy() && r.is_accepted())
    }

    /// Why no replica can be used when some were refused: their reasons; `None` when none was refused.
    pub fn refusals(&self) -> Option<String> {
        self.shared.refusals()
    }

    /// Calls the stage takes at once: the sum of its accepted replicas' capacities.
    pub fn capacity(&self) -> usize {
        self.replicas().iter().map(|r| r.capacity()).sum()
    }

    /// Hands free slots to waiting calls (after the replicas' health or descriptions changed).
    pub fn dispatch(&self) {
        self.shared.dispatch();
    }

    /// Checks every replica once, concurrently (grpc.health.v1 `Check` of the whole server, ""). Returns
    /// the replicas that came back (or were seen healthy for the first time): their model must be read
    /// again. A replica that is down forgets its description.
    pub async fn check_health(&self) -> Vec<Arc<Replica>> {
        let mut set = tokio::task::JoinSet::new();
        for r in self.replicas().iter() {
            let r = r.clone();
            set.spawn(async move {
                let mut client = HealthClient::new(r.channel.clone());
                let mut req = tonic::Request::new(HealthCheckRequest {
                    service: String::new(),
                });
                req.set_timeout(HEALTH_CHECK_TIMEOUT);
                let ok = matches!(
                    tokio::time::timeout(HEALTH_CHECK_TIMEOUT, client.check(req)).await,
                    Ok(Ok(resp)) if resp.get_ref().status == ServingStatus::Serving as i32
                );
                let back = r.set_healthy(ok);
                if !ok {
                    r.set_described(Described::Unknown);
                }
                (back || (ok && matches!(r.described(), Described::Unknown))).then_some(r)
            });
        }
        let mut back = Vec::new();
        while let Some(joined) = set.join_next().await {
            if let Ok(Some(r)) = joined {
                back.push(r);
            }
        }
        back
    }
}
