//! Replicas of one stage: least-outstanding balancing, health checks, what each replica describes (and
//! whether it was refused for not fitting the others), and retry on another replica.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qwen_image_proto::v1::StageDescription;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tracing::Instrument;
use tracing::field::Empty;

use crate::error::{GatewayError, StageName};

/// Timeout of one health check.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One replica of a stage.
#[derive(Debug)]
pub struct Replica {
    pub uri: String,
    channel: Channel,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
    /// What the replica said it serves (read when it turns healthy), and whether it was refused.
    described: Mutex<Described>,
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
    fn set_healthy(&self, healthy: bool) -> bool {
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

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

/// A call in progress on a replica; counts as outstanding until dropped.
#[derive(Debug)]
pub struct Lease {
    replica: Arc<Replica>,
}

impl Lease {
    pub fn channel(&self) -> Channel {
        self.replica.channel.clone()
    }

    pub fn uri(&self) -> &str {
        &self.replica.uri
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.replica.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The replicas of one stage.
#[derive(Debug)]
pub struct Pool {
    pub stage: StageName,
    replicas: Vec<Arc<Replica>>,
    next: AtomicUsize,
}

impl Pool {
    /// Lazily connected channels to `uris` (nothing is dialled until the first call or health check).
    /// Replicas start unhealthy until their first health check passes.
    pub fn new(stage: StageName, uris: &[String]) -> Result<Self, GatewayError> {
        if uris.is_empty() {
            return Err(GatewayError::Internal(format!(
                "no endpoint configured for the {stage} stage"
            )));
        }
        let replicas = uris
            .iter()
            .map(|uri| {
                let endpoint = qwen_image_common::transport::endpoint(uri)
                    .map_err(|e| GatewayError::Internal(format!("{stage} endpoint: {e}")))?;
                Ok(Arc::new(Replica {
                    uri: uri.clone(),
                    channel: endpoint.connect_lazy(),
                    outstanding: AtomicUsize::new(0),
                    healthy: AtomicBool::new(false),
                    described: Mutex::new(Described::Unknown),
                }))
            })
            .collect::<Result<Vec<_>, GatewayError>>()?;
        Ok(Self {
            stage,
            replicas,
            next: AtomicUsize::new(0),
        })
    }

    pub fn replicas(&self) -> &[Arc<Replica>] {
        &self.replicas
    }

    /// Some replica is healthy and its model fits the other stages.
    pub fn any_usable(&self) -> bool {
        self.replicas
            .iter()
            .any(|r| r.is_healthy() && r.is_accepted())
    }

    /// Why no replica can be used when some were refused: their reasons; `None` when none was refused.
    pub fn refusals(&self) -> Option<String> {
        let reasons: Vec<String> = self
            .replicas
            .iter()
            .filter_map(|r| match r.described() {
                Described::Refused { reason, .. } => Some(reason),
                _ => None,
            })
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// The replica with the fewest outstanding calls among the accepted ones not in `tried`, healthy ones
    /// first (health may be stale, so an unhealthy replica is still tried when nothing else is left). Ties
    /// go round-robin. Replicas whose model is unknown or refused are never picked.
    pub fn pick(&self, tried: &[usize]) -> Option<(usize, Lease)> {
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(bool, usize, usize)> = None; // (healthy, outstanding, index)
        for k in 0..n {
            let i = (start + k) % n;
            let r = &self.replicas[i];
            if tried.contains(&i) || !r.is_accepted() {
                continue;
            }
            let key = (r.is_healthy(), r.outstanding(), i);
            best = match best {
                None => Some(key),
                Some(b) if (key.0 && !b.0) || (key.0 == b.0 && key.1 < b.1) => Some(key),
                keep => keep,
            };
        }
        let (_, _, i) = best?;
        let replica = self.replicas[i].clone();
        replica.outstanding.fetch_add(1, Ordering::AcqRel);
        Some((i, Lease { replica }))
    }

    /// Runs `call` on a replica; when it fails with UNAVAILABLE (replica down) or RESOURCE_EXHAUSTED
    /// (replica busy), tries the next replica, each at most once. `call` must not have streamed anything to
    /// the caller when it fails, so that a retry is invisible. The lease is returned with the result so a
    /// streaming call keeps counting as outstanding.
    ///
    /// Each attempt runs in a client span `stage.attempt` (stage, rpc, replica address, gRPC status) that
    /// is current when `call` builds its request, so the trace context goes out with it.
    pub async fn call<T, F, Fut>(
        &self,
        rpc: &'static str,
        mut call: F,
    ) -> Result<(T, Lease), GatewayError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut tried = Vec::with_capacity(self.replicas.len());
        let mut last: Option<Status> = None;
        while let Some((i, lease)) = self.pick(&tried) {
            tried.push(i);
            let span = tracing::info_span!(
                "stage.attempt",
                otel.name = %format_args!("{} {rpc}", self.stage),
                otel.kind = "client",
                stage = self.stage.as_str(),
                rpc,
                replica = lease.uri(),
                attempt = tried.len(),
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
            match result {
                Ok(v) => return Ok((v, lease)),
                Err(status)
                    if matches!(status.code(), Code::Unavailable | Code::ResourceExhausted) =>
                {
                    if status.code() == Code::Unavailable {
                        self.replicas[i].set_healthy(false);
                    }
                    tracing::warn!(stage = %self.stage, uri = lease.uri(), code = ?status.code(), message = status.message(), "stage replica failed; trying another");
                    last = Some(status);
                }
                Err(status) => return Err(GatewayError::upstream(self.stage, status)),
            }
        }
        if let Some(status) = last {
            return Err(GatewayError::upstream(self.stage, status));
        }
        Err(match self.refusals() {
            Some(reasons) => GatewayError::FailedPrecondition(format!(
                "no usable {} replica: {reasons}",
                self.stage
            )),
            None => GatewayError::Unavailable(format!(
                "no {} replica has described its model yet; retry in a few seconds",
                self.stage
            )),
        })
    }

    /// Checks every replica once, concurrently (grpc.health.v1 `Check` of the whole server, ""). Returns
    /// the replicas that came back (or were seen healthy for the first time): their model must be read
    /// again. A replica that is down forgets its description.
    pub async fn check_health(&self) -> Vec<Arc<Replica>> {
        let mut set = tokio::task::JoinSet::new();
        for r in &self.replicas {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Pool {
        let uris: Vec<String> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}", 1 + i))
            .collect();
        let p = Pool::new(StageName::Denoiser, &uris).expect("valid uris");
        for r in p.replicas() {
            r.set_described(Described::Accepted(Arc::default()));
        }
        p
    }

    #[tokio::test]
    async fn balances_by_outstanding_and_prefers_healthy() {
        let p = pool(3);
        for r in p.replicas() {
            r.set_healthy(true);
        }
        let (a, _la) = p.pick(&[]).expect("a replica");
        let (b, _lb) = p.pick(&[]).expect("a replica");
        let (c, lc) = p.pick(&[]).expect("a replica");
        let mut all = vec![a, b, c];
        all.sort();
        assert_eq!(all, vec![0, 1, 2], "each replica gets one outstanding call");
        drop(lc);
        let (d, _ld) = p.pick(&[]).expect("a replica");
        assert_eq!(
            d, c,
            "the replica whose call ended has the fewest outstanding"
        );
        p.replicas()[0].set_healthy(false);
        for _ in 0..4 {
            let (i, _l) = p.pick(&[]).expect("a replica");
            assert_ne!(
                i, 0,
                "unhealthy replicas are skipped while healthy ones exist"
            );
        }
        assert!(p.pick(&[0, 1, 2]).is_none());
        p.replicas()[1].set_described(Described::Refused {
            description: Arc::default(),
            reason: "vae latent channels 4, denoiser expects 16".into(),
        });
        for _ in 0..4 {
            let (i, _l) = p.pick(&[]).expect("a replica");
            assert_eq!(i, 2, "refused replicas are never picked");
        }
        assert!(
            p.refusals()
                .expect("refused")
                .contains("denoiser expects 16")
        );
    }

    #[tokio::test]
    async fn retries_unavailable_on_another_replica() {
        let p = pool(2);
        let calls = std::sync::Mutex::new(0);
        let (v, lease) = p
            .call("Test", |_ch| {
                let n = {
                    let mut c = calls.lock().expect("lock");
                    *c += 1;
                    *c
                };
                async move {
                    if n == 1 {
                        Err(Status::unavailable("down"))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await
            .expect("second replica answers");
        assert_eq!(v, 2);
        drop(lease);
        let e = p
            .call("Test", |_ch| async {
                Err::<(), _>(Status::unavailable("down"))
            })
            .await
            .expect_err("all down");
        assert!(
            matches!(e, GatewayError::Upstream { ref status, .. } if status.code() == Code::Unavailable)
        );
        let count = std::sync::atomic::AtomicUsize::new(0);
        let e = p
            .call("Test", |_ch| {
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
            "non-retryable errors are not retried"
        );
        assert!(p.replicas().iter().all(|r| r.outstanding() == 0));
    }
}
