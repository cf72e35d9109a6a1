//! Qwen3 (GGUF `qwen3`): Qwen2's block without the Q/K/V biases and with
//! an RMS norm over each query and key head (`attn_q_norm`, `attn_k_norm`,
//! one weight of the head size shared by all heads) before the rotary
//! embedding, which pairs the two halves of each head. The head size is
//! its own metadata key (`attention.key_length`), not width / heads.
//!
//! Reference: llama.cpp `src/models/qwen3.cpp`;
//! <https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3/modeling_qwen3.py>.

use super::{Meta, Recipe, Shape};
use crate::error::ModelError;
use crate::kernels::ops::RopeStyle;

pub(super) fn recipe(meta: &Meta<'_>, shape: &Shape) -> Result<Recipe, ModelError> {
    let base = meta.float("rope.freq_base")?.unwrap_or(10_000.0);
    Ok(Recipe { qk_norm: true, rope_scale: meta.rope_scale()?, ..Recipe::plain(shape, RopeStyle::Halves, base) })
}
