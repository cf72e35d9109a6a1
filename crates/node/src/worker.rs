//! The engine thread: owns the loaded span and every session's KV cache.
//! Network tasks send it jobs that carry their own reply channel, so
//! compute never blocks the async runtime.
//!
//! Scheduling, in order of priority:
//! 1. interactive sessions' steps: every waiting decode step joins one pass
//!    over the weights, and long prefills run in chunks of about
//!    [`CHUNK_TARGET`] of compute, one chunk per pass, taking turns — so a
//!    3,000-token prompt never holds another session's next token for
//!    longer than a chunk;
//! 2. audits — recomputing another node's work — in chunks of
//!    [`AUDIT_CHUNK`] positions, only after [`AUDIT_IDLE`] without an
//!    interactive step;
//! 3. batch sessions' steps, the same way as interactive ones.
//!
//! Nothing waits for memory: a session's cache grows as it does, and a
//! step whose growth does not fit the node's KV budget is answered `Busy`
//! before anything is computed, as is a full queue.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hotpot_core::{Commitment, Credits, LayerSpan, ModelId, NodeKey, Receipt, RootBuilder, SessionId, StepRecord};
use hotpot_engine::{BatchItem, ForwardError, HiddenStates, KvCache, Span};
use hotpot_net::PeerId;
use hotpot_verify::{Sketch, SketchBuilder};
use hotpot_wire::{DType, ErrorCode, NodeMessage, Open, Priority, Step, Tensor};
use std::sync::mpsc;

use tokio::sync::oneshot;

/// What the engine thread is asked to do.
pub(crate) enum Job {
    Open {
        owner: PeerId,
        open: Open,
        reply: oneshot::Sender<NodeMessage>,
    },
    Step {
        owner: PeerId,
        step: Step,
        /// A pushed chain's step: positions from `step.pos` on are dropped
        /// first (its rollback rides on the step).
        rewind: bool,
        reply: oneshot::Sender<NodeMessage>,
    },
    Truncate {
        owner: PeerId,
        session: SessionId,
        pos: u32,
        reply: oneshot::Sender<NodeMessage>,
    },
    Close {
        owner: PeerId,
        session: SessionId,
    },
    /// The opener's receipt for a session: checked against this node's own
    /// count and commitments, countersigned when it matches.
    Receipt {
        owner: PeerId,
        receipt: Box<Receipt>,
        reply: oneshot::Sender<Result<Receipt, NodeMessage>>,
    },
    /// Recompute `span` over `inputs` on a fresh cache (an audit).
    Audit {
        span: LayerSpan,
        inputs: HiddenStates,
        reply: oneshot::Sender<NodeMessage>,
    },
    /// Drop sessions idle for longer than the configured timeout.
    Expire,
    /// Stop: every session gets `ShuttingDown`, the thread exits.
    Stop,
}

struct Session {
    owner: PeerId,
    priority: Priority,
    cache: KvCache,
    /// When the session was opened, and whether it has stepped since.
    opened: Instant,
    stepped: bool,
    last_used: Instant,
    sketches: SketchBuilder,
    /// The root of every commitment signed in the session (receipts name it).
    root: RootBuilder,
    /// The opener's receipt for the session was countersigned.
    receipted: bool,
    /// The previous decode output (the red-team's replay cheat).
    last_output: Option<Vec<f32>>,
}

/// A step accepted and not yet answered: long ones are computed a chunk
/// at a time.
struct Pending {
    step: Step,
    reply: oneshot::Sender<NodeMessage>,
    priority: Priority,
    /// The step's input, as f32 (altered first by the red-team cheat).
    input: HiddenStates,
    done: usize,
    outputs: Vec<f32>,
}

impl Pending {
    fn remaining(&self) -> usize {
        self.input.rows() - self.done
    }
}

/// Most steps run in one pass.
const MAX_BATCH: usize = 16;
/// Steps this short are decode steps: they join every pass.
const SHORT_STEP: usize = 4;
/// Compute one prefill chunk should take, about.
pub(crate) const CHUNK_TARGET: Duration = Duration::from_millis(100);
/// Bounds of a prefill chunk, in positions.
const MIN_CHUNK: usize = 16;
const MAX_CHUNK: usize = 1024;
/// Prefill work queued beyond this makes new prefills `Busy`.
pub(crate) const MAX_QUEUED_WORK: Duration = Duration::from_secs(15);

/// Counters the network side reads for heartbeats, status and admission.
#[derive(Debug, Default)]
pub(crate) struct Load {
    pub sessions: AtomicUsize,
    /// Jobs sent and not yet taken, plus steps accepted and not answered.
    pub queue: AtomicUsize,
    pub kv_bytes: AtomicUsize,
    /// Positions of accepted steps not yet computed.
    pub queued_rows: AtomicUsize,
    /// Measured compute per prefill position, in nanoseconds (0: not yet).
    pub nanos_per_row: AtomicU64,
}

impl Load {
    /// How long the steps already accepted will take to compute, about.
    pub fn queued_work(&self) -> Duration {
        let per_row = self.nanos_per_row.load(Ordering::Relaxed);
        Duration::from_nanos(per_row.saturating_mul(self.queued_rows.load(Ordering::Relaxed) as u64))
    }
}

pub(crate) struct WorkerConfig {
    pub model: ModelId,
    pub key: NodeKey,
    pub max_sessions: usize,
    pub kv_budget_bytes: usize,
    pub idle_timeout: Duration,
    /// Put output sketches in commitments.
    pub sketches: bool,
    /// Misbehave at run time (red-team tests only).
    pub cheat: RuntimeCheat,
    /// What the node asks per 1,000 positions (receipts must say it).
    pub price_per_1k: Credits,
    /// Refuse new sessions from a peer that closed this many sessions
    /// without a receipt within [`OWED_MEMORY`] (0: never refuse).
    pub max_owed_receipts: usize,
}

/// How long a session closed without a receipt counts as owed.
pub(crate) const OWED_MEMORY: Duration = Duration::from_secs(3600);

/// Run-time misbehaviour of a red-team node (weights-level cheats change
/// the span it loads instead).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum RuntimeCheat {
    #[default]
    None,
    /// Return the previous decode step's output again.
    Replay,
    /// Scale the input by `1 + ε` before computing (but sign the original).
    AlterInput(f32),
}

/// Jobs the queue holds at most; more are answered `Busy` at once.
const QUEUE: usize = 1024;
/// Positions an audit computes between two looks at the session queue.
pub(crate) const AUDIT_CHUNK: usize = 32;
/// Audits wait until no interactive session has stepped for this long.
pub(crate) const AUDIT_IDLE: Duration = Duration::from_millis(25);
/// What a refusal for lack of room suggests waiting.
const RETRY_FULL: Duration = Duration::from_millis(500);
/// How long a session may stay unused before a full node gives it up
/// for a new one (a gateway steps a session as soon as its route is open).
const UNUSED_GRACE: Duration = Duration::from_secs(5);

/// The sending side, held by network tasks.
#[derive(Clone)]
pub(crate) struct Jobs {
    tx: mpsc::SyncSender<Job>,
    load: Arc<Load>,
}

impl Jobs {
    /// Submits a job and waits for the answer; a full queue is `Busy` at once.
    pub async fn ask(&self, make: impl FnOnce(oneshot::Sender<NodeMessage>) -> Job) -> NodeMessage {
        self.request(make, |refusal| refusal).await
    }

    /// Asks the engine to check and countersign `receipt`.
    pub async fn ask_receipt(&self, owner: PeerId, receipt: Box<Receipt>) -> Result<Receipt, NodeMessage> {
        self.request(|reply| Job::Receipt { owner, receipt, reply }, Err).await
    }

    /// Submits a job and waits for its answer; a job that cannot be queued
    /// or is never answered gets `refused` of why.
    async fn request<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Job, refused: impl FnOnce(NodeMessage) -> T) -> T {
        let (tx, rx) = oneshot::channel();
        self.load.queue.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(make(tx)) {
            self.load.queue.fetch_sub(1, Ordering::Relaxed);
            return refused(match e {
                mpsc::TrySendError::Full(_) => NodeMessage::busy(Duration::from_millis(100), "the node's queue is full"),
                mpsc::TrySendError::Disconnected(_) => NodeMessage::error(ErrorCode::ShuttingDown, "the engine has stopped"),
            });
        }
        match rx.await {
            Ok(answer) => answer,
            Err(_) => refused(NodeMessage::error(ErrorCode::ShuttingDown, "the engine stopped before answering")),
        }
    }

    /// Submits a job that has no answer.
    pub fn tell(&self, job: Job) {
        self.load.queue.fetch_add(1, Ordering::Relaxed);
        if self.tx.try_send(job).is_err() {
            self.load.queue.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn load(&self) -> &Load {
        &self.load
    }
}

/// Starts the engine thread; it stops on [`Job::Stop`] or when every `Jobs`
/// handle is dropped.
pub(crate) fn spawn(span: Span, config: WorkerConfig) -> std::io::Result<(Jobs, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let load = Arc::new(Load::default());
    let worker = Worker {
        span,
        config,
        sessions: HashMap::new(),
        pending: VecDeque::new(),
        audits: VecDeque::new(),
        running: None,
        load: Arc::clone(&load),
        last_interactive: Instant::now(),
        chunk: 4 * MIN_CHUNK,
        owed: HashMap::new(),
    };
    let handle = std::thread::Builder::new().name("hotpot-engine".into()).spawn(move || worker.run(rx))?;
    Ok((Jobs { tx, load }, handle))
}

/// An audit being computed, chunk after chunk, on its own cache.
struct RunningAudit {
    inputs: HiddenStates,
    cache: KvCache,
    done: usize,
    outputs: Vec<f32>,
    reply: oneshot::Sender<NodeMessage>,
}

struct Worker {
    span: Span,
    config: WorkerConfig,
    sessions: HashMap<SessionId, Session>,
    /// Accepted steps, in arrival order (a long prefill that got a chunk
    /// goes to the back).
    pending: VecDeque<Pending>,
    audits: VecDeque<(LayerSpan, HiddenStates, oneshot::Sender<NodeMessage>)>,
    running: Option<RunningAudit>,
    load: Arc<Load>,
    /// When an interactive session last stepped: audits wait for a quiet moment.
    last_interactive: Instant,
    /// Positions of the next prefill chunk (adapted to [`CHUNK_TARGET`]).
    chunk: usize,
    /// When each peer closed a session with positions but no receipt.
    owed: HashMap<PeerId, VecDeque<Instant>>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            // Take everything waiting; sleep when there is nothing to do.
            let idle = self.pending.is_empty() && self.audits.is_empty() && self.running.is_none();
            if idle {
                match rx.recv() {
                    Ok(job) => {
                        if !self.accept(job) {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(job) => {
                        if !self.accept(job) {
                            return;
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) if self.pending.is_empty() => {
                        tracing::debug!("engine thread stopped");
                        return;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            }
            if self.has_steps(Priority::Interactive) {
                self.pass(Priority::Interactive);
                self.last_interactive = Instant::now();
                continue;
            }
            if self.running.is_some() || !self.audits.is_empty() {
                let quiet = self.last_interactive.elapsed();
                if quiet < AUDIT_IDLE {
                    match rx.recv_timeout(AUDIT_IDLE - quiet) {
                        Ok(job) => {
                            if !self.accept(job) {
                                return;
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    continue;
                }
                self.audit_step();
                continue;
            }
            if self.has_steps(Priority::Batch) {
                self.pass(Priority::Batch);
            }
        }
        tracing::debug!("engine thread stopped");
    }

    fn has_steps(&self, priority: Priority) -> bool {
        self.pending.iter().any(|p| p.priority == priority)
    }

    /// Takes one job off the queue: cheap ones are done at once, steps and
    /// audits are queued. False on `Stop`.
    fn accept(&mut self, job: Job) -> bool {
        self.load.queue.fetch_sub(1, Ordering::Relaxed);
        match job {
            Job::Open { owner, open, reply } => {
                let _ = reply.send(self.open(owner, open));
            }
            Job::Step { owner, step, rewind, reply } => {
                let busy = self.pending.iter().any(|p| p.step.session == step.session);
                if rewind
                    && !busy
                    && let Some(s) = self.sessions.get_mut(&step.session)
                    && s.owner == owner
                    && (step.pos as usize) < s.cache.len()
                {
                    s.cache.truncate(step.pos as usize);
                    s.sketches.truncate(step.pos);
                }
                self.admit(owner, step, reply);
            }
            Job::Truncate { owner, session, pos, reply } => {
                let _ = reply.send(self.truncate(owner, session, pos));
            }
            Job::Close { owner, session } => {
                if self.sessions.get(&session).is_some_and(|s| s.owner == owner) {
                    self.remove(session);
                }
            }
            Job::Receipt { owner, receipt, reply } => {
                let _ = reply.send(self.countersign(owner, *receipt));
            }
            Job::Audit { span, inputs, reply } => self.audits.push_back((span, inputs, reply)),
            Job::Expire => self.expire(),
            Job::Stop => {
                self.stop();
                return false;
            }
        }
        self.publish();
        true
    }

    fn publish(&self) {
        self.load.sessions.store(self.sessions.len(), Ordering::Relaxed);
        self.load.kv_bytes.store(self.kv_bytes(), Ordering::Relaxed);
        self.load.queued_rows.store(self.pending.iter().map(Pending::remaining).sum(), Ordering::Relaxed);
    }

    fn kv_bytes(&self) -> usize {
        self.sessions.values().map(|s| s.cache.memory_bytes()).sum()
    }

    /// Checks a step and queues it, growing its session's cache for it
    /// first; answers at once when it cannot be done or does not fit.
    fn admit(&mut self, owner: PeerId, step: Step, reply: oneshot::Sender<NodeMessage>) {
        let dim = self.span.config().dim;
        let in_use = self.kv_bytes();
        let budget = self.config.kv_budget_bytes;
        let refusal = match self.sessions.get_mut(&step.session) {
            None => Some(NodeMessage::error(ErrorCode::UnknownSession, "no such session (it may have expired)")),
            Some(s) if s.owner != owner => Some(NodeMessage::error(ErrorCode::NotYourSession, "this session belongs to another peer")),
            Some(_) if step.hidden.cols() != dim => {
                Some(NodeMessage::error(ErrorCode::BadTensor, format!("hidden states must be {dim} wide, got {}", step.hidden.cols())))
            }
            Some(_) if self.pending.iter().any(|p| p.step.session == step.session) => {
                Some(NodeMessage::error(ErrorCode::BadRequest, "this session already has a step in progress"))
            }
            Some(s) => {
                let needed = (step.pos as usize + step.hidden.rows()).min(s.cache.max_len());
                let growth = s.cache.memory_bytes_for(needed) - s.cache.memory_bytes();
                if growth > 0 && in_use + growth > budget {
                    Some(NodeMessage::busy(RETRY_FULL, "not enough KV-cache memory for this step right now"))
                } else {
                    s.cache.reserve(needed);
                    s.last_used = Instant::now();
                    s.stepped = true;
                    None
                }
            }
        };
        if let Some(refusal) = refusal {
            let _ = reply.send(refusal);
            return;
        }
        let priority = self.sessions.get(&step.session).map_or_else(Priority::default, |s| s.priority);
        let mut values = step.hidden.to_f32();
        if let RuntimeCheat::AlterInput(eps) = self.config.cheat {
            values.iter_mut().for_each(|v| *v *= 1.0 + eps);
        }
        match HiddenStates::new(step.hidden.rows(), dim, values) {
            Ok(input) => {
                let outputs = Vec::with_capacity(input.as_slice().len());
                self.pending.push_back(Pending { step, reply, priority, input, done: 0, outputs });
            }
            Err(e) => {
                let _ = reply.send(NodeMessage::error(ErrorCode::BadTensor, e.to_string()));
            }
        }
    }

    /// One pass over the weights for steps of `class`: every waiting decode
    /// step, and one chunk of the longest-waiting prefill (more prefills
    /// share the chunk when it has room).
    fn pass(&mut self, class: Priority) {
        // Steps whose asker gave up are dropped.
        self.pending.retain(|p| !p.reply.is_closed());
        let mut chosen: Vec<(usize, usize)> = Vec::new();
        for (i, p) in self.pending.iter().enumerate() {
            if p.priority == class && p.remaining() <= SHORT_STEP && chosen.len() < MAX_BATCH {
                chosen.push((i, p.remaining()));
            }
        }
        let mut room = self.chunk;
        for (i, p) in self.pending.iter().enumerate() {
            if p.priority != class || p.remaining() <= SHORT_STEP || chosen.len() >= MAX_BATCH || room == 0 {
                continue;
            }
            let rows = p.remaining().min(room);
            chosen.push((i, rows));
            room -= rows;
        }
        if chosen.is_empty() {
            return;
        }
        let prefill_rows: usize = chosen.iter().filter(|&&(i, _)| self.pending[i].remaining() > SHORT_STEP).map(|&(_, rows)| rows).sum();
        let started = Instant::now();
        self.compute(&chosen);
        if prefill_rows >= MIN_CHUNK {
            let total: usize = chosen.iter().map(|&(_, rows)| rows).sum();
            self.adapt_chunk(started.elapsed(), total);
        }
        // Answer what is finished; a prefill that got a chunk goes to the back.
        let mut finished = Vec::new();
        let mut rotated = Vec::new();
        let mut chosen_ids: Vec<usize> = chosen.iter().map(|&(i, _)| i).collect();
        chosen_ids.sort_unstable();
        for &i in chosen_ids.iter().rev() {
            let p = self.pending.remove(i).expect("chosen from the queue");
            if p.remaining() == 0 || p.reply.is_closed() {
                finished.push(p);
            } else {
                rotated.push(p);
            }
        }
        for p in rotated.into_iter().rev() {
            self.pending.push_back(p);
        }
        for p in finished.into_iter().rev() {
            self.finish(p);
        }
        self.publish();
    }

    /// Runs `rows` more positions of each chosen step, sessions over the
    /// same blocks together. A step that fails is answered at once.
    fn compute(&mut self, chosen: &[(usize, usize)]) {
        let dim = self.span.config().dim;
        // Take each session out of the map while it computes.
        let mut work: Vec<(usize, Session, HiddenStates)> = Vec::with_capacity(chosen.len());
        for &(i, rows) in chosen {
            let p = &self.pending[i];
            let Some(session) = self.sessions.remove(&p.step.session) else {
                self.fail(i, NodeMessage::error(ErrorCode::UnknownSession, "the session was closed"));
                continue;
            };
            let slice = &p.input.as_slice()[p.done * dim..(p.done + rows) * dim];
            match HiddenStates::new(rows, dim, slice.to_vec()) {
                Ok(chunk) => work.push((i, session, chunk)),
                Err(e) => {
                    self.sessions.insert(p.step.session, session);
                    self.fail(i, NodeMessage::error(ErrorCode::BadTensor, e.to_string()));
                }
            }
        }
        let mut spans: Vec<LayerSpan> = work.iter().map(|(_, s, _)| s.cache.span()).collect();
        spans.sort();
        spans.dedup();
        let mut results: Vec<Option<Result<HiddenStates, ForwardError>>> = (0..work.len()).map(|_| None).collect();
        for span in spans {
            let members: Vec<usize> = (0..work.len()).filter(|&k| work[k].1.cache.span() == span).collect();
            let starts: Vec<usize> = members.iter().map(|&k| self.pending[work[k].0].step.pos as usize + self.pending[work[k].0].done).collect();
            let mut items: Vec<BatchItem<'_>> = work
                .iter_mut()
                .enumerate()
                .filter(|(k, _)| members.contains(k))
                .zip(&starts)
                .map(|((_, (_, session, chunk)), &start_pos)| BatchItem { cache: &mut session.cache, hidden: &*chunk, start_pos })
                .collect();
            let outputs = self.span.forward_batch(&mut items);
            drop(items);
            for (&k, output) in members.iter().zip(outputs) {
                results[k] = Some(output);
            }
        }
        for ((i, session, chunk), result) in work.into_iter().zip(results) {
            let id = self.pending[i].step.session;
            self.sessions.insert(id, session);
            match result.unwrap_or(Err(ForwardError::Empty)) {
                Ok(out) => {
                    let p = &mut self.pending[i];
                    p.outputs.extend_from_slice(out.as_slice());
                    p.done += chunk.rows();
                }
                Err(e) => {
                    let code = match e {
                        ForwardError::Position { .. } => ErrorCode::BadPosition,
                        ForwardError::ContextFull { .. } => ErrorCode::ContextFull,
                        ForwardError::Width { .. } | ForwardError::NotFinite | ForwardError::Empty => ErrorCode::BadTensor,
                        _ => ErrorCode::BadRequest,
                    };
                    self.fail(i, NodeMessage::error(code, e.to_string()));
                }
            }
        }
    }

    /// Answers step `i` with `answer` now; the step stays in the queue,
    /// finished, until the pass ends.
    fn fail(&mut self, i: usize, answer: NodeMessage) {
        let p = &mut self.pending[i];
        let reply = std::mem::replace(&mut p.reply, oneshot::channel().0);
        let _ = reply.send(answer);
        p.done = p.input.rows();
        p.outputs.clear();
    }

    /// Keeps the next chunk near [`CHUNK_TARGET`] of compute.
    fn adapt_chunk(&mut self, took: Duration, rows: usize) {
        let per_row = took.as_nanos() as u64 / rows.max(1) as u64;
        let previous = self.load.nanos_per_row.load(Ordering::Relaxed);
        let smoothed = if previous == 0 { per_row } else { (previous * 3 + per_row) / 4 };
        self.load.nanos_per_row.store(smoothed.max(1), Ordering::Relaxed);
        let rows = (CHUNK_TARGET.as_nanos() as u64 / smoothed.max(1)) as usize;
        self.chunk = (rows / MIN_CHUNK * MIN_CHUNK).clamp(MIN_CHUNK, MAX_CHUNK);
    }

    /// Answers a step whose every position is computed.
    fn finish(&mut self, p: Pending) {
        if p.reply.is_closed() || p.outputs.len() != p.input.as_slice().len() {
            return; // answered already (an error), or nobody is listening
        }
        let Some(mut session) = self.sessions.remove(&p.step.session) else {
            let _ = p.reply.send(NodeMessage::error(ErrorCode::UnknownSession, "the session was closed"));
            return;
        };
        let answer = match HiddenStates::new(p.input.rows(), p.input.dim(), p.outputs) {
            Ok(output) => self.output(&p.step, &mut session, output),
            Err(e) => NodeMessage::error(ErrorCode::Internal, e.to_string()),
        };
        session.last_used = Instant::now();
        self.sessions.insert(p.step.session, session);
        let _ = p.reply.send(answer);
    }

    /// Answers everything still waiting with `ShuttingDown` and drops every session.
    fn stop(&mut self) {
        let gone = || NodeMessage::error(ErrorCode::ShuttingDown, "the node is shutting down");
        for p in self.pending.drain(..) {
            let _ = p.reply.send(gone());
        }
        for (_, _, reply) in self.audits.drain(..) {
            let _ = reply.send(gone());
        }
        if let Some(audit) = self.running.take() {
            let _ = audit.reply.send(gone());
        }
        self.sessions.clear();
        self.publish();
        tracing::info!("engine thread stopped");
    }

    fn remove(&mut self, session: SessionId) {
        if let Some(s) = self.sessions.remove(&session) {
            tracing::debug!(%session, "session closed");
            if !s.cache.is_empty() && !s.receipted {
                self.owed.entry(s.owner).or_default().push_back(Instant::now());
            }
        }
    }

    /// Sessions `peer` closed without a receipt lately.
    fn owed_by(&mut self, peer: PeerId) -> usize {
        let Some(owed) = self.owed.get_mut(&peer) else { return 0 };
        while owed.front().is_some_and(|t| t.elapsed() > OWED_MEMORY) {
            owed.pop_front();
        }
        let n = owed.len();
        if n == 0 {
            self.owed.remove(&peer);
        }
        n
    }

    /// Checks the opener's receipt against the session as this node ran
    /// it and countersigns it.
    fn countersign(&mut self, owner: PeerId, mut receipt: Receipt) -> Result<Receipt, NodeMessage> {
        let bad = |why: String| NodeMessage::error(ErrorCode::BadReceipt, why);
        let Some(s) = self.sessions.get_mut(&receipt.session) else {
            return Err(NodeMessage::error(ErrorCode::UnknownSession, "no such session"));
        };
        if s.owner != owner {
            return Err(NodeMessage::error(ErrorCode::NotYourSession, "this session belongs to another peer"));
        }
        receipt.check().map_err(|e| bad(e.to_string()))?;
        if hotpot_net::peer_id_of(&receipt.gateway) != Some(owner) {
            return Err(bad("the receipt is signed by another key than the session's opener".into()));
        }
        let checks = [
            (receipt.node == self.config.key.id(), "names another node".to_string()),
            (receipt.model == self.config.model, "names another model".to_string()),
            (receipt.span == s.cache.span(), format!("names blocks {}, the session ran {}", receipt.span, s.cache.span())),
            (receipt.positions == s.cache.len() as u64, format!("counts {} positions, the session holds {}", receipt.positions, s.cache.len())),
            (
                receipt.price_per_1k == self.config.price_per_1k,
                format!("prices {} per 1,000, this node asks {}", receipt.price_per_1k, self.config.price_per_1k),
            ),
            (receipt.commitments_root == s.root.finish(), "names other commitments than this node signed".to_string()),
        ];
        if let Some((_, why)) = checks.into_iter().find(|(ok, _)| !ok) {
            return Err(bad(format!("the receipt {why}")));
        }
        receipt.countersign(&self.config.key);
        s.receipted = true;
        Ok(receipt)
    }

    fn open(&mut self, owner: PeerId, open: Open) -> NodeMessage {
        if open.model != self.config.model {
            return NodeMessage::error(ErrorCode::WrongModel, format!("this node serves {}, not {}", self.config.model, open.model));
        }
        if self.sessions.contains_key(&open.session) {
            return NodeMessage::error(ErrorCode::BadRequest, "a session with this id is already open");
        }
        let owed = self.owed_by(owner);
        if self.config.max_owed_receipts > 0 && owed >= self.config.max_owed_receipts {
            return NodeMessage::error(
                ErrorCode::ReceiptsOwed,
                format!("you closed {owed} sessions on this node without a receipt; it takes no new ones from you"),
            );
        }
        let max_len = (open.max_len as usize).clamp(1, self.span.config().context_length);
        let cache = match self.span.cache_for(open.span, max_len) {
            Ok(cache) => cache,
            Err(_) => {
                return NodeMessage::error(ErrorCode::SpanNotServed, format!("this node serves blocks {}, not {}", self.span.span(), open.span));
            }
        };
        // Slots cannot be hoarded by opening sessions and never using them:
        // a full node gives a newcomer the oldest session that was opened
        // and never stepped within a grace period, taken from the peer
        // holding the most sessions, unless the newcomer already holds its
        // fair share (the slots divided among the peers holding them).
        if self.sessions.len() >= self.config.max_sessions {
            let mut held: HashMap<PeerId, usize> = HashMap::new();
            for s in self.sessions.values() {
                *held.entry(s.owner).or_default() += 1;
            }
            let mine = held.get(&owner).copied().unwrap_or(0);
            let peers = held.len() + usize::from(mine == 0);
            let fair = (self.config.max_sessions / peers).max(1);
            let grace = UNUSED_GRACE.min(self.config.idle_timeout / 3);
            let stale = (mine < fair)
                .then(|| {
                    self.sessions
                        .iter()
                        .filter(|(id, s)| !s.stepped && s.opened.elapsed() > grace && !self.pending.iter().any(|p| p.step.session == **id))
                        .max_by_key(|(_, s)| (held.get(&s.owner).copied().unwrap_or(0), std::cmp::Reverse(s.opened)))
                        .map(|(id, _)| *id)
                })
                .flatten();
            match stale {
                Some(id) => {
                    tracing::debug!(session = %id, "giving up a session that was opened and never used for a new one");
                    self.sessions.remove(&id);
                }
                None => return NodeMessage::busy(RETRY_FULL, format!("all {} session slots are taken", self.config.max_sessions)),
            }
        }
        // Batch sessions leave a quarter of the slots to interactive ones.
        let batch_slots = self.config.max_sessions - self.config.max_sessions / 4;
        if open.priority == Priority::Batch && self.sessions.values().filter(|s| s.priority == Priority::Batch).count() >= batch_slots {
            return NodeMessage::busy(RETRY_FULL, format!("batch sessions may take {batch_slots} of the {} session slots", self.config.max_sessions));
        }
        // The cache grows with the session; opening needs room for its first chunk.
        if self.kv_bytes() + cache.memory_bytes_for(1) > self.config.kv_budget_bytes {
            return NodeMessage::busy(RETRY_FULL, "the node's KV-cache memory is in use");
        }
        let now = Instant::now();
        let session = Session {
            owner,
            priority: open.priority,
            cache,
            opened: now,
            stepped: false,
            last_used: now,
            sketches: SketchBuilder::default(),
            root: RootBuilder::default(),
            receipted: false,
            last_output: None,
        };
        self.sessions.insert(open.session, session);
        tracing::debug!(session = %open.session, span = %open.span, max_len, priority = ?open.priority, "session opened");
        NodeMessage::Opened { session: open.session, max_len: max_len as u32 }
    }

    /// The answer to a computed step, with its signed commitment.
    fn output(&self, step: &Step, session: &mut Session, output: HiddenStates) -> NodeMessage {
        let (rows, dim) = (output.rows(), output.dim());
        let mut values = output.into_vec();
        if self.config.cheat == RuntimeCheat::Replay && rows == 1 {
            let previous = session.last_output.replace(values.clone());
            if let Some(previous) = previous {
                values = previous;
            }
        }
        let sketches =
            if self.config.sketches { session.sketches.push(step.pos, rows as u32, &values).iter().map(Sketch::to_bytes).collect() } else { Vec::new() };
        let out = Tensor::from_f32(DType::F32, rows, dim, &values);
        let commitment = Commitment::sign(
            &self.config.key,
            StepRecord {
                session: step.session,
                model: self.config.model,
                span: session.cache.span(),
                start_pos: step.pos,
                rows: rows as u32,
                input: step.hidden.bytes(),
                output: out.bytes(),
            },
            sketches,
        );
        session.root.add(&commitment.signature);
        NodeMessage::Output { session: step.session, hidden: out, commitment: Box::new(commitment) }
    }

    /// The next chunk of the running audit, starting the next one when
    /// none runs.
    fn audit_step(&mut self) {
        if self.running.is_none()
            && let Some((span, inputs, reply)) = self.audits.pop_front()
        {
            self.running = self.start_audit(span, inputs, reply);
        }
        if let Some(mut audit) = self.running.take()
            && self.audit_chunk(&mut audit)
        {
            self.running = Some(audit);
        }
    }

    /// Begins recomputing `span` over `inputs` on a fresh cache (an audit),
    /// or answers at once when it cannot be done.
    fn start_audit(&self, span: LayerSpan, inputs: HiddenStates, reply: oneshot::Sender<NodeMessage>) -> Option<RunningAudit> {
        match self.span.cache_for(span, inputs.rows()) {
            Ok(cache) => Some(RunningAudit { outputs: Vec::with_capacity(inputs.as_slice().len()), inputs, cache, done: 0, reply }),
            Err(_) => {
                let _ = reply.send(NodeMessage::error(ErrorCode::SpanNotServed, format!("this node serves blocks {}, not {span}", self.span.span())));
                None
            }
        }
    }

    /// Computes the audit's next positions (the kernels give the same bits
    /// in chunks as in one prefill). False when it is finished and answered.
    fn audit_chunk(&self, audit: &mut RunningAudit) -> bool {
        if audit.reply.is_closed() {
            return false; // the auditor gave up
        }
        let (rows, dim) = (audit.inputs.rows(), audit.inputs.dim());
        let end = (audit.done + AUDIT_CHUNK).min(rows);
        let chunk = HiddenStates::new(end - audit.done, dim, audit.inputs.as_slice()[audit.done * dim..end * dim].to_vec());
        let result = chunk.and_then(|chunk| self.span.forward(&mut audit.cache, &chunk, audit.done));
        match result {
            Ok(out) => audit.outputs.extend_from_slice(out.as_slice()),
            Err(e) => {
                let reply = std::mem::replace(&mut audit.reply, oneshot::channel().0);
                let _ = reply.send(NodeMessage::error(ErrorCode::BadRequest, e.to_string()));
                return false;
            }
        }
        audit.done = end;
        if end < rows {
            return true;
        }
        let reply = std::mem::replace(&mut audit.reply, oneshot::channel().0);
        let _ = reply.send(NodeMessage::Audited { outputs: Tensor::from_f32(DType::F32, rows, dim, &audit.outputs) });
        false
    }

    fn truncate(&mut self, owner: PeerId, session: SessionId, pos: u32) -> NodeMessage {
        match self.sessions.get_mut(&session) {
            None => NodeMessage::error(ErrorCode::UnknownSession, "no such session"),
            Some(s) if s.owner != owner => NodeMessage::error(ErrorCode::NotYourSession, "this session belongs to another peer"),
            Some(s) => {
                // A rollback is not use: a session kept alive only by
                // cheap `Truncate`s still expires.
                s.cache.truncate(pos as usize);
                s.sketches.truncate(pos);
                NodeMessage::Truncated { session, len: s.cache.len() as u32 }
            }
        }
    }

    fn expire(&mut self) {
        let idle = self.config.idle_timeout;
        let busy: Vec<SessionId> = self.pending.iter().map(|p| p.step.session).collect();
        let stale: Vec<SessionId> = self.sessions.iter().filter(|(id, s)| s.last_used.elapsed() > idle && !busy.contains(id)).map(|(id, _)| *id).collect();
        for id in stale {
            tracing::info!(session = %id, "session idle for {idle:?}: freeing its cache");
            self.remove(id);
        }
    }
}
