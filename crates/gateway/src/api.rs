//! The HTTP face of the gateway: OpenAI's routes on axum.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hotpot_engine::{ChatMessage, FinishReason, GenerationParams, SamplingParams, TokenLogprob};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::keys::Caller;
use crate::metrics::{KeyLabels, RequestLabels};
use crate::openai::*;
use crate::service::{ChoiceEvent, ChoiceJob, Gateway, PreparedChoice};

/// The gateway's routes.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.config.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound { message: "no such route".into(), code: "not_found" } })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(Arc::clone(&gateway), count_requests))
        .with_state(gateway)
}

async fn count_requests(State(gateway): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let endpoint = request.extensions().get::<MatchedPath>().map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    gateway.metrics.requests.get_or_create(&RequestLabels { endpoint, status: response.status().as_u16() }).inc();
    response
}

/// A JSON body whose every failure is an OpenAI-shaped error.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge("the request body is too large".into())
            } else {
                ApiError::bad(rejection.body_text())
            }
        })?;
        serde_json::from_slice(&bytes).map(Body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
    }
}

impl Gateway {
    fn authorize(&self, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
        let Some(keys) = &self.config.keys else {
            return Ok(None);
        };
        let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        keys.admit(value).map(Some)
    }

    fn check_model(&self, name: &str) -> Result<(), ApiError> {
        if self.serves(name) {
            Ok(())
        } else {
            Err(ApiError::NotFound {
                message: format!("the model `{name}` does not exist (this gateway serves `{}`)", self.model.name),
                code: "model_not_found",
            })
        }
    }

    /// Counts tokens in metrics and against the caller's key.
    fn account(&self, caller: Option<&Caller>, usage: Usage) {
        self.metrics.tokens_in.inc_by(u64::from(usage.prompt_tokens));
        self.metrics.tokens_out.inc_by(u64::from(usage.completion_tokens));
        if let (Some(caller), Some(keys)) = (caller, &self.config.keys) {
            keys.charge(caller, u64::from(usage.total_tokens));
            self.metrics.key_tokens.get_or_create(&KeyLabels { key: caller.name.clone() }).inc_by(u64::from(usage.total_tokens));
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

struct Sampling {
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    n: Option<u32>,
}

/// OpenAI's sampling defaults (temperature 1, no top-k, no min-p), checked.
fn sampling(s: &Sampling, max_choices: u32) -> Result<(SamplingParams, u32), ApiError> {
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_param("temperature", format!("temperature must be in [0, 2], got {temperature}")));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_param("top_p", format!("top_p must be in (0, 1], got {top_p}")));
    }
    for (name, value) in [("presence_penalty", s.presence_penalty), ("frequency_penalty", s.frequency_penalty)] {
        if let Some(v) = value
            && !(-2.0..=2.0).contains(&v)
        {
            return Err(ApiError::bad_param(name, format!("{name} must be in [-2, 2], got {v}")));
        }
    }
    let n = s.n.unwrap_or(1);
    if n == 0 || n > max_choices {
        return Err(ApiError::bad_param("n", format!("n must be between 1 and {max_choices}, got {n}")));
    }
    let params = SamplingParams {
        temperature,
        top_k: 0,
        top_p,
        min_p: 0.0,
        seed: s.seed,
        repeat_penalty: 1.0,
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        penalty_last_n: usize::MAX,
    };
    Ok((params, n))
}

/// The per-choice copies of a request: seeds differ by choice.
fn choice_jobs(prompt: &[u32], params: &GenerationParams, n: u32, first_index: u32, prompt_logprobs: Option<usize>) -> Vec<ChoiceJob> {
    (0..n)
        .map(|i| {
            let mut params = params.clone();
            params.sampling.seed = params.sampling.seed.map(|s| s.wrapping_add(u64::from(i)));
            ChoiceJob { index: first_index + i, prompt: prompt.to_vec(), params, prompt_logprobs }
        })
        .collect()
}

/// Opens every choice's route; one failure fails the request.
async fn prepare_all(gateway: &Arc<Gateway>, jobs: Vec<ChoiceJob>) -> Result<Vec<PreparedChoice>, ApiError> {
    let prepared = futures::future::join_all(jobs.into_iter().map(|job| gateway.prepare(job))).await;
    prepared.into_iter().collect()
}

/// Runs prepared choices concurrently; their events arrive on the receiver.
fn spawn_choices(gateway: &Arc<Gateway>, prepared: Vec<PreparedChoice>, started: Instant) -> mpsc::Receiver<Result<ChoiceEvent, ApiError>> {
    let (tx, rx) = mpsc::channel(256);
    for choice in prepared {
        let (gateway, tx) = (Arc::clone(gateway), tx.clone());
        tokio::spawn(async move {
            let (events_tx, mut events_rx) = mpsc::channel(64);
            let forward = {
                let tx = tx.clone();
                async move {
                    while let Some(event) = events_rx.recv().await {
                        if tx.send(Ok(event)).await.is_err() {
                            break;
                        }
                    }
                }
            };
            let (result, ()) = tokio::join!(gateway.run(choice, events_tx, started), forward);
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
    rx
}

fn piece(gateway: &Gateway, token: u32) -> (String, Vec<u8>) {
    let tokenizer = gateway.client.tokenizer();
    (tokenizer.piece(token), tokenizer.token_bytes(token).to_vec())
}

fn chat_logprob(gateway: &Gateway, token: u32, lp: &TokenLogprob) -> TokenLogprobOut {
    let (text, bytes) = piece(gateway, token);
    let top_logprobs = lp
        .top
        .iter()
        .map(|&(id, logprob)| {
            let (token, bytes) = piece(gateway, id);
            TopLogprob { token, logprob, bytes }
        })
        .collect();
    TokenLogprobOut { token: text, logprob: lp.logprob, bytes, top_logprobs }
}

fn sse(event: &impl serde::Serialize) -> SseEvent {
    Ok(Event::default().data(serde_json::to_string(event).unwrap_or_default()))
}

fn sse_stream(rx: mpsc::Receiver<SseEvent>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|event| (event, rx)) });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

type SseEvent = Result<Event, Infallible>;

/// One streamed answer: its SSE channel, and the envelope every chunk
/// shares (with no choices of its own).
struct ChunkStream<C> {
    tx: mpsc::Sender<SseEvent>,
    head: Answer<C>,
}

impl<C: Clone + serde::Serialize> ChunkStream<C> {
    fn chunk(&self, choices: Vec<C>, usage: Option<Usage>) -> SseEvent {
        sse(&Answer { choices, usage, ..self.head.clone() })
    }

    /// Sends one chunk; false when the client has gone.
    async fn send(&self, choices: Vec<C>) -> bool {
        self.tx.send(self.chunk(choices, None)).await.is_ok()
    }

    /// Sends each choice event as a chunk (`to_choice` shapes it, `None`
    /// skips it) until `expected` choices are done or one fails (its error
    /// goes out as an event). The completion tokens, or `None` when the
    /// client has gone.
    async fn relay(
        &self,
        events: &mut mpsc::Receiver<Result<ChoiceEvent, ApiError>>,
        expected: usize,
        mut to_choice: impl FnMut(ChoiceEvent) -> Option<C>,
    ) -> Option<usize> {
        let (mut done, mut completion) = (0, 0);
        while done < expected {
            let event = match events.recv().await {
                None => break,
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    let _ = self.tx.send(Ok(Event::default().data(e.body().to_string()))).await;
                    break;
                }
            };
            if let ChoiceEvent::Done { completion_tokens, .. } = &event {
                done += 1;
                completion += completion_tokens;
            }
            if let Some(choice) = to_choice(event)
                && !self.send(vec![choice]).await
            {
                return None;
            }
        }
        Some(completion)
    }

    /// Bills the answer, sends the usage chunk when asked, then `[DONE]`.
    async fn finish(&self, gateway: &Gateway, caller: Option<&Caller>, usage: Usage, include_usage: bool) {
        gateway.account(caller, usage);
        if include_usage {
            let _ = self.tx.send(self.chunk(Vec::new(), Some(usage))).await;
        }
        let _ = self.tx.send(Ok(Event::default().data("[DONE]"))).await;
    }
}

async fn chat(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, Body(request): Body<ChatRequest>) -> Result<Response, ApiError> {
    let started = Instant::now();
    let caller = gateway.authorize(&headers)?;
    gateway.check_model(&request.model)?;
    if request.messages.is_empty() {
        return Err(ApiError::bad_param("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::bad_param(&format!("messages[{i}].role"), format!("unsupported role `{other}`")));
            }
        };
        let content = m.content.as_ref().map(|c| c.text()).transpose().map_err(|e| ApiError::bad_param(&format!("messages[{i}].content"), e))?;
        messages.push(ChatMessage::new(role, content.unwrap_or_default()));
    }
    let text = gateway.client.render_chat(&messages).map_err(|e| ApiError::bad_param("messages", e.to_string()))?;
    let prompt = gateway.client.tokenizer().encode(&text).map_err(|e| ApiError::bad_param("messages", e.to_string()))?;
    let context = gateway.model.context;
    let requested = request.max_completion_tokens.or(request.max_tokens).map(|n| n as usize);
    if requested == Some(0) {
        return Err(ApiError::bad_param("max_tokens", "max_tokens must be at least 1"));
    }
    if prompt.len() + requested.unwrap_or(1) > context {
        return Err(ApiError::BadRequest {
            message: format!(
                "this model's maximum context length is {context} tokens; the messages take {} tokens and {} more were requested",
                prompt.len(),
                requested.unwrap_or(1)
            ),
            param: Some("messages".into()),
            code: Some("context_length_exceeded"),
        });
    }
    let max_tokens = requested.unwrap_or(context - prompt.len());
    let (sampling_params, n) = sampling(
        &Sampling {
            temperature: request.temperature,
            top_p: request.top_p,
            seed: request.seed,
            presence_penalty: request.presence_penalty,
            frequency_penalty: request.frequency_penalty,
            n: request.n,
        },
        gateway.config.max_choices,
    )?;
    let top = request.top_logprobs.unwrap_or(0);
    if top > 20 {
        return Err(ApiError::bad_param("top_logprobs", "top_logprobs must be at most 20"));
    }
    if request.top_logprobs.is_some() && !request.logprobs {
        return Err(ApiError::bad_param("top_logprobs", "top_logprobs needs logprobs: true"));
    }
    let params = GenerationParams {
        sampling: sampling_params,
        max_tokens,
        stop: request.stop.clone().map(Stop::into_vec).unwrap_or_default(),
        logprobs: request.logprobs.then_some(top as usize),
    };
    let prepared = prepare_all(&gateway, choice_jobs(&prompt, &params, n, 0, None)).await?;
    let mut events = spawn_choices(&gateway, prepared, started);
    let (id, created, model) = (request_id("chatcmpl"), now_secs(), gateway.model.name.clone());
    let prompt_len = prompt.len();

    if request.stream {
        let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let (tx, rx) = mpsc::channel(64);
        let gw = Arc::clone(&gateway);
        let out = ChunkStream { tx, head: ChatChunk::new("chat.completion.chunk", id, created, model, gateway.fingerprint.clone()) };
        tokio::spawn(async move {
            for index in 0..n {
                let delta = Delta { role: Some("assistant"), content: Some(String::new()) };
                if !out.send(vec![ChatChunkChoice { index, delta, logprobs: None, finish_reason: None }]).await {
                    return;
                }
            }
            let relayed = out
                .relay(&mut events, n as usize, |event| match event {
                    ChoiceEvent::Token { index, token, text, logprob } => {
                        let logprobs = logprob.map(|lp| ChoiceLogprobs { content: vec![chat_logprob(&gw, token, &lp)] });
                        let shown = !text.is_empty() || logprobs.is_some();
                        shown.then_some(ChatChunkChoice { index, delta: Delta { role: None, content: Some(text) }, logprobs, finish_reason: None })
                    }
                    ChoiceEvent::Done { index, finish, .. } => {
                        Some(ChatChunkChoice { index, delta: Delta::default(), logprobs: None, finish_reason: Some(finish.as_str()) })
                    }
                    ChoiceEvent::Prompt { .. } => None,
                })
                .await;
            if let Some(completion) = relayed {
                out.finish(&gw, caller.as_ref(), Usage::new(prompt_len, completion), include_usage).await;
            }
        });
        return Ok(sse_stream(rx));
    }

    let mut texts = vec![String::new(); n as usize];
    let mut logprobs: Vec<Option<Vec<TokenLogprobOut>>> = vec![request.logprobs.then(Vec::new); n as usize];
    let mut finishes = vec![FinishReason::Length; n as usize];
    let (mut done, mut completion) = (0, 0);
    while done < n {
        match events.recv().await {
            Some(Ok(ChoiceEvent::Token { index, token, text, logprob })) => {
                texts[index as usize].push_str(&text);
                if let (Some(list), Some(lp)) = (&mut logprobs[index as usize], logprob) {
                    list.push(chat_logprob(&gateway, token, &lp));
                }
            }
            Some(Ok(ChoiceEvent::Done { index, finish, completion_tokens })) => {
                finishes[index as usize] = finish;
                completion += completion_tokens;
                done += 1;
            }
            Some(Ok(ChoiceEvent::Prompt { .. })) => {}
            Some(Err(e)) => return Err(e),
            None => {
                return Err(ApiError::Internal("a generation ended without finishing".into()));
            }
        }
    }
    let usage = Usage::new(prompt_len, completion);
    gateway.account(caller.as_ref(), usage);
    let choices = (0..n as usize)
        .map(|i| ChatChoice {
            index: i as u32,
            message: ChatMessageOut { role: "assistant", content: std::mem::take(&mut texts[i]) },
            logprobs: logprobs[i].take().map(|content| ChoiceLogprobs { content }),
            finish_reason: finishes[i].as_str(),
        })
        .collect();
    let response = ChatResponse { choices, usage: Some(usage), ..Answer::new("chat.completion", id, created, model, gateway.fingerprint.clone()) };
    Ok(Json(response).into_response())
}

/// A choice of a completion being assembled.
#[derive(Default)]
struct CompletionBuild {
    text: String,
    logprobs: Option<CompletionLogprobs>,
    finish: Option<&'static str>,
}

impl CompletionBuild {
    fn push_token(&mut self, text: &str, token: String, logprob: Option<f32>, top: Option<BTreeMap<String, f32>>) {
        if let Some(lp) = &mut self.logprobs {
            lp.text_offset.push(self.text.chars().count());
            lp.tokens.push(token);
            lp.token_logprobs.push(logprob);
            lp.top_logprobs.push(top);
        }
        self.text.push_str(text);
    }
}

fn top_map(gateway: &Gateway, lp: &TokenLogprob) -> BTreeMap<String, f32> {
    lp.top.iter().map(|&(id, l)| (piece(gateway, id).0, l)).collect()
}

async fn completions(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, Body(request): Body<CompletionRequest>) -> Result<Response, ApiError> {
    let started = Instant::now();
    let caller = gateway.authorize(&headers)?;
    gateway.check_model(&request.model)?;
    let tokenizer = gateway.client.tokenizer();
    let encode = |text: &str| tokenizer.encode(text).map_err(|e| ApiError::bad_param("prompt", e.to_string()));
    let prompts: Vec<Vec<u32>> = match &request.prompt {
        Prompt::Text(t) => vec![encode(t)?],
        Prompt::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![ids.clone()],
        Prompt::TokenLists(lists) => lists.clone(),
    };
    let vocab = gateway.client.config().vocab_size as u32;
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::bad_param("prompt", "the prompt is empty"));
    }
    if let Some(bad) = prompts.iter().flatten().find(|&&t| t >= vocab) {
        return Err(ApiError::bad_param("prompt", format!("token id {bad} is outside the vocabulary of {vocab} tokens")));
    }
    let max_tokens = request.max_tokens.unwrap_or(16) as usize;
    let context = gateway.model.context;
    if let Some(p) = prompts.iter().find(|p| p.len() + max_tokens.max(1) > context) {
        return Err(ApiError::BadRequest {
            message: format!("this model's maximum context length is {context} tokens; the prompt takes {} and max_tokens is {max_tokens}", p.len()),
            param: Some("prompt".into()),
            code: Some("context_length_exceeded"),
        });
    }
    let top = request.logprobs.map(|n| n as usize);
    if top.is_some_and(|n| n > 20) {
        return Err(ApiError::bad_param("logprobs", "logprobs must be at most 20"));
    }
    let (sampling_params, n) = sampling(
        &Sampling {
            temperature: request.temperature,
            top_p: request.top_p,
            seed: request.seed,
            presence_penalty: request.presence_penalty,
            frequency_penalty: request.frequency_penalty,
            n: request.n,
        },
        gateway.config.max_choices,
    )?;
    let params = GenerationParams { sampling: sampling_params, max_tokens, stop: request.stop.clone().map(Stop::into_vec).unwrap_or_default(), logprobs: top };
    let echo_logprobs = if request.echo { top } else { None };
    let jobs: Vec<ChoiceJob> = prompts.iter().enumerate().flat_map(|(pi, p)| choice_jobs(p, &params, n, pi as u32 * n, echo_logprobs)).collect();
    let total = jobs.len();
    let prepared = prepare_all(&gateway, jobs).await?;
    let mut events = spawn_choices(&gateway, prepared, started);
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let (id, created, model) = (request_id("cmpl"), now_secs(), gateway.model.name.clone());

    let mut builds: Vec<CompletionBuild> = (0..total)
        .map(|i| {
            let mut b = CompletionBuild { logprobs: top.map(|_| CompletionLogprobs::default()), ..CompletionBuild::default() };
            if request.echo {
                let prompt = &prompts[i / n as usize];
                if echo_logprobs.is_none() {
                    b.text = tokenizer.decode(prompt);
                } else {
                    // The first prompt token has no log-probability; the rest come in a Prompt event.
                    let (token, _) = piece(&gateway, prompt[0]);
                    b.push_token(&tokenizer.decode(&prompt[..1]), token, None, None);
                }
            }
            b
        })
        .collect();
    let prompt_text_of = |index: usize, at: usize| tokenizer.decode(&prompts[index / n as usize][at..=at]);

    if request.stream {
        let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let (tx, rx) = mpsc::channel(64);
        let gw = Arc::clone(&gateway);
        let prompts = prompts.clone();
        let out = ChunkStream { tx, head: CompletionResponse::new("text_completion", id, created, model, gateway.fingerprint.clone()) };
        tokio::spawn(async move {
            for (index, b) in builds.iter_mut().enumerate() {
                if !b.text.is_empty() {
                    let echo = CompletionChoice { text: std::mem::take(&mut b.text), index: index as u32, logprobs: b.logprobs.take(), finish_reason: None };
                    if !out.send(vec![echo]).await {
                        return;
                    }
                }
            }
            let relayed = out
                .relay(&mut events, total, |event| match event {
                    ChoiceEvent::Prompt { index, logprobs } => {
                        let prompt = &prompts[index as usize / n as usize];
                        let mut lp = top.map(|_| CompletionLogprobs::default());
                        let mut text = String::new();
                        for (i, l) in logprobs.iter().enumerate() {
                            let piece_text = gw.client.tokenizer().decode(&prompt[i + 1..=i + 1]);
                            if let Some(lp) = &mut lp {
                                lp.text_offset.push(text.chars().count());
                                lp.tokens.push(piece(&gw, prompt[i + 1]).0);
                                lp.token_logprobs.push(Some(l.logprob));
                                lp.top_logprobs.push(Some(top_map(&gw, l)));
                            }
                            text.push_str(&piece_text);
                        }
                        Some(CompletionChoice { text, index, logprobs: lp, finish_reason: None })
                    }
                    ChoiceEvent::Token { index, token, text, logprob } => {
                        let lp = logprob.map(|l| CompletionLogprobs {
                            tokens: vec![piece(&gw, token).0],
                            token_logprobs: vec![Some(l.logprob)],
                            top_logprobs: vec![Some(top_map(&gw, &l))],
                            text_offset: vec![0],
                        });
                        Some(CompletionChoice { text, index, logprobs: lp, finish_reason: None })
                    }
                    ChoiceEvent::Done { index, finish, .. } => {
                        Some(CompletionChoice { text: String::new(), index, logprobs: None, finish_reason: Some(finish.as_str()) })
                    }
                })
                .await;
            if let Some(completion) = relayed {
                out.finish(&gw, caller.as_ref(), Usage::new(prompt_tokens, completion), include_usage).await;
            }
        });
        return Ok(sse_stream(rx));
    }

    let (mut done, mut completion) = (0, 0);
    while done < total {
        match events.recv().await {
            Some(Ok(ChoiceEvent::Prompt { index, logprobs })) => {
                for (i, l) in logprobs.iter().enumerate() {
                    let prompt = &prompts[index as usize / n as usize];
                    let text = prompt_text_of(index as usize, i + 1);
                    builds[index as usize].push_token(&text, piece(&gateway, prompt[i + 1]).0, Some(l.logprob), Some(top_map(&gateway, l)));
                }
            }
            Some(Ok(ChoiceEvent::Token { index, token, text, logprob })) => {
                let (token_text, top_text) = match &logprob {
                    Some(l) => (piece(&gateway, token).0, Some(top_map(&gateway, l))),
                    None => (String::new(), None),
                };
                builds[index as usize].push_token(&text, token_text, logprob.map(|l| l.logprob), top_text);
            }
            Some(Ok(ChoiceEvent::Done { index, finish, completion_tokens })) => {
                builds[index as usize].finish = Some(finish.as_str());
                completion += completion_tokens;
                done += 1;
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(ApiError::Internal("a generation ended without finishing".into()));
            }
        }
    }
    let usage = Usage::new(prompt_tokens, completion);
    gateway.account(caller.as_ref(), usage);
    let choices = builds
        .into_iter()
        .enumerate()
        .map(|(i, b)| CompletionChoice { text: b.text, index: i as u32, logprobs: b.logprobs, finish_reason: b.finish })
        .collect();
    let response = CompletionResponse { choices, usage: Some(usage), ..Answer::new("text_completion", id, created, model, gateway.fingerprint.clone()) };
    Ok(Json(response).into_response())
}

async fn models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Json<ModelList>, ApiError> {
    gateway.authorize(&headers)?;
    let data = if gateway.missing_blocks().is_empty() {
        vec![ModelCard { id: gateway.model.name.clone(), object: "model", created: 0, owned_by: "hotpot" }]
    } else {
        Vec::new()
    };
    Ok(Json(ModelList { object: "list", data }))
}

async fn health(State(gateway): State<Arc<Gateway>>) -> Json<serde_json::Value> {
    let missing = gateway.missing_blocks();
    Json(serde_json::json!({
        "status": if missing.is_empty() { "ok" } else { "degraded" },
        "model": gateway.model.name,
        "model_id": gateway.model.id.to_full_string(),
        "missing_blocks": missing.iter().map(ToString::to_string).collect::<Vec<_>>(),
    }))
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], gateway.metrics.render())
}
