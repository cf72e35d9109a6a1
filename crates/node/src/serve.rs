//! The node's side of `/hotpot/infer/1`, `/hotpot/audit/1` and
//! `/hotpot/info/1`.
//!
//! Each session is one stream. Anything malformed on a stream gets an
//! error answer and closes that stream only; other sessions carry on. When
//! the node stops, every open session gets a `ShuttingDown` error at once,
//! so its gateway fails over without waiting for a timeout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hotpot_core::SessionId;
use hotpot_net::{Framed, PeerId, Stream};
use hotpot_wire::{ClientMessage, ErrorCode, InfoRequest, NodeInfo, NodeMessage};
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use hotpot_wire::Step;

use crate::push::PushTable;
use crate::worker::{Job, Jobs, MAX_QUEUED_WORK};

/// Limits of one session or audit stream.
#[derive(Debug, Clone)]
pub(crate) struct StreamLimits {
    /// How long a stream may stay silent before the node closes it.
    pub idle: Duration,
    /// Deadline for writing one answer.
    pub write: Duration,
    /// Largest frame accepted on the stream.
    pub frame: usize,
    /// Memory for frames being read or worked on, node-wide, in KiB
    /// permits: a flood of maximum-size frames waits here instead of
    /// growing the node.
    pub budget: std::sync::Arc<tokio::sync::Semaphore>,
}

/// How many streams of one protocol the node serves at once, in all and
/// per peer; a stream over either cap is closed at once.
pub(crate) struct StreamGate {
    total: std::sync::Arc<tokio::sync::Semaphore>,
    per_peer: usize,
    peers: Mutex<std::collections::HashMap<PeerId, usize>>,
}

/// A stream admitted by a [`StreamGate`], counted until dropped.
pub(crate) struct StreamPass {
    gate: std::sync::Arc<StreamGate>,
    peer: PeerId,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl StreamGate {
    pub fn new(total: usize, per_peer: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self { total: std::sync::Arc::new(tokio::sync::Semaphore::new(total)), per_peer, peers: Mutex::default() })
    }

    /// Admits a stream from `peer`, or `None` when a cap is reached.
    pub fn enter(self: &std::sync::Arc<Self>, peer: PeerId) -> Option<StreamPass> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let count = peers.entry(peer).or_insert(0);
        if *count >= self.per_peer {
            return None;
        }
        let permit = std::sync::Arc::clone(&self.total).try_acquire_owned().ok()?;
        *count += 1;
        Some(StreamPass { gate: std::sync::Arc::clone(self), peer, _permit: permit })
    }
}

impl Drop for StreamPass {
    fn drop(&mut self) {
        let mut peers = self.gate.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = peers.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

/// What a session stream's messages are served with.
pub(crate) struct Services {
    pub jobs: Jobs,
    pub push: Arc<PushTable>,
    /// Where countersigned receipts are kept.
    pub receipts: Option<Arc<hotpot_ledger::ReceiptBook>>,
    /// Where the vouchers of the market contract are kept.
    pub payments: Option<Arc<Payments>>,
}

/// Vouchers of the market contract, kept for this node's wallet.
pub(crate) struct Payments {
    pub outbox: hotpot_chain::Outbox,
    pub address: [u8; 20],
}

impl Payments {
    /// Keeps `payment` (the gateway's voucher covering `receipt`) if it
    /// pays this node's wallet and its gateway's signature holds (else it
    /// is worth nothing: logged), and warns when the gateway's running
    /// total falls short of the receipts it handed this node.
    fn keep(&self, receipt: &hotpot_core::Receipt, payment: &hotpot_wire::ChainPayment) {
        use hotpot_chain::{Address, B256};
        let voucher = hotpot_chain::Voucher {
            node: Address::from(payment.node),
            gateway: Address::from(payment.gateway),
            total: payment.total,
            signature: payment.signature.to_vec(),
        };
        let market = Address::from(payment.market);
        let amount = receipt.amount.micros();
        let checked = if payment.node != self.address {
            Err(format!("it pays {}, not this node's wallet", voucher.node))
        } else if payment.total < amount {
            Err(format!("its total ({}) is less than the receipt's amount ({amount})", payment.total))
        } else {
            voucher.verify(payment.chain_id, market).map_err(|e| e.to_string())
        };
        let kept = checked.and_then(|()| self.outbox.keep(payment.chain_id, market, &voucher, B256::from(receipt.id()), amount).map_err(|e| e.to_string()));
        match kept {
            Ok(kept) if kept.short > 0 => tracing::warn!(gateway = %voucher.gateway, short = kept.short,
                "the gateway's voucher falls short of the receipts it handed this node (micro-credits)"),
            Ok(_) => tracing::debug!(receipt = %receipt.id_hex(), total = voucher.total, "kept a voucher for the chain"),
            Err(e) => tracing::warn!(receipt = %receipt.id_hex(), error = %e, "a receipt's voucher is not usable"),
        }
    }
}

pub(crate) async fn serve_session(peer: PeerId, stream: Stream, services: Services, limits: StreamLimits, stop: CancellationToken) {
    let Services { jobs, push, .. } = &services;
    let mut framed = Framed::new(peer, stream);
    let mut session: Option<SessionId> = None;
    let shutting_down = || NodeMessage::error(ErrorCode::ShuttingDown, "the node is shutting down").encode();
    loop {
        let received = tokio::select! {
            received = framed.recv_budgeted(limits.idle, limits.frame, &limits.budget) => received,
            () = stop.cancelled() => {
                let _ = framed.send(&shutting_down(), Duration::from_millis(500)).await;
                break;
            }
        };
        // The frame's memory stays reserved until its answer is sent.
        let (frame, _reserved) = match received {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "session stream ends");
                let _ = framed.send(&NodeMessage::error(ErrorCode::BadRequest, e.to_string()).encode(), limits.write).await;
                break;
            }
        };
        let message = match ClientMessage::decode(&frame) {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "malformed message");
                let _ = framed.send(&NodeMessage::error(ErrorCode::BadRequest, e.to_string()).encode(), limits.write).await;
                break;
            }
        };
        let (answer, fatal) = tokio::select! {
            handled = handle(peer, message, &mut session, &services, &limits) => handled,
            () = stop.cancelled() => (Some(NodeMessage::error(ErrorCode::ShuttingDown, "the node is shutting down")), true),
        };
        let Some(answer) = answer else { break };
        if framed.send(&answer.encode(), limits.write).await.is_err() || fatal {
            break;
        }
    }
    if let Some(session) = session {
        push.remove(&session);
        jobs.tell(Job::Close { owner: peer, session });
    }
    framed.close().await;
}

/// A prefill behind too much queued work is refused before it queues.
pub(crate) fn admission(step: &Step, jobs: &Jobs) -> Option<NodeMessage> {
    if step.hidden.rows() > 1 {
        let queued = jobs.load().queued_work();
        if queued > MAX_QUEUED_WORK {
            let wait = (queued - MAX_QUEUED_WORK).clamp(Duration::from_millis(200), Duration::from_secs(10));
            let message = format!("{:.1} s of prefill work is queued on this node", queued.as_secs_f64());
            return Some(NodeMessage::busy(wait, message));
        }
    }
    None
}

/// Answers one message; `None` ends the stream (after `Close`), `fatal`
/// ends it after the answer.
async fn handle(
    peer: PeerId,
    message: ClientMessage,
    session: &mut Option<SessionId>,
    services: &Services,
    limits: &StreamLimits,
) -> (Option<NodeMessage>, bool) {
    let Services { jobs, push, receipts, payments } = services;
    let mine = |id: SessionId, session: &Option<SessionId>| session.is_some_and(|s| s == id);
    let not_mine = || (Some(NodeMessage::error(ErrorCode::NotYourSession, "this stream carries another session")), false);
    match message {
        ClientMessage::Open(open) => {
            if session.is_some() {
                return (Some(NodeMessage::error(ErrorCode::BadRequest, "this stream already carries a session")), true);
            }
            let (id, links) = (open.session, open.push.clone());
            let answer = jobs.ask(|reply| Job::Open { owner: peer, open, reply }).await;
            if matches!(answer, NodeMessage::Opened { .. }) {
                *session = Some(id);
                if let Some(links) = links
                    && let Err(why) = push.register(id, peer, &links)
                {
                    return (Some(NodeMessage::error(ErrorCode::BadRequest, why)), true);
                }
            }
            (Some(answer), false)
        }
        ClientMessage::Step(step) => {
            if !mine(step.session, session) {
                return not_mine();
            }
            if let Some(refusal) = admission(&step, jobs) {
                return (Some(refusal), false);
            }
            (Some(jobs.ask(|reply| Job::Step { owner: peer, step, rewind: false, reply }).await), false)
        }
        ClientMessage::PushStep(step) => {
            if !mine(step.session, session) {
                return not_mine();
            }
            let Some(entry) = push.get(&step.session) else {
                return (Some(NodeMessage::error(ErrorCode::BadRequest, "this session was not opened for push")), false);
            };
            if let Some(refusal) = admission(&step, jobs) {
                return (Some(refusal), false);
            }
            let answer = jobs.ask(|reply| Job::Step { owner: peer, step, rewind: true, reply }).await;
            push.forward(&entry, &answer);
            (Some(answer), false)
        }
        ClientMessage::Collect { session: id, pos } => {
            if !mine(id, session) {
                return not_mine();
            }
            match push.get(&id) {
                Some(entry) => (Some(entry.collect(pos, limits.idle).await), false),
                None => (Some(NodeMessage::error(ErrorCode::BadRequest, "this session was not opened for push")), false),
            }
        }
        ClientMessage::Truncate { session: id, pos } => {
            if !mine(id, session) {
                return (Some(NodeMessage::error(ErrorCode::NotYourSession, "this stream carries another session")), false);
            }
            (Some(jobs.ask(|reply| Job::Truncate { owner: peer, session: id, pos, reply }).await), false)
        }
        ClientMessage::Close { session: id } => {
            if mine(id, session) {
                jobs.tell(Job::Close { owner: peer, session: id });
                *session = None;
            }
            (None, true)
        }
        ClientMessage::Receipt(receipt, payment) => {
            if !mine(receipt.session, session) {
                return not_mine();
            }
            match jobs.ask_receipt(peer, receipt).await {
                Ok(receipt) => {
                    let signature = receipt.node_signature.expect("countersigned");
                    if let (Some(payments), Some(payment)) = (payments, payment) {
                        let (payments, receipt) = (Arc::clone(payments), receipt.clone());
                        let _ = tokio::task::spawn_blocking(move || payments.keep(&receipt, &payment)).await;
                    }
                    if let Some(book) = receipts {
                        let book = Arc::clone(book);
                        let kept = tokio::task::spawn_blocking(move || book.keep(hotpot_ledger::Holder::Node, &receipt)).await;
                        if !matches!(kept, Ok(Ok(_))) {
                            tracing::error!(?kept, "cannot keep a countersigned receipt");
                        }
                    }
                    (Some(NodeMessage::Countersigned { signature }), false)
                }
                Err(refusal) => {
                    tracing::warn!(%peer, answer = ?refusal, "refused a receipt");
                    (Some(refusal), false)
                }
            }
        }
        ClientMessage::Audit { .. } => (Some(NodeMessage::error(ErrorCode::BadRequest, "audits go over /hotpot/audit/1")), true),
    }
}

/// Who may ask this node for audits, how often and how large: each peer
/// one at a time and [`AuditLimits::per_minute`] a minute, all peers
/// [`AuditLimits::queued`] at a time, each at most `max_rows` positions.
/// What does not fit is answered at once (`Busy` with a retry hint, or
/// `BadRequest`), never queued behind sessions.
#[derive(Debug)]
pub(crate) struct AuditGate {
    limits: AuditLimits,
    state: Mutex<AuditState>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct AuditLimits {
    pub per_minute: f64,
    pub queued: usize,
    pub max_rows: usize,
}

#[derive(Debug, Default)]
struct AuditState {
    /// Per peer: audits in flight, and a token bucket for the rate.
    peers: HashMap<PeerId, (u32, f64, Instant)>,
    in_flight: usize,
}

impl AuditGate {
    pub fn new(limits: AuditLimits) -> Self {
        Self { limits, state: Mutex::default() }
    }

    fn admit(&self, peer: PeerId, rows: usize) -> Result<(), NodeMessage> {
        if rows > self.limits.max_rows {
            return Err(NodeMessage::error(ErrorCode::BadRequest, format!("an audit may cover at most {} positions, got {rows}", self.limits.max_rows)));
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.in_flight >= self.limits.queued {
            return Err(NodeMessage::busy(Duration::from_secs(2), "this node is busy with other audits"));
        }
        let rate = self.limits.per_minute;
        let now = Instant::now();
        let (running, bucket, filled) = state.peers.entry(peer).or_insert((0, rate, now));
        *bucket = (*bucket + now.duration_since(*filled).as_secs_f64() * rate / 60.0).min(rate);
        *filled = now;
        if *running > 0 || *bucket < 1.0 {
            let refill = Duration::from_secs_f64(((1.0 - *bucket).max(0.0) * 60.0 / rate.max(1e-3)).min(3600.0)).max(Duration::from_secs(1));
            return Err(NodeMessage::busy(refill, "too many audits from this peer; try again later"));
        }
        *bucket -= 1.0;
        *running += 1;
        state.in_flight += 1;
        Ok(())
    }

    fn done(&self, peer: PeerId) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.in_flight = state.in_flight.saturating_sub(1);
        if let Some((running, ..)) = state.peers.get_mut(&peer) {
            *running = running.saturating_sub(1);
        }
        // Forget peers with nothing running and a full bucket.
        let rate = self.limits.per_minute;
        state.peers.retain(|_, (running, bucket, filled)| *running > 0 || *bucket + filled.elapsed().as_secs_f64() * rate / 60.0 < rate);
    }
}

/// One audit per stream: recompute a span over the given inputs.
#[allow(clippy::too_many_arguments, reason = "a task's captured context")]
pub(crate) async fn serve_audit(
    peer: PeerId,
    stream: Stream,
    jobs: Jobs,
    gate: std::sync::Arc<AuditGate>,
    model: hotpot_core::ModelId,
    dim: usize,
    limits: StreamLimits,
    stop: CancellationToken,
) {
    let mut framed = Framed::new(peer, stream);
    let received = tokio::select! {
        received = framed.recv_budgeted(limits.idle, limits.frame, &limits.budget) => received,
        () = stop.cancelled() => return,
    };
    if let Ok(Some((frame, _reserved))) = received {
        let answer = match ClientMessage::decode(&frame) {
            Ok(ClientMessage::Audit { model: m, .. }) if m != model => NodeMessage::error(ErrorCode::WrongModel, "this node serves another model"),
            Ok(ClientMessage::Audit { inputs, .. }) if inputs.cols() != dim => NodeMessage::error(ErrorCode::BadTensor, format!("inputs must be {dim} wide")),
            Ok(ClientMessage::Audit { span, inputs, .. }) => match gate.admit(peer, inputs.rows()) {
                Err(refusal) => refusal,
                Ok(()) => {
                    let answer = match hotpot_engine::HiddenStates::new(inputs.rows(), dim, inputs.to_f32()) {
                        Ok(inputs) => tokio::select! {
                            answer = jobs.ask(|reply| Job::Audit { span, inputs, reply }) => answer,
                            () = stop.cancelled() => NodeMessage::error(ErrorCode::ShuttingDown, "the node is shutting down"),
                        },
                        Err(e) => NodeMessage::error(ErrorCode::BadTensor, e.to_string()),
                    };
                    gate.done(peer);
                    answer
                }
            },
            Ok(_) => NodeMessage::error(ErrorCode::BadRequest, "expected an Audit request"),
            Err(e) => NodeMessage::error(ErrorCode::BadRequest, e.to_string()),
        };
        let _ = framed.send(&answer.encode(), limits.write).await;
    }
    framed.close().await;
}

/// Answers a stream over its protocol's cap with `Busy`; what the peer
/// sends meanwhile is read for a moment and thrown away (never kept), so
/// that its writes do not fail before it reads the answer.
pub(crate) async fn refuse(peer: PeerId, mut stream: Stream, why: &'static str) {
    use futures::AsyncReadExt;
    let answer = NodeMessage::busy(Duration::from_secs(1), why).encode();
    let _ = tokio::time::timeout(Duration::from_secs(1), hotpot_wire::write_frame(&mut stream, &answer)).await;
    let mut sink = [0u8; 16 << 10];
    let _ = tokio::time::timeout(Duration::from_secs(1), async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} }).await;
    let mut framed = Framed::new(peer, stream);
    framed.close().await;
}

pub(crate) async fn serve_info(peer: PeerId, stream: Stream, info: NodeInfo) {
    let mut framed = Framed::new(peer, stream);
    let timeout = Duration::from_secs(10);
    // An info request is two bytes.
    if let Ok(Some(frame)) = framed.recv_limited(timeout, 64).await {
        let answer = match InfoRequest::decode(&frame) {
            Ok(InfoRequest) => info.encode(),
            Err(e) => NodeMessage::error(ErrorCode::BadRequest, e.to_string()).encode(),
        };
        let _ = framed.send(&answer, timeout).await;
    }
    framed.close().await;
}
