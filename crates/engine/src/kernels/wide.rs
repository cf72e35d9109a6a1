//! The quantized-weight kernel, written once over a small set of vector
//! operations ([`Lanes`]) for every format: Q4_0, Q4_1, Q8_0, Q5_0, Q4_K,
//! Q5_K, Q6_K. AVX2 runs it on all 16 rows of a panel at once (pairs of
//! registers, so decode streams each cache line once), AVX-512 on the
//! formats that have no hand-written kernel in `x86.rs`. Its float steps are those of the scalar reference
//! (`scalar::block_step`), so every variant gives the same bits. The same
//! kernel also runs on [`Emulated16`], plain arrays with AVX-512's lane
//! semantics, so the 16-lane indexing is tested on every CPU.

use super::matrix::Tile;
#[cfg(test)]
use super::matrix::WeightFormat;
use super::quant::{QK, QK_K, QuantizedRows};

/// Format codes for the const parameter of [`panel`].
pub(crate) const Q5_0: u8 = 0;
pub(crate) const Q4_K: u8 = 1;
pub(crate) const Q5_K: u8 = 2;
pub(crate) const Q6_K: u8 = 3;
pub(crate) const Q4_0: u8 = 4;
pub(crate) const Q4_1: u8 = 5;

/// What the kernel reads of the activations (the const parameter `X` of
/// [`panel`]): the 16-bit quants as 16-bit pairs (`vpmaddwd`); the 8-bit
/// quants (K-quants only); or the 16-bit quants split into bytes
/// ([`QuantizedRows::split`]), each weight byte then multiplied by four low
/// bytes and four high bytes at once (`vpdpbusd`), and the two sums
/// combined as `256 · high + low`. The split gives the same integer sums
/// as 16-bit pairs, so the same bits, in about half the instructions: two
/// 4-way byte products per 32 weights and token instead of two 2-way
/// products plus the additions AVX-512's pairs need, and half the unpacking
/// (bytes, not 16-bit lanes). Every nibble format (not Q8_0).
pub(crate) const X16: u8 = 0;
pub(crate) const X8: u8 = 1;
pub(crate) const SPLIT: u8 = 2;
pub(crate) const Q8_0: u8 = 6;

#[cfg(test)]
pub(crate) fn code(format: WeightFormat) -> Option<u8> {
    Some(match format {
        WeightFormat::Q5_0 => Q5_0,
        WeightFormat::Q4_K => Q4_K,
        WeightFormat::Q5_K => Q5_K,
        WeightFormat::Q6_K => Q6_K,
        WeightFormat::Q4_0 => Q4_0,
        WeightFormat::Q4_1 => Q4_1,
        WeightFormat::Q8_0 => Q8_0,
        WeightFormat::F32 => return None,
    })
}

/// Whether format `F` has 256-column superblocks (scales per 8 blocks).
const fn is_k(f: u8) -> bool {
    matches!(f, Q4_K | Q5_K | Q6_K)
}

/// The vector operations the kernel needs, over `LANES` rows: integer
/// vectors hold two 16-bit quants (or one 32-bit sum) per row, float
/// vectors one f32 per row.
///
/// # Safety
/// Implementations may use instructions the CPU must support, and read
/// through raw pointers that must be valid for the sizes named.
pub(crate) trait Lanes {
    const LANES: usize;
    type I: Copy;
    type F: Copy;
    /// `LANES × 4` bytes.
    unsafe fn load(p: *const u8) -> Self::I;
    unsafe fn zero() -> Self::I;
    unsafe fn splat16(v: i16) -> Self::I;
    unsafe fn splat32(v: i32) -> Self::I;
    unsafe fn and(a: Self::I, b: Self::I) -> Self::I;
    unsafe fn or(a: Self::I, b: Self::I) -> Self::I;
    /// Logical shifts of each 16-bit lane.
    unsafe fn shr1(a: Self::I) -> Self::I;
    unsafe fn shr2(a: Self::I) -> Self::I;
    unsafe fn shr4(a: Self::I) -> Self::I;
    unsafe fn shr8(a: Self::I) -> Self::I;
    unsafe fn shr12(a: Self::I) -> Self::I;
    unsafe fn shl4(a: Self::I) -> Self::I;
    unsafe fn shl8(a: Self::I) -> Self::I;
    /// Arithmetic shift of each 16-bit lane right by 8 (sign-extends the high byte).
    unsafe fn sar8(a: Self::I) -> Self::I;
    unsafe fn add32(a: Self::I, b: Self::I) -> Self::I;
    unsafe fn sub32(a: Self::I, b: Self::I) -> Self::I;
    /// `acc + Σ pairs of 16-bit products` of `w` with the two 16-bit
    /// activations in `pair` (`vpmaddwd` + add, or `vpdpwssd`).
    unsafe fn dot(acc: Self::I, w: Self::I, pair: i32) -> Self::I;
    /// `acc + Σ quads of byte products` of the unsigned bytes of `w` (at
    /// most 63) with the four signed bytes of `quad` (`vpdpbusd`, or
    /// `vpmaddubsw` + `vpmaddwd`: pairs of products stay below 2^15).
    unsafe fn dot8(acc: Self::I, w: Self::I, quad: i32) -> Self::I;
    /// As [`Self::dot8`] with the roles swapped: the four bytes of `quad`
    /// unsigned, those of `w` signed (and at most 63, so pairs of products
    /// stay below 2^15).
    unsafe fn dot8u(acc: Self::I, w: Self::I, quad: i32) -> Self::I;
    /// Each 32-bit lane shifted left by 8.
    unsafe fn shl32_8(a: Self::I) -> Self::I;
    unsafe fn cvt(a: Self::I) -> Self::F;
    /// `LANES` f16 values.
    unsafe fn halves(p: *const u8) -> Self::F;
    /// `LANES` unsigned bytes, zero-extended to 32-bit integers.
    unsafe fn ubytes(p: *const u8) -> Self::I;
    /// `LANES` signed bytes, as floats.
    unsafe fn sbytes(p: *const u8) -> Self::F;
    unsafe fn splat(v: f32) -> Self::F;
    unsafe fn zerof() -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    /// `a·b + c`, fused.
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// `c − a·b`, fused.
    unsafe fn fnma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    unsafe fn prefetch(p: *const u8);
    /// Writes the lanes `lane0..` that exist to token `t`'s output row.
    unsafe fn store(tile: &Tile, t: usize, lane0: usize, v: Self::F);
}

/// What the kernel reads of one token's activation block: its quants as
/// 32-bit words (16-bit: word `k` holds columns `2k, 2k + 1`; 8-bit: the
/// four of slots `4k..4k + 4`, see `quant::ActivationQuant::slot`), the
/// scale `d`, `d · Σq`, `Σq` and the sum over the first 16 columns.
#[derive(Clone, Copy)]
struct XBlock {
    words: *const i32,
    d: f32,
    s: f32,
    sum: i32,
    first: i32,
}

/// Block `b` of each of the tile's `NT` tokens, read as `X` says.
///
/// # Safety
/// The tile's tokens and block `b` must exist in its quantized input, split
/// if `X` is [`SPLIT`] (`matmul` checks the input's shape before any tile runs).
#[inline(always)]
unsafe fn x_blocks<const NT: usize, const X: u8>(tile: &Tile, b: usize) -> [XBlock; NT] {
    if X == X8 {
        return unsafe { blocks_of(&tile.x.bytes, tile, b) };
    }
    let mut blocks = unsafe { blocks_of(&tile.x.quantized, tile, b) };
    if X == SPLIT {
        let split = &tile.x.quantized.split;
        for (t, block) in blocks.iter_mut().enumerate() {
            let i = (tile.t0 + t) * tile.blocks() + b;
            debug_assert!((i + 1) * 2 * QK <= split.len());
            block.words = unsafe { split.as_ptr().add(i * 2 * QK).cast() };
        }
    }
    blocks
}

/// As [`x_blocks`], from one quantization.
///
/// # Safety
/// As [`x_blocks`].
#[inline(always)]
unsafe fn blocks_of<Q, const NT: usize>(x: &QuantizedRows<Q>, tile: &Tile, b: usize) -> [XBlock; NT] {
    let blocks = tile.blocks();
    std::array::from_fn(|t| {
        let i = (tile.t0 + t) * blocks + b;
        debug_assert!(i < x.d.len() && (i + 1) * QK <= x.qs.len());
        unsafe {
            XBlock {
                words: x.qs.as_ptr().add(i * QK).cast(),
                d: *x.d.get_unchecked(i),
                s: *x.s.get_unchecked(i),
                sum: *x.isum.get_unchecked(i),
                first: *x.first.get_unchecked(i),
            }
        }
    })
}

/// Rows `lane0 .. lane0 + LANES` of one panel for `NT` tokens of the
/// tile, reading the activations as `X` says ([`X16`], [`X8`], [`SPLIT`]).
///
/// # Safety
/// `L`'s instructions must be supported; `tile` must be valid, of format `F`.
#[inline(always)]
pub(crate) unsafe fn panel<L: Lanes, const F: u8, const NT: usize, const X: u8>(tile: &Tile, lane0: usize) {
    const { assert!(X == X16 || (X == X8 && is_k(F)) || (X == SPLIT && F != Q8_0)) };
    unsafe {
        let layout = &tile.layout;
        let blocks = tile.blocks();
        let format = tile.format;
        let quant_bytes = format.quant_bytes();
        let base = tile.panel.as_ptr();
        let nibble = L::splat16(0x000F);
        let high_mask = L::splat16(if F == Q6_K { 0x30 } else { 0x10 });
        // Bits 4-5 of a 16-bit lane: the top of a 6-bit K-quant scale or minimum.
        let top_bits = L::splat16(0x30);
        // 8-bit activations: the quants of each byte's two nibbles.
        let byte_nibble = L::splat16(0x0F0F);
        let byte_high = L::splat16(if F == Q6_K { 0x3030 } else { 0x1010 });
        // Two chains per token (the first and the last 16 columns) keep
        // decode's additions independent and give Q6_K its two halves; with
        // several tokens, the others need one.
        let chain = |i: usize| if NT == 1 || F == Q6_K { i % 2 } else { 0 };
        // K-quants share d and dmin over 8 blocks: read them once per superblock.
        let per_super = if is_k(F) { QK_K / QK } else { 1 };
        let mut acc = [L::zerof(); NT];
        for sb in 0..blocks / per_super {
            let first_block = sb * per_super;
            let (d, dmin) = match F {
                Q6_K => (L::halves(base.add(layout.super_half(0, first_block) + lane0 * 2)), L::zerof()),
                Q4_K | Q5_K => {
                    (L::halves(base.add(layout.super_half(0, first_block) + lane0 * 2)), L::halves(base.add(layout.super_half(1, first_block) + lane0 * 2)))
                }
                _ => (L::zerof(), L::zerof()),
            };
            for b in first_block..first_block + per_super {
                let q = base.add(b * quant_bytes + lane0 * 4);
                if NT <= 2 {
                    layout.prefetch_lines(base, b, |at| L::prefetch(base.wrapping_add(at)));
                }
                let xs = x_blocks::<NT, X>(tile, b);
                let mut isum = [[L::zero(); 2]; NT];
                // The high bytes' sums when `X` is SPLIT.
                let mut hsum = [[L::zero(); 2]; NT];
                if F == Q8_0 {
                    // Eight groups; each 16-bit lane holds two columns' bytes:
                    // the low bytes are columns (2g, 2g+1), the high (2g+16, 2g+17).
                    for g in 0..8 {
                        let v = L::load(q.add(g * 64));
                        let w = [L::sar8(L::shl8(v)), L::sar8(v)];
                        for t in 0..NT {
                            for (i, &w) in w.iter().enumerate() {
                                isum[t][chain(i)] = L::dot(isum[t][chain(i)], w, *xs[t].words.add(g + 8 * i));
                            }
                        }
                    }
                }
                let nibble_groups = if F == Q8_0 { 0 } else { 4 };
                let mut high = if matches!(F, Q5_0 | Q5_K | Q6_K) { L::load(q.add(256)) } else { L::zero() };
                for g in 0..nibble_groups {
                    if F == Q6_K && g == 2 {
                        high = L::load(q.add(256 + 64));
                    }
                    let v = L::load(q.add(g * 64));
                    if X != X16 {
                        // Low nibbles of the lane's four bytes: columns 2g,
                        // 2g + 8, 2g + 1, 2g + 9, the activations' word g;
                        // high nibbles: those + 16, word 4 + g (split: the
                        // low bytes; the high bytes are words 8 + g, 12 + g).
                        let mut w = [L::and(v, byte_nibble), L::and(L::shr4(v), byte_nibble)];
                        if matches!(F, Q5_0 | Q5_K | Q6_K) {
                            w[0] = L::or(w[0], L::and(L::shl4(high), byte_high));
                            w[1] = L::or(w[1], L::and(high, byte_high));
                            high = if F == Q6_K { L::shr2(high) } else { L::shr1(high) };
                        }
                        for t in 0..NT {
                            for (i, &w) in w.iter().enumerate() {
                                let c = chain(i);
                                if X == SPLIT {
                                    isum[t][c] = L::dot8u(isum[t][c], w, *xs[t].words.add(g + 4 * i));
                                    hsum[t][c] = L::dot8(hsum[t][c], w, *xs[t].words.add(8 + g + 4 * i));
                                } else {
                                    isum[t][c] = L::dot8(isum[t][c], w, *xs[t].words.add(g + 4 * i));
                                }
                            }
                        }
                        continue;
                    }
                    let mut w = [L::and(v, nibble), L::and(L::shr4(v), nibble), L::and(L::shr8(v), nibble), L::shr12(v)];
                    if matches!(F, Q5_0 | Q5_K | Q6_K) {
                        let h = [L::shl4(high), high, L::shr4(high), L::shr8(high)];
                        for i in 0..4 {
                            w[i] = L::or(w[i], L::and(h[i], high_mask));
                        }
                        high = if F == Q6_K { L::shr2(high) } else { L::shr1(high) };
                    }
                    let at = [g, g + 8, g + 4, g + 12];
                    for t in 0..NT {
                        for i in 0..4 {
                            isum[t][chain(i)] = L::dot(isum[t][chain(i)], w[i], *xs[t].words.add(at[i]));
                        }
                    }
                }
                if X == SPLIT {
                    let chains = if NT == 1 || F == Q6_K { 2 } else { 1 };
                    for t in 0..NT {
                        for c in 0..chains {
                            isum[t][c] = L::add32(isum[t][c], L::shl32_8(hsum[t][c]));
                        }
                    }
                }
                // (first 16 columns, last 16) for Q6_K; the total otherwise.
                let total = |t: usize| if NT == 1 { L::add32(isum[t][0], isum[t][1]) } else { isum[t][0] };
                match F {
                    Q5_0 | Q4_0 => {
                        let d = L::halves(base.add(layout.block_half(0, b) + lane0 * 2));
                        let offset = if F == Q5_0 { 16 } else { 8 };
                        for t in 0..NT {
                            let sum = L::sub32(total(t), L::splat32(offset * xs[t].sum));
                            acc[t] = L::fma(L::mul(d, L::splat(xs[t].d)), L::cvt(sum), acc[t]);
                        }
                    }
                    Q4_1 => {
                        let d = L::halves(base.add(layout.block_half(0, b) + lane0 * 2));
                        let m = L::halves(base.add(layout.block_half(1, b) + lane0 * 2));
                        for t in 0..NT {
                            let step = L::fma(L::mul(d, L::splat(xs[t].d)), L::cvt(total(t)), acc[t]);
                            acc[t] = L::fma(m, L::splat(xs[t].s), step);
                        }
                    }
                    Q8_0 => {
                        let d = L::halves(base.add(layout.block_half(0, b) + lane0 * 2));
                        for t in 0..NT {
                            acc[t] = L::fma(L::mul(d, L::splat(xs[t].d)), L::cvt(total(t)), acc[t]);
                        }
                    }
                    Q4_K | Q5_K => {
                        // The 6-bit scale and minimum (`PanelLayout::k_scale_min`).
                        let low = L::ubytes(base.add(layout.block_byte(0, b) + lane0));
                        let mut high = L::ubytes(base.add(layout.k_high_byte(b) + lane0));
                        if b % 2 == 1 {
                            high = L::shl4(high);
                        }
                        let sc = L::or(L::and(low, nibble), L::and(high, top_bits));
                        let m = L::or(L::shr4(low), L::and(L::shr2(high), top_bits));
                        let scale = L::mul(d, L::cvt(sc));
                        let min = L::mul(dmin, L::cvt(m));
                        for t in 0..NT {
                            let step = L::fma(L::mul(scale, L::splat(xs[t].d)), L::cvt(total(t)), acc[t]);
                            acc[t] = L::fnma(min, L::splat(xs[t].s), step);
                        }
                    }
                    _ => {
                        let first = L::mul(d, L::sbytes(base.add(layout.block_byte(0, b) + lane0)));
                        let last = L::mul(d, L::sbytes(base.add(layout.block_byte(1, b) + lane0)));
                        for t in 0..NT {
                            let xd = L::splat(xs[t].d);
                            // The quants' offset of 32, through the activations' sums.
                            let (x_first, x_all) = (xs[t].first, xs[t].sum);
                            let sum_first = L::sub32(isum[t][0], L::splat32(32 * x_first));
                            let sum_last = L::sub32(isum[t][1], L::splat32(32 * (x_all - x_first)));
                            let step = L::fma(L::mul(first, xd), L::cvt(sum_first), acc[t]);
                            acc[t] = L::fma(L::mul(last, xd), L::cvt(sum_last), step);
                        }
                    }
                }
            }
        }
        for (t, v) in acc.into_iter().enumerate() {
            L::store(tile, t, lane0, v);
        }
    }
}

/// Runs a whole tile (up to 8 tokens, 16 rows) in passes of `LANES` rows
/// and at most `MAX_NT` (≤ 4) tokens.
///
/// # Safety
/// As [`panel`].
#[inline(always)]
pub(crate) unsafe fn tile<L: Lanes, const F: u8, const MAX_NT: usize, const X: u8>(tile: &Tile) {
    let mut t0 = 0;
    while t0 < tile.nt {
        let nt = (tile.nt - t0).min(MAX_NT);
        // SAFETY: the sub-tile's tokens lie inside the tile's.
        let sub = Tile { t0: tile.t0 + t0, nt, out: unsafe { tile.out.add(t0 * tile.ld) }, ..*tile };
        for lane0 in (0..super::matrix::PANEL).step_by(L::LANES) {
            unsafe {
                match nt {
                    1 => panel::<L, F, 1, X>(&sub, lane0),
                    2 => panel::<L, F, 2, X>(&sub, lane0),
                    3 => panel::<L, F, 3, X>(&sub, lane0),
                    _ => panel::<L, F, 4, X>(&sub, lane0),
                }
            }
        }
        t0 += nt;
    }
}

/// Plain arrays with AVX-512's lane semantics (16 rows): runs [`panel`] on
/// any CPU, so the 16-lane path is tested where AVX-512 is missing.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Emulated16;

#[cfg(test)]
fn halves16(v: u32, f: impl Fn(u16) -> u16) -> u32 {
    u32::from(f(v as u16)) | (u32::from(f((v >> 16) as u16)) << 16)
}

#[cfg(test)]
fn map_i(a: [u32; 16], f: impl Fn(u32) -> u32) -> [u32; 16] {
    a.map(f)
}

#[cfg(test)]
fn zip_i(a: [u32; 16], b: [u32; 16], f: impl Fn(u32, u32) -> u32) -> [u32; 16] {
    std::array::from_fn(|i| f(a[i], b[i]))
}

#[cfg(test)]
fn zip_f(a: [f32; 16], b: [f32; 16], f: impl Fn(f32, f32) -> f32) -> [f32; 16] {
    std::array::from_fn(|i| f(a[i], b[i]))
}

#[cfg(test)]
impl Lanes for Emulated16 {
    const LANES: usize = 16;
    type I = [u32; 16];
    type F = [f32; 16];

    unsafe fn load(p: *const u8) -> Self::I {
        std::array::from_fn(|i| u32::from_le_bytes(unsafe { std::ptr::read_unaligned(p.add(4 * i).cast::<[u8; 4]>()) }))
    }
    unsafe fn zero() -> Self::I {
        [0; 16]
    }
    unsafe fn splat16(v: i16) -> Self::I {
        [u32::from(v as u16) * 0x0001_0001; 16]
    }
    unsafe fn splat32(v: i32) -> Self::I {
        [v as u32; 16]
    }
    unsafe fn and(a: Self::I, b: Self::I) -> Self::I {
        zip_i(a, b, |x, y| x & y)
    }
    unsafe fn or(a: Self::I, b: Self::I) -> Self::I {
        zip_i(a, b, |x, y| x | y)
    }
    unsafe fn shr1(a: Self::I) -> Self::I {
        map_i(a, |v| halves16(v, |h| h >> 1))
    }
    unsafe fn shr2(a: Self::I) -> Self::I {
        map_i(a, |v| halves16(v, |h| h >> 2))
    }
    unsafe fn shr4(a: Self::I) -> Self::I {
        map_i(a, |v| halves16(v, |h| h >> 4))
    }
    unsafe fn shr8(a: Self::I) -> Self::I {
        map_i(a, |v| halves16(v, |h| h >> 8))
    }
    unsafe fn shr12(a: Self::I) -> Self::I {
        map_i(a, |v| halves16(v, |h| h >> 12))
    }
    unsafe fn shl4(a: Self::I) -> Self::I {
        map_i(a, |v| halves16(v, |h| h << 4))
    }
    unsafe fn shl8(a: Self::I) -> Self::I {
        map_i(a, |v| halves16(v, |h| h << 8))
    }
    unsafe fn sar8(a: Self::I) -> Self::I {
        map_i(a, |v| halves16(v, |h| ((h as i16) >> 8) as u16))
    }
    unsafe fn add32(a: Self::I, b: Self::I) -> Self::I {
        zip_i(a, b, u32::wrapping_add)
    }
    unsafe fn sub32(a: Self::I, b: Self::I) -> Self::I {
        zip_i(a, b, u32::wrapping_sub)
    }
    unsafe fn dot8(acc: Self::I, w: Self::I, quad: i32) -> Self::I {
        let x = quad.to_le_bytes().map(|b| i32::from(b as i8));
        zip_i(acc, w, |a, w| a.wrapping_add((0..4).map(|k| i32::from((w >> (8 * k)) as u8) * x[k]).sum::<i32>() as u32))
    }
    unsafe fn dot8u(acc: Self::I, w: Self::I, quad: i32) -> Self::I {
        let x = quad.to_le_bytes().map(i32::from);
        zip_i(acc, w, |a, w| a.wrapping_add((0..4).map(|k| i32::from((w >> (8 * k)) as u8 as i8) * x[k]).sum::<i32>() as u32))
    }
    unsafe fn shl32_8(a: Self::I) -> Self::I {
        map_i(a, |v| v << 8)
    }
    unsafe fn dot(acc: Self::I, w: Self::I, pair: i32) -> Self::I {
        let (x0, x1) = (i32::from(pair as i16), i32::from((pair >> 16) as i16));
        zip_i(acc, w, |a, w| {
            let (w0, w1) = (i32::from(w as u16 as i16), i32::from((w >> 16) as u16 as i16));
            a.wrapping_add((w0 * x0 + w1 * x1) as u32)
        })
    }
    unsafe fn cvt(a: Self::I) -> Self::F {
        a.map(|v| v as i32 as f32)
    }
    unsafe fn halves(p: *const u8) -> Self::F {
        std::array::from_fn(|i| half::f16::from_le_bytes(unsafe { [*p.add(2 * i), *p.add(2 * i + 1)] }).to_f32())
    }
    unsafe fn ubytes(p: *const u8) -> Self::I {
        std::array::from_fn(|i| u32::from(unsafe { *p.add(i) }))
    }
    unsafe fn sbytes(p: *const u8) -> Self::F {
        std::array::from_fn(|i| f32::from(unsafe { *p.add(i) } as i8))
    }
    unsafe fn splat(v: f32) -> Self::F {
        [v; 16]
    }
    unsafe fn zerof() -> Self::F {
        [0.0; 16]
    }
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F {
        zip_f(a, b, |x, y| x * y)
    }
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F {
        std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
    }
    unsafe fn fnma(a: Self::F, b: Self::F, c: Self::F) -> Self::F {
        std::array::from_fn(|i| (-a[i]).mul_add(b[i], c[i]))
    }
    unsafe fn prefetch(_: *const u8) {}
    unsafe fn store(tile: &Tile, t: usize, lane0: usize, v: Self::F) {
        let dst = unsafe { tile.out.add(t * tile.ld + lane0) };
        for (r, v) in v.iter().enumerate().take(tile.lanes.saturating_sub(lane0)) {
            unsafe { *dst.add(r) = *v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2x2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lanes;
    use crate::kernels::matrix::Tile;

    /// AVX2 + FMA + F16C, 8 rows per vector.
    pub(crate) struct Avx2;

    /// AVX-512 F/BW/VNNI + FMA + F16C, 16 rows per vector.
    pub(crate) struct Avx512;

    impl Lanes for Avx2 {
        const LANES: usize = 8;
        type I = __m256i;
        type F = __m256;

        #[inline(always)]
        unsafe fn load(p: *const u8) -> __m256i {
            unsafe { _mm256_loadu_si256(p.cast()) }
        }
        #[inline(always)]
        unsafe fn zero() -> __m256i {
            unsafe { _mm256_setzero_si256() }
        }
        #[inline(always)]
        unsafe fn splat16(v: i16) -> __m256i {
            unsafe { _mm256_set1_epi16(v) }
        }
        #[inline(always)]
        unsafe fn splat32(v: i32) -> __m256i {
            unsafe { _mm256_set1_epi32(v) }
        }
        #[inline(always)]
        unsafe fn and(a: __m256i, b: __m256i) -> __m256i {
            unsafe { _mm256_and_si256(a, b) }
        }
        #[inline(always)]
        unsafe fn or(a: __m256i, b: __m256i) -> __m256i {
            unsafe { _mm256_or_si256(a, b) }
        }
        #[inline(always)]
        unsafe fn shr1(a: __m256i) -> __m256i {
            unsafe { _mm256_srli_epi16::<1>(a) }
        }
        #[inline(always)]
        unsafe fn shr2(a: __m256i) -> __m256i {
            unsafe { _mm256_srli_epi16::<2>(a) }
        }
        #[inline(always)]
        unsafe fn shr4(a: __m256i) -> __m256i {
            unsafe { _mm256_srli_epi16::<4>(a) }
        }
        #[inline(always)]
        unsafe fn shr8(a: __m256i) -> __m256i {
            unsafe { _mm256_srli_epi16::<8>(a) }
        }
        #[inline(always)]
        unsafe fn shr12(a: __m256i) -> __m256i {
            unsafe { _mm256_srli_epi16::<12>(a) }
        }
        #[inline(always)]
        unsafe fn shl4(a: __m256i) -> __m256i {
            unsafe { _mm256_slli_epi16::<4>(a) }
        }
        #[inline(always)]
        unsafe fn shl8(a: __m256i) -> __m256i {
            unsafe { _mm256_slli_epi16::<8>(a) }
        }
        #[inline(always)]
        unsafe fn sar8(a: __m256i) -> __m256i {
            unsafe { _mm256_srai_epi16::<8>(a) }
        }
        #[inline(always)]
        unsafe fn add32(a: __m256i, b: __m256i) -> __m256i {
            unsafe { _mm256_add_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn sub32(a: __m256i, b: __m256i) -> __m256i {
            unsafe { _mm256_sub_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn dot(acc: __m256i, w: __m256i, pair: i32) -> __m256i {
            unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_set1_epi32(pair))) }
        }
        #[inline(always)]
        unsafe fn dot8(acc: __m256i, w: __m256i, quad: i32) -> __m256i {
            unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_set1_epi32(quad)), _mm256_set1_epi16(1))) }
        }
        #[inline(always)]
        unsafe fn dot8u(acc: __m256i, w: __m256i, quad: i32) -> __m256i {
            unsafe { _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi32(quad), w), _mm256_set1_epi16(1))) }
        }
        #[inline(always)]
        unsafe fn shl32_8(a: __m256i) -> __m256i {
            unsafe { _mm256_slli_epi32::<8>(a) }
        }
        #[inline(always)]
        unsafe fn cvt(a: __m256i) -> __m256 {
            unsafe { _mm256_cvtepi32_ps(a) }
        }
        #[inline(always)]
        unsafe fn halves(p: *const u8) -> __m256 {
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
        }
        #[inline(always)]
        unsafe fn ubytes(p: *const u8) -> __m256i {
            unsafe { _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast())) }
        }
        #[inline(always)]
        unsafe fn sbytes(p: *const u8) -> __m256 {
            unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m256 {
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn zerof() -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn fnma(a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fnmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
        #[inline(always)]
        unsafe fn store(tile: &Tile, t: usize, lane0: usize, v: __m256) {
            unsafe {
                let dst = tile.out.add(t * tile.ld + lane0);
                let n = tile.lanes.saturating_sub(lane0).min(8);
                if n == 8 {
                    _mm256_storeu_ps(dst, v);
                } else {
                    let mut tmp = [0.0f32; 8];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), v);
                    for (r, v) in tmp.iter().enumerate().take(n) {
                        *dst.add(r) = *v;
                    }
                }
            }
        }
    }

    /// AVX2 on all 16 rows of a panel at once: every vector is a pair of
    /// ymm registers (rows 0–7, rows 8–15). One pass streams each cache
    /// line once, so decode keeps memory busy.
    pub(crate) struct Avx2x2;

    /// Applies an AVX2 operation to both halves.
    macro_rules! pair {
        ($f:ident($($a:ident),*)) => {
            unsafe { [<Avx2 as Lanes>::$f($($a[0]),*), <Avx2 as Lanes>::$f($($a[1]),*)] }
        };
    }

    impl Lanes for Avx2x2 {
        const LANES: usize = 16;
        type I = [__m256i; 2];
        type F = [__m256; 2];

        #[inline(always)]
        unsafe fn load(p: *const u8) -> Self::I {
            unsafe { [Avx2::load(p), Avx2::load(p.add(32))] }
        }
        #[inline(always)]
        unsafe fn zero() -> Self::I {
            unsafe { [Avx2::zero(); 2] }
        }
        #[inline(always)]
        unsafe fn splat16(v: i16) -> Self::I {
            unsafe { [Avx2::splat16(v); 2] }
        }
        #[inline(always)]
        unsafe fn splat32(v: i32) -> Self::I {
            unsafe { [Avx2::splat32(v); 2] }
        }
        #[inline(always)]
        unsafe fn and(a: Self::I, b: Self::I) -> Self::I {
            pair!(and(a, b))
        }
        #[inline(always)]
        unsafe fn or(a: Self::I, b: Self::I) -> Self::I {
            pair!(or(a, b))
        }
        #[inline(always)]
        unsafe fn shr1(a: Self::I) -> Self::I {
            pair!(shr1(a))
        }
        #[inline(always)]
        unsafe fn shr2(a: Self::I) -> Self::I {
            pair!(shr2(a))
        }
        #[inline(always)]
        unsafe fn shr4(a: Self::I) -> Self::I {
            pair!(shr4(a))
        }
        #[inline(always)]
        unsafe fn shr8(a: Self::I) -> Self::I {
            pair!(shr8(a))
        }
        #[inline(always)]
        unsafe fn shr12(a: Self::I) -> Self::I {
            pair!(shr12(a))
        }
        #[inline(always)]
        unsafe fn shl4(a: Self::I) -> Self::I {
            pair!(shl4(a))
        }
        #[inline(always)]
        unsafe fn shl8(a: Self::I) -> Self::I {
            pair!(shl8(a))
        }
        #[inline(always)]
        unsafe fn sar8(a: Self::I) -> Self::I {
            pair!(sar8(a))
        }
        #[inline(always)]
        unsafe fn add32(a: Self::I, b: Self::I) -> Self::I {
            pair!(add32(a, b))
        }
        #[inline(always)]
        unsafe fn sub32(a: Self::I, b: Self::I) -> Self::I {
            pair!(sub32(a, b))
        }
        #[inline(always)]
        unsafe fn dot(acc: Self::I, w: Self::I, pair: i32) -> Self::I {
            unsafe {
                let x = _mm256_set1_epi32(pair);
                [_mm256_add_epi32(acc[0], _mm256_madd_epi16(w[0], x)), _mm256_add_epi32(acc[1], _mm256_madd_epi16(w[1], x))]
            }
        }
        #[inline(always)]
        unsafe fn dot8(acc: Self::I, w: Self::I, quad: i32) -> Self::I {
            unsafe { [Avx2::dot8(acc[0], w[0], quad), Avx2::dot8(acc[1], w[1], quad)] }
        }
        #[inline(always)]
        unsafe fn dot8u(acc: Self::I, w: Self::I, quad: i32) -> Self::I {
            unsafe { [Avx2::dot8u(acc[0], w[0], quad), Avx2::dot8u(acc[1], w[1], quad)] }
        }
        #[inline(always)]
        unsafe fn shl32_8(a: Self::I) -> Self::I {
            pair!(shl32_8(a))
        }
        #[inline(always)]
        unsafe fn cvt(a: Self::I) -> Self::F {
            pair!(cvt(a))
        }
        #[inline(always)]
        unsafe fn halves(p: *const u8) -> Self::F {
            unsafe { [Avx2::halves(p), Avx2::halves(p.add(16))] }
        }
        #[inline(always)]
        unsafe fn ubytes(p: *const u8) -> Self::I {
            unsafe { [Avx2::ubytes(p), Avx2::ubytes(p.add(8))] }
        }
        #[inline(always)]
        unsafe fn sbytes(p: *const u8) -> Self::F {
            unsafe { [Avx2::sbytes(p), Avx2::sbytes(p.add(8))] }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self::F {
            unsafe { [Avx2::splat(v); 2] }
        }
        #[inline(always)]
        unsafe fn zerof() -> Self::F {
            unsafe { [Avx2::zerof(); 2] }
        }
        #[inline(always)]
        unsafe fn mul(a: Self::F, b: Self::F) -> Self::F {
            pair!(mul(a, b))
        }
        #[inline(always)]
        unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            pair!(fma(a, b, c))
        }
        #[inline(always)]
        unsafe fn fnma(a: Self::F, b: Self::F, c: Self::F) -> Self::F {
            pair!(fnma(a, b, c))
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            unsafe { Avx2::prefetch(p) }
        }
        #[inline(always)]
        unsafe fn store(tile: &Tile, t: usize, lane0: usize, v: Self::F) {
            unsafe {
                Avx2::store(tile, t, lane0, v[0]);
                if tile.lanes > lane0 + 8 {
                    Avx2::store(tile, t, lane0 + 8, v[1]);
                }
            }
        }
    }

    impl Lanes for Avx512 {
        const LANES: usize = 16;
        type I = __m512i;
        type F = __m512;

        #[inline(always)]
        unsafe fn load(p: *const u8) -> __m512i {
            unsafe { _mm512_loadu_si512(p.cast()) }
        }
        #[inline(always)]
        unsafe fn zero() -> __m512i {
            unsafe { _mm512_setzero_si512() }
        }
        #[inline(always)]
        unsafe fn splat16(v: i16) -> __m512i {
            unsafe { _mm512_set1_epi16(v) }
        }
        #[inline(always)]
        unsafe fn splat32(v: i32) -> __m512i {
            unsafe { _mm512_set1_epi32(v) }
        }
        #[inline(always)]
        unsafe fn and(a: __m512i, b: __m512i) -> __m512i {
            unsafe { _mm512_and_si512(a, b) }
        }
        #[inline(always)]
        unsafe fn or(a: __m512i, b: __m512i) -> __m512i {
            unsafe { _mm512_or_si512(a, b) }
        }
        #[inline(always)]
        unsafe fn shr1(a: __m512i) -> __m512i {
            unsafe { _mm512_srli_epi16::<1>(a) }
        }
        #[inline(always)]
        unsafe fn shr2(a: __m512i) -> __m512i {
            unsafe { _mm512_srli_epi16::<2>(a) }
        }
        #[inline(always)]
        unsafe fn shr4(a: __m512i) -> __m512i {
            unsafe { _mm512_srli_epi16::<4>(a) }
        }
        #[inline(always)]
        unsafe fn shr8(a: __m512i) -> __m512i {
            unsafe { _mm512_srli_epi16::<8>(a) }
        }
        #[inline(always)]
        unsafe fn shr12(a: __m512i) -> __m512i {
            unsafe { _mm512_srli_epi16::<12>(a) }
        }
        #[inline(always)]
        unsafe fn shl4(a: __m512i) -> __m512i {
            unsafe { _mm512_slli_epi16::<4>(a) }
        }
        #[inline(always)]
        unsafe fn shl8(a: __m512i) -> __m512i {
            unsafe { _mm512_slli_epi16::<8>(a) }
        }
        #[inline(always)]
        unsafe fn sar8(a: __m512i) -> __m512i {
            unsafe { _mm512_srai_epi16::<8>(a) }
        }
        #[inline(always)]
        unsafe fn add32(a: __m512i, b: __m512i) -> __m512i {
            unsafe { _mm512_add_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn sub32(a: __m512i, b: __m512i) -> __m512i {
            unsafe { _mm512_sub_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn dot(acc: __m512i, w: __m512i, pair: i32) -> __m512i {
            unsafe { _mm512_dpwssd_epi32(acc, w, _mm512_set1_epi32(pair)) }
        }
        #[inline(always)]
        unsafe fn dot8(acc: __m512i, w: __m512i, quad: i32) -> __m512i {
            unsafe { _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(quad)) }
        }
        #[inline(always)]
        unsafe fn dot8u(acc: __m512i, w: __m512i, quad: i32) -> __m512i {
            unsafe { _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(quad), w) }
        }
        #[inline(always)]
        unsafe fn shl32_8(a: __m512i) -> __m512i {
            unsafe { _mm512_slli_epi32::<8>(a) }
        }
        #[inline(always)]
        unsafe fn cvt(a: __m512i) -> __m512 {
            unsafe { _mm512_cvtepi32_ps(a) }
        }
        #[inline(always)]
        unsafe fn halves(p: *const u8) -> __m512 {
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
        }
        #[inline(always)]
        unsafe fn ubytes(p: *const u8) -> __m512i {
            unsafe { _mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast())) }
        }
        #[inline(always)]
        unsafe fn sbytes(p: *const u8) -> __m512 {
            unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()))) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m512 {
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn zerof() -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn fnma(a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fnmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
        }
        #[inline(always)]
        unsafe fn store(tile: &Tile, t: usize, lane0: usize, v: __m512) {
            unsafe {
                let dst = tile.out.add(t * tile.ld + lane0);
                if tile.lanes == 16 {
                    _mm512_storeu_ps(dst, v);
                } else {
                    _mm512_mask_storeu_ps(dst, ((1u32 << tile.lanes) - 1) as u16, v);
                }
            }
        }
    }
}
