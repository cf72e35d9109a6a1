//! Hotpot's gateway: the client side of the swarm.
//!
//! It keeps the parts of the model nodes never see (tokenizer, embedding,
//! head, sampling), learns the swarm from heartbeats and the DHT
//! ([`directory`]), plans routes over block spans ([`route`]), runs each
//! session as a chain of remote stages that fails over when a node dies
//! ([`chain`]), drives every session — API choices and `hotpot run` alike —
//! through one loop ([`session::drive`], speculating with [`speculate`])
//! that leaves a [`SessionRecord`]
//! for billing, audits, metrics and the session log, and serves all of this
//! as the OpenAI API ([`api`], [`openai`]).

pub mod api;
pub mod audit;
pub mod batch;
pub mod chain;
pub mod constrain;
pub mod directory;
mod error;
pub mod files;
pub mod heads;
pub mod http;
pub mod keys;
pub mod market;
pub mod metrics;
pub mod onchain;
pub mod openai;
mod plan;
mod prep;
mod render;
pub mod responses;
pub mod route;
mod service;
pub mod session;
pub mod speculate;
pub mod spend;
pub mod swarm;
pub mod tools;

pub use api::router;
pub use audit::{AuditConfig, Auditor, LocalExecutor};
pub use chain::{
    AuditSelector, ChainConfig, ChainContext, ChainError, ChainEvent, Eligible, Observer, RemoteChain, StageRecord, StageTranscript, describe_route,
};
pub use directory::{Directory, NodeRecord, SharedDirectory};
pub use error::ApiError;
pub use http::{HttpLimits, serve};
pub use keys::{Caller, CreditReservation, KeySpec, KeyStatus, KeyStore, KeysError, Ledger, Limits, Reservation};
pub use market::{Market, Penalty};
pub use onchain::{OnChain, OnChainConfig};
pub use route::{Candidate, Hop, MissingBlocks, plan};
pub use service::{Gateway, GatewayConfig, ServedModel};
pub use session::{ChoiceJob, EventSink, Finish, LocalPipeline, Outcome, Pipeline, RecordSink, SessionContext, SessionEvent, SessionLog, SessionRecord, drive};
pub use speculate::{DraftModel, DraftSource, Speculation, SpeculationStats};
