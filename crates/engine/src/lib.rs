//! Hotpot's inference engine: runs any span `[a, b)` of a GGUF model's
//! transformer blocks on CPU, plus the client parts (tokenizer, chat
//! template, embedding, head, sampling) that the gateway keeps for itself.
//!
//! The engine links neither an async runtime nor a network stack; nodes and
//! gateways drive it from their own threads. Its kernels are written so that
//! every result is bit-identical whatever the thread count, the CPU's vector
//! width, the split of blocks into spans, and prefill versus decode (see
//! [`kernels::matrix`]) — the property audits of a node's work rest on.
//!
//! ```text
//! tokens ─ ClientParts::embed ─▶ Span[0,k) ─▶ Span[k,L) ─▶ ClientParts::logits ─▶ Sampler
//! ```

mod arch;
mod chat;
mod client;
mod detok;
mod error;
mod generate;
pub mod kernels;
mod model;
pub mod profile;
mod sampling;
mod span;
mod spm;
pub mod testing;
mod tokenizer;

pub use arch::{Activation, Architecture, LayerPlan, Recipe, SlidingWindow};
pub use chat::{ChatMessage, ChatPrompt, ChatTemplate};
pub use client::ClientParts;
pub use detok::{Released, TextStream};
pub use error::{ForwardError, ModelError};
pub use generate::{FinishReason, Generation, GenerationParams, LocalChain, Step, TokenLogprob};
pub use model::{ModelConfig, ModelFile, TensorEntry};
pub use sampling::{Acceptance, Distribution, Sampler, SamplingParams, Verdict, argmax, log_softmax, top_logprobs};
pub use span::{BatchItem, Device, HiddenStates, KvCache, Span};
pub use tokenizer::{ControlTokens, Tokenizer};
