//! From a validated OpenAI request to the sessions that answer it: render
//! and tokenize the prompt, check it against the context, choose sampling
//! and lengths, and count what the request may spend.

use hotpot_engine::{ChatMessage, GenerationParams, SamplingParams};

use crate::error::ApiError;
use crate::keys::Caller;
use crate::openai::{ChatRequest, CompletionRequest, Prompt, Stop};
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

/// OpenAI's sampling defaults (temperature 1, no top-k, no min-p), checked;
/// and the number of choices.
fn sampling(s: &Sampling<'_>, max_choices: u32, vocab: usize) -> Result<(SamplingParams, u32), ApiError> {
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
            ChoiceJob { index: first_index + i, prompt: prompt.to_vec(), params, prompt_logprobs, bills_prompt: i == 0, speculation: None }
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
            other => return Err(ApiError::bad_param(&format!("messages[{i}].role"), format!("unsupported role `{other}`"))),
        };
        let content = m.content.as_ref().map(|c| c.text()).transpose().map_err(|e| ApiError::bad_param(&format!("messages[{i}].content"), e))?;
        messages.push(ChatMessage::new(role, content.unwrap_or_default()));
    }
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
    let prompt = client.chat_prompt(&messages).map_err(|e| ApiError::bad_param("messages", e.to_string()))?.tokens;
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
        },
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
    let jobs = choice_jobs(&prompt, &params, n, 0, None);
    let reserve = reservation(&jobs, context);
    let shape = ChatShape {
        id: request_id("chatcmpl"),
        n,
        prompt_tokens: prompt.len(),
        stream: request.stream,
        include_usage: request.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs: request.logprobs,
    };
    Ok((RequestPlan { id: shape.id.clone(), caller, jobs, reserve, max_price: request.hotpot.and_then(|h| h.max_price) }, shape))
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
        },
        gateway.config.max_choices,
        gateway.client.config().vocab_size,
    )?;
    let params = GenerationParams { sampling: sampling_params, max_tokens, stop: request.stop.clone().map(Stop::into_vec).unwrap_or_default(), logprobs: top };
    let echo_logprobs = if request.echo { top } else { None };
    let jobs: Vec<ChoiceJob> = prompts.iter().enumerate().flat_map(|(pi, p)| choice_jobs(p, &params, n, pi as u32 * n, echo_logprobs)).collect();
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
    Ok((RequestPlan { id: shape.id.clone(), caller, jobs, reserve, max_price: request.hotpot.and_then(|h| h.max_price) }, shape))
}
