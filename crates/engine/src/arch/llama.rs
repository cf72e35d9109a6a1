//! Llama 2/3, Mistral and SmolLM (GGUF `llama`): the plain block — RMS
//! norms, SwiGLU, rotary embeddings on adjacent pairs (GGUF stores Q and K
//! permuted for that), grouped-query attention.
//!
//! Reference: llama.cpp `src/models/llama.cpp`;
//! <https://github.com/meta-llama/llama/blob/main/llama/model.py>.

use super::{Meta, Recipe, Shape};
use crate::error::ModelError;
use crate::kernels::ops::RopeStyle;

pub(super) fn recipe(meta: &Meta<'_>, shape: &Shape) -> Result<Recipe, ModelError> {
    let base = meta.float("rope.freq_base")?.unwrap_or(10_000.0);
    Ok(Recipe { rope_scale: meta.rope_scale()?, ..Recipe::plain(shape, RopeStyle::Interleaved, base) })
}
