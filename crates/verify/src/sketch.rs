//! TOPLOC-style sketches of hidden states (Prime Intellect, arXiv
//! 2501.16007), with a sign check TOPLOC lacks.
//!
//! For a chunk of positions, take the `k` entries of largest magnitude of
//! the flattened `rows × dim` outputs (index `i`, value as bf16 bits `v`);
//! find the largest modulus `m ≤ P` under which all `i mod m` differ;
//! interpolate the polynomial of degree `< k` through the points
//! `(i mod m, v)` over GF(P), P = 65497; store `m` and the `k` coefficients:
//! `2 + 2k` bytes. A checker recomputes the chunk, takes its own top `k`,
//! evaluates the polynomial at its indices and compares bf16 exponents,
//! mantissas and signs.

/// The prime field of the polynomial: the largest prime below 2^16 - 38,
/// so that every finite bf16 bit pattern (< 0xFF80) is a field element.
pub const P: u32 = 65_497;
/// Top entries per sketch.
pub const K: usize = 128;
/// Positions per decode chunk.
pub const CHUNK: usize = 32;

fn mul(a: u32, b: u32) -> u32 {
    ((u64::from(a) * u64::from(b)) % u64::from(P)) as u32
}

fn sub(a: u32, b: u32) -> u32 {
    (a + P - b) % P
}

#[cfg(test)]
fn pow(mut base: u32, mut exp: u32) -> u32 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

/// The inverse of `a ≠ 0` in GF(P), from a table built once
/// (`inv(i) = −⌊P/i⌋ · inv(P mod i)`): interpolation needs one inverse per
/// pair of points, and the table makes sketching cheap enough to run on
/// every step.
fn inv(a: u32) -> u32 {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = vec![0u16; P as usize];
        t[1] = 1;
        for i in 2..P {
            t[i as usize] = mul(P - P / i, u32::from(t[(P % i) as usize])) as u16;
        }
        t
    });
    u32::from(table[(a % P) as usize])
}

/// The bf16 bit pattern of `v` (round to nearest even, like `half`).
pub fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// A committed sketch of one chunk of a span's outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sketch {
    /// First position of the chunk.
    pub start: u32,
    pub rows: u32,
    pub modulus: u16,
    /// Coefficients, lowest degree first.
    pub coeffs: Vec<u16>,
}

/// How a recomputed chunk compares with a sketch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SketchCheck {
    pub entries: usize,
    pub exponent_mismatches: usize,
    pub sign_mismatches: usize,
    pub mantissa_mean: f32,
    pub mantissa_median: f32,
}

/// TOPLOC's published thresholds, plus: no sign may flip.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SketchThresholds {
    pub max_exponent_mismatches: usize,
    pub max_mantissa_mean: f32,
    pub max_mantissa_median: f32,
    pub max_sign_mismatches: usize,
}

impl Default for SketchThresholds {
    fn default() -> Self {
        Self { max_exponent_mismatches: 37, max_mantissa_mean: 10.0, max_mantissa_median: 8.0, max_sign_mismatches: 0 }
    }
}

impl SketchCheck {
    pub fn passes(&self, t: &SketchThresholds) -> bool {
        self.exponent_mismatches <= t.max_exponent_mismatches
            && self.mantissa_mean <= t.max_mantissa_mean
            && self.mantissa_median <= t.max_mantissa_median
            && self.sign_mismatches <= t.max_sign_mismatches
    }
}

/// Indices of the `k` entries of largest magnitude (ties: lower index).
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let by = |a: &usize, b: &usize| values[*b].abs().total_cmp(&values[*a].abs()).then(a.cmp(b));
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by);
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

/// The largest modulus `≤ P` under which all indices differ.
fn modulus_for(indices: &[usize]) -> u32 {
    let mut m = P;
    loop {
        let mut seen: Vec<u32> = indices.iter().map(|&i| (i as u64 % u64::from(m)) as u32).collect();
        seen.sort_unstable();
        if seen.windows(2).all(|w| w[0] != w[1]) {
            return m;
        }
        m -= 1;
    }
}

/// Coefficients of the polynomial through `points` (Newton's form,
/// then expanded).
fn interpolate(points: &[(u32, u32)]) -> Vec<u32> {
    let n = points.len();
    let xs: Vec<u32> = points.iter().map(|p| p.0).collect();
    let mut dd: Vec<u32> = points.iter().map(|p| p.1).collect();
    for level in 1..n {
        for i in (level..n).rev() {
            dd[i] = mul(sub(dd[i], dd[i - 1]), inv(sub(xs[i], xs[i - level])));
        }
    }
    // Horner on Newton's form: p(x) = dd0 + (x - x0)(dd1 + (x - x1)(...)).
    let mut coeffs = vec![0u32; n];
    for i in (0..n).rev() {
        // coeffs = coeffs * (x - x_i) + dd_i
        let mut next = vec![0u32; n];
        for (d, &c) in coeffs.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if d + 1 < n {
                next[d + 1] = (next[d + 1] + c) % P;
            }
            next[d] = sub(next[d], mul(c, xs[i]));
        }
        next[0] = (next[0] + dd[i]) % P;
        coeffs = next;
    }
    coeffs
}

fn evaluate(coeffs: &[u16], x: u32) -> u32 {
    coeffs.iter().rev().fold(0u32, |acc, &c| (mul(acc, x) + u32::from(c)) % P)
}

impl Sketch {
    /// The sketch of `values` (`rows × dim` outputs of positions
    /// `start .. start + rows`).
    pub fn of(start: u32, rows: u32, values: &[f32]) -> Self {
        let indices = top_indices(values, K);
        let m = modulus_for(&indices);
        let points: Vec<(u32, u32)> = indices.iter().map(|&i| ((i as u64 % u64::from(m)) as u32, u32::from(bf16_bits(values[i])).min(P - 1))).collect();
        let coeffs = interpolate(&points).into_iter().map(|c| c as u16).collect();
        Self { start, rows, modulus: m as u16, coeffs }
    }

    /// Compares recomputed outputs of the same positions with the sketch.
    pub fn check(&self, values: &[f32]) -> SketchCheck {
        let indices = top_indices(values, self.coeffs.len());
        let m = u64::from(self.modulus.max(1));
        let (mut exponent_mismatches, mut sign_mismatches) = (0, 0);
        let mut mantissa: Vec<f32> = Vec::with_capacity(indices.len());
        for &i in &indices {
            let claimed = evaluate(&self.coeffs, (i as u64 % m) as u32) as u16;
            let own = bf16_bits(values[i]);
            if (claimed >> 15) != (own >> 15) {
                sign_mismatches += 1;
            }
            if (claimed >> 7) & 0xFF != (own >> 7) & 0xFF {
                exponent_mismatches += 1;
            } else {
                mantissa.push(f32::from(((claimed & 0x7F) as i16 - (own & 0x7F) as i16).unsigned_abs()));
            }
        }
        mantissa.sort_by(f32::total_cmp);
        let mantissa_mean = if mantissa.is_empty() { 0.0 } else { mantissa.iter().sum::<f32>() / mantissa.len() as f32 };
        let mantissa_median = mantissa.get(mantissa.len() / 2).copied().unwrap_or(0.0);
        SketchCheck { entries: indices.len(), exponent_mismatches, sign_mismatches, mantissa_mean, mantissa_median }
    }

    /// `start u32 · rows u32 · modulus u16 · k u16 · coefficients u16…`, LE.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + 2 * self.coeffs.len());
        out.extend_from_slice(&self.start.to_le_bytes());
        out.extend_from_slice(&self.rows.to_le_bytes());
        out.extend_from_slice(&self.modulus.to_le_bytes());
        out.extend_from_slice(&(self.coeffs.len() as u16).to_le_bytes());
        for c in &self.coeffs {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let (start, rows, modulus, k) = (u32_at(0)?, u32_at(4)?, u16_at(8)?, usize::from(u16_at(10)?));
        if bytes.len() != 12 + 2 * k || k > 4 * K || modulus == 0 {
            return None;
        }
        let coeffs = (0..k).map(|i| u16_at(12 + 2 * i)).collect::<Option<Vec<_>>>()?;
        Some(Self { start, rows, modulus, coeffs })
    }

    /// Bytes this sketch adds per position.
    pub fn bytes_per_position(&self) -> f32 {
        (2 + 2 * self.coeffs.len()) as f32 / self.rows.max(1) as f32
    }
}

/// Builds a node's sketches as steps come in: the first step (the prompt)
/// is one chunk; decode positions are sketched 32 at a time.
#[derive(Debug, Default)]
pub struct SketchBuilder {
    pending_start: u32,
    pending: Vec<f32>,
    pending_rows: u32,
}

impl SketchBuilder {
    /// Adds the outputs of positions `start .. start + rows` and returns the
    /// sketches they complete.
    pub fn push(&mut self, start: u32, rows: u32, values: &[f32]) -> Vec<Sketch> {
        if start == 0 || rows as usize >= CHUNK {
            // A prompt (or any long step) is its own chunk.
            let mut out = self.flush();
            out.push(Sketch::of(start, rows, values));
            return out;
        }
        if self.pending_rows == 0 {
            self.pending_start = start;
        }
        self.pending.extend_from_slice(values);
        self.pending_rows += rows;
        if self.pending_rows as usize >= CHUNK { self.flush() } else { Vec::new() }
    }

    /// Forgets pending positions from `len` on (the session rolled back).
    pub fn truncate(&mut self, len: u32) {
        if len <= self.pending_start {
            self.pending.clear();
            self.pending_rows = 0;
        } else if len < self.pending_start + self.pending_rows {
            let keep = len - self.pending_start;
            self.pending.truncate(self.pending.len() / self.pending_rows as usize * keep as usize);
            self.pending_rows = keep;
        }
    }

    /// The sketch of whatever is pending (at the end of a session).
    pub fn flush(&mut self) -> Vec<Sketch> {
        if self.pending_rows == 0 {
            return Vec::new();
        }
        let sketch = Sketch::of(self.pending_start, self.pending_rows, &self.pending);
        self.pending.clear();
        self.pending_rows = 0;
        vec![sketch]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: u32, n: usize) -> Vec<f32> {
        (0..n).map(|i| ((((i as u32) ^ seed.wrapping_mul(0x9e37_79b9)).wrapping_mul(2_654_435_761) >> 8) % 2001) as f32 / 100.0 - 10.0).collect()
    }

    #[test]
    fn field_arithmetic() {
        for a in [1, 2, 1234, 40_000, P - 1] {
            assert_eq!(mul(inv(a), a), 1, "{a}");
            assert_eq!(inv(a), pow(a, P - 2));
        }
        let points = [(1, 5), (2, 11), (7, 3), (100, 60_000)];
        let c: Vec<u16> = interpolate(&points).into_iter().map(|c| c as u16).collect();
        for (x, y) in points {
            assert_eq!(evaluate(&c, x), y);
        }
    }

    #[test]
    fn an_honest_recomputation_matches_exactly() {
        let v = values(1, 32 * 576);
        let s = Sketch::of(0, 32, &v);
        let check = s.check(&v);
        assert_eq!((check.entries, check.exponent_mismatches, check.sign_mismatches), (K, 0, 0));
        assert_eq!((check.mantissa_mean, check.mantissa_median), (0.0, 0.0));
        assert!(check.passes(&SketchThresholds::default()));
        assert!(s.bytes_per_position() <= 16.0, "{}", s.bytes_per_position());
        assert_eq!(Sketch::from_bytes(&s.to_bytes()), Some(s));
    }

    #[test]
    fn tiny_honest_noise_passes_and_other_values_fail() {
        let v = values(2, 32 * 576);
        let s = Sketch::of(0, 32, &v);
        let close: Vec<f32> = v.iter().map(|x| x * (1.0 + 1e-4)).collect();
        assert!(s.check(&close).passes(&SketchThresholds::default()));
        let other = values(3, 32 * 576);
        let check = s.check(&other);
        assert!(!check.passes(&SketchThresholds::default()), "{check:?}");
        let flipped: Vec<f32> = v.iter().map(|x| -x).collect();
        assert_eq!(s.check(&flipped).sign_mismatches, K);
    }

    #[test]
    fn indices_beyond_the_field_get_a_smaller_modulus() {
        let v = values(4, 70_000);
        let s = Sketch::of(0, 1, &v);
        assert!(s.check(&v).passes(&SketchThresholds::default()));
    }

    #[test]
    fn malformed_bytes_are_refused() {
        assert_eq!(Sketch::from_bytes(&[1, 2, 3]), None);
        let mut bytes = Sketch::of(0, 1, &values(5, 64)).to_bytes();
        bytes.pop();
        assert_eq!(Sketch::from_bytes(&bytes), None);
    }

    #[test]
    fn builder_chunks_prompt_and_decode() {
        let mut b = SketchBuilder::default();
        assert_eq!(b.push(0, 5, &values(1, 5 * 8)).len(), 1);
        let mut made = 0;
        for pos in 5..5 + 70 {
            made += b.push(pos, 1, &values(pos, 8)).len();
        }
        assert_eq!(made, 2);
        let rest = b.flush();
        assert_eq!((rest.len(), rest[0].start, rest[0].rows), (1, 69, 6));
    }
}
