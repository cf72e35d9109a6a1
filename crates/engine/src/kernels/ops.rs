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
