//! What a stage's gRPC handlers share: the prologue of every RPC (serving? the caller's deadline) and
//! admitting a job to the worker, unary or streaming.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use crate::deadline;
use crate::queue::Admission;
use crate::stage::error::StageError;
use crate::stage::worker::{BoxedJob, JobCtx, Pending};

/// Whether the stage accepts work: false while loading, after the worker stopped and while draining.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
}

/// The handlers' side of a stage whose model is `M`; cheap to clone.
pub struct StageHandle<M> {
    admission: Admission<BoxedJob<M>>,
    readiness: Readiness,
}

impl<M> Clone for StageHandle<M> {
    fn clone(&self) -> Self {
        Self {
            admission: self.admission.clone(),
            readiness: self.readiness.clone(),
        }
    }
}

impl<M: 'static> StageHandle<M> {
    pub(crate) fn new(admission: Admission<BoxedJob<M>>, readiness: Readiness) -> Self {
        Self {
            admission,
            readiness,
        }
    }

    /// The prologue of every RPC: UNAVAILABLE unless SERVING; the caller's deadline (`grpc-timeout`), and
    /// DEADLINE_EXCEEDED if it has already passed.
    pub fn begin<T>(&self, request: &Request<T>) -> Result<Option<Instant>, StageError> {
        if !self.readiness.is_ready() {
            return Err(StageError::NotReady);
        }
        let now = Instant::now();
        let deadline = deadline::from_metadata(request.metadata(), now);
        if deadline.is_some_and(|d| d <= now) {
            return Err(StageError::deadline_before_start());
        }
        Ok(deadline)
    }

    /// A validation result, logged when the request is rejected.
    pub fn checked<T>(&self, validated: Result<T, StageError>) -> Result<T, StageError> {
        validated.inspect_err(|e| tracing::info!(error = %e, "rejected"))
    }

    /// Admits `work` and waits for its answer, at most until the deadline. Dropping this future (the
    /// caller went away) closes the answer channel: the worker skips the job if it has not started.
    pub async fn unary<T, W>(
        &self,
        rpc: &'static str,
        deadline: Option<Instant>,
        work: W,
    ) -> Result<T, StageError>
    where
        T: Send + 'static,
        W: FnOnce(&mut M, &JobCtx<'_>) -> Result<T, StageError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: BoxedJob<M> = Box::new(Pending {
            rpc,
            deadline,
            work: Box::new(work),
            reply,
        });
        self.admission.try_submit(job, tracing::Span::current())?;
        let answer = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), rx).await.map_err(|_| {
                StageError::DeadlineExceeded(
                    "before the answer was ready; allow more time (grpc-timeout)".into(),
                )
            })?,
            None => rx.await,
        };
        // The worker dropped the job without answering: it has stopped.
        answer.unwrap_or_else(|_| {
            Err(StageError::WorkerStopped(
                "the job ended without an answer".into(),
            ))
        })
    }

    /// Admits a streaming job and returns its stream at once. `work` sends its progress messages on the
    /// sender it is given (a failed send = the caller went away) and returns the last message; an error
    /// ends the stream with its status. `buffer` messages are buffered towards a slow reader before the
    /// worker waits.
    pub fn stream<E, W>(
        &self,
        rpc: &'static str,
        deadline: Option<Instant>,
        buffer: usize,
        work: W,
    ) -> Result<ReceiverStream<Result<E, Status>>, StageError>
    where
        E: Send + 'static,
        W: FnOnce(&mut M, &JobCtx<'_>, &mpsc::Sender<Result<E, Status>>) -> Result<E, StageError>
            + Send
            + 'static,
    {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let events = tx.clone();
        let job: BoxedJob<M> = Box::new(Pending {
            rpc,
            deadline,
            work: Box::new(move |m: &mut M, ctx: &JobCtx<'_>| work(m, ctx, &events)),
            reply: tx,
        });
        self.admission.try_submit(job, tracing::Span::current())?;
        Ok(ReceiverStream::new(rx))
    }
}
