//! The messages of `/hotpot/infer/1` and `/hotpot/info/1`, and their bytes.

use hotpot_core::{Commitment, Credits, LayerSpan, ModelId, NodeId, Receipt, SessionId, Signature};

use crate::codec::{Reader, Writer};
use crate::tensor::Tensor;
use crate::{VERSION, WireError};

/// Opens a session over `span` of `model`, holding at most `max_len`
/// positions (the node's cache grows as the session does, up to that).
#[derive(Debug, Clone, PartialEq)]
pub struct Open {
    pub session: SessionId,
    pub model: ModelId,
    pub span: LayerSpan,
    pub max_len: u32,
    pub priority: Priority,
    /// Node-to-node push: where this session's steps may come from and
    /// where its outputs go (none: the opener sends every step itself).
    pub push: Option<PushLinks>,
}

/// A pushed session's place in its chain, as the gateway that opened it
/// planned the route: the node may accept forwarded steps (over
/// `/hotpot/push/1`) only from `upstream`, and forwards each output to
/// `downstream`'s session. Every output still goes to the opener too,
/// answering its `Collect` (or its `PushStep`, on the first node).
#[derive(Debug, Clone, PartialEq)]
pub struct PushLinks {
    pub upstream: Option<NodeId>,
    pub downstream: Option<Downstream>,
}

/// The next node of a pushed chain and its session there.
#[derive(Debug, Clone, PartialEq)]
pub struct Downstream {
    pub node: NodeId,
    pub session: SessionId,
    /// Where it listens (multiaddrs), in case this node has not met it.
    pub addrs: Vec<String>,
}

/// What a node can do beyond the base protocol (`NodeInfo::features`).
pub mod features {
    /// Node-to-node push (`Open::push`, `PushStep`, `Collect`, `/hotpot/push/1`).
    pub const PUSH: u32 = 1;
}

/// How a node schedules a session's steps: interactive sessions first,
/// then audits, then batch work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    fn tag(self) -> u8 {
        match self {
            Self::Interactive => 0,
            Self::Batch => 1,
        }
    }

    fn from_tag(tag: u8) -> Result<Self, WireError> {
        match tag {
            0 => Ok(Self::Interactive),
            1 => Ok(Self::Batch),
            _ => Err(WireError::Invalid("priority")),
        }
    }
}

/// Hidden states of positions `pos .. pos + rows` to run through the span.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub session: SessionId,
    pub pos: u32,
    pub hidden: Tensor,
}

/// Client → node.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Open(Open),
    Step(Step),
    /// Keep only the first `pos` positions of the session's cache.
    Truncate {
        session: SessionId,
        pos: u32,
    },
    Close {
        session: SessionId,
    },
    /// A pushed session's step from its opener (the chain's first node):
    /// answered like `Step`, and the output also forwarded downstream.
    /// Positions from `pos` on are dropped first (a rollback rides on the
    /// step, so no separate `Truncate` races the forwarded steps).
    PushStep(Step),
    /// A pushed session's opener asks for the output of the forwarded step
    /// at `pos`: answered (`Output`, `Busy` or `Error`) once it is computed.
    Collect {
        session: SessionId,
        pos: u32,
    },
    /// The gateway's receipt for this stream's session, sent before
    /// `Close`: answered `Countersigned` when it matches the node's own
    /// count of positions and commitments, `Error` otherwise. With a
    /// market on a chain, `payment` is the gateway's voucher covering this
    /// receipt, which the node keeps to settle it itself if need be.
    Receipt(Box<Receipt>, Option<Box<ChainPayment>>),
    /// `/hotpot/audit/1`: recompute `span` over `inputs` (positions 0..),
    /// in one prefill, on a fresh cache.
    Audit {
        model: ModelId,
        span: LayerSpan,
        inputs: Tensor,
    },
}

/// Why a node refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    WrongModel,
    SpanNotServed,
    UnknownSession,
    NotYourSession,
    BadPosition,
    BadTensor,
    ContextFull,
    Internal,
    /// The node is stopping: its sessions end now, go elsewhere.
    ShuttingDown,
    /// The opener owes this node receipts for sessions it closed.
    ReceiptsOwed,
    /// A receipt does not match the node's own count.
    BadReceipt,
}

impl ErrorCode {
    const ALL: [ErrorCode; 12] = [
        Self::BadRequest,
        Self::WrongModel,
        Self::SpanNotServed,
        Self::UnknownSession,
        Self::NotYourSession,
        Self::BadPosition,
        Self::BadTensor,
        Self::ContextFull,
        Self::Internal,
        Self::ShuttingDown,
        Self::ReceiptsOwed,
        Self::BadReceipt,
    ];

    fn tag(self) -> u8 {
        Self::ALL.iter().position(|c| *c == self).map_or(255, |i| i as u8 + 1)
    }

    fn from_tag(tag: u8) -> Self {
        Self::ALL.get(usize::from(tag).wrapping_sub(1)).copied().unwrap_or(Self::Internal)
    }
}

/// Node → client.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeMessage {
    Opened {
        session: SessionId,
        max_len: u32,
    },
    Output {
        session: SessionId,
        hidden: Tensor,
        commitment: Box<Commitment>,
    },
    Truncated {
        session: SessionId,
        len: u32,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Not now: the node is at capacity (session slots, cache memory,
    /// queued work or audit limits). Nothing was queued; the request may be
    /// sent again after `retry_after_ms`, here or elsewhere. Load, not a
    /// failure.
    Busy {
        retry_after_ms: u32,
        message: String,
    },
    /// The answer to `Audit`.
    Audited {
        outputs: Tensor,
    },
    /// The node's countersignature of a `Receipt`.
    Countersigned {
        signature: Signature,
    },
}

/// Asks a node to describe itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoRequest;

/// What a node says about itself, on request and in heartbeats.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub node: NodeId,
    pub model: ModelId,
    /// A human name for the model (its alias), for status displays.
    pub model_name: String,
    pub n_blocks: u32,
    pub span: LayerSpan,
    /// Measured decode speed of the whole span, tokens/s.
    pub throughput: f32,
    pub free_slots: u32,
    pub max_sessions: u32,
    /// Steps waiting for the engine.
    pub queue: u32,
    /// Credits per 1000 tokens.
    pub price_per_1k: u64,
    pub version: String,
    pub addrs: Vec<String>,
    /// Milliseconds since the Unix epoch when this was written.
    pub timestamp_ms: u64,
    /// What the node can do beyond the base protocol ([`features`]).
    pub features: u32,
    /// The node's wallet on the market's chain, bound to its key.
    pub wallet: Option<WalletProof>,
}

/// A node's payout address on a chain, signed both ways: by the node's
/// ed25519 key (this address is mine) and by the wallet's secp256k1 key
/// (this node is mine); `hotpot-chain` checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletProof {
    pub address: [u8; 20],
    pub node_signature: Signature,
    pub wallet_signature: [u8; 65],
}

/// What pays a receipt on the market contract: the gateway's voucher
/// (EIP-712) that it has owed `node` `total` micro-credits in all (this
/// receipt included), which the contract on chain `chain_id` at `market`
/// pays from `gateway`'s deposit, less what the pair was paid before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainPayment {
    pub chain_id: u64,
    pub market: [u8; 20],
    pub node: [u8; 20],
    pub gateway: [u8; 20],
    pub total: u64,
    pub signature: [u8; 65],
}

/// Gossiped by an auditor that confirmed a conviction (topic
/// `hotpot/<model>/cosign`): its signature on (node, model, evidence) for
/// the market contract, which slashes once a quorum of registered
/// auditors signed the same conviction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvictionSignature {
    pub chain_id: u64,
    pub market: [u8; 20],
    /// The convicted node's wallet address.
    pub node: [u8; 20],
    pub model: ModelId,
    /// The evidence file's BLAKE3.
    pub evidence: [u8; 32],
    pub auditor: [u8; 20],
    pub signature: [u8; 65],
}

impl ConvictionSignature {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        header(&mut w, TAG_CONVICTION_SIGNATURE);
        w.u64(self.chain_id).fixed(&self.market).fixed(&self.node).fixed(self.model.as_bytes());
        w.fixed(&self.evidence).fixed(&self.auditor).fixed(&self.signature);
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes);
        let tag = read_header(&mut r)?;
        if tag != TAG_CONVICTION_SIGNATURE {
            return Err(WireError::Tag(tag));
        }
        let (chain_id, market, node, model) = (r.u64()?, r.array()?, r.array()?, ModelId::from_bytes(r.array()?));
        let (evidence, auditor, signature) = (r.array()?, r.array()?, r.array()?);
        r.finish()?;
        Ok(Self { chain_id, market, node, model, evidence, auditor, signature })
    }
}

const TAG_OPEN: u8 = 1;
const TAG_STEP: u8 = 2;
const TAG_TRUNCATE: u8 = 3;
const TAG_CLOSE: u8 = 4;
const TAG_AUDIT: u8 = 5;
const TAG_PUSH_STEP: u8 = 6;
const TAG_COLLECT: u8 = 7;
const TAG_RECEIPT: u8 = 8;
const TAG_OPENED: u8 = 16;
const TAG_OUTPUT: u8 = 17;
const TAG_TRUNCATED: u8 = 18;
const TAG_ERROR: u8 = 19;
const TAG_AUDITED: u8 = 20;
const TAG_BUSY: u8 = 21;
const TAG_COUNTERSIGNED: u8 = 22;
const TAG_INFO_REQUEST: u8 = 32;
const TAG_INFO: u8 = 33;
const TAG_ACCUSATION: u8 = 48;
const TAG_EVIDENCE_REQUEST: u8 = 49;
const TAG_EVIDENCE: u8 = 50;
const TAG_CONVICTION_SIGNATURE: u8 = 51;

const MAX_TEXT: usize = 4096;
const MAX_ADDRS: usize = 32;

fn header(w: &mut Writer, tag: u8) {
    w.u8(VERSION).u8(tag);
}

fn read_header(r: &mut Reader<'_>) -> Result<u8, WireError> {
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    r.u8()
}

fn span(r: &mut Reader<'_>) -> Result<LayerSpan, WireError> {
    let (start, end) = (r.u32()?, r.u32()?);
    LayerSpan::new(start, end).map_err(|_| WireError::Invalid("empty span"))
}

fn write_span(w: &mut Writer, s: LayerSpan) {
    w.u32(s.start()).u32(s.end());
}

fn session(r: &mut Reader<'_>) -> Result<SessionId, WireError> {
    Ok(SessionId(r.array()?))
}

fn write_push(w: &mut Writer, push: &PushLinks) {
    match &push.upstream {
        Some(node) => w.u8(1).fixed(node.as_bytes()),
        None => w.u8(0),
    };
    match &push.downstream {
        Some(d) => {
            w.u8(1).fixed(d.node.as_bytes()).fixed(&d.session.0).u32(d.addrs.len().min(MAX_ADDRS) as u32);
            for addr in d.addrs.iter().take(MAX_ADDRS) {
                w.str(addr);
            }
        }
        None => {
            w.u8(0);
        }
    }
}

fn read_push(r: &mut Reader<'_>) -> Result<PushLinks, WireError> {
    let upstream = match r.u8()? {
        0 => None,
        1 => Some(NodeId::from_bytes(r.array()?)),
        _ => return Err(WireError::Invalid("upstream presence flag")),
    };
    let downstream = match r.u8()? {
        0 => None,
        1 => {
            let (node, session) = (NodeId::from_bytes(r.array()?), session(r)?);
            Some(Downstream { node, session, addrs: read_addrs(r)? })
        }
        _ => return Err(WireError::Invalid("downstream presence flag")),
    };
    Ok(PushLinks { upstream, downstream })
}

fn read_addrs(r: &mut Reader<'_>) -> Result<Vec<String>, WireError> {
    let n_addrs = r.u32()? as usize;
    if n_addrs > MAX_ADDRS {
        return Err(WireError::TooLong { what: "address list", len: n_addrs, max: MAX_ADDRS });
    }
    (0..n_addrs).map(|_| r.str(MAX_TEXT)).collect()
}

/// Most sketches one commitment may carry, and the largest one.
const MAX_SKETCHES: usize = 64;
const MAX_SKETCH_BYTES: usize = 4096;

fn write_commitment(w: &mut Writer, c: &Commitment) {
    w.fixed(&c.session.0).fixed(c.model.as_bytes());
    write_span(w, c.span);
    w.u32(c.start_pos).u32(c.rows).fixed(&c.input_hash).fixed(&c.output_hash).fixed(c.node.as_bytes());
    w.u32(c.sketches.len() as u32);
    for sketch in &c.sketches {
        w.bytes(sketch);
    }
    w.fixed(&c.signature.0);
}

/// Bytes `c` takes on the wire.
pub fn commitment_wire_bytes(c: &Commitment) -> usize {
    let mut w = Writer::default();
    write_commitment(&mut w, c);
    w.buf.len()
}

fn read_commitment(r: &mut Reader<'_>) -> Result<Commitment, WireError> {
    let (session, model, span, start_pos, rows) = (session(r)?, ModelId::from_bytes(r.array()?), span(r)?, r.u32()?, r.u32()?);
    let (input_hash, output_hash, node) = (r.array()?, r.array()?, NodeId::from_bytes(r.array()?));
    let count = r.u32()? as usize;
    if count > MAX_SKETCHES {
        return Err(WireError::TooLong { what: "sketch list", len: count, max: MAX_SKETCHES });
    }
    let sketches = (0..count).map(|_| r.bytes(MAX_SKETCH_BYTES).map(<[u8]>::to_vec)).collect::<Result<_, _>>()?;
    Ok(Commitment { session, model, span, start_pos, rows, input_hash, output_hash, node, sketches, signature: Signature(r.array()?) })
}

fn write_receipt(w: &mut Writer, r: &Receipt) {
    w.fixed(&r.session.0).fixed(r.model.as_bytes()).fixed(r.node.as_bytes());
    write_span(w, r.span);
    w.u64(r.positions).u64(r.price_per_1k.micros()).u64(r.amount.micros()).fixed(&r.commitments_root);
    w.fixed(r.gateway.as_bytes()).u64(r.time_ms).fixed(&r.gateway_signature.0);
    match &r.node_signature {
        Some(s) => w.u8(1).fixed(&s.0),
        None => w.u8(0),
    };
}

fn read_receipt(r: &mut Reader<'_>) -> Result<Receipt, WireError> {
    let (session, model, node, span) = (session(r)?, ModelId::from_bytes(r.array()?), NodeId::from_bytes(r.array()?), span(r)?);
    let (positions, price_per_1k, amount) = (r.u64()?, Credits::from_micros(r.u64()?), Credits::from_micros(r.u64()?));
    let (commitments_root, gateway, time_ms, gateway_signature) = (r.array()?, NodeId::from_bytes(r.array()?), r.u64()?, Signature(r.array()?));
    let node_signature = match r.u8()? {
        0 => None,
        1 => Some(Signature(r.array()?)),
        _ => return Err(WireError::Invalid("receipt countersignature flag")),
    };
    Ok(Receipt { session, model, node, span, positions, price_per_1k, amount, commitments_root, gateway, time_ms, gateway_signature, node_signature })
}

impl ClientMessage {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Self::Open(o) => {
                header(&mut w, TAG_OPEN);
                w.fixed(&o.session.0).fixed(o.model.as_bytes());
                write_span(&mut w, o.span);
                w.u32(o.max_len).u8(o.priority.tag());
                // Push links ride at the end, only when present.
                if let Some(push) = &o.push {
                    write_push(&mut w, push);
                }
            }
            Self::Step(s) | Self::PushStep(s) => {
                header(&mut w, if matches!(self, Self::Step(_)) { TAG_STEP } else { TAG_PUSH_STEP });
                w.fixed(&s.session.0).u32(s.pos);
                s.hidden.write(&mut w);
            }
            Self::Collect { session, pos } => {
                header(&mut w, TAG_COLLECT);
                w.fixed(&session.0).u32(*pos);
            }
            Self::Truncate { session, pos } => {
                header(&mut w, TAG_TRUNCATE);
                w.fixed(&session.0).u32(*pos);
            }
            Self::Close { session } => {
                header(&mut w, TAG_CLOSE);
                w.fixed(&session.0);
            }
            Self::Receipt(receipt, payment) => {
                header(&mut w, TAG_RECEIPT);
                write_receipt(&mut w, receipt);
                // An optional tail: nodes from before chains read the base.
                if let Some(p) = payment {
                    w.u64(p.chain_id).fixed(&p.market).fixed(&p.node).fixed(&p.gateway).u64(p.total).fixed(&p.signature);
                }
            }
            Self::Audit { model, span, inputs } => {
                header(&mut w, TAG_AUDIT);
                w.fixed(model.as_bytes());
                write_span(&mut w, *span);
                inputs.write(&mut w);
            }
        }
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes);
        let msg = match read_header(&mut r)? {
            TAG_OPEN => Self::Open(Open {
                session: session(&mut r)?,
                model: ModelId::from_bytes(r.array()?),
                span: span(&mut r)?,
                max_len: r.u32()?,
                priority: Priority::from_tag(r.u8()?)?,
                push: if r.remaining() > 0 { Some(read_push(&mut r)?) } else { None },
            }),
            TAG_STEP => Self::Step(Step { session: session(&mut r)?, pos: r.u32()?, hidden: Tensor::read(&mut r)? }),
            TAG_PUSH_STEP => Self::PushStep(Step { session: session(&mut r)?, pos: r.u32()?, hidden: Tensor::read(&mut r)? }),
            TAG_COLLECT => Self::Collect { session: session(&mut r)?, pos: r.u32()? },
            TAG_TRUNCATE => Self::Truncate { session: session(&mut r)?, pos: r.u32()? },
            TAG_CLOSE => Self::Close { session: session(&mut r)? },
            TAG_RECEIPT => {
                let receipt = Box::new(read_receipt(&mut r)?);
                let payment = if r.remaining() > 0 {
                    Some(Box::new(ChainPayment {
                        chain_id: r.u64()?,
                        market: r.array()?,
                        node: r.array()?,
                        gateway: r.array()?,
                        total: r.u64()?,
                        signature: r.array()?,
                    }))
                } else {
                    None
                };
                Self::Receipt(receipt, payment)
            }
            TAG_AUDIT => Self::Audit { model: ModelId::from_bytes(r.array()?), span: span(&mut r)?, inputs: Tensor::read(&mut r)? },
            tag => return Err(WireError::Tag(tag)),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// `message`, cut to what the wire carries.
fn bounded(message: impl Into<String>) -> String {
    let mut message: String = message.into();
    if message.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    message
}

impl NodeMessage {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error { code, message: bounded(message) }
    }

    /// `Busy`, to be asked again after `retry_after`.
    pub fn busy(retry_after: std::time::Duration, message: impl Into<String>) -> Self {
        Self::Busy { retry_after_ms: retry_after.as_millis().clamp(1, u128::from(u32::MAX)) as u32, message: bounded(message) }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Self::Opened { session, max_len } => {
                header(&mut w, TAG_OPENED);
                w.fixed(&session.0).u32(*max_len);
            }
            Self::Output { session, hidden, commitment } => {
                header(&mut w, TAG_OUTPUT);
                w.fixed(&session.0);
                hidden.write(&mut w);
                write_commitment(&mut w, commitment);
            }
            Self::Truncated { session, len } => {
                header(&mut w, TAG_TRUNCATED);
                w.fixed(&session.0).u32(*len);
            }
            Self::Error { code, message } => {
                header(&mut w, TAG_ERROR);
                w.u8(code.tag()).str(message);
            }
            Self::Busy { retry_after_ms, message } => {
                header(&mut w, TAG_BUSY);
                w.u32(*retry_after_ms).str(message);
            }
            Self::Audited { outputs } => {
                header(&mut w, TAG_AUDITED);
                outputs.write(&mut w);
            }
            Self::Countersigned { signature } => {
                header(&mut w, TAG_COUNTERSIGNED);
                w.fixed(&signature.0);
            }
        }
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes);
        let msg = match read_header(&mut r)? {
            TAG_OPENED => Self::Opened { session: session(&mut r)?, max_len: r.u32()? },
            TAG_OUTPUT => Self::Output { session: session(&mut r)?, hidden: Tensor::read(&mut r)?, commitment: Box::new(read_commitment(&mut r)?) },
            TAG_TRUNCATED => Self::Truncated { session: session(&mut r)?, len: r.u32()? },
            TAG_ERROR => Self::Error { code: ErrorCode::from_tag(r.u8()?), message: r.str(MAX_TEXT)? },
            TAG_BUSY => Self::Busy { retry_after_ms: r.u32()?, message: r.str(MAX_TEXT)? },
            TAG_AUDITED => Self::Audited { outputs: Tensor::read(&mut r)? },
            TAG_COUNTERSIGNED => Self::Countersigned { signature: Signature(r.array()?) },
            tag => return Err(WireError::Tag(tag)),
        };
        r.finish()?;
        Ok(msg)
    }
}

impl InfoRequest {
    pub fn encode(&self) -> Vec<u8> {
        vec![VERSION, TAG_INFO_REQUEST]
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes);
        match read_header(&mut r)? {
            TAG_INFO_REQUEST => {
                r.finish()?;
                Ok(Self)
            }
            tag => Err(WireError::Tag(tag)),
        }
    }
}

impl NodeInfo {
    /// "private" when the node listens through a relay (it announces a
    /// relay circuit address: AutoNAT found it unreachable, or it was told
    /// to reserve), else "public".
    pub fn reachability(&self) -> &'static str {
        if self.circuit_addr().is_some() { "private" } else { "public" }
    }

    /// The first address it announces through a relay, if any.
    pub fn circuit_addr(&self) -> Option<&str> {
        self.addrs.iter().map(String::as_str).find(|a| a.contains("/p2p-circuit"))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        header(&mut w, TAG_INFO);
        w.fixed(self.node.as_bytes()).fixed(self.model.as_bytes()).str(&self.model_name).u32(self.n_blocks);
        write_span(&mut w, self.span);
        w.f32(self.throughput).u32(self.free_slots).u32(self.max_sessions).u32(self.queue).u64(self.price_per_1k);
        w.str(&self.version).u32(self.addrs.len().min(MAX_ADDRS) as u32);
        for addr in self.addrs.iter().take(MAX_ADDRS) {
            w.str(addr);
        }
        w.u64(self.timestamp_ms).u32(self.features);
        // An optional tail, like the features before it.
        if let Some(p) = &self.wallet {
            w.fixed(&p.address).fixed(&p.node_signature.0).fixed(&p.wallet_signature);
        }
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes);
        let tag = read_header(&mut r)?;
        if tag != TAG_INFO {
            return Err(WireError::Tag(tag));
        }
        let node = NodeId::from_bytes(r.array()?);
        let model = ModelId::from_bytes(r.array()?);
        let model_name = r.str(MAX_TEXT)?;
        let n_blocks = r.u32()?;
        let span = span(&mut r)?;
        if span.end() > n_blocks {
            return Err(WireError::Invalid("span beyond the model's blocks"));
        }
        let throughput = r.f32()?;
        if !throughput.is_finite() || throughput < 0.0 {
            return Err(WireError::Invalid("throughput is not a finite positive number"));
        }
        let (free_slots, max_sessions, queue, price_per_1k) = (r.u32()?, r.u32()?, r.u32()?, r.u64()?);
        let version = r.str(MAX_TEXT)?;
        let addrs = read_addrs(&mut r)?;
        let timestamp_ms = r.u64()?;
        // Nodes from before features were announced have none.
        let features = if r.remaining() > 0 { r.u32()? } else { 0 };
        let wallet = if r.remaining() > 0 {
            Some(WalletProof { address: r.array()?, node_signature: Signature(r.array()?), wallet_signature: r.array()? })
        } else {
            None
        };
        r.finish()?;
        Ok(Self {
            node,
            model,
            model_name,
            n_blocks,
            span,
            throughput,
            free_slots,
            max_sessions,
            queue,
            price_per_1k,
            version,
            addrs,
            timestamp_ms,
            features,
            wallet,
        })
    }
}

/// Gossiped by a gateway that convicted a node (topic `hotpot/<model>/cheats`):
/// "node `node` cheated on blocks `span`; ask me for evidence `evidence`
/// (the BLAKE3 of its bytes) over `/hotpot/evidence/1`". The accuser is the
/// gossip message's signed author. A gateway that hears it fetches the
/// evidence, checks the accused node's signatures, recomputes, and bans the
/// node only if its own audit agrees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accusation {
    pub node: NodeId,
    pub model: ModelId,
    pub span: LayerSpan,
    pub evidence: [u8; 32],
    /// Where the accuser listens (multiaddrs), to fetch the evidence from.
    pub addrs: Vec<String>,
}

impl Accusation {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        header(&mut w, TAG_ACCUSATION);
        w.fixed(self.node.as_bytes()).fixed(self.model.as_bytes());
        write_span(&mut w, self.span);
        w.fixed(&self.evidence).u32(self.addrs.len().min(MAX_ADDRS) as u32);
        for addr in self.addrs.iter().take(MAX_ADDRS) {
            w.str(addr);
        }
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes);
        let tag = read_header(&mut r)?;
        if tag != TAG_ACCUSATION {
            return Err(WireError::Tag(tag));
        }
        let (node, model, span, evidence) = (NodeId::from_bytes(r.array()?), ModelId::from_bytes(r.array()?), span(&mut r)?, r.array()?);
        let addrs = read_addrs(&mut r)?;
        r.finish()?;
        Ok(Self { node, model, span, evidence, addrs })
    }
}

/// `/hotpot/evidence/1`: one request for evidence by hash, one answer: the
/// evidence file's bytes (JSON, see `hotpot-verify`), or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvidenceMessage {
    Request { evidence: [u8; 32] },
    Evidence { bytes: Option<Vec<u8>> },
}

impl EvidenceMessage {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Self::Request { evidence } => {
                header(&mut w, TAG_EVIDENCE_REQUEST);
                w.fixed(evidence);
            }
            Self::Evidence { bytes } => {
                header(&mut w, TAG_EVIDENCE);
                match bytes {
                    Some(bytes) => w.u8(1).bytes(bytes),
                    None => w.u8(0),
                };
            }
        }
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes);
        let message = match read_header(&mut r)? {
            TAG_EVIDENCE_REQUEST => Self::Request { evidence: r.array()? },
            TAG_EVIDENCE => match r.u8()? {
                0 => Self::Evidence { bytes: None },
                1 => Self::Evidence { bytes: Some(r.bytes(crate::MAX_FRAME)?.to_vec()) },
                _ => return Err(WireError::Invalid("evidence presence flag")),
            },
            tag => return Err(WireError::Tag(tag)),
        };
        r.finish()?;
        Ok(message)
    }
}
