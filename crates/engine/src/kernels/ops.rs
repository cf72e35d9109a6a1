//! The per-token operations around the matrix products: RMS norm, rotary
//! embeddings, attention, SwiGLU.
//!
//! All of them are written with a fixed evaluation order (explicit 16-lane
//! accumulators, fixed reduction trees, our own `exp` built from multiplies
//! and adds), so that they give the same bits whatever vector width the
//! compiler picks and whichever CPU runs them.

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
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    if x.is_nan() {
        return x;
    }
    let x = x.clamp(-87.3, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = (p * (r * r) + r) + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
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
        let half = dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for pos in positions {
            for i in 0..half {
                let theta = f64::from(base).powf(-2.0 * i as f64 / dim as f64);
                let angle = pos as f64 * theta;
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

multiversion! {
/// Causal attention of one query head over `keys.len() / head_dim` cached
/// positions: softmax(q·K / √d) · V, written to `out`. `scores` is scratch.
pub fn attend(q: &[f32], keys: &[f32], values: &[f32], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    let head_dim = q.len();
    scores.clear();
    scores.extend(keys.chunks_exact(head_dim).map(|k| dot(q, k) * scale));
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = exp(*s - max);
        sum += *s;
    }
    out.fill(0.0);
    for (&p, v) in scores.iter().zip(values.chunks_exact(head_dim)) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p * x;
        }
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
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
        let k = [0.1f32; 8];
        let v: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let mut out = [0.0f32; 8];
        attend(Isa::Scalar, &q, &k, &v, 0.5, &mut Vec::new(), &mut out);
        assert_eq!(out.to_vec(), v);
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
