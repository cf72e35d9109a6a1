//! Hotpot's wire protocol: the messages nodes and clients exchange, their
//! byte encoding, and length-prefixed framing over any async byte stream.
//!
//! ```text
//! frame   = len: u32 LE (≤ MAX_FRAME, checked before allocating) · payload
//! payload = version: u8 (= 2) · tag: u8 · fields (little-endian)
//! ```
//!
//! A session is one stream of `/hotpot/infer/1`: the client sends `Open`,
//! then `Step`s (each answered by an `Output` carrying the node's signed
//! `Commitment`), `Truncate`s, and `Close`. `/hotpot/info/1` answers one
//! `InfoRequest` with the node's `NodeInfo`, which is also what gossip
//! heartbeats carry. `/hotpot/audit/1` asks a node to recompute a span over
//! given inputs; gateways gossip an `Accusation` when they convict a node
//! and serve the evidence over `/hotpot/evidence/1`. In a pushed chain
//! (`Open::push`) the first node gets `PushStep`s, each node forwards its
//! output to the next over `/hotpot/push/1`, and the gateway `Collect`s
//! every node's output (with its commitment) on that node's session stream. Hidden states travel as f32 by default so a pipeline is
//! bit-identical to one process.

mod codec;
mod frame;
mod message;
mod tensor;

pub use codec::{Reader, Writer};
pub use frame::{read_frame, read_frame_len, read_payload, write_frame};
pub use message::{
    Accusation, ChainPayment, ClientMessage, ConvictionSignature, Downstream, ErrorCode, EvidenceMessage, InfoRequest, NodeInfo, NodeMessage, Open, Priority,
    PushLinks, Step, WalletProof, commitment_wire_bytes, features,
};
pub use tensor::{DType, Tensor};

/// Protocol names.
pub const PROTOCOL_INFER: &str = "/hotpot/infer/1";
pub const PROTOCOL_INFO: &str = "/hotpot/info/1";
pub const PROTOCOL_AUDIT: &str = "/hotpot/audit/1";
pub const PROTOCOL_EVIDENCE: &str = "/hotpot/evidence/1";
/// Node-to-node push: the previous node of a pushed chain sends its
/// outputs as `Step`s for this node's session (see [`PushLinks`]).
pub const PROTOCOL_PUSH: &str = "/hotpot/push/1";

/// The payload format version this crate writes and reads.
pub const VERSION: u8 = 2;

/// The largest frame accepted: a 16k-token prefill of a 1k-wide model in f32
/// is 64 MiB.
pub const MAX_FRAME: usize = 64 << 20;

/// A message that cannot be decoded, or a stream that broke.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message truncated: needed {needed} more bytes, {left} left")]
    Truncated { needed: usize, left: usize },
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("unsupported protocol version {0} (this node speaks {VERSION})")]
    Version(u8),
    #[error("unknown message tag {0}")]
    Tag(u8),
    #[error("invalid message: {0}")]
    Invalid(&'static str),
    #[error("{0} bytes left over after the message")]
    Trailing(usize),
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}
