//! Model architectures: what differs between the transformer families
//! the engine runs, one file each. Every family here is the same block,
//!
//! ```text
//! x ─ norm ─ Q K V (+bias) ─ [q/k norm] ─ rope ─ attention ─ out ─ [post-norm] ─ + ─ norm ─ gate·up ─ act ─ down ─ [post-norm] ─ +
//! ```
//!
//! with different choices: biases, per-head q/k norms, post-norms, the
//! activation, rotary pairing and bases, sliding windows, an embedding
//! scale and a logit soft-cap. Each file turns a GGUF's metadata into a
//! [`Recipe`] of those choices, checked against the implementation it
//! names; the span executor (`span.rs`) runs any recipe, and loads a
//! block's tensors by name so that a node loads only its own blocks.

mod gemma3;
mod llama;
mod qwen2;
mod qwen3;

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use crate::error::ModelError;
use crate::kernels::ops::RopeStyle;

/// The model families the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, Mistral, SmolLM.
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Architecture {
    pub const SUPPORTED: &'static str = "llama, qwen2, qwen3, gemma3";

    pub(crate) fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "gemma3" => Some(Self::Gemma3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
        }
    }

    /// The family's choices for the model whose metadata and shape are given.
    pub(crate) fn recipe(self, meta: &Meta<'_>, shape: &Shape) -> Result<Recipe, ModelError> {
        match self {
            Self::Llama => llama::recipe(meta, shape),
            Self::Qwen2 => qwen2::recipe(meta, shape),
            Self::Qwen3 => qwen3::recipe(meta, shape),
            Self::Gemma3 => gemma3::recipe(meta, shape),
        }
    }
}

/// The activation between the gate/up and down projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) · up`.
    SwiGlu,
    /// `gelu_tanh(gate) · up`.
    GeGlu,
}

/// Sliding-window attention on some layers.
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    /// A local layer attends to the last `window` positions, itself included.
    pub window: usize,
    /// Rotary base of the local layers.
    pub rope_base: f32,
    /// Which blocks are local, by index.
    pub local: Vec<bool>,
}

/// What one architecture does differently from the plain block.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub rope_style: RopeStyle,
    /// Rotary base of global layers.
    pub rope_base: f32,
    /// Linear rotary scaling of global layers: positions are multiplied by it.
    pub rope_scale: f32,
    pub qkv_bias: bool,
    /// RMS norms over each query and key head (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// RMS norms after attention and after the FFN (`post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    pub activation: Activation,
    /// Scores are `q·k · attention_scale`.
    pub attention_scale: f32,
    /// Embeddings are multiplied by this before block 0.
    pub embedding_scale: Option<f32>,
    /// Logits become `cap · tanh(logits / cap)`.
    pub logit_softcap: Option<f32>,
    pub sliding: Option<SlidingWindow>,
}

impl Recipe {
    /// The plain block (Llama's), for `shape`.
    pub(crate) fn plain(shape: &Shape, rope_style: RopeStyle, rope_base: f32) -> Self {
        Self {
            rope_style,
            rope_base,
            rope_scale: 1.0,
            qkv_bias: false,
            qk_norm: false,
            post_norms: false,
            activation: Activation::SwiGlu,
            attention_scale: 1.0 / (shape.head_dim as f32).sqrt(),
            embedding_scale: None,
            logit_softcap: None,
            sliding: None,
        }
    }

    /// How block `block` attends.
    pub fn layer(&self, block: u32) -> LayerPlan {
        match &self.sliding {
            Some(s) if s.local.get(block as usize).copied().unwrap_or(false) => LayerPlan { rope_base: s.rope_base, rope_scale: 1.0, window: Some(s.window) },
            _ => LayerPlan { rope_base: self.rope_base, rope_scale: self.rope_scale, window: None },
        }
    }
}

/// How one block attends: its rotary base and scale, and its window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerPlan {
    pub rope_base: f32,
    pub rope_scale: f32,
    pub window: Option<usize>,
}

/// The shape the recipe is for (already read and checked).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub n_blocks: usize,
    pub dim: usize,
    pub head_dim: usize,
}

/// Typed access to `<arch>.*` metadata, with errors that name the key.
pub(crate) struct Meta<'a> {
    pub arch: &'a str,
    pub map: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    pub fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    /// A positive finite number, if present.
    pub fn float(&self, k: &str) -> Result<Option<f32>, ModelError> {
        match self.map.get(&self.key(k)) {
            None => Ok(None),
            Some(Value::F32(v)) if v.is_finite() && *v > 0.0 => Ok(Some(*v)),
            Some(Value::F64(v)) if v.is_finite() && *v > 0.0 => Ok(Some(*v as f32)),
            Some(_) => Err(ModelError::BadMetadata { key: self.key(k), reason: "expected a positive number".into() }),
        }
    }

    /// An integer in `1..=max`, if present.
    pub fn int(&self, k: &str, max: usize) -> Result<Option<usize>, ModelError> {
        match self.map.get(&self.key(k)) {
            None => Ok(None),
            Some(v) => match crate::model::as_u64(v) {
                Some(n) if n >= 1 && n as usize <= max => Ok(Some(n as usize)),
                _ => Err(ModelError::BadMetadata { key: self.key(k), reason: format!("expected an integer in 1..={max}") }),
            },
        }
    }

    pub fn string(&self, k: &str) -> Option<&str> {
        match self.map.get(&self.key(k)) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// A per-block array of booleans (or 0/1 integers), if the key holds an array.
    pub fn flags(&self, k: &str, n: usize) -> Result<Option<Vec<bool>>, ModelError> {
        let bad = |reason: String| ModelError::BadMetadata { key: self.key(k), reason };
        match self.map.get(&self.key(k)) {
            None => Ok(None),
            Some(Value::Array(values)) if values.len() == n => values
                .iter()
                .map(|v| match v {
                    Value::Bool(b) => Ok(*b),
                    other => crate::model::as_u64(other).map(|x| x != 0).ok_or_else(|| bad("expected booleans".into())),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some(Value::Array(values)) => Err(bad(format!("{} entries for {n} blocks", values.len()))),
            Some(_) => Ok(None),
        }
    }

    /// Linear rotary scaling (`rope.scaling.type = linear`): the factor
    /// positions are divided by, as a multiplier.
    pub fn rope_scale(&self) -> Result<f32, ModelError> {
        match self.string("rope.scaling.type") {
            None | Some("none") => Ok(1.0),
            Some("linear") => Ok(1.0 / self.float("rope.scaling.factor")?.unwrap_or(1.0)),
            Some(other) => Err(ModelError::BadMetadata { key: self.key("rope.scaling.type"), reason: format!("rotary scaling `{other}` is not supported") }),
        }
    }
}
