//! A span of transformer blocks `[a, b)`: its weights, the per-session KV
//! cache, and the forward pass that maps hidden states in to hidden states
//! out — the unit of work a node sells.

use std::sync::Arc;

use hotpot_core::LayerSpan;

use crate::arch::{Activation, LayerPlan};
use crate::error::{ForwardError, ModelError};
use crate::kernels::ops::{self, RopeTable};
use crate::kernels::{ActivationBits, Arena, Cpu, CpuPool, Isa, MatmulInput, Matrix, PANEL, isa, matmul};
use crate::model::{ModelConfig, ModelFile};
use crate::profile::{self, Phase};

/// Where computation runs. Today: CPU threads with one kernel variant.
#[derive(Debug, Clone)]
pub struct Device {
    cpu: Arc<Cpu>,
}

impl Device {
    /// The CPU with `threads` compute threads (0: one per available core)
    /// and the best kernel variant (or `HOTPOT_KERNELS`).
    pub fn cpu(threads: usize) -> Result<Self, ModelError> {
        Self::cpu_with(threads, isa::selected())
    }

    /// The CPU with a chosen kernel variant (clamped to what the CPU runs).
    pub fn cpu_with(threads: usize, isa: Isa) -> Result<Self, ModelError> {
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let pool = CpuPool::new(threads).map_err(ModelError::Threads)?;
        Ok(Self { cpu: Arc::new(Cpu { pool, isa: isa.min(isa::best()) }) })
    }

    pub fn threads(&self) -> usize {
        self.cpu.pool.threads()
    }

    /// The kernel variant in use.
    pub fn isa(&self) -> Isa {
        self.cpu.isa
    }

    pub(crate) fn kernels(&self) -> &Cpu {
        &self.cpu
    }
}

/// `rows × dim` hidden states, row-major: what flows between spans.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenStates {
    rows: usize,
    dim: usize,
    data: Vec<f32>,
}

impl HiddenStates {
    pub fn new(rows: usize, dim: usize, data: Vec<f32>) -> Result<Self, ForwardError> {
        if rows == 0 {
            return Err(ForwardError::Empty);
        }
        if data.len() != rows * dim {
            return Err(ForwardError::Width { expected: dim, got: data.len() / rows });
        }
        Ok(Self { rows, dim, data })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// A placeholder with no rows (never handed out).
    fn empty() -> Self {
        Self { rows: 0, dim: 0, data: Vec::new() }
    }

    /// The last row alone (what the head needs during generation).
    pub fn last_row(&self) -> HiddenStates {
        Self { rows: 1, dim: self.dim, data: self.row(self.rows - 1).to_vec() }
    }
}

/// Keys and values of one block. Values: `[kv_head][position][head_dim]`.
/// Keys: `[kv_head][position / 16][head_dim][16]`, panels of 16 positions
/// with one dimension of all 16 side by side, so attention scores 16 keys
/// per vector instruction (see `ops::attend`).
#[derive(Debug, Default, Clone)]
struct BlockCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The attention history of one session over one span. Grows in chunks
/// (never re-concatenated per step) and can be rolled back with
/// [`KvCache::truncate`].
#[derive(Debug, Clone)]
pub struct KvCache {
    span: LayerSpan,
    n_kv_heads: usize,
    head_dim: usize,
    max_len: usize,
    len: usize,
    capacity: usize,
    blocks: Vec<BlockCache>,
}

/// Positions added per growth step, at least.
const CACHE_CHUNK: usize = 256;
/// Positions per key panel.
use crate::kernels::ops::KEY_PANEL;

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn span(&self) -> LayerSpan {
        self.span
    }

    /// Forgets every position from `pos` on (failover replay, speculation).
    pub fn truncate(&mut self, pos: usize) {
        self.len = self.len.min(pos);
    }

    /// Bytes held by the cache.
    pub fn memory_bytes(&self) -> usize {
        self.blocks.iter().map(|b| (b.k.capacity() + b.v.capacity()) * 4).sum()
    }

    fn head_stride(&self) -> usize {
        self.capacity * self.head_dim
    }

    /// Positions the cache holds room for once it holds `needed`.
    fn capacity_for(&self, needed: usize) -> usize {
        if needed <= self.capacity {
            return self.capacity;
        }
        let grown = (self.capacity * 2).max(needed).max(CACHE_CHUNK).div_ceil(CACHE_CHUNK) * CACHE_CHUNK;
        grown.min(self.max_len).max(needed).next_multiple_of(KEY_PANEL)
    }

    /// Bytes the cache will hold once it has room for `needed` positions
    /// (what [`KvCache::reserve`] would make it).
    pub fn memory_bytes_for(&self, needed: usize) -> usize {
        self.blocks.len() * 2 * self.n_kv_heads * self.capacity_for(needed) * self.head_dim * 4
    }

    /// Makes room for `needed` positions now (the cache also grows by
    /// itself as positions are added).
    pub fn reserve(&mut self, needed: usize) {
        if needed <= self.capacity {
            return;
        }
        let capacity = self.capacity_for(needed);
        let (old_stride, new_stride) = (self.head_stride(), capacity * self.head_dim);
        let used = self.len.next_multiple_of(KEY_PANEL) * self.head_dim;
        for block in &mut self.blocks {
            for buf in [&mut block.k, &mut block.v] {
                let mut next = vec![0.0f32; self.n_kv_heads * new_stride];
                for h in 0..self.n_kv_heads {
                    next[h * new_stride..][..used].copy_from_slice(&buf[h * old_stride..][..used]);
                }
                *buf = next;
            }
        }
        self.capacity = capacity;
    }
}

/// The weights of one transformer block, and how it attends.
struct Block {
    attn_norm: Vec<f32>,
    /// Q, K and V projections, fused into as few matrices as their encodings
    /// allow; outputs land side by side as `[q | k | v]`.
    qkv: Vec<(Matrix, usize)>,
    qkv_bias: Option<Vec<f32>>,
    /// Per-head RMS norm weights of queries and keys (`head_dim` each).
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    attn_out: Matrix,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    /// Gate and up projections, outputs `[gate | up]`.
    gate_up: Vec<(Matrix, usize)>,
    down: Matrix,
    post_ffn_norm: Option<Vec<f32>>,
    plan: LayerPlan,
}

impl Block {
    /// Block `i`'s weight matrices as (tensor name, rows, columns), in the
    /// order decode reads them.
    fn matrices(c: &ModelConfig, i: u32) -> [(String, usize, usize); 7] {
        let name = |t: &str| format!("blk.{i}.{t}");
        [
            (name("attn_q.weight"), c.q_dim(), c.dim),
            (name("attn_k.weight"), c.kv_dim(), c.dim),
            (name("attn_v.weight"), c.kv_dim(), c.dim),
            (name("attn_output.weight"), c.dim, c.q_dim()),
            (name("ffn_gate.weight"), c.ffn_dim, c.dim),
            (name("ffn_up.weight"), c.ffn_dim, c.dim),
            (name("ffn_down.weight"), c.dim, c.ffn_dim),
        ]
    }

    /// Loads block `i`'s tensors, by name, as the recipe asks; its matrices
    /// go to the next bytes of `arena`, in decode's order.
    fn load(file: &ModelFile, i: u32, arena: &Arc<Arena>) -> Result<Self, ModelError> {
        let c = file.config();
        let r = &c.recipe;
        let name = |t: &str| format!("blk.{i}.{t}");
        let vector = |t: &str, len: usize| file.load_vector(&name(t), len);
        let matrices: Vec<Matrix> =
            Self::matrices(c, i).iter().map(|(name, rows, cols)| file.load_matrix_in(name, *rows, *cols, Some(arena))).collect::<Result<_, _>>()?;
        let [q, k, v, attn_out, gate, up, down] = <[Matrix; 7]>::try_from(matrices).expect("seven matrices");
        let qkv_bias = if r.qkv_bias {
            let mut bias = vector("attn_q.bias", c.q_dim())?;
            bias.extend(vector("attn_k.bias", c.kv_dim())?);
            bias.extend(vector("attn_v.bias", c.kv_dim())?);
            Some(bias)
        } else {
            None
        };
        let qk_norm = if r.qk_norm { Some((vector("attn_q_norm.weight", c.head_dim)?, vector("attn_k_norm.weight", c.head_dim)?)) } else { None };
        let (post_attn_norm, post_ffn_norm) =
            if r.post_norms { (Some(vector("post_attention_norm.weight", c.dim)?), Some(vector("post_ffw_norm.weight", c.dim)?)) } else { (None, None) };
        Ok(Self {
            attn_norm: vector("attn_norm.weight", c.dim)?,
            qkv: fuse(vec![q, k, v]),
            qkv_bias,
            qk_norm,
            attn_out,
            post_attn_norm,
            ffn_norm: vector("ffn_norm.weight", c.dim)?,
            gate_up: fuse(vec![gate, up]),
            down,
            post_ffn_norm,
            plan: r.layer(i),
        })
    }

    fn size_bytes(&self) -> usize {
        let matrices = self.qkv.iter().chain(&self.gate_up).map(|(m, _)| m).chain([&self.attn_out, &self.down]);
        let vectors = [&self.attn_norm, &self.ffn_norm].into_iter().chain(self.post_attn_norm.iter()).chain(self.post_ffn_norm.iter());
        matrices.map(Matrix::size_bytes).sum::<usize>() + vectors.map(|v| v.len() * 4).sum::<usize>()
    }
}

/// Concatenates adjacent matrices whose outputs can share one product, and
/// records where each part's output columns start.
fn fuse(parts: Vec<Matrix>) -> Vec<(Matrix, usize)> {
    let mut fused: Vec<(Matrix, usize)> = Vec::new();
    let mut at = 0;
    for m in parts {
        let rows = m.rows();
        match fused.pop() {
            Some((prev, start)) if prev.rows() % PANEL == 0 && prev.format() == m.format() && prev.cols() == m.cols() => {
                fused.push((Matrix::concat_rows(prev, m), start));
            }
            prev => {
                fused.extend(prev);
                fused.push((m, at));
            }
        }
        at += rows;
    }
    fused
}

/// Loaded blocks `[a, b)` of a model, ready to run.
pub struct Span {
    config: ModelConfig,
    span: LayerSpan,
    blocks: Vec<Block>,
    device: Device,
    /// Attend only to the last this-many positions (sliding-window models).
    attention_window: Option<usize>,
}

impl std::fmt::Debug for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Span").field("span", &self.span).field("device", &self.device).finish()
    }
}

/// One session's part of a batched forward pass.
pub struct BatchItem<'a> {
    pub cache: &'a mut KvCache,
    pub hidden: &'a HiddenStates,
    pub start_pos: usize,
}

/// The rows of one session inside a batch, with its cache of one block.
struct RowGroup<'a> {
    kv: &'a mut BlockCache,
    capacity: usize,
    start_pos: usize,
    offset: usize,
    rows: usize,
}

/// Reusable buffers of one forward pass.
#[derive(Default)]
struct Scratch {
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    input: MatmulInput,
}

impl Span {
    /// Loads the tensors of blocks `span` (and nothing else) from `file`.
    pub fn load(file: &ModelFile, span: LayerSpan, device: &Device) -> Result<Self, ModelError> {
        file.config().check_span(span)?;
        // One arena for every block's matrices, sized exactly (see `Arena`).
        let mut lens = Vec::new();
        for i in span.blocks() {
            for (name, rows, cols) in Block::matrices(file.config(), i) {
                lens.push(file.matrix_bytes(&name, rows, cols)?);
            }
        }
        let arena = Arc::new(Arena::new(Arena::bytes_for(lens)));
        let blocks = span.blocks().map(|i| Block::load(file, i, &arena)).collect::<Result<_, _>>()?;
        Ok(Self { config: file.config().clone(), span, blocks, device: device.clone(), attention_window: None })
    }

    pub fn span(&self) -> LayerSpan {
        self.span
    }

    /// Sliding-window attention: each position sees only the last `window`
    /// positions (`None`: all). For models trained that way — and for the
    /// red-team's "cheap KV cache" cheat.
    pub fn set_attention_window(&mut self, window: Option<usize>) {
        self.attention_window = window.map(|w| w.max(1));
    }

    /// Serves these blocks as if they were `span` (same length): the
    /// red-team's "other span's weights" cheat.
    pub fn relabel(&mut self, span: LayerSpan) {
        assert_eq!(span.len(), self.span.len(), "a relabelled span keeps its length");
        self.span = span;
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of weights held in memory.
    pub fn size_bytes(&self) -> usize {
        self.blocks.iter().map(Block::size_bytes).sum()
    }

    /// An empty cache for one session of at most `max_len` positions
    /// (capped at the model's context length).
    pub fn new_cache(&self, max_len: usize) -> KvCache {
        self.cache_for(self.span, max_len).expect("a span contains itself")
    }

    /// An empty cache for a session over `blocks`, a part of this span: a
    /// node holding `[0,10)` can serve a session over `[4,8)`.
    pub fn cache_for(&self, blocks: LayerSpan, max_len: usize) -> Result<KvCache, ForwardError> {
        if blocks.start() < self.span.start() || blocks.end() > self.span.end() {
            return Err(ForwardError::Span { requested: blocks, served: self.span });
        }
        Ok(KvCache {
            span: blocks,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            max_len: max_len.min(self.config.context_length),
            len: 0,
            capacity: 0,
            blocks: blocks.blocks().map(|_| BlockCache::default()).collect(),
        })
    }

    /// Bytes of KV cache one position costs in a session over `blocks`.
    pub fn cache_bytes_per_position(&self, blocks: LayerSpan) -> usize {
        blocks.len() as usize * 2 * self.config.kv_dim() * 4
    }

    /// Runs the span over `hidden` (`T × d`), which holds positions
    /// `start_pos .. start_pos + T`: a prefill when `T > 1`, a decode step
    /// when `T = 1`. Appends to `cache`; on error the cache is unchanged.
    pub fn forward(&self, cache: &mut KvCache, hidden: &HiddenStates, start_pos: usize) -> Result<HiddenStates, ForwardError> {
        let mut items = [BatchItem { cache, hidden, start_pos }];
        self.forward_batch(&mut items).pop().unwrap_or(Err(ForwardError::Empty))
    }

    fn check(&self, item: &BatchItem<'_>) -> Result<(), ForwardError> {
        let (c, cache, hidden, start_pos) = (&self.config, &*item.cache, item.hidden, item.start_pos);
        if hidden.dim() != c.dim {
            return Err(ForwardError::Width { expected: c.dim, got: hidden.dim() });
        }
        if start_pos != cache.len() {
            return Err(ForwardError::Position { expected: cache.len(), got: start_pos });
        }
        if start_pos + hidden.rows() > cache.max_len() {
            return Err(ForwardError::ContextFull { needed: start_pos + hidden.rows(), max: cache.max_len() });
        }
        if !hidden.as_slice().iter().all(|v| v.is_finite()) {
            return Err(ForwardError::NotFinite);
        }
        if cache.span.start() < self.span.start() || cache.span.end() > self.span.end() {
            return Err(ForwardError::Span { requested: cache.span, served: self.span });
        }
        Ok(())
    }

    /// Runs several sessions' steps as one pass over the weights: each
    /// matrix product reads its weights once for the rows of all of them.
    /// Each session gets exactly the bits `forward` alone would give it.
    /// Items whose cache covers other blocks than the first valid item's
    /// are refused (`ForwardError::Span`); refused items leave their cache
    /// as it was.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> Vec<Result<HiddenStates, ForwardError>> {
        let c = &self.config;
        let mut results: Vec<Result<HiddenStates, ForwardError>> = items.iter().map(|item| self.check(item).map(|()| HiddenStates::empty())).collect();
        let Some(lead) = results.iter().position(Result::is_ok) else {
            return results;
        };
        let blocks_span = items[lead].cache.span;
        for (result, item) in results.iter_mut().zip(items.iter()) {
            if result.is_ok() && item.cache.span != blocks_span {
                *result = Err(ForwardError::Span { requested: item.cache.span, served: blocks_span });
            }
        }
        let run: Vec<usize> = (0..items.len()).filter(|&i| results[i].is_ok()).collect();
        let total: usize = run.iter().map(|&i| items[i].hidden.rows()).sum();
        let mut x = Vec::with_capacity(total * c.dim);
        let mut positions = Vec::with_capacity(total);
        for &i in &run {
            let item = &mut items[i];
            item.cache.reserve(item.start_pos + item.hidden.rows());
            x.extend_from_slice(item.hidden.as_slice());
            positions.extend(item.start_pos..item.start_pos + item.hidden.rows());
        }
        // One rotary table per distinct base and scale among the blocks.
        let mut ropes: Vec<(LayerPlan, RopeTable)> = Vec::new();
        let mut s = Scratch::default();
        let first = (blocks_span.start() - self.span.start()) as usize;
        for (b, block) in self.blocks[first..first + blocks_span.len() as usize].iter().enumerate() {
            let mut groups: Vec<RowGroup<'_>> = Vec::with_capacity(run.len());
            let mut offset = 0;
            for item in items.iter_mut().enumerate().filter(|(i, _)| run.contains(i)).map(|(_, item)| item) {
                let rows = item.hidden.rows();
                groups.push(RowGroup { kv: &mut item.cache.blocks[b], capacity: item.cache.capacity, start_pos: item.start_pos, offset, rows });
                offset += rows;
            }
            let key = |p: &LayerPlan| (p.rope_base.to_bits(), p.rope_scale.to_bits());
            if !ropes.iter().any(|(p, _)| key(p) == key(&block.plan)) {
                let table = RopeTable::scaled(block.plan.rope_base, block.plan.rope_scale, c.rope_dim, &positions);
                ropes.push((block.plan, table));
            }
            let rope = &ropes.iter().find(|(p, _)| key(p) == key(&block.plan)).expect("added above").1;
            self.attention(block, &mut groups, rope, &mut x, total, &mut s);
            self.feed_forward(block, &mut x, total, &mut s);
        }
        let mut offset = 0;
        for &i in &run {
            let item = &mut items[i];
            let rows = item.hidden.rows();
            item.cache.len = item.start_pos + rows;
            results[i] = Ok(HiddenStates { rows, dim: c.dim, data: x[offset * c.dim..(offset + rows) * c.dim].to_vec() });
            offset += rows;
        }
        results
    }

    fn attention(&self, block: &Block, groups: &mut [RowGroup<'_>], rope: &RopeTable, x: &mut [f32], t: usize, s: &mut Scratch) {
        let c = &self.config;
        let cpu = self.device.kernels();
        let (q_dim, kv_dim, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let width = q_dim + 2 * kv_dim;
        s.normed.resize(t * c.dim, 0.0);
        profile::time(Phase::Norm, || ops::rms_norm(cpu.isa, x, &block.attn_norm, c.rms_eps, &mut s.normed));
        let formats = block.qkv.iter().map(|(m, _)| m.format());
        profile::time(Phase::Quantize, || s.input.prepare(cpu, &s.normed, t, c.dim, formats, ActivationBits::Eight));
        s.qkv.resize(t * width, 0.0);
        profile::time(Phase::MatmulQkv, || {
            for (m, at) in &block.qkv {
                matmul(cpu, m, &s.input, &mut s.qkv, width, *at);
            }
        });
        profile::time(Phase::Rope, || {
            for group in groups.iter_mut() {
                let stride = group.capacity * hd;
                for r in 0..group.rows {
                    let row = group.offset + r;
                    let qkv = &mut s.qkv[row * width..(row + 1) * width];
                    if let Some(bias) = &block.qkv_bias {
                        ops::add_assign(qkv, bias);
                    }
                    if let Some((q_norm, k_norm)) = &block.qk_norm {
                        let (q, k) = qkv[..q_dim + kv_dim].split_at_mut(q_dim);
                        ops::rms_norm_in_place(cpu.isa, q, q_norm, c.rms_eps);
                        ops::rms_norm_in_place(cpu.isa, k, k_norm, c.rms_eps);
                    }
                    let (q, kv_part) = qkv.split_at_mut(q_dim);
                    for head in q.chunks_exact_mut(hd).chain(kv_part[..kv_dim].chunks_exact_mut(hd)) {
                        rope.apply(c.recipe.rope_style, &mut head[..c.rope_dim], row);
                    }
                    let pos = group.start_pos + r;
                    let key_at = pos / KEY_PANEL * KEY_PANEL * hd + pos % KEY_PANEL;
                    for h in 0..c.n_kv_heads {
                        for (d, &k) in kv_part[h * hd..][..hd].iter().enumerate() {
                            group.kv.k[h * stride + key_at + d * KEY_PANEL] = k;
                        }
                        group.kv.v[h * stride + pos * hd..][..hd].copy_from_slice(&kv_part[kv_dim + h * hd..][..hd]);
                    }
                }
            }
        });

        // One task per (row, head), or in prefill per (row, key/value head)
        // with the query heads that share it read together (same bits,
        // `ops::attend_heads`); each task writes its own slice of the output.
        s.attn.resize(t * q_dim, 0.0);
        let group_size = c.n_heads / c.n_kv_heads;
        let scale = c.recipe.attention_scale;
        // The model's window for this block, narrowed by a red-team window.
        let window = match (block.plan.window, self.attention_window) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let out = SharedRows(s.attn.as_mut_ptr());
        let views: Vec<(&BlockCache, usize, usize, usize)> = groups.iter().map(|g| (&*g.kv, g.capacity * hd, g.start_pos, g.offset)).collect();
        let row_group: Vec<usize> = groups.iter().enumerate().flat_map(|(i, g)| std::iter::repeat_n(i, g.rows)).collect();
        let qkv = &s.qkv;
        let heads_per_task = if t > 1 && hd % 16 == 0 { group_size } else { 1 };
        let tasks_per_row = c.n_heads / heads_per_task;
        let tasks = t * tasks_per_row;
        let work = |range: std::ops::Range<usize>| {
            let mut scores = Vec::new();
            for task in range {
                let (row, h) = (task / tasks_per_row, task % tasks_per_row * heads_per_task);
                let (kv, stride, start_pos, offset) = views[row_group[row]];
                let kvh = h / group_size;
                let len = start_pos + (row - offset) + 1;
                // With a sliding window, keys before `first` are masked; the
                // slices still start on a key panel.
                let first = window.map_or(0, |w| len.saturating_sub(w));
                let from = first / KEY_PANEL * KEY_PANEL;
                let q = &qkv[row * width + h * hd..][..heads_per_task * hd];
                let keys = &kv.k[kvh * stride + from * hd..][..(len.next_multiple_of(KEY_PANEL) - from) * hd];
                let values = &kv.v[kvh * stride + from * hd..][..(len - from) * hd];
                // SAFETY: task (row, h) is the only writer of this slice.
                let dst = unsafe { out.slice(row * q_dim + h * hd, heads_per_task * hd) };
                if heads_per_task == 1 {
                    ops::attend(cpu.isa, q, keys, values, scale, first - from, &mut scores, dst);
                } else {
                    ops::attend_heads(cpu.isa, q, hd, keys, values, scale, first - from, &mut scores, dst);
                }
            }
        };
        profile::time(Phase::Attention, || {
            // Short decode steps are cheaper than waking the other threads.
            let pairs: usize = groups.iter().map(|g| g.rows * (g.start_pos + g.rows)).sum();
            if pairs < ATTENTION_PARALLEL_MIN {
                work(0..tasks);
            } else {
                cpu.pool.for_each_chunk(tasks, tasks.div_ceil(cpu.pool.threads() * 8), &work);
            }
        });

        let formats = [block.attn_out.format()];
        profile::time(Phase::Quantize, || s.input.prepare(cpu, &s.attn, t, q_dim, formats, ActivationBits::Eight));
        s.proj.resize(t * c.dim, 0.0);
        profile::time(Phase::MatmulOut, || matmul(cpu, &block.attn_out, &s.input, &mut s.proj, c.dim, 0));
        if let Some(norm) = &block.post_attn_norm {
            profile::time(Phase::Norm, || ops::rms_norm_in_place(cpu.isa, &mut s.proj, norm, c.rms_eps));
        }
        profile::time(Phase::Residual, || ops::add_assign(x, &s.proj));
    }

    fn feed_forward(&self, block: &Block, x: &mut [f32], t: usize, s: &mut Scratch) {
        let c = &self.config;
        let cpu = self.device.kernels();
        profile::time(Phase::Norm, || ops::rms_norm(cpu.isa, x, &block.ffn_norm, c.rms_eps, &mut s.normed));
        let formats = block.gate_up.iter().map(|(m, _)| m.format());
        profile::time(Phase::Quantize, || s.input.prepare(cpu, &s.normed, t, c.dim, formats, ActivationBits::Eight));
        s.gate_up.resize(t * 2 * c.ffn_dim, 0.0);
        profile::time(Phase::MatmulGateUp, || {
            for (m, at) in &block.gate_up {
                matmul(cpu, m, &s.input, &mut s.gate_up, 2 * c.ffn_dim, *at);
            }
        });
        s.act.resize(t * c.ffn_dim, 0.0);
        profile::time(Phase::Swiglu, || {
            let (ffn, isa, activation) = (c.ffn_dim, cpu.isa, c.recipe.activation);
            cpu.pool.map_rows(&s.gate_up, 2 * ffn, &mut s.act, ffn, &|gate_up, out| match activation {
                Activation::SwiGlu => ops::swiglu(isa, gate_up, ffn, out),
                Activation::GeGlu => ops::geglu(isa, gate_up, ffn, out),
            });
        });
        // 16-bit: the gated activation has outlier columns (see `kernels::quant`).
        let formats = [block.down.format()];
        profile::time(Phase::Quantize, || s.input.prepare(cpu, &s.act, t, c.ffn_dim, formats, ActivationBits::Sixteen));
        profile::time(Phase::MatmulDown, || matmul(cpu, &block.down, &s.input, &mut s.proj, c.dim, 0));
        if let Some(norm) = &block.post_ffn_norm {
            profile::time(Phase::Norm, || ops::rms_norm_in_place(cpu.isa, &mut s.proj, norm, c.rms_eps));
        }
        profile::time(Phase::Residual, || ops::add_assign(x, &s.proj));
    }
}

/// Below this many (query, key) pairs per head, attention runs on the
/// calling thread: waking the pool would cost more than it saves.
const ATTENTION_PARALLEL_MIN: usize = 256;

/// An output buffer the pool's threads write disjoint slices of.
#[derive(Clone, Copy)]
struct SharedRows(*mut f32);

// SAFETY: used only to hand disjoint slices to the pool's threads.
unsafe impl Send for SharedRows {}
unsafe impl Sync for SharedRows {}

impl SharedRows {
    /// # Safety
    /// `at..at + len` must lie inside the buffer, and no other thread may
    /// touch it while the slice lives.
    unsafe fn slice<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TinyModel;

    #[test]
    fn a_spans_matrices_lie_end_to_end_in_decode_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tiny.gguf");
        TinyModel::default().write(&path).expect("writes");
        let file = ModelFile::open(&path).expect("opens");
        let span = Span::load(&file, LayerSpan::new(1, 4).expect("span"), &Device::cpu(1).expect("cpu")).expect("loads");
        let order: Vec<&Matrix> = span
            .blocks
            .iter()
            .flat_map(|b| b.qkv.iter().map(|(m, _)| m).chain([&b.attn_out]).chain(b.gate_up.iter().map(|(m, _)| m)).chain([&b.down]))
            .collect();
        // q, k and v fuse into one product, gate and up into another.
        assert_eq!(order.len(), 3 * 4);
        for (i, pair) in order.windows(2).enumerate() {
            assert!(pair[0].followed_by(pair[1]), "matrix {i} is not followed by matrix {}", i + 1);
        }
    }
}
