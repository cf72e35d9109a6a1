use std::path::PathBuf;

use hotpot_core::LayerSpan;

/// Opening or loading a model (or a part of one) failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path} is truncated or corrupt: tensor `{tensor}` ends at byte {end}, but the file has {len} bytes")]
    Truncated { path: PathBuf, tensor: String, end: u64, len: u64 },
    #[error("unsupported model architecture `{0}` (this engine runs: {supported})", supported = crate::arch::Architecture::SUPPORTED)]
    UnsupportedArchitecture(String),
    #[error("the model file lacks metadata key `{key}`")]
    MissingMetadata { key: String },
    #[error("metadata key `{key}` is invalid: {reason}")]
    BadMetadata { key: String, reason: String },
    #[error("the model file lacks tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("tensor `{name}` is invalid: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("span {span} lies outside the model's {n_blocks} blocks (spans must lie within 0..{n_blocks})")]
    SpanOutOfRange { span: LayerSpan, n_blocks: u32 },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("cannot start compute threads: {0}")]
    Threads(#[source] std::io::Error),
}

/// A forward pass was asked something impossible. The cache is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("hidden states have width {got}, the model's is {expected}")]
    Width { expected: usize, got: usize },
    #[error("no positions to compute")]
    Empty,
    #[error("step starts at position {got}, but the session's cache holds {expected} positions")]
    Position { expected: usize, got: usize },
    #[error("{needed} positions exceed the session's context of {max} (prompt plus generated tokens)")]
    ContextFull { needed: usize, max: usize },
    #[error("token id {token} is outside the vocabulary of {vocab} tokens")]
    Token { token: u32, vocab: usize },
    #[error("hidden states contain NaN or infinite values")]
    NotFinite,
    #[error("blocks {requested} are not all within the loaded span {served}")]
    Span { requested: LayerSpan, served: LayerSpan },
}
