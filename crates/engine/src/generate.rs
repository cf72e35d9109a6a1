//! Generation as a state machine: the caller runs the forward pass,
//! [`Generation`] decides what to feed next, samples, detokenizes and
//! applies the stop rules. The one loop that drives it — over spans in
//! this process or a chain of nodes — is the gateway's session driver
//! (`hotpot_gateway::session::drive`).

use crate::client::ClientParts;
use crate::detok::TextStream;
use crate::error::ForwardError;
use crate::sampling::{Acceptance, Distribution, Sampler, SamplingParams, Verdict, log_softmax, top_logprobs};
use crate::span::{HiddenStates, KvCache, Span};

/// Why a generation ended, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// How many alternatives to report with each token's log-probability
    /// (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self { sampling: SamplingParams::default(), max_tokens: 256, stop: Vec::new(), logprobs: None }
    }
}

/// The log-probability of a chosen token and its most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub token: u32,
    /// Text that became safe to show with this token (may be empty).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    pub finished: Option<FinishReason>,
}

/// A generation in progress.
#[derive(Debug)]
pub struct Generation {
    sampler: Sampler,
    stream: TextStream,
    tokens: Vec<u32>,
    prompt_len: usize,
    fed: usize,
    max_tokens: usize,
    logprobs: Option<usize>,
    finished: Option<FinishReason>,
}

impl Generation {
    /// Starts from `prompt` (non-empty). `context` is the most positions the
    /// pipeline can hold; generation ends there with `Length`.
    pub fn new(prompt: Vec<u32>, params: GenerationParams, context: usize) -> Result<Self, ForwardError> {
        if prompt.is_empty() {
            return Err(ForwardError::Empty);
        }
        if prompt.len() >= context {
            return Err(ForwardError::ContextFull { needed: prompt.len() + 1, max: context });
        }
        let max_tokens = params.max_tokens.min(context - prompt.len());
        Ok(Self {
            sampler: Sampler::new(params.sampling),
            stream: TextStream::new(params.stop),
            prompt_len: prompt.len(),
            tokens: prompt,
            fed: 0,
            max_tokens,
            logprobs: params.logprobs,
            finished: if max_tokens == 0 { Some(FinishReason::Length) } else { None },
        })
    }

    pub fn sampler(&self) -> &Sampler {
        &self.sampler
    }

    /// Tokens the model has not seen yet and the position of the first.
    pub fn pending(&self) -> (&[u32], usize) {
        (&self.tokens[self.fed..], self.fed)
    }

    /// Records that the pending tokens went through the model.
    pub fn mark_fed(&mut self) {
        self.fed = self.tokens.len();
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The generated tokens so far.
    pub fn completion(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Every token so far, prompt included.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens that may still be generated.
    pub fn remaining(&self) -> usize {
        if self.finished.is_some() { 0 } else { self.max_tokens - self.completion().len() }
    }

    /// Takes the logits of the last fed position, picks a token and returns it
    /// with whatever text it releases.
    pub fn accept(&mut self, logits: &[f32], client: &ClientParts) -> Step {
        debug_assert!(self.finished.is_none(), "accept after the generation finished");
        let token = self.sampler.sample(logits, &self.tokens);
        self.push(token, logits, client)
    }

    /// Speculative decoding: `logits` are those of the last fed position,
    /// and `draft` (drawn from `proposal`) was fed after it. The draft is
    /// kept or replaced by [`Sampler::verify`]; when kept, its position
    /// counts as fed. Returns the step and whether the draft was kept.
    pub fn accept_draft(&mut self, logits: &[f32], draft: u32, proposal: &Distribution, rule: Acceptance, client: &ClientParts) -> (Step, bool) {
        debug_assert!(self.finished.is_none(), "accept after the generation finished");
        let target = self.sampler.distribution(logits, &self.tokens);
        let (token, kept) = match self.sampler.verify(&target, draft, proposal, rule) {
            Verdict::Accepted => (draft, true),
            Verdict::Rejected(token) => (token, false),
        };
        let step = self.push(token, logits, client);
        if kept {
            self.fed = self.tokens.len();
        }
        (step, kept)
    }

    fn push(&mut self, token: u32, logits: &[f32], client: &ClientParts) -> Step {
        let logprob = self.logprobs.map(|n| {
            let lp = log_softmax(logits);
            TokenLogprob { logprob: lp[token as usize], top: top_logprobs(&lp, n) }
        });
        self.tokens.push(token);
        let tokenizer = client.tokenizer();
        let mut finished = None;
        let mut text = String::new();
        if tokenizer.is_end_of_generation(token) {
            finished = Some(FinishReason::Stop);
        } else {
            let released = self.stream.push(tokenizer.token_bytes(token));
            text = released.text;
            if released.stopped {
                finished = Some(FinishReason::Stop);
            } else if self.completion().len() >= self.max_tokens {
                finished = Some(FinishReason::Length);
            }
        }
        if finished.is_some() {
            text.push_str(&self.stream.finish());
        }
        self.finished = finished;
        Step { token, text, logprob, finished }
    }
}

/// A chain of spans in this process, each with its own cache.
pub struct LocalChain<'a> {
    stages: Vec<(&'a Span, KvCache)>,
}

impl<'a> LocalChain<'a> {
    /// A session over `spans`, which must cover the model's blocks in order.
    pub fn new(spans: &'a [Span], max_len: usize) -> Self {
        Self { stages: spans.iter().map(|s| (s, s.new_cache(max_len))).collect() }
    }

    /// Rolls every stage back to `pos` positions.
    pub fn truncate(&mut self, pos: usize) {
        for (_, cache) in &mut self.stages {
            cache.truncate(pos);
        }
    }

    /// Runs `hidden` (positions `start_pos..`) through every span.
    pub fn forward(&mut self, mut hidden: HiddenStates, start_pos: usize) -> Result<HiddenStates, ForwardError> {
        for (span, cache) in &mut self.stages {
            hidden = span.forward(cache, &hidden, start_pos)?;
        }
        Ok(hidden)
    }
}
