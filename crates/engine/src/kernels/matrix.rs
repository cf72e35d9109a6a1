//! Weight matrices in Hotpot's packed layout, and the matrix product.
//!
//! A GGUF matrix of `rows × cols` is regrouped at load time into *panels* of
//! 16 rows. Inside a panel the quants of one 32-wide block are interleaved
//! four bytes per row, so that one 64-byte load holds the same columns of all
//! 16 rows. Widened to 16-bit lanes, each 32-bit lane then holds two columns
//! of one row, and one multiply-add of 16-bit pairs (`vpdpwssd`, `vpmaddwd`)
//! against two broadcast activations advances all 16 rows:
//!
//! ```text
//! panel = [ quants: blocks × (16 rows × 32 cols) | d: blocks × 16 f16 | m: blocks × 16 f16 (Q4_1) ]
//! Q4 quants of a block: 4 groups g of 64 bytes; row r's 4 bytes in group g are
//!     the GGML bytes [qs[2g], qs[2g+8], qs[2g+1], qs[2g+9]]. Word-wise nibble
//!     extraction gives the column pairs (2g, 2g+1), (2g+16, 2g+17) [high
//!     nibbles of bytes 0, 2], (2g+8, 2g+9), (2g+24, 2g+25) [bytes 1, 3].
//! Q8 quants of a block: 8 groups g of 64 bytes; row r's 4 bytes in group g
//!     are [q[2g], q[2g+16], q[2g+1], q[2g+17]]: low bytes of the two words give
//!     columns (2g, 2g+1), high bytes (2g+16, 2g+17).
//! ```
//!
//! With 8-bit activations (`ActivationBits`), the same four bytes of a lane
//! hold, in their low nibbles, columns 2g, 2g+8, 2g+1, 2g+9 and in their
//! high nibbles those + 16: masking bytes gives two vectors of unsigned
//! quants, each multiplied by four broadcast activations stored in that
//! order (`vpdpbusd`), so one layout serves both widths. AVX-512 reads
//! 16-bit activations the same way, as their low and high bytes
//! (`QuantizedRows::split`): two byte products per weight vector, combined
//! as `256 · high + low`, the same integer sums as 16-bit pairs.
//!
//! Q5_0, Q4_K, Q5_K and Q6_K keep their low four bits in the Q4 layout
//! above (one 32-column block or K-quant sub-block at a time) and add a
//! plane of high bits per block, arranged so that constant shifts of
//! 16-bit lanes put them next to the nibbles they extend:
//!
//! ```text
//! 1 high bit (Q5_0, Q5_K): 64 bytes, row r's u32 at 4r; bit 16h + 4i + g
//!     belongs to nibble i of group g, column half h (h = 0: even columns).
//! 2 high bits (Q6_K): 128 bytes, groups 0–1 then groups 2–3; in each,
//!     row r's u32 at 4r, bits 16h + 4i + 2(g mod 2) .. +1.
//! scales: Q5_0: d per block (f16); Q4_K/Q5_K: 6-bit scale and min per
//!     block (a byte each) and d, dmin per 256 columns (f16); Q6_K: the two
//!     i8 scales of the block's 16-column halves, d per 256 columns (f16).
//! ```
//!
//! Each output element is one lane of a vector register, accumulated block
//! after block with a fused multiply-add in the same order in every code
//! path (scalar, AVX2, AVX-512; one token or many; any thread count).
//! Results are therefore bit-identical across all of them, which is what
//! lets an auditor on another CPU recompute a node's work exactly.

use std::sync::Arc;

use half::f16;

use super::Cpu;
use super::aligned::{AlignedBuf, Arena};
use super::pool::SharedOut;

use super::isa::Isa;
use super::quant::{self, QK, QK_K, QuantizedRows};

/// Rows per panel: one 512-bit vector of f32 or i32 lanes.
pub const PANEL: usize = 16;

/// The weight encodings the kernels run natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types, reason = "GGML's names for the encodings")]
pub enum WeightFormat {
    F32,
    Q4_0,
    Q4_1,
    Q8_0,
    Q5_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl WeightFormat {
    pub const ALL: [Self; 8] = [Self::F32, Self::Q4_0, Self::Q4_1, Self::Q8_0, Self::Q5_0, Self::Q4_K, Self::Q5_K, Self::Q6_K];

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
            Self::Q5_0 => "Q5_0",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
        }
    }

    /// Weights per GGML block (32, or 256 for K-quant superblocks).
    pub fn ggml_block_len(self) -> usize {
        if self.is_k_quant() { QK_K } else { QK }
    }

    /// Bytes of one GGML block (`ggml_block_len` weights).
    pub fn ggml_block_bytes(self) -> usize {
        match self {
            Self::F32 => 4 * QK,
            Self::Q4_0 => quant::Q4_0_BYTES,
            Self::Q4_1 => quant::Q4_1_BYTES,
            Self::Q8_0 => quant::Q8_0_BYTES,
            Self::Q5_0 => quant::Q5_0_BYTES,
            Self::Q4_K => quant::Q4_K_BYTES,
            Self::Q5_K => quant::Q5_K_BYTES,
            Self::Q6_K => quant::Q6_K_BYTES,
        }
    }

    /// Whether products with this format read 8-bit activations where the
    /// caller allows them: the K-quants. Not Q8_0 (signed quants;
    /// `vpdpbusd` multiplies unsigned by signed); not Q5_0 (Gemma 3 270M's
    /// Q5_0 tensors with 8-bit inputs fall below llama.cpp's accuracy, 131
    /// of 136 top-1 against its 132); not Q4_0/Q4_1 (SmolLM2-135M Q4_1, the
    /// default model, then answers "What is the capital of France?" without
    /// "Paris"; see `quant.rs`).
    pub(crate) fn reads_bytes(self) -> bool {
        self.is_k_quant()
    }

    pub fn is_k_quant(self) -> bool {
        matches!(self, Self::Q4_K | Self::Q5_K | Self::Q6_K)
    }

    /// Bits above the low nibble in each quant (0, 1 or 2; Q8_0 is its own layout).
    pub(crate) fn high_bits(self) -> usize {
        match self {
            Self::Q5_0 | Self::Q5_K => 1,
            Self::Q6_K => 2,
            _ => 0,
        }
    }

    /// Bytes of quants per 32-column block of a panel.
    pub(crate) fn quant_bytes(self) -> usize {
        match self {
            Self::F32 => 0,
            Self::Q8_0 => PANEL * QK,
            _ => PANEL * QK / 2 + self.high_bits() * PANEL * QK / 8,
        }
    }

    /// Arrays of one f16 per row and 32-column block (d, then m for Q4_1).
    pub(crate) fn block_halves(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q8_0 | Self::Q5_0 => 1,
            Self::Q4_1 => 2,
            _ => 0,
        }
    }

    /// Bytes per row and 32-column block of K-quant scales: Q6_K's two
    /// signed scales; Q4_K/Q5_K's 6-bit scale and minimum in one and a half
    /// (see [`PanelLayout::k_scale_min`]), as compact as the file's 12 per
    /// superblock.
    pub(crate) fn block_bytes_x2(self) -> usize {
        match self {
            Self::Q6_K => 4,
            Self::Q4_K | Self::Q5_K => 3,
            _ => 0,
        }
    }

    /// Arrays of one f16 per row and 256-column superblock (d, dmin).
    pub(crate) fn super_halves(self) -> usize {
        match self {
            Self::Q4_K | Self::Q5_K => 2,
            Self::Q6_K => 1,
            _ => 0,
        }
    }

    pub fn is_quantized(self) -> bool {
        self != Self::F32
    }

    fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        Some(match dtype {
            G::F32 => Self::F32,
            G::Q4_0 => Self::Q4_0,
            G::Q4_1 => Self::Q4_1,
            G::Q8_0 => Self::Q8_0,
            G::Q5_0 => Self::Q5_0,
            G::Q4K => Self::Q4_K,
            G::Q5K => Self::Q5_K,
            G::Q6K => Self::Q6_K,
            _ => return None,
        })
    }

    /// The native format of a GGML tensor type, if the kernels run it.
    pub fn of(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        Self::from_ggml(dtype)
    }
}

/// Where each part of a panel starts, for one format and width.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PanelLayout {
    pub blocks: usize,
    pub block_halves_at: usize,
    pub block_bytes_at: usize,
    pub super_halves_at: usize,
    pub bytes: usize,
    /// How far ahead decode prefetches, `PREFETCH_BYTES` of panel, as
    /// whole panels and blocks (`ahead_blocks < blocks`).
    pub ahead_panels: usize,
    pub ahead_blocks: usize,
    /// Start and per-block share of each of the panel's four regions, for
    /// decode's prefetch.
    regions: [(usize, usize); 4],
}

impl PanelLayout {
    pub fn new(format: WeightFormat, cols: usize) -> Self {
        if format == WeightFormat::F32 {
            let bytes = cols * PANEL * 4;
            return Self { blocks: 0, block_halves_at: bytes, block_bytes_at: bytes, super_halves_at: bytes, bytes, ahead_panels: 0, ahead_blocks: 0, regions: [(0, 0); 4] };
        }
        let blocks = cols / QK;
        let block_halves_at = blocks * format.quant_bytes();
        let block_bytes_at = block_halves_at + format.block_halves() * blocks * PANEL * 2;
        let super_halves_at = block_bytes_at + format.block_bytes_x2() * blocks * PANEL / 2;
        let bytes = super_halves_at + format.super_halves() * (cols / QK_K) * PANEL * 2;
        assert!(blocks == 0 || bytes.is_multiple_of(blocks), "a {format:?} panel of {cols} columns does not split evenly into blocks");
        // Exact for every format: a superblock's arrays are 8 blocks' worth.
        let block_stride = bytes.checked_div(blocks).unwrap_or(0);
        let ahead = PREFETCH_BYTES.checked_div(block_stride).unwrap_or(0);
        let (ahead_panels, ahead_blocks) = (ahead.checked_div(blocks).unwrap_or(0), ahead.checked_rem(blocks).unwrap_or(0));
        // A panel shorter than the prefetch distance is fetched whole while
        // the one before it is read: one walk in address order does. A
        // longer one is walked region by region.
        let bounds = if bytes <= PREFETCH_BYTES { [0, bytes, bytes, bytes, bytes] } else { [0, block_halves_at, block_bytes_at, super_halves_at, bytes] };
        let regions = std::array::from_fn(|r| {
            let (from, to) = (bounds[r], bounds[r + 1]);
            assert!(blocks == 0 || (to - from).is_multiple_of(blocks), "a {format:?} panel region does not split evenly into blocks");
            (from, (to - from).checked_div(blocks).unwrap_or(0))
        });
        Self { blocks, block_halves_at, block_bytes_at, super_halves_at, bytes, ahead_panels, ahead_blocks, regions }
    }

    /// Offset of lane 0 of per-block f16 array `array` at block `b`.
    pub fn block_half(&self, array: usize, b: usize) -> usize {
        self.block_halves_at + (array * self.blocks + b) * PANEL * 2
    }

    /// Offset of lane 0 of per-block byte array `array` at block `b`
    /// (Q6_K: its two scales; Q4_K/Q5_K: array 0 only, see `k_scale_min`).
    pub fn block_byte(&self, array: usize, b: usize) -> usize {
        self.block_bytes_at + (array * self.blocks + b) * PANEL
    }

    /// Offset of lane 0 of the Q4_K/Q5_K byte that holds the top two bits
    /// of block `b`'s scale and minimum (shared by blocks `2i` and `2i + 1`).
    pub fn k_high_byte(&self, b: usize) -> usize {
        self.block_bytes_at + (self.blocks + b / 2) * PANEL
    }

    /// Block `b`'s 6-bit scale and minimum of row `lane` of a Q4_K/Q5_K
    /// panel. The low nibbles share a byte (`block_byte(0, b)`: scale, then
    /// minimum above it); the top two bits of each sit in a byte shared by
    /// a pair of blocks (`k_high_byte`): the even block's in bits 4-5
    /// (scale) and 6-7 (minimum), the odd block's in bits 0-1 and 2-3, so
    /// the kernels bring either to bits 4-7 with at most one shift.
    pub fn k_scale_min(&self, panel: &[u8], b: usize, lane: usize) -> (u8, u8) {
        let low = panel[self.block_byte(0, b) + lane];
        let high = panel[self.k_high_byte(b) + lane] << if b % 2 == 1 { 4 } else { 0 };
        ((low & 15) | (high & 0x30), (low >> 4) | ((high >> 2) & 0x30))
    }

    /// Stores what [`Self::k_scale_min`] reads.
    fn put_k_scale_min(&self, panel: &mut [u8], b: usize, lane: usize, scale: u8, min: u8) {
        debug_assert!(scale < 64 && min < 64);
        panel[self.block_byte(0, b) + lane] = (scale & 15) | (min << 4);
        let shift = if b % 2 == 1 { 4 } else { 0 };
        let high = ((scale >> 4) << 4 | (min >> 4) << 6) >> shift;
        let byte = &mut panel[self.k_high_byte(b) + lane];
        *byte = (*byte & !(0xF0 >> shift)) | high;
    }

    /// Calls `line` with the offsets from the panel's start of the cache
    /// lines decode prefetches while it reads block `b` of a panel at
    /// address `base`: those of the block `PREFETCH_BYTES` of panel further
    /// (in this panel or, past its end, in the next ones, which lie end to
    /// end) — in a panel longer than that, in each of its four regions
    /// (quants, per-block halves, per-block bytes, per-superblock halves)
    /// the lines that start in that block's even share of the region; in a
    /// shorter one, those in its share of the whole panel. So the scale
    /// arrays of a long panel, which follow the quants,
    /// are fetched as far ahead of their reads as the quants are: fetched
    /// in address order (until 2026-12-04) a long panel's scales were
    /// reached only after the kernel had read half of them (a 1536 × 8960
    /// product, the 1.5B's down projection, ran 25 % below a 8960 × 1536
    /// one of the same bytes). Consecutive blocks and panels ask for every
    /// line once.
    #[inline(always)]
    pub fn prefetch_lines(&self, base: *const u8, b: usize, mut line: impl FnMut(usize)) {
        let (mut panel, mut k) = (self.ahead_panels, b + self.ahead_blocks);
        if k >= self.blocks {
            panel += 1;
            k -= self.blocks;
        }
        let origin = base as usize;
        let at = origin + panel * self.bytes;
        for &(from, stride) in &self.regions {
            let start = at + from + k * stride;
            let mut a = start.next_multiple_of(64);
            while a < start + stride {
                line(a - origin);
                a += 64;
            }
        }
    }

    /// Offset of lane 0 of per-superblock f16 array `array` for block `b`.
    pub fn super_half(&self, array: usize, b: usize) -> usize {
        let supers = self.blocks * QK / QK_K;
        self.super_halves_at + (array * supers + b * QK / QK_K) * PANEL * 2
    }
}

/// A weight matrix `rows × cols` (output features × input features) in the
/// packed panel layout.
pub struct Matrix {
    format: WeightFormat,
    rows: usize,
    cols: usize,
    panel_bytes: usize,
    data: AlignedBuf,
}

impl std::fmt::Debug for Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Matrix({} {}x{})", self.format.name(), self.rows, self.cols)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("a {format} matrix needs its column count to be a multiple of {multiple}, got {cols}")]
    Cols { format: &'static str, multiple: usize, cols: usize },
    #[error("a {rows}x{cols} {format} matrix needs {expected} bytes, got {got}")]
    Bytes { format: &'static str, rows: usize, cols: usize, expected: usize, got: usize },
    #[error("cannot read the weights: {0}")]
    Io(String),
}

impl Matrix {
    /// Packs a row-major matrix from GGML-encoded bytes.
    pub fn from_ggml(format: WeightFormat, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, PackError> {
        if format == WeightFormat::F32 {
            if bytes.len() != rows * cols * 4 {
                return Err(PackError::Bytes { format: "F32", rows, cols, expected: rows * cols * 4, got: bytes.len() });
            }
            let floats: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            return Self::from_f32(rows, cols, &floats);
        }
        let row_bytes = Self::row_bytes(format, cols)?;
        let expected = rows * row_bytes;
        if bytes.len() != expected {
            return Err(PackError::Bytes { format: format.name(), rows, cols, expected, got: bytes.len() });
        }
        Self::pack(format, rows, cols, None, |first_row, buf| {
            buf.copy_from_slice(&bytes[first_row * row_bytes..][..buf.len()]);
            Ok(())
        })
        .map_err(|e: std::io::Error| PackError::Io(e.to_string()))
    }

    /// Packs a quantized matrix whose GGML bytes start at `offset` in
    /// `file`, reading 16 rows at a time (on every core for large ones), so
    /// that loading never holds the file's copy of the tensor in memory.
    /// The packed weights go to the next bytes of `arena` when one is given.
    pub(crate) fn from_ggml_file(
        format: WeightFormat,
        rows: usize,
        cols: usize,
        file: &std::fs::File,
        offset: u64,
        arena: Option<&Arc<Arena>>,
    ) -> Result<Self, PackError> {
        use std::os::unix::fs::FileExt;
        let row_bytes = Self::row_bytes(format, cols)?;
        Self::pack(format, rows, cols, arena, |first_row, buf| file.read_exact_at(buf, offset + (first_row * row_bytes) as u64))
            .map_err(|e| PackError::Io(e.to_string()))
    }

    /// Bytes a `rows × cols` matrix of `format` takes once packed.
    pub(crate) fn packed_bytes(format: WeightFormat, rows: usize, cols: usize) -> Result<usize, PackError> {
        if format != WeightFormat::F32 {
            Self::row_bytes(format, cols)?;
        }
        Ok(rows.div_ceil(PANEL) * PanelLayout::new(format, cols).bytes)
    }

    /// Bytes of one GGML row of `cols` weights.
    fn row_bytes(format: WeightFormat, cols: usize) -> Result<usize, PackError> {
        let block_len = format.ggml_block_len();
        if format == WeightFormat::F32 || !cols.is_multiple_of(block_len) {
            return Err(PackError::Cols { format: format.name(), multiple: block_len, cols });
        }
        Ok(cols / block_len * format.ggml_block_bytes())
    }

    /// Packs panel after panel, each from the GGML bytes of its rows that
    /// `read(first_row, buffer)` fills in.
    fn pack(
        format: WeightFormat,
        rows: usize,
        cols: usize,
        arena: Option<&Arc<Arena>>,
        read: impl Fn(usize, &mut [u8]) -> std::io::Result<()> + Sync,
    ) -> Result<Self, std::io::Error> {
        let row_bytes = Self::row_bytes(format, cols).map_err(std::io::Error::other)?;
        let block_bytes = format.ggml_block_bytes();
        let mut matrix = Self::zeroed(format, rows, cols, arena);
        let layout = matrix.layout();
        let panel_bytes = matrix.panel_bytes;
        let pack_panel = |panel: usize, dst: &mut [u8], buf: &mut Vec<u8>| -> std::io::Result<()> {
            let lanes = PANEL.min(rows - panel * PANEL);
            buf.resize(lanes * row_bytes, 0);
            read(panel * PANEL, buf)?;
            for (lane, row) in buf.chunks_exact(row_bytes).enumerate() {
                for (g, src) in row.chunks_exact(block_bytes).enumerate() {
                    match format {
                        WeightFormat::Q4_0 | WeightFormat::Q4_1 | WeightFormat::Q8_0 => pack_legacy(format, &layout, dst, lane, g, src),
                        _ => pack_wide(format, &layout, dst, lane, g, src),
                    }
                }
            }
            Ok(())
        };
        // Large matrices are packed on every core (a model loads in seconds).
        let data = matrix.data.as_mut_slice();
        let threads = if data.len() < 1 << 22 { 1 } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };
        let per_thread = rows.div_ceil(PANEL).div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = data
                .chunks_mut(per_thread * panel_bytes)
                .enumerate()
                .map(|(i, chunk)| {
                    let pack_panel = &pack_panel;
                    scope.spawn(move || {
                        let mut buf = Vec::new();
                        for (j, dst) in chunk.chunks_mut(panel_bytes).enumerate() {
                            pack_panel(i * per_thread + j, dst, &mut buf)?;
                        }
                        Ok::<(), std::io::Error>(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("a packing thread panicked"))))
        })?;
        Ok(matrix)
    }

    /// Packs a row-major `f32` matrix (kept in f32).
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Result<Self, PackError> {
        Self::from_f32_in(rows, cols, values, None)
    }

    /// `from_f32`, into the next bytes of `arena` when one is given.
    pub(crate) fn from_f32_in(rows: usize, cols: usize, values: &[f32], arena: Option<&Arc<Arena>>) -> Result<Self, PackError> {
        if values.len() != rows * cols {
            return Err(PackError::Bytes { format: "F32", rows, cols, expected: rows * cols * 4, got: values.len() * 4 });
        }
        let mut matrix = Self::zeroed(WeightFormat::F32, rows, cols, arena);
        for row in 0..rows {
            let (panel, lane) = (row / PANEL, row % PANEL);
            let dst = matrix.panel_mut(panel);
            for (k, v) in values[row * cols..(row + 1) * cols].iter().enumerate() {
                dst[(k * PANEL + lane) * 4..][..4].copy_from_slice(&v.to_le_bytes());
            }
        }
        Ok(matrix)
    }

    /// `a` stacked on `b` (rows of `a` first). `a` must end on a panel
    /// boundary and both must share format and width. Matrices packed one
    /// after the other into one arena are joined where they lie; others are
    /// copied into a new buffer.
    pub fn concat_rows(a: Matrix, b: Matrix) -> Matrix {
        assert!(a.rows.is_multiple_of(PANEL) && a.format == b.format && a.cols == b.cols, "matrices cannot be stacked");
        let rows = a.rows + b.rows;
        if a.data.followed_by(&b.data) {
            return Self { rows, data: a.data.join(b.data), ..a };
        }
        let mut m = Self::zeroed(a.format, rows, a.cols, None);
        let split = a.data.len();
        m.data.as_mut_slice()[..split].copy_from_slice(a.data.as_slice());
        m.data.as_mut_slice()[split..].copy_from_slice(b.data.as_slice());
        m
    }

    /// Zeroed panels, in the next bytes of `arena` if it has room, else in
    /// a buffer of their own.
    fn zeroed(format: WeightFormat, rows: usize, cols: usize, arena: Option<&Arc<Arena>>) -> Self {
        let panel_bytes = PanelLayout::new(format, cols).bytes;
        let len = rows.div_ceil(PANEL) * panel_bytes;
        let data = arena.and_then(|arena| arena.take(len)).unwrap_or_else(|| AlignedBuf::zeroed(len));
        Self { format, rows, cols, panel_bytes, data }
    }

    /// Whether `next`'s weights start right where this matrix's end, in
    /// one arena (decode's prefetch then runs from one into the other).
    pub fn followed_by(&self, next: &Matrix) -> bool {
        self.data.followed_by(&next.data)
    }

    pub(crate) fn layout(&self) -> PanelLayout {
        PanelLayout::new(self.format, self.cols)
    }

    fn panel_mut(&mut self, panel: usize) -> &mut [u8] {
        &mut self.data.as_mut_slice()[panel * self.panel_bytes..][..self.panel_bytes]
    }

    pub(crate) fn panel(&self, panel: usize) -> &[u8] {
        &self.data.as_slice()[panel * self.panel_bytes..][..self.panel_bytes]
    }

    pub fn format(&self) -> WeightFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    /// Bytes held in memory.
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }

    /// Dequantizes row `row` into `out` (`cols` values): the embedding lookup.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let (panel, lane) = (row / PANEL, row % PANEL);
        let data = self.panel(panel);
        let layout = self.layout();
        let half = |at: usize| f16::from_le_bytes([data[at + lane * 2], data[at + lane * 2 + 1]]).to_f32();
        let quant_bytes = self.format.quant_bytes();
        for b in 0..layout.blocks {
            let out = &mut out[b * QK..(b + 1) * QK];
            let quants = &data[b * quant_bytes..][..quant_bytes];
            match self.format {
                WeightFormat::F32 => unreachable!("F32 panels have no blocks"),
                WeightFormat::Q8_0 => {
                    let d = half(layout.block_half(0, b));
                    let mut q = [0i8; QK];
                    unpack_q8(quants, lane, &mut q);
                    for (o, &q) in out.iter_mut().zip(&q) {
                        *o = d * f32::from(q);
                    }
                }
                WeightFormat::Q4_0 | WeightFormat::Q4_1 | WeightFormat::Q5_0 => {
                    let d = half(layout.block_half(0, b));
                    let m = match self.format {
                        WeightFormat::Q4_1 => half(layout.block_half(1, b)),
                        WeightFormat::Q4_0 => -8.0 * d,
                        _ => -16.0 * d,
                    };
                    for (o, q) in out.iter_mut().zip(unpack_wide(self.format, quants, lane)) {
                        *o = d * q as f32 + m;
                    }
                }
                WeightFormat::Q4_K | WeightFormat::Q5_K => {
                    let (d, dmin) = (half(layout.super_half(0, b)), half(layout.super_half(1, b)));
                    let (sc, m) = layout.k_scale_min(data, b, lane);
                    let (scale, min) = (d * f32::from(sc), dmin * f32::from(m));
                    for (o, q) in out.iter_mut().zip(unpack_wide(self.format, quants, lane)) {
                        *o = scale * q as f32 - min;
                    }
                }
                WeightFormat::Q6_K => {
                    let d = half(layout.super_half(0, b));
                    let scales = [0, 1].map(|h| d * f32::from(data[layout.block_byte(h, b) + lane] as i8));
                    for (c, (o, q)) in out.iter_mut().zip(unpack_wide(self.format, quants, lane)).enumerate() {
                        *o = scales[c / 16] * q as f32;
                    }
                }
            }
        }
        if self.format == WeightFormat::F32 {
            for (k, o) in out.iter_mut().enumerate().take(self.cols) {
                let at = (k * PANEL + lane) * 4;
                *o = f32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
            }
        }
    }
}

/// Packs one GGML block of Q4_0, Q4_1 or Q8_0 (`src`, block `b` of its
/// row) into lane `lane` of a panel.
fn pack_legacy(format: WeightFormat, layout: &PanelLayout, dst: &mut [u8], lane: usize, b: usize, src: &[u8]) {
    let quant_bytes = format.quant_bytes();
    let quants = &mut dst[b * quant_bytes..][..quant_bytes];
    if format == WeightFormat::Q8_0 {
        let q = &src[2..];
        for g in 0..8 {
            let at = g * 64 + lane * 4;
            quants[at..at + 4].copy_from_slice(&[q[2 * g], q[2 * g + 16], q[2 * g + 1], q[2 * g + 17]]);
        }
    } else {
        let qs = &src[if format == WeightFormat::Q4_0 { 2 } else { 4 }..];
        put_nibble_bytes(quants, lane, qs);
    }
    let d_at = layout.block_half(0, b) + lane * 2;
    dst[d_at..d_at + 2].copy_from_slice(&src[0..2]);
    if format == WeightFormat::Q4_1 {
        let m_at = layout.block_half(1, b) + lane * 2;
        dst[m_at..m_at + 2].copy_from_slice(&src[2..4]);
    }
}

/// Writes 16 GGML nibble bytes (`qs[i]` = column i low, column i + 16 high)
/// into the interleaved Q4 layout.
fn put_nibble_bytes(quants: &mut [u8], lane: usize, qs: &[u8]) {
    for g in 0..4 {
        let at = g * 64 + lane * 4;
        quants[at..at + 4].copy_from_slice(&[qs[2 * g], qs[2 * g + 8], qs[2 * g + 1], qs[2 * g + 9]]);
    }
}

/// The column of nibble `i` (0..4) of group `g` in the even (`h` = 0) or odd
/// 16-bit half of a lane.
const fn column(g: usize, i: usize, h: usize) -> usize {
    [2 * g, 2 * g + 16, 2 * g + 8, 2 * g + 24][i] + h
}

/// Writes the 32 quants `q` (up to 6 bits each) of one block: nibbles, then
/// `high` bits above them.
fn put_quants(quants: &mut [u8], lane: usize, q: &[u8; QK], high: usize) {
    let qs: [u8; 16] = std::array::from_fn(|i| (q[i] & 15) | ((q[i + 16] & 15) << 4));
    put_nibble_bytes(quants, lane, &qs);
    let planes = &mut quants[PANEL * QK / 2..];
    for plane in 0..high {
        let mut word = 0u32;
        for h in 0..2 {
            for i in 0..4 {
                if high == 1 {
                    for g in 0..4 {
                        word |= u32::from((q[column(g, i, h)] >> 4) & 1) << (16 * h + 4 * i + g);
                    }
                } else {
                    for gg in 0..2 {
                        word |= u32::from((q[column(2 * plane + gg, i, h)] >> 4) & 3) << (16 * h + 4 * i + 2 * gg);
                    }
                }
            }
        }
        planes[plane * 64 + lane * 4..][..4].copy_from_slice(&word.to_le_bytes());
    }
}

/// Packs one GGML block of Q5_0 or one superblock of Q4_K, Q5_K or Q6_K.
fn pack_wide(format: WeightFormat, layout: &PanelLayout, dst: &mut [u8], lane: usize, g: usize, src: &[u8]) {
    let quant_bytes = format.quant_bytes();
    let high = format.high_bits();
    let put = |dst: &mut [u8], b: usize, q: &[u8; QK]| put_quants(&mut dst[b * quant_bytes..][..quant_bytes], lane, q, high);
    match format {
        WeightFormat::Q5_0 => {
            let qh = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
            let q: [u8; QK] = std::array::from_fn(|c| {
                let byte = src[6 + c % 16];
                let low = if c < 16 { byte & 15 } else { byte >> 4 };
                low | (((qh >> c) & 1) << 4) as u8
            });
            put(dst, g, &q);
            let at = layout.block_half(0, g) + lane * 2;
            dst[at..at + 2].copy_from_slice(&src[0..2]);
        }
        WeightFormat::Q4_K | WeightFormat::Q5_K => {
            let (qh, qs) = if format == WeightFormat::Q5_K { (Some(&src[16..48]), &src[48..176]) } else { (None, &src[16..144]) };
            for j in 0..QK_K / QK {
                let b = g * QK_K / QK + j;
                put(dst, b, &quant::k_quants(j, qs, qh));
                let (sc, m) = quant::k_scale_min(j, &src[4..16]);
                layout.put_k_scale_min(dst, b, lane, sc, m);
            }
            let b = g * QK_K / QK;
            for (array, at) in [(0, 0), (1, 2)] {
                let to = layout.super_half(array, b) + lane * 2;
                dst[to..to + 2].copy_from_slice(&src[at..at + 2]);
            }
        }
        WeightFormat::Q6_K => {
            let scales = quant::q6_k_scales(src);
            for j in 0..QK_K / QK {
                let b = g * QK_K / QK + j;
                put(dst, b, &quant::q6_k_quants(j, src));
                dst[layout.block_byte(0, b) + lane] = scales[2 * j] as u8;
                dst[layout.block_byte(1, b) + lane] = scales[2 * j + 1] as u8;
            }
            let to = layout.super_half(0, g * QK_K / QK) + lane * 2;
            dst[to..to + 2].copy_from_slice(&src[208..210]);
        }
        _ => unreachable!("pack_wide handles Q5_0 and the K-quants"),
    }
}

/// Row `lane`'s 32 nibbles of one packed Q4 block, in column order.
pub(crate) fn unpack_q4(quants: &[u8], lane: usize, q: &mut [u8; QK]) {
    for g in 0..4 {
        let bytes = [0, 1, 2, 3].map(|j| quants[g * 64 + lane * 4 + j]);
        let halves = [u16::from_le_bytes([bytes[0], bytes[1]]), u16::from_le_bytes([bytes[2], bytes[3]])];
        for (h, half) in halves.into_iter().enumerate() {
            for i in 0..4 {
                q[column(g, i, h)] = ((half >> (4 * i)) & 15) as u8;
            }
        }
    }
}

/// Row `lane`'s 32 quants of one packed block of a nibble format, in
/// column order, as the integers the kernels multiply: Q4_0, Q4_1, Q5_0,
/// Q4_K and Q5_K unsigned (offsets are applied through the activations or
/// the minimum), Q6_K with its 32 subtracted.
pub(crate) fn unpack_wide(format: WeightFormat, quants: &[u8], lane: usize) -> [i32; QK] {
    let mut low = [0u8; QK];
    unpack_q4(quants, lane, &mut low);
    let mut q = low.map(i32::from);
    let planes = &quants[PANEL * QK / 2..];
    let word = |plane: usize| u32::from_le_bytes(planes[plane * 64 + lane * 4..][..4].try_into().expect("4 bytes"));
    for g in 0..4 {
        for i in 0..4 {
            for h in 0..2 {
                let col = column(g, i, h);
                match format.high_bits() {
                    1 => q[col] |= (((word(0) >> (16 * h + 4 * i + g)) & 1) << 4) as i32,
                    2 => q[col] |= (((word(g / 2) >> (16 * h + 4 * i + 2 * (g % 2))) & 3) << 4) as i32,
                    _ => {}
                }
            }
        }
    }
    if format == WeightFormat::Q6_K {
        q.iter_mut().for_each(|v| *v -= 32);
    }
    q
}

/// Row `lane`'s 32 quants of one packed Q8 block, in column order.
pub(crate) fn unpack_q8(quants: &[u8], lane: usize, q: &mut [i8; QK]) {
    for g in 0..8 {
        let [b0, b1, b2, b3] = [0, 1, 2, 3].map(|j| quants[g * 64 + lane * 4 + j] as i8);
        q[2 * g] = b0;
        q[2 * g + 1] = b2;
        q[2 * g + 16] = b1;
        q[2 * g + 17] = b3;
    }
}

/// The activation width weights of the formats that can read 8 bits
/// (`WeightFormat::reads_bytes`) read; see `quant.rs` for the accuracy of
/// each. The others always read 16 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationBits {
    #[default]
    Sixteen,
    Eight,
}

/// The input of a matrix product: `rows` rows of `cols` activations, with
/// the quantizations the weights that will read them need.
#[derive(Debug, Default)]
pub struct MatmulInput {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) values: Vec<f32>,
    pub(crate) bits: ActivationBits,
    /// 16-bit quants (`rows` is 0 when no weight reads them).
    pub(crate) quantized: QuantizedRows<i16>,
    /// 8-bit quants, for the formats that read them when `bits` is `Eight`.
    pub(crate) bytes: QuantizedRows<i8>,
}

impl MatmulInput {
    /// Takes `values` (`rows × cols`, row-major) for weights of `formats`:
    /// quantizes them to each width some quantized weight reads (`bits`
    /// where the format reads 8 bits, 16 otherwise), keeps a copy in f32 if any weight
    /// is not quantized.
    pub fn prepare(&mut self, cpu: &Cpu, values: &[f32], rows: usize, cols: usize, formats: impl IntoIterator<Item = WeightFormat>, bits: ActivationBits) {
        self.prepare_with(cpu, values, rows, cols, formats, bits, reads_split(cpu));
    }

    /// [`Self::prepare`], with the 16-bit quants' bytes (`split`) or not.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prepare_with(
        &mut self,
        cpu: &Cpu,
        values: &[f32],
        rows: usize,
        cols: usize,
        formats: impl IntoIterator<Item = WeightFormat>,
        bits: ActivationBits,
        split: bool,
    ) {
        self.rows = rows;
        self.cols = cols;
        self.bits = bits;
        let (mut wide, mut narrow, mut float) = (false, false, false);
        for format in formats {
            if !format.is_quantized() {
                float = true;
            } else if self.reads_bytes(format) {
                narrow = true;
            } else {
                wide = true;
            }
        }
        self.values.clear();
        if float {
            self.values.extend_from_slice(values);
        }
        if wide {
            self.quantized.quantize_into(cpu, values, rows, cols, split);
        } else {
            self.quantized.rows = 0;
        }
        if narrow {
            self.bytes.quantize_into(cpu, values, rows, cols, false);
        } else {
            self.bytes.rows = 0;
        }
    }

    /// Whether weights of `format` read the 8-bit quants.
    pub(crate) fn reads_bytes(&self, format: WeightFormat) -> bool {
        self.bits == ActivationBits::Eight && format.reads_bytes()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Whether `cpu`'s kernels read the 16-bit quants split into bytes
/// (`QuantizedRows::split`): the AVX-512 ones, for every format but Q8_0.
fn reads_split(cpu: &Cpu) -> bool {
    cpu.isa.min(super::isa::best()) == Isa::Avx512
}

/// Tokens per tile: each weight group unpacked is used for this many tokens.
pub(crate) const TOKEN_TILE: usize = 8;

/// Tokens whose activations (16-bit, `cols` wide) a thread keeps in its
/// L2 cache while it sweeps its panels: 64 × 1536 columns × 2 bytes = 192 KiB.
const TOKEN_BLOCK: usize = 64;

/// How far ahead decode's kernels prefetch weights (see
/// [`PanelLayout::prefetch_lines`]). The hardware prefetcher alone falls far
/// behind (no software prefetch: 5–13 GB/s from DRAM on one core).
/// Measured with `examples/matmul` on one core, 1 token, alternating runs:
/// - 2026-12-02: 16 KiB read Q4_K/Q6_K 151936 × 1536 at 18.5/19.5 GB/s
///   against 13.9/16.2 with 8 KiB.
/// - 2026-12-03, once every line of a panel (the scale arrays too) was
///   prefetched: 32 KiB against 16 KiB, medians of 6 pairs, 131072 × 1536
///   Q4_K/Q6_K 25.2/23.2 against 23.0/21.5 GB/s, 12288 × 8960 (16-bit
///   inputs) 22.3/21.7 against 21.4/21.3; Qwen2.5-Coder 1.5B decode 21.3
///   against 20.7 tok/s (3 pairs). 64 KiB was no better than 32.
pub(crate) const PREFETCH_BYTES: usize = 32768;

/// Bytes of weights per run of panels a thread takes at a time in decode.
/// Measured 2026-12-03 with `hotpot bench MODEL -t 2 -p 0`, alternating:
/// one run per thread was faster for SmolLM2 (all its products under 2 MB;
/// 192 → 214 t/s, medians of 5 pairs) and slower for Qwen2.5-Coder 1.5B
/// (25.6 → 22.9, 4 pairs) than 4 per thread; 16 per thread was slower for
/// the 1.5B (26.1 → 23.2). This rule against 4 per thread, medians of 5–6
/// pairs: SmolLM2 185 → 202 t/s, Gemma 3 270M 97 → 105, the 0.5B 55 → 60,
/// the 1.5B 23.7 → 23.6 (unchanged within the noise). 2026-12-04: the
/// same number of runs for each thread (3 runs of a 7.7 MB product for 2
/// threads became 4): the 1.5B on two threads 39.5 → 42.9 t/s (medians of
/// 12 pairs), its down and q/k/v products 8 % and 24 % faster in
/// `--profile`; up to 32 runs per thread instead of 4 made Gemma 3's head
/// no faster.
const DECODE_CHUNK_BYTES: usize = 2 << 20;

/// Asks for `bytes` to be brought into cache: decode's kernels prefetch
/// `PREFETCH_BYTES` ahead of where they read, so the first bytes of each
/// run of panels would otherwise come from memory unannounced.
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch of a readable address; SSE is part of x86-64.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// One unit of kernel work: one panel times up to `TOKEN_TILE` tokens.
#[derive(Clone, Copy)]
pub(crate) struct Tile<'a> {
    pub format: WeightFormat,
    pub layout: PanelLayout,
    pub panel: &'a [u8],
    pub cols: usize,
    pub x: &'a MatmulInput,
    /// Whether the kernel reads the input's 8-bit quants.
    pub bytes: bool,
    pub t0: usize,
    pub nt: usize,
    /// Output of token `t0`, column of the panel's first row.
    pub out: *mut f32,
    pub ld: usize,
    /// Rows of this panel that exist (the last panel may be partial).
    pub lanes: usize,
}

impl Tile<'_> {
    pub fn blocks(&self) -> usize {
        self.cols / QK
    }

    /// Byte offset of the per-block f16 scales (`array` 0: d, 1: m).
    pub fn scales_at(&self, array: usize) -> usize {
        self.layout.block_half(array, 0)
    }

    /// Writes token `t`'s 16 results, skipping padding rows.
    ///
    /// # Safety
    /// `out` must be valid for `nt` rows of `ld`, `lanes` columns each.
    pub unsafe fn store(&self, t: usize, acc: &[f32; PANEL]) {
        let dst = unsafe { self.out.add(t * self.ld) };
        for (r, v) in acc.iter().enumerate().take(self.lanes) {
            unsafe { *dst.add(r) = *v };
        }
    }
}

type TileFn = unsafe fn(&Tile);

fn tile_kernel(isa: Isa) -> TileFn {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => super::x86::tile_avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => super::x86::tile_avx2,
        _ => super::scalar::tile,
    }
}

/// `out[t][at + r] = Σ_k w[r][k] · x[t][k]` for every input row `t`, where
/// `out` has rows of length `ld`, on `cpu`'s threads with its kernel variant.
pub fn matmul(cpu: &Cpu, w: &Matrix, x: &MatmulInput, out: &mut [f32], ld: usize, at: usize) {
    assert_eq!(x.cols, w.cols, "matmul: input width {} != weight width {}", x.cols, w.cols);
    assert!(at + w.rows <= ld && out.len() >= x.rows * ld, "matmul: output too small");
    let bytes = x.reads_bytes(w.format);
    if bytes {
        assert_eq!(x.bytes.rows, x.rows, "matmul: this weight reads 8-bit activations, which were not prepared");
    } else if w.format.is_quantized() {
        assert_eq!(x.quantized.rows, x.rows, "matmul: a quantized weight needs a quantized input");
        assert!(
            !reads_split(cpu) || w.format == WeightFormat::Q8_0 || x.quantized.split.len() == 2 * x.quantized.qs.len(),
            "matmul: the AVX-512 kernels read the 16-bit quants split into bytes, which were not prepared (prepare the input with this Cpu)"
        );
    } else {
        assert_eq!(x.values.len(), x.rows * x.cols, "matmul: an f32 weight needs the f32 input");
    }
    let kernel = tile_kernel(cpu.isa.min(super::isa::best()));
    let pool = &cpu.pool;
    // Threads write disjoint panels' columns.
    let base = SharedOut(out.as_mut_ptr());
    let panels = w.panels();
    let layout = w.layout();
    let threads = pool.threads();
    // Decode: runs of about `DECODE_CHUNK_BYTES` each, so a small product is
    // not cut into runs shorter than the prefetch's ramp, as many for each
    // thread (1 to 4): with 3 runs for 2 threads, one thread streamed a
    // third of the product alone, at one core's share of the bandwidth.
    // Prefill: 4 runs per thread.
    let chunks = if x.rows <= 2 { (w.data.len() / DECODE_CHUNK_BYTES).div_ceil(threads).clamp(1, 4) * threads } else { threads * 4 };
    let chunk = panels.div_ceil(chunks).max(1);
    // Prefill: a block of tokens whose activations stay in L2 meets every
    // panel of the chunk before the next block, so activations are read
    // from memory once per chunk and each panel's weights (in L1) serve
    // the block's tiles.
    let work = |range: std::ops::Range<usize>| {
        if x.rows <= 2 {
            prefetch(&w.data.as_slice()[range.start * w.panel_bytes..][..(range.len() * w.panel_bytes).min(PREFETCH_BYTES)]);
        }
        for tb in (0..x.rows).step_by(TOKEN_BLOCK) {
            for panel in range.clone() {
                for t0 in (tb..(tb + TOKEN_BLOCK).min(x.rows)).step_by(TOKEN_TILE) {
                    let tile = Tile {
                        format: w.format,
                        layout,
                        panel: w.panel(panel),
                        cols: w.cols,
                        x,
                        bytes,
                        t0,
                        nt: (x.rows - t0).min(TOKEN_TILE),
                        // SAFETY: inside `out`, checked above.
                        out: unsafe { base.get().add(t0 * ld + at + panel * PANEL) },
                        ld,
                        lanes: (w.rows - panel * PANEL).min(PANEL),
                    };
                    // SAFETY: each (panel, tile) is computed by one thread and
                    // writes only its own 16 columns of its own rows.
                    unsafe { kernel(&tile) };
                }
            }
        }
    };
    pool.for_each_chunk(panels, chunk, &work);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::CpuPool;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    const QUANTIZED: [WeightFormat; 7] =
        [WeightFormat::Q4_0, WeightFormat::Q4_1, WeightFormat::Q8_0, WeightFormat::Q5_0, WeightFormat::Q4_K, WeightFormat::Q5_K, WeightFormat::Q6_K];

    fn half(rng: &mut impl Rng, range: std::ops::Range<f32>) -> [u8; 2] {
        f16::from_f32(rng.random_range(range)).to_le_bytes()
    }

    /// Random GGML blocks of `format` for a `rows × cols` matrix.
    fn random_ggml(format: WeightFormat, rows: usize, cols: usize, rng: &mut impl Rng) -> Vec<u8> {
        let blocks = rows * cols / format.ggml_block_len();
        let mut bytes = Vec::new();
        let random_bytes = |rng: &mut _, bytes: &mut Vec<u8>, n: usize| bytes.extend((0..n).map(|_| Rng::random::<u8>(rng)));
        for _ in 0..blocks {
            match format {
                WeightFormat::Q4_0 => {
                    bytes.extend(half(rng, 0.001..0.05));
                    random_bytes(rng, &mut bytes, 16);
                }
                WeightFormat::Q4_1 => {
                    bytes.extend(half(rng, 0.001..0.05));
                    bytes.extend(half(rng, -0.2..0.0));
                    random_bytes(rng, &mut bytes, 16);
                }
                WeightFormat::Q8_0 => {
                    bytes.extend(half(rng, 0.001..0.05));
                    bytes.extend((0..32).map(|_| rng.random_range(-127i8..=127) as u8));
                }
                WeightFormat::Q5_0 => {
                    bytes.extend(half(rng, 0.001..0.05));
                    random_bytes(rng, &mut bytes, 20);
                }
                WeightFormat::Q4_K | WeightFormat::Q5_K => {
                    bytes.extend(half(rng, 0.0001..0.004));
                    bytes.extend(half(rng, 0.0001..0.004));
                    let n = if format == WeightFormat::Q4_K { 12 + 128 } else { 12 + 32 + 128 };
                    random_bytes(rng, &mut bytes, n);
                }
                WeightFormat::Q6_K => {
                    random_bytes(rng, &mut bytes, 128 + 64 + 16);
                    bytes.extend(half(rng, 0.0001..0.002));
                }
                WeightFormat::F32 => unreachable!(),
            }
        }
        bytes
    }

    fn dequantize_ggml(format: WeightFormat, bytes: &[u8]) -> Vec<f32> {
        let mut out = Vec::new();
        let mut block = vec![0.0f32; format.ggml_block_len()];
        for src in bytes.chunks_exact(format.ggml_block_bytes()) {
            match format {
                WeightFormat::Q4_0 => quant::dequantize_q4_0(src, &mut block),
                WeightFormat::Q4_1 => quant::dequantize_q4_1(src, &mut block),
                WeightFormat::Q8_0 => quant::dequantize_q8_0(src, &mut block),
                WeightFormat::Q5_0 => quant::dequantize_q5_0(src, &mut block),
                WeightFormat::Q4_K => quant::dequantize_k(src, false, &mut block),
                WeightFormat::Q5_K => quant::dequantize_k(src, true, &mut block),
                WeightFormat::Q6_K => quant::dequantize_q6_k(src, &mut block),
                WeightFormat::F32 => unreachable!(),
            }
            out.extend_from_slice(&block);
        }
        out
    }

    fn ggml_type(format: WeightFormat) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match format {
            WeightFormat::Q4_0 => G::Q4_0,
            WeightFormat::Q4_1 => G::Q4_1,
            WeightFormat::Q8_0 => G::Q8_0,
            WeightFormat::Q5_0 => G::Q5_0,
            WeightFormat::Q4_K => G::Q4K,
            WeightFormat::Q5_K => G::Q5K,
            WeightFormat::Q6_K => G::Q6K,
            WeightFormat::F32 => G::F32,
        }
    }

    fn width(format: WeightFormat, blocks: usize) -> usize {
        blocks * format.ggml_block_len()
    }

    /// Our reading of each GGML format agrees with candle's, an independent
    /// implementation of the same formats.
    #[test]
    fn reference_dequantizers_agree_with_candle() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let device = candle_core::Device::Cpu;
        for format in QUANTIZED {
            let (rows, cols) = (5, width(format, 2));
            let bytes = random_ggml(format, rows, cols, &mut rng);
            let ours = dequantize_ggml(format, &bytes);
            let theirs = candle_core::quantized::ggml_file::qtensor_from_ggml(ggml_type(format), &bytes, vec![rows, cols], &device)
                .and_then(|q| q.dequantize(&device))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("candle dequantizes");
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{format:?} element {i}: ours {a}, candle {b}");
            }
        }
    }

    #[test]
    fn packed_rows_dequantize_like_ggml() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for format in QUANTIZED {
            let (rows, cols) = (37, width(format, 3));
            let bytes = random_ggml(format, rows, cols, &mut rng);
            let m = Matrix::from_ggml(format, rows, cols, &bytes).expect("packs");
            let reference = dequantize_ggml(format, &bytes);
            let mut row = vec![0.0; cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut row);
                assert_eq!(row, reference[r * cols..(r + 1) * cols], "{format:?} row {r}");
            }
        }
    }

    #[test]
    fn packed_sizes_equal_the_file_encoding() {
        // Decode reads every byte once per token: a byte more than the file
        // is decode time lost on a memory-bound machine.
        for format in QUANTIZED {
            let (rows, cols) = (64, width(format, 4));
            let file = rows * cols / format.ggml_block_len() * format.ggml_block_bytes();
            let packed = Matrix::from_ggml(format, rows, cols, &vec![0; file]).expect("packs").size_bytes();
            assert_eq!(packed, file, "{format:?}: {packed} bytes packed for {file} in the file");
        }
    }

    #[test]
    fn decode_prefetches_every_line_of_every_panel_once() {
        for format in QUANTIZED {
            for blocks in [1, 3, 8, 18, 280] {
                let cols = width(format, blocks);
                let layout = PanelLayout::new(format, cols);
                // Panels from the first whose every block is `ahead` of some
                // block read are prefetched whole, each line once.
                let first = (layout.ahead_panels * layout.blocks + layout.ahead_blocks).div_ceil(layout.blocks);
                let panels = first + 3;
                let data = AlignedBuf::zeroed((panels + first + 1) * layout.bytes);
                let start = data.as_slice().as_ptr();
                let mut lines = Vec::new();
                for panel in 0..panels {
                    let base = start.wrapping_add(panel * layout.bytes);
                    for b in 0..layout.blocks {
                        layout.prefetch_lines(base, b, |at| lines.push(base as usize + at - start as usize));
                    }
                }
                lines.sort_unstable();
                let unique = lines.len();
                lines.dedup();
                assert_eq!(lines.len(), unique, "{format:?}, {blocks} blocks: a line prefetched twice");
                let whole = first * layout.bytes..panels * layout.bytes;
                let got: Vec<usize> = lines.into_iter().filter(|a| whole.contains(a)).collect();
                let expected: Vec<usize> = (whole.start.next_multiple_of(64)..whole.end).step_by(64).collect();
                assert_eq!(got, expected, "{format:?}, {blocks} blocks: lines prefetched");
            }
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(matches!(Matrix::from_ggml(WeightFormat::Q4_1, 2, 40, &[0; 40]), Err(PackError::Cols { .. })));
        assert!(matches!(Matrix::from_ggml(WeightFormat::Q8_0, 2, 32, &[0; 67]), Err(PackError::Bytes { .. })));
        assert!(matches!(Matrix::from_ggml(WeightFormat::Q4_K, 2, 288, &[0; 400]), Err(PackError::Cols { multiple: 256, .. })));
        assert!(matches!(Matrix::from_ggml(WeightFormat::Q6_K, 2, 256, &[0; 419]), Err(PackError::Bytes { .. })));
        assert!(matches!(Matrix::from_ggml(WeightFormat::Q5_0, 1, 64, &[0; 45]), Err(PackError::Bytes { .. })));
        assert!(Matrix::from_f32(2, 3, &[0.0; 5]).is_err());
    }

    const BITS: [ActivationBits; 2] = [ActivationBits::Sixteen, ActivationBits::Eight];

    fn product(cpu: &Cpu, m: &Matrix, x: &[f32], tokens: usize, ld: usize, at: usize, bits: ActivationBits) -> Vec<f32> {
        let mut input = MatmulInput::default();
        input.prepare(cpu, x, tokens, m.cols(), [m.format()], bits);
        let mut out = vec![f32::NAN; tokens * ld];
        matmul(cpu, m, &input, &mut out, ld, at);
        out
    }

    /// Checks one product against a float64 product of the dequantized
    /// weights with the exact activations: the error is the activation
    /// quantization's, plus f32 rounding.
    fn check_against_f64(format: WeightFormat, rows: usize, cols: usize, tokens: usize, rng: &mut impl Rng) {
        for bits in BITS {
            check_width_against_f64(format, rows, cols, tokens, bits, rng);
        }
    }

    fn check_width_against_f64(format: WeightFormat, rows: usize, cols: usize, tokens: usize, bits: ActivationBits, rng: &mut impl Rng) {
        let cpu = Cpu { pool: CpuPool::new(2).expect("threads"), isa: Isa::Scalar };
        let (m, reference) = if format == WeightFormat::F32 {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            (Matrix::from_f32(rows, cols, &w).expect("packs"), w)
        } else {
            let bytes = random_ggml(format, rows, cols, rng);
            (Matrix::from_ggml(format, rows, cols, &bytes).expect("packs"), dequantize_ggml(format, &bytes))
        };
        let x: Vec<f32> = (0..tokens * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        let ld = rows + 3;
        let out = product(&cpu, &m, &x, tokens, ld, 2, bits);
        // Half a step of the activations' quantization: amax(block) / 2·MAX.
        let steps = if bits == ActivationBits::Eight && format.reads_bytes() { 254.0 } else { 65534.0 };
        for t in 0..tokens {
            for r in 0..rows {
                let terms = (0..cols).map(|k| f64::from(reference[r * cols + k]) * f64::from(x[t * cols + k]));
                let exact: f64 = terms.clone().sum();
                let scale: f64 = terms.map(f64::abs).sum();
                // Each activation is off by at most half a step; f32 sums
                // add ~1e-6 relative.
                let step_error: f64 = (0..cols)
                    .map(|k| {
                        let block = &x[t * cols + k / QK * QK..][..QK];
                        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        f64::from(reference[r * cols + k]).abs() * f64::from(amax) / steps
                    })
                    .sum();
                let got = f64::from(out[t * ld + 2 + r]);
                let tol = if format.is_quantized() { step_error * 1.001 + scale * 1e-5 } else { scale * 1e-5 + 1e-6 };
                assert!((got - exact).abs() <= tol, "{format:?} {bits:?} {rows}x{cols} t{t} r{r}: {got} vs {exact}");
            }
            assert!(out[t * ld].is_nan() && out[t * ld + 1].is_nan(), "wrote outside its columns");
        }
    }

    #[test]
    fn products_match_a_float64_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for format in WeightFormat::ALL {
            for (rows, blocks, tokens) in [(1, 1, 1), (17, 2, 3), (50, 5, 5), (64, 18, 2)] {
                let cols = if format == WeightFormat::F32 { blocks * QK } else { width(format, blocks) };
                check_against_f64(format, rows, cols, tokens, &mut rng);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Random shapes, every format: the scalar reference against float64.
        #[test]
        fn any_shape_matches_float64(format in 0usize..8, rows in 1usize..40, blocks in 1usize..4, tokens in 1usize..11, seed: u64) {
            let format = WeightFormat::ALL[format];
            let cols = if format == WeightFormat::F32 { blocks * QK } else { width(format, blocks) };
            check_against_f64(format, rows, cols, tokens, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        }

        /// Random shapes, every format: every kernel variant gives the
        /// scalar reference's bits.
        #[test]
        fn any_shape_is_bit_identical_across_variants(format in 0usize..8, rows in 1usize..40, blocks in 1usize..4, tokens in 1usize..20, seed: u64) {
            let format = WeightFormat::ALL[format];
            let cols = if format == WeightFormat::F32 { blocks * QK } else { width(format, blocks) };
            assert_variants_agree(format, rows, cols, tokens, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        }
    }

    fn random_matrix(format: WeightFormat, rows: usize, cols: usize, rng: &mut impl Rng) -> Matrix {
        if format == WeightFormat::F32 {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            Matrix::from_f32(rows, cols, &w).expect("packs")
        } else {
            Matrix::from_ggml(format, rows, cols, &random_ggml(format, rows, cols, rng)).expect("packs")
        }
    }

    /// The wide-format kernel on emulated 16-lane vectors (AVX-512's lane
    /// layout), whatever this CPU is, reading 16-bit activations as `X`
    /// says (pairs or split bytes).
    fn emulated_product<const X: u8>(m: &Matrix, x: &[f32], tokens: usize, bits: ActivationBits) -> Vec<f32> {
        let mut input = MatmulInput::default();
        let cpu = Cpu { pool: CpuPool::new(1).expect("pool"), isa: Isa::Scalar };
        input.prepare_with(&cpu, x, tokens, m.cols(), [m.format()], bits, true);
        let bytes = input.reads_bytes(m.format());
        let mut out = vec![0.0f32; tokens * m.rows()];
        let layout = m.layout();
        for panel in 0..m.panels() {
            for t0 in (0..tokens).step_by(TOKEN_TILE) {
                let tile = Tile {
                    format: m.format(),
                    layout,
                    panel: m.panel(panel),
                    cols: m.cols(),
                    x: &input,
                    bytes,
                    t0,
                    nt: (tokens - t0).min(TOKEN_TILE),
                    out: out[t0 * m.rows() + panel * PANEL..].as_mut_ptr(),
                    ld: m.rows(),
                    lanes: (m.rows() - panel * PANEL).min(PANEL),
                };
                // SAFETY: the tile lies inside `out`; the emulation needs no CPU feature.
                unsafe {
                    use super::super::wide::{self, Emulated16};
                    match (m.format(), bytes) {
                        (WeightFormat::Q4_0, _) => wide::tile::<Emulated16, { wide::Q4_0 }, 4, X>(&tile),
                        (WeightFormat::Q4_1, _) => wide::tile::<Emulated16, { wide::Q4_1 }, 4, X>(&tile),
                        (WeightFormat::Q8_0, _) => wide::tile::<Emulated16, { wide::Q8_0 }, 4, { wide::X16 }>(&tile),
                        (WeightFormat::Q5_0, _) => wide::tile::<Emulated16, { wide::Q5_0 }, 4, X>(&tile),
                        (WeightFormat::Q4_K, false) => wide::tile::<Emulated16, { wide::Q4_K }, 4, X>(&tile),
                        (WeightFormat::Q5_K, false) => wide::tile::<Emulated16, { wide::Q5_K }, 4, X>(&tile),
                        (WeightFormat::Q6_K, false) => wide::tile::<Emulated16, { wide::Q6_K }, 4, X>(&tile),
                        (WeightFormat::Q4_K, true) => wide::tile::<Emulated16, { wide::Q4_K }, 4, { wide::X8 }>(&tile),
                        (WeightFormat::Q5_K, true) => wide::tile::<Emulated16, { wide::Q5_K }, 4, { wide::X8 }>(&tile),
                        (WeightFormat::Q6_K, true) => wide::tile::<Emulated16, { wide::Q6_K }, 4, { wide::X8 }>(&tile),
                        (WeightFormat::F32, _) => unreachable!("f32 has no quantized kernel"),
                    }
                }
            }
        }
        out
    }

    fn assert_variants_agree(format: WeightFormat, rows: usize, cols: usize, tokens: usize, rng: &mut impl Rng) {
        let m = random_matrix(format, rows, cols, rng);
        let x: Vec<f32> = (0..tokens * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
        let to_bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for width in BITS {
            let run = |isa, threads| {
                let cpu = Cpu { pool: CpuPool::new(threads).expect("threads"), isa };
                product(&cpu, &m, &x, tokens, rows, 0, width)
            };
            let reference = to_bits(&run(Isa::Scalar, 1));
            for isa in Isa::available() {
                for threads in [1, 2, 3] {
                    assert!(
                        to_bits(&run(isa, threads)) == reference,
                        "{isa:?} with {threads} threads differs from scalar for {format:?} {width:?} {rows}x{cols}, {tokens} tokens"
                    );
                }
            }
            if super::super::wide::code(format).is_some() {
                use super::super::wide::{SPLIT, X16};
                for (got, x16) in
                    [(emulated_product::<X16>(&m, &x, tokens, width), "16-bit pairs"), (emulated_product::<SPLIT>(&m, &x, tokens, width), "split bytes")]
                {
                    assert!(
                        to_bits(&got) == reference,
                        "the 16-lane wide kernel ({x16}) differs from scalar for {format:?} {width:?} {rows}x{cols}, {tokens} tokens"
                    );
                }
            }
        }
    }

    /// The K-quants read 8-bit activations when asked; the other formats
    /// read the 16-bit ones either way.
    #[test]
    fn only_k_quants_read_eight_bit_activations() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        let cpu = Cpu { pool: CpuPool::new(1).expect("pool"), isa: Isa::Scalar };
        for format in QUANTIZED {
            let (rows, cols, tokens) = (32, width(format, 2), 3);
            let m = random_matrix(format, rows, cols, &mut rng);
            let x: Vec<f32> = (0..tokens * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
            let [wide, narrow] = BITS.map(|bits| product(&cpu, &m, &x, tokens, rows, 0, bits));
            assert_eq!(wide != narrow, format.reads_bytes(), "{format:?}");
        }
    }

    /// Every kernel variant this CPU runs gives the scalar reference's bits,
    /// for any token count (tile tails included) and partial panels.
    #[test]
    fn kernel_variants_are_bit_identical() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        println!("kernel variants on this CPU: {:?}", Isa::available());
        for format in WeightFormat::ALL {
            for (rows, blocks, tokens) in [(16, 1, 1), (45, 3, 7), (33, 2, 9), (64, 18, 20), (3, 5, 8), (160, 1, 17)] {
                let cols = if format == WeightFormat::F32 { blocks * QK } else { width(format, blocks) };
                assert_variants_agree(format, rows, cols, tokens, &mut rng);
            }
        }
    }
}
