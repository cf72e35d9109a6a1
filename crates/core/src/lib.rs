//! Hotpot's base vocabulary, shared by every other crate.
//!
//! Everything here is plain data: which model (`ModelId`), which blocks of it
//! (`LayerSpan`), who computed them (`NodeId`, `NodeKey`) and what they
//! signed (`Commitment`). It links neither an async runtime nor a tensor library, so
//! the wire format, the ledger and the engine can all agree on these types
//! without pulling each other in.

mod commitment;
mod credits;
pub mod fsutil;
mod keys;
mod model_id;
pub mod placement;
mod receipt;
mod span;

pub use commitment::{Commitment, CommitmentError, SessionId, StepRecord, hash};
pub use credits::{Credits, MICROS_PER_CREDIT, ParseCreditsError};
pub use keys::{KeyError, NodeId, NodeKey, Signature};
pub use model_id::{ModelId, ParseModelIdError};
pub use receipt::{Receipt, ReceiptError, RootBuilder, commitments_root, hex, unhex};
pub use span::{LayerSpan, ParseSpanError};
