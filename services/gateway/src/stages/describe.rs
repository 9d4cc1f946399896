//! What the stage replicas serve: `StageInfo.Describe` is read from every replica when it is first seen
//! healthy and whenever it comes back, then every replica is checked against the others
//! ([`crate::geometry`]). A replica that does not fit is refused: never picked, logged and counted with the
//! field that differs; the gateway is not SERVING while a stage has no accepted replica, and requests get
//! FAILED_PRECONDITION naming the mismatch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use qwen_image_common::grpc::InjectTraceContext;
use qwen_image_common::metric_names as m;
use qwen_image_proto::v1::DescribeRequest;
use qwen_image_proto::v1::stage_info_client::StageInfoClient;

use super::Stages;
use super::pool::{Described, Replica};
use crate::error::{GatewayError, StageName};
use crate::geometry::{self, Geometry, Mismatch};

/// Timeout of one Describe call.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Reviews a request waits for when the stages have not described themselves yet.
const REVIEWS_WAITED: usize = 3;

const STAGES: [StageName; 3] = [StageName::Denoiser, StageName::TextEncoder, StageName::Vae];

/// Reads the description of `replica`; a failure leaves it unknown (it is read again later).
async fn read(stage: StageName, replica: &Replica) {
    let mut client = StageInfoClient::with_interceptor(replica.channel(), InjectTraceContext);
    let mut req = tonic::Request::new(DescribeRequest {});
    req.set_timeout(DESCRIBE_TIMEOUT);
    match tokio::time::timeout(DESCRIBE_TIMEOUT, client.describe(req)).await {
        Ok(Ok(resp)) => {
            let d = Arc::new(resp.into_inner());
            tracing::info!(%stage, uri = %replica.uri, model = %d.model_id, snapshot = %d.snapshot_digest,
                weights = %d.weights_format, device = %d.device, queue_capacity = d.queue_capacity, "stage replica described its model");
            // Accepted provisionally; `review` checks it against the others right after.
            replica.set_described(Described::Accepted(d));
        }
        Ok(Err(status)) => {
            tracing::warn!(%stage, uri = %replica.uri, code = ?status.code(), message = status.message(),
                "stage replica cannot describe its model");
        }
        Err(_) => {
            tracing::warn!(%stage, uri = %replica.uri, "Describe timed out");
        }
    }
}

impl Stages {
    /// Reads the descriptions of `replicas` (of `stage`) and reviews every replica.
    pub async fn describe(&self, replicas: Vec<(StageName, Arc<Replica>)>) {
        if replicas.is_empty() {
            return;
        }
        read_all(&replicas).await;
        self.review();
    }

    /// Checks every described replica against the others: one component per stage (the first described
    /// replica in configuration order sets it), text encoder and VAE fitting the denoiser's transformer.
    pub fn review(&self) {
        apply(self.verdicts());
        self.reviewed();
    }

    /// What [`Stages::review`] decides for every described replica, without applying it (a gateway serving
    /// several models merges the verdicts of the models sharing a pool, [`crate::models`]).
    pub(crate) fn verdicts(&self) -> Vec<Verdict> {
        let descriptions = |stage: StageName| -> Vec<(Arc<Replica>, Arc<_>)> {
            self.pool(stage)
                .replicas()
                .iter()
                .filter_map(|r| match r.described() {
                    Described::Accepted(d) | Described::Refused { description: d, .. } => {
                        Some((r.clone(), d))
                    }
                    Described::Unknown => None,
                })
                .collect()
        };
        let mut out = Vec::new();
        let mut anchor: Option<(String, Arc<qwen_image_proto::v1::StageDescription>)> = None;
        for stage in STAGES {
            let mut first: Option<(String, Arc<qwen_image_proto::v1::StageDescription>)> = None;
            for (replica, d) in descriptions(stage) {
                let verdict = geometry::check_kind(stage, &replica.uri, &d)
                    .and_then(|()| match &first {
                        Some((uri, f)) => {
                            geometry::check_same_component(stage, &replica.uri, &d, uri, f)
                        }
                        None => Ok(()),
                    })
                    .and_then(|()| match &anchor {
                        Some((uri, a)) if stage != StageName::Denoiser => {
                            geometry::check_against_denoiser(stage, &replica.uri, &d, uri, a)
                        }
                        _ => Ok(()),
                    });
                if verdict.is_ok() && first.is_none() {
                    first = Some((replica.uri.clone(), d.clone()));
                }
                out.push(Verdict {
                    stage,
                    replica,
                    description: d,
                    verdict,
                });
            }
            if stage == StageName::Denoiser {
                anchor = first;
            }
        }
        out
    }

    /// After verdicts were applied: replicas that came back (or went away) change where waiting calls can
    /// go, and requests waiting for a description look again.
    pub(crate) fn reviewed(&self) {
        for pool in self.pools() {
            pool.dispatch();
        }
        self.reviewed.send_modify(|n| *n += 1);
    }

    /// [`Stages::geometry`]; while the stages have not described themselves, waits (until `deadline`) for
    /// the next reviews of the replicas (one per health interval; a review in progress when the request
    /// came may predate the stages' readiness, hence a few) and asks again.
    pub async fn geometry_by(&self, deadline: Instant) -> Result<Geometry, GatewayError> {
        let mut reviews = self.reviewed.subscribe();
        reviews.borrow_and_update();
        for _ in 0..REVIEWS_WAITED {
            match self.geometry() {
                Err(GatewayError::Unavailable(_)) => {
                    if tokio::time::timeout_at(deadline.into(), reviews.changed())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                other => return other,
            }
        }
        self.geometry()
    }

    /// The model id the accepted denoiser replicas describe (None before they have described themselves).
    pub fn model_id(&self) -> Option<String> {
        self.pool(StageName::Denoiser)
            .replicas()
            .iter()
            .find_map(|r| match r.described() {
                Described::Accepted(d) => Some(d.model_id.clone()),
                _ => None,
            })
    }

    /// The model's geometry, from the accepted denoiser and VAE replicas. FAILED_PRECONDITION naming the
    /// mismatch when a stage has only refused replicas; UNAVAILABLE when a stage has not described itself.
    pub fn geometry(&self) -> Result<Geometry, GatewayError> {
        for stage in STAGES {
            let pool = self.pool(stage);
            if !pool.replicas().iter().any(|r| r.is_accepted())
                && let Some(reasons) = pool.refusals()
            {
                return Err(GatewayError::FailedPrecondition(format!(
                    "the stages do not serve one model: {reasons}"
                )));
            }
        }
        let accepted = |stage: StageName| {
            self.pool(stage)
                .replicas()
                .iter()
                .find_map(|r| match r.described() {
                    Described::Accepted(d) => Some(d),
                    _ => None,
                })
        };
        let (Some(dn), Some(vae)) = (accepted(StageName::Denoiser), accepted(StageName::Vae))
        else {
            return Err(GatewayError::Unavailable(
                "the denoiser and VAE stages have not described their model yet (starting or unreachable); \
                 retry in a few seconds"
                    .into(),
            ));
        };
        let mut g = geometry::geometry(&dn, &vae).ok_or_else(|| {
            GatewayError::FailedPrecondition(
                "the denoiser or VAE describes a zero patch size, latent channel count or scale factor".into(),
            )
        })?;
        // Every replica's own --max-pixels, not only the first one's.
        let mut all = Vec::new();
        for stage in [StageName::Denoiser, StageName::Vae] {
            for r in self.pool(stage).replicas().iter() {
                if let Described::Accepted(d) = r.described() {
                    all.push(d);
                }
            }
        }
        g.max_pixels = geometry::smallest_max_pixels(all.iter().map(|d| d.as_ref()));
        Ok(g)
    }
}

/// Reads the descriptions of `replicas` concurrently (no review).
pub(crate) async fn read_all(replicas: &[(StageName, Arc<Replica>)]) {
    futures_join_all(replicas.iter().map(|(stage, r)| read(*stage, r))).await;
}

/// One replica's verdict in a review.
pub(crate) struct Verdict {
    pub stage: StageName,
    pub replica: Arc<Replica>,
    pub description: Arc<qwen_image_proto::v1::StageDescription>,
    pub verdict: Result<(), Mismatch>,
}

/// Marks every replica accepted or refused as its verdict says.
pub(crate) fn apply(verdicts: Vec<Verdict>) {
    for v in verdicts {
        match v.verdict {
            Ok(()) => {
                if !v.replica.is_accepted() {
                    tracing::info!(stage = %v.stage, uri = %v.replica.uri, "stage replica now fits: accepted");
                }
                v.replica.set_described(Described::Accepted(v.description));
            }
            Err(mismatch) => refuse(v.stage, &v.replica, v.description, mismatch),
        }
    }
}

fn refuse(
    stage: StageName,
    replica: &Replica,
    description: Arc<qwen_image_proto::v1::StageDescription>,
    mismatch: Mismatch,
) {
    let already = matches!(
        replica.described(),
        Described::Refused { ref reason, .. } if *reason == mismatch.message
    );
    if !already {
        tracing::error!(%stage, uri = %replica.uri, field = mismatch.field, reason = %mismatch.message,
            "stage replica does not fit the other stages: refused");
        metrics::counter!(m::GATEWAY_REPLICA_REFUSALS_TOTAL, "service" => "gateway",
            "stage" => stage.as_str(), "field" => mismatch.field)
        .increment(1);
    }
    replica.set_described(Described::Refused {
        description,
        reason: mismatch.message,
    });
}

/// Runs futures concurrently and waits for all (a tiny join_all, to keep the dependency list short).
async fn futures_join_all<F: std::future::Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}
