//! Qwen2 and Qwen2.5 (GGUF `qwen2`): the plain block with biases on the
//! Q, K and V projections and rotary embeddings on the two halves of each
//! head (GPT-NeoX style).
//!
//! Reference: llama.cpp `src/models/qwen2.cpp`;
//! <https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen2/modeling_qwen2.py>.

use super::{Meta, Recipe, Shape};
use crate::error::ModelError;
use crate::kernels::ops::RopeStyle;

pub(super) fn recipe(meta: &Meta<'_>, shape: &Shape) -> Result<Recipe, ModelError> {
    let base = meta.float("rope.freq_base")?.unwrap_or(10_000.0);
    Ok(Recipe { qkv_bias: true, rope_scale: meta.rope_scale()?, ..Recipe::plain(shape, RopeStyle::Halves, base) })
}
