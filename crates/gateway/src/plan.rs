//! From a validated OpenAI request to the sessions that answer it: render
//! and tokenize the prompt, check it against the context, choose sampling
//! and lengths, and count what the request may spend.

use hotpot_engine::{ChatMessage, GenerationParams, SamplingParams};

use crate::error::ApiError;
use crate::keys::Caller;
use crate::openai::{ChatRequest, CompletionRequest, Prompt, ResponseFormat, Stop};
use crate::service::{Gateway, RequestPlan};
use crate::session::ChoiceJob;

/// The sampling fields both endpoints share.
struct Sampling<'a> {
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    n: Option<u32>,
    logit_bias: Option<&'a std::collections::HashMap<String, f32>>,
    /// llama-server's extensions.
    top_k: Option<usize>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
}

/// The grammar a `response_format` asks for (none for text).
fn response_grammar(gateway: &Gateway, format: Option<&ResponseFormat>) -> Result<Option<crate::constrain::Grammar>, ApiError> {
    let (schema, strict) = match format {
        None | Some(ResponseFormat::Text) => return Ok(None),
        Some(ResponseFormat::JsonObject) => (serde_json::json!({"type": "object"}), false),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            if json_schema.name.is_empty() || json_schema.name.len() > 64 {
                return Err(ApiError::bad_param("response_format.json_schema.name", "the schema's name must be 1 to 64 characters"));
            }
            (json_schema.schema.clone().unwrap_or_else(|| serde_json::json!({})), json_schema.strict.unwrap_or(false))
        }
    };
    let grammars = gateway.grammars().map_err(|e| ApiError::Internal(format!("constrained decoding is unavailable for this model: {e}")))?;
    grammars.json_schema(schema, strict).map(Some).map_err(|e| ApiError::bad_param("response_format", format!("the schema cannot be enforced: {e}")))
}

/// Most `logit_bias` entries a request may carry.
const MAX_LOGIT_BIAS: usize = 1024;

/// `logit_bias` checked: token ids below `vocab`, biases in [-100, 100].
fn logit_bias(map: Option<&std::collections::HashMap<String, f32>>, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = map else { return Ok(Vec::new()) };
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::bad_param("logit_bias", format!("logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {}", map.len())));
    }
    let mut out = Vec::with_capacity(map.len());
    for (key, &bias) in map {
        let token = key.parse::<u32>().ok().filter(|&t| (t as usize) < vocab);
        let Some(token) = token else {
            return Err(ApiError::bad_param("logit_bias", format!("logit_bias keys are token ids below {vocab}, got {key:?}")));
        };
        if !(-100.0..=100.0).contains(&bias) {
            return Err(ApiError::bad_param("logit_bias", format!("logit_bias values must be in [-100, 100], got {bias}")));
        }
        out.push((token, bias));
    }
    out.sort_unstable_by_key(|&(t, _)| t);
    Ok(out)
}

/// The sampling a request asks for, checked, and the number of choices.
/// What it leaves out is the model's recommended value (its GGUF's
/// `general.sampling.*`), else llama-server's default (temperature 0.8,
/// top-k 40, top-p 0.95, min-p 0.05); what it sets is used as set.
fn sampling(s: &Sampling<'_>, defaults: &SamplingParams, max_choices: u32, vocab: usize) -> Result<(SamplingParams, u32), ApiError> {
    let temperature = s.temperature.unwrap_or(defaults.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_param("temperature", format!("temperature must be in [0, 2], got {temperature}")));
    }
    let top_p = s.top_p.unwrap_or(defaults.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_param("top_p", format!("top_p must be in (0, 1], got {top_p}")));
    }
    let min_p = s.min_p.unwrap_or(defaults.min_p);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::bad_param("min_p", format!("min_p must be in [0, 1], got {min_p}")));
    }
    let repeat_penalty = s.repeat_penalty.unwrap_or(defaults.repeat_penalty);
    if !(repeat_penalty > 0.0 && repeat_penalty <= 10.0) {
        return Err(ApiError::bad_param("repeat_penalty", format!("repeat_penalty must be in (0, 10], got {repeat_penalty}")));
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
    // OpenAI's presence and frequency penalties count the whole text.
    let openai_penalties = s.presence_penalty.is_some() || s.frequency_penalty.is_some();
    let params = SamplingParams {
        temperature,
        top_k: s.top_k.unwrap_or(defaults.top_k),
        top_p,
        min_p,
        seed: s.seed,
        repeat_penalty,
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        penalty_last_n: if openai_penalties { usize::MAX } else { defaults.penalty_last_n },
        logit_bias: logit_bias(s.logit_bias, vocab)?,
    };
    Ok((params, n))
}

/// The `n` sessions of one prompt, numbered from `first_index`; seeds
/// differ by choice, and only the first bills the prompt.
fn choice_jobs(prompt: &[u32], params: &GenerationParams, n: u32, first_index: u32, prompt_logprobs: Option<usize>) -> Vec<ChoiceJob> {
    (0..n)
        .map(|i| {
            let mut params = params.clone();
            params.sampling.seed = params.sampling.seed.map(|s| s.wrapping_add(u64::from(i)));
            ChoiceJob { index: first_index + i, prompt: prompt.to_vec(), params, prompt_logprobs, bills_prompt: i == 0, speculation: None, grammar: None }
        })
        .collect()
}

/// The most tokens `jobs` may use: each prompt once, plus every choice's
/// `max_tokens` (within the context).
fn reservation(jobs: &[ChoiceJob], context: usize) -> u64 {
    jobs.iter().map(|j| (if j.bills_prompt { j.prompt.len() } else { 0 }) + j.params.max_tokens.min(context.saturating_sub(j.prompt.len()))).sum::<usize>()
        as u64
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

/// What rendering a chat answer needs besides the events.
pub(crate) struct ChatShape {
    pub id: String,
    pub n: u32,
    pub prompt_tokens: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    /// Tool calls are read out of the answers (the offered tools' names).
    pub tools: Option<Vec<String>>,
}

/// How a chat request uses tools.
struct ToolPlan {
    /// The tools rendered into the prompt.
    offered: Option<Vec<crate::openai::Tool>>,
    /// A grammar that forces a call (`tool_choice` required or named).
    grammar: Option<crate::constrain::Grammar>,
}

/// Most tools one request may offer.
const MAX_TOOLS: usize = 128;

/// Checks `tools` and `tool_choice` against the model's template.
fn tool_plan(gateway: &Gateway, request: &ChatRequest) -> Result<ToolPlan, ApiError> {
    use crate::openai::ToolChoice;
    let tools = request.tools.as_deref().unwrap_or_default();
    let none = ToolPlan { offered: None, grammar: None };
    if tools.is_empty() {
        return match &request.tool_choice {
            Some(ToolChoice::Mode(m)) if m == "none" || m == "auto" => Ok(none),
            None => Ok(none),
            Some(_) => Err(ApiError::bad_param("tool_choice", "tool_choice needs tools")),
        };
    }
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::bad_param("tools", format!("at most {MAX_TOOLS} tools")));
    }
    for (i, t) in tools.iter().enumerate() {
        let name_ok =
            !t.function.name.is_empty() && t.function.name.len() <= 64 && t.function.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if t.kind != "function" || !name_ok {
            return Err(ApiError::bad_param(&format!("tools[{i}]"), "a tool is {\"type\": \"function\", \"function\": {\"name\": [a-zA-Z0-9_-]{1,64}, …}}"));
        }
    }
    let forced: Option<Vec<&crate::openai::Tool>> = match &request.tool_choice {
        None => None,
        Some(ToolChoice::Mode(m)) if m == "auto" => None,
        Some(ToolChoice::Mode(m)) if m == "none" => return Ok(none),
        Some(ToolChoice::Mode(m)) if m == "required" => Some(tools.iter().collect()),
        Some(ToolChoice::Mode(m)) => return Err(ApiError::bad_param("tool_choice", format!("unknown tool_choice `{m}`"))),
        Some(ToolChoice::Named { function }) => match tools.iter().find(|t| t.function.name == function.name) {
            Some(t) => Some(vec![t]),
            None => return Err(ApiError::bad_param("tool_choice", format!("no tool is named `{}`", function.name))),
        },
    };
    if !gateway.client.supports_tools() {
        return Err(ApiError::bad_param("tools", format!("the chat template of `{}` has no tool support", gateway.model.name)));
    }
    let grammar = match forced {
        None => None,
        Some(forced) => {
            let grammars = gateway.grammars().map_err(|e| ApiError::Internal(format!("constrained decoding is unavailable for this model: {e}")))?;
            let lark = crate::tools::required_grammar(&forced, request.parallel_tool_calls.unwrap_or(true));
            Some(grammars.lark(&lark).map_err(|e| ApiError::bad_param("tools", format!("the tools' parameters cannot be enforced: {e}")))?)
        }
    };
    Ok(ToolPlan { offered: Some(tools.to_vec()), grammar })
}

/// Plans a chat completion.
pub(crate) fn chat(gateway: &Gateway, caller: Option<Caller>, request: ChatRequest) -> Result<(RequestPlan, ChatShape), ApiError> {
    gateway.check_model(&request.model)?;
    if let (Some(caller), Some(keys)) = (&caller, &gateway.config.keys) {
        keys.check_model(caller, &[&request.model, &gateway.model.name, &gateway.model.id.to_full_string()])?;
    }
    if request.messages.is_empty() {
        return Err(ApiError::bad_param("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => return Err(ApiError::bad_param(&format!("messages[{i}].role"), format!("unsupported role `{other}`"))),
        };
        let content = m.content.as_ref().map(|c| c.text()).transpose().map_err(|e| ApiError::bad_param(&format!("messages[{i}].content"), e))?;
        let mut message = ChatMessage::new(role, content.unwrap_or_default());
        // Templates read a call's arguments as an object (OpenAI sends a JSON text).
        message.tool_calls = m.tool_calls.as_ref().map(|calls| {
            serde_json::Value::Array(
                calls
                    .iter()
                    .map(|c| {
                        let arguments =
                            serde_json::from_str::<serde_json::Value>(&c.function.arguments).unwrap_or_else(|_| c.function.arguments.clone().into());
                        serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": arguments}})
                    })
                    .collect(),
            )
        });
        message.tool_call_id.clone_from(&m.tool_call_id);
        message.name.clone_from(&m.name);
        messages.push(message);
    }
    let tools = tool_plan(gateway, &request)?;
    let client = &gateway.client;
    let context = gateway.model.context;
    let requested = request.max_completion_tokens.or(request.max_tokens).map(|n| n as usize);
    if requested == Some(0) {
        return Err(ApiError::bad_param("max_tokens", "max_tokens must be at least 1"));
    }
    // The context check comes before rendering and tokenizing: text that
    // cannot fit is refused without the work.
    let bytes: usize = messages.iter().map(|m| m.content.len()).sum();
    let fewest = client.tokenizer().min_tokens(bytes);
    if fewest + requested.unwrap_or(1) > context {
        return Err(too_long("messages", context, &format!("the messages take at least {fewest} tokens")));
    }
    // Control tokens only where the template puts them: message content is text.
    let offered = tools.offered.as_ref().map(|t| serde_json::to_value(t).unwrap_or_default());
    let tool_names: Option<Vec<String>> = tools.offered.as_ref().map(|t| t.iter().map(|t| t.function.name.clone()).collect());
    let prompt = client.chat_prompt_with_tools(&messages, offered.as_ref()).map_err(|e| ApiError::bad_param("messages", e.to_string()))?.tokens;
    if prompt.len() + requested.unwrap_or(1) > context {
        return Err(too_long("messages", context, &format!("the messages take {} tokens and {} more were requested", prompt.len(), requested.unwrap_or(1))));
    }
    let (sampling_params, n) = sampling(
        &Sampling {
            temperature: request.temperature,
            top_p: request.top_p,
            seed: request.seed,
            presence_penalty: request.presence_penalty,
            frequency_penalty: request.frequency_penalty,
            n: request.n,
            logit_bias: request.logit_bias.as_ref(),
            top_k: request.top_k,
            min_p: request.min_p,
            repeat_penalty: request.repeat_penalty,
        },
        gateway.client.recommended_sampling(),
        gateway.config.max_choices,
        gateway.client.config().vocab_size,
    )?;
    // Without max_tokens a reply may run to the end of the context; a key
    // with a budget caps it at what the budget still allows.
    let max_tokens = requested.unwrap_or_else(|| {
        let budget = caller.as_ref().zip(gateway.config.keys.as_ref()).and_then(|(c, keys)| keys.available(c));
        let cap = budget.map_or(usize::MAX, |left| (left as usize).saturating_sub(prompt.len()) / n as usize);
        (context - prompt.len()).min(cap.max(1))
    });
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
    let mut jobs = choice_jobs(&prompt, &params, n, 0, None);
    let grammar = match tools.grammar {
        Some(grammar) => Some(grammar),
        None => response_grammar(gateway, request.response_format.as_ref())?,
    };
    for job in &mut jobs {
        job.grammar.clone_from(&grammar);
    }
    let reserve = reservation(&jobs, context);
    let shape = ChatShape {
        id: request_id("chatcmpl"),
        n,
        prompt_tokens: prompt.len(),
        stream: request.stream,
        include_usage: request.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs: request.logprobs,
        tools: tool_names,
    };
    Ok((RequestPlan::new(shape.id.clone(), caller, jobs, reserve, request.hotpot.and_then(|h| h.max_price)), shape))
}

/// What rendering a completion needs besides the events.
pub(crate) struct CompletionShape {
    pub id: String,
    pub n: u32,
    pub prompts: Vec<Vec<u32>>,
    pub stream: bool,
    pub include_usage: bool,
    pub echo: bool,
    /// Alternatives per token when log-probabilities are asked for.
    pub logprobs: Option<usize>,
}

impl CompletionShape {
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n as usize
    }

    pub fn prompt_of(&self, index: u32) -> &[u32] {
        &self.prompts[index as usize / self.n as usize]
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(Vec::len).sum()
    }
}

fn too_long(param: &str, context: usize, what: &str) -> ApiError {
    ApiError::BadRequest {
        message: format!("this model's maximum context length is {context} tokens; {what}"),
        param: Some(param.into()),
        code: Some("context_length_exceeded"),
    }
}

/// Plans a (legacy) completion: one or more prompts, `n` choices each.
pub(crate) fn completions(gateway: &Gateway, caller: Option<Caller>, request: CompletionRequest) -> Result<(RequestPlan, CompletionShape), ApiError> {
    gateway.check_model(&request.model)?;
    if let (Some(caller), Some(keys)) = (&caller, &gateway.config.keys) {
        keys.check_model(caller, &[&request.model, &gateway.model.name, &gateway.model.id.to_full_string()])?;
    }
    let tokenizer = gateway.client.tokenizer();
    let context = gateway.model.context;
    let max_tokens = request.max_tokens.unwrap_or(16) as usize;
    let prompt_count = match &request.prompt {
        Prompt::Texts(ts) => ts.len(),
        Prompt::TokenLists(lists) => lists.len(),
        Prompt::Text(_) | Prompt::Tokens(_) => 1,
    };
    let sessions = prompt_count * request.n.unwrap_or(1).max(1) as usize;
    if sessions > gateway.config.max_sessions_per_request {
        return Err(ApiError::bad_param(
            "prompt",
            format!("this request asks for {sessions} completions (prompts × n); at most {} are allowed per request", gateway.config.max_sessions_per_request),
        ));
    }
    // The context check before tokenizing: text that cannot fit is refused
    // without the work.
    let texts: Vec<&str> = match &request.prompt {
        Prompt::Text(t) => vec![t],
        Prompt::Texts(ts) => ts.iter().map(String::as_str).collect(),
        Prompt::Tokens(_) | Prompt::TokenLists(_) => Vec::new(),
    };
    if let Some(fewest) = texts.iter().map(|t| tokenizer.min_tokens(t.len())).find(|&fewest| fewest + max_tokens.max(1) > context) {
        return Err(too_long("prompt", context, &format!("a prompt takes at least {fewest} tokens and max_tokens is {max_tokens}")));
    }
    // A completion's prompt is the whole text the model sees, so control
    // tokens in it are parsed (as llama-server and vLLM do): there is no
    // template whose turns a caller could forge.
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
    if let Some(p) = prompts.iter().find(|p| p.len() + max_tokens.max(1) > context) {
        return Err(too_long("prompt", context, &format!("the prompt takes {} and max_tokens is {max_tokens}", p.len())));
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
            logit_bias: request.logit_bias.as_ref(),
            top_k: request.top_k,
            min_p: request.min_p,
            repeat_penalty: request.repeat_penalty,
        },
        gateway.client.recommended_sampling(),
        gateway.config.max_choices,
        gateway.client.config().vocab_size,
    )?;
    let params = GenerationParams { sampling: sampling_params, max_tokens, stop: request.stop.clone().map(Stop::into_vec).unwrap_or_default(), logprobs: top };
    let echo_logprobs = if request.echo { top } else { None };
    let mut jobs: Vec<ChoiceJob> = prompts.iter().enumerate().flat_map(|(pi, p)| choice_jobs(p, &params, n, pi as u32 * n, echo_logprobs)).collect();
    let grammar = response_grammar(gateway, request.response_format.as_ref())?;
    for job in &mut jobs {
        job.grammar.clone_from(&grammar);
    }
    let reserve = reservation(&jobs, context);
    let shape = CompletionShape {
        id: request_id("cmpl"),
        n,
        prompts,
        stream: request.stream,
        include_usage: request.stream_options.as_ref().is_some_and(|o| o.include_usage),
        echo: request.echo,
        logprobs: top,
    };
    Ok((RequestPlan::new(shape.id.clone(), caller, jobs, reserve, request.hotpot.and_then(|h| h.max_price)), shape))
}
