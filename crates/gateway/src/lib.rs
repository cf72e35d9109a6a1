//! Hotpot's gateway: the client side of the swarm.
//!
//! It keeps the parts of the model nodes never see (tokenizer, embedding,
//! head, sampling), learns the swarm from heartbeats and the DHT
//! ([`directory`]), plans routes over block spans ([`route`]), runs each
//! session as a chain of remote stages that fails over when a node dies
//! ([`chain`]), drives generation through it ([`generate_remote`]), and
//! serves all of this as the OpenAI API ([`api`], [`openai`]).

pub mod api;
pub mod audit;
pub mod chain;
pub mod directory;
mod error;
pub mod keys;
pub mod metrics;
pub mod openai;
pub mod route;
mod service;

use std::sync::Arc;

use hotpot_engine::{ClientParts, FinishReason, Generation, Step};

pub use api::router;
pub use audit::{AuditConfig, Auditor, LocalExecutor};
pub use chain::{ChainConfig, ChainError, ChainEvent, Observer, RemoteChain, StageTranscript, describe_route};
pub use directory::{Directory, NodeRecord, SharedDirectory};
pub use error::ApiError;
pub use keys::KeyStore;
pub use route::{Candidate, Hop, MissingBlocks, plan};
pub use service::{Gateway, GatewayConfig, ServedModel};

/// Runs `generation` to the end through `chain`, calling `on_step` for each
/// token. The client's own compute (embedding, head) runs on blocking
/// threads so the network keeps moving.
pub async fn generate_remote(
    client: &Arc<ClientParts>,
    chain: &mut RemoteChain,
    generation: &mut Generation,
    mut on_step: impl FnMut(&Step),
) -> Result<FinishReason, ChainError> {
    loop {
        if let Some(reason) = generation.finished() {
            return Ok(reason);
        }
        let (tokens, start) = generation.pending();
        let tokens = tokens.to_vec();
        let parts = Arc::clone(client);
        let hidden = blocking(move || parts.embed(&tokens)).await??;
        let out = chain.forward(hidden, start).await?;
        generation.mark_fed();
        let parts = Arc::clone(client);
        let logits = blocking(move || parts.logits(&out.last_row())).await??;
        let step = generation.accept(&logits, client);
        on_step(&step);
    }
}

/// Runs client compute without stalling the runtime: in place on a
/// multi-threaded runtime (other tasks move to other workers; no thread
/// hand-off per token), on the blocking pool otherwise.
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R, ChainError> {
    if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        return Ok(tokio::task::block_in_place(f));
    }
    tokio::task::spawn_blocking(f).await.map_err(|e| ChainError::Internal(e.to_string()))
}
