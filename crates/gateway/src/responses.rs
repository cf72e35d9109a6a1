//! OpenAI's Responses API (`POST /v1/responses`) for text and function
//! tools, one answer or a stream of typed events, over the same planning
//! and session driver as chat completions: the request becomes a chat
//! request (instructions → system message; input items → messages,
//! `function_call` items → assistant tool calls, `function_call_output` →
//! tool messages; function tools, `tool_choice`, `text.format`), and the
//! answer becomes output items (`message` with `output_text`,
//! `function_call`). Responses are not stored: `previous_response_id` is
//! refused.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use hotpot_engine::FinishReason;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::keys::Caller;
use crate::openai::ChatRequest;
use crate::service::{Gateway, RequestEvents};
use crate::session::SessionEvent;

/// `POST /v1/responses`.
#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    pub model: String,
    pub input: Input,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stream: bool,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", …}}`.
    #[serde(default)]
    pub text: Option<Value>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub hotpot: Option<Value>,
}

/// `input`: a text, or a list of items.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Items(Vec<Value>),
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", hotpot_core::hex(&rand::random::<[u8; 16]>()))
}

/// The text of an item's `content`: a string, or parts of type
/// `input_text` / `output_text` / `text`.
fn content_text(content: &Value, at: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (i, part) in parts.iter().enumerate() {
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::bad_param(
                            &format!("{at}.content[{i}]"),
                            format!("content parts of type {kind:?} are not supported (text only)"),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::bad_param(&format!("{at}.content"), "content must be a string or a list of text parts")),
    }
}

/// The chat messages the request's instructions and input stand for.
fn messages(request: &ResponsesRequest) -> Result<Vec<Value>, ApiError> {
    let mut messages = Vec::new();
    if let Some(instructions) = &request.instructions {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    let items = match &request.input {
        Input::Text(text) => return Ok([messages, vec![json!({"role": "user", "content": text})]].concat()),
        Input::Items(items) => items,
    };
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        match item["type"].as_str().unwrap_or("message") {
            "message" => {
                let role = item["role"].as_str().ok_or_else(|| ApiError::bad_param(&at, "a message needs a role"))?;
                messages.push(json!({"role": role, "content": content_text(&item["content"], &at)?}));
            }
            "function_call" => {
                let (Some(call_id), Some(name), Some(arguments)) = (item["call_id"].as_str(), item["name"].as_str(), item["arguments"].as_str()) else {
                    return Err(ApiError::bad_param(&at, "a function_call item needs call_id, name and arguments"));
                };
                let call = json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}});
                // Calls made together are one assistant turn.
                match messages.last_mut() {
                    Some(last) if last["role"] == "assistant" && last["tool_calls"].is_array() => {
                        last["tool_calls"].as_array_mut().expect("checked").push(call);
                    }
                    _ => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let (Some(call_id), Some(output)) = (item["call_id"].as_str(), item.get("output")) else {
                    return Err(ApiError::bad_param(&at, "a function_call_output item needs call_id and output"));
                };
                let output = output.as_str().map_or_else(|| output.to_string(), str::to_string);
                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
            }
            other => return Err(ApiError::bad_param(&at, format!("input items of type `{other}` are not supported"))),
        }
    }
    Ok(messages)
}

/// The chat request a responses request stands for.
fn to_chat(request: &ResponsesRequest) -> Result<ChatRequest, ApiError> {
    if request.previous_response_id.is_some() {
        return Err(ApiError::bad_param("previous_response_id", "responses are not stored here: send the whole conversation in `input`"));
    }
    let mut chat = json!({
        "model": request.model,
        "messages": messages(request)?,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_completion_tokens": request.max_output_tokens,
        "parallel_tool_calls": request.parallel_tool_calls,
        "user": request.user,
        "hotpot": request.hotpot,
    });
    if let Some(tools) = &request.tools {
        let mut out = Vec::with_capacity(tools.len());
        for (i, tool) in tools.iter().enumerate() {
            if tool["type"] != "function" {
                return Err(ApiError::bad_param(&format!("tools[{i}]"), "only function tools are supported"));
            }
            let mut function = tool.clone();
            if let Some(f) = function.as_object_mut() {
                f.remove("type");
            }
            out.push(json!({"type": "function", "function": function}));
        }
        chat["tools"] = Value::Array(out);
    }
    if let Some(choice) = &request.tool_choice {
        chat["tool_choice"] = match choice {
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
                json!({"type": "function", "function": {"name": o.get("name").cloned().unwrap_or(Value::Null)}})
            }
            other => other.clone(),
        };
    }
    if let Some(format) = request.text.as_ref().and_then(|t| t.get("format")) {
        chat["response_format"] = match format["type"].as_str() {
            Some("json_schema") => json!({"type": "json_schema", "json_schema": {
                "name": format["name"], "schema": format["schema"], "strict": format["strict"], "description": format["description"],
            }}),
            _ => format.clone(),
        };
    }
    serde_json::from_value(chat).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// What a response object repeats of its request.
struct Echo {
    id: String,
    created_at: u64,
    model: String,
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    tools: Vec<Value>,
    tool_choice: Value,
    parallel_tool_calls: bool,
    text: Value,
    metadata: Value,
    user: Option<String>,
}

impl Echo {
    fn of(request: &ResponsesRequest, model: &str) -> Self {
        Self {
            id: new_id("resp"),
            created_at: now_secs(),
            model: model.to_string(),
            instructions: request.instructions.clone(),
            max_output_tokens: request.max_output_tokens,
            temperature: request.temperature,
            top_p: request.top_p,
            tools: request.tools.clone().unwrap_or_default(),
            tool_choice: request.tool_choice.clone().unwrap_or_else(|| "auto".into()),
            parallel_tool_calls: request.parallel_tool_calls.unwrap_or(true),
            text: request.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})),
            metadata: request.metadata.clone().unwrap_or_else(|| json!({})),
            user: request.user.clone(),
        }
    }

    /// The response object with `output` so far.
    fn response(&self, status: &str, output: &[Value], usage: Option<(usize, usize)>, incomplete: bool) -> Value {
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": null,
            "store": false,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "text": self.text,
            "tool_choice": self.tool_choice,
            "tools": self.tools,
            "truncation": "disabled",
            "metadata": self.metadata,
            "user": self.user,
            "usage": usage.map(|(input, output)| json!({
                "input_tokens": input,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input + output,
            })),
        })
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content = if status == "completed" { vec![output_text(text)] } else { Vec::new() };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn call_item(call: &crate::openai::FunctionCall, status: &str) -> Value {
    let arguments = if status == "completed" { call.arguments.as_str() } else { "" };
    json!({"type": "function_call", "id": new_id("fc"), "call_id": new_id("call"), "name": call.name, "arguments": arguments, "status": status})
}

/// `POST /v1/responses`: plans the request as a chat, drives it, answers
/// as a response object or a stream of response events.
pub(crate) async fn respond(gateway: Arc<Gateway>, caller: Option<Caller>, request: ResponsesRequest, size: usize) -> Result<Response, ApiError> {
    let echo = Echo::of(&request, &gateway.model.name);
    let stream = request.stream;
    let chat = to_chat(&request)?;
    let prepared = Arc::clone(&gateway);
    let (plan, shape) = gateway.prep.run(size, move || crate::plan::chat(&prepared, caller, chat)).await??;
    let (prompt_tokens, tools) = (shape.prompt_tokens, shape.tools);
    let events = gateway.start(plan).await?;
    if !stream {
        let (text, finish, tokens) = collect(events).await?;
        let (content, calls) = match &tools {
            Some(names) => {
                let parsed = crate::tools::parse(&text, names);
                (parsed.content, parsed.calls)
            }
            None => (Some(text), Vec::new()),
        };
        let mut output = Vec::new();
        if let Some(content) = content.filter(|c| !c.is_empty() || calls.is_empty()) {
            output.push(message_item(&new_id("msg"), &content, "completed"));
        }
        output.extend(calls.iter().map(|c| call_item(c, "completed")));
        let incomplete = finish == FinishReason::Length && calls.is_empty();
        let status = if incomplete { "incomplete" } else { "completed" };
        return Ok(Json(echo.response(status, &output, Some((prompt_tokens, tokens)), incomplete)).into_response());
    }
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut out = EventStream { tx, seq: 0, echo, output: Vec::new(), message: None };
        out.stream(events, tools, prompt_tokens).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|event| (event, rx)) });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// The one answer's text, how it finished, and its tokens.
async fn collect(mut events: RequestEvents) -> Result<(String, FinishReason, usize), ApiError> {
    let (mut text, mut tokens) = (String::new(), 0);
    loop {
        match events.recv().await {
            Some(Ok(SessionEvent::Token { text: piece, .. })) => {
                tokens += 1;
                text.push_str(&piece);
            }
            Some(Ok(SessionEvent::Done { finish, .. })) => return Ok((text, finish, tokens)),
            Some(Ok(SessionEvent::Prompt { .. })) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(ApiError::Internal("a generation ended without finishing".into())),
        }
    }
}

/// A streamed response: typed events, numbered.
struct EventStream {
    tx: mpsc::Sender<Result<Event, Infallible>>,
    seq: u64,
    echo: Echo,
    /// Finished output items.
    output: Vec<Value>,
    /// The message item being streamed: its id and text so far.
    message: Option<(String, String)>,
}

impl EventStream {
    /// Sends one event; false when the client has gone.
    async fn send(&mut self, kind: &str, mut body: Value) -> bool {
        body["type"] = kind.into();
        body["sequence_number"] = self.seq.into();
        self.seq += 1;
        self.tx.send(Ok(Event::default().event(kind).data(body.to_string()))).await.is_ok()
    }

    /// Streams text into the message item (opening it first).
    async fn text(&mut self, delta: &str) -> bool {
        if delta.is_empty() {
            return true;
        }
        let index = self.output.len();
        if self.message.is_none() {
            let id = new_id("msg");
            let item = message_item(&id, "", "in_progress");
            if !self.send("response.output_item.added", json!({"output_index": index, "item": item})).await {
                return false;
            }
            let part = json!({"item_id": id, "output_index": index, "content_index": 0, "part": output_text("")});
            if !self.send("response.content_part.added", part).await {
                return false;
            }
            self.message = Some((id, String::new()));
        }
        let (id, text) = self.message.as_mut().expect("opened above");
        text.push_str(delta);
        let id = id.clone();
        self.send("response.output_text.delta", json!({"item_id": id, "output_index": index, "content_index": 0, "delta": delta, "logprobs": []})).await
    }

    /// Closes the message item, if one is open.
    async fn close_message(&mut self) -> bool {
        let Some((id, text)) = self.message.take() else { return true };
        let index = self.output.len();
        let at = json!({"item_id": id, "output_index": index, "content_index": 0});
        let ok = self.send("response.output_text.done", json!({"text": text, "logprobs": []}).merge(&at)).await
            && self.send("response.content_part.done", json!({"part": output_text(&text)}).merge(&at)).await;
        let item = message_item(&id, &text, "completed");
        self.output.push(item.clone());
        ok && self.send("response.output_item.done", json!({"output_index": index, "item": item})).await
    }

    async fn call(&mut self, call: &crate::openai::FunctionCall) -> bool {
        let index = self.output.len();
        let mut item = call_item(call, "in_progress");
        let id = item["id"].clone();
        if !self.send("response.output_item.added", json!({"output_index": index, "item": item})).await {
            return false;
        }
        let at = json!({"item_id": id, "output_index": index});
        if !self.send("response.function_call_arguments.delta", json!({"delta": call.arguments}).merge(&at)).await
            || !self.send("response.function_call_arguments.done", json!({"arguments": call.arguments, "name": call.name}).merge(&at)).await
        {
            return false;
        }
        item["arguments"] = call.arguments.clone().into();
        item["status"] = "completed".into();
        self.output.push(item.clone());
        self.send("response.output_item.done", json!({"output_index": index, "item": item})).await
    }

    async fn stream(&mut self, mut events: RequestEvents, tools: Option<Vec<String>>, prompt_tokens: usize) {
        let head = self.echo.response("in_progress", &[], None, false);
        if !self.send("response.created", json!({"response": head})).await || !self.send("response.in_progress", json!({"response": head})).await {
            return;
        }
        // With tools, text that may be a call is held back until the end.
        let mut splitter = tools.map(crate::tools::Splitter::new);
        let mut tokens = 0;
        let finish = loop {
            match events.recv().await {
                Some(Ok(SessionEvent::Token { text, .. })) => {
                    tokens += 1;
                    let shown = match &mut splitter {
                        Some(s) => s.push(&text),
                        None => text,
                    };
                    if !self.text(&shown).await {
                        return;
                    }
                }
                Some(Ok(SessionEvent::Done { finish, .. })) => break finish,
                Some(Ok(SessionEvent::Prompt { .. })) => {}
                Some(Err(e)) => {
                    let error = e.body()["error"].clone();
                    let _ = self.send("error", json!({"code": error["code"], "message": error["message"], "param": error["param"]})).await;
                    return;
                }
                None => return,
            }
        };
        let calls = match splitter {
            Some(s) => {
                let parsed = s.finish();
                if !self.text(parsed.content.as_deref().unwrap_or_default()).await {
                    return;
                }
                parsed.calls
            }
            None => Vec::new(),
        };
        if !self.close_message().await {
            return;
        }
        for call in &calls {
            if !self.call(call).await {
                return;
            }
        }
        let incomplete = finish == FinishReason::Length && calls.is_empty();
        let (status, kind) = if incomplete { ("incomplete", "response.incomplete") } else { ("completed", "response.completed") };
        let response = self.echo.response(status, &self.output, Some((prompt_tokens, tokens)), incomplete);
        let _ = self.send(kind, json!({"response": response})).await;
    }
}

/// `a.merge(b)`: `a` with `b`'s fields added.
trait Merge {
    fn merge(self, other: &Value) -> Value;
}

impl Merge for Value {
    fn merge(mut self, other: &Value) -> Value {
        if let (Some(a), Some(b)) = (self.as_object_mut(), other.as_object()) {
            for (k, v) in b {
                a.insert(k.clone(), v.clone());
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> ResponsesRequest {
        serde_json::from_value(body).expect("a request")
    }

    #[test]
    fn input_items_become_chat_messages() {
        let r = request(json!({
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"},
                {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}},
            "max_output_tokens": 9,
        }));
        let chat = to_chat(&r).expect("converts");
        let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(chat.messages[2].tool_calls.as_ref().map(Vec::len), Some(2), "calls made together are one turn");
        assert_eq!(chat.messages[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(chat.tools.as_ref().map(|t| t[0].function.name.as_str()), Some("get_weather"));
        assert_eq!(chat.max_completion_tokens, Some(9));
        assert!(matches!(chat.response_format, Some(crate::openai::ResponseFormat::JsonSchema { .. })));
        assert!(matches!(chat.tool_choice, Some(crate::openai::ToolChoice::Named { .. })));
        for bad in [
            json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
            json!({"model": "m", "input": [{"type": "reasoning"}]}),
        ] {
            assert!(matches!(to_chat(&request(bad)), Err(ApiError::BadRequest { .. })));
        }
    }
}
