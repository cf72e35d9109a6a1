//! Choosing the next token from logits, on the gateway side.
//!
//! The chain follows llama.cpp's order: repetition penalties, top-k, top-p,
//! min-p, temperature, then a draw from a ChaCha20 generator seeded by the
//! request, so the same seed and the same logits give the same tokens.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// How to pick tokens. The defaults are llama.cpp's.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) picks the most likely token every time.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of likely tokens whose mass reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Seed of the random draw; `None` draws a seed from the OS.
    pub seed: Option<u64>,
    /// llama.cpp's repeat penalty over the last `penalty_last_n` tokens; 1 is off.
    pub repeat_penalty: f32,
    /// OpenAI's presence penalty (subtracted once per seen token).
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty (subtracted per occurrence).
    pub frequency_penalty: f32,
    pub penalty_last_n: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            seed: None,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
        }
    }
}

impl SamplingParams {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    fn penalizes(&self) -> bool {
        self.repeat_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// A seeded sampler for one generation.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    seed: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Self { rng: ChaCha20Rng::seed_from_u64(seed), params, seed }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed in use (drawn from the OS when none was given).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Picks the next token from `logits`; `history` is every token so far
    /// (prompt included), which the repetition penalties read.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut adjusted;
        let logits = if p.penalizes() {
            adjusted = logits.to_vec();
            apply_penalties(p, &mut adjusted, history);
            &adjusted[..]
        } else {
            logits
        };
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let candidates = self.candidates(logits);
        if candidates.is_empty() {
            return argmax(logits);
        }
        // Softmax at the temperature over what survived, then one draw.
        let max = candidates.iter().fold(f32::NEG_INFINITY, |m, &(_, l)| m.max(l));
        let weights: Vec<f64> = candidates.iter().map(|&(_, l)| (f64::from(l - max) / f64::from(p.temperature)).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (&(id, _), w) in candidates.iter().zip(&weights) {
            if u < *w {
                return id;
            }
            u -= w;
        }
        candidates[candidates.len() - 1].0
    }

    /// The tokens that survive top-k, top-p and min-p (in a deterministic
    /// order, not necessarily sorted). Sorting the whole vocabulary each
    /// token would cost a millisecond; only what top-p needs is sorted.
    fn candidates(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let p = &self.params;
        let mut c: Vec<(u32, f32)> = logits.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (i as u32, l)).collect();
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit);
            c.truncate(p.top_k);
        }
        if c.is_empty() {
            return c;
        }
        if p.top_p < 1.0 {
            // The smallest most-likely prefix holding `top_p` of the mass:
            // sort a growing head of the candidates until it is enough.
            let max = c.iter().fold(f32::NEG_INFINITY, |m, &(_, l)| m.max(l));
            let total: f64 = c.iter().map(|&(_, l)| f64::from(l - max).exp()).sum();
            let mut head = 64;
            loop {
                if head < c.len() {
                    c.select_nth_unstable_by(head - 1, by_logit);
                }
                let sorted = head.min(c.len());
                c[..sorted].sort_unstable_by(by_logit);
                let mut mass = 0.0;
                let cut = c[..sorted].iter().position(|&(_, l)| {
                    mass += f64::from(l - max).exp() / total;
                    mass >= f64::from(p.top_p)
                });
                match cut {
                    Some(i) => {
                        c.truncate(i + 1);
                        break;
                    }
                    None if sorted == c.len() => break,
                    None => head *= 4,
                }
            }
        }
        if p.min_p > 0.0 {
            let max = c.iter().fold(f32::NEG_INFINITY, |m, &(_, l)| m.max(l));
            let floor = max + p.min_p.ln();
            c.retain(|&(_, l)| l >= floor);
        }
        c
    }
}

fn apply_penalties(p: &SamplingParams, logits: &mut [f32], history: &[u32]) {
    let recent = &history[history.len().saturating_sub(p.penalty_last_n)..];
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for &t in recent {
        *counts.entry(t).or_default() += 1;
    }
    for (&t, &n) in &counts {
        let Some(l) = logits.get_mut(t as usize) else {
            continue;
        };
        if p.repeat_penalty != 1.0 {
            *l = if *l > 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
        }
        *l -= p.presence_penalty + p.frequency_penalty * n as f32;
    }
}

/// The index of the largest logit (the lowest index among ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// `log softmax(logits)`, computed in float64.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_sum = sum.ln();
    logits.iter().map(|&l| (f64::from(l - max) - log_sum) as f32).collect()
}

/// The `n` most likely tokens with their log-probabilities, best first.
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut c: Vec<(u32, f32)> = logprobs.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let by = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let n = n.min(c.len());
    if n == 0 {
        return Vec::new();
    }
    if n < c.len() {
        c.select_nth_unstable_by(n - 1, by);
        c.truncate(n);
    }
    c.sort_unstable_by(by);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_logits(seed: u64, n: usize) -> Vec<f32> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-8.0..8.0)).collect()
    }

    fn probs(logits: &[f32]) -> Vec<f64> {
        log_softmax(logits).iter().map(|&l| f64::from(l).exp()).collect()
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits = random_logits(1, 500);
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(42), ..Default::default() };
        let draw = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone());
            (0..50).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert_ne!(a, draw(&SamplingParams { seed: Some(43), ..params.clone() }));
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 5, "a flat distribution gives varied tokens");
    }

    #[test]
    fn zero_temperature_is_greedy() {
        for seed in 0..20 {
            let logits = random_logits(seed, 300);
            let mut s = Sampler::new(SamplingParams { temperature: 0.0, seed: Some(seed), ..Default::default() });
            assert_eq!(s.sample(&logits, &[]), argmax(&logits));
        }
    }

    #[test]
    fn top_k_never_emits_a_filtered_token() {
        let logits = random_logits(3, 1000);
        let mut sorted: Vec<u32> = (0..1000).collect();
        sorted.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let allowed: std::collections::HashSet<u32> = sorted[..5].iter().copied().collect();
        let mut s = Sampler::new(SamplingParams { temperature: 5.0, top_k: 5, top_p: 1.0, min_p: 0.0, seed: Some(1), ..Default::default() });
        let seen: std::collections::HashSet<u32> = (0..2000).map(|_| s.sample(&logits, &[])).collect();
        assert!(seen.is_subset(&allowed), "{seen:?} not within {allowed:?}");
        assert_eq!(seen.len(), 5, "a hot temperature reaches all five");
    }

    #[test]
    fn top_p_never_emits_a_filtered_token() {
        let logits = random_logits(4, 200);
        let p = probs(&logits);
        let mut order: Vec<usize> = (0..200).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let mut mass = 0.0;
        let mut allowed = std::collections::HashSet::new();
        for &i in &order {
            allowed.insert(i as u32);
            mass += p[i];
            if mass >= 0.5 {
                break;
            }
        }
        let mut s = Sampler::new(SamplingParams { temperature: 3.0, top_k: 0, top_p: 0.5, min_p: 0.0, seed: Some(2), ..Default::default() });
        for _ in 0..3000 {
            let t = s.sample(&logits, &[]);
            assert!(allowed.contains(&t), "token {t} lies outside the top-p nucleus");
        }
    }

    #[test]
    fn min_p_never_emits_a_filtered_token() {
        let logits = random_logits(5, 300);
        let p = probs(&logits);
        let best = p.iter().cloned().fold(0.0, f64::max);
        let mut s = Sampler::new(SamplingParams { temperature: 4.0, top_k: 0, top_p: 1.0, min_p: 0.2, seed: Some(3), ..Default::default() });
        for _ in 0..3000 {
            let t = s.sample(&logits, &[]) as usize;
            assert!(p[t] >= 0.2 * best * 0.999, "token {t} has p {} < 0.2 · {best}", p[t]);
        }
    }

    #[test]
    fn penalties_discourage_repeats() {
        let mut logits = vec![0.0f32; 10];
        logits[3] = 5.0;
        logits[4] = 4.5;
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, frequency_penalty: 1.0, ..Default::default() });
        assert_eq!(s.sample(&logits, &[]), 3);
        assert_eq!(s.sample(&logits, &[3]), 4);
        let mut r = Sampler::new(SamplingParams { temperature: 0.0, repeat_penalty: 1.5, ..Default::default() });
        assert_eq!(r.sample(&logits, &[3, 3]), 4, "5 / 1.5 < 4.5");
    }

    #[test]
    fn logprobs_normalize() {
        let logits = random_logits(6, 100);
        let lp = log_softmax(&logits);
        let total: f64 = lp.iter().map(|&l| f64::from(l).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        let top = top_logprobs(&lp, 3);
        assert_eq!(top.len(), 3);
        assert_eq!(top[0].0, argmax(&logits));
        assert!(top[0].1 >= top[1].1 && top[1].1 >= top[2].1);
        assert!(top_logprobs(&lp, 0).is_empty());
        assert_eq!(top_logprobs(&lp, 1000).len(), 100);
    }
}
