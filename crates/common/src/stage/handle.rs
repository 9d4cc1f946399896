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
use crate::stage::gate;
use crate::stage::worker::{BoxedJob, CancelOnDrop, Cancelled, JobCtx, Pending, Reply, Work};

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
    max_pixels: u64,
}

impl<M> Clone for StageHandle<M> {
    fn clone(&self) -> Self {
        Self {
            admission: self.admission.clone(),
            readiness: self.readiness.clone(),
            max_pixels: self.max_pixels,
        }
    }
}

impl<M: 'static> StageHandle<M> {
    pub(crate) fn new(
        admission: Admission<BoxedJob<M>>,
        readiness: Readiness,
        max_pixels: u64,
    ) -> Self {
        Self {
            admission,
            readiness,
            max_pixels,
        }
    }

    /// Refuses a request of more than `--max-pixels` image pixels (summed over its batch), logged like
    /// [`Self::checked`]. `pixels` is what the request asks for; `what` names it for the message.
    pub fn check_pixels(&self, pixels: u64, what: &str) -> Result<(), StageError> {
        self.checked(pixel_budget(pixels, self.max_pixels, what))
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
    /// caller went away) or giving up at the deadline sets the job's cancellation flag: the worker skips
    /// the job if it has not started, and the model code stops at its next check if it has.
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
        let cancelled = Cancelled::default();
        self.submit(rpc, deadline, &cancelled, Box::new(work), reply)?;
        let _cancel = CancelOnDrop(cancelled);
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
    /// worker waits. Dropping the returned stream (the caller went away) sets the job's cancellation flag.
    pub fn stream<E, W>(
        &self,
        rpc: &'static str,
        deadline: Option<Instant>,
        buffer: usize,
        work: W,
    ) -> Result<JobStream<E>, StageError>
    where
        E: Send + 'static,
        W: FnOnce(&mut M, &JobCtx<'_>, &mpsc::Sender<Result<E, Status>>) -> Result<E, StageError>
            + Send
            + 'static,
    {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let events = tx.clone();
        let cancelled = Cancelled::default();
        let job: BoxedJob<M> = Box::new(Pending {
            rpc,
            deadline,
            cancelled: cancelled.clone(),
            work: Box::new(move |m: &mut M, ctx: &JobCtx<'_>| work(m, ctx, &events)),
            reply: tx,
        });
        self.admission
            .submit(gate::take_reserved(), job, tracing::Span::current())?;
        Ok(JobStream {
            inner: ReceiverStream::new(rx),
            _cancel: CancelOnDrop(cancelled),
        })
    }
}

impl<M: 'static> StageHandle<M> {
    /// Admits a streaming job whose messages, the last one included, other jobs may send (continuous
    /// batching: the job running a batch streams every member's progress and result). `make` gets the
    /// stream's [`SharedReply`] and the job's cancellation flag before the job is admitted and returns the
    /// work; the work returns `Ok(None)` when the last message has already been sent through the shared
    /// reply, or the last message (or error) for the skeleton to send otherwise.
    pub fn stream_shared<E, F, W>(
        &self,
        rpc: &'static str,
        deadline: Option<Instant>,
        buffer: usize,
        make: F,
    ) -> Result<JobStream<E>, StageError>
    where
        E: Send + 'static,
        F: FnOnce(SharedReply<E>, Cancelled) -> W,
        W: FnOnce(&mut M, &JobCtx<'_>) -> Result<Option<E>, StageError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let reply = SharedReply::new(tx);
        let cancelled = Cancelled::default();
        let work = make(reply.clone(), cancelled.clone());
        self.submit(rpc, deadline, &cancelled, Box::new(work), reply)?;
        Ok(JobStream {
            inner: ReceiverStream::new(rx),
            _cancel: CancelOnDrop(cancelled),
        })
    }
}

impl<M: 'static> StageHandle<M> {
    /// Admits one job answering on `reply`.
    fn submit<T, R>(
        &self,
        rpc: &'static str,
        deadline: Option<Instant>,
        cancelled: &Cancelled,
        work: Work<M, T>,
        reply: R,
    ) -> Result<(), StageError>
    where
        T: Send + 'static,
        R: Reply<T>,
    {
        let job: BoxedJob<M> = Box::new(Pending {
            rpc,
            deadline,
            cancelled: cancelled.clone(),
            work,
            reply,
        });
        self.admission
            .submit(gate::take_reserved(), job, tracing::Span::current())?;
        Ok(())
    }
}

/// The sending side of a [`StageHandle::stream_shared`] stream, shared by the job and whichever job runs
/// it in a batch: progress messages, then one last message that ends the stream.
pub struct SharedReply<E>(Arc<std::sync::Mutex<Option<mpsc::Sender<Result<E, Status>>>>>);

impl<E> Clone for SharedReply<E> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<E: Send + 'static> SharedReply<E> {
    fn new(tx: mpsc::Sender<Result<E, Status>>) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(tx))))
    }

    fn sender(&self) -> Option<mpsc::Sender<Result<E, Status>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends a progress message, waiting while the reader's buffer is full; false when the caller has
    /// gone or the stream has already ended. Call it on a worker thread, not in async code.
    pub fn send(&self, message: E) -> bool {
        self.sender()
            .is_some_and(|tx| tx.blocking_send(Ok(message)).is_ok())
    }

    /// Sends the last message (or the error that ends the stream) and ends the stream; false when the
    /// caller has gone or the stream had already ended.
    pub fn finish(&self, answer: Result<E, StageError>) -> bool {
        let tx = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        tx.is_some_and(|tx| tx.blocking_send(answer.map_err(Status::from)).is_ok())
    }

    /// True once the caller has gone or the stream has ended.
    pub fn is_closed(&self) -> bool {
        self.sender().is_none_or(|tx| tx.is_closed())
    }
}

impl<E: Send + 'static> Reply<Option<E>> for SharedReply<E> {
    fn is_closed(&self) -> bool {
        SharedReply::is_closed(self)
    }

    fn deliver(self, answer: Result<Option<E>, StageError>) -> bool {
        match answer {
            Ok(None) => true,
            Ok(Some(e)) => self.finish(Ok(e)),
            Err(e) => self.finish(Err(e)),
        }
    }

    fn answered(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }
}

/// INVALID_ARGUMENT when `pixels` exceeds `max`.
pub fn pixel_budget(pixels: u64, max: u64, what: &str) -> Result<(), StageError> {
    if pixels <= max {
        return Ok(());
    }
    Err(StageError::InvalidArgument(format!(
        "{what} is {pixels} pixels; this stage takes at most {max} pixels per request (--max-pixels): \
         send fewer or smaller images, or raise --max-pixels on the stage"
    )))
}

/// The response stream of a streaming job: its events, and the job's cancellation when dropped.
pub struct JobStream<E> {
    inner: ReceiverStream<Result<E, Status>>,
    _cancel: CancelOnDrop,
}

impl<E> tokio_stream::Stream for JobStream<E> {
    type Item = Result<E, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pixel_budget_refuses_only_what_exceeds_it() {
        assert!(pixel_budget(100, 100, "the batch").is_ok());
        let e = pixel_budget(101, 100, "2 images of 64x64").expect_err("over");
        assert!(
            matches!(&e, StageError::InvalidArgument(m)
            if m.contains("2 images of 64x64 is 101 pixels") && m.contains("--max-pixels")),
            "{e}"
        );
    }
}
