//! Hotpot's base vocabulary, shared by every other crate.
//!
//! Everything here is plain data: which model (`ModelId`), which blocks of it
//! (`LayerSpan`). It links neither an async runtime nor a tensor library, so
//! the wire format, the ledger and the engine can all agree on these types
//! without pulling each other in.

mod model_id;
mod span;

pub use model_id::{ModelId, ParseModelIdError};
pub use span::{LayerSpan, ParseSpanError};
