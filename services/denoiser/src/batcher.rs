//! Continuous batching of Denoise requests (`--max-batch`, `--batch-wait-ms`).
//!
//! Requests with the same [`BatchKey`] (latent grid, no ControlNet) run through the transformer as one
//! batch ([`qwen_image_model::batch::predict_batch`]): each keeps its own timestep, schedule, true-CFG scale
//! and prompt lengths (padding + mask), and gets the velocity it would get alone. Requests join and leave the
//! batch at step boundaries.
//!
//! The stage skeleton runs one job at a time on the worker thread, and every request still is one job (its
//! admission slot, deadline, metrics). The job of a request drives the batch of its key ([`drive`]) until
//! its own request has ended: each step it lets in the compatible requests queued behind it (oldest first,
//! never past an older request of another key, so nothing waits forever), runs one batched step, and
//! streams every member's progress and result on the member's own stream ([`SharedReply`]). A member whose
//! request ends while another job drives is answered at once; its own job, reached later, only reports how
//! it ended. Members whose own request has not ended when the driver's has stay in the worker's
//! [`Running`] batch; their own jobs (next in the queue) drive on.
//!
//! Per request, as without batching: a caller that goes away or a passed deadline ends the request at the
//! next step boundary; within a step the model stops (at its next interrupt check) once every member of
//! the batch has ended. Requests the batch cannot take ([`Batcher::takes`]: ControlNets, adapters, other
//! schedules, reference pictures) run alone through `job::run`, after the batched requests queued before
//! them ([`Batcher::barrier`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use qwen_image_common::metric_names as m;
use qwen_image_common::stage::{JobCtx, SharedReply, StageError};
use qwen_image_model::batch::{BatchItem, predict_batch};
use qwen_image_model::denoise::{self, Conditioning, InpaintBlend};
use qwen_image_model::interrupt::{self, Interrupt};
use qwen_image_model::nn::all_finite;
use qwen_image_model::rope::ImgShape;
use qwen_image_model::scheduler::{Schedule, SchedulerConfig};
use qwen_image_model::snapshot::first_line;
use qwen_image_proto::v1::{DenoiseEvent, DenoiseResult, denoise_event::Event};

use crate::job;

use crate::adapters::RequestLoras;
use crate::model::LoadedModel;
use crate::validate::DenoiseInputs;

const SERVICE: &str = "denoiser";

/// What requests must share to run through the transformer together. (A LoRA adapter, when requests can
/// choose one, belongs here too: requests with different adapters must never share a pass.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// Latent grid `(h, w)` in latent cells.
    pub latent: (usize, usize),
    /// The loaded ControlNets the request runs, by index, in request order.
    pub controlnets: Vec<usize>,
    /// Set (to the request's own id) for a request that runs alone: ControlNet residuals are not batched.
    pub alone: Option<u64>,
}

impl BatchKey {
    fn of(inputs: &DenoiseInputs) -> Self {
        Self {
            latent: (inputs.latents.shape[2], inputs.latents.shape[3]),
            controlnets: inputs.control.iter().map(|c| c.net).collect(),
            alone: None,
        }
    }
}

/// `--max-batch` and `--batch-wait-ms`.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most latent rows (images) in one pass; 1 = no batching.
    pub max_rows: usize,
    /// How long a new batch waits for more requests before its first step.
    pub wait: Duration,
}

/// How a request ended, kept for its own job to report.
#[derive(Debug, Clone)]
enum Ending {
    Finished,
    Failed(StageErrorKind),
}

#[derive(Debug, Clone)]
enum StageErrorKind {
    Cancelled,
    Deadline(String),
    NonFinite,
    Model(String),
}

impl StageErrorKind {
    fn error(&self) -> StageError {
        match self {
            Self::Cancelled => StageError::Cancelled,
            Self::Deadline(how) => StageError::DeadlineExceeded(how.clone()),
            Self::NonFinite => StageError::non_finite_output("final latents"),
            Self::Model(msg) => StageError::Model(msg.clone()),
        }
    }
}

/// A queued request as the batcher holds it until a job starts it.
struct Entry {
    id: u64,
    key: BatchKey,
    /// `None` for a request that runs alone (it only keeps its place in the order).
    request: Option<Box<Request>>,
}

struct Request {
    inputs: DenoiseInputs,
    reply: SharedReply<DenoiseEvent>,
    cancelled: Arc<AtomicBool>,
    deadline: Option<Instant>,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Entry>,
    /// Requests whose job has not yet finished, with how they ended once they have.
    live: HashMap<u64, Option<Ending>>,
}

/// The requests waiting to start, shared by the handlers and the worker.
pub struct Batcher {
    queue: Mutex<Queue>,
    arrived: Condvar,
    next_id: AtomicU64,
    pub config: BatchConfig,
}

/// A request's place in the batcher, owned by its job's work: dropping it (the job ran, or was dropped
/// unrun) forgets the request.
pub struct Ticket {
    id: u64,
    key: BatchKey,
    batcher: Arc<Batcher>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut q = self.batcher.lock();
        q.pending.retain(|e| e.id != self.id);
        q.live.remove(&self.id);
    }
}

impl Batcher {
    /// Whether a request runs in a shared batch: batching is on (`--max-batch` > 1) and the request has
    /// no ControlNet (residuals are not batched yet), no adapters (a request with adapters runs its own
    /// transformer copy; see adapters.rs), the served schedule and no reference pictures. Any other
    /// request runs alone, behind a barrier.
    pub fn takes(
        &self,
        inputs: &DenoiseInputs,
        loras: &RequestLoras,
        served: &SchedulerConfig,
    ) -> bool {
        self.config.max_rows > 1
            && inputs.control.is_empty()
            && loras.loras.is_empty()
            && loras.scheduler == *served
            && inputs.references.is_empty()
    }

    pub fn new(config: BatchConfig) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Queue::default()),
            arrived: Condvar::new(),
            next_id: AtomicU64::new(1),
            config,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a batchable request (called by the handler just before its job is admitted).
    pub fn enqueue(
        self: &Arc<Self>,
        inputs: DenoiseInputs,
        reply: SharedReply<DenoiseEvent>,
        cancelled: Arc<AtomicBool>,
        deadline: Option<Instant>,
    ) -> Ticket {
        let key = BatchKey::of(&inputs);
        self.push(key, |_| {
            Some(Box::new(Request {
                inputs,
                reply,
                cancelled,
                deadline,
            }))
        })
    }

    /// Queues the place of a request that runs alone: no request queued after it joins a batch before its
    /// job has started (dropping the ticket, which the job does first, frees the way).
    pub fn barrier(self: &Arc<Self>) -> Ticket {
        self.push(
            BatchKey {
                latent: (0, 0),
                controlnets: Vec::new(),
                alone: None,
            },
            |_| None,
        )
    }

    fn push(
        self: &Arc<Self>,
        mut key: BatchKey,
        request: impl FnOnce(u64) -> Option<Box<Request>>,
    ) -> Ticket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = request(id);
        if request.is_none() {
            key.alone = Some(id);
        }
        let mut q = self.lock();
        q.pending.push_back(Entry {
            id,
            key: key.clone(),
            request,
        });
        q.live.insert(id, None);
        drop(q);
        self.arrived.notify_all();
        Ticket {
            id,
            key,
            batcher: self.clone(),
        }
    }

    /// Takes request `id` out of the queue.
    fn take(&self, id: u64) -> Option<Entry> {
        let mut q = self.lock();
        let at = q.pending.iter().position(|e| e.id == id)?;
        q.pending.remove(at)
    }

    /// Takes the queued requests that may join a batch of `key` with `rows` rows, oldest first, stopping
    /// at the first request of another key (it must not be overtaken). Requests whose caller has gone are
    /// dropped on the way.
    fn joiners(&self, key: &BatchKey, mut rows: usize) -> Vec<Entry> {
        let mut q = self.lock();
        let mut out = Vec::new();
        while let Some(front) = q.pending.front() {
            if front.key != *key {
                break;
            }
            let Some(r) = front.request.as_ref() else {
                break;
            };
            if r.reply.is_closed() || r.cancelled.load(Ordering::Relaxed) {
                let gone = q.pending.pop_front().map(|e| e.id);
                if let Some(slot) = gone.and_then(|id| q.live.get_mut(&id)) {
                    *slot = Some(Ending::Failed(StageErrorKind::Cancelled));
                }
                continue;
            }
            let need = r.inputs.latents.shape[0];
            if rows + need > self.config.max_rows {
                break;
            }
            rows += need;
            out.extend(q.pending.pop_front());
        }
        out
    }

    /// Waits until the requests of `key` at the front of the queue fill `room` rows, another key is at
    /// the front, or `until`.
    fn wait_for_joiners(&self, key: &BatchKey, room: usize, until: Instant) {
        let mut q = self.lock();
        loop {
            let mut rows = 0;
            let mut other = false;
            for e in &q.pending {
                match &e.request {
                    Some(r) if e.key == *key => rows += r.inputs.latents.shape[0],
                    _ => {
                        other = true;
                        break;
                    }
                }
            }
            let now = Instant::now();
            if now >= until || other || rows >= room {
                return;
            }
            q = self
                .arrived
                .wait_timeout(q, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn ended(&self, id: u64, ending: Ending) {
        if let Some(slot) = self.lock().live.get_mut(&id) {
            *slot = Some(ending);
        }
    }

    fn ending(&self, id: u64) -> Option<Ending> {
        self.lock().live.get(&id).cloned().flatten()
    }
}

/// A request in the worker's running batch.
pub struct Member {
    id: u64,
    key: BatchKey,
    reply: SharedReply<DenoiseEvent>,
    interrupt: Interrupt,
    cancelled: Arc<AtomicBool>,
    deadline: Option<Instant>,
    started: Instant,
    positive: Conditioning,
    negative: Option<Conditioning>,
    true_cfg_scale: f64,
    /// Packed latents in the model's dtype.
    latents: Tensor,
    schedule: Schedule,
    /// Next step to run (index in the schedule).
    step: usize,
    start_step: usize,
    img_shapes: [ImgShape; 1],
    inpaint: Option<InpaintBlend>,
    preview_every: usize,
    checkpoint_every: usize,
    rows: usize,
}

impl Member {
    fn prepare(
        model: &LoadedModel,
        id: u64,
        key: BatchKey,
        r: Request,
    ) -> candle_core::Result<Self> {
        let inp = &r.inputs;
        let (lh, lw) = (inp.latents.shape[2], inp.latents.shape[3]);
        let schedule = job::schedule(&model.scheduler, inp).map_err(candle_core::Error::Msg)?;
        let latents =
            job::start_latents(model, inp, &schedule)?.to_dtype(model.transformer.dtype())?;
        Ok(Self {
            id,
            key,
            interrupt: Interrupt::new(r.cancelled.clone(), r.deadline),
            cancelled: r.cancelled,
            deadline: r.deadline,
            started: Instant::now(),
            positive: job::conditioning(&inp.positive, model)?,
            negative: inp
                .negative
                .as_ref()
                .map(|n| job::conditioning(n, model))
                .transpose()?,
            true_cfg_scale: inp.true_cfg_scale,
            latents,
            step: inp.start_step,
            start_step: inp.start_step,
            img_shapes: [(1, lh / 2, lw / 2)],
            inpaint: job::inpaint_blend(model, inp)?,
            preview_every: inp.preview_every_n_steps,
            checkpoint_every: inp.checkpoint_every_n_steps,
            rows: inp.latents.shape[0],
            schedule,
            reply: r.reply,
        })
    }

    fn grid(&self) -> (usize, usize) {
        (self.img_shapes[0].1 * 2, self.img_shapes[0].2 * 2)
    }

    fn done(&self) -> usize {
        self.step - self.start_step
    }

    fn total(&self) -> usize {
        self.schedule.steps() - self.start_step
    }

    /// Why the request ended, if it has (checked at step boundaries).
    fn stopped(&self) -> Option<StageErrorKind> {
        if self.reply.is_closed() || self.cancelled.load(Ordering::Relaxed) {
            Some(StageErrorKind::Cancelled)
        } else if self.deadline.is_some_and(|d| Instant::now() >= d) {
            Some(StageErrorKind::Deadline(format!(
                "after {} steps; allow more time (grpc-timeout) or request fewer steps",
                self.done()
            )))
        } else {
            None
        }
    }

    fn result(&self) -> candle_core::Result<Result<DenoiseResult, StageErrorKind>> {
        if !all_finite(&self.latents)? {
            return Ok(Err(StageErrorKind::NonFinite));
        }
        let (lh, lw) = self.grid();
        Ok(Ok(DenoiseResult {
            latents: Some(job::wire_latents(&self.latents, lh, lw)?),
            sigmas: self.schedule.sigmas.clone(),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        }))
    }
}

/// The worker's running batch (requests started and not yet ended), kept across jobs.
#[derive(Default)]
pub struct Running(Vec<Member>);

impl Running {
    /// Ends member `at`: answers its caller (if still there) and records the ending for its own job.
    fn end(&mut self, batcher: &Batcher, at: usize, answer: Result<DenoiseResult, StageErrorKind>) {
        let member = self.0.remove(at);
        let ending = match answer {
            Ok(result) => {
                member.reply.finish(Ok(DenoiseEvent {
                    event: Some(Event::Result(result)),
                }));
                Ending::Finished
            }
            Err(kind) => {
                if let StageErrorKind::Model(msg) = &kind {
                    tracing::error!(error = %msg, request = member.id, "denoising failed");
                }
                member.reply.finish(Err(kind.error()));
                Ending::Failed(kind)
            }
        };
        batcher.ended(member.id, ending);
    }

    fn rows(&self, key: &BatchKey) -> usize {
        self.0
            .iter()
            .filter(|m| m.key == *key)
            .map(|m| m.rows)
            .sum()
    }
}

/// The job of a batched request: runs the batch of its key, step by step, until the request has ended;
/// returns `Ok(None)` when its stream has its result, or how it failed.
pub fn drive(
    model: &mut LoadedModel,
    ctx: &JobCtx<'_>,
    ticket: &Ticket,
) -> Result<Option<DenoiseEvent>, StageError> {
    let batcher = &ticket.batcher;
    let (id, key) = (ticket.id, &ticket.key);
    loop {
        if let Some(ending) = batcher.ending(id) {
            return match ending {
                Ending::Finished => Ok(None),
                Ending::Failed(kind) => Err(kind.error()),
            };
        }
        if !model.batch.0.iter().any(|m| m.id == id) {
            let Some(entry) = batcher.take(id) else {
                return Err(StageError::Model(
                    "the request left the batcher unanswered".into(),
                ));
            };
            admit(model, batcher, entry);
            let rows = model.batch.rows(key);
            if batcher.config.wait > Duration::ZERO && rows < batcher.config.max_rows {
                let until = Instant::now() + batcher.config.wait;
                batcher.wait_for_joiners(key, batcher.config.max_rows - rows, until);
            }
            continue;
        }
        // A step boundary: members that ended (of any key: also those whose own job was dropped) leave,
        // queued requests join.
        let mut at = 0;
        while at < model.batch.0.len() {
            match model.batch.0[at].stopped() {
                Some(kind) => model.batch.end(batcher, at, Err(kind)),
                None => at += 1,
            }
        }
        if batcher.ending(id).is_some() {
            continue;
        }
        let room = model.batch.rows(key);
        for entry in batcher.joiners(key, room) {
            admit(model, batcher, entry);
        }
        step(model, ctx, batcher, key);
    }
}

/// Starts a queued request: prepares its tensors and adds it to the running batch.
fn admit(model: &mut LoadedModel, batcher: &Batcher, entry: Entry) {
    let Entry { id, key, request } = entry;
    let Some(r) = request else {
        return;
    };
    admit_member(model, batcher, id, key, *r);
}

fn admit_member(model: &mut LoadedModel, batcher: &Batcher, id: u64, key: BatchKey, r: Request) {
    let reply = r.reply.clone();
    match Member::prepare(model, id, key, r) {
        Ok(m) => model.batch.0.push(m),
        Err(e) => {
            let msg = first_line(&e);
            tracing::error!(error = %msg, request = id, "cannot start the request");
            reply.finish(Err(StageError::Model(msg.clone())));
            batcher.ended(id, Ending::Failed(StageErrorKind::Model(msg)));
        }
    }
}

/// One step of every running member of `key`: one transformer pass, then each member's Euler step,
/// progress event and, after its last step, its result.
fn step(model: &mut LoadedModel, ctx: &JobCtx<'_>, batcher: &Batcher, key: &BatchKey) {
    let members: Vec<usize> = (0..model.batch.0.len())
        .filter(|&i| model.batch.0[i].key == *key)
        .collect();
    if members.is_empty() {
        return;
    }
    let step_started = Instant::now();
    // The step's timestep (the oldest member's; members joined later may be at other steps, listed in
    // `timesteps`).
    let timesteps: Vec<f32> = members
        .iter()
        .map(|&i| {
            let m = &model.batch.0[i];
            m.schedule
                .timesteps
                .get(m.step)
                .copied()
                .unwrap_or(f32::NAN)
        })
        .collect();
    let _span = tracing::info_span!(
        "denoise_step",
        batch = members.len(),
        timestep = timesteps[0],
        timesteps = ?timesteps
    )
    .entered();
    let all = Interrupt::all(
        &members
            .iter()
            .map(|&i| model.batch.0[i].interrupt.clone())
            .collect::<Vec<_>>(),
    );
    ctx.batch_ran(members.len());
    let velocities = interrupt::scoped(all, || velocities(model, &members));
    metrics::histogram!(m::DENOISE_STEP_SECONDS, "service" => SERVICE)
        .record(step_started.elapsed().as_secs_f64());
    let velocities = match velocities {
        Ok(v) => v,
        Err(e) => {
            let interrupted = interrupt::is_interrupted(&e);
            let msg = first_line(&e);
            for &i in members.iter().rev() {
                let kind = match model.batch.0[i].stopped() {
                    Some(kind) => kind,
                    None if interrupted => StageErrorKind::Cancelled,
                    None => StageErrorKind::Model(msg.clone()),
                };
                model.batch.end(batcher, i, Err(kind));
            }
            return;
        }
    };
    let steps_total = metrics::counter!(m::DENOISE_STEPS_TOTAL, "service" => SERVICE);
    let mut finished = Vec::new();
    for (&i, v) in members.iter().zip(&velocities) {
        let m = &mut model.batch.0[i];
        let advanced = denoise::advance(&m.latents, v, &m.schedule, m.step, m.inpaint.as_ref());
        let latents = match advanced {
            Ok(l) => l,
            Err(e) => {
                finished.push((i, Err(StageErrorKind::Model(first_line(&e)))));
                continue;
            }
        };
        let timestep = m.schedule.timesteps[m.step];
        m.latents = latents;
        m.step += 1;
        ctx.step_done();
        steps_total.increment(1);
        let (done, total) = (m.done(), m.total());
        let progress = job::progress(
            done,
            total,
            m.started,
            timestep,
            &m.latents,
            m.grid(),
            m.preview_every,
            m.checkpoint_every,
        );
        let sent = m.reply.send(DenoiseEvent {
            event: Some(Event::Progress(progress)),
        });
        if !sent {
            finished.push((i, Err(StageErrorKind::Cancelled)));
        } else if done == total {
            let answer = m
                .result()
                .unwrap_or_else(|e| Err(StageErrorKind::Model(first_line(&e))));
            finished.push((i, answer));
        }
    }
    // highest index first, so the others keep their place
    finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    for (i, answer) in finished {
        model.batch.end(batcher, i, answer);
    }
}

/// The guided velocity of each of `members` (indices in the running batch) at its current step.
fn velocities(model: &LoadedModel, members: &[usize]) -> candle_core::Result<Vec<Tensor>> {
    let batch = &model.batch.0;
    let items: Vec<BatchItem> = members
        .iter()
        .map(|&i| {
            let m = &batch[i];
            BatchItem {
                latents: &m.latents,
                t_model: m.schedule.model_timestep(m.step),
                positive: &m.positive,
                negative: m.negative.as_ref(),
                true_cfg_scale: m.true_cfg_scale,
            }
        })
        .collect();
    // one member alone takes exactly the unbatched loop's path (`predict`)
    let img_shapes = batch[members[0]].img_shapes;
    predict_batch(&model.transformer, &items, &img_shapes)
}
