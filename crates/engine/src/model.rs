//! A GGUF model file: its metadata, its architecture, its tensors read one
//! at a time (so a node loads only the blocks it serves), and its model id.
//!
//! Every length and offset in the file is checked against the file's size
//! before anything is allocated; a truncated or corrupt file is an error at
//! `open`, never a panic later.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};
use hotpot_core::{LayerSpan, ModelId};

pub use crate::arch::Architecture;
use crate::arch::{Meta, Recipe, Shape};
use crate::error::ModelError;
use crate::kernels::{Arena, Matrix, WeightFormat};

/// The shape of a model, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub n_blocks: u32,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    /// Leading dimensions of each head that rotary embeddings turn.
    pub rope_dim: usize,
    pub rms_eps: f32,
    /// What the architecture does differently from the plain block.
    pub recipe: Recipe,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    pub fn full_span(&self) -> LayerSpan {
        LayerSpan::full(self.n_blocks).expect("n_blocks > 0 is checked at open")
    }

    /// Errors unless `span` lies within the model's blocks.
    pub fn check_span(&self, span: LayerSpan) -> Result<(), ModelError> {
        if span.fits(self.n_blocks) { Ok(()) } else { Err(ModelError::SpanOutOfRange { span, n_blocks: self.n_blocks }) }
    }
}

/// Where one tensor lies in the file, checked against the file's size.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: GgmlDType,
    /// Dimensions outermost first: a matrix is `[rows, cols]`.
    pub dims: Vec<usize>,
    pub offset: u64,
    pub bytes: u64,
}

impl TensorEntry {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// An opened GGUF file. Holds metadata only; tensors are read on demand.
pub struct ModelFile {
    path: PathBuf,
    file_len: u64,
    metadata: HashMap<String, Value>,
    tensors: HashMap<String, TensorEntry>,
    config: ModelConfig,
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile").field("path", &self.path).field("config", &self.config).finish()
    }
}

/// Sanity limits on metadata so that a hostile file cannot make us allocate
/// absurd amounts of memory from a few bytes of header.
const MAX_DIM: usize = 1 << 16;
const MAX_BLOCKS: usize = 1 << 12;
const MAX_VOCAB: usize = 1 << 22;
const MAX_CONTEXT: usize = 1 << 21;

impl ModelFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| ModelError::Io { path: path.clone(), source };
        let mut file = File::open(&path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        // candle's reader checks lengths against the file size; it can still
        // divide by a zero alignment, so a panic there is a corrupt file too.
        let content = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut file)))
            .map_err(|_| ModelError::Format { path: path.clone(), reason: "corrupt header".into() })?
            .map_err(|e| ModelError::Format { path: path.clone(), reason: e.to_string() })?;
        let tensors = Self::check_tensors(&path, &content, file_len)?;
        let config = read_config(&content.metadata, &tensors)?;
        Ok(Self { path, file_len, metadata: content.metadata, tensors, config })
    }

    fn check_tensors(path: &Path, content: &Content, file_len: u64) -> Result<HashMap<String, TensorEntry>, ModelError> {
        let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
        for (name, info) in &content.tensor_infos {
            let bad = |reason: String| ModelError::BadTensor { name: name.clone(), reason };
            let dims = info.shape.dims().to_vec();
            let elements = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
            let block = info.ggml_dtype.block_size();
            if elements % block != 0 {
                return Err(bad(format!("{elements} elements is not a whole number of {block}-element blocks")));
            }
            let bytes = (elements / block).checked_mul(info.ggml_dtype.type_size()).ok_or_else(|| bad("size overflows".into()))? as u64;
            let offset = content.tensor_data_offset.checked_add(info.offset).ok_or_else(|| bad("offset overflows".into()))?;
            let end = offset.checked_add(bytes).ok_or_else(|| bad("end overflows".into()))?;
            if end > file_len {
                return Err(ModelError::Truncated { path: path.to_path_buf(), tensor: name.clone(), end, len: file_len });
            }
            tensors.insert(name.clone(), TensorEntry { dtype: info.ggml_dtype, dims, offset, bytes });
        }
        Ok(tensors)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.metadata
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorEntry, ModelError> {
        self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Total weights in the file.
    pub fn parameters(&self) -> u64 {
        self.tensors.values().map(|t| t.elements() as u64).sum()
    }

    /// Bytes of tensor data in the file.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.bytes).sum()
    }

    /// The encoding holding most of the blocks' bytes, e.g. `Q4_1`.
    pub fn quantization(&self) -> String {
        let mut by_type: HashMap<String, u64> = HashMap::new();
        for (name, t) in &self.tensors {
            if name.starts_with("blk.") {
                let name = WeightFormat::of(t.dtype).map_or_else(|| format!("{:?}", t.dtype), |f| f.name().to_string());
                *by_type.entry(name).or_default() += t.bytes;
            }
        }
        by_type.into_iter().max_by_key(|(_, bytes)| *bytes).map(|(t, _)| t).unwrap_or_else(|| "none".into())
    }

    /// The raw bytes of one tensor.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>, ModelError> {
        let entry = self.tensor(name)?;
        let io = |source| ModelError::Io { path: self.path.clone(), source };
        let mut file = File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(entry.offset)).map_err(io)?;
        let len = usize::try_from(entry.bytes)
            .map_err(|_| ModelError::BadTensor { name: name.to_string(), reason: "larger than this machine's address space".into() })?;
        let mut bytes = vec![0u8; len];
        file.read_exact(&mut bytes).map_err(io)?;
        Ok(bytes)
    }

    /// Loads a `rows × cols` weight matrix in the kernels' packed layout.
    /// Encodings without a native kernel are dequantized to f32.
    pub fn load_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, ModelError> {
        self.load_matrix_in(name, rows, cols, None)
    }

    /// The tensor `name` if it is `rows × cols`, and the format
    /// `load_matrix` keeps it in.
    fn matrix_entry(&self, name: &str, rows: usize, cols: usize) -> Result<(&TensorEntry, WeightFormat), ModelError> {
        let entry = self.tensor(name)?;
        if entry.dims != [rows, cols] {
            return Err(ModelError::TensorShape { name: name.into(), expected: vec![rows, cols], got: entry.dims.clone() });
        }
        Ok((entry, WeightFormat::of(entry.dtype).unwrap_or(WeightFormat::F32)))
    }

    /// Bytes the packed `rows × cols` matrix `name` takes in memory.
    pub(crate) fn matrix_bytes(&self, name: &str, rows: usize, cols: usize) -> Result<usize, ModelError> {
        let (_, format) = self.matrix_entry(name, rows, cols)?;
        Matrix::packed_bytes(format, rows, cols).map_err(|e| pack_error(name, e))
    }

    /// `load_matrix`, packing into the next bytes of `arena` when one is given.
    pub(crate) fn load_matrix_in(&self, name: &str, rows: usize, cols: usize, arena: Option<&Arc<Arena>>) -> Result<Matrix, ModelError> {
        let (entry, format) = self.matrix_entry(name, rows, cols)?;
        if format.is_quantized() {
            let file = File::open(&self.path).map_err(|source| ModelError::Io { path: self.path.clone(), source })?;
            return Matrix::from_ggml_file(format, rows, cols, &file, entry.offset, arena).map_err(|e| pack_error(name, e));
        }
        if entry.dtype != GgmlDType::F32 {
            tracing::debug!(tensor = name, dtype = ?entry.dtype, "no native kernel: dequantizing to f32");
        }
        let values = self.dequantize(name, entry, &self.read_bytes(name)?)?;
        Matrix::from_f32_in(rows, cols, &values, arena).map_err(|e| pack_error(name, e))
    }

    /// Loads a vector (norm weights, biases) of `len` values as f32.
    pub fn load_vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let entry = self.tensor(name)?;
        if entry.elements() != len || entry.dims.len() != 1 {
            return Err(ModelError::TensorShape { name: name.into(), expected: vec![len], got: entry.dims.clone() });
        }
        let bytes = self.read_bytes(name)?;
        self.dequantize(name, entry, &bytes)
    }

    fn dequantize(&self, name: &str, entry: &TensorEntry, bytes: &[u8]) -> Result<Vec<f32>, ModelError> {
        let bad = |e: candle_core::Error| ModelError::BadTensor { name: name.into(), reason: e.to_string() };
        if entry.dtype == GgmlDType::F32 {
            return Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect());
        }
        let device = candle_core::Device::Cpu;
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(entry.dtype, bytes, entry.dims.clone(), &device).map_err(bad)?;
        q.dequantize(&device).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).map_err(bad)
    }

    /// The model id: BLAKE3 over the architecture metadata and every tensor
    /// (name, type, shape, bytes), in a canonical order. Reads the whole file.
    pub fn model_id(&self) -> Result<ModelId, ModelError> {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"hotpot-model-id/1\0");
        let arch = self.config.architecture.name();
        let prefix = format!("{arch}.");
        let mut keys: Vec<&String> = self.metadata.keys().filter(|k| *k == "general.architecture" || k.starts_with(&prefix)).collect();
        keys.sort();
        for key in keys {
            hasher.update(key.as_bytes());
            hasher.update(&[0]);
            hash_value(&mut hasher, &self.metadata[key]);
        }
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        let io = |source| ModelError::Io { path: self.path.clone(), source };
        let mut file = File::open(&self.path).map_err(io)?;
        let mut buf = vec![0u8; 1 << 20];
        for name in names {
            let entry = &self.tensors[name];
            hasher.update(name.as_bytes());
            hasher.update(&[0]);
            hasher.update(format!("{:?}", entry.dtype).as_bytes());
            hasher.update(&[0]);
            for d in &entry.dims {
                hasher.update(&(*d as u64).to_le_bytes());
            }
            file.seek(SeekFrom::Start(entry.offset)).map_err(io)?;
            let mut left = entry.bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                file.read_exact(&mut buf[..n]).map_err(io)?;
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
        }
        Ok(ModelId::from_bytes(*hasher.finalize().as_bytes()))
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn meta_u32(&self, key: &str) -> Option<u32> {
        self.metadata.get(key).and_then(as_u64).and_then(|v| u32::try_from(v).ok())
    }

    pub fn meta_bool(&self, key: &str) -> Option<bool> {
        match self.metadata.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// The string array at `key`, or an error naming the key.
    pub fn meta_strings(&self, key: &str) -> Result<Vec<&str>, ModelError> {
        let bad = || ModelError::BadMetadata { key: key.into(), reason: "expected an array of strings".into() };
        match self.metadata.get(key) {
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(bad()),
                })
                .collect(),
            Some(_) => Err(bad()),
            None => Err(ModelError::MissingMetadata { key: key.into() }),
        }
    }

    /// The number array at `key`, as f32.
    pub fn meta_floats(&self, key: &str) -> Result<Vec<f32>, ModelError> {
        let bad = || ModelError::BadMetadata { key: key.into(), reason: "expected an array of numbers".into() };
        match self.metadata.get(key) {
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| match v {
                    Value::F32(f) => Ok(*f),
                    Value::F64(f) => Ok(*f as f32),
                    other => as_i64(other).map(|i| i as f32).ok_or_else(bad),
                })
                .collect(),
            Some(_) => Err(bad()),
            None => Err(ModelError::MissingMetadata { key: key.into() }),
        }
    }

    /// The integer array at `key`.
    pub fn meta_ints(&self, key: &str) -> Result<Vec<i64>, ModelError> {
        let bad = || ModelError::BadMetadata { key: key.into(), reason: "expected an array of integers".into() };
        match self.metadata.get(key) {
            Some(Value::Array(values)) => values.iter().map(|v| as_i64(v).ok_or_else(bad)).collect(),
            Some(_) => Err(bad()),
            None => Err(ModelError::MissingMetadata { key: key.into() }),
        }
    }
}

fn hash_value(hasher: &mut blake3::Hasher, value: &Value) {
    match value {
        Value::U8(v) => hasher.update(&[0, *v]),
        Value::I8(v) => hasher.update(&[1, *v as u8]),
        Value::U16(v) => hasher.update(&[2]).update(&v.to_le_bytes()),
        Value::I16(v) => hasher.update(&[3]).update(&v.to_le_bytes()),
        Value::U32(v) => hasher.update(&[4]).update(&v.to_le_bytes()),
        Value::I32(v) => hasher.update(&[5]).update(&v.to_le_bytes()),
        Value::F32(v) => hasher.update(&[6]).update(&v.to_le_bytes()),
        Value::Bool(v) => hasher.update(&[7, u8::from(*v)]),
        Value::String(s) => hasher.update(&[8]).update(&(s.len() as u64).to_le_bytes()).update(s.as_bytes()),
        Value::Array(values) => {
            hasher.update(&[9]).update(&(values.len() as u64).to_le_bytes());
            for v in values {
                hash_value(hasher, v);
            }
            hasher
        }
        Value::U64(v) => hasher.update(&[10]).update(&v.to_le_bytes()),
        Value::I64(v) => hasher.update(&[11]).update(&v.to_le_bytes()),
        Value::F64(v) => hasher.update(&[12]).update(&v.to_le_bytes()),
    };
}

pub(crate) fn as_u64(value: &Value) -> Option<u64> {
    as_i64(value).and_then(|v| u64::try_from(v).ok())
}

fn as_i64(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(v) => Some(v.into()),
        Value::I8(v) => Some(v.into()),
        Value::U16(v) => Some(v.into()),
        Value::I16(v) => Some(v.into()),
        Value::U32(v) => Some(v.into()),
        Value::I32(v) => Some(v.into()),
        Value::U64(v) => i64::try_from(v).ok(),
        Value::I64(v) => Some(v),
        _ => None,
    }
}

fn read_config(meta: &HashMap<String, Value>, tensors: &HashMap<String, TensorEntry>) -> Result<ModelConfig, ModelError> {
    let arch_name = match meta.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(ModelError::BadMetadata { key: "general.architecture".into(), reason: "not a string".into() });
        }
        None => {
            return Err(ModelError::MissingMetadata { key: "general.architecture".into() });
        }
    };
    let architecture = Architecture::from_name(&arch_name).ok_or(ModelError::UnsupportedArchitecture(arch_name.clone()))?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let int = |k: &str, max: usize| -> Result<Option<usize>, ModelError> {
        let name = key(k);
        match meta.get(&name) {
            None => Ok(None),
            Some(v) => match as_u64(v) {
                Some(n) if n >= 1 && n as usize <= max => Ok(Some(n as usize)),
                _ => Err(ModelError::BadMetadata { key: name, reason: format!("expected an integer in 1..={max}") }),
            },
        }
    };
    let required = |k: &str, max: usize| int(k, max)?.ok_or_else(|| ModelError::MissingMetadata { key: key(k) });
    let float = |k: &str| -> Result<Option<f32>, ModelError> {
        match meta.get(&key(k)) {
            None => Ok(None),
            Some(Value::F32(v)) if v.is_finite() && *v > 0.0 => Ok(Some(*v)),
            Some(Value::F64(v)) if v.is_finite() && *v > 0.0 => Ok(Some(*v as f32)),
            Some(_) => Err(ModelError::BadMetadata { key: key(k), reason: "expected a positive number".into() }),
        }
    };

    let n_blocks = required("block_count", MAX_BLOCKS)?;
    let dim = required("embedding_length", MAX_DIM)?;
    let ffn_dim = required("feed_forward_length", 4 * MAX_DIM)?;
    let n_heads = required("attention.head_count", MAX_DIM)?;
    let n_kv_heads = int("attention.head_count_kv", MAX_DIM)?.unwrap_or(n_heads);
    let head_dim = match int("attention.key_length", MAX_DIM)? {
        Some(d) => d,
        None if dim % n_heads == 0 => dim / n_heads,
        None => {
            return Err(ModelError::BadMetadata {
                key: key("attention.head_count"),
                reason: format!("{n_heads} heads do not divide the embedding width {dim}"),
            });
        }
    };
    if n_heads % n_kv_heads != 0 {
        return Err(ModelError::BadMetadata {
            key: key("attention.head_count_kv"),
            reason: format!("{n_kv_heads} key/value heads do not divide {n_heads} query heads"),
        });
    }
    let rope_dim = int("rope.dimension_count", MAX_DIM)?.unwrap_or(head_dim);
    if rope_dim > head_dim || rope_dim % 2 != 0 {
        return Err(ModelError::BadMetadata {
            key: key("rope.dimension_count"),
            reason: format!("{rope_dim} must be even and at most the head size {head_dim}"),
        });
    }
    let vocab_size = match tensors.get("token_embd.weight") {
        Some(t) if t.dims.len() == 2 && t.dims[1] == dim && t.dims[0] <= MAX_VOCAB => t.dims[0],
        Some(t) => {
            return Err(ModelError::TensorShape { name: "token_embd.weight".into(), expected: vec![0, dim], got: t.dims.clone() });
        }
        None => return Err(ModelError::MissingTensor("token_embd.weight".into())),
    };
    let context_length = int("context_length", MAX_CONTEXT)?.unwrap_or(2048);
    let rms_eps = float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5);
    let shape = Shape { n_blocks, dim, head_dim };
    let recipe = architecture.recipe(&Meta { arch: &arch_name, map: meta }, &shape)?;
    Ok(ModelConfig {
        architecture,
        n_blocks: n_blocks as u32,
        dim,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_dim,
        vocab_size,
        context_length,
        rope_dim,
        rms_eps,
        recipe,
    })
}

/// A tensor that cannot be packed, as a model error naming it.
fn pack_error(name: &str, e: crate::kernels::matrix::PackError) -> ModelError {
    ModelError::BadTensor { name: name.into(), reason: e.to_string() }
}
