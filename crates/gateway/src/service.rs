//! The gateway's core: turns validated requests into generations over the
//! swarm and reports their tokens as events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hotpot_core::ModelId;
use hotpot_core::placement::{Served, gaps};
use hotpot_engine::{ClientParts, FinishReason, ForwardError, Generation, GenerationParams, HiddenStates, TokenLogprob, log_softmax, top_logprobs};
use hotpot_net::Network;
use tokio::sync::mpsc;

use crate::audit::{AuditConfig, Auditor};
use crate::chain::{ChainConfig, ChainError, ChainEvent, Observer, RemoteChain};
use crate::directory::SharedDirectory;
use crate::error::ApiError;
use crate::keys::KeyStore;
use crate::metrics::Metrics;

/// How the gateway runs.
#[derive(Debug)]
pub struct GatewayConfig {
    /// The name clients use for the model (its alias).
    pub model_name: String,
    /// Audits of node work (`None`: no audits).
    pub audit: Option<AuditConfig>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    pub chain: ChainConfig,
    pub keys: Option<KeyStore>,
    /// Most choices per request (`n`).
    pub max_choices: u32,
}

impl GatewayConfig {
    pub fn new(model_name: impl Into<String>) -> Self {
        Self { model_name: model_name.into(), audit: None, max_body_bytes: 4 << 20, chain: ChainConfig::default(), keys: None, max_choices: 8 }
    }
}

/// The model the gateway serves.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub name: String,
    pub id: ModelId,
    pub n_blocks: u32,
    pub dim: usize,
    pub context: usize,
}

pub struct Gateway {
    pub(crate) model: ServedModel,
    pub(crate) client: Arc<ClientParts>,
    network: Network,
    directory: SharedDirectory,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config: GatewayConfig,
    pub(crate) fingerprint: String,
    auditor: Option<Arc<Auditor>>,
}

/// One choice to generate.
#[derive(Debug, Clone)]
pub(crate) struct ChoiceJob {
    pub index: u32,
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
    /// Alternatives to report with each prompt token's log-probability
    /// (completions with `echo` and `logprobs`).
    pub prompt_logprobs: Option<usize>,
}

/// What a running choice reports.
#[derive(Debug, Clone)]
pub(crate) enum ChoiceEvent {
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

/// A choice whose route is open, ready to run.
pub(crate) struct PreparedChoice {
    job: ChoiceJob,
    chain: RemoteChain,
    generation: Generation,
}

impl Gateway {
    /// A gateway for `client`'s model over `network`; follows the model's
    /// heartbeats and asks the swarm for its nodes once.
    pub async fn new(client: Arc<ClientParts>, model_id: ModelId, network: Network, config: GatewayConfig) -> Arc<Self> {
        let c = client.config();
        let model = ServedModel { name: config.model_name.clone(), id: model_id, n_blocks: c.n_blocks, dim: c.dim, context: c.context_length };
        let directory = SharedDirectory::follow(&network, model_id).await;
        directory.refresh(&network, &model_id, model.n_blocks, Duration::from_secs(3)).await;
        let fingerprint = format!("hotpot-{}-{}", env!("CARGO_PKG_VERSION"), &model_id.to_full_string()[4..12]);
        let metrics = Arc::new(Metrics::default());
        let auditor = config.audit.clone().map(|audit| Auditor::new(network.clone(), directory.clone(), model.clone(), audit, Arc::clone(&metrics)));
        Arc::new(Self { model, client, network, directory, metrics, config, fingerprint, auditor })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn model(&self) -> &ServedModel {
        &self.model
    }

    /// Blocks no usable node serves right now.
    pub fn missing_blocks(&self) -> Vec<hotpot_core::LayerSpan> {
        let served: Vec<Served> = self
            .directory
            .with(|d| d.usable(&self.model.id))
            .iter()
            .filter(|r| r.info.n_blocks == self.model.n_blocks)
            .map(|r| Served { span: r.info.span, throughput: r.info.throughput })
            .collect();
        gaps(self.model.n_blocks, &served)
    }

    /// Whether `name` names the served model (its alias or its id).
    pub fn serves(&self, name: &str) -> bool {
        name == self.model.name || self.model.id.matches(name)
    }

    fn observer(&self) -> Observer {
        let metrics = Arc::clone(&self.metrics);
        Arc::new(move |event: ChainEvent<'_>| match event {
            ChainEvent::SessionOpened(_) => {
                metrics.node_sessions.inc();
            }
            ChainEvent::SessionClosed(_) => {
                metrics.node_sessions.dec();
            }
            ChainEvent::Step { peer, sent, received } => metrics.record_traffic(peer, sent, received),
            ChainEvent::Failover => {
                metrics.failovers.inc();
            }
        })
    }

    /// Opens a route for `job` (so that a swarm that cannot serve the
    /// model fails the request before any streaming starts).
    pub(crate) async fn prepare(&self, job: ChoiceJob) -> Result<PreparedChoice, ApiError> {
        let max_len = (job.prompt.len() + job.params.max_tokens).min(self.model.context);
        let config = ChainConfig { max_len: max_len + 1, ..self.config.chain.clone() };
        let generation = Generation::new(job.prompt.clone(), job.params.clone(), self.model.context).map_err(forward_error)?;
        let chain =
            RemoteChain::open(self.network.clone(), self.directory.clone(), self.model.id, self.model.n_blocks, self.model.dim, config, Some(self.observer()))
                .await
                .map_err(|e| self.chain_error(e))?;
        Ok(PreparedChoice { job, chain, generation })
    }

    fn chain_error(&self, e: ChainError) -> ApiError {
        match e {
            ChainError::Missing(missing) => ApiError::Unavailable(format!("the swarm cannot serve {} right now: {missing}", self.model.name)),
            ChainError::GaveUp { failures, last } => {
                ApiError::Unavailable(format!("the swarm failed {failures} times on this request; the last failure: {last}"))
            }
            ChainError::Forward(e) => forward_error(e),
            ChainError::Internal(e) => ApiError::Internal(e),
        }
    }

    /// Runs a prepared choice to its end, sending events to `events`. Stops
    /// early (and frees its sessions) when nobody listens any more.
    pub(crate) async fn run(&self, prepared: PreparedChoice, events: mpsc::Sender<ChoiceEvent>, started: Instant) -> Result<(), ApiError> {
        let PreparedChoice { job, mut chain, mut generation } = prepared;
        let result = self.drive(&job, &mut chain, &mut generation, &events, started).await;
        let transcript = self.auditor.as_ref().map(|_| chain.transcript());
        chain.close().await;
        if let (Some(auditor), Some(transcript)) = (&self.auditor, transcript) {
            auditor.after_session(transcript);
        }
        result
    }

    async fn drive(
        &self,
        job: &ChoiceJob,
        chain: &mut RemoteChain,
        generation: &mut Generation,
        events: &mpsc::Sender<ChoiceEvent>,
        started: Instant,
    ) -> Result<(), ApiError> {
        let index = job.index;
        let mut last_token: Option<Instant> = None;
        // Prompt log-probabilities need the prefill even when nothing is generated.
        let mut prompt_pending = job.prompt_logprobs.is_some();
        loop {
            if let Some(finish) = generation.finished()
                && !prompt_pending
            {
                let _ = events.send(ChoiceEvent::Done { index, finish, completion_tokens: generation.completion().len() }).await;
                return Ok(());
            }
            let (tokens, start) = generation.pending();
            let tokens = tokens.to_vec();
            let prefill = start == 0;
            let parts = Arc::clone(&self.client);
            let hidden = compute(move || parts.embed(&tokens)).await?;
            let out = chain.forward(hidden, start).await.map_err(|e| self.chain_error(e))?;
            generation.mark_fed();
            if prefill && let Some(top) = job.prompt_logprobs {
                prompt_pending = false;
                let logprobs = self.prompt_logprobs(&job.prompt, &out, top).await?;
                if events.send(ChoiceEvent::Prompt { index, logprobs }).await.is_err() {
                    return Ok(());
                }
                if generation.finished().is_some() {
                    continue;
                }
            }
            let parts = Arc::clone(&self.client);
            let last = out.last_row();
            let logits = compute(move || parts.logits(&last)).await?;
            let step = generation.accept(&logits, &self.client);
            let now = Instant::now();
            match last_token {
                None => self.metrics.time_to_first_token.observe(now.duration_since(started).as_secs_f64()),
                Some(previous) => self.metrics.token_latency.observe(now.duration_since(previous).as_secs_f64()),
            }
            last_token = Some(now);
            let event = ChoiceEvent::Token { index, token: step.token, text: step.text, logprob: step.logprob };
            if events.send(event).await.is_err() {
                tracing::debug!("the client went away; closing its sessions");
                return Ok(());
            }
        }
    }

    /// Log-probabilities of `prompt[1..]` given the hidden states of every
    /// prompt position, computed a few rows at a time.
    async fn prompt_logprobs(&self, prompt: &[u32], hidden: &HiddenStates, top: usize) -> Result<Vec<TokenLogprob>, ApiError> {
        let dim = hidden.dim();
        let rows = prompt.len().saturating_sub(1);
        let mut out = Vec::with_capacity(rows);
        for chunk_start in (0..rows).step_by(16) {
            let chunk_end = (chunk_start + 16).min(rows);
            let data = hidden.as_slice()[chunk_start * dim..chunk_end * dim].to_vec();
            let states = HiddenStates::new(chunk_end - chunk_start, dim, data).map_err(forward_error)?;
            let parts = Arc::clone(&self.client);
            let logits = compute(move || parts.logits(&states)).await?;
            let vocab = logits.len() / (chunk_end - chunk_start);
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                let lp = log_softmax(row);
                let next = prompt[chunk_start + i + 1] as usize;
                out.push(TokenLogprob { logprob: lp.get(next).copied().unwrap_or(f32::NEG_INFINITY), top: top_logprobs(&lp, top) });
            }
        }
        Ok(out)
    }
}

fn forward_error(e: ForwardError) -> ApiError {
    match e {
        ForwardError::ContextFull { needed, max } => ApiError::BadRequest {
            message: format!("this model's context is {max} tokens, and the request needs {needed}"),
            param: Some("messages".into()),
            code: Some("context_length_exceeded"),
        },
        ForwardError::Empty => ApiError::bad_param("prompt", "the prompt is empty"),
        ForwardError::Token { token, vocab } => ApiError::bad_param("prompt", format!("token id {token} is outside the vocabulary of {vocab}")),
        other => ApiError::Internal(other.to_string()),
    }
}

/// Client-side compute (embedding, head) off the async workers' hot path.
async fn compute<R: Send + 'static>(f: impl FnOnce() -> Result<R, ForwardError> + Send + 'static) -> Result<R, ApiError> {
    let run = move || f().map_err(forward_error);
    if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        return tokio::task::block_in_place(run);
    }
    tokio::task::spawn_blocking(run).await.map_err(|e| ApiError::Internal(e.to_string()))?
}
