//! One session — one choice of one request, or one `hotpot run` — however
//! it runs and however it ends:
//!
//! ```text
//! ChoiceJob ─▶ drive() ── Pipeline (LocalPipeline | RemoteChain), [drafts from a Speculator]
//!                │ events: prompt log-probabilities, tokens, done ─▶ the caller (HTTP, stdout)
//!                ▼
//!          SessionRecord ─▶ sinks: auditor · billing · metrics · session log
//! ```
//!
//! [`drive`] is the one generation loop: `hotpot run` (local and over a
//! swarm), both API endpoints and `n > 1` all run through it. The pipeline
//! is the seam: anything that maps embeddings at some positions to final
//! hidden states and can roll back.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hotpot_core::{Commitment, LayerSpan, ModelId, NodeId};
use hotpot_engine::{
    ClientParts, Distribution, FinishReason, ForwardError, Generation, GenerationParams, HiddenStates, LocalChain, TokenLogprob, log_softmax, top_logprobs,
};
use hotpot_net::PeerId;
use serde::Serialize;

use crate::chain::{ChainError, RemoteChain, StageRecord, StageTranscript};
use crate::speculate::{Speculation, SpeculationStats, Speculator};

/// Maps embeddings at positions `start..` to the final hidden states of one
/// session: spans in this process ([`LocalPipeline`]) or a chain of nodes
/// ([`RemoteChain`]). Speculative decoding wraps one of these.
pub trait Pipeline: Send {
    /// Runs `hidden` (positions `start .. start + rows`) through every block.
    fn forward(&mut self, hidden: HiddenStates, start: usize) -> impl Future<Output = Result<HiddenStates, ChainError>> + Send;
    /// Forgets every position from `len` on, everywhere.
    fn truncate(&mut self, len: usize) -> impl Future<Output = Result<(), ChainError>> + Send;
    /// Ends the session (frees node caches).
    fn close(&mut self) -> impl Future<Output = ()> + Send;
    /// What each stage did, for the record.
    fn stages(&self) -> Vec<StageRecord>;
    /// The stages drawn for audit, with their tensors.
    fn transcripts(&self) -> Vec<StageTranscript> {
        Vec::new()
    }
    /// Node failures survived.
    fn failovers(&self) -> usize {
        0
    }
}

/// Runs client-side or local compute without stalling the async runtime:
/// in place on a multi-threaded runtime (its other tasks move to other
/// workers), directly otherwise.
pub(crate) fn compute<R>(f: impl FnOnce() -> R) -> R {
    if tokio::runtime::Handle::try_current().is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread) {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// A session's blocks in this process: spans loaded here, one cache each.
pub struct LocalPipeline<'a> {
    chain: LocalChain<'a>,
    spans: Vec<LayerSpan>,
    len: usize,
}

impl<'a> LocalPipeline<'a> {
    pub fn new(spans: &'a [hotpot_engine::Span], max_len: usize) -> Self {
        Self { chain: LocalChain::new(spans, max_len), spans: spans.iter().map(hotpot_engine::Span::span).collect(), len: 0 }
    }
}

impl Pipeline for LocalPipeline<'_> {
    async fn forward(&mut self, hidden: HiddenStates, start: usize) -> Result<HiddenStates, ChainError> {
        let rows = hidden.rows();
        let out = compute(|| self.chain.forward(hidden, start))?;
        self.len = start + rows;
        Ok(out)
    }

    async fn truncate(&mut self, len: usize) -> Result<(), ChainError> {
        self.chain.truncate(len);
        self.len = self.len.min(len);
        Ok(())
    }

    async fn close(&mut self) {}

    fn stages(&self) -> Vec<StageRecord> {
        self.spans.iter().map(|&span| StageRecord { peer: None, node: None, span, positions: self.len, price_per_1k: 0, commitments: Vec::new() }).collect()
    }
}

impl Pipeline for RemoteChain {
    async fn forward(&mut self, hidden: HiddenStates, start: usize) -> Result<HiddenStates, ChainError> {
        RemoteChain::forward(self, hidden, start).await
    }

    async fn truncate(&mut self, len: usize) -> Result<(), ChainError> {
        RemoteChain::truncate(self, len).await
    }

    async fn close(&mut self) {
        RemoteChain::close(self).await;
    }

    fn stages(&self) -> Vec<StageRecord> {
        self.stage_records()
    }

    fn transcripts(&self) -> Vec<StageTranscript> {
        RemoteChain::transcripts(self)
    }

    fn failovers(&self) -> usize {
        RemoteChain::failovers(self)
    }
}

/// One session to run.
#[derive(Debug, Clone)]
pub struct ChoiceJob {
    /// The choice's index in its request's answer.
    pub index: u32,
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    /// Alternatives to report with each prompt token's log-probability
    /// (completions with `echo` and `logprobs`).
    pub prompt_logprobs: Option<usize>,
    /// Whether this session bills its prompt (once per prompt of a request,
    /// however many choices share it).
    pub bills_prompt: bool,
    /// Speculative decoding, when the session drafts.
    pub speculation: Option<Speculation>,
    /// A grammar every generated token must follow (structured outputs);
    /// a constrained session does not speculate.
    pub grammar: Option<crate::constrain::Grammar>,
}

/// What a running session reports to whoever listens.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// Log-probabilities of prompt tokens 1.. (the first has none).
    Prompt {
        index: u32,
        logprobs: Vec<TokenLogprob>,
    },
    Token {
        index: u32,
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        index: u32,
        finish: FinishReason,
        completion_tokens: usize,
    },
}

/// Where a session's events go. `false` from `send`: nobody listens any
/// more, and the session stops.
pub trait EventSink: Send {
    fn send(&mut self, event: SessionEvent) -> impl Future<Output = bool> + Send;
}

impl EventSink for tokio::sync::mpsc::Sender<SessionEvent> {
    async fn send(&mut self, event: SessionEvent) -> bool {
        tokio::sync::mpsc::Sender::send(self, event).await.is_ok()
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason", content = "detail")]
pub enum Finish {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context.
    Length,
    /// The listener went away before the end.
    ClientGone,
    /// The pipeline failed (the message says how).
    Error(String),
}

impl From<FinishReason> for Finish {
    fn from(reason: FinishReason) -> Self {
        match reason {
            FinishReason::Stop => Self::Stop,
            FinishReason::Length => Self::Length,
        }
    }
}

/// One stage of a session's route, as recorded: who computed which blocks
/// over how many positions, and a hash of everything it signed.
#[derive(Debug, Clone, Serialize)]
pub struct RouteStage {
    pub peer: Option<String>,
    pub node: Option<NodeId>,
    pub span: LayerSpan,
    pub positions: usize,
    /// The node's price per 1,000 positions (micro-credits).
    pub price_per_1k: u64,
    pub steps: usize,
    /// BLAKE3 over the stage's commitments' signatures, in order (hex).
    pub commitments_root: String,
    #[serde(skip)]
    pub commitments: Vec<Commitment>,
}

impl From<StageRecord> for RouteStage {
    fn from(s: StageRecord) -> Self {
        Self {
            peer: s.peer.map(|p| p.to_string()),
            node: s.node,
            span: s.span,
            positions: s.positions,
            price_per_1k: s.price_per_1k,
            steps: s.commitments.len(),
            commitments_root: hotpot_core::hex(&hotpot_core::commitments_root(&s.commitments)),
            commitments: s.commitments,
        }
    }
}

/// Everything about one session once it ended, however it ended: what
/// billing, audits, metrics and the session log are fed from.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRecord {
    /// `<request id>/<choice index>`.
    pub id: String,
    /// The API key's name, when keys are configured.
    pub caller: Option<String>,
    pub model: String,
    pub model_id: ModelId,
    pub route: Vec<RouteStage>,
    pub prompt_tokens: usize,
    /// Prompt tokens this session bills (see [`ChoiceJob::bills_prompt`]).
    pub billed_prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish: Finish,
    pub failovers: usize,
    /// Milliseconds since the Unix epoch when the session started.
    pub started_ms: u64,
    pub first_token_ms: Option<f64>,
    pub duration_ms: f64,
    /// Drafts checked and kept, when the session speculated.
    pub speculation: Option<SpeculationStats>,
}

impl SessionRecord {
    /// Tokens the session is charged for.
    pub fn billed_tokens(&self) -> u64 {
        (self.billed_prompt_tokens + self.completion_tokens) as u64
    }
}

/// What [`drive`] returns: the record (route and identity filled in by the
/// caller's context) and the error that ended the session, if one did.
pub struct Outcome {
    pub record: SessionRecord,
    pub error: Option<ChainError>,
}

/// Who runs the session, for its record.
#[derive(Debug, Clone)]
pub struct SessionContext {
    pub id: String,
    pub caller: Option<String>,
    pub model: String,
    pub model_id: ModelId,
    /// Where logits are computed together with other sessions' (a
    /// gateway's); `None`: in place.
    pub heads: Option<Arc<crate::heads::Heads>>,
}

/// Runs one session to its end through `pipeline`, sending its events to
/// `sink`; stops early (and says so in the record) when the sink is gone or
/// the pipeline fails. The one generation loop of Hotpot.
pub async fn drive<P: Pipeline>(client: &Arc<ClientParts>, pipeline: &mut P, job: &ChoiceJob, context: &SessionContext, sink: &mut impl EventSink) -> Outcome {
    let started = Instant::now();
    let started_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut first_token: Option<Duration> = None;
    let mut completion = 0usize;
    let context_len = client.config().context_length;
    let mut speculator = job.speculation.as_ref().filter(|_| job.grammar.is_none()).map(|s| Speculator::new(s, &job.params.sampling, context_len));

    let result = async {
        let mut generation = Generation::new(job.prompt.clone(), job.params.clone(), context_len)?;
        let mut constraint = job
            .grammar
            .as_ref()
            .map(crate::constrain::Grammar::start)
            .transpose()
            .map_err(|e| ChainError::Internal(format!("the response format's grammar: {e}")))?;
        // Prompt log-probabilities need the prefill even when nothing is generated.
        let mut prompt_pending = job.prompt_logprobs.is_some();
        // The next window, when it was drafted while the last was checked.
        let mut ahead: Option<Vec<(u32, Distribution)>> = None;
        loop {
            if let Some(finish) = generation.finished()
                && !prompt_pending
            {
                sink.send(SessionEvent::Done { index: job.index, finish, completion_tokens: completion }).await;
                return Ok::<Finish, ChainError>(finish.into());
            }
            let (pending, start) = generation.pending();
            let mut feed = pending.to_vec();
            // Drafts ride along: as many as may still be generated after the
            // token this pass yields anyway, within the context.
            let drafts = match &mut speculator {
                Some(speculator) if !prompt_pending && !(start == 0 && speculator.drafts_ahead()) => {
                    let limit = generation.remaining().saturating_sub(1).min(context_len.saturating_sub(start + feed.len()));
                    match ahead.take() {
                        Some(mut drafts) => {
                            drafts.truncate(limit);
                            drafts
                        }
                        None => compute(|| speculator.draft(generation.tokens(), limit)),
                    }
                }
                _ => Vec::new(),
            };
            feed.extend(drafts.iter().map(|(t, _)| *t));
            let hidden = compute(|| client.embed(&feed))?;
            let flight = speculator.as_mut().and_then(|s| s.draft_ahead(generation.tokens(), &drafts));
            let out = pipeline.forward(hidden, start).await?;
            generation.mark_fed();
            if prompt_pending {
                prompt_pending = false;
                let top = job.prompt_logprobs.unwrap_or(0);
                let logprobs = compute(|| prompt_logprobs(client, &job.prompt, &out, top))?;
                if !sink.send(SessionEvent::Prompt { index: job.index, logprobs }).await {
                    return Ok(Finish::ClientGone);
                }
                if generation.finished().is_some() {
                    continue;
                }
            }
            // The last fed token's row decides the first draft (or the next
            // token); each kept draft's row decides the one after.
            let first = feed.len() - drafts.len() - 1;
            let dim = out.dim();
            let rows = HiddenStates::new(drafts.len() + 1, dim, out.as_slice()[first * dim..].to_vec())?;
            let n_rows = rows.rows();
            let logits = match &context.heads {
                Some(heads) => heads.logits(rows).await?,
                None => compute(|| client.logits(&rows))?,
            };
            let vocab = logits.len() / n_rows;
            let mut kept = 0;
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                let (step, kept_draft) = match (drafts.get(i), &speculator, &mut constraint) {
                    (Some((draft, proposal)), Some(speculator), _) => generation.accept_draft(row, *draft, proposal, speculator.rule, client),
                    (_, _, Some(constraint)) => {
                        let masked = compute(|| constraint.mask(row)).map_err(|e| ChainError::Internal(format!("constrained decoding: {e}")))?;
                        let step = generation.accept(&masked, client);
                        constraint.commit(step.token).map_err(|e| ChainError::Internal(format!("constrained decoding: {e}")))?;
                        (step, false)
                    }
                    _ => (generation.accept(row, client), false),
                };
                kept += usize::from(kept_draft);
                completion = generation.completion().len();
                first_token.get_or_insert_with(|| started.elapsed());
                let finished = step.finished.is_some();
                let event = SessionEvent::Token { index: job.index, token: step.token, text: step.text, logprob: step.logprob };
                if !sink.send(event).await {
                    tracing::debug!("the listener went away; ending the session");
                    return Ok(Finish::ClientGone);
                }
                if finished || !kept_draft {
                    break;
                }
            }
            if let Some(speculator) = &mut speculator {
                speculator.record(drafts.len(), kept);
                if let Some(flight) = flight {
                    ahead = speculator.land(flight, generation.tokens()).await;
                }
            }
            // Forget the refused drafts' positions everywhere.
            let (_, fed) = generation.pending();
            if kept < drafts.len() && generation.finished().is_none() {
                pipeline.truncate(fed).await?;
            }
        }
    }
    .await;
    let (finish, error) = match result {
        Ok(finish) => (finish, None),
        Err(e) => (Finish::Error(e.to_string()), Some(e)),
    };
    let record = SessionRecord {
        id: context.id.clone(),
        caller: context.caller.clone(),
        model: context.model.clone(),
        model_id: context.model_id,
        route: pipeline.stages().into_iter().map(RouteStage::from).collect(),
        prompt_tokens: job.prompt.len(),
        billed_prompt_tokens: if job.bills_prompt { job.prompt.len() } else { 0 },
        completion_tokens: completion,
        finish,
        failovers: pipeline.failovers(),
        started_ms,
        first_token_ms: first_token.map(|d| d.as_secs_f64() * 1e3),
        duration_ms: started.elapsed().as_secs_f64() * 1e3,
        speculation: speculator.map(|s| s.stats),
    };
    Outcome { record, error }
}

/// Log-probabilities of `prompt[1..]` given the hidden states of every
/// prompt position, computed a few rows at a time.
fn prompt_logprobs(client: &ClientParts, prompt: &[u32], hidden: &HiddenStates, top: usize) -> Result<Vec<TokenLogprob>, ForwardError> {
    let dim = hidden.dim();
    let rows = prompt.len().saturating_sub(1);
    let mut out = Vec::with_capacity(rows);
    for chunk_start in (0..rows).step_by(16) {
        let chunk_end = (chunk_start + 16).min(rows);
        let states = HiddenStates::new(chunk_end - chunk_start, dim, hidden.as_slice()[chunk_start * dim..chunk_end * dim].to_vec())?;
        let logits = client.logits(&states)?;
        let vocab = logits.len() / (chunk_end - chunk_start);
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            let lp = log_softmax(row);
            let next = prompt[chunk_start + i + 1] as usize;
            out.push(TokenLogprob { logprob: lp.get(next).copied().unwrap_or(f32::NEG_INFINITY), top: top_logprobs(&lp, top) });
        }
    }
    Ok(out)
}

/// Where finished sessions' records go.
pub trait RecordSink: Send + Sync {
    fn record(&self, record: &SessionRecord);
}

/// Appends every record as one JSON line to a file (`--session-log`).
pub struct SessionLog {
    file: std::sync::Mutex<std::fs::File>,
}

impl SessionLog {
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { file: std::sync::Mutex::new(file) })
    }
}

impl RecordSink for SessionLog {
    fn record(&self, record: &SessionRecord) {
        use std::io::Write;
        let Ok(mut line) = serde_json::to_string(record) else { return };
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "cannot append to the session log");
        }
    }
}

/// The peer of a stage, when it is a remote node.
pub fn stage_peer(stage: &RouteStage) -> Option<PeerId> {
    stage.peer.as_deref().and_then(|p| p.parse().ok())
}
