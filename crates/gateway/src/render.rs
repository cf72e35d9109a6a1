//! A request's session events as OpenAI answers: one JSON body, or a
//! stream of server-sent chunks ending in `[DONE]`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use hotpot_engine::{FinishReason, TokenLogprob};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::openai::*;
use crate::plan::{ChatShape, CompletionShape};
use crate::service::{Gateway, RequestEvents};
use crate::session::SessionEvent;

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
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

fn top_map(gateway: &Gateway, lp: &TokenLogprob) -> BTreeMap<String, f32> {
    lp.top.iter().map(|&(id, l)| (piece(gateway, id).0, l)).collect()
}

type SseEvent = Result<Event, Infallible>;

fn sse_stream(rx: mpsc::Receiver<SseEvent>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|event| (event, rx)) });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// One streamed answer: its SSE channel, and the envelope every chunk
/// shares (with no choices of its own).
struct ChunkStream<C> {
    tx: mpsc::Sender<SseEvent>,
    head: Answer<C>,
}

impl<C: Clone + serde::Serialize> ChunkStream<C> {
    fn chunk(&self, choices: Vec<C>, usage: Option<Usage>) -> SseEvent {
        let answer = Answer { choices, usage, ..self.head.clone() };
        Ok(Event::default().data(serde_json::to_string(&answer).unwrap_or_default()))
    }

    /// Sends one chunk; false when the client has gone.
    async fn send(&self, choices: Vec<C>) -> bool {
        self.tx.send(self.chunk(choices, None)).await.is_ok()
    }

    /// Sends each event as a chunk (`to_choice` shapes it, `None` skips
    /// it) until `expected` choices are done or one fails (its error goes
    /// out as an event). The tokens streamed, or `None` when the client
    /// has gone.
    async fn relay(&self, events: &mut RequestEvents, expected: usize, mut to_choice: impl FnMut(SessionEvent) -> Option<C>) -> Option<usize> {
        let (mut done, mut tokens) = (0, 0);
        while done < expected {
            let event = match events.recv().await {
                None => break,
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    let _ = self.tx.send(Ok(Event::default().data(e.body().to_string()))).await;
                    break;
                }
            };
            match &event {
                SessionEvent::Done { .. } => done += 1,
                SessionEvent::Token { .. } => tokens += 1,
                SessionEvent::Prompt { .. } => {}
            }
            if let Some(choice) = to_choice(event)
                && !self.send(vec![choice]).await
            {
                return None;
            }
        }
        Some(tokens)
    }

    /// Sends the usage chunk when asked, then `[DONE]`.
    async fn finish(&self, usage: Usage, include_usage: bool) {
        if include_usage {
            let _ = self.tx.send(self.chunk(Vec::new(), Some(usage))).await;
        }
        let _ = self.tx.send(Ok(Event::default().data("[DONE]"))).await;
    }
}

/// The answer to a chat completion.
pub(crate) async fn chat(gateway: Arc<Gateway>, shape: ChatShape, mut events: RequestEvents) -> Result<Response, ApiError> {
    let (created, model) = (now_secs(), gateway.model.name.clone());
    let n = shape.n;
    if shape.stream {
        let (tx, rx) = mpsc::channel(4);
        let out = ChunkStream { tx, head: ChatChunk::new("chat.completion.chunk", shape.id, created, model, gateway.fingerprint.clone()) };
        tokio::spawn(async move {
            for index in 0..n {
                let delta = Delta { role: Some("assistant"), content: Some(String::new()), tool_calls: None };
                if !out.send(vec![ChatChunkChoice { index, delta, logprobs: None, finish_reason: None }]).await {
                    return;
                }
            }
            // With tools, text that may be a call is held back until the end.
            let mut splitters: Vec<Option<crate::tools::Splitter>> =
                (0..n).map(|_| shape.tools.as_ref().map(|names| crate::tools::Splitter::new(names.clone()))).collect();
            let relayed = out
                .relay(&mut events, n as usize, |event| match event {
                    SessionEvent::Token { index, token, text, logprob } => {
                        let logprobs = logprob.map(|lp| ChoiceLogprobs { content: vec![chat_logprob(&gateway, token, &lp)] });
                        let text = match &mut splitters[index as usize] {
                            Some(splitter) => splitter.push(&text),
                            None => text,
                        };
                        let shown = !text.is_empty() || logprobs.is_some();
                        shown.then_some(ChatChunkChoice {
                            index,
                            delta: Delta { role: None, content: Some(text), tool_calls: None },
                            logprobs,
                            finish_reason: None,
                        })
                    }
                    SessionEvent::Done { index, finish, .. } => {
                        let mut finish_reason = finish.as_str();
                        let mut delta = Delta::default();
                        if let Some(splitter) = splitters[index as usize].take() {
                            let parsed = splitter.finish();
                            delta.content = parsed.content;
                            if !parsed.calls.is_empty() {
                                delta.tool_calls = Some(crate::tools::outs(parsed.calls, true));
                                finish_reason = "tool_calls";
                            }
                        }
                        Some(ChatChunkChoice { index, delta, logprobs: None, finish_reason: Some(finish_reason) })
                    }
                    SessionEvent::Prompt { .. } => None,
                })
                .await;
            if let Some(tokens) = relayed {
                out.finish(Usage::new(shape.prompt_tokens, tokens), shape.include_usage).await;
            }
        });
        return Ok(sse_stream(rx));
    }

    let mut texts = vec![String::new(); n as usize];
    let mut logprobs: Vec<Option<Vec<TokenLogprobOut>>> = vec![shape.logprobs.then(Vec::new); n as usize];
    let mut finishes = vec![FinishReason::Length; n as usize];
    let (mut done, mut tokens) = (0, 0);
    while done < n {
        match events.recv().await {
            Some(Ok(SessionEvent::Token { index, token, text, logprob })) => {
                tokens += 1;
                texts[index as usize].push_str(&text);
                if let (Some(list), Some(lp)) = (&mut logprobs[index as usize], logprob) {
                    list.push(chat_logprob(&gateway, token, &lp));
                }
            }
            Some(Ok(SessionEvent::Done { index, finish, .. })) => {
                finishes[index as usize] = finish;
                done += 1;
            }
            Some(Ok(SessionEvent::Prompt { .. })) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(ApiError::Internal("a generation ended without finishing".into())),
        }
    }
    let choices = (0..n as usize)
        .map(|i| {
            let text = std::mem::take(&mut texts[i]);
            let mut finish_reason = finishes[i].as_str();
            let message = if let Some(names) = &shape.tools {
                let parsed = crate::tools::parse(&text, names);
                let calls = (!parsed.calls.is_empty()).then(|| crate::tools::outs(parsed.calls, false));
                if calls.is_some() {
                    finish_reason = "tool_calls";
                }
                ChatMessageOut { role: "assistant", content: parsed.content, tool_calls: calls }
            } else {
                ChatMessageOut { role: "assistant", content: Some(text), tool_calls: None }
            };
            ChatChoice { index: i as u32, message, logprobs: logprobs[i].take().map(|content| ChoiceLogprobs { content }), finish_reason }
        })
        .collect();
    let usage = Usage::new(shape.prompt_tokens, tokens);
    let response = ChatResponse { choices, usage: Some(usage), ..Answer::new("chat.completion", shape.id, created, model, gateway.fingerprint.clone()) };
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

/// The echoed prompt's log-probabilities as one choice fragment.
fn prompt_choice(gateway: &Gateway, shape: &CompletionShape, index: u32, logprobs: &[TokenLogprob]) -> CompletionChoice {
    let prompt = shape.prompt_of(index);
    let tokenizer = gateway.client.tokenizer();
    let mut lp = shape.logprobs.map(|_| CompletionLogprobs::default());
    let mut text = String::new();
    for (i, l) in logprobs.iter().enumerate() {
        if let Some(lp) = &mut lp {
            lp.text_offset.push(text.chars().count());
            lp.tokens.push(piece(gateway, prompt[i + 1]).0);
            lp.token_logprobs.push(Some(l.logprob));
            lp.top_logprobs.push(Some(top_map(gateway, l)));
        }
        text.push_str(&tokenizer.decode(&prompt[i + 1..=i + 1]));
    }
    CompletionChoice { text, index, logprobs: lp, finish_reason: None }
}

/// The answer to a (legacy) completion.
pub(crate) async fn completions(gateway: Arc<Gateway>, shape: CompletionShape, mut events: RequestEvents) -> Result<Response, ApiError> {
    let (created, model) = (now_secs(), gateway.model.name.clone());
    let total = shape.choices();
    let tokenizer = gateway.client.tokenizer();
    let mut builds: Vec<CompletionBuild> = (0..total)
        .map(|i| {
            let mut b = CompletionBuild { logprobs: shape.logprobs.map(|_| CompletionLogprobs::default()), ..CompletionBuild::default() };
            if shape.echo {
                let prompt = shape.prompt_of(i as u32);
                if shape.logprobs.is_none() {
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

    if shape.stream {
        let (tx, rx) = mpsc::channel(4);
        let out = ChunkStream { tx, head: CompletionResponse::new("text_completion", shape.id.clone(), created, model, gateway.fingerprint.clone()) };
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
                    SessionEvent::Prompt { index, logprobs } => Some(prompt_choice(&gateway, &shape, index, &logprobs)),
                    SessionEvent::Token { index, token, text, logprob } => {
                        let lp = logprob.map(|l| CompletionLogprobs {
                            tokens: vec![piece(&gateway, token).0],
                            token_logprobs: vec![Some(l.logprob)],
                            top_logprobs: vec![Some(top_map(&gateway, &l))],
                            text_offset: vec![0],
                        });
                        Some(CompletionChoice { text, index, logprobs: lp, finish_reason: None })
                    }
                    SessionEvent::Done { index, finish, .. } => {
                        Some(CompletionChoice { text: String::new(), index, logprobs: None, finish_reason: Some(finish.as_str()) })
                    }
                })
                .await;
            if let Some(tokens) = relayed {
                out.finish(Usage::new(shape.prompt_tokens(), tokens), shape.include_usage).await;
            }
        });
        return Ok(sse_stream(rx));
    }

    let (mut done, mut tokens) = (0, 0);
    while done < total {
        match events.recv().await {
            Some(Ok(SessionEvent::Prompt { index, logprobs })) => {
                let prompt = shape.prompt_of(index);
                for (i, l) in logprobs.iter().enumerate() {
                    let text = tokenizer.decode(&prompt[i + 1..=i + 1]);
                    builds[index as usize].push_token(&text, piece(&gateway, prompt[i + 1]).0, Some(l.logprob), Some(top_map(&gateway, l)));
                }
            }
            Some(Ok(SessionEvent::Token { index, token, text, logprob })) => {
                tokens += 1;
                let (token_text, top_text) = match &logprob {
                    Some(l) => (piece(&gateway, token).0, Some(top_map(&gateway, l))),
                    None => (String::new(), None),
                };
                builds[index as usize].push_token(&text, token_text, logprob.map(|l| l.logprob), top_text);
            }
            Some(Ok(SessionEvent::Done { index, finish, .. })) => {
                builds[index as usize].finish = Some(finish.as_str());
                done += 1;
            }
            Some(Err(e)) => return Err(e),
            None => return Err(ApiError::Internal("a generation ended without finishing".into())),
        }
    }
    let choices = builds
        .into_iter()
        .enumerate()
        .map(|(i, b)| CompletionChoice { text: b.text, index: i as u32, logprobs: b.logprobs, finish_reason: b.finish })
        .collect();
    let usage = Usage::new(shape.prompt_tokens(), tokens);
    let response = CompletionResponse { choices, usage: Some(usage), ..Answer::new("text_completion", shape.id, created, model, gateway.fingerprint.clone()) };
    Ok(Json(response).into_response())
}
