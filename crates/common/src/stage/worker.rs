//! The model worker thread of a stage and the jobs it runs.
//!
//! The model is loaded on its own OS thread (so it need not be `Send`) and runs one admitted job at a time.
//! What every job shares is written here once:
//!
//! - the prologue: a job whose caller has gone is skipped; one whose deadline has passed is answered
//!   DEADLINE_EXCEEDED without running;
//! - the job span (child of the handler's span) with the queue wait, the job metrics and [`Stats`];
//! - a panic inside a job is caught: that request gets INTERNAL and the worker goes on. After a panic the
//!   stage's probe (its warm-up pass) checks the model; if the model no longer works the worker stops, and
//!   the server turns NOT_SERVING and exits non-zero ([`super::serve`]);
//! - the admission slot is released before the answer is sent, so a caller that sends its next request
//!   right after an answer is admitted.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use crate::metric_names as m;
use crate::queue::{self, Admission, Slot};
use crate::stage::error::StageError;

/// What a job sees of its run besides the model.
pub struct JobCtx<'a> {
    pub rpc: &'static str,
    /// The caller's deadline, if it sent one.
    pub deadline: Option<Instant>,
    /// When the worker started this job.
    pub started: Instant,
    /// Set by the handler when the caller goes away (see [`Cancelled`]).
    cancelled: Cancelled,
    stats: &'a Stats,
}

impl JobCtx<'_> {
    pub fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The flag set when the caller goes away, for model code to poll together with [`Self::deadline`]
    /// (`qwen_image_model::interrupt`).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancelled.0.clone()
    }

    /// True once the caller has gone or the deadline has passed: the job's answer is no longer wanted.
    pub fn stopped(&self) -> bool {
        self.cancelled.is_set() || self.past_deadline()
    }

    /// Counts one unit of progress (a denoising step) in [`Stats::steps_run`].
    pub fn step_done(&self) {
        self.stats.update(|s| s.steps_run += 1);
    }

    /// Records that one model pass served `requests` requests together (continuous batching), for
    /// [`StatsSnapshot::largest_batch`].
    pub fn batch_ran(&self, requests: usize) {
        self.stats
            .update(|s| s.largest_batch = s.largest_batch.max(requests as u64));
    }
}

/// A job's cancellation flag: set when its caller goes away (the handler's future or the response stream
/// is dropped, see [`CancelOnDrop`]), read by the model code between its pieces of work.
#[derive(Clone, Default, Debug)]
pub struct Cancelled(Arc<AtomicBool>);

impl Cancelled {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// The flag itself (for model code to poll, see [`JobCtx::cancel_flag`]).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

/// Sets a job's [`Cancelled`] flag when dropped: held by whatever lives exactly as long as the caller
/// waits (the unary handler's future, the response stream).
#[derive(Debug)]
pub struct CancelOnDrop(pub Cancelled);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.set();
    }
}

/// Where a job's answer goes.
pub trait Reply<T>: Send + 'static {
    /// The caller has gone (its future or stream was dropped).
    fn is_closed(&self) -> bool;
    /// Delivers the answer; false when the caller has gone.
    fn deliver(self, answer: Result<T, StageError>) -> bool;
    /// The caller already has its answer, sent by another job (continuous batching): the job still runs
    /// (to report how the request ended) even if the caller has since gone.
    fn answered(&self) -> bool {
        false
    }
}

/// Unary RPCs: one answer.
impl<T: Send + 'static> Reply<T> for oneshot::Sender<Result<T, StageError>> {
    fn is_closed(&self) -> bool {
        oneshot::Sender::is_closed(self)
    }

    fn deliver(self, answer: Result<T, StageError>) -> bool {
        self.send(answer).is_ok()
    }
}

/// Server-streaming RPCs: the last message (or the error that ends the stream); the job sends its progress
/// messages on a clone of the same sender.
impl<E: Send + 'static> Reply<E> for mpsc::Sender<Result<E, Status>> {
    fn is_closed(&self) -> bool {
        mpsc::Sender::is_closed(self)
    }

    fn deliver(self, answer: Result<E, StageError>) -> bool {
        self.blocking_send(answer.map_err(Status::from)).is_ok()
    }
}

/// The work of one job: runs on the worker thread with the model.
pub type Work<M, T> = Box<dyn FnOnce(&mut M, &JobCtx<'_>) -> Result<T, StageError> + Send>;

/// How a job ended (the `outcome` label of the job metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Finished,
    Failed,
    Cancelled,
    DeadlineExceeded,
    Panicked,
}

impl Ended {
    fn label(self) -> &'static str {
        match self {
            Self::Finished => m::OUTCOME_OK,
            Self::Failed | Self::Panicked => m::OUTCOME_ERROR,
            Self::Cancelled => m::OUTCOME_CANCELLED,
            Self::DeadlineExceeded => m::OUTCOME_DEADLINE_EXCEEDED,
        }
    }
}

/// An admitted job, type-erased so that one worker runs the jobs of every RPC of its stage.
pub trait Job<M>: Send {
    fn rpc(&self) -> &'static str;
    fn deadline(&self) -> Option<Instant>;
    fn caller_gone(&self) -> bool;
    fn cancelled(&self) -> Cancelled;
    /// Answers `e` without running (the deadline passed while it waited).
    fn refuse(self: Box<Self>, e: StageError);
    /// Runs the work, catching a panic, releases `slot`, then answers.
    fn run(self: Box<Self>, model: &mut M, ctx: &JobCtx<'_>, slot: Slot, faults: &Faults) -> Ended;
}

/// A job of work `W` answering on `R`.
pub struct Pending<M, T, R> {
    pub rpc: &'static str,
    pub deadline: Option<Instant>,
    pub cancelled: Cancelled,
    pub work: Work<M, T>,
    pub reply: R,
}

impl<M, T, R> Job<M> for Pending<M, T, R>
where
    T: Send + 'static,
    R: Reply<T>,
{
    fn rpc(&self) -> &'static str {
        self.rpc
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn caller_gone(&self) -> bool {
        !self.reply.answered() && (self.cancelled.is_set() || self.reply.is_closed())
    }

    fn cancelled(&self) -> Cancelled {
        self.cancelled.clone()
    }

    fn refuse(self: Box<Self>, e: StageError) {
        let _ = self.reply.deliver(Err(e));
    }

    fn run(self: Box<Self>, model: &mut M, ctx: &JobCtx<'_>, slot: Slot, faults: &Faults) -> Ended {
        let Pending { work, reply, .. } = *self;
        let caught = catch_unwind(AssertUnwindSafe(|| {
            faults.maybe_panic();
            work(model, ctx)
        }));
        let (answer, ended) = match caught {
            Ok(Ok(v)) => (Ok(v), Ended::Finished),
            // Whatever stopped the work once the request ended (typically the model's interrupt check),
            // the answer is the request's end.
            Ok(Err(e)) if ctx.stopped() && !matches!(e, StageError::InvalidArgument(_)) => {
                tracing::info!(error = %e, "the request ended; job stopped");
                if ctx.past_deadline() {
                    (
                        Err(StageError::DeadlineExceeded(
                            "while running; allow more time (grpc-timeout) or ask for less work"
                                .into(),
                        )),
                        Ended::DeadlineExceeded,
                    )
                } else {
                    (Err(StageError::Cancelled), Ended::Cancelled)
                }
            }
            Ok(Err(e)) => {
                let ended = match &e {
                    StageError::Cancelled => Ended::Cancelled,
                    StageError::DeadlineExceeded(_) => Ended::DeadlineExceeded,
                    _ => Ended::Failed,
                };
                (Err(e), ended)
            }
            Err(payload) => {
                let msg = panic_message(payload.as_ref());
                tracing::error!(panic = %msg, "the job panicked; answering INTERNAL");
                (Err(StageError::Panicked(msg)), Ended::Panicked)
            }
        };
        slot.release();
        let delivered = reply.deliver(answer);
        if ended == Ended::Finished && !delivered {
            return Ended::Cancelled;
        }
        ended
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// A snapshot of what a worker did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Jobs the worker started (taken off the queue with the caller still there, before the deadline).
    pub jobs_started: u64,
    /// Jobs that delivered their answer.
    pub jobs_finished: u64,
    /// Jobs stopped because the caller went away (before or while running).
    pub jobs_cancelled: u64,
    /// Jobs stopped because the deadline passed.
    pub jobs_deadline_exceeded: u64,
    /// Jobs that failed in the model.
    pub jobs_failed: u64,
    /// Jobs that panicked (answered INTERNAL).
    pub jobs_panicked: u64,
    /// Units of progress jobs reported (denoising steps).
    pub steps_run: u64,
    /// Most requests one model pass served together (continuous batching).
    pub largest_batch: u64,
}

/// A worker's counters, observable by tests (and mirrored in Prometheus metrics); `subscribe` to wait for
/// a change without polling.
#[derive(Clone)]
pub struct Stats(Arc<watch::Sender<StatsSnapshot>>);

impl Default for Stats {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(StatsSnapshot::default())))
    }
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl Stats {
    pub fn subscribe(&self) -> watch::Receiver<StatsSnapshot> {
        self.0.subscribe()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        self.0.borrow().clone()
    }

    fn update(&self, f: impl FnOnce(&mut StatsSnapshot)) {
        self.0.send_modify(f);
    }
}

/// Test-only fault injection. It is reachable from Rust code only (a field of
/// [`super::StageConfig`]): no flag or environment variable sets it, so a production process built from
/// its command line never has one armed.
#[derive(Clone, Default)]
pub struct Faults(Arc<FaultState>);

#[derive(Default)]
struct FaultState {
    panics: AtomicUsize,
    broken: AtomicBool,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Faults")
    }
}

impl Faults {
    /// The next job panics inside its work (the request gets INTERNAL; the model is fine).
    pub fn panic_next_job(&self) {
        self.0.panics.fetch_add(1, Ordering::SeqCst);
    }

    /// The next job panics and the model then fails its check: the worker cannot go on.
    pub fn break_model_on_next_job(&self) {
        self.0.broken.store(true, Ordering::SeqCst);
        self.panic_next_job();
    }

    fn maybe_panic(&self) {
        let take = self
            .0
            .panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if take {
            panic!("injected test fault: the job panics");
        }
    }

    fn model_broken(&self) -> bool {
        self.0.broken.load(Ordering::SeqCst)
    }
}

/// A job of a stage whose model is `M`.
pub type BoxedJob<M> = Box<dyn Job<M>>;

/// A started worker.
pub struct Worker<M> {
    pub admission: Admission<BoxedJob<M>>,
    /// Resolves once the model is loaded and warmed up, or with the load error.
    pub ready: oneshot::Receiver<Result<(), String>>,
    /// Resolves (with the reason) when the worker thread ends for any reason.
    pub exited: oneshot::Receiver<String>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Sends why the thread ended when it ends, also by unwinding.
struct ExitNotice {
    tx: Option<oneshot::Sender<String>>,
    reason: String,
}

impl Drop for ExitNotice {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let reason = if std::thread::panicking() {
                "the worker thread panicked".to_string()
            } else {
                std::mem::take(&mut self.reason)
            };
            let _ = tx.send(reason);
        }
    }
}

/// What the worker does with its model besides running jobs.
pub struct WorkerSpec<M, L, P> {
    /// Metrics `service` label and thread name.
    pub service: &'static str,
    pub capacity: usize,
    /// Loads the model and warms it up (runs on the worker thread).
    pub load: L,
    /// Checks that the model still works (the warm-up pass); run after a job panicked.
    pub probe: P,
    pub stats: Stats,
    pub faults: Faults,
    _model: std::marker::PhantomData<fn() -> M>,
}

impl<M, L, P> WorkerSpec<M, L, P> {
    pub fn new(
        service: &'static str,
        capacity: usize,
        load: L,
        probe: P,
        stats: Stats,
        faults: Faults,
    ) -> Self {
        Self {
            service,
            capacity,
            load,
            probe,
            stats,
            faults,
            _model: std::marker::PhantomData,
        }
    }
}

/// Starts the worker thread: loads the model, reports on `ready`, then runs the admitted jobs in order.
pub fn spawn<M, L, P>(spec: WorkerSpec<M, L, P>) -> std::io::Result<Worker<M>>
where
    M: 'static,
    L: FnOnce() -> Result<M, String> + Send + 'static,
    P: Fn(&mut M) -> Result<(), String> + Send + 'static,
{
    let WorkerSpec {
        service,
        capacity,
        load,
        probe,
        stats,
        faults,
        ..
    } = spec;
    let (admission, mut rx, last_job_ms) = queue::channel::<BoxedJob<M>>(service, capacity);
    let (ready_tx, ready) = oneshot::channel();
    let (exit_tx, exited) = oneshot::channel();
    // The loop runs on a thread of a rayon pool of its own: candle's matmuls fork into the pool of the thread
    // that calls them (gemm's `par_for_each`), several times per matmul, and a fork from a thread outside
    // any pool parks the caller and wakes a worker of the global pool each time, while from inside a pool the
    // caller works on and the pool's other threads steal. On the default model at 8 clients, kernel wake-ups
    // and yields were 42 % of the denoiser's samples (README, Performance). A pool per worker, not the global
    // one: the loop holds its thread for the worker's life, so workers sharing a pool (`qwen-image serve` runs
    // every stage in one process) would take all its threads and the next would wait forever.
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(move |i| format!("{service}-compute-{i}"))
        .build()
        .map_err(std::io::Error::other)?;
    let thread = std::thread::Builder::new()
        .name(format!("{service}-worker"))
        .spawn(move || pool.install(move || {
            let mut notice = ExitNotice {
                tx: Some(exit_tx),
                reason: "the job queue closed".into(),
            };
            let load_started = Instant::now();
            let loaded = catch_unwind(AssertUnwindSafe(load))
                .unwrap_or_else(|p| Err(format!("loading panicked: {}", panic_message(p.as_ref()))));
            metrics::gauge!(m::MODEL_LOAD_SECONDS, "service" => service)
                .set(load_started.elapsed().as_secs_f64());
            let mut model = match loaded {
                Ok(model) => {
                    let _ = ready_tx.send(Ok(()));
                    model
                }
                Err(e) => {
                    notice.reason = format!("the model failed to load: {e}");
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while let Some(queued) = rx.blocking_recv() {
                let wait = queued.enqueued_at.elapsed();
                metrics::gauge!(m::QUEUE_DEPTH, "service" => service).decrement(1);
                metrics::histogram!(m::QUEUE_WAIT_SECONDS, "service" => service)
                    .record(wait.as_secs_f64());
                let _entered = tracing::info_span!(
                    parent: &queued.span,
                    "job",
                    queue_wait_ms = wait.as_secs_f64() * 1e3,
                )
                .entered();
                let job = queued.payload;
                let rpc = job.rpc();
                let started = Instant::now();
                let ended = if job.caller_gone() {
                    tracing::info!("caller went away before the job started");
                    Ended::Cancelled
                } else if job.deadline().is_some_and(|d| started >= d) {
                    queued.slot.release();
                    job.refuse(StageError::deadline_before_start());
                    Ended::DeadlineExceeded
                } else {
                    stats.update(|s| s.jobs_started += 1);
                    let ctx = JobCtx {
                        rpc,
                        deadline: job.deadline(),
                        started,
                        cancelled: job.cancelled(),
                        stats: &stats,
                    };
                    job.run(&mut model, &ctx, queued.slot, &faults)
                };
                record(service, rpc, ended, started, &stats);
                crate::stage::memory::record_rss(service);
                last_job_ms.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                if ended == Ended::Panicked {
                    let checked = if faults.model_broken() {
                        Err("injected test fault: the model is broken".to_string())
                    } else {
                        catch_unwind(AssertUnwindSafe(|| probe(&mut model))).unwrap_or_else(|p| {
                            Err(format!("the check panicked: {}", panic_message(p.as_ref())))
                        })
                    };
                    if let Err(e) = checked {
                        tracing::error!(error = %e, "the model fails its check after a panic: the worker stops");
                        notice.reason = format!("the model no longer works after a panic: {e}");
                        return;
                    }
                    tracing::warn!("the model passed its check after the panic; serving on");
                }
            }
        }))?;
    Ok(Worker {
        admission,
        ready,
        exited,
        thread,
    })
}

fn record(service: &'static str, rpc: &'static str, ended: Ended, started: Instant, stats: &Stats) {
    stats.update(|s| match ended {
        Ended::Finished => s.jobs_finished += 1,
        Ended::Failed => s.jobs_failed += 1,
        Ended::Cancelled => s.jobs_cancelled += 1,
        Ended::DeadlineExceeded => s.jobs_deadline_exceeded += 1,
        Ended::Panicked => s.jobs_panicked += 1,
    });
    if matches!(ended, Ended::Cancelled | Ended::DeadlineExceeded) {
        metrics::counter!(m::JOBS_STOPPED_TOTAL, "service" => service, "outcome" => ended.label())
            .increment(1);
    }
    metrics::histogram!(m::JOB_SECONDS, "service" => service, "rpc" => rpc, "outcome" => ended.label())
        .record(started.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(faults: Faults, probe_ok: bool) -> (Worker<u32>, Stats) {
        let stats = Stats::default();
        let w = spawn(WorkerSpec::new(
            "test",
            1,
            || Ok(7u32),
            move |_m: &mut u32| if probe_ok { Ok(()) } else { Err("no".into()) },
            stats.clone(),
            faults,
        ))
        .expect("thread");
        (w, stats)
    }

    async fn ask(w: &Worker<u32>) -> Result<u32, StageError> {
        let (tx, rx) = oneshot::channel();
        let job: BoxedJob<u32> = Box::new(Pending {
            rpc: "Test",
            deadline: None,
            cancelled: Cancelled::default(),
            work: Box::new(|m: &mut u32, _ctx: &JobCtx<'_>| Ok(*m)),
            reply: tx,
        });
        w.admission
            .try_submit(job, tracing::Span::none())
            .map_err(StageError::from)?;
        rx.await
            .unwrap_or_else(|_| Err(StageError::WorkerStopped("gone".into())))
    }

    #[tokio::test]
    async fn a_panicking_job_gets_internal_and_the_worker_goes_on() {
        let faults = Faults::default();
        let (mut w, stats) = worker(faults.clone(), true);
        (&mut w.ready).await.expect("sent").expect("loaded");
        assert_eq!(ask(&w).await.expect("answer"), 7);
        faults.panic_next_job();
        assert!(matches!(ask(&w).await, Err(StageError::Panicked(m)) if m.contains("injected")));
        assert_eq!(ask(&w).await.expect("serves on"), 7);
        // The counters move right after the answer is delivered.
        let s = stats
            .subscribe()
            .wait_for(|s| s.jobs_finished == 2)
            .await
            .expect("stats alive")
            .clone();
        assert_eq!(s.jobs_panicked, 1);
    }

    #[tokio::test]
    async fn a_broken_model_stops_the_worker() {
        let faults = Faults::default();
        let (mut w, _) = worker(faults.clone(), true);
        (&mut w.ready).await.expect("sent").expect("loaded");
        faults.break_model_on_next_job();
        assert!(matches!(ask(&w).await, Err(StageError::Panicked(_))));
        let reason = (&mut w.exited).await.expect("notice");
        assert!(reason.contains("no longer works"), "{reason}");
        assert!(matches!(ask(&w).await, Err(StageError::WorkerStopped(_))));
    }

    #[tokio::test]
    async fn a_failed_probe_after_a_panic_stops_the_worker_and_load_errors_are_reported() {
        let faults = Faults::default();
        let (mut w, _) = worker(faults.clone(), false);
        (&mut w.ready).await.expect("sent").expect("loaded");
        faults.panic_next_job();
        assert!(ask(&w).await.is_err());
        assert!(
            (&mut w.exited)
                .await
                .expect("notice")
                .contains("no longer works")
        );

        let w = spawn(WorkerSpec::new(
            "test",
            1,
            || Err::<u32, _>("no weights".to_string()),
            |_m: &mut u32| Ok(()),
            Stats::default(),
            Faults::default(),
        ))
        .expect("thread");
        assert_eq!(w.ready.await.expect("sent"), Err("no weights".to_string()));
        assert!(w.exited.await.expect("notice").contains("no weights"));
    }
}
