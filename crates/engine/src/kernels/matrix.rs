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
//! Each output element is one lane of a vector register, accumulated block
//! after block with a fused multiply-add in the same order in every code
//! path (scalar, AVX2, AVX-512; one token or many; any thread count).
//! Results are therefore bit-identical across all of them, which is what
//! lets an auditor on another CPU recompute a node's work exactly.

use half::f16;

use super::Cpu;
use super::aligned::AlignedBuf;

use super::isa::Isa;
use super::quant::{self, QK, QuantizedRows};

/// Rows per panel: one 512-bit vector of f32 or i32 lanes.
pub const PANEL: usize = 16;

/// The weight encodings the kernels run natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
        }
    }

    /// Bytes of a GGML block of 32 weights.
    pub fn ggml_block_bytes(self) -> usize {
        match self {
            Self::F32 => 4 * QK,
            Self::Q4_0 => quant::Q4_0_BYTES,
            Self::Q4_1 => quant::Q4_1_BYTES,
            Self::Q8_0 => quant::Q8_0_BYTES,
        }
    }

    pub(crate) fn quant_bytes(self) -> usize {
        match self {
            Self::F32 => 0,
            Self::Q4_0 | Self::Q4_1 => PANEL * QK / 2,
            Self::Q8_0 => PANEL * QK,
        }
    }

    fn scale_arrays(self) -> usize {
        match self {
            Self::F32 => 0,
            Self::Q4_0 | Self::Q8_0 => 1,
            Self::Q4_1 => 2,
        }
    }

    pub fn is_quantized(self) -> bool {
        self != Self::F32
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
    #[error("a {format} matrix needs its column count to be a multiple of 32, got {cols}")]
    Cols { format: &'static str, cols: usize },
    #[error("a {rows}x{cols} {format} matrix needs {expected} bytes, got {got}")]
    Bytes { format: &'static str, rows: usize, cols: usize, expected: usize, got: usize },
}

impl Matrix {
    /// Packs a row-major matrix from GGML-encoded bytes.
    pub fn from_ggml(format: WeightFormat, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, PackError> {
        if format == WeightFormat::F32 {
            let floats: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            return Self::from_f32(rows, cols, &floats).map_err(|_| PackError::Bytes {
                format: "F32",
                rows,
                cols,
                expected: rows * cols * 4,
                got: bytes.len(),
            });
        }
        if !cols.is_multiple_of(QK) {
            return Err(PackError::Cols { format: format.name(), cols });
        }
        let blocks = cols / QK;
        let block_bytes = format.ggml_block_bytes();
        let expected = rows * blocks * block_bytes;
        if bytes.len() != expected {
            return Err(PackError::Bytes { format: format.name(), rows, cols, expected, got: bytes.len() });
        }
        let mut matrix = Self::zeroed(format, rows, cols);
        let quant_bytes = format.quant_bytes();
        let scales_at = blocks * quant_bytes;
        for row in 0..rows {
            let (panel, lane) = (row / PANEL, row % PANEL);
            let dst = matrix.panel_mut(panel);
            for b in 0..blocks {
                let src = &bytes[(row * blocks + b) * block_bytes..][..block_bytes];
                let quants = &mut dst[b * quant_bytes..][..quant_bytes];
                match format {
                    WeightFormat::Q4_0 | WeightFormat::Q4_1 => {
                        let qs = &src[if format == WeightFormat::Q4_0 { 2 } else { 4 }..];
                        for g in 0..4 {
                            let at = g * 64 + lane * 4;
                            quants[at..at + 4].copy_from_slice(&[qs[2 * g], qs[2 * g + 8], qs[2 * g + 1], qs[2 * g + 9]]);
                        }
                    }
                    WeightFormat::Q8_0 => {
                        let q = &src[2..];
                        for g in 0..8 {
                            let at = g * 64 + lane * 4;
                            quants[at..at + 4].copy_from_slice(&[q[2 * g], q[2 * g + 16], q[2 * g + 1], q[2 * g + 17]]);
                        }
                    }
                    WeightFormat::F32 => unreachable!("handled above"),
                }
                let d_at = scales_at + (b * PANEL + lane) * 2;
                dst[d_at..d_at + 2].copy_from_slice(&src[0..2]);
                if format == WeightFormat::Q4_1 {
                    let m_at = scales_at + (blocks * PANEL + b * PANEL + lane) * 2;
                    dst[m_at..m_at + 2].copy_from_slice(&src[2..4]);
                }
            }
        }
        Ok(matrix)
    }

    /// Packs a row-major `f32` matrix (kept in f32).
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Result<Self, PackError> {
        if values.len() != rows * cols {
            return Err(PackError::Bytes { format: "F32", rows, cols, expected: rows * cols * 4, got: values.len() * 4 });
        }
        let mut matrix = Self::zeroed(WeightFormat::F32, rows, cols);
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
    /// boundary and both must share format and width.
    pub fn concat_rows(a: &Matrix, b: &Matrix) -> Matrix {
        assert!(a.rows.is_multiple_of(PANEL) && a.format == b.format && a.cols == b.cols, "matrices cannot be stacked");
        let mut m = Self::zeroed(a.format, a.rows + b.rows, a.cols);
        let split = a.data.len();
        m.data.as_mut_slice()[..split].copy_from_slice(a.data.as_slice());
        m.data.as_mut_slice()[split..].copy_from_slice(b.data.as_slice());
        m
    }

    fn zeroed(format: WeightFormat, rows: usize, cols: usize) -> Self {
        let panel_bytes = match format {
            WeightFormat::F32 => cols * PANEL * 4,
            _ => (cols / QK) * (format.quant_bytes() + format.scale_arrays() * PANEL * 2),
        };
        let panels = rows.div_ceil(PANEL);
        Self { format, rows, cols, panel_bytes, data: AlignedBuf::zeroed(panels * panel_bytes) }
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
        let blocks = self.cols / QK;
        let quant_bytes = self.format.quant_bytes();
        let scales_at = blocks * quant_bytes;
        let scale = |array: usize, b: usize| {
            let at = scales_at + (array * blocks * PANEL + b * PANEL + lane) * 2;
            f16::from_le_bytes([data[at], data[at + 1]]).to_f32()
        };
        match self.format {
            WeightFormat::F32 => {
                for (k, o) in out.iter_mut().enumerate().take(self.cols) {
                    let at = (k * PANEL + lane) * 4;
                    *o = f32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
                }
            }
            WeightFormat::Q4_0 | WeightFormat::Q4_1 => {
                for b in 0..blocks {
                    let d = scale(0, b);
                    let m = if self.format == WeightFormat::Q4_1 { scale(1, b) } else { -8.0 * d };
                    let mut q = [0u8; QK];
                    unpack_q4(&data[b * quant_bytes..][..quant_bytes], lane, &mut q);
                    for (o, &q) in out[b * QK..(b + 1) * QK].iter_mut().zip(&q) {
                        *o = d * f32::from(q) + m;
                    }
                }
            }
            WeightFormat::Q8_0 => {
                for b in 0..blocks {
                    let d = scale(0, b);
                    let mut q = [0i8; QK];
                    unpack_q8(&data[b * quant_bytes..][..quant_bytes], lane, &mut q);
                    for (o, &q) in out[b * QK..(b + 1) * QK].iter_mut().zip(&q) {
                        *o = d * f32::from(q);
                    }
                }
            }
        }
    }
}

/// Row `lane`'s 32 nibbles of one packed Q4 block, in column order.
pub(crate) fn unpack_q4(quants: &[u8], lane: usize, q: &mut [u8; QK]) {
    for g in 0..4 {
        let [b0, b1, b2, b3] = [0, 1, 2, 3].map(|j| quants[g * 64 + lane * 4 + j]);
        for (col, byte, high) in [(2 * g, b0, false), (2 * g + 1, b2, false), (2 * g + 16, b0, true), (2 * g + 17, b2, true)].into_iter().chain([
            (2 * g + 8, b1, false),
            (2 * g + 9, b3, false),
            (2 * g + 24, b1, true),
            (2 * g + 25, b3, true),
        ]) {
            q[col] = if high { byte >> 4 } else { byte & 15 };
        }
    }
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

/// The input of a matrix product: `rows` rows of `cols` activations, with
/// their 8-bit quantization when a quantized weight will read them.
#[derive(Debug, Default)]
pub struct MatmulInput {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) values: Vec<f32>,
    pub(crate) quantized: QuantizedRows,
}

impl MatmulInput {
    /// Takes `values` (`rows × cols`, row-major) for weights of `formats`:
    /// quantizes them if any weight is quantized, keeps a copy in f32 if any
    /// is not.
    pub fn prepare(&mut self, isa: Isa, values: &[f32], rows: usize, cols: usize, formats: impl IntoIterator<Item = WeightFormat>) {
        self.rows = rows;
        self.cols = cols;
        let (mut quantized, mut float) = (false, false);
        for format in formats {
            quantized |= format.is_quantized();
            float |= !format.is_quantized();
        }
        self.values.clear();
        if float {
            self.values.extend_from_slice(values);
        }
        if quantized {
            self.quantized.quantize_into(isa, values, rows, cols);
        } else {
            self.quantized.rows = 0;
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Tokens per tile: each weight group unpacked is used for this many tokens.
pub(crate) const TOKEN_TILE: usize = 8;

/// One unit of kernel work: one panel times up to `TOKEN_TILE` tokens.
#[derive(Clone, Copy)]
pub(crate) struct Tile<'a> {
    pub format: WeightFormat,
    pub panel: &'a [u8],
    pub cols: usize,
    pub x: &'a MatmulInput,
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

    /// Byte offset of the per-block scales (`array` 0: d, 1: m).
    pub fn scales_at(&self, array: usize) -> usize {
        let blocks = self.blocks();
        blocks * self.format.quant_bytes() + array * blocks * PANEL * 2
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

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: threads write disjoint panels' columns (see `matmul`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[t][at + r] = Σ_k w[r][k] · x[t][k]` for every input row `t`, where
/// `out` has rows of length `ld`, on `cpu`'s threads with its kernel variant.
pub fn matmul(cpu: &Cpu, w: &Matrix, x: &MatmulInput, out: &mut [f32], ld: usize, at: usize) {
    assert_eq!(x.cols, w.cols, "matmul: input width {} != weight width {}", x.cols, w.cols);
    assert!(at + w.rows <= ld && out.len() >= x.rows * ld, "matmul: output too small");
    if w.format.is_quantized() {
        assert_eq!(x.quantized.rows, x.rows, "matmul: a quantized weight needs a quantized input");
    } else {
        assert_eq!(x.values.len(), x.rows * x.cols, "matmul: an f32 weight needs the f32 input");
    }
    let kernel = tile_kernel(cpu.isa.min(super::isa::best()));
    let pool = &cpu.pool;
    let base = OutPtr(out.as_mut_ptr());
    let panels = w.panels();
    let chunk = panels.div_ceil(pool.threads() * 4).max(1);
    let work = |range: std::ops::Range<usize>| {
        for panel in range {
            for t0 in (0..x.rows).step_by(TOKEN_TILE) {
                let tile = Tile {
                    format: w.format,
                    panel: w.panel(panel),
                    cols: w.cols,
                    x,
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
    };
    pool.for_each_chunk(panels, chunk, &work);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::CpuPool;
    use rand::{Rng, SeedableRng};

    /// Random GGML blocks of `format` for a `rows × cols` matrix.
    fn random_ggml(format: WeightFormat, rows: usize, cols: usize, rng: &mut impl Rng) -> Vec<u8> {
        let blocks = rows * cols / QK;
        let mut bytes = Vec::new();
        for _ in 0..blocks {
            let d = f16::from_f32(rng.random_range(0.001..0.05)).to_le_bytes();
            bytes.extend_from_slice(&d);
            match format {
                WeightFormat::Q4_1 => {
                    bytes.extend_from_slice(&f16::from_f32(rng.random_range(-0.2..0.0)).to_le_bytes());
                    bytes.extend((0..16).map(|_| rng.random::<u8>()));
                }
                WeightFormat::Q4_0 => bytes.extend((0..16).map(|_| rng.random::<u8>())),
                WeightFormat::Q8_0 => bytes.extend((0..32).map(|_| rng.random_range(-127i8..=127) as u8)),
                WeightFormat::F32 => unreachable!(),
            }
        }
        bytes
    }

    fn dequantize_ggml(format: WeightFormat, bytes: &[u8], out: &mut Vec<f32>) {
        let bb = format.ggml_block_bytes();
        let mut block = [0.0f32; QK];
        for src in bytes.chunks_exact(bb) {
            match format {
                WeightFormat::Q4_0 => quant::dequantize_q4_0(src, &mut block),
                WeightFormat::Q4_1 => quant::dequantize_q4_1(src, &mut block),
                WeightFormat::Q8_0 => quant::dequantize_q8_0(src, &mut block),
                WeightFormat::F32 => unreachable!(),
            }
            out.extend_from_slice(&block);
        }
    }

    #[test]
    fn packed_rows_dequantize_like_ggml() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for format in [WeightFormat::Q4_0, WeightFormat::Q4_1, WeightFormat::Q8_0] {
            let (rows, cols) = (37, 96);
            let bytes = random_ggml(format, rows, cols, &mut rng);
            let m = Matrix::from_ggml(format, rows, cols, &bytes).expect("packs");
            let mut reference = Vec::new();
            dequantize_ggml(format, &bytes, &mut reference);
            let mut row = vec![0.0; cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut row);
                assert_eq!(row, reference[r * cols..(r + 1) * cols], "{format:?} row {r}");
            }
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(matches!(Matrix::from_ggml(WeightFormat::Q4_1, 2, 40, &[0; 40]), Err(PackError::Cols { .. })));
        assert!(matches!(Matrix::from_ggml(WeightFormat::Q8_0, 2, 32, &[0; 67]), Err(PackError::Bytes { .. })));
        assert!(Matrix::from_f32(2, 3, &[0.0; 5]).is_err());
    }

    /// The product against a float64 product of the dequantized weights with
    /// the exact activations: the error is the activation quantization's.
    #[test]
    fn products_match_a_float64_reference() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let cpu = Cpu { pool: CpuPool::new(2).expect("threads"), isa: Isa::Scalar };
        for format in [WeightFormat::Q4_0, WeightFormat::Q4_1, WeightFormat::Q8_0, WeightFormat::F32] {
            for (rows, cols, tokens) in [(1, 32, 1), (17, 64, 3), (50, 160, 5), (64, 576, 2)] {
                let (m, reference) = if format == WeightFormat::F32 {
                    let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                    (Matrix::from_f32(rows, cols, &w).expect("packs"), w)
                } else {
                    let bytes = random_ggml(format, rows, cols, &mut rng);
                    let mut w = Vec::new();
                    dequantize_ggml(format, &bytes, &mut w);
                    (Matrix::from_ggml(format, rows, cols, &bytes).expect("packs"), w)
                };
                let x: Vec<f32> = (0..tokens * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut input = MatmulInput::default();
                input.prepare(Isa::Scalar, &x, tokens, cols, [format]);
                let ld = rows + 3;
                let mut out = vec![f32::NAN; tokens * ld];
                matmul(&cpu, &m, &input, &mut out, ld, 2);
                for t in 0..tokens {
                    for r in 0..rows {
                        let exact: f64 = (0..cols).map(|k| f64::from(reference[r * cols + k]) * f64::from(x[t * cols + k])).sum();
                        let scale: f64 = (0..cols).map(|k| (f64::from(reference[r * cols + k]) * f64::from(x[t * cols + k])).abs()).sum();
                        // 16-bit activations: each one is off by at most half a
                        // step, amax(block) / 65534; f32 sums add ~1e-6 relative.
                        let step_error: f64 = (0..cols)
                            .map(|k| {
                                let block = &x[t * cols + k / QK * QK..][..QK];
                                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                                f64::from(reference[r * cols + k]).abs() * f64::from(amax) / 65534.0
                            })
                            .sum();
                        let got = f64::from(out[t * ld + 2 + r]);
                        let tol = if format.is_quantized() { step_error * 1.001 + scale * 1e-5 } else { scale * 1e-5 + 1e-6 };
                        assert!((got - exact).abs() <= tol, "{format:?} {rows}x{cols} t{t} r{r}: {got} vs {exact}");
                    }
                    assert!(out[t * ld].is_nan() && out[t * ld + 1].is_nan(), "wrote outside its columns");
                }
            }
        }
    }

    /// Every kernel variant this CPU runs gives the scalar reference's bits,
    /// for any token count (tile tails included) and partial panels.
    #[test]
    fn kernel_variants_are_bit_identical() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let variants = Isa::available();
        println!("kernel variants on this CPU: {variants:?}");
        for format in [WeightFormat::Q4_0, WeightFormat::Q4_1, WeightFormat::Q8_0, WeightFormat::F32] {
            for (rows, cols, tokens) in [(16, 32, 1), (45, 96, 7), (33, 64, 9), (64, 576, 20), (3, 160, 8), (160, 32, 17)] {
                let m = if format == WeightFormat::F32 {
                    let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                    Matrix::from_f32(rows, cols, &w).expect("packs")
                } else {
                    Matrix::from_ggml(format, rows, cols, &random_ggml(format, rows, cols, &mut rng)).expect("packs")
                };
                let x: Vec<f32> = (0..tokens * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
                let run = |isa| {
                    let cpu = Cpu { pool: CpuPool::new(2).expect("threads"), isa };
                    let mut input = MatmulInput::default();
                    input.prepare(isa, &x, tokens, cols, [format]);
                    let mut out = vec![0.0f32; tokens * rows];
                    matmul(&cpu, &m, &input, &mut out, rows, 0);
                    out
                };
                let reference = run(Isa::Scalar);
                for &isa in &variants {
                    let got = run(isa);
                    let same = got.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?} differs from scalar for {format:?} {rows}x{cols}, {tokens} tokens");
                }
            }
        }
    }
}
