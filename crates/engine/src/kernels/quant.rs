//! Activation quantization and reference dequantization of the GGML weight
//! blocks the kernels run natively.
//!
//! Activations are quantized per block of 32 to **16 bits**, or to **8
//! bits** where a K-quant weight reads the input of the
//! q/k/v, attention-output, gate/up or head product (the caller chooses per
//! product, `matrix::ActivationBits`; the format decides,
//! `WeightFormat::reads_bytes`). 16-bit products (`vpdpwssd`) are exact
//! and leave the weights' own rounding as the only error; 8-bit ones
//! (`vpdpbusd`) do twice the columns per instruction: K-quant prefill
//! products ran 1.9× faster (`examples/matmul`, 17920 × 1536, 64 tokens).
//! The FFN's down projection stays 16-bit: the gated activation feeding it
//! has outlier columns that 8 bits round badly (8-bit there too took Gemma
//! 3 below llama.cpp: 130/136). An 8-bit head changes only the 1.5B here
//! (the other heads are Q8_0): 0.013 → 0.017, for a Q6_K head that
//! streams at 16 GB/s instead of 12 on one core (`examples/matmul`,
//! 151936 × 1536, one token: ~12 ms instead of ~16 per decode step).
//!
//! Teacher-forced against float64 forward passes (`tests/real_models.rs`,
//! `tests/smollm2.rs`), top-1 agreement and median |Δ logprob|, 2026-12-02:
//!
//! | model | all 16-bit | shipped | + Q4_1 or Q5_0 8-bit | 8-bit everywhere | llama.cpp |
//! |---|---|---|---|---|---|
//! | SmolLM2-135M Q4_1 | 230/230 0.0003 | 230/230 0.0003 | 225/230 0.049 | 220/230 0.062 | 216/230 0.061 |
//! | Gemma 3 270M | 136/136 0.0002 | 134/136 0.0075 | 131/136 0.031 | 129/136 0.054 | 132/136 0.066 |
//! | Qwen2.5-Coder 0.5B | 158/158 0.0001 | 158/158 0.0001 | 158/158 0.018 | 157/158 0.027 | 154/158 0.034 |
//! | Qwen2.5-Coder 1.5B | 165/165 0.0001 | 164/165 0.017 | | 163/165 0.018 | 164/165 0.039 |
//!
//! (SmolLM2's weights are Q4_1, the 0.5B's q/k/v, output and gate/up
//! weights Q5_0 and Q8_0, so they stay 16-bit. SmolLM2 with 8-bit Q4_1
//! inputs ran prefill 1.3× faster but its greedy chat answer to "What is
//! the capital of France?" lost "Paris": not worth it for a model already
//! 3–4× ahead of llama.cpp.)

use half::f16;

use super::Cpu;
use super::isa::Isa;

/// Elements per quantization block in every format we run natively.
pub const QK: usize = 32;

/// One activation quant: 16 bits (in column order) or 8 bits (in the
/// order the 8-bit kernels read, see [`ActivationQuant::slot`]).
pub trait ActivationQuant: Copy + Default + Send + Sync + std::fmt::Debug + PartialEq + 'static {
    /// Largest magnitude: `d = max|x| / MAX`.
    const MAX: i32;
    /// Where column `c` (0..32) of a block is stored. 8-bit quants
    /// interleave columns `m` and `m + 8` of each 16-column half (slot
    /// `16h + 2(m mod 8) + m/8` holds column `16h + m`), so that one 32-bit
    /// word holds the four columns whose weights share a 32-bit lane of the
    /// packed nibble layout (see `matrix.rs`). Either way the first 16
    /// slots hold the first 16 columns.
    fn slot(c: usize) -> usize;
    /// `v` is within ±`MAX`.
    fn narrow(v: i32) -> Self;
    fn widen(self) -> i32;
}

impl ActivationQuant for i16 {
    const MAX: i32 = 32767;
    #[inline(always)]
    fn slot(c: usize) -> usize {
        c
    }
    #[inline(always)]
    fn narrow(v: i32) -> Self {
        v as i16
    }
    #[inline(always)]
    fn widen(self) -> i32 {
        i32::from(self)
    }
}

impl ActivationQuant for i8 {
    const MAX: i32 = 127;
    #[inline(always)]
    fn slot(c: usize) -> usize {
        let m = c % 16;
        c - m + 2 * (m % 8) + m / 8
    }
    #[inline(always)]
    fn narrow(v: i32) -> Self {
        v as i8
    }
    #[inline(always)]
    fn widen(self) -> i32 {
        i32::from(self)
    }
}

/// Rows of `f32` activations quantized in blocks of 32 (to 16 bits, or 8
/// with `Q = i8`): per block a scale `d` (f32), the integer sum of the
/// quants (Q4_0's offset multiplies it), and `d · sum` (the term Q4_1's
/// minimum multiplies).
#[derive(Debug, Default, Clone)]
pub struct QuantizedRows<Q = i16> {
    pub rows: usize,
    pub blocks: usize,
    pub d: Vec<f32>,
    pub isum: Vec<i32>,
    /// Sum of the quants of each block's first 16 columns (Q6_K's offset
    /// of 32 applies per 16-column half).
    pub first: Vec<i32>,
    pub s: Vec<f32>,
    /// 32 per block, column `c` at `Q::slot(c)`.
    pub qs: Vec<Q>,
    /// The 16-bit quants as bytes, when asked for: 64 per block, the low
    /// byte (unsigned) of column `c` at `i8::slot(c)`, then its high byte
    /// (signed) at `32 + i8::slot(c)`, so that `q = 256 · high + low` is
    /// two 8-bit products in the layout the 8-bit quants use (see
    /// `matrix.rs`). Empty otherwise.
    pub split: Vec<u8>,
}

impl<Q: ActivationQuant> QuantizedRows<Q> {
    /// Quantizes `rows` rows of `cols` values; `cols` must be a multiple of 32.
    /// Every variant gives the same quants (max is exact; the rounding is
    /// the same multiply and add). `split`: also fill [`Self::split`]
    /// (16-bit quants only).
    pub fn quantize_into(&mut self, cpu: &Cpu, x: &[f32], rows: usize, cols: usize, split: bool) {
        debug_assert_eq!(cols % QK, 0);
        debug_assert_eq!(x.len(), rows * cols);
        let blocks = cols / QK;
        self.rows = rows;
        self.blocks = blocks;
        let n = rows * blocks;
        self.d.resize(n, 0.0);
        self.isum.resize(n, 0);
        self.s.resize(n, 0.0);
        self.qs.resize(n * QK, Q::default());
        self.first.resize(n, 0);
        let split = split && Q::MAX > i32::from(i8::MAX);
        self.split.resize(if split { n * 2 * QK } else { 0 }, 0);
        let isa = cpu.isa;
        let arrays = Arrays {
            d: self.d.as_mut_ptr(),
            isum: self.isum.as_mut_ptr(),
            s: self.s.as_mut_ptr(),
            qs: self.qs.as_mut_ptr(),
            first: self.first.as_mut_ptr(),
            split: split.then_some(self.split.as_mut_ptr()),
        };
        let run = |range: std::ops::Range<usize>| {
            let (b0, len) = (range.start * blocks, range.len() * blocks);
            // SAFETY: rows `range` own blocks `b0..b0 + len` of every array
            // (sized above), and each row is in exactly one run.
            let (d, isum, s, qs, first, split) = unsafe { arrays.blocks(b0, len) };
            quantize_blocks(isa, &x[b0 * QK..(b0 + len) * QK], d, isum, s, qs, split);
            for (f, q) in first.iter_mut().zip(qs.chunks_exact(QK)) {
                *f = q[..QK / 2].iter().map(|&v| v.widen()).sum::<i32>();
            }
        };
        cpu.pool.split_rows(rows, &run);
    }
}

/// The arrays of a [`QuantizedRows`], handed to the pool's threads in
/// disjoint runs of blocks.
#[derive(Clone, Copy)]
struct Arrays<Q> {
    d: *mut f32,
    isum: *mut i32,
    s: *mut f32,
    qs: *mut Q,
    first: *mut i32,
    split: Option<*mut u8>,
}

// SAFETY: `quantize_into` hands each thread disjoint runs of blocks.
unsafe impl<Q> Send for Arrays<Q> {}
unsafe impl<Q> Sync for Arrays<Q> {}

impl<Q> Arrays<Q> {
    /// Blocks `b0..b0 + len` of every array.
    ///
    /// # Safety
    /// They must lie inside the arrays, and no other live slice may overlap them.
    #[allow(clippy::type_complexity)]
    unsafe fn blocks<'a>(self, b0: usize, len: usize) -> (&'a mut [f32], &'a mut [i32], &'a mut [f32], &'a mut [Q], &'a mut [i32], &'a mut [u8]) {
        use std::slice::from_raw_parts_mut as part;
        unsafe {
            (
                part(self.d.add(b0), len),
                part(self.isum.add(b0), len),
                part(self.s.add(b0), len),
                part(self.qs.add(b0 * QK), len * QK),
                part(self.first.add(b0), len),
                match self.split {
                    Some(split) => part(split.add(b0 * 2 * QK), len * 2 * QK),
                    None => &mut [],
                },
            )
        }
    }
}

/// Quantizes consecutive blocks of 32: `d`, `isum`, `s` get one entry per
/// block, `qs` 32 per block, `split` (unless empty) 64 per block.
#[allow(clippy::too_many_arguments)]
fn quantize_blocks<Q: ActivationQuant>(isa: Isa, x: &[f32], d: &mut [f32], isum: &mut [i32], s: &mut [f32], qs: &mut [Q], split: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    match isa.min(super::isa::best()) {
        // SAFETY: clamped to what this CPU supports.
        Isa::Avx512 => return unsafe { super::x86::quantize_blocks_avx512(x, d, isum, s, qs, split) },
        Isa::Avx2 => unsafe { super::x86::quantize_blocks_avx2(x, d, isum, s, qs) },
        Isa::Scalar => quantize_blocks_scalar(x, d, isum, s, qs),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        quantize_blocks_scalar(x, d, isum, s, qs);
    }
    split_blocks(qs, split);
}

fn quantize_blocks_scalar<Q: ActivationQuant>(x: &[f32], d: &mut [f32], isum: &mut [i32], s: &mut [f32], qs: &mut [Q]) {
    for (b, (src, q)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
        let (scale, sum) = quantize_block(src, q.try_into().expect("32 quants"));
        d[b] = scale;
        isum[b] = sum;
        s[b] = scale * sum as f32;
    }
}

/// Fills [`QuantizedRows::split`]'s bytes (`split` empty: nothing) from
/// 16-bit quants stored in column order.
fn split_blocks<Q: ActivationQuant>(qs: &[Q], split: &mut [u8]) {
    for (q, out) in qs.chunks_exact(QK).zip(split.chunks_exact_mut(2 * QK)) {
        let (low, high) = out.split_at_mut(QK);
        for (c, &v) in q.iter().enumerate() {
            let v = v.widen();
            low[i8::slot(c)] = v as u8;
            high[i8::slot(c)] = (v >> 8) as u8;
        }
    }
}

/// `a > b ? a : b`: the `maxps` instruction's own rule, so it vectorizes
/// (`f32::max`'s NaN rule does not, on x86). Inputs here are finite.
#[inline(always)]
pub(crate) fn max(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

/// 1.5 · 2^23 and its bit pattern: `(v + ROUND).to_bits() - ROUND_BITS`
/// is `v` rounded to the nearest integer, ties to even.
pub(crate) const ROUND: f32 = 12_582_912.0;
pub(crate) const ROUND_BITS: i32 = 0x4B40_0000;

/// Symmetric quantization of one block: `d = max|x| / Q::MAX`,
/// `q = round_half_even(x / d)`, column `c` stored at `Q::slot(c)`.
/// Returns `(d, Σq)`.
#[inline(always)]
pub fn quantize_block<Q: ActivationQuant>(x: &[f32], q: &mut [Q; QK]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| max(m, v.abs()));
    let d = amax / Q::MAX as f32;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (c, &v) in x.iter().enumerate() {
        // Adding 1.5 · 2^23 rounds to the nearest integer (ties to even) and
        // leaves it in the low mantissa bits: exact for |v · id| < 2^22.
        let r = ((v * id + ROUND).to_bits() as i32 - ROUND_BITS).clamp(-Q::MAX, Q::MAX);
        q[Q::slot(c)] = Q::narrow(r);
        sum += r;
    }
    (d, sum)
}

/// GGML's Q4_0 block: 32 weights `d · (q − 8)`, q in 0..16, nibbles packed
/// as `qs[i] = q[i] | q[i + 16] << 4`.
pub const Q4_0_BYTES: usize = 18;
/// GGML's Q4_1 block: 32 weights `d · q + m`, same nibble order as Q4_0.
pub const Q4_1_BYTES: usize = 20;
/// GGML's Q8_0 block: 32 weights `d · q`, q an i8.
pub const Q8_0_BYTES: usize = 34;

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes one GGML Q4_0 block.
pub fn dequantize_q4_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for i in 0..16 {
        let byte = block[2 + i];
        out[i] = d * (i32::from(byte & 15) - 8) as f32;
        out[i + 16] = d * (i32::from(byte >> 4) - 8) as f32;
    }
}

/// Dequantizes one GGML Q4_1 block.
pub fn dequantize_q4_1(block: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
    for i in 0..16 {
        let byte = block[4 + i];
        out[i] = d * f32::from(byte & 15) + m;
        out[i + 16] = d * f32::from(byte >> 4) + m;
    }
}

/// Dequantizes one GGML Q8_0 block.
pub fn dequantize_q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for i in 0..QK {
        out[i] = d * f32::from(block[2 + i] as i8);
    }
}

/// GGML's Q5_0 block: 32 weights `d · (q − 16)`, q in 0..32: the low four
/// bits as in Q4_0, bit 4 of column `i` in bit `i` of the little-endian
/// `qh` word.
pub const Q5_0_BYTES: usize = 22;
/// Weights per K-quant superblock.
pub const QK_K: usize = 256;
/// GGML's Q4_K superblock: `d`, `dmin` (f16), 12 bytes holding eight 6-bit
/// scales and mins, 128 bytes of nibbles; weight = `d·sc_j·q − dmin·m_j`
/// for sub-block `j` of 32.
pub const Q4_K_BYTES: usize = 144;
/// GGML's Q5_K superblock: Q4_K plus a bit plane `qh` (32 bytes) that adds 16.
pub const Q5_K_BYTES: usize = 176;
/// GGML's Q6_K superblock: low nibbles `ql` (128 bytes), high pairs `qh`
/// (64), sixteen i8 scales (one per 16 weights), `d` (f16); weight =
/// `d·sc·(q − 32)`.
pub const Q6_K_BYTES: usize = 210;

/// Dequantizes one GGML Q5_0 block.
pub fn dequantize_q5_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    for i in 0..16 {
        let byte = block[6 + i];
        let lo = i32::from(byte & 15) | (((qh >> i) & 1) << 4) as i32;
        let hi = i32::from(byte >> 4) | (((qh >> (i + 16)) & 1) << 4) as i32;
        out[i] = d * (lo - 16) as f32;
        out[i + 16] = d * (hi - 16) as f32;
    }
}

/// Scale and min of sub-block `j` (0..8) from a Q4_K/Q5_K block's 12 packed
/// scale bytes (GGML's `get_scale_min_k4`).
pub fn k_scale_min(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
    }
}

/// The 32 quants of sub-block `j` of a Q4_K (`high = None`) or Q5_K
/// superblock, 0..16 or 0..32.
pub fn k_quants(j: usize, qs: &[u8], qh: Option<&[u8]>) -> [u8; QK] {
    let bytes: &[u8; QK] = qs[j / 2 * 32..][..QK].try_into().expect("32 bytes");
    let shift = if j.is_multiple_of(2) { 0 } else { 4 };
    let mut q = bytes.map(|b| (b >> shift) & 15);
    if let Some(qh) = qh {
        for (q, &h) in q.iter_mut().zip(&qh[..QK]) {
            *q |= ((h >> j) & 1) << 4;
        }
    }
    q
}

/// Dequantizes one GGML Q4_K (`with_high` false) or Q5_K superblock.
pub fn dequantize_k(block: &[u8], with_high: bool, out: &mut [f32]) {
    let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
    let scales = &block[4..16];
    let (qh, qs) = if with_high { (Some(&block[16..48]), &block[48..176]) } else { (None, &block[16..144]) };
    for j in 0..QK_K / QK {
        let (sc, m) = k_scale_min(j, scales);
        let q = k_quants(j, qs, qh);
        for (o, &q) in out[j * QK..(j + 1) * QK].iter_mut().zip(&q) {
            *o = d * f32::from(sc) * f32::from(q) - dmin * f32::from(m);
        }
    }
}

/// The 32 quants (0..64, before subtracting 32) of sub-block `j` of a Q6_K
/// superblock.
pub fn q6_k_quants(j: usize, block: &[u8]) -> [u8; QK] {
    let (half, k) = (j / 4, j % 4);
    let low: &[u8; QK] = block[half * 64 + (k % 2) * 32..][..QK].try_into().expect("32 bytes");
    let high = &block[128 + half * 32..][..QK];
    let shift = if k < 2 { 0 } else { 4 };
    let mut q = low.map(|b| (b >> shift) & 15);
    for (q, &h) in q.iter_mut().zip(high) {
        *q |= ((h >> (2 * k)) & 3) << 4;
    }
    q
}

/// The sixteen scales of a Q6_K superblock, one per 16 weights.
pub fn q6_k_scales(block: &[u8]) -> [i8; 16] {
    std::array::from_fn(|i| block[192 + i] as i8)
}

/// Dequantizes one GGML Q6_K superblock.
pub fn dequantize_q6_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 208);
    let scales = q6_k_scales(block);
    for j in 0..QK_K / QK {
        let q = q6_k_quants(j, block);
        for (c, o) in out[j * QK..(j + 1) * QK].iter_mut().enumerate() {
            *o = d * f32::from(scales[2 * j + c / 16]) * (i32::from(q[c]) - 32) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::CpuPool;

    #[test]
    fn quantized_block_is_within_half_a_step() {
        let x: Vec<f32> = (0..32).map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.173).collect();
        let mut q = [0i16; QK];
        let (d, sum) = quantize_block(&x, &mut q);
        assert_eq!(sum, q.iter().map(|&v| i32::from(v)).sum::<i32>());
        assert!(q.iter().any(|&v| v.abs() == 32767));
        let mut q8 = [0i8; QK];
        let (d8, sum8) = quantize_block(&x, &mut q8);
        assert_eq!(sum8, q8.iter().map(|&v| i32::from(v)).sum::<i32>());
        for (c, v) in x.iter().enumerate() {
            assert!((v - d8 * f32::from(q8[i8::slot(c)])).abs() <= d8 * 0.5 + 1e-6);
        }
        for (v, q) in x.iter().zip(q) {
            assert!((v - d * f32::from(q)).abs() <= d * 0.5 + 1e-6);
        }
    }

    #[test]
    fn zero_block_has_zero_scale() {
        let mut q = [1i16; QK];
        assert_eq!(quantize_block(&[0.0; QK], &mut q), (0.0, 0));
        assert!(q.iter().all(|&v| v == 0));
    }

    /// The split bytes give back every 16-bit quant: 256 · high + low.
    #[test]
    fn split_bytes_recompose_the_quants() {
        let x: Vec<f32> = (0..32 * 6).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.0137).collect();
        let mut rows = QuantizedRows::<i16>::default();
        let cpu = Cpu { pool: CpuPool::new(1).expect("pool"), isa: Isa::Scalar };
        rows.quantize_into(&cpu, &x, 2, 96, true);
        assert_eq!(rows.split.len(), 6 * 64);
        for (q, split) in rows.qs.chunks_exact(QK).zip(rows.split.chunks_exact(2 * QK)) {
            for c in 0..QK {
                let (low, high) = (i32::from(split[i8::slot(c)]), i32::from(split[QK + i8::slot(c)] as i8));
                assert_eq!(256 * high + low, i32::from(q[c]), "column {c}");
            }
        }
        rows.quantize_into(&cpu, &x, 2, 96, false);
        assert!(rows.split.is_empty());
    }

    #[test]
    fn eight_bit_slots_are_a_permutation() {
        let mut seen = [false; QK];
        for c in 0..QK {
            assert!(!std::mem::replace(&mut seen[i8::slot(c)], true));
            assert_eq!(i8::slot(c) < 16, c < 16);
        }
        assert_eq!([0, 8, 1, 9, 2].map(i8::slot), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn variants_quantize_identically() {
        variants_agree::<i16>();
        variants_agree::<i8>();
    }

    fn variants_agree<Q: ActivationQuant>() {
        let x: Vec<f32> = (0..32 * 50).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.0137 * if i % 97 == 0 { 40.0 } else { 1.0 }).collect();
        let mut zeros = x.clone();
        zeros[32..64].fill(0.0);
        for input in [x, zeros] {
            let mut reference = QuantizedRows::<Q>::default();
            let one = Cpu { pool: CpuPool::new(1).expect("pool"), isa: Isa::Scalar };
            reference.quantize_into(&one, &input, 25, 64, true);
            // Every variant, on one thread and split over three (25 rows
            // is past `PARALLEL_ROWS`).
            for (isa, threads) in Isa::available().into_iter().flat_map(|isa| [(isa, 1), (isa, 3)]) {
                let cpu = Cpu { pool: CpuPool::new(threads).expect("pool"), isa };
                let mut got = QuantizedRows::<Q>::default();
                got.quantize_into(&cpu, &input, 25, 64, true);
                assert_eq!(got.first, reference.first, "{isa:?}");
                assert_eq!(got.split, reference.split, "{isa:?}");
                assert_eq!(got.qs, reference.qs, "{isa:?}");
                assert_eq!(got.isum, reference.isum, "{isa:?}");
                assert_eq!(got.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), reference.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                assert_eq!(got.s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), reference.s.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
        }
    }
}
