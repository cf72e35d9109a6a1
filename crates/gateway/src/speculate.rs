//! Speculative decoding at the gateway: a drafter proposes a few tokens,
//! the pipeline checks them all in one pass, and the sampler keeps what
//! the target model would have produced ([`hotpot_engine::Sampler::verify`]).
//! Across a chain of nodes one pass costs a network round trip per hop
//! whatever its width, so every kept draft saves one.
//!
//! ```text
//! tokens ─▶ Drafter (n-gram lookup | a small model here) ─▶ d1..dk
//! [last, d1..dk] ─▶ Pipeline (one pass, k+1 rows) ─▶ k+1 logit rows
//!   row i verifies d(i+1); the first refusal gives the replacement token,
//!   all kept gives one more token; the pipeline rolls back what was refused
//! ```
//!
//! Greedy output is the same token for token as plain decoding (the
//! engine's rows are bit-identical whatever the pass width); sampled output
//! has the same distribution.

use std::sync::Arc;

use hotpot_engine::{Acceptance, ClientParts, Distribution, ForwardError, KvCache, ModelFile, Sampler, SamplingParams, Span};
use serde::Serialize;

/// Where drafts come from.
#[derive(Clone)]
pub enum DraftSource {
    /// Prompt lookup: the tokens that followed the latest earlier
    /// occurrence of the last few tokens.
    Ngram,
    /// A smaller model with the same vocabulary, run in this process.
    Model(Arc<DraftModel>),
}

impl std::fmt::Debug for DraftSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ngram => f.write_str("Ngram"),
            Self::Model(m) => write!(f, "Model({})", m.name),
        }
    }
}

/// How a session speculates.
#[derive(Debug, Clone)]
pub struct Speculation {
    pub source: DraftSource,
    /// The most tokens drafted per pass (the window adapts below it).
    pub max_draft: usize,
    pub rule: Acceptance,
    /// Windows in flight: while the pipeline checks a window, a draft
    /// model drafts the next one on the assumption that every draft is
    /// kept and its own guess for the token after them comes; the work is
    /// dropped when the assumption fails. Worth it when a pass waits on
    /// the network (a remote chain), not when it is this machine's compute.
    pub in_flight: bool,
}

impl Speculation {
    pub fn ngram() -> Self {
        Self { source: DraftSource::Ngram, max_draft: 8, rule: Acceptance::Exact, in_flight: false }
    }

    pub fn model(model: Arc<DraftModel>) -> Self {
        Self { source: DraftSource::Model(model), max_draft: 8, rule: Acceptance::Exact, in_flight: true }
    }
}

/// A draft model loaded whole in this process.
pub struct DraftModel {
    pub name: String,
    client: ClientParts,
    spans: Vec<Span>,
}

impl DraftModel {
    /// Loads `file` whole; its vocabulary must be `target`'s.
    pub fn load(name: &str, file: &ModelFile, device: &hotpot_engine::Device, target: &ClientParts) -> Result<Self, String> {
        let client = ClientParts::load(file, device).map_err(|e| e.to_string())?;
        let (ours, theirs) = (client.tokenizer(), target.tokenizer());
        let same = ours.vocab_size() == theirs.vocab_size() && (0..ours.vocab_size() as u32).all(|t| ours.token_bytes(t) == theirs.token_bytes(t));
        if !same {
            return Err(format!("the draft model {name} does not share the target model's vocabulary"));
        }
        let span = file.config().full_span();
        let spans = vec![Span::load(file, span, device).map_err(|e| e.to_string())?];
        Ok(Self { name: name.to_string(), client, spans })
    }
}

/// What speculation did in one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SpeculationStats {
    /// Passes through the pipeline (the prompt's included).
    pub passes: usize,
    pub drafted: usize,
    pub accepted: usize,
}

impl SpeculationStats {
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 { 0.0 } else { self.accepted as f64 / self.drafted as f64 }
    }
}

/// One session's drafter, with its adaptive window.
pub struct Speculator {
    drafter: Drafter,
    window: usize,
    max_draft: usize,
    in_flight: bool,
    pub rule: Acceptance,
    pub stats: SpeculationStats,
}

enum Drafter {
    Ngram,
    /// `None` while it drafts ahead on another thread (or after it failed there).
    Model(Option<ModelDrafter>),
}

/// A window being drafted ahead (see [`Speculation::in_flight`]).
pub struct InFlight {
    handle: tokio::task::JoinHandle<(ModelDrafter, Vec<u32>, Result<Vec<(u32, Distribution)>, ForwardError>)>,
}

impl Speculator {
    /// `params` are the session's; a draft model samples with them (its own seed).
    pub fn new(speculation: &Speculation, params: &SamplingParams, max_len: usize) -> Self {
        let drafter = match &speculation.source {
            DraftSource::Ngram => Drafter::Ngram,
            DraftSource::Model(model) => Drafter::Model(Some(ModelDrafter::new(Arc::clone(model), params, max_len))),
        };
        let max_draft = speculation.max_draft.max(1);
        Self { drafter, window: max_draft.min(4), max_draft, in_flight: speculation.in_flight, rule: speculation.rule, stats: SpeculationStats::default() }
    }

    /// Up to `limit` drafts (fewer, or none, when nothing fits) to follow
    /// `tokens`, each with the distribution it was drawn from.
    pub fn draft(&mut self, tokens: &[u32], limit: usize) -> Vec<(u32, Distribution)> {
        let k = self.window.min(limit);
        if k == 0 {
            return Vec::new();
        }
        match &mut self.drafter {
            Drafter::Ngram => ngram_lookup(tokens, k).into_iter().map(|t| (t, Distribution::point(t))).collect(),
            Drafter::Model(None) => Vec::new(),
            Drafter::Model(Some(model)) => model.draft(tokens, k).unwrap_or_else(|e| {
                tracing::debug!(error = %e, "the draft model failed; decoding without drafts");
                Vec::new()
            }),
        }
    }

    /// Starts drafting the window after `drafts` on another thread, while
    /// the pipeline checks them (`tokens`: everything before the drafts).
    /// `None` when this speculator does not draft ahead.
    pub fn draft_ahead(&mut self, tokens: &[u32], drafts: &[(u32, Distribution)]) -> Option<InFlight> {
        if !self.in_flight {
            return None;
        }
        let Drafter::Model(slot) = &mut self.drafter else { return None };
        let mut drafter = slot.take()?;
        let mut assumed = tokens.to_vec();
        assumed.extend(drafts.iter().map(|(t, _)| *t));
        // The guess for the token after the drafts, then a window one
        // longer than now (it grows when every draft is kept).
        let k = (self.window + 1).min(self.max_draft) + 1;
        let handle = tokio::task::spawn_blocking(move || {
            let result = drafter.draft(&assumed, k);
            (drafter, assumed, result)
        });
        Some(InFlight { handle })
    }

    /// Whether windows are drafted while the pipeline checks the last one
    /// (then the prompt's pass carries no drafts: the draft model reads the
    /// prompt meanwhile, and the first token does not wait for it).
    pub fn drafts_ahead(&self) -> bool {
        self.in_flight && matches!(self.drafter, Drafter::Model(_))
    }

    /// Takes the drafter back from `flight`; returns the next window's
    /// drafts when `tokens` (everything so far) are the ones it assumed
    /// followed by its guess.
    pub async fn land(&mut self, flight: InFlight, tokens: &[u32]) -> Option<Vec<(u32, Distribution)>> {
        let (drafter, assumed, result) = flight.handle.await.ok()?;
        if let Drafter::Model(slot) = &mut self.drafter {
            *slot = Some(drafter);
        }
        let mut drafts = result.ok()?;
        let guess = drafts.first()?.0;
        if tokens.len() != assumed.len() + 1 || tokens[..assumed.len()] != *assumed || tokens[assumed.len()] != guess {
            return None;
        }
        drafts.remove(0);
        drafts.truncate(self.window);
        Some(drafts)
    }

    /// Counts one pass that checked `drafted` drafts and kept `kept`, and
    /// adapts the window: it grows while every draft is kept and shrinks to
    /// just past what was kept otherwise.
    pub fn record(&mut self, drafted: usize, kept: usize) {
        self.stats.passes += 1;
        self.stats.drafted += drafted;
        self.stats.accepted += kept;
        if drafted == 0 {
            return;
        }
        self.window = if kept == drafted { (self.window + 1).min(self.max_draft) } else { (kept + 1).clamp(1, self.max_draft) };
    }
}

/// Prompt-lookup drafting: finds the latest earlier occurrence of the last
/// `n` tokens (n = 3, 2, then 1) and proposes what followed it.
pub fn ngram_lookup(tokens: &[u32], k: usize) -> Vec<u32> {
    for n in (1..=3usize).rev() {
        if tokens.len() <= n {
            continue;
        }
        let tail = &tokens[tokens.len() - n..];
        // Latest match first; the match must be followed by something.
        for start in (0..tokens.len() - n).rev() {
            if &tokens[start..start + n] == tail {
                let from = start + n;
                let proposal: Vec<u32> = tokens[from..(from + k).min(tokens.len())].to_vec();
                if !proposal.is_empty() {
                    return proposal;
                }
            }
        }
    }
    Vec::new()
}

/// A draft model's session: its cache follows the accepted tokens.
struct ModelDrafter {
    model: Arc<DraftModel>,
    caches: Vec<KvCache>,
    /// The tokens whose positions are in the caches.
    fed: Vec<u32>,
    sampler: Sampler,
    max_len: usize,
}

impl ModelDrafter {
    fn new(model: Arc<DraftModel>, params: &SamplingParams, max_len: usize) -> Self {
        let max_len = max_len.min(model.client.config().context_length);
        let caches = model.spans.iter().map(|s| s.new_cache(max_len)).collect();
        // Its own stream of randomness, derived from the session's seed.
        let seed = params.seed.map(|s| s ^ 0x5eed_d4af_7000_0001);
        let sampler = Sampler::new(SamplingParams { seed, ..params.clone() });
        Self { model, caches, fed: Vec::new(), sampler, max_len }
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ForwardError> {
        let start = self.fed.len();
        let mut hidden = self.model.client.embed(tokens)?;
        for (span, cache) in self.model.spans.iter().zip(&mut self.caches) {
            hidden = span.forward(cache, &hidden, start)?;
        }
        self.fed.extend_from_slice(tokens);
        self.model.client.logits(&hidden.last_row())
    }

    fn draft(&mut self, tokens: &[u32], k: usize) -> Result<Vec<(u32, Distribution)>, ForwardError> {
        let k = k.min(self.max_len.saturating_sub(tokens.len() + 1));
        if k == 0 || tokens.is_empty() {
            return Ok(Vec::new());
        }
        // Keep the cache's common prefix with `tokens`, and at least one
        // token to feed (its logits start the draft).
        let common = self.fed.iter().zip(tokens).take_while(|(a, b)| a == b).count().min(tokens.len() - 1);
        for cache in &mut self.caches {
            cache.truncate(common);
        }
        self.fed.truncate(common);
        let mut history = tokens.to_vec();
        let mut logits = self.forward(&tokens[common..])?;
        let mut drafts = Vec::with_capacity(k);
        for i in 0..k {
            let proposal = self.sampler.distribution(&logits, &history);
            let token = self.sampler.draw(&proposal);
            drafts.push((token, proposal));
            history.push(token);
            if i + 1 < k {
                logits = self.forward(&[token])?;
            }
        }
        Ok(drafts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_lookup_proposes_what_followed_the_latest_match() {
        let tokens = [1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3];
        assert_eq!(ngram_lookup(&tokens, 2), vec![4, 5], "the latest occurrence of 1 2 3");
        assert_eq!(ngram_lookup(&tokens, 10), vec![4, 5, 1, 2, 3]);
        assert_eq!(ngram_lookup(&[7, 8, 9], 3), Vec::<u32>::new(), "no repeat, no draft");
        assert_eq!(ngram_lookup(&[5, 6, 5], 2), vec![6, 5], "falls back to shorter n-grams");
        assert!(ngram_lookup(&[], 4).is_empty());
    }

    #[test]
    fn the_window_adapts() {
        let mut s = Speculator::new(&Speculation::ngram(), &SamplingParams::greedy(), 100);
        assert_eq!(s.window, 4);
        s.record(4, 4);
        assert_eq!(s.window, 5);
        s.record(5, 1);
        assert_eq!(s.window, 2);
        s.record(0, 0);
        assert_eq!(s.window, 2, "a pass without drafts changes nothing");
        assert_eq!(s.stats, SpeculationStats { passes: 3, drafted: 9, accepted: 5 });
    }
}
