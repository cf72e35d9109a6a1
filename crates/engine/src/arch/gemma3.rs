//! Gemma 3 (GGUF `gemma3`), as llama.cpp runs it:
//!
//! - embeddings multiplied by √width (in f32) before block 0;
//! - RMS norms before *and after* attention and the FFN
//!   (`post_attention_norm`, `post_ffw_norm`); GGUF stores the norm weights
//!   with Gemma's `1 +` already added;
//! - RMS norms over each query and key head before the rotary embedding,
//!   which pairs the two halves of each head;
//! - queries scaled by 1/√head_size (`attention.key_length`, 256 here; the
//!   27B model, which uses width / heads instead, is not special-cased);
//! - a GELU (tanh approximation) gated FFN: `gelu(gate) · up`;
//! - five local layers (sliding window `attention.sliding_window`, rotary
//!   base `rope.freq_base_swa`, default 10 000) to one global layer (base
//!   `rope.freq_base`, with linear `rope.scaling` if given): block `i` is
//!   local unless `i mod 6 = 5`, or as `attention.sliding_window_pattern`
//!   says; a local layer's query sees keys at most `window − 1` positions
//!   back;
//! - the head tied to the embedding unless `output.weight` exists, and an
//!   optional `final_logit_softcapping`.
//!
//! Reference: llama.cpp `src/models/gemma3.cpp`, `llama-hparams.cpp`
//! (`set_swa_pattern`); <https://github.com/google/gemma_pytorch/blob/main/gemma/model.py>.

use super::{Activation, Meta, Recipe, Shape, SlidingWindow};
use crate::error::ModelError;
use crate::kernels::ops::RopeStyle;

/// One global layer in every this many (llama.cpp's default for Gemma 3).
const PATTERN: usize = 6;

pub(super) fn recipe(meta: &Meta<'_>, shape: &Shape) -> Result<Recipe, ModelError> {
    let base = meta.float("rope.freq_base")?.unwrap_or(1_000_000.0);
    let sliding = match meta.int("attention.sliding_window", 1 << 24)? {
        None => None,
        Some(window) => {
            let local = match meta.flags("attention.sliding_window_pattern", shape.n_blocks)? {
                Some(flags) => flags,
                None => {
                    let pattern = meta.int("attention.sliding_window_pattern", 1 << 12)?.unwrap_or(PATTERN);
                    (0..shape.n_blocks).map(|i| i % pattern < pattern - 1).collect()
                }
            };
            Some(SlidingWindow { window, rope_base: meta.float("rope.freq_base_swa")?.unwrap_or(10_000.0), local })
        }
    };
    Ok(Recipe {
        qk_norm: true,
        post_norms: true,
        activation: Activation::GeGlu,
        rope_scale: meta.rope_scale()?,
        embedding_scale: Some((shape.dim as f32).sqrt()),
        logit_softcap: meta.float("final_logit_softcapping")?,
        sliding,
        ..Recipe::plain(shape, RopeStyle::Halves, base)
    })
}
