//! The engine thread: owns the loaded span and every session's KV cache,
//! and runs one request at a time. Network tasks send it jobs that carry
//! their own reply channel, so compute never blocks the async runtime.
//!
//! Work has priorities: interactive sessions' steps come first (several
//! sessions' steps share one pass over the weights); audits — recomputing
//! another node's work — run in chunks of [`AUDIT_CHUNK`] positions, only
//! while no session has stepped for [`AUDIT_IDLE`], so a flood of them
//! cannot slow a session down. A full queue answers `Busy` at once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hotpot_core::{Commitment, LayerSpan, ModelId, NodeKey, SessionId, StepRecord};
use hotpot_engine::{BatchItem, ForwardError, HiddenStates, KvCache, Span};
use hotpot_net::PeerId;
use hotpot_verify::{Sketch, SketchBuilder};
use hotpot_wire::{DType, ErrorCode, NodeMessage, Open, Step, Tensor};
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
    cache: KvCache,
    reserved_bytes: usize,
    last_used: Instant,
    sketches: SketchBuilder,
    /// The previous decode output (the red-team's replay cheat).
    last_output: Option<Vec<f32>>,
}

/// Most steps run in one batch.
const MAX_BATCH: usize = 16;

/// Counters the network side reads for heartbeats and status.
#[derive(Debug, Default)]
pub(crate) struct Load {
    pub sessions: AtomicUsize,
    pub queue: AtomicUsize,
    pub kv_bytes: AtomicUsize,
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
}

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
/// Audits wait until no session has stepped for this long.
pub(crate) const AUDIT_IDLE: Duration = Duration::from_millis(25);

/// The sending side, held by network tasks.
#[derive(Clone)]
pub(crate) struct Jobs {
    tx: mpsc::SyncSender<Job>,
    load: Arc<Load>,
}

impl Jobs {
    /// Submits a job and waits for the answer; a full queue is `Busy` at once.
    pub async fn ask(&self, make: impl FnOnce(oneshot::Sender<NodeMessage>) -> Job) -> NodeMessage {
        let (tx, rx) = oneshot::channel();
        self.load.queue.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(make(tx)) {
            self.load.queue.fetch_sub(1, Ordering::Relaxed);
            return match e {
                mpsc::TrySendError::Full(_) => NodeMessage::error(ErrorCode::Busy, "the node's queue is full; try again shortly"),
                mpsc::TrySendError::Disconnected(_) => NodeMessage::error(ErrorCode::ShuttingDown, "the engine has stopped"),
            };
        }
        rx.await.unwrap_or_else(|_| NodeMessage::error(ErrorCode::ShuttingDown, "the engine stopped before answering"))
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
    let worker = Worker { span, config, sessions: HashMap::new(), load: Arc::clone(&load), last_step: Instant::now() };
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
    load: Arc<Load>,
    /// When a session last stepped: audits wait for a quiet moment.
    last_step: Instant,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut interactive: VecDeque<Job> = VecDeque::new();
        let mut audits: VecDeque<Job> = VecDeque::new();
        let mut running: Option<RunningAudit> = None;
        'serve: loop {
            // Take everything waiting, by priority.
            loop {
                let next = if interactive.is_empty() && audits.is_empty() && running.is_none() {
                    match rx.recv() {
                        Ok(job) => Some(job),
                        Err(_) => break 'serve,
                    }
                } else {
                    match rx.try_recv() {
                        Ok(job) => Some(job),
                        Err(mpsc::TryRecvError::Empty) => None,
                        Err(mpsc::TryRecvError::Disconnected) if interactive.is_empty() => break 'serve,
                        Err(mpsc::TryRecvError::Disconnected) => None,
                    }
                };
                let Some(job) = next else { break };
                self.load.queue.fetch_sub(1, Ordering::Relaxed);
                match job {
                    Job::Stop => {
                        self.stop(interactive, audits, running);
                        return;
                    }
                    Job::Audit { .. } => audits.push_back(job),
                    other => interactive.push_back(other),
                }
            }
            if let Some(job) = interactive.pop_front() {
                self.interactive(job, &mut interactive);
                self.load.sessions.store(self.sessions.len(), Ordering::Relaxed);
                continue;
            }
            // Only background work is left: audits, in a quiet moment.
            let quiet = self.last_step.elapsed();
            if quiet < AUDIT_IDLE {
                match rx.recv_timeout(AUDIT_IDLE - quiet) {
                    Ok(job) => {
                        self.load.queue.fetch_sub(1, Ordering::Relaxed);
                        match job {
                            Job::Stop => {
                                self.stop(interactive, audits, running);
                                return;
                            }
                            Job::Audit { .. } => audits.push_back(job),
                            other => interactive.push_back(other),
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break 'serve,
                }
                continue;
            }
            if running.is_none()
                && let Some(Job::Audit { span, inputs, reply }) = audits.pop_front()
            {
                running = self.start_audit(span, inputs, reply);
            }
            if let Some(mut audit) = running.take()
                && self.audit_chunk(&mut audit)
            {
                running = Some(audit);
            }
        }
        tracing::debug!("engine thread stopped");
    }

    /// One interactive job; steps waiting behind it join its batch.
    fn interactive(&mut self, job: Job, queue: &mut VecDeque<Job>) {
        match job {
            Job::Open { owner, open, reply } => {
                let _ = reply.send(self.open(owner, open));
            }
            Job::Step { owner, step, reply } => {
                // Every step already waiting joins this one: one pass over
                // the weights serves all of their sessions.
                let mut batch = vec![(owner, step, reply)];
                let mut rest = VecDeque::with_capacity(queue.len());
                while let Some(job) = queue.pop_front() {
                    match job {
                        Job::Step { owner, step, reply } if batch.len() < MAX_BATCH && !batch.iter().any(|(_, s, _)| s.session == step.session) => {
                            batch.push((owner, step, reply));
                        }
                        other => rest.push_back(other),
                    }
                }
                *queue = rest;
                self.steps(batch);
                self.last_step = Instant::now();
            }
            Job::Truncate { owner, session, pos, reply } => {
                let _ = reply.send(self.truncate(owner, session, pos));
            }
            Job::Close { owner, session } => {
                if self.sessions.get(&session).is_some_and(|s| s.owner == owner) {
                    self.remove(session);
                }
            }
            Job::Expire => self.expire(),
            Job::Audit { .. } | Job::Stop => unreachable!("sorted out by the caller"),
        }
    }

    /// Answers everything still waiting with `ShuttingDown` and drops every session.
    fn stop(&mut self, interactive: VecDeque<Job>, audits: VecDeque<Job>, running: Option<RunningAudit>) {
        let gone = || NodeMessage::error(ErrorCode::ShuttingDown, "the node is shutting down");
        for job in interactive.into_iter().chain(audits) {
            match job {
                Job::Open { reply, .. } | Job::Step { reply, .. } | Job::Truncate { reply, .. } | Job::Audit { reply, .. } => {
                    let _ = reply.send(gone());
                }
                _ => {}
            }
        }
        if let Some(audit) = running {
            let _ = audit.reply.send(gone());
        }
        let sessions: Vec<SessionId> = self.sessions.keys().copied().collect();
        for session in sessions {
            self.remove(session);
        }
        self.load.sessions.store(0, Ordering::Relaxed);
        tracing::info!("engine thread stopped");
    }

    fn reserved(&self) -> usize {
        self.sessions.values().map(|s| s.reserved_bytes).sum()
    }

    fn remove(&mut self, session: SessionId) {
        if let Some(s) = self.sessions.remove(&session) {
            self.load.kv_bytes.fetch_sub(s.cache.memory_bytes().min(self.load.kv_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
            tracing::debug!(%session, "session closed");
        }
    }

    fn open(&mut self, owner: PeerId, open: Open) -> NodeMessage {
        if open.model != self.config.model {
            return NodeMessage::error(ErrorCode::WrongModel, format!("this node serves {}, not {}", self.config.model, open.model));
        }
        if self.sessions.contains_key(&open.session) {
            return NodeMessage::error(ErrorCode::BadRequest, "a session with this id is already open");
        }
        if self.sessions.len() >= self.config.max_sessions {
            return NodeMessage::error(ErrorCode::Busy, format!("all {} session slots are taken", self.config.max_sessions));
        }
        let max_len = (open.max_len as usize).clamp(1, self.span.config().context_length);
        let cache = match self.span.cache_for(open.span, max_len) {
            Ok(cache) => cache,
            Err(_) => {
                return NodeMessage::error(ErrorCode::SpanNotServed, format!("this node serves blocks {}, not {}", self.span.span(), open.span));
            }
        };
        let reserved_bytes = max_len * self.span.cache_bytes_per_position(open.span);
        if self.reserved() + reserved_bytes > self.config.kv_budget_bytes {
            return NodeMessage::error(ErrorCode::Busy, "not enough KV-cache memory for a session this long");
        }
        let session = Session { owner, cache, reserved_bytes, last_used: Instant::now(), sketches: SketchBuilder::default(), last_output: None };
        self.sessions.insert(open.session, session);
        tracing::debug!(session = %open.session, span = %open.span, max_len, "session opened");
        NodeMessage::Opened { session: open.session, max_len: max_len as u32 }
    }

    /// Runs a batch of steps from different sessions and answers each.
    fn steps(&mut self, batch: Vec<(PeerId, Step, oneshot::Sender<NodeMessage>)>) {
        let dim = self.span.config().dim;
        // Check each step and take its session out of the map while it runs.
        let mut ready: Vec<(Step, oneshot::Sender<NodeMessage>, Session, HiddenStates)> = Vec::with_capacity(batch.len());
        for (owner, step, reply) in batch {
            let problem = match self.sessions.get(&step.session) {
                None => Some(NodeMessage::error(ErrorCode::UnknownSession, "no such session (it may have expired)")),
                Some(s) if s.owner != owner => Some(NodeMessage::error(ErrorCode::NotYourSession, "this session belongs to another peer")),
                Some(_) if step.hidden.cols() != dim => {
                    Some(NodeMessage::error(ErrorCode::BadTensor, format!("hidden states must be {dim} wide, got {}", step.hidden.cols())))
                }
                Some(_) => None,
            };
            if let Some(problem) = problem {
                let _ = reply.send(problem);
                continue;
            }
            let mut values = step.hidden.to_f32();
            if let RuntimeCheat::AlterInput(eps) = self.config.cheat {
                values.iter_mut().for_each(|v| *v *= 1.0 + eps);
            }
            let hidden = match HiddenStates::new(step.hidden.rows(), dim, values) {
                Ok(h) => h,
                Err(e) => {
                    let _ = reply.send(NodeMessage::error(ErrorCode::BadTensor, e.to_string()));
                    continue;
                }
            };
            let mut session = self.sessions.remove(&step.session).expect("checked above");
            session.last_used = Instant::now();
            ready.push((step, reply, session, hidden));
        }
        // Sessions over the same blocks run together.
        let mut spans: Vec<_> = ready.iter().map(|(_, _, s, _)| s.cache.span()).collect();
        spans.sort();
        spans.dedup();
        let mut outputs: Vec<Option<Result<HiddenStates, ForwardError>>> = (0..ready.len()).map(|_| None).collect();
        for span in spans {
            let members: Vec<usize> = (0..ready.len()).filter(|&i| ready[i].2.cache.span() == span).collect();
            let before: usize = members.iter().map(|&i| ready[i].2.cache.memory_bytes()).sum();
            let mut items: Vec<BatchItem<'_>> = ready
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| members.contains(i))
                .map(|(_, (step, _, session, hidden))| BatchItem { cache: &mut session.cache, hidden: &*hidden, start_pos: step.pos as usize })
                .collect();
            let results = self.span.forward_batch(&mut items);
            drop(items);
            for (&i, result) in members.iter().zip(results) {
                outputs[i] = Some(result);
            }
            let after: usize = members.iter().map(|&i| ready[i].2.cache.memory_bytes()).sum();
            self.load.kv_bytes.fetch_add(after.saturating_sub(before), Ordering::Relaxed);
        }
        for ((step, reply, mut session, _), output) in ready.into_iter().zip(outputs) {
            let answer = match output.unwrap_or(Err(ForwardError::Empty)) {
                Ok(output) => self.output(&step, &mut session, output),
                Err(e) => {
                    let code = match e {
                        ForwardError::Position { .. } => ErrorCode::BadPosition,
                        ForwardError::ContextFull { .. } => ErrorCode::ContextFull,
                        ForwardError::Width { .. } | ForwardError::NotFinite | ForwardError::Empty => ErrorCode::BadTensor,
                        _ => ErrorCode::BadRequest,
                    };
                    NodeMessage::error(code, e.to_string())
                }
            };
            self.sessions.insert(step.session, session);
            let _ = reply.send(answer);
        }
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
        NodeMessage::Output { session: step.session, hidden: out, commitment: Box::new(commitment) }
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
                s.cache.truncate(pos as usize);
                s.last_used = Instant::now();
                NodeMessage::Truncated { session, len: s.cache.len() as u32 }
            }
        }
    }

    fn expire(&mut self) {
        let idle = self.config.idle_timeout;
        let stale: Vec<SessionId> = self.sessions.iter().filter(|(_, s)| s.last_used.elapsed() > idle).map(|(id, _)| *id).collect();
        for id in stale {
            tracing::info!(session = %id, "session idle for {idle:?}: freeing its cache");
            self.remove(id);
        }
    }
}
