//! A session's pipeline over remote nodes, with failover.
//!
//! The chain keeps, for every stage, the hidden states it fed that stage
//! (its history). When a node dies, refuses, stalls past the step deadline
//! or sends a commitment that does not verify, the chain bans it, plans a
//! new route for that stage's blocks (one node or several), replays the
//! history into the new sessions to rebuild their caches, and retries the
//! step. Because every node computes bit-identically, the replayed outputs
//! must equal what the next stage already received; the chain checks that.
//!
//! `Busy` is load, not failure: it never bans. A node that answers `Busy`
//! (or is slow to answer an `Open`) is skipped until its retry hint
//! passes; when every node that could serve is busy, the chain waits for a
//! session to close or a hint to pass, up to `queue_timeout`, and then
//! reports [`ChainError::Busy`] with how long to wait.

use std::sync::Arc;
use std::time::Duration;

use hotpot_core::{Commitment, LayerSpan, ModelId, NodeId, Receipt, SessionId, StepRecord};
use hotpot_engine::{ForwardError, HiddenStates};
use hotpot_net::{Framed, Network, PeerId, node_id_of};
use hotpot_wire::{ClientMessage, DType, Downstream, ErrorCode, NodeInfo, NodeMessage, Open, PROTOCOL_INFER, Priority, PushLinks, Step, Tensor, features};
use tokio::time::Instant;

/// Hidden states travel as f32: exactly the bytes nodes sign and audits
/// recompute from.
const WIRE_DTYPE: DType = DType::F32;

use crate::directory::SharedDirectory;
use crate::route::{Candidate, Hop, MissingBlocks, NoRoute, plan, plan_within};

/// How often a request waiting for capacity looks again by itself
/// (besides being woken when a route closes), plus up to 1 s of jitter.
const WAIT_FALLBACK: Duration = Duration::from_secs(2);

/// Deadline to open a stream to a node (dialing it if needed); longer is
/// load or death: the node is skipped for a while, not banned.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a node that was slow to answer `Open` is skipped.
const SLOW_SKIP: Duration = Duration::from_secs(2);

/// How a chain talks to nodes.
#[derive(Debug, Clone)]
pub struct ChainConfig {
    /// Most positions a session will hold.
    pub max_len: usize,
    /// How the nodes schedule the session.
    pub priority: Priority,
    /// Deadline to reach a node and open a stream to it.
    pub open_timeout: Duration,
    /// Deadline for a node's answer to `Open`; a slower node is skipped for
    /// a while (not banned).
    pub reply_timeout: Duration,
    /// How long a request waits for capacity when every node that could
    /// serve it is busy.
    pub queue_timeout: Duration,
    /// Deadline of one step, plus `per_row_timeout` for each position in it.
    pub step_timeout: Duration,
    pub per_row_timeout: Duration,
    /// Node failures tolerated within one call to `forward`.
    pub max_failovers: usize,
    pub discovery_timeout: Duration,
    /// Node-to-node push when every node of the route supports it.
    pub push: bool,
    /// Most the nodes of the route may ask together per 1,000 positions
    /// (micro-credits; `None`: no cap).
    pub max_price_per_1k: Option<u64>,
}

impl Default for ChainConfig {
    fn default() -> Self {
        Self {
            max_len: 2048,
            priority: Priority::Interactive,
            open_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(1),
            queue_timeout: Duration::from_secs(15),
            step_timeout: Duration::from_secs(10),
            per_row_timeout: Duration::from_millis(50),
            max_failovers: 8,
            discovery_timeout: Duration::from_secs(3),
            push: true,
            max_price_per_1k: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Missing(#[from] MissingBlocks),
    #[error(transparent)]
    OverPrice(#[from] crate::route::OverPrice),
    /// Every node that could serve is busy, and stayed busy past the
    /// request's queue deadline.
    #[error("{reason}")]
    Busy { retry_after: Duration, reason: String },
    #[error("gave up after {failures} node failures; the last: {last}")]
    GaveUp { failures: usize, last: String },
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("{0}")]
    Internal(String),
}

/// Why one node could not do one thing.
#[derive(Debug, thiserror::Error)]
enum NodeFault {
    #[error("{0}")]
    Net(#[from] hotpot_net::NetError),
    #[error("refused ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("busy: {message}")]
    Busy { retry_after: Duration, message: String },
    #[error("did not answer Open within {0:?}")]
    Slow(Duration),
    /// The stream closed before any answer to `Open`: libp2p drops an
    /// inbound stream when the node has not yet taken up the previous
    /// one (its acceptor holds one at a time), which a loaded node does.
    #[error("closed the stream without answering Open (shed under load)")]
    Shed,
    #[error("broke the protocol: {0}")]
    Protocol(String),
    #[error("sent a commitment that does not verify: {0}")]
    Commitment(String),
    /// In a pushed chain, the node signed other input bytes than the
    /// previous node reported sending it: one of the two lied, or the link
    /// between them broke; which one is unknowable here, so nobody is
    /// banned and the chain falls back to relaying every step itself.
    #[error("signed other input bytes than its predecessor reported forwarding")]
    Input,
}

struct Conn {
    hop: Hop,
    node: NodeId,
    session: SessionId,
    framed: Framed,
    /// Opened as part of a pushed chain.
    pushed: bool,
}

struct Stage {
    span: LayerSpan,
    conn: Conn,
    /// The hidden states fed to this stage at the positions it holds now,
    /// row-major (replayed into a replacement when the node fails).
    history: Vec<f32>,
    /// Whether this stage's work will be audited (decided, unseen by the
    /// node, when the stage is connected): only then are its tensors kept.
    audited: bool,
    /// Every step's inputs and outputs as sent and returned, rolled-back
    /// rows included (audited stages only), and every signed commitment.
    sent: Vec<f32>,
    outputs: Vec<f32>,
    commitments: Vec<Commitment>,
    /// A rollback the node has not been told of yet: it goes out just
    /// before the next step, on the same stream, costing no round trip.
    rollback: Option<usize>,
    /// The node has done a step in this session (its past failures are
    /// forgiven then).
    proven: bool,
    /// What the node asked per 1,000 positions when the stage connected
    /// (micro-credits).
    price_per_1k: u64,
}

impl Stage {
    fn new(conn: Conn, audited: bool, price_per_1k: u64) -> Self {
        Self {
            price_per_1k,
            span: conn.hop.span,
            conn,
            history: Vec::new(),
            audited,
            sent: Vec::new(),
            outputs: Vec::new(),
            commitments: Vec::new(),
            rollback: None,
            proven: false,
        }
    }

    fn record(&mut self, input: &[f32], output: &[f32], commitment: Commitment) {
        self.history.extend_from_slice(input);
        if self.audited {
            self.sent.extend_from_slice(input);
            self.outputs.extend_from_slice(output);
        }
        self.commitments.push(commitment);
    }
}

/// Decides, when a stage is connected to a node, whether that stage's work
/// in this session will be audited.
pub type AuditSelector = Arc<dyn Fn(&PeerId) -> bool + Send + Sync>;

/// What one node did in a session, as the session record keeps it:
/// commitments only, never tensors.
#[derive(Debug, Clone)]
pub struct StageRecord {
    /// The node (`None` for blocks run in this process).
    pub peer: Option<PeerId>,
    pub node: Option<NodeId>,
    pub span: LayerSpan,
    /// Positions the node computed (after rollbacks).
    pub positions: usize,
    /// Its price per 1,000 positions when the session began (micro-credits).
    pub price_per_1k: u64,
    pub commitments: Vec<Commitment>,
}

/// Everything one node did in a session: what audits and evidence need.
#[derive(Debug, Clone)]
pub struct StageTranscript {
    pub peer: PeerId,
    pub node: NodeId,
    pub span: LayerSpan,
    pub dim: usize,
    /// Every step's input and output rows as sent and returned, in order
    /// (a step after a rollback starts before the previous one ended; see
    /// [`hotpot_verify::Kept`]), one commitment per step.
    pub inputs: Vec<f32>,
    pub outputs: Vec<f32>,
    pub commitments: Vec<Commitment>,
}

/// What a chain reports as it works (for metrics).
#[derive(Debug, Clone, Copy)]
pub enum ChainEvent<'a> {
    SessionOpened(&'a PeerId),
    SessionClosed(&'a PeerId),
    Step {
        peer: &'a PeerId,
        sent: usize,
        received: usize,
    },
    Failover,
    /// A node answered `Busy` (load: it is skipped for a moment).
    Busy(&'a PeerId),
    /// A node failed and is banned for a while.
    Banned(&'a PeerId),
}

/// Receives a chain's events.
pub type Observer = Arc<dyn Fn(ChainEvent<'_>) + Send + Sync>;

/// What a chain needs to find nodes and open sessions: shareable, so
/// that opening sessions never borrows the chain's own streams.
#[derive(Clone)]
struct Connector {
    network: Network,
    directory: SharedDirectory,
    model: ModelId,
    n_blocks: u32,
    config: ChainConfig,
    observer: Option<Observer>,
    selector: Option<AuditSelector>,
    eligible: Option<Eligible>,
}

/// Where a chain finds its nodes and how it reports and audits.
#[derive(Clone)]
pub struct ChainContext {
    pub network: Network,
    pub directory: SharedDirectory,
    pub model: ModelId,
    pub n_blocks: u32,
    pub dim: usize,
    pub observer: Option<Observer>,
    pub selector: Option<AuditSelector>,
    /// Which nodes may be on a route at all (`None`: every usable one);
    /// the gateway keeps out nodes with too little at stake.
    pub eligible: Option<Eligible>,
}

/// Decides whether a node may be routed through.
pub type Eligible = Arc<dyn Fn(&PeerId) -> bool + Send + Sync>;

/// A pipeline of remote sessions covering all of a model's blocks.
pub struct RemoteChain {
    connector: Connector,
    dim: usize,
    stages: Vec<Stage>,
    len: usize,
    failovers: usize,
    /// Steps go node to node (until a fault: then the gateway relays
    /// every step itself for the rest of the session).
    push: bool,
}

impl std::fmt::Debug for RemoteChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteChain").field("route", &self.route()).field("len", &self.len).finish()
    }
}

impl RemoteChain {
    /// Plans a route over the swarm and opens a session on every hop.
    pub async fn open(context: ChainContext, config: ChainConfig) -> Result<Self, ChainError> {
        let ChainContext { network, directory, model, n_blocks, dim, observer, selector, eligible } = context;
        let connector = Connector { network, directory, model, n_blocks, config, observer, selector, eligible };
        let full = LayerSpan::full(n_blocks).map_err(|e| ChainError::Internal(e.to_string()))?;
        let mut failures = 0;
        let deadline = Instant::now() + connector.config.queue_timeout;
        let push = connector.config.push;
        let stages: Vec<Stage> = connector.connect(full, &mut failures, deadline, push).await?.into_iter().map(|c| connector.stage(c)).collect();
        let push = stages.len() > 1 && stages.iter().all(|s| s.conn.pushed);
        Ok(Self { connector, dim, stages, len: 0, failovers: 0, push })
    }

    /// The hops in use, in order.
    pub fn route(&self) -> Vec<Hop> {
        self.stages.iter().map(|s| s.conn.hop).collect()
    }

    /// Whether steps go node to node now.
    pub fn pushed(&self) -> bool {
        self.push
    }

    /// Node failures survived so far.
    pub fn failovers(&self) -> usize {
        self.failovers
    }

    /// Positions processed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs `hidden` (positions `start_pos..`) through every stage.
    pub async fn forward(&mut self, hidden: HiddenStates, start_pos: usize) -> Result<HiddenStates, ChainError> {
        if start_pos != self.len {
            return Err(ForwardError::Position { expected: self.len, got: start_pos }.into());
        }
        let rows = hidden.rows();
        let mut x = hidden.into_vec();
        let mut failures = 0;
        let deadline = Instant::now() + self.connector.config.queue_timeout;
        let mut k = 0;
        if self.push {
            match self.push_step(start_pos, rows, x, deadline).await {
                Ok(out) => {
                    self.len += rows;
                    return Ok(HiddenStates::new(rows, self.dim, out)?);
                }
                Err((at, input, fault)) => {
                    self.unpush(at, fault, start_pos, &mut failures, deadline).await?;
                    (k, x) = (at, input);
                }
            }
        }
        while k < self.stages.len() {
            match self.step(k, start_pos, rows, &x).await {
                Ok((out, commitment)) => {
                    let stage = &mut self.stages[k];
                    stage.record(&x, &out, commitment);
                    if !stage.proven {
                        stage.proven = true;
                        let peer = stage.conn.hop.peer;
                        self.connector.directory.with(|d| d.succeeded(&peer));
                    }
                    x = out;
                    k += 1;
                }
                Err(NodeFault::Busy { retry_after, message }) => {
                    // Load, not failure: wait for the node while the
                    // request may, then move its blocks elsewhere (no ban).
                    let peer = self.stages[k].conn.hop.peer;
                    if Instant::now() + retry_after < deadline {
                        tracing::debug!(%peer, ?retry_after, "node busy ({message}); retrying the step");
                        tokio::time::sleep(retry_after).await;
                        continue;
                    }
                    self.connector.busy(peer, retry_after);
                    tracing::info!(%peer, blocks = %self.stages[k].span, "node still busy ({message}); moving its blocks");
                    self.replace(k, &mut failures, deadline).await?;
                }
                Err(fault) => {
                    let stage = &self.stages[k];
                    let peer = stage.conn.hop.peer;
                    let ban = self.connector.ban(peer);
                    failures += 1;
                    self.failovers += 1;
                    self.emit(ChainEvent::Failover);
                    tracing::warn!(
                        %peer, blocks = %stage.span, position = start_pos, banned_for = ?ban,
                        "failover: node failed ({fault}); rerouting its blocks"
                    );
                    if failures > self.connector.config.max_failovers {
                        return Err(ChainError::GaveUp { failures, last: fault.to_string() });
                    }
                    self.replace(k, &mut failures, deadline).await?;
                }
            }
        }
        self.len += rows;
        Ok(HiddenStates::new(rows, self.dim, x)?)
    }

    /// What the stages chosen for audit did in this session, tensors
    /// included: what their audits recompute.
    pub fn transcripts(&self) -> Vec<StageTranscript> {
        self.stages
            .iter()
            .filter(|s| s.audited && !s.commitments.is_empty())
            .map(|s| StageTranscript {
                peer: s.conn.hop.peer,
                node: s.conn.node,
                span: s.span,
                dim: self.dim,
                inputs: s.sent.clone(),
                outputs: s.outputs.clone(),
                commitments: s.commitments.clone(),
            })
            .collect()
    }

    /// What each node of the route did, commitments only.
    pub fn stage_records(&self) -> Vec<StageRecord> {
        self.stages
            .iter()
            .map(|s| StageRecord {
                peer: Some(s.conn.hop.peer),
                node: Some(s.conn.node),
                span: s.span,
                positions: s.history.len() / self.dim,
                price_per_1k: s.price_per_1k,
                commitments: s.commitments.clone(),
            })
            .collect()
    }

    /// Rolls every stage back to `len` positions. Each node is told just
    /// before its next step (on the same stream, so it costs no round
    /// trip); a node that fails to roll back then is replaced and replayed
    /// up to `len` like any failed node.
    pub async fn truncate(&mut self, len: usize) -> Result<(), ChainError> {
        if len >= self.len {
            return Ok(());
        }
        for stage in &mut self.stages {
            stage.history.truncate(len * self.dim);
            stage.rollback = Some(stage.rollback.map_or(len, |r| r.min(len)));
        }
        self.len = len;
        Ok(())
    }

    /// Closes every session (best effort).
    pub async fn close(&mut self) {
        self.close_with_receipts(Vec::new()).await;
    }

    /// Closes every session (best effort, all stages at once), handing
    /// each node its receipt first: the node checks it against its own
    /// count and commitments and countersigns it. Returns the receipts,
    /// countersigned where the node did (a rollback the node was not told
    /// of yet is sent first, so that both count the same positions).
    pub async fn close_with_receipts(&mut self, mut receipts: Vec<(Receipt, Option<Box<hotpot_wire::ChainPayment>>)>) -> Vec<Receipt> {
        let stages = std::mem::take(&mut self.stages);
        let mut closing = Vec::with_capacity(stages.len());
        for stage in stages {
            let receipt = receipts.iter().position(|(r, _)| r.session == stage.conn.session).map(|i| receipts.swap_remove(i));
            closing.push(close_stage(stage, receipt));
        }
        let closed = futures::future::join_all(closing).await;
        for (peer, _) in &closed {
            self.emit(ChainEvent::SessionClosed(peer));
        }
        // A route's worth of slots is free: one waiting request may take it.
        self.connector.directory.session_closed();
        // Receipts of stages no longer in the route (none today) go back unsigned.
        closed.into_iter().filter_map(|(_, r)| r).chain(receipts.into_iter().map(|(r, _)| r)).collect()
    }

    fn emit(&self, event: ChainEvent<'_>) {
        self.connector.emit(event);
    }

    /// One step through the pushed chain: the first node gets the step,
    /// each node forwards its output to the next, and every node's output
    /// and commitment are collected on its own session stream (asked for
    /// at once, so collecting costs no round trip). A stage that is busy is
    /// handed its input again while the request may wait. Stages up to a
    /// fault are recorded; a fault at stage k returns k, what stage k was fed,
    /// and the fault.
    async fn push_step(&mut self, pos: usize, rows: usize, x: Vec<f32>, deadline: Instant) -> Result<Vec<f32>, (usize, Vec<f32>, NodeFault)> {
        let timeout = self.step_timeout(rows);
        let (model, dim) = (self.connector.model, self.dim);
        let first = Tensor::from_f32(WIRE_DTYPE, rows, dim, &x);
        let step = Step { session: self.stages[0].conn.session, pos: pos as u32, hidden: first.clone() };
        let sends = self.stages.iter_mut().enumerate().map(|(k, stage)| {
            let message = if k == 0 { ClientMessage::PushStep(step.clone()) } else { ClientMessage::Collect { session: stage.conn.session, pos: pos as u32 } };
            async move { stage.conn.framed.send(&message.encode(), timeout).await }
        });
        let sent: Vec<Result<(), hotpot_net::NetError>> = futures::future::join_all(sends).await;
        let (mut input, mut input_tensor) = (x, first);
        for (k, sent) in sent.into_iter().enumerate() {
            if let Err(e) = sent {
                return Err((k, input, e.into()));
            }
            // Stage k's output comes after k forwarding hops.
            let mut wait = timeout.saturating_mul(k as u32 + 1);
            let mut answer = read_output(&mut self.stages[k].conn, model, dim, pos, rows, input_tensor.bytes(), wait).await;
            // Busy is load: stage k computed nothing and forwarded nothing,
            // and the stages after it still wait for its output. While the
            // request may wait, hand stage k its input again (a PushStep
            // on its own stream: it computes and forwards as before).
            while let Err(NodeFault::Busy { retry_after, message }) = &answer
                && Instant::now() + *retry_after < deadline
            {
                let peer = self.stages[k].conn.hop.peer;
                tracing::debug!(%peer, ?retry_after, "node busy ({message}); handing it the pushed step again");
                tokio::time::sleep(*retry_after).await;
                let again = ClientMessage::PushStep(Step { session: self.stages[k].conn.session, pos: pos as u32, hidden: input_tensor.clone() });
                if let Err(e) = self.stages[k].conn.framed.send(&again.encode(), timeout).await {
                    return Err((k, input, e.into()));
                }
                wait = timeout;
                answer = read_output(&mut self.stages[k].conn, model, dim, pos, rows, input_tensor.bytes(), wait).await;
            }
            match answer {
                Ok((out, tensor, commitment)) => {
                    let stage = &mut self.stages[k];
                    // The step rolled the node back itself.
                    stage.rollback = None;
                    stage.record(&input, &out, commitment);
                    if !stage.proven {
                        stage.proven = true;
                        let peer = stage.conn.hop.peer;
                        self.connector.directory.with(|d| d.succeeded(&peer));
                    }
                    let bytes = rows * dim * WIRE_DTYPE.size();
                    self.emit(ChainEvent::Step { peer: &self.stages[k].conn.hop.peer, sent: if k == 0 { bytes } else { 0 }, received: out.len() * 4 });
                    (input, input_tensor) = (out, tensor);
                }
                Err(fault) => return Err((k, input, fault)),
            }
        }
        Ok(input)
    }

    /// A pushed step failed at stage `k`: the chain relays every step itself
    /// from now on. The stages after `k` may hold answers the chain will
    /// never read (or wait for steps that never come), so they are opened
    /// afresh (no blame) and replayed; stage `k` is treated like a failed
    /// node of a relayed chain — banned, or skipped when busy, or (when it
    /// and its predecessor disagree on what was forwarded) just replaced.
    async fn unpush(&mut self, k: usize, fault: NodeFault, pos: usize, failures: &mut usize, deadline: Instant) -> Result<(), ChainError> {
        self.push = false;
        let peer = self.stages[k].conn.hop.peer;
        tracing::warn!(%peer, blocks = %self.stages[k].span, position = pos, "push: stage {k} failed ({fault}); relaying every step from now on");
        for j in (k + 1..self.stages.len()).rev() {
            self.replace(j, failures, deadline).await?;
        }
        match fault {
            NodeFault::Busy { retry_after, .. } => self.connector.busy(peer, retry_after),
            NodeFault::Input => {}
            fault => {
                let ban = self.connector.ban(peer);
                *failures += 1;
                self.failovers += 1;
                self.emit(ChainEvent::Failover);
                tracing::warn!(%peer, banned_for = ?ban, "failover: node failed ({fault}); rerouting its blocks");
                if *failures > self.connector.config.max_failovers {
                    return Err(ChainError::GaveUp { failures: *failures, last: fault.to_string() });
                }
            }
        }
        self.replace(k, failures, deadline).await
    }

    fn step_timeout(&self, rows: usize) -> Duration {
        self.connector.config.step_timeout + self.connector.config.per_row_timeout.saturating_mul(rows as u32)
    }

    async fn step(&mut self, k: usize, pos: usize, rows: usize, x: &[f32]) -> Result<(Vec<f32>, Commitment), NodeFault> {
        let timeout = self.step_timeout(rows);
        let (model, dim) = (self.connector.model, self.dim);
        let rollback = self.stages[k].rollback.take();
        let out = run_step(&mut self.stages[k].conn, model, dim, rollback, pos, rows, x, timeout).await;
        if let Ok((values, _)) = &out {
            let bytes = rows * dim * WIRE_DTYPE.size();
            self.emit(ChainEvent::Step { peer: &self.stages[k].conn.hop.peer, sent: bytes, received: values.len() * 4 });
        }
        out
    }

    /// Replaces stage `k` by a fresh route over its blocks, replaying its history.
    async fn replace(&mut self, k: usize, failures: &mut usize, deadline: Instant) -> Result<(), ChainError> {
        let old = self.stages.remove(k);
        self.emit(ChainEvent::SessionClosed(&old.conn.hop.peer));
        let rows = old.history.len() / self.dim;
        'attempt: loop {
            let conns = self.connector.connect(old.span, failures, deadline, false).await?;
            let mut input = old.history.clone();
            let mut fresh = Vec::with_capacity(conns.len());
            let mut conns = conns.into_iter();
            while let Some(conn) = conns.next() {
                let mut stage = self.connector.stage(conn);
                if rows > 0 {
                    let timeout = self.step_timeout(rows);
                    match run_step(&mut stage.conn, self.connector.model, self.dim, None, 0, rows, &input, timeout).await {
                        Ok((out, commitment)) => {
                            stage.record(&input, &out, commitment);
                            input = out;
                        }
                        Err(fault) => {
                            let peer = stage.conn.hop.peer;
                            let ban = match &fault {
                                NodeFault::Busy { retry_after, .. } => {
                                    self.connector.busy(peer, *retry_after);
                                    None
                                }
                                _ => {
                                    *failures += 1;
                                    Some(self.connector.ban(peer))
                                }
                            };
                            self.failovers += 1;
                            self.emit(ChainEvent::SessionClosed(&peer));
                            self.emit(ChainEvent::Failover);
                            tracing::warn!(%peer, blocks = %stage.span, banned_for = ?ban, "failover: replacement failed while replaying ({fault})");
                            // The sessions opened for this attempt close as they drop.
                            for other in fresh.iter().map(|s: &Stage| s.conn.hop.peer).chain(conns.map(|c| c.hop.peer)) {
                                self.emit(ChainEvent::SessionClosed(&other));
                            }
                            if *failures > self.connector.config.max_failovers {
                                return Err(ChainError::GaveUp { failures: *failures, last: fault.to_string() });
                            }
                            continue 'attempt;
                        }
                    }
                }
                fresh.push(stage);
            }
            if rows > 0
                && let Some(next) = self.stages.get(k)
                && next.history != input
            {
                tracing::warn!(blocks = %old.span, "the replacement's replayed outputs differ from the failed node's; continuing with the replacement");
            }
            let hops: Vec<String> = fresh.iter().map(|s| format!("{}@{}", s.span, s.conn.hop.peer)).collect();
            tracing::warn!(blocks = %old.span, replayed = rows, route = %hops.join(" → "), "rerouted");
            for (i, stage) in fresh.into_iter().enumerate() {
                self.stages.insert(k + i, stage);
            }
            return Ok(());
        }
    }
}

impl Connector {
    /// A stage on a freshly connected node, secretly drawn for audit or not.
    fn stage(&self, conn: Conn) -> Stage {
        let audited = self.selector.as_ref().is_some_and(|select| select(&conn.hop.peer));
        let price = self.directory.with(|d| d.info(&conn.hop.peer)).map_or(0, |i| i.price_per_1k);
        Stage::new(conn, audited, price)
    }

    fn emit(&self, event: ChainEvent<'_>) {
        if let Some(observer) = &self.observer {
            observer(event);
        }
    }

    /// Bans a failed node for a while; returns how long.
    fn ban(&self, peer: PeerId) -> Duration {
        self.emit(ChainEvent::Banned(&peer));
        self.directory.with(|d| d.ban(peer))
    }

    /// A node is busy: skip it for `retry_after`.
    fn busy(&self, peer: PeerId, retry_after: Duration) {
        self.emit(ChainEvent::Busy(&peer));
        self.directory.with(|d| d.mark_busy(peer, retry_after));
    }

    /// Plans a route over `range` and opens a session on each hop. A node
    /// that fails is banned, one that is busy or slow skipped for a while,
    /// and the route planned again; when every node that could serve is
    /// busy, waits for capacity until `deadline`.
    async fn connect(&self, range: LayerSpan, failures: &mut usize, deadline: Instant, push: bool) -> Result<Vec<Conn>, ChainError> {
        let mut refreshed = false;
        // After a wake, busy nodes are tried once more (a slot may be free).
        let mut woken = false;
        // A node refused this gateway for the receipts it owes.
        let mut owed: Option<String> = None;
        let freed = self.directory.freed();
        loop {
            let notified = freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let hops = match plan_within(range, &self.candidates(std::mem::take(&mut woken)), self.config.max_price_per_1k) {
                Ok(hops) => hops,
                Err(NoRoute::OverPrice(over)) => return Err(over.into()),
                // Blocks missing even counting busy nodes: ask the swarm
                // (busy nodes are load, not a reason to search the DHT).
                Err(NoRoute::Missing(missing)) if !refreshed && plan(range, &self.candidates(true)).is_err() => {
                    tracing::debug!(%missing, "looking for more nodes");
                    self.directory.refresh(&self.network, &self.model, self.n_blocks, self.config.discovery_timeout).await;
                    refreshed = true;
                    continue;
                }
                Err(NoRoute::Missing(_)) if let Some(message) = owed.take() => {
                    return Err(ChainError::Busy { retry_after: OWED_SKIP, reason: format!("a node this route needs refuses this gateway: {message}") });
                }
                Err(NoRoute::Missing(missing)) => {
                    let wake = self.wait_for_capacity(range, &missing, deadline)?;
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(wake) => {}
                    }
                    woken = true;
                    continue;
                }
            };
            let mut conns = Vec::with_capacity(hops.len());
            let mut failed = false;
            let links = if push { self.push_links(&hops) } else { vec![None; hops.len()] };
            for (hop, (session, links)) in hops.into_iter().zip(links.into_iter().map(|l| l.unzip())) {
                let session = session.unwrap_or_else(SessionId::random);
                match self.open_session(hop, session, links).await {
                    Ok(conn) => conns.push(conn),
                    Err(NodeFault::Busy { retry_after, message }) => {
                        self.busy(hop.peer, retry_after);
                        tracing::debug!(peer = %hop.peer, blocks = %hop.span, "node busy ({message}); trying another route");
                        failed = true;
                        break;
                    }
                    // An honest node this gateway owes receipts: skip it
                    // (no ban: the debt is this gateway's).
                    Err(NodeFault::Refused { code: ErrorCode::ReceiptsOwed, message }) => {
                        self.busy(hop.peer, OWED_SKIP);
                        tracing::warn!(peer = %hop.peer, blocks = %hop.span, "the node refuses this gateway: {message}");
                        owed = Some(message);
                        failed = true;
                        break;
                    }
                    // A stream the node dropped or did not take up in time
                    // while its connection stands is load (libp2p sheds
                    // inbound streams its acceptor is too busy to take):
                    // skip the node for a moment, no ban. A node that is
                    // gone loses its connection and leaves the directory.
                    Err(fault @ (NodeFault::Slow(_) | NodeFault::Shed | NodeFault::Net(hotpot_net::NetError::Timeout(_) | hotpot_net::NetError::Wire(_)))) => {
                        self.busy(hop.peer, SLOW_SKIP);
                        tracing::info!(peer = %hop.peer, blocks = %hop.span, "node {fault}; skipping it for a while");
                        failed = true;
                        break;
                    }
                    Err(fault) => {
                        let ban = self.ban(hop.peer);
                        *failures += 1;
                        tracing::warn!(peer = %hop.peer, blocks = %hop.span, banned_for = ?ban, "cannot open a session ({fault}); trying another route");
                        if *failures > self.config.max_failovers {
                            return Err(ChainError::GaveUp { failures: *failures, last: fault.to_string() });
                        }
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                for mut conn in conns {
                    conn.framed.close().await;
                    self.emit(ChainEvent::SessionClosed(&conn.hop.peer));
                }
                refreshed = false;
                continue;
            }
            return Ok(conns);
        }
    }

    /// No route over `range` right now: when to look again, or why not to.
    /// Busy nodes that would serve mean waiting (until `deadline`, then
    /// `Busy`); banned ones, waiting out a ban that ends before `deadline`;
    /// otherwise the blocks are missing.
    fn wait_for_capacity(&self, range: LayerSpan, missing: &MissingBlocks, deadline: Instant) -> Result<Instant, ChainError> {
        let now = Instant::now();
        if plan(range, &self.candidates(true)).is_ok() {
            let busy_end = self.directory.with(|d| d.busy_ends(&self.model)).unwrap_or(now + Duration::from_millis(500));
            if now >= deadline {
                let retry_after = busy_end.saturating_duration_since(now).max(Duration::from_secs(1));
                let nodes = self.directory.with(|d| d.usable(&self.model).len());
                return Err(ChainError::Busy {
                    retry_after,
                    reason: format!(
                        "every node that serves blocks {range} of this model is busy (all {nodes} nodes asked to wait); waited {:.1} s for capacity",
                        self.config.queue_timeout.as_secs_f64()
                    ),
                });
            }
            // Waiters wake one at a time as routes close (FIFO); a waiter
            // not woken that way looks again after a while on its own,
            // spread out so that they do not all ask the nodes at once.
            let fallback = WAIT_FALLBACK + Duration::from_millis(rand::random::<u64>() % 1000);
            return Ok((now + fallback).max(busy_end).min(deadline));
        }
        match self.directory.with(|d| d.ban_ends_covering(&self.model, &missing.0)) {
            Some(until) if until < deadline => Ok(until),
            _ => Err(missing.clone().into()),
        }
    }

    /// Nodes a route may use; busy ones only with `busy_ok`. A node whose
    /// last heartbeat said it was full costs more but stays a candidate: it
    /// answers `Busy` itself if it still is.
    fn candidates(&self, busy_ok: bool) -> Vec<Candidate> {
        self.directory.with(|d| {
            d.usable(&self.model)
                .into_iter()
                .filter(|r| r.info.n_blocks == self.n_blocks && (busy_ok || !d.is_busy(&r.peer)))
                .filter(|r| self.config.max_price_per_1k.is_none_or(|cap| r.info.price_per_1k <= cap))
                .filter(|r| self.eligible.as_ref().is_none_or(|eligible| eligible(&r.peer)))
                .map(|r| Candidate {
                    peer: r.peer,
                    span: r.info.span,
                    throughput: r.info.throughput,
                    queue: r.info.queue + if r.info.free_slots == 0 { r.info.max_sessions } else { 0 },
                    rtt: r.rtt.unwrap_or_default(),
                    penalty: d.penalty(&r.peer),
                    price_per_1k: r.info.price_per_1k,
                })
                .collect()
        })
    }

    /// A pushed chain over `hops`, when every node of it supports push:
    /// each hop's session id and its links to its neighbours.
    fn push_links(&self, hops: &[Hop]) -> Vec<Option<(SessionId, PushLinks)>> {
        let infos: Vec<Option<NodeInfo>> = self.directory.with(|d| hops.iter().map(|h| d.info(&h.peer)).collect());
        let ids: Vec<Option<NodeId>> = hops.iter().map(|h| node_id_of(&h.peer)).collect();
        let supported = infos.iter().all(|i| i.as_ref().is_some_and(|i| i.features & features::PUSH != 0)) && ids.iter().all(Option::is_some);
        if hops.len() < 2 || !supported {
            return vec![None; hops.len()];
        }
        let sessions: Vec<SessionId> = hops.iter().map(|_| SessionId::random()).collect();
        (0..hops.len())
            .map(|i| {
                let upstream = i.checked_sub(1).and_then(|u| ids[u]);
                let downstream = ids.get(i + 1).copied().flatten().map(|node| Downstream {
                    node,
                    session: sessions[i + 1],
                    addrs: infos[i + 1].as_ref().map(|info| info.addrs.clone()).unwrap_or_default(),
                });
                Some((sessions[i], PushLinks { upstream, downstream }))
            })
            .collect()
    }

    async fn open_session(&self, hop: Hop, session: SessionId, push: Option<PushLinks>) -> Result<Conn, NodeFault> {
        let conn = self.open_session_now(hop, session, push).await;
        if conn.is_ok() {
            self.emit(ChainEvent::SessionOpened(&hop.peer));
        }
        conn
    }

    /// Opens a session, retrying transport hiccups (a node that is busy
    /// accepting streams may drop one) before calling the node failed.
    async fn open_session_now(&self, hop: Hop, session: SessionId, push: Option<PushLinks>) -> Result<Conn, NodeFault> {
        let mut attempt = 0;
        loop {
            match self.open_session_once(hop, session, push.clone()).await {
                // A stream that failed at once (dropped by a busy acceptor,
                // say) is worth another try soon; one that timed out is not.
                Err(e @ (NodeFault::Net(_) | NodeFault::Shed)) if attempt < 2 && !matches!(e, NodeFault::Net(hotpot_net::NetError::Timeout(_))) => {
                    attempt += 1;
                    tracing::debug!(peer = %hop.peer, error = %e, attempt, "retrying a session open");
                    tokio::time::sleep(Duration::from_millis(25 << attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn open_session_once(&self, hop: Hop, session: SessionId, push: Option<PushLinks>) -> Result<Conn, NodeFault> {
        let node = node_id_of(&hop.peer).ok_or_else(|| NodeFault::Protocol("peer id carries no ed25519 key".into()))?;
        // A node that died keeps its connection for a few seconds (until the
        // QUIC idle timeout); a stream on it never opens. Do not wait long.
        let stream = self.network.open_stream(hop.peer, PROTOCOL_INFER, self.config.open_timeout.min(STREAM_OPEN_TIMEOUT)).await?;
        let mut framed = Framed::new(hop.peer, stream);
        let pushed = push.is_some();
        let open =
            ClientMessage::Open(Open { session, model: self.model, span: hop.span, max_len: self.config.max_len as u32, priority: self.config.priority, push });
        let reply_timeout = self.config.reply_timeout;
        framed.send(&open.encode(), reply_timeout).await?;
        let reply = match framed.recv(reply_timeout).await {
            Ok(reply) => reply.ok_or(NodeFault::Shed)?,
            Err(hotpot_net::NetError::Timeout(_)) => return Err(NodeFault::Slow(reply_timeout)),
            Err(e) => return Err(e.into()),
        };
        match NodeMessage::decode(&reply).map_err(|e| NodeFault::Protocol(e.to_string()))? {
            NodeMessage::Opened { session: s, .. } if s == session => Ok(Conn { hop, node, session, framed, pushed }),
            NodeMessage::Busy { retry_after_ms, message } => Err(NodeFault::Busy { retry_after: Duration::from_millis(retry_after_ms.into()), message }),
            NodeMessage::Error { code, message } => Err(NodeFault::Refused { code, message }),
            other => Err(NodeFault::Protocol(format!("unexpected answer to Open: {other:?}"))),
        }
    }
}

impl Drop for RemoteChain {
    /// Dropping the streams closes the sessions on the nodes.
    fn drop(&mut self) {
        for stage in &self.stages {
            self.emit(ChainEvent::SessionClosed(&stage.conn.hop.peer));
        }
        if !self.stages.is_empty() {
            self.connector.directory.session_closed();
        }
    }
}

/// How long a node that refuses this gateway for owed receipts is skipped.
const OWED_SKIP: Duration = Duration::from_secs(60);

/// How long a node has to answer a receipt.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Ends one stage's session: its pending rollback, its receipt, `Close`.
async fn close_stage(mut stage: Stage, receipt: Option<(Receipt, Option<Box<hotpot_wire::ChainPayment>>)>) -> (PeerId, Option<Receipt>) {
    let conn = &mut stage.conn;
    let receipt = match receipt {
        Some((receipt, payment)) => Some(countersigned(conn, stage.rollback.take(), receipt, payment).await),
        None => None,
    };
    let _ = conn.framed.send(&ClientMessage::Close { session: conn.session }.encode(), Duration::from_secs(1)).await;
    conn.framed.close().await;
    (conn.hop.peer, receipt)
}

/// `receipt`, countersigned by the stage's node if it agrees with it.
async fn countersigned(conn: &mut Conn, rollback: Option<usize>, mut receipt: Receipt, payment: Option<Box<hotpot_wire::ChainPayment>>) -> Receipt {
    let exchange = async {
        if let Some(len) = rollback {
            conn.framed.send(&ClientMessage::Truncate { session: conn.session, pos: len as u32 }.encode(), RECEIPT_TIMEOUT).await?;
        }
        conn.framed.send(&ClientMessage::Receipt(Box::new(receipt.clone()), payment).encode(), RECEIPT_TIMEOUT).await?;
        loop {
            let Some(reply) = conn.framed.recv(RECEIPT_TIMEOUT).await? else { return Ok(None) };
            match NodeMessage::decode(&reply) {
                Ok(NodeMessage::Truncated { .. }) => continue,
                Ok(NodeMessage::Countersigned { signature }) => return Ok(Some(signature)),
                Ok(other) => {
                    tracing::warn!(peer = %conn.hop.peer, answer = ?other, "a node did not countersign its receipt");
                    return Ok(None);
                }
                Err(e) => return Err(hotpot_net::NetError::Wire(e.to_string())),
            }
        }
    };
    match exchange.await {
        Ok(Some(signature)) => {
            receipt.node_signature = Some(signature);
            if let Err(e) = receipt.check() {
                tracing::warn!(peer = %conn.hop.peer, error = %e, "a node's countersignature does not hold");
                receipt.node_signature = None;
            }
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(peer = %conn.hop.peer, error = %e, "no countersignature"),
    }
    receipt
}

/// One step on one node, checking everything about the answer: `rows` hidden states at `pos`, after rolling the
/// node back to `rollback` positions first when asked (both frames go out
/// before either answer is read).
#[allow(clippy::too_many_arguments)]
async fn run_step(
    conn: &mut Conn,
    model: ModelId,
    dim: usize,
    rollback: Option<usize>,
    pos: usize,
    rows: usize,
    x: &[f32],
    timeout: Duration,
) -> Result<(Vec<f32>, Commitment), NodeFault> {
    if let Some(len) = rollback {
        conn.framed.send(&ClientMessage::Truncate { session: conn.session, pos: len as u32 }.encode(), timeout).await?;
    }
    let tensor = Tensor::from_f32(WIRE_DTYPE, rows, dim, x);
    let message = ClientMessage::Step(Step { session: conn.session, pos: pos as u32, hidden: tensor });
    conn.framed.send(&message.encode(), timeout).await?;
    if let Some(len) = rollback {
        let reply = conn.framed.recv(timeout).await?.ok_or_else(|| NodeFault::Protocol("closed the stream".into()))?;
        match NodeMessage::decode(&reply).map_err(|e| NodeFault::Protocol(e.to_string()))? {
            NodeMessage::Truncated { len: l, .. } if l as usize == len => {}
            NodeMessage::Error { code, message } => return Err(NodeFault::Refused { code, message }),
            other => return Err(NodeFault::Protocol(format!("unexpected answer to Truncate: {other:?}"))),
        }
    }
    let ClientMessage::Step(sent) = message else { unreachable!("built above") };
    read_output(conn, model, dim, pos, rows, sent.hidden.bytes(), timeout).await.map(|(values, _, commitment)| (values, commitment))
}

/// Reads a node's answer to a step at `pos` of `rows` positions whose input
/// bytes were `input`, and checks everything about it: the output's
/// values, its bytes on the wire, and its commitment.
async fn read_output(
    conn: &mut Conn,
    model: ModelId,
    dim: usize,
    pos: usize,
    rows: usize,
    input: &[u8],
    timeout: Duration,
) -> Result<(Vec<f32>, Tensor, Commitment), NodeFault> {
    let reply = conn.framed.recv(timeout).await?.ok_or_else(|| NodeFault::Protocol("closed the stream".into()))?;
    match NodeMessage::decode(&reply).map_err(|e| NodeFault::Protocol(e.to_string()))? {
        NodeMessage::Output { session, hidden, commitment } => {
            if session != conn.session || hidden.rows() != rows || hidden.cols() != dim {
                return Err(NodeFault::Protocol("output of the wrong session or shape".into()));
            }
            let record =
                StepRecord { session: conn.session, model, span: conn.hop.span, start_pos: pos as u32, rows: rows as u32, input, output: hidden.bytes() };
            commitment.check(conn.node, record).map_err(|e| match e {
                hotpot_core::CommitmentError::Mismatch("input bytes") => NodeFault::Input,
                e => NodeFault::Commitment(e.to_string()),
            })?;
            let values = hidden.to_f32();
            if !values.iter().all(|v| v.is_finite()) {
                return Err(NodeFault::Protocol("non-finite hidden states".into()));
            }
            Ok((values, hidden, *commitment))
        }
        NodeMessage::Busy { retry_after_ms, message } => Err(NodeFault::Busy { retry_after: Duration::from_millis(retry_after_ms.into()), message }),
        NodeMessage::Error { code, message } => Err(NodeFault::Refused { code, message }),
        other => Err(NodeFault::Protocol(format!("unexpected answer to Step: {other:?}"))),
    }
}

/// A route as one line: `[0..10] peer → [10..30] peer`.
pub fn describe_route(route: &[Hop]) -> String {
    route.iter().map(|h| format!("[{}] {}", h.span, h.peer)).collect::<Vec<_>>().join(" → ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_description_reads_in_order() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let route = [Hop { peer: a, span: LayerSpan::new(0, 10).expect("span") }, Hop { peer: b, span: LayerSpan::new(10, 30).expect("span") }];
        let text = describe_route(&route);
        assert!(text.starts_with("[0..10] ") && text.contains(" → [10..30] "), "{text}");
    }
}
