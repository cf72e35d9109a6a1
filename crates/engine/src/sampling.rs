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
    /// Added to these tokens' logits before anything else (OpenAI's
    /// `logit_bias`: -100 all but bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
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
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// The sampling a GGUF file recommends (`general.sampling.temp`,
    /// `top_k`, `top_p`, `min_p`, `penalty_repeat`, `penalty_last_n`, as
    /// llama.cpp writes them), llama.cpp's defaults for what it leaves out
    /// (or holds out of range).
    pub fn recommended(metadata: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>) -> Self {
        use candle_core::quantized::gguf_file::Value;
        let number = |key: &str| -> Option<f64> {
            match metadata.get(&format!("general.sampling.{key}"))? {
                Value::F32(v) => Some(f64::from(*v)),
                Value::F64(v) => Some(*v),
                Value::U8(v) => Some(f64::from(*v)),
                Value::I8(v) => Some(f64::from(*v)),
                Value::U16(v) => Some(f64::from(*v)),
                Value::I16(v) => Some(f64::from(*v)),
                Value::U32(v) => Some(f64::from(*v)),
                Value::I32(v) => Some(f64::from(*v)),
                Value::U64(v) => Some(*v as f64),
                Value::I64(v) => Some(*v as f64),
                _ => None,
            }
        };
        let d = Self::default();
        let within = |key: &str, lo: f64, hi: f64| number(key).filter(|v| v.is_finite() && (lo..=hi).contains(v));
        Self {
            temperature: within("temp", 0.0, 2.0).map_or(d.temperature, |v| v as f32),
            top_k: within("top_k", 0.0, 1e9).map_or(d.top_k, |v| v as usize),
            top_p: within("top_p", 1e-6, 1.0).map_or(d.top_p, |v| v as f32),
            min_p: within("min_p", 0.0, 1.0).map_or(d.min_p, |v| v as f32),
            repeat_penalty: within("penalty_repeat", 1e-6, 10.0).map_or(d.repeat_penalty, |v| v as f32),
            penalty_last_n: within("penalty_last_n", 0.0, 1e9).map_or(d.penalty_last_n, |v| v as usize),
            ..d
        }
    }

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
        let distribution = self.distribution(logits, history);
        self.draw(&distribution)
    }

    /// What [`Sampler::sample`] draws from at this position: penalties,
    /// top-k, top-p, min-p and temperature applied.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Distribution {
        let p = &self.params;
        let mut adjusted;
        let logits = if p.penalizes() || !p.logit_bias.is_empty() {
            adjusted = logits.to_vec();
            for &(token, bias) in &p.logit_bias {
                if let Some(l) = adjusted.get_mut(token as usize) {
                    *l += bias;
                }
            }
            if p.penalizes() {
                apply_penalties(p, &mut adjusted, history);
            }
            &adjusted[..]
        } else {
            logits
        };
        if p.temperature <= 0.0 {
            return Distribution::point(argmax(logits));
        }
        let candidates = self.candidates(logits);
        if candidates.is_empty() {
            return Distribution::point(argmax(logits));
        }
        // Softmax at the temperature over what survived.
        let max = candidates.iter().fold(f32::NEG_INFINITY, |m, &(_, l)| m.max(l));
        let weights: Vec<f64> = candidates.iter().map(|&(_, l)| (f64::from(l - max) / f64::from(p.temperature)).exp()).collect();
        let total = weights.iter().sum();
        Distribution { tokens: candidates.into_iter().map(|(id, _)| id).collect(), weights, total, certain: false }
    }

    /// One draw from `distribution` (none for a certain one).
    pub fn draw(&mut self, distribution: &Distribution) -> u32 {
        let Distribution { tokens, weights, total, certain } = distribution;
        if *certain {
            return tokens[0];
        }
        let mut u = self.rng.random::<f64>() * total;
        for (&id, w) in tokens.iter().zip(weights) {
            if u < *w {
                return id;
            }
            u -= w;
        }
        tokens[tokens.len() - 1]
    }

    /// Speculative sampling's verification of one drafted token (Leviathan
    /// et al. 2023, Chen et al. 2023): `draft` was drawn from `proposal`;
    /// `target` is what this sampler would draw from here. The token
    /// returned is distributed exactly as a draw from `target`, whatever
    /// the proposal: the draft is kept with probability
    /// min(1, target(draft) / proposal(draft)), otherwise a token is drawn
    /// from the residual max(0, target − proposal), renormalized. With a
    /// certain target (greedy) this keeps the draft only when it is the
    /// most likely token, and uses no randomness.
    pub fn verify(&mut self, target: &Distribution, draft: u32, proposal: &Distribution, rule: Acceptance) -> Verdict {
        let (p, q) = (target.prob(draft), proposal.prob(draft));
        let keep = match rule {
            _ if target.certain => p > 0.0,
            Acceptance::Exact => q > 0.0 && self.rng.random::<f64>() * q < p,
            Acceptance::AnyPossible => p > 0.0,
        };
        if keep {
            return Verdict::Accepted;
        }
        if target.certain {
            return Verdict::Rejected(target.tokens[0]);
        }
        let mut residual: Vec<f64> = target.weights.iter().map(|w| w / target.total).collect();
        let index: std::collections::HashMap<u32, usize> = target.tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
        for (t, w) in proposal.tokens.iter().zip(&proposal.weights) {
            if let Some(&i) = index.get(t) {
                residual[i] -= w / proposal.total;
            }
        }
        residual.iter_mut().for_each(|r| *r = r.max(0.0));
        let total: f64 = residual.iter().sum();
        if total <= 0.0 {
            // Only rounding leaves nothing: the target itself is then the residual.
            return Verdict::Rejected(self.draw(target));
        }
        let residual = Distribution { tokens: target.tokens.clone(), weights: residual, total, certain: false };
        Verdict::Rejected(self.draw(&residual))
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

/// A distribution over tokens: the candidates that survived the sampler's
/// filters with unnormalized weights, or one certain token.
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    tokens: Vec<u32>,
    weights: Vec<f64>,
    total: f64,
    certain: bool,
}

impl Distribution {
    /// All the mass on `token`.
    pub fn point(token: u32) -> Self {
        Self { tokens: vec![token], weights: vec![1.0], total: 1.0, certain: true }
    }

    /// The probability of `token`.
    pub fn prob(&self, token: u32) -> f64 {
        self.tokens.iter().position(|&t| t == token).map_or(0.0, |i| self.weights[i] / self.total)
    }
}

/// How a drafted token is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acceptance {
    /// Exact speculative sampling: the output distribution is the target's.
    #[default]
    Exact,
    /// Keeps any draft the target could have drawn. **Wrong** (biased
    /// towards the draft); it exists so that tests can show that their
    /// statistical check catches a wrong rule.
    AnyPossible,
}

/// The outcome of [`Sampler::verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// The draft was refused; this token comes instead.
    Rejected(u32),
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

    #[test]
    fn recommended_sampling_comes_from_the_file_or_llama_cpp() {
        use candle_core::quantized::gguf_file::Value;
        let mut meta = std::collections::HashMap::new();
        assert_eq!(SamplingParams::recommended(&meta), SamplingParams::default());
        meta.insert("general.sampling.temp".to_string(), Value::F32(0.6));
        meta.insert("general.sampling.top_k".to_string(), Value::I32(20));
        meta.insert("general.sampling.top_p".to_string(), Value::F32(7.0));
        meta.insert("general.sampling.min_p".to_string(), Value::String("x".into()));
        let r = SamplingParams::recommended(&meta);
        assert_eq!((r.temperature, r.top_k), (0.6, 20));
        assert_eq!((r.top_p, r.min_p), (0.95, 0.05), "out of range or not a number: llama.cpp's");
    }

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

    /// Pearson's chi-square of `counts` against `expected` probabilities,
    /// and its degrees of freedom (cells expecting fewer than 5 are pooled).
    fn chi_square(counts: &[u64], expected: &[f64]) -> (f64, usize) {
        let n: u64 = counts.iter().sum();
        let (mut stat, mut cells, mut pooled_c, mut pooled_e) = (0.0, 0usize, 0.0, 0.0);
        for (&c, &p) in counts.iter().zip(expected) {
            let e = p * n as f64;
            if e < 5.0 {
                pooled_c += c as f64;
                pooled_e += e;
                continue;
            }
            stat += (c as f64 - e).powi(2) / e;
            cells += 1;
        }
        if pooled_e > 0.0 {
            stat += (pooled_c - pooled_e).powi(2) / pooled_e.max(1e-9);
            cells += 1;
        }
        (stat, cells.saturating_sub(1))
    }

    /// Speculative sampling keeps the target distribution exactly, for a
    /// point proposal (n-gram drafts) and a spread one (a draft model),
    /// and a wrong rule is caught by the same check.
    #[test]
    fn speculative_sampling_keeps_the_target_distribution() {
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, seed: Some(9), ..Default::default() };
        let target_logits: Vec<f32> = (0..12).map(|i| ((i * 7) % 5) as f32 * 0.6).collect();
        let draft_logits: Vec<f32> = (0..12).map(|i| ((i * 3) % 4) as f32 * 0.9).collect();
        let sampler = Sampler::new(params.clone());
        let target = sampler.distribution(&target_logits, &[]);
        let expected: Vec<f64> = (0..12).map(|t| target.prob(t)).collect();
        let spread = sampler.distribution(&draft_logits, &[]);
        let draws = 60_000;
        let run = |rule: Acceptance, point: bool| {
            let mut s = Sampler::new(params.clone());
            let mut drafter = Sampler::new(SamplingParams { seed: Some(77), ..params.clone() });
            let mut counts = vec![0u64; 12];
            for _ in 0..draws {
                let (draft, proposal) = if point { (4, Distribution::point(4)) } else { (drafter.draw(&spread), spread.clone()) };
                let token = match s.verify(&target, draft, &proposal, rule) {
                    Verdict::Accepted => draft,
                    Verdict::Rejected(t) => t,
                };
                counts[token as usize] += 1;
            }
            chi_square(&counts, &expected)
        };
        // The 0.999 quantile of chi-square with 11 degrees of freedom is 31.3.
        for point in [true, false] {
            let (stat, df) = run(Acceptance::Exact, point);
            assert_eq!(df, 11);
            assert!(stat < 31.3, "exact rule, point proposal {point}: chi-square {stat:.1}");
            let (wrong, _) = run(Acceptance::AnyPossible, point);
            assert!(wrong > 31.3, "the wrong rule went unnoticed, point proposal {point}: chi-square {wrong:.1}");
        }
        // Greedy: the draft is kept only when it is the argmax, with no randomness.
        let mut g = Sampler::new(SamplingParams::greedy());
        let best = argmax(&target_logits);
        let greedy = g.distribution(&target_logits, &[]);
        assert_eq!(g.verify(&greedy, best, &Distribution::point(best), Acceptance::Exact), Verdict::Accepted);
        assert_eq!(g.verify(&greedy, (best + 1) % 12, &Distribution::point((best + 1) % 12), Acceptance::Exact), Verdict::Rejected(best));
    }

    #[test]
    fn logit_bias_bans_and_forces_tokens() {
        let logits = random_logits(8, 50);
        let best = argmax(&logits);
        let other = (best + 7) % 50;
        let mut banned = Sampler::new(SamplingParams { logit_bias: vec![(best, -100.0)], ..SamplingParams::greedy() });
        assert_ne!(banned.sample(&logits, &[]), best);
        let mut forced = Sampler::new(SamplingParams { temperature: 1.0, logit_bias: vec![(other, 100.0)], seed: Some(1), ..Default::default() });
        assert!((0..200).all(|_| forced.sample(&logits, &[]) == other));
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
