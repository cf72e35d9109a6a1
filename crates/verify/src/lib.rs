//! Checking that nodes compute what they claim.
//!
//! Every node output is committed (hashes of the exact bytes, signed; see
//! `hotpot_core::Commitment`) and sketched ([`sketch`]). The gateway audits a
//! share of sessions by recomputing each span in one prefill and comparing
//! ([`audit`]); a failed audit is repeated by other executors, and a
//! majority of failures turns into [`evidence`] that anyone holding the
//! model can re-check.

pub mod audit;
pub mod evidence;
pub mod sketch;

pub use audit::{AuditPolicy, Comparison, Reputation, Tolerance, Verdict, compare};
pub use evidence::{Accuser, AuditRecord, Evidence, EvidenceError, EvidenceVerdict, Executor, ExecutorError, Kept};
pub use sketch::{CHUNK, Sketch, SketchBuilder, SketchCheck, SketchThresholds};
