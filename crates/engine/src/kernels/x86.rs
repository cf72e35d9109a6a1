//! x86-64 kernels: AVX-512 (F, BW, VNNI) and AVX2.
//!
//! Both follow the scalar reference step for step (see `scalar.rs`): exact
//! 16-bit (or, for K-quants at the products that read them, 8-bit) × 4/8-bit
//! integer dot products per block and row lane, then
//! `acc = fma(d_w · d_x, isum, acc)`. One weight group is unpacked once and
//! used for up to `TOKEN_TILE` tokens, which is what makes prefill a
//! matrix-matrix product. AVX-512 has hand-written kernels for Q8_0 and
//! f32 here; the nibble formats run the generic kernel of `wide.rs`, which
//! on AVX-512 reads 16-bit activations split into bytes (`wide::SPLIT`),
//! and on AVX2 runs every quantized format.

#![allow(clippy::needless_range_loop)] // lanes and tokens index parallel arrays

use std::arch::x86_64::*;

use super::matrix::{PANEL, TOKEN_TILE, Tile, WeightFormat};
use super::quant::{ActivationQuant, QK, ROUND, ROUND_BITS};
use super::wide;

/// Tokens per pass of the wide-format kernel (see `wide.rs`): as many as
/// keep its sums in registers.
const WIDE_TOKENS_256: usize = 4;
const WIDE_TOKENS_512: usize = 4;

/// Calls `$f::<NT, ...>` with `NT` = the tile's token count (1..=8).
macro_rules! by_tokens {
    ($nt:expr, $f:ident $(:: <$($g:tt),*>)? ($($arg:expr),*)) => {
        match $nt {
            1 => $f::<1 $($(, $g)*)?>($($arg),*),
            2 => $f::<2 $($(, $g)*)?>($($arg),*),
            3 => $f::<3 $($(, $g)*)?>($($arg),*),
            4 => $f::<4 $($(, $g)*)?>($($arg),*),
            5 => $f::<5 $($(, $g)*)?>($($arg),*),
            6 => $f::<6 $($(, $g)*)?>($($arg),*),
            7 => $f::<7 $($(, $g)*)?>($($arg),*),
            _ => $f::<8 $($(, $g)*)?>($($arg),*),
        }
    };
}

const _: () = assert!(TOKEN_TILE == 8 && PANEL == 16);

/// The wide kernel for a K-quant tile: 8-bit activations if it reads
/// them, 16-bit ones read as `$x16` otherwise.
macro_rules! by_width {
    ($tile:expr, $lanes:ty, $code:expr, $tokens:expr, $x16:expr) => {
        if $tile.bytes { wide::tile::<$lanes, { $code }, $tokens, { wide::X8 }>($tile) } else { wide::tile::<$lanes, { $code }, $tokens, { $x16 }>($tile) }
    };
}

/// Independent accumulator chains per token for a tile of `nt` tokens:
/// enough that about four multiply-adds are in flight.
const fn chains(nt: usize) -> usize {
    match nt {
        1 => 4,
        2 | 3 => 2,
        _ => 1,
    }
}

// ---------------------------------------------------------------- AVX-512

/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI; `tile` must be valid.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
pub(crate) unsafe fn tile_avx512(tile: &Tile) {
    unsafe {
        match tile.format {
            WeightFormat::F32 => by_tokens!(tile.nt, f32_512(tile)),
            WeightFormat::Q4_0 => wide::tile::<wide::Avx512, { wide::Q4_0 }, WIDE_TOKENS_512, { wide::SPLIT }>(tile),
            WeightFormat::Q4_1 => wide::tile::<wide::Avx512, { wide::Q4_1 }, WIDE_TOKENS_512, { wide::SPLIT }>(tile),
            WeightFormat::Q8_0 => by_tokens!(tile.nt, q8_0_512(tile)),
            WeightFormat::Q5_0 => wide::tile::<wide::Avx512, { wide::Q5_0 }, WIDE_TOKENS_512, { wide::SPLIT }>(tile),
            WeightFormat::Q4_K => by_width!(tile, wide::Avx512, wide::Q4_K, WIDE_TOKENS_512, wide::SPLIT),
            WeightFormat::Q5_K => by_width!(tile, wide::Avx512, wide::Q5_K, WIDE_TOKENS_512, wide::SPLIT),
            WeightFormat::Q6_K => by_width!(tile, wide::Avx512, wide::Q6_K, WIDE_TOKENS_512, wide::SPLIT),
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn store_512(tile: &Tile, t: usize, v: __m512) {
    unsafe {
        let dst = tile.out.add(t * tile.ld);
        if tile.lanes == PANEL {
            _mm512_storeu_ps(dst, v);
        } else {
            _mm512_mask_storeu_ps(dst, ((1u32 << tile.lanes) - 1) as u16, v);
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn q8_0_512<const NT: usize>(tile: &Tile) {
    unsafe {
        let x = &tile.x.quantized;
        let blocks = tile.blocks();
        let quant_bytes = 512;
        let panel = tile.panel.as_ptr();
        let d_at = tile.scales_at(0);
        let mut acc = [_mm512_setzero_ps(); NT];
        for b in 0..blocks {
            let q = panel.add(b * quant_bytes);
            // Decode streams weights from memory once: fetch a few blocks
            // ahead, the hardware prefetcher alone falls behind.
            if NT <= 2 {
                tile.layout.prefetch_lines(panel, b, |at| _mm_prefetch::<_MM_HINT_T1>(panel.wrapping_add(at).cast()));
            }
            // Activation pairs of each token for this block, as i32.
            let xp: [*const i32; NT] = std::array::from_fn(|t| x.qs.as_ptr().add(((tile.t0 + t) * blocks + b) * QK).cast());
            // Integer sums are exact in any order: split each token's sum
            // over independent registers so short tiles (decode) are not one
            // long chain of dependent multiply-adds.
            let mut isum = [[_mm512_setzero_si512(); 4]; NT];
            let chains = chains(NT);
            for g in 0..8 {
                let v = _mm512_loadu_si512(q.add(g * 64).cast());
                let lo = _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(v));
                let hi = _mm512_srai_epi16::<8>(v);
                let (c0, c1) = ((2 * g) % chains, (2 * g + 1) % chains);
                for t in 0..NT {
                    isum[t][c0] = _mm512_dpwssd_epi32(isum[t][c0], lo, _mm512_set1_epi32(*xp[t].add(g)));
                    isum[t][c1] = _mm512_dpwssd_epi32(isum[t][c1], hi, _mm512_set1_epi32(*xp[t].add(g + 8)));
                }
            }
            let isum: [__m512i; NT] = std::array::from_fn(|t| {
                let [a, b, c, d] = isum[t];
                _mm512_add_epi32(_mm512_add_epi32(a, b), _mm512_add_epi32(c, d))
            });
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(panel.add(d_at + b * 32).cast()));
            for t in 0..NT {
                let xb = (tile.t0 + t) * blocks + b;
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(x.d[xb]));
                acc[t] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum[t]), acc[t]);
            }
        }
        for (t, v) in acc.into_iter().enumerate() {
            store_512(tile, t, v);
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn f32_512<const NT: usize>(tile: &Tile) {
    unsafe {
        let w = tile.panel.as_ptr().cast::<f32>();
        let xs: [*const f32; NT] = std::array::from_fn(|t| tile.x.values.as_ptr().add((tile.t0 + t) * tile.cols));
        let mut acc = [_mm512_setzero_ps(); NT];
        for k in 0..tile.cols {
            let wk = _mm512_loadu_ps(w.add(k * PANEL));
            for t in 0..NT {
                acc[t] = _mm512_fmadd_ps(wk, _mm512_set1_ps(*xs[t].add(k)), acc[t]);
            }
        }
        for (t, v) in acc.into_iter().enumerate() {
            store_512(tile, t, v);
        }
    }
}

// ---------------------------------------------------------------- AVX2

/// Every quantized format runs the generic kernel of `wide.rs`; f32
/// weights their own kernel below.
///
/// # Safety
/// The CPU must support AVX2 and F16C; `tile` must be valid.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_avx2(tile: &Tile) {
    // All 16 rows of a panel in one pass: decode streams each cache line of
    // weights once, and prefill measured faster this way than in two
    // passes of 8 rows with twice the tokens per pass.
    unsafe {
        macro_rules! wide {
            ($code:expr) => {
                wide::tile::<wide::Avx2x2, { $code }, WIDE_TOKENS_256, { wide::X16 }>(tile)
            };
        }
        match tile.format {
            WeightFormat::Q4_0 => wide!(wide::Q4_0),
            WeightFormat::Q4_1 => wide!(wide::Q4_1),
            WeightFormat::Q8_0 => wide!(wide::Q8_0),
            WeightFormat::Q5_0 => wide!(wide::Q5_0),
            WeightFormat::Q4_K => by_width!(tile, wide::Avx2x2, wide::Q4_K, WIDE_TOKENS_256, wide::X16),
            WeightFormat::Q5_K => by_width!(tile, wide::Avx2x2, wide::Q5_K, WIDE_TOKENS_256, wide::X16),
            WeightFormat::Q6_K => by_width!(tile, wide::Avx2x2, wide::Q6_K, WIDE_TOKENS_256, wide::X16),
            WeightFormat::F32 => f32_avx2(tile),
        }
    }
}

/// f32 weights, 8 rows × up to 4 tokens at a time.
///
/// # Safety
/// As [`tile_avx2`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_avx2(tile: &Tile) {
    // Eight ymm accumulators per half panel at most: split larger tiles.
    let mut t0 = 0;
    while t0 < tile.nt {
        let nt = (tile.nt - t0).min(4);
        let sub = Tile { t0: tile.t0 + t0, nt, out: unsafe { tile.out.add(t0 * tile.ld) }, ..*tile };
        unsafe {
            match nt {
                1 => f32_256::<1>(&sub),
                2 => f32_256::<2>(&sub),
                3 => f32_256::<3>(&sub),
                _ => f32_256::<4>(&sub),
            }
        }
        t0 += nt;
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_256(tile: &Tile, t: usize, halves: [__m256; 2]) {
    let mut acc = [0.0f32; PANEL];
    unsafe {
        _mm256_storeu_ps(acc.as_mut_ptr(), halves[0]);
        _mm256_storeu_ps(acc.as_mut_ptr().add(8), halves[1]);
        tile.store(t, &acc);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_256<const NT: usize>(tile: &Tile) {
    unsafe {
        let w = tile.panel.as_ptr().cast::<f32>();
        let xs: [*const f32; NT] = std::array::from_fn(|t| tile.x.values.as_ptr().add((tile.t0 + t) * tile.cols));
        let mut acc = [[_mm256_setzero_ps(); 2]; NT];
        for k in 0..tile.cols {
            let w0 = _mm256_loadu_ps(w.add(k * PANEL));
            let w1 = _mm256_loadu_ps(w.add(k * PANEL + 8));
            for t in 0..NT {
                let xk = _mm256_set1_ps(*xs[t].add(k));
                acc[t][0] = _mm256_fmadd_ps(w0, xk, acc[t][0]);
                acc[t][1] = _mm256_fmadd_ps(w1, xk, acc[t][1]);
            }
        }
        for (t, halves) in acc.into_iter().enumerate() {
            store_256(tile, t, halves);
        }
    }
}

// ---------------------------------------------------------- quantization

/// `quant::quantize_blocks` with AVX-512: the same operations per lane.
///
/// # Safety
/// The CPU must support AVX-512 F/BW; slices as `quantize_blocks` requires.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub(crate) unsafe fn quantize_blocks_avx512<Q: ActivationQuant>(x: &[f32], d: &mut [f32], isum: &mut [i32], s: &mut [f32], qs: &mut [Q], split: &mut [u8]) {
    unsafe {
        let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
        let (lo, hi) = (_mm512_set1_epi32(-Q::MAX), _mm512_set1_epi32(Q::MAX));
        for (b, (src, q)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
            let v0 = _mm512_loadu_ps(src.as_ptr());
            let v1 = _mm512_loadu_ps(src.as_ptr().add(16));
            let a0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v0), abs_mask));
            let a1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v1), abs_mask));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
            let scale = amax / Q::MAX as f32;
            let id = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let (idv, round, bits) = (_mm512_set1_ps(id), _mm512_set1_ps(ROUND), _mm512_set1_epi32(ROUND_BITS));
            let quant = |v: __m512| {
                let r = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(_mm512_mul_ps(v, idv), round)), bits);
                _mm512_min_epi32(_mm512_max_epi32(r, lo), hi)
            };
            let (q0, q1) = (quant(v0), quant(v1));
            // The low bytes of 16 columns, interleaved m, m + 8 (`i8::slot`).
            let slots = |v: __m512i| {
                let b = _mm512_cvtepi32_epi8(v);
                _mm_unpacklo_epi8(b, _mm_srli_si128::<8>(b))
            };
            if size_of::<Q>() == 2 {
                _mm256_storeu_si256(q.as_mut_ptr().cast(), _mm512_cvtepi32_epi16(q0));
                _mm256_storeu_si256(q.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi16(q1));
                if let Some(out) = split.get_mut(b * 2 * QK..(b + 1) * 2 * QK) {
                    let p = out.as_mut_ptr();
                    _mm_storeu_si128(p.cast(), slots(q0));
                    _mm_storeu_si128(p.add(16).cast(), slots(q1));
                    _mm_storeu_si128(p.add(32).cast(), slots(_mm512_srai_epi32::<8>(q0)));
                    _mm_storeu_si128(p.add(48).cast(), slots(_mm512_srai_epi32::<8>(q1)));
                }
            } else {
                _mm_storeu_si128(q.as_mut_ptr().cast(), slots(q0));
                _mm_storeu_si128(q.as_mut_ptr().add(16).cast(), slots(q1));
            }
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            d[b] = scale;
            isum[b] = sum;
            s[b] = scale * sum as f32;
        }
    }
}

/// `quant::quantize_blocks` with AVX2: the same operations per lane.
///
/// # Safety
/// The CPU must support AVX2; slices as `quantize_blocks` requires.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_blocks_avx2<Q: ActivationQuant>(x: &[f32], d: &mut [f32], isum: &mut [i32], s: &mut [f32], qs: &mut [Q]) {
    unsafe {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let (lo, hi) = (_mm256_set1_epi32(-Q::MAX), _mm256_set1_epi32(Q::MAX));
        for (b, (src, q)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(src.as_ptr().add(8 * i)));
            let a = v.map(|v| _mm256_and_ps(v, abs_mask));
            let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
            let scale = _mm_cvtss_f32(m) / Q::MAX as f32;
            let id = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let (idv, round, bits) = (_mm256_set1_ps(id), _mm256_set1_ps(ROUND), _mm256_set1_epi32(ROUND_BITS));
            let r = v.map(|v| {
                let r = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_mul_ps(v, idv), round)), bits);
                _mm256_min_epi32(_mm256_max_epi32(r, lo), hi)
            });
            let mut ints = [0i32; QK];
            for (i, r) in r.iter().enumerate() {
                _mm256_storeu_si256(ints.as_mut_ptr().add(8 * i).cast(), *r);
            }
            let mut sum = 0i32;
            for (c, &v) in ints.iter().enumerate() {
                q[Q::slot(c)] = Q::narrow(v);
                sum += v;
            }
            d[b] = scale;
            isum[b] = sum;
            s[b] = scale * sum as f32;
        }
    }
}
