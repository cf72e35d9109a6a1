//! The per-token operations around the matrix products: RMS norm, rotary
//! embeddings, attention, SwiGLU.
//!
//! All of them are written with a fixed evaluation order (explicit 16-lane
//! accumulators, fixed reduction trees, explicit `mul_add` where a fused
//! multiply-add is meant, our own `exp`), so that they give the same bits
//! whatever vector width the compiler picks and whichever CPU runs them.

use super::quant::{ROUND, ROUND_BITS, max as fmax};

/// Width of the explicit accumulators.
const LANES: usize = 16;

#[inline(always)]
fn reduce(mut v: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            v[i] += v[i + width];
        }
        width /= 2;
    }
    v[0]
}

/// `Σ a[i]·b[i]` in a fixed order.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let (ca, ta) = a.as_chunks::<LANES>();
    let (cb, tb) = b.as_chunks::<LANES>();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ta.iter().zip(tb) {
        tail += x * y;
    }
    reduce(acc) + tail
}

/// `e^x` in single precision from multiplies and adds only (Cody–Waite
/// reduction and a degree-7 polynomial; error ≤ 2 ulp), identical on every
/// CPU. Underflows to 0 below −87.3 and saturates above 88.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    if x.is_nan() {
        return x;
    }
    let x = x.clamp(-87.3, 88.0);
    // Adding ROUND (1.5 · 2^23) rounds to an integer.
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // The integer `n` from the low bits of `shifted` (|n| ≤ 127): the same
    // value as `n as i32`, whose NaN and saturation rules keep the loops
    // that call `exp` from vectorizing.
    let n_int = shifted.to_bits() as i32 - ROUND_BITS;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = (p * (r * r) + r) + 1.0;
    let bits = ((n_int + 127) as u32) << 23;
    if x <= -87.3 { 0.0 } else { y * f32::from_bits(bits) }
}

multiversion! {
/// `out = x / rms(x) · weight`, row by row (`x` holds rows of `weight.len()`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (row, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let sum_sq = dot(row, row);
        let scale = 1.0 / (sum_sq / dim as f32 + eps).sqrt();
        for ((o, &v), &w) in dst.iter_mut().zip(row).zip(weight) {
            *o = (v * scale) * w;
        }
    }
}
}

multiversion! {
/// [`rms_norm`] in place: each row of `x` (rows of `weight.len()`)
/// becomes `row / rms(row) · weight` (per-head query and key norms,
/// post-norms).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for row in x.chunks_exact_mut(dim) {
        let sum_sq = dot(row, row);
        let scale = 1.0 / (sum_sq / dim as f32 + eps).sqrt();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = (*v * scale) * w;
        }
    }
}
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

multiversion! {
/// The wrapping sum of `data`, read as fast as this CPU reads memory: the
/// way decode streams weights (four cache lines per step into independent
/// wide accumulators, the lines `matrix::PREFETCH_BYTES` ahead asked for).
/// `hotpot bench --bandwidth` times it to measure the bound on decode.
pub fn stream_sum(data: &[u64]) -> u64 {
    const STEP: usize = 32; // u64s: four cache lines
    let mut acc = [0u64; STEP];
    // Whole cache lines: an unaligned vector load would touch two.
    let (head, body) = data.split_at(data.as_ptr().align_offset(64).min(data.len()));
    let chunks = body.chunks_exact(STEP);
    let rest = head.iter().chain(chunks.remainder()).fold(0u64, |a, &v| a.wrapping_add(v));
    for chunk in chunks {
        #[cfg(target_arch = "x86_64")]
        for line in 0..4 {
            let ahead = chunk.as_ptr().cast::<u8>().wrapping_add(super::matrix::PREFETCH_BYTES + line * 64);
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(ahead.cast()) };
        }
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.wrapping_add(v);
        }
    }
    acc.iter().fold(rest, |a, &v| a.wrapping_add(v))
}
}

multiversion! {
/// SwiGLU: `out[i] = silu(gate[i]) · up[i]` for rows laid out as
/// `[gate (ffn) | up (ffn)]`.
pub fn swiglu(gate_up: &[f32], ffn: usize, out: &mut [f32]) {
    for (row, dst) in gate_up.chunks_exact(2 * ffn).zip(out.chunks_exact_mut(ffn)) {
        let (gate, up) = row.split_at(ffn);
        for ((o, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
            *o = (g / (1.0 + exp(-g))) * u;
        }
    }
}
}

/// `tanh(x)` from our own [`exp`]: `1 − 2 / (e^{2x} + 1)`, saturating to
/// ±1, the same bits on every CPU.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// GELU, tanh approximation: `½x(1 + tanh(y))` with `y = √(2/π)(x +
/// 0.044715x³)`, computed as `x / (1 + e^{−2y})` (the same function,
/// without the cancellation of `1 + tanh` for negative `x`).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const TWO_SQRT_2_OVER_PI: f32 = 1.595_769;
    x / (1.0 + exp(-TWO_SQRT_2_OVER_PI * (x + 0.044_715 * (x * x * x))))
}

multiversion! {
/// GeGLU: `out[i] = gelu_tanh(gate[i]) · up[i]` for rows laid out as
/// `[gate (ffn) | up (ffn)]`.
pub fn geglu(gate_up: &[f32], ffn: usize, out: &mut [f32]) {
    for (row, dst) in gate_up.chunks_exact(2 * ffn).zip(out.chunks_exact_mut(ffn)) {
        let (gate, up) = row.split_at(ffn);
        for ((o, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
            *o = gelu_tanh(g) * u;
        }
    }
}
}

/// How rotary embeddings pair a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: GGUF llama (weights are pre-permuted).
    Interleaved,
    /// Halves `(i, i + d/2)`: GPT-NeoX, Qwen2.
    Halves,
}

/// Cosines and sines of `positions` for a rotary dimension `dim`, computed in
/// float64 and rounded once.
pub struct RopeTable {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(base: f32, dim: usize, positions: std::ops::Range<usize>) -> Self {
        Self::at(base, dim, &positions.collect::<Vec<_>>())
    }

    /// A table whose row `i` is position `positions[i]`.
    pub fn at(base: f32, dim: usize, positions: &[usize]) -> Self {
        Self::scaled(base, 1.0, dim, positions)
    }

    /// [`RopeTable::at`] with positions multiplied by `scale` (linear
    /// rotary scaling).
    pub fn scaled(base: f32, scale: f32, dim: usize, positions: &[usize]) -> Self {
        let half = dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            for i in 0..half {
                let theta = f64::from(base).powf(-2.0 * i as f64 / dim as f64);
                let angle = pos as f64 * f64::from(scale) * theta;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates one head vector at table row `row`.
    #[inline]
    pub fn apply(&self, style: RopeStyle, head: &mut [f32], row: usize) {
        let (cos, sin) = (&self.cos[row * self.half..][..self.half], &self.sin[row * self.half..][..self.half]);
        for i in 0..self.half {
            let (a, b) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + self.half),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// Positions per key panel of the KV cache.
pub const KEY_PANEL: usize = 16;

multiversion! {
/// Causal attention of one query head over the `values.len() / head_dim`
/// cached positions: softmax(q·K / √d) · V, written to `out`.
///
/// `keys` are in panels of [`KEY_PANEL`] positions (`[panel][dim][16]`), so
/// each score is one vector lane accumulated over the dimensions in order;
/// the first `masked` positions are left out (sliding windows); `scores`
/// is scratch.
#[expect(clippy::too_many_arguments, reason = "the kernel's inputs are separate slices; a struct would only rename them")]
pub fn attend(q: &[f32], keys: &[f32], values: &[f32], scale: f32, masked: usize, scores: &mut Vec<f32>, out: &mut [f32]) {
    let hd = q.len();
    // Common head sizes get code specialized for them, so the accumulators
    // live in registers; every size computes the same sequence.
    match hd {
        64 => score_keys::<64>(q, keys, scale, scores),
        128 => score_keys::<128>(q, keys, scale, scores),
        256 => score_keys::<256>(q, keys, scale, scores),
        _ => score_keys_any(q, keys, scale, scores),
    }
    scores.truncate(values.len() / hd);
    for s in scores.iter_mut().take(masked) {
        *s = f32::NEG_INFINITY;
    }
    let sum = softmax_numerators(scores);
    match hd {
        64 => mix_values::<64>(scores, values, sum, out),
        128 => mix_values::<128>(scores, values, sum, out),
        256 => mix_values::<256>(scores, values, sum, out),
        _ => mix_values_any(scores, values, sum, out),
    }
}
}

/// Query heads [`attend_heads`] runs together.
const HEADS_AT_ONCE: usize = 4;

multiversion! {
/// [`attend`] for query heads that share one key/value head: `qs` holds
/// them one after another (`hd` values each) and `out` gets their results
/// the same way. Each key and value is read once for up to
/// [`HEADS_AT_ONCE`] heads instead of once per head (prefill reads the
/// whole cache per query), and each head's result has [`attend`]'s bits:
/// every lane runs the same sequence of operations. `hd` must be a
/// multiple of 16.
#[expect(clippy::too_many_arguments, reason = "the kernel's inputs are separate slices; a struct would only rename them")]
pub fn attend_heads(qs: &[f32], hd: usize, keys: &[f32], values: &[f32], scale: f32, masked: usize, scores: &mut Vec<f32>, out: &mut [f32]) {
    debug_assert!(hd.is_multiple_of(LANES) && qs.len() == out.len());
    let heads = qs.len() / hd;
    let (padded, positions) = (keys.len() / hd, values.len() / hd);
    scores.clear();
    scores.resize(heads * padded, 0.0);
    let mut sums = [0.0f32; HEADS_AT_ONCE];
    for h in (0..heads).step_by(HEADS_AT_ONCE) {
        let n = (heads - h).min(HEADS_AT_ONCE);
        let (q, p) = (&qs[h * hd..(h + n) * hd], &mut scores[h * padded..(h + n) * padded]);
        match n {
            1 => score_heads::<1>(q, hd, keys, scale, p),
            2 => score_heads::<2>(q, hd, keys, scale, p),
            3 => score_heads::<3>(q, hd, keys, scale, p),
            _ => score_heads::<HEADS_AT_ONCE>(q, hd, keys, scale, p),
        }
        for (sum, row) in sums.iter_mut().zip(p.chunks_exact_mut(padded)) {
            let row = &mut row[..positions];
            row[..masked].fill(f32::NEG_INFINITY);
            *sum = softmax_numerators(row);
        }
        let dst = &mut out[h * hd..(h + n) * hd];
        match n {
            1 => mix_heads::<1>(p, positions, values, hd, &sums, dst),
            2 => mix_heads::<2>(p, positions, values, hd, &sums, dst),
            3 => mix_heads::<3>(p, positions, values, hd, &sums, dst),
            _ => mix_heads::<HEADS_AT_ONCE>(p, positions, values, hd, &sums, dst),
        }
    }
}
}

/// [`score_keys`] for `N` query heads (`q`: `N × hd`) at once, into `N`
/// rows of `scores`, one per head.
#[inline(always)]
fn score_heads<const N: usize>(q: &[f32], hd: usize, keys: &[f32], scale: f32, scores: &mut [f32]) {
    let padded = scores.len() / N;
    let q: [&[f32]; N] = std::array::from_fn(|g| &q[g * hd..][..hd]);
    for (panel, keys) in keys.chunks_exact(KEY_PANEL * hd).enumerate() {
        let mut acc = [[0.0f32; KEY_PANEL]; N];
        for (d, k) in keys.as_chunks::<KEY_PANEL>().0.iter().enumerate() {
            for (acc, q) in acc.iter_mut().zip(&q) {
                let qd = q[d];
                for l in 0..KEY_PANEL {
                    acc[l] = qd.mul_add(k[l], acc[l]);
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            for (s, a) in scores[g * padded + panel * KEY_PANEL..][..KEY_PANEL].iter_mut().zip(acc) {
                *s = a * scale;
            }
        }
    }
}

/// [`mix_values`] for `N` heads: `p` holds `N` rows of softmax numerators
/// (the first `positions` of each row), `sums` their sums; 16 dimensions
/// at a time, each value line read once for the `N` heads.
#[inline(always)]
fn mix_heads<const N: usize>(p: &[f32], positions: usize, values: &[f32], hd: usize, sums: &[f32; HEADS_AT_ONCE], out: &mut [f32]) {
    let padded = p.len() / N;
    for c in (0..hd).step_by(LANES) {
        let (mut even, mut odd) = ([[0.0f32; LANES]; N], [[0.0f32; LANES]; N]);
        let line = |j: usize| -> &[f32; LANES] { values[j * hd + c..][..LANES].try_into().expect("16 values") };
        for j in (0..positions & !1).step_by(2) {
            let (v0, v1) = (line(j), line(j + 1));
            for g in 0..N {
                let (p0, p1) = (p[g * padded + j], p[g * padded + j + 1]);
                for i in 0..LANES {
                    even[g][i] = p0.mul_add(v0[i], even[g][i]);
                    odd[g][i] = p1.mul_add(v1[i], odd[g][i]);
                }
            }
        }
        if positions % 2 == 1 {
            let (j, v) = (positions - 1, line(positions - 1));
            for g in 0..N {
                let pj = p[g * padded + j];
                for i in 0..LANES {
                    even[g][i] = pj.mul_add(v[i], even[g][i]);
                }
            }
        }
        for g in 0..N {
            let inv = 1.0 / sums[g];
            for (i, o) in out[g * hd + c..][..LANES].iter_mut().enumerate() {
                *o = (even[g][i] + odd[g][i]) * inv;
            }
        }
    }
}

/// Key panels scored together: independent accumulators hide the latency
/// of the multiply-adds (each lane's own sequence is unchanged).
const PANELS_AT_ONCE: usize = 4;

/// `scores = q·k · scale` for every position of every key panel (padding
/// positions included; the caller truncates).
#[inline(always)]
fn score_keys<const HD: usize>(q: &[f32], keys: &[f32], scale: f32, scores: &mut Vec<f32>) {
    let q: &[f32; HD] = q.try_into().expect("head size");
    scores.clear();
    let panel_len = KEY_PANEL * HD;
    let full = keys.len() / (panel_len * PANELS_AT_ONCE);
    for g in 0..full {
        let base = &keys[g * PANELS_AT_ONCE * panel_len..][..PANELS_AT_ONCE * panel_len];
        let mut acc = [[0.0f32; KEY_PANEL]; PANELS_AT_ONCE];
        for d in 0..HD {
            for (a, acc) in acc.iter_mut().enumerate() {
                let k = &base[a * panel_len + d * KEY_PANEL..][..KEY_PANEL];
                for l in 0..KEY_PANEL {
                    acc[l] = q[d].mul_add(k[l], acc[l]);
                }
            }
        }
        for acc in &acc {
            scores.extend(acc.iter().map(|s| s * scale));
        }
    }
    for panel in keys[full * PANELS_AT_ONCE * panel_len..].chunks_exact(panel_len) {
        let mut acc = [0.0f32; KEY_PANEL];
        for d in 0..HD {
            let k = &panel[d * KEY_PANEL..][..KEY_PANEL];
            for l in 0..KEY_PANEL {
                acc[l] = q[d].mul_add(k[l], acc[l]);
            }
        }
        scores.extend(acc.iter().map(|s| s * scale));
    }
}

/// [`score_keys`] for any head size, same arithmetic.
#[inline(always)]
fn score_keys_any(q: &[f32], keys: &[f32], scale: f32, scores: &mut Vec<f32>) {
    scores.clear();
    for panel in keys.chunks_exact(KEY_PANEL * q.len()) {
        let mut acc = [0.0f32; KEY_PANEL];
        for (d, &qd) in q.iter().enumerate() {
            let k = &panel[d * KEY_PANEL..][..KEY_PANEL];
            for l in 0..KEY_PANEL {
                acc[l] = qd.mul_add(k[l], acc[l]);
            }
        }
        scores.extend(acc.iter().map(|s| s * scale));
    }
}

/// Replaces scores by `exp(score - max)` and returns their sum.
#[inline(always)]
fn softmax_numerators(scores: &mut [f32]) -> f32 {
    let mut max = [f32::NEG_INFINITY; LANES];
    let (chunks, tail) = scores.as_chunks::<LANES>();
    for c in chunks {
        for i in 0..LANES {
            max[i] = fmax(max[i], c[i]);
        }
    }
    let max = tail.iter().fold(max.iter().fold(f32::NEG_INFINITY, |m, &v| fmax(m, v)), |m, &v| fmax(m, v));
    for s in scores.iter_mut() {
        *s = exp(*s - max);
    }
    let mut sum = [0.0f32; LANES];
    let (chunks, tail) = scores.as_chunks::<LANES>();
    for c in chunks {
        for i in 0..LANES {
            sum[i] += c[i];
        }
    }
    tail.iter().fold(reduce(sum), |s, &v| s + v)
}

/// `out = Σ_j p_j · v_j / sum`, positions summed in two interleaved
/// accumulators (even and odd positions) that are added at the end.
#[inline(always)]
fn mix_values<const HD: usize>(p: &[f32], values: &[f32], sum: f32, out: &mut [f32]) {
    let (mut even, mut odd) = ([0.0f32; HD], [0.0f32; HD]);
    let rows = values.as_chunks::<HD>().0;
    let (pairs, last) = p.as_chunks::<2>();
    for (pj, v) in pairs.iter().zip(rows.chunks_exact(2)) {
        for i in 0..HD {
            even[i] = pj[0].mul_add(v[0][i], even[i]);
            odd[i] = pj[1].mul_add(v[1][i], odd[i]);
        }
    }
    if let [pj] = last {
        let v = &rows[pairs.len() * 2];
        for i in 0..HD {
            even[i] = pj.mul_add(v[i], even[i]);
        }
    }
    let inv = 1.0 / sum;
    for i in 0..HD {
        out[i] = (even[i] + odd[i]) * inv;
    }
}

/// [`mix_values`] for any head size, same arithmetic.
#[inline(always)]
fn mix_values_any(p: &[f32], values: &[f32], sum: f32, out: &mut [f32]) {
    let hd = out.len();
    let mut acc = vec![0.0f32; 2 * hd];
    for (j, (&pj, v)) in p.iter().zip(values.chunks_exact(hd)).enumerate() {
        let a = &mut acc[(j % 2) * hd..][..hd];
        for (a, &x) in a.iter_mut().zip(v) {
            *a = pj.mul_add(x, *a);
        }
    }
    let inv = 1.0 / sum;
    for (i, o) in out.iter_mut().enumerate() {
        *o = (acc[i] + acc[hd + i]) * inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Isa;

    #[test]
    fn stream_sum_adds_every_element_at_any_alignment() {
        let data: Vec<u64> = (0..5000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        for isa in Isa::available() {
            for start in 0..9 {
                for len in [0, 1, 31, 32, 33, 200, 4991 - start] {
                    let part = &data[start..start + len];
                    let want = part.iter().fold(0u64, |a, &v| a.wrapping_add(v));
                    assert_eq!(stream_sum(isa, part), want, "{isa:?}, start {start}, len {len}");
                }
            }
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = f64::from(exp(x));
            let want = f64::from(x).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3.0 * f64::from(f32::EPSILON), "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(100.0).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_matches_float64() {
        let mut worst = 0.0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            let xd = f64::from(x);
            let want = 0.5 * xd * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd)).tanh());
            worst = worst.max((f64::from(gelu_tanh(x)) - want).abs() / want.abs().max(1e-3));
            x += 0.0071;
        }
        assert!(worst < 1e-5, "worst error {worst}");
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
    }

    #[test]
    fn rms_norm_normalizes() {
        let x = [3.0f32, -4.0, 0.0, 5.0, 1.0, -1.0, 2.0, 2.0];
        let mut out = [0.0f32; 4];
        rms_norm(Isa::Scalar, &x, &[1.0, 2.0, 1.0, 1.0], 0.0, &mut out);
        let rms = (50.0f32 / 4.0).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6 && (out[1] + 8.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn attention_over_one_position_returns_its_value() {
        let q = [0.3f32; 8];
        let k = [0.1f32; 8 * KEY_PANEL];
        let v: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let mut out = [0.0f32; 8];
        attend(Isa::Scalar, &q, &k, &v, 0.5, 0, &mut Vec::new(), &mut out);
        assert_eq!(out.to_vec(), v);
    }

    /// Attention against a float64 softmax, and every variant against scalar.
    #[test]
    fn attention_matches_float64_and_variants_agree() {
        for (hd, len) in [64, 128, 256, 48].into_iter().flat_map(|hd| [1usize, 15, 16, 17, 100, 200].map(|len| (hd, len))) {
            let q: Vec<f32> = (0..hd).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let keys: Vec<Vec<f32>> = (0..len).map(|j| (0..hd).map(|i| (((i + 3 * j) % 11) as f32 - 5.0) * 0.07).collect()).collect();
            let values: Vec<f32> = (0..len * hd).map(|i| ((i % 17) as f32 - 8.0) * 0.05).collect();
            let mut panels = vec![f32::NAN; len.next_multiple_of(KEY_PANEL) * hd];
            for (j, k) in keys.iter().enumerate() {
                for (d, &v) in k.iter().enumerate() {
                    panels[j / KEY_PANEL * KEY_PANEL * hd + d * KEY_PANEL + j % KEY_PANEL] = v;
                }
            }
            // Padding positions hold NaN: they must not leak into the result.
            let run = |isa| {
                let mut out = vec![0.0f32; hd];
                attend(isa, &q, &panels, &values, 0.125, 0, &mut Vec::new(), &mut out);
                out
            };
            let reference = run(Isa::Scalar);
            let scores: Vec<f64> = keys.iter().map(|k| k.iter().zip(&q).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() * 0.125).collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for i in 0..hd {
                let want: f64 = (0..len).map(|j| e[j] / total * f64::from(values[j * hd + i])).sum();
                assert!((f64::from(reference[i]) - want).abs() < 1e-5, "head {hd} len {len} dim {i}");
            }
            for isa in Isa::available() {
                assert_eq!(
                    run(isa).iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{isa:?} len {len}"
                );
            }
            // The code specialized for a head size computes what the
            // general code does.
            if hd == 64 || hd == 256 {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                if hd == 64 {
                    score_keys::<64>(&q, &panels, 0.125, &mut a);
                } else {
                    score_keys::<256>(&q, &panels, 0.125, &mut a);
                }
                score_keys_any(&q, &panels, 0.125, &mut b);
                assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                a.truncate(len);
                let sum = softmax_numerators(&mut a);
                let (mut x, mut y) = (vec![0.0; hd], vec![0.0; hd]);
                if hd == 64 {
                    mix_values::<64>(&a, &values, sum, &mut x);
                } else {
                    mix_values::<256>(&a, &values, sum, &mut x);
                }
                mix_values_any(&a, &values, sum, &mut y);
                assert_eq!(x, y);
            }
        }
    }

    /// Heads run together give each head's [`attend`] bits, on every
    /// variant, with and without masked positions.
    #[test]
    fn grouped_heads_match_one_head_at_a_time() {
        for (hd, len, heads, masked) in [(64usize, 1usize, 3usize, 0usize), (64, 37, 6, 5), (256, 100, 4, 0), (128, 33, 7, 16), (16, 16, 2, 3), (256, 17, 1, 0)]
        {
            let qs: Vec<f32> = (0..heads * hd).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.05).collect();
            let padded = len.next_multiple_of(KEY_PANEL);
            let keys: Vec<f32> = (0..padded * hd)
                .map(|i| if i / (KEY_PANEL * hd) * KEY_PANEL + i % KEY_PANEL < len { ((i * 5 % 11) as f32 - 5.0) * 0.07 } else { f32::NAN })
                .collect();
            let values: Vec<f32> = (0..len * hd).map(|i| ((i % 17) as f32 - 8.0) * 0.05).collect();
            for isa in Isa::available() {
                let mut one = vec![0.0f32; heads * hd];
                for (q, o) in qs.chunks_exact(hd).zip(one.chunks_exact_mut(hd)) {
                    attend(isa, q, &keys, &values, 0.125, masked, &mut Vec::new(), o);
                }
                let mut all = vec![f32::NAN; heads * hd];
                attend_heads(isa, &qs, hd, &keys, &values, 0.125, masked, &mut Vec::new(), &mut all);
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&all), bits(&one), "{isa:?} hd {hd} len {len} heads {heads} masked {masked}");
            }
        }
    }

    #[test]
    fn rope_preserves_norms() {
        let table = RopeTable::new(10000.0, 8, 5..7);
        for style in [RopeStyle::Interleaved, RopeStyle::Halves] {
            let mut head = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
            let before = dot(&head, &head);
            table.apply(style, &mut head, 1);
            assert!((dot(&head, &head) - before).abs() < 1e-3);
        }
    }
}
