//! Weight matrices in Hotpot's packed layout, and the matrix product.
//!
//! A GGUF matrix of `rows × cols` is regrouped at load time into *panels* of
//! 16 rows. Inside a panel, the quants of one 32-wide block are interleaved
//! two columns per row, so that widened to 16-bit lanes, one 512-bit vector
//! holds the same two columns of all 16 rows and one multiply-add of 16-bit
//! pairs (`vpdpwssd`/`vpmaddwd`) against two broadcast activations advances
//! 16 rows at once:
//!
//! ```text
//! panel = [ quants: blocks × (16 rows × 32 cols) | d: blocks × 16 f16 | m: blocks × 16 f16 (Q4_1) ]
//! Q4 quants of a block: 8 chunks c of 32 bytes; chunk c, row r = the GGML
//!     bytes qs[2c..2c+2] of row r (low nibbles: cols 2c, 2c+1; high: 16+2c, 17+2c)
//! Q8 quants of a block: 16 chunks p of 32 bytes; chunk p, row r = q[2p..2p+2]
//! ```
//!
//! Each output element is one lane of a vector register, accumulated block
//! after block with a separate multiply and add in the same order in every
//! code path (scalar, AVX2, AVX-512; one token or many; any thread count).
//! Results are therefore bit-identical across all of them, which is what
//! lets an auditor on another CPU recompute a node's work exactly.

use half::f16;

use super::aligned::AlignedBuf;
use super::pool::CpuPool;
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

    fn quant_bytes(self) -> usize {
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
                        for c in 0..8 {
                            quants[c * 32 + lane * 2..][..2].copy_from_slice(&qs[c * 2..][..2]);
                        }
                    }
                    WeightFormat::Q8_0 => {
                        for p in 0..16 {
                            quants[p * 32 + lane * 2..][..2].copy_from_slice(&src[2 + p * 2..][..2]);
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

    fn panel(&self, panel: usize) -> &[u8] {
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
                    let quants = &data[b * quant_bytes..];
                    for c in 0..8 {
                        for j in 0..2 {
                            let byte = quants[c * 32 + lane * 2 + j];
                            out[b * QK + c * 2 + j] = d * f32::from(byte & 15) + m;
                            out[b * QK + 16 + c * 2 + j] = d * f32::from(byte >> 4) + m;
                        }
                    }
                }
            }
            WeightFormat::Q8_0 => {
                for b in 0..blocks {
                    let d = scale(0, b);
                    let quants = &data[b * quant_bytes..];
                    for p in 0..16 {
                        for j in 0..2 {
                            out[b * QK + p * 2 + j] = d * f32::from(quants[p * 32 + lane * 2 + j] as i8);
                        }
                    }
                }
            }
        }
    }
}

/// The input of a matrix product: `rows` rows of `cols` activations, with
/// their 8-bit quantization when a quantized weight will read them.
#[derive(Debug, Default)]
pub struct MatmulInput {
    rows: usize,
    cols: usize,
    values: Vec<f32>,
    quantized: QuantizedRows,
}

impl MatmulInput {
    /// Takes `values` (`rows × cols`, row-major) and quantizes them when
    /// `quantize` is set (any weight reading this input is quantized).
    pub fn prepare(&mut self, values: &[f32], rows: usize, cols: usize, quantize: bool) {
        self.rows = rows;
        self.cols = cols;
        self.values.clear();
        self.values.extend_from_slice(values);
        if quantize {
            self.quantized.quantize_into(values, rows, cols);
        } else {
            self.quantized.rows = 0;
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Where a product's columns go: rows of stride `ld`, starting at column `at`.
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut f32,
    ld: usize,
    at: usize,
}

// SAFETY: threads write disjoint panels' columns (see `matmul`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[t][at + r] = Σ_k w[r][k] · x[t][k]` for every input row `t`, where
/// `out` has rows of length `ld`.
pub fn matmul(w: &Matrix, x: &MatmulInput, out: &mut [f32], ld: usize, at: usize, pool: &CpuPool) {
    assert_eq!(x.cols, w.cols, "matmul: input width {} != weight width {}", x.cols, w.cols);
    assert!(at + w.rows <= ld && out.len() >= x.rows * ld, "matmul: output too small");
    if w.format.is_quantized() {
        assert_eq!(x.quantized.rows, x.rows, "matmul: quantized weight needs a quantized input");
    }
    let out = OutPtr { ptr: out.as_mut_ptr(), ld, at };
    let panels = w.panels();
    let chunk = panels.div_ceil(pool.threads() * 4).max(1);
    pool.for_each_chunk(panels, chunk, &|range| {
        for panel in range {
            // SAFETY: each panel is visited by exactly one thread and writes
            // only its own 16 columns of each output row.
            unsafe { panel_product(w, panel, x, out) };
        }
    });
}

unsafe fn panel_product(w: &Matrix, panel: usize, x: &MatmulInput, out: OutPtr) {
    let data = w.panel(panel);
    let lanes = (w.rows - panel * PANEL).min(PANEL);
    for t in 0..x.rows {
        let acc = match w.format {
            WeightFormat::F32 => scalar::f32_panel(data, &x.values[t * x.cols..][..x.cols]),
            WeightFormat::Q4_0 | WeightFormat::Q4_1 | WeightFormat::Q8_0 => {
                scalar::quant_panel(w.format, data, &x.quantized, t)
            }
        };
        // SAFETY: `matmul` checked that the output holds `x.rows` rows of `ld`.
        let dst = unsafe { out.ptr.add(t * out.ld + out.at + panel * PANEL) };
        for (r, v) in acc.iter().enumerate().take(lanes) {
            unsafe { *dst.add(r) = *v };
        }
    }
}

/// The portable kernels: the reference every SIMD path must match bit for bit.
mod scalar {
    use super::*;

    pub fn f32_panel(data: &[u8], x: &[f32]) -> [f32; PANEL] {
        let mut acc = [0.0f32; PANEL];
        for (k, &xk) in x.iter().enumerate() {
            let w = &data[k * PANEL * 4..][..PANEL * 4];
            for r in 0..PANEL {
                let wr = f32::from_le_bytes([w[4 * r], w[4 * r + 1], w[4 * r + 2], w[4 * r + 3]]);
                acc[r] += wr * xk;
            }
        }
        acc
    }

    pub fn quant_panel(format: WeightFormat, data: &[u8], x: &QuantizedRows, t: usize) -> [f32; PANEL] {
        let blocks = x.blocks;
        let quant_bytes = format.quant_bytes();
        let scales_at = blocks * quant_bytes;
        let scale = |array: usize, b: usize, r: usize| {
            let at = scales_at + (array * blocks * PANEL + b * PANEL + r) * 2;
            f16::from_le_bytes([data[at], data[at + 1]]).to_f32()
        };
        let mut acc = [0.0f32; PANEL];
        for b in 0..blocks {
            let xb = t * blocks + b;
            let xq = &x.qs[xb * QK..][..QK];
            let (dx, sx, xsum) = (x.d[xb], x.s[xb], x.isum[xb]);
            let quants = &data[b * quant_bytes..][..quant_bytes];
            let mut isum = [0i32; PANEL];
            match format {
                WeightFormat::Q4_0 | WeightFormat::Q4_1 => {
                    for c in 0..8 {
                        for r in 0..PANEL {
                            for j in 0..2 {
                                let byte = quants[c * 32 + r * 2 + j];
                                isum[r] += i32::from(byte & 15) * i32::from(xq[c * 2 + j])
                                    + i32::from(byte >> 4) * i32::from(xq[16 + c * 2 + j]);
                            }
                        }
                    }
                }
                WeightFormat::Q8_0 => {
                    for p in 0..16 {
                        for r in 0..PANEL {
                            for j in 0..2 {
                                isum[r] += i32::from(quants[p * 32 + r * 2 + j] as i8) * i32::from(xq[p * 2 + j]);
                            }
                        }
                    }
                }
                WeightFormat::F32 => unreachable!("not a quantized format"),
            }
            for r in 0..PANEL {
                let d = scale(0, b, r) * dx;
                match format {
                    WeightFormat::Q4_0 => acc[r] += d * (isum[r] - 8 * xsum) as f32,
                    WeightFormat::Q4_1 => {
                        acc[r] += d * isum[r] as f32;
                        acc[r] += scale(1, b, r) * sx;
                    }
                    _ => acc[r] += d * isum[r] as f32,
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let pool = CpuPool::new(2).expect("threads");
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
                input.prepare(&x, tokens, cols, format.is_quantized());
                let ld = rows + 3;
                let mut out = vec![f32::NAN; tokens * ld];
                matmul(&m, &input, &mut out, ld, 2, &pool);
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
}
