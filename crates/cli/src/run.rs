//! `hotpot run` and `hotpot tokenize`: the model in this process.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use hotpot_core::LayerSpan;
use hotpot_engine::{ChatMessage, ChatTemplate, ClientParts, Device, FinishReason, GenerationParams, ModelFile, SamplingParams, Span, Tokenizer};
use hotpot_gateway::{ChoiceJob, EventSink, Finish, LocalPipeline, Outcome, SessionContext, SessionEvent};

use crate::store::{ModelEntry, Store};

/// Sampling and length options shared by every command that generates.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Randomness; 0 always picks the most likely token.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Sample among the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Sample among the most likely tokens holding this probability mass (1: all).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one (0: none).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalize tokens seen in the last 64 (1: off), as llama.cpp's --repeat-penalty.
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Seed for the random draw (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most tokens to generate (-1: until the model stops or the context is full).
    #[arg(short = 'n', long, default_value_t = 256, allow_negative_numbers = true)]
    pub max_tokens: i64,
    /// Stop before this text (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<GenerationParams> {
        for (name, value, range) in [("--top-p", self.top_p, 0.0..=1.0), ("--min-p", self.min_p, 0.0..=1.0)] {
            if !range.contains(&value) {
                bail!("{name} must lie in 0..=1, got {value}");
            }
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!("--temperature must be 0 or more, got {}", self.temperature);
        }
        if self.repeat_penalty <= 0.0 || !self.repeat_penalty.is_finite() {
            bail!("--repeat-penalty must be positive, got {}", self.repeat_penalty);
        }
        let max_tokens = match self.max_tokens {
            -1 => usize::MAX,
            n if n >= 0 => n as usize,
            n => bail!("--max-tokens must be -1 or more, got {n}"),
        };
        Ok(GenerationParams {
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                seed: self.seed,
                repeat_penalty: self.repeat_penalty,
                ..SamplingParams::default()
            },
            max_tokens,
            stop: self.stop.clone(),
            logprobs: None,
        })
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Model name, id or .gguf path.
    pub model: String,
    /// The prompt.
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message (implies --chat).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Run the model as a chain of separately loaded spans, e.g. 0..12,12..30.
    #[arg(long)]
    pub spans: Option<String>,
    /// Compute threads (0: one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
    /// Context length in tokens (default: the model's).
    #[arg(short = 'c', long)]
    pub ctx_size: Option<usize>,
    /// Print no timings.
    #[arg(short, long)]
    pub quiet: bool,
    /// Run the blocks on a swarm instead of in this process.
    #[command(flatten)]
    pub peers: crate::swarm::PeerArgs,
    #[command(flatten)]
    pub latency: crate::swarm::LatencyArgs,
    /// With --join: print the chain of nodes chosen.
    #[arg(long)]
    pub show_route: bool,
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// Model name, id or .gguf path.
    pub model: String,
    pub text: String,
    /// Print each token's piece too, as JSON.
    #[arg(long)]
    pub json: bool,
    /// Tokenize the text as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
}

pub fn open_model(name: &str) -> Result<ModelFile> {
    Ok(ModelFile::open(&resolve(name)?.path)?)
}

pub fn resolve(name: &str) -> Result<ModelEntry> {
    Store::from_env()?.resolve(name)
}

/// Checks that `chain` covers blocks `0..n_blocks` in order, without gaps.
pub fn check_chain(chain: &[LayerSpan], n_blocks: u32) -> Result<()> {
    let mut next = 0;
    for span in chain {
        if !span.fits(n_blocks) {
            bail!("span {span} lies outside the model's {n_blocks} blocks (spans must lie within 0..{n_blocks})");
        }
        match span.start().cmp(&next) {
            std::cmp::Ordering::Greater => {
                bail!("the spans leave blocks {next}..{} uncovered", span.start())
            }
            std::cmp::Ordering::Less => {
                bail!("span {span} overlaps the previous one (expected it to start at {next})")
            }
            std::cmp::Ordering::Equal => next = span.end(),
        }
    }
    if next != n_blocks {
        bail!("the spans end at block {next}; the model has {n_blocks} blocks");
    }
    Ok(())
}

fn chat_messages(system: Option<&str>, user: &str) -> Vec<ChatMessage> {
    system.map(|s| ChatMessage::new("system", s)).into_iter().chain([ChatMessage::new("user", user)]).collect()
}

/// The prompt's token ids: the raw text (control tokens written in it
/// count, as in llama.cpp), or a user message in the model's chat template
/// with `--chat` / `--system` (the message is plain text).
pub fn prompt_tokens(client: &ClientParts, args: &RunArgs) -> Result<Vec<u32>> {
    let tokens = if args.chat || args.system.is_some() {
        client.chat_prompt(&chat_messages(args.system.as_deref(), &args.prompt))?.tokens
    } else {
        client.tokenizer().encode(&args.prompt)?
    };
    if tokens.is_empty() {
        bail!("the prompt is empty");
    }
    Ok(tokens)
}

pub fn run(args: &RunArgs) -> Result<()> {
    if !args.peers.join.is_empty() || args.peers.mdns {
        return crate::swarm::run_remote(args);
    }
    let entry = resolve(&args.model)?;
    let file = ModelFile::open(&entry.path)?;
    let config = file.config().clone();
    let device = Device::cpu(args.threads)?;
    let load_started = Instant::now();
    let client = Arc::new(ClientParts::load(&file, &device)?);
    let chain = match &args.spans {
        Some(text) => LayerSpan::parse_chain(text).with_context(|| format!("--spans {text}"))?,
        None => vec![config.full_span()],
    };
    check_chain(&chain, config.n_blocks)?;
    let spans = chain.iter().map(|s| Span::load(&file, *s, &device)).collect::<Result<Vec<_>, _>>()?;
    let load_time = load_started.elapsed();

    let (mut job, context) = session_job(&client, args, &entry)?;
    // Here a pass is this machine's compute: drafting ahead would only compete for it.
    job.speculation = args.latency.load(&client, &device)?.map(|s| hotpot_gateway::Speculation { in_flight: false, ..s });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().context("starting the async runtime")?;
    let mut printer = Printer::new();
    let outcome = runtime.block_on(async {
        let mut pipeline = LocalPipeline::new(&spans, context.1);
        hotpot_gateway::drive(&client, &mut pipeline, &job, &context.0, &mut printer).await
    });
    let chain_text = chain.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    if !args.quiet {
        eprintln!("\n[load {:.2} s]", load_time.as_secs_f64());
    }
    printer.report(args, &format!("local, {} threads, spans {chain_text}", device.threads()), &job, outcome)
}

/// The session `hotpot run` asks for: its prompt, its parameters (with a
/// seed drawn here when none is given, so it can be printed), and who runs
/// it, with the context length.
pub fn session_job(client: &ClientParts, args: &RunArgs, entry: &ModelEntry) -> Result<(ChoiceJob, (SessionContext, usize))> {
    let mut params = args.sampling.params()?;
    params.sampling.seed.get_or_insert_with(rand::random);
    let tokens = prompt_tokens(client, args)?;
    let model_context = client.config().context_length;
    let context = args.ctx_size.unwrap_or(model_context).min(model_context);
    if tokens.len() >= context {
        bail!("the prompt has {} tokens, more than the context of {context} tokens holds (see --ctx-size)", tokens.len());
    }
    params.max_tokens = params.max_tokens.min(context - tokens.len());
    let job = ChoiceJob { index: 0, prompt: tokens, params, prompt_logprobs: None, bills_prompt: true, speculation: None, grammar: None };
    let session = SessionContext { id: "run".into(), caller: None, model: entry.name.clone(), model_id: entry.id, heads: None };
    Ok((job, (session, context)))
}

/// Prints a session's text as it comes, and its timings at the end.
pub struct Printer {
    started: Instant,
    first_token: Option<Duration>,
    write_error: Option<std::io::Error>,
}

impl Printer {
    pub fn new() -> Self {
        Self { started: Instant::now(), first_token: None, write_error: None }
    }

    /// Ends the output line and prints the timings (or the failure).
    pub fn report(self, args: &RunArgs, label: &str, job: &ChoiceJob, outcome: Outcome) -> Result<()> {
        let total = self.started.elapsed();
        if let Some(e) = self.write_error
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            return Err(e).context("writing the output");
        }
        let _ = writeln!(std::io::stdout());
        if let Some(e) = outcome.error {
            return Err(e.into());
        }
        let finish = match outcome.record.finish {
            Finish::Stop => FinishReason::Stop,
            _ => FinishReason::Length,
        };
        if !args.quiet {
            print_timings(label, job.prompt.len(), self.first_token.unwrap_or(total), total, outcome.record.completion_tokens, finish);
            if let Some(seed) = job.params.sampling.seed {
                eprintln!("[seed {seed}]");
            }
            if let Some(s) = &outcome.record.speculation {
                let per_pass = outcome.record.completion_tokens as f64 / s.passes.max(1) as f64;
                eprintln!(
                    "[speculation: {} drafted, {} accepted ({:.0} %), {} passes, {per_pass:.2} tokens per pass]",
                    s.drafted,
                    s.accepted,
                    100.0 * s.acceptance(),
                    s.passes
                );
            }
        }
        Ok(())
    }
}

impl Default for Printer {
    fn default() -> Self {
        Self::new()
    }
}

impl EventSink for Printer {
    async fn send(&mut self, event: SessionEvent) -> bool {
        if let SessionEvent::Token { text, .. } = event {
            self.first_token.get_or_insert_with(|| self.started.elapsed());
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
                self.write_error = Some(e);
                return false;
            }
        }
        true
    }
}

/// One line of timings on stderr, the same for local and swarm runs:
/// time to first token, and decode speed over the tokens after it.
pub fn print_timings(label: &str, prompt_len: usize, first_token: Duration, total: Duration, generated: usize, finish: FinishReason) {
    let decode = total.saturating_sub(first_token);
    eprintln!(
        "[{label}] prompt {prompt_len} tokens, first token after {:.1} ms | generated {generated} tokens, decode {:.1} tok/s | stop: {}{}",
        first_token.as_secs_f64() * 1e3,
        generated.saturating_sub(1) as f64 / decode.as_secs_f64().max(1e-9),
        finish.as_str(),
        if finish == FinishReason::Length { " (max tokens or context)" } else { "" },
    );
}

pub fn tokenize(args: &TokenizeArgs) -> Result<()> {
    let file = open_model(&args.model)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let ids = if args.chat {
        let template = ChatTemplate::from_gguf(&file, &tokenizer)?.context("the model file has no chat template")?;
        template.prompt(&tokenizer, &chat_messages(None, &args.text), true)?.tokens
    } else {
        tokenizer.encode(&args.text)?
    };
    if args.json {
        let pieces: Vec<serde_json::Value> = ids.iter().map(|&id| serde_json::json!({"id": id, "piece": tokenizer.piece(id)})).collect();
        println!("{}", serde_json::to_string(&pieces)?);
    } else {
        println!("{}", serde_json::to_string(&ids)?);
    }
    Ok(())
}
