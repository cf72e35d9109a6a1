//! Tiny random llama-family GGUF files for fast tests (here and in the
//! crates above): real files, written with candle's GGUF writer, with a
//! byte-level tokenizer and a ChatML template.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

/// The shape and encoding of a tiny model.
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub architecture: String,
    pub blocks: u32,
    pub dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub context: u32,
    /// Encoding of the block matrices (the embedding is always Q8_0).
    pub format: GgmlDType,
    /// Without an `output.weight`, the head is tied to the embedding.
    pub tied: bool,
    /// Head size, when not `dim / heads` (written as `attention.key_length`).
    pub head_dim: Option<usize>,
    /// Sliding window of the local layers (Gemma 3).
    pub sliding_window: Option<u32>,
    pub seed: u64,
}

impl Default for TinyModel {
    fn default() -> Self {
        Self {
            architecture: "llama".into(),
            blocks: 4,
            dim: 64,
            heads: 4,
            kv_heads: 2,
            ffn: 96,
            context: 256,
            format: GgmlDType::Q4_1,
            tied: true,
            head_dim: None,
            sliding_window: None,
            seed: 1,
        }
    }
}

/// Rotary base of the local (sliding-window) layers of tiny Gemma 3 models;
/// global layers use 10 000.
pub const LOCAL_ROPE_BASE: f32 = 5_000.0;

/// Merges of the tiny tokenizer, on top of the 256 byte tokens.
const MERGES: [(&str, &str); 4] = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")];
/// Control tokens, ids 0.. in this order.
pub const TINY_SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl TinyModel {
    /// Token strings: control tokens, the 256 byte characters, the merges.
    fn tokens() -> Vec<String> {
        let mut tokens: Vec<String> = TINY_SPECIAL.iter().map(|s| s.to_string()).collect();
        tokens.extend(crate::tokenizer::byte_level_chars().iter().map(char::to_string));
        tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
        tokens
    }

    pub fn vocab_size() -> usize {
        Self::tokens().len()
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.dim / self.heads)
    }

    /// Writes the model to `path`.
    pub fn write(&self, path: &Path) -> candle_core::Result<()> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let tokens = Self::tokens();
        let vocab = tokens.len();
        let head_dim = self.head_dim();
        let arch = self.architecture.as_str();
        let mut meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            ("general.name".into(), Value::String("tiny".into())),
            (format!("{arch}.block_count"), Value::U32(self.blocks)),
            (format!("{arch}.context_length"), Value::U32(self.context)),
            (format!("{arch}.embedding_length"), Value::U32(self.dim as u32)),
            (format!("{arch}.feed_forward_length"), Value::U32(self.ffn as u32)),
            (format!("{arch}.attention.head_count"), Value::U32(self.heads as u32)),
            (format!("{arch}.attention.head_count_kv"), Value::U32(self.kv_heads as u32)),
            (format!("{arch}.rope.freq_base"), Value::F32(10_000.0)),
            (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect())),
            ("tokenizer.ggml.token_type".into(), Value::Array((0..vocab).map(|i| Value::I32(if i < TINY_SPECIAL.len() { 3 } else { 1 })).collect())),
            ("tokenizer.ggml.merges".into(), Value::Array(MERGES.iter().map(|(a, b)| Value::String(format!("{a} {b}"))).collect())),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            ("tokenizer.chat_template".into(), Value::String(CHATML.into())),
        ];
        if let Some(hd) = self.head_dim {
            meta.push((format!("{arch}.attention.key_length"), Value::U32(hd as u32)));
            meta.push((format!("{arch}.attention.value_length"), Value::U32(hd as u32)));
        }
        if let Some(window) = self.sliding_window {
            meta.push((format!("{arch}.attention.sliding_window"), Value::U32(window)));
            meta.push((format!("{arch}.rope.freq_base_swa"), Value::F32(LOCAL_ROPE_BASE)));
        }
        meta.sort_by(|a, b| a.0.cmp(&b.0));

        let mut random = |rows: usize, cols: usize, scale: f32| -> candle_core::Result<Tensor> {
            let values: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-scale..scale)).collect();
            if rows == 1 { Tensor::from_vec(values, cols, &Device::Cpu) } else { Tensor::from_vec(values, (rows, cols), &Device::Cpu) }
        };
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let mut add = |name: String, t: Tensor, dtype: GgmlDType| -> candle_core::Result<()> {
            tensors.push((name, QTensor::quantize(&t, dtype)?));
            Ok(())
        };
        add("token_embd.weight".into(), random(vocab, self.dim, 1.0)?, GgmlDType::Q8_0)?;
        add("output_norm.weight".into(), (random(1, self.dim, 0.2)? + 1.0)?, GgmlDType::F32)?;
        if !self.tied {
            add("output.weight".into(), random(vocab, self.dim, 0.5)?, GgmlDType::Q8_0)?;
        }
        let (q, kv) = (self.heads * head_dim, self.kv_heads * head_dim);
        let w = 1.0 / (self.dim as f32).sqrt();
        for i in 0..self.blocks {
            let name = |t: &str| format!("blk.{i}.{t}");
            add(name("attn_norm.weight"), (random(1, self.dim, 0.2)? + 1.0)?, GgmlDType::F32)?;
            add(name("ffn_norm.weight"), (random(1, self.dim, 0.2)? + 1.0)?, GgmlDType::F32)?;
            add(name("attn_q.weight"), random(q, self.dim, 2.0 * w)?, self.format)?;
            add(name("attn_k.weight"), random(kv, self.dim, 2.0 * w)?, self.format)?;
            add(name("attn_v.weight"), random(kv, self.dim, 2.0 * w)?, self.format)?;
            add(name("attn_output.weight"), random(self.dim, q, w)?, self.format)?;
            add(name("ffn_gate.weight"), random(self.ffn, self.dim, 2.0 * w)?, self.format)?;
            add(name("ffn_up.weight"), random(self.ffn, self.dim, 2.0 * w)?, self.format)?;
            add(name("ffn_down.weight"), random(self.dim, self.ffn, w)?, self.format)?;
            if arch == "qwen2" {
                for (t, n) in [("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)] {
                    add(name(t), random(1, n, 0.1)?, GgmlDType::F32)?;
                }
            }
            if arch == "qwen3" || arch == "gemma3" {
                for t in ["attn_q_norm.weight", "attn_k_norm.weight"] {
                    add(name(t), (random(1, head_dim, 0.2)? + 1.0)?, GgmlDType::F32)?;
                }
            }
            if arch == "gemma3" {
                for t in ["post_attention_norm.weight", "post_ffw_norm.weight"] {
                    add(name(t), (random(1, self.dim, 0.2)? + 1.0)?, GgmlDType::F32)?;
                }
            }
        }
        let mut file = std::fs::File::create(path)?;
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut file, &meta_refs, &tensor_refs)
    }
}

/// Red-team helpers: copies of a model file with some blocks tampered with,
/// the way a cheating node would run "almost" the claimed model.
pub mod tamper {
    use std::path::Path;

    pub use candle_core::quantized::GgmlDType;
    use candle_core::quantized::QTensor;
    use candle_core::quantized::gguf_file::{self, Content};
    use candle_core::{Device, Tensor};
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    /// How to change one block's matrices.
    #[derive(Debug, Clone, Copy)]
    pub enum Change {
        /// Re-quantize to another GGML type (`Q4_0`, `Q8_0`, …).
        Requantize(GgmlDType),
        /// Add Gaussian noise of `fraction` of each 32-weight group's
        /// quantization step (kept in f32, so nothing rounds it away).
        Noise { fraction: f32, seed: u64 },
        /// Zero the projections that write into the residual stream, so the
        /// block passes its input through: a skipped block.
        Skip,
    }

    fn matrix(name: &str) -> bool {
        ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"].iter().any(|m| name.contains(&format!(".{m}.weight")))
    }

    fn block_of(name: &str) -> Option<u32> {
        name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
    }

    fn change(name: &str, q: QTensor, how: Change) -> candle_core::Result<QTensor> {
        if !matrix(name) {
            return Ok(q);
        }
        let w = q.dequantize(&Device::Cpu)?;
        match how {
            Change::Requantize(dtype) => QTensor::quantize(&w, dtype),
            Change::Skip if name.contains(".attn_output.") || name.contains(".ffn_down.") => QTensor::quantize(&w.zeros_like()?, GgmlDType::F32),
            Change::Skip => Ok(q),
            Change::Noise { fraction, seed } => {
                let dims = w.dims().to_vec();
                let mut values = w.flatten_all()?.to_vec1::<f32>()?;
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                for group in values.chunks_mut(32) {
                    let (lo, hi) = group.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
                    let step = ((hi - lo) / 15.0).max(1e-12);
                    let normal = Normal::new(0.0, f64::from(fraction * step)).map_err(candle_core::Error::wrap)?;
                    for v in group.iter_mut() {
                        *v += normal.sample(&mut rng) as f32;
                    }
                }
                QTensor::quantize(&Tensor::from_vec(values, dims, &Device::Cpu)?, GgmlDType::F32)
            }
        }
    }

    /// Copies `src` to `dst`, changing the matrices of `blocks` with `how`,
    /// and serving the weights of block `i + shift` as block `i` for every
    /// block in `shift_blocks` (a different span's weights).
    pub fn rewrite(src: &Path, dst: &Path, blocks: std::ops::Range<u32>, how: Option<Change>, shift: i32) -> candle_core::Result<()> {
        let mut file = std::fs::File::open(src)?;
        let content = Content::read(&mut file)?;
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        let mut tensors = Vec::with_capacity(names.len());
        for name in names {
            let source = match block_of(name) {
                Some(b) if shift != 0 && blocks.contains(&b) => {
                    let other = (b as i64 + i64::from(shift)) as u32;
                    name.replacen(&format!("blk.{b}."), &format!("blk.{other}."), 1)
                }
                _ => name.clone(),
            };
            let mut q = content.tensor(&mut file, &source, &Device::Cpu)?;
            if let (Some(how), Some(b)) = (how, block_of(name))
                && blocks.contains(&b)
            {
                q = change(name, q, how)?;
            }
            tensors.push((name.clone(), q));
        }
        let metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
        let mut out = std::fs::File::create(dst)?;
        gguf_file::write(&mut out, &metadata, &refs)
    }
}
