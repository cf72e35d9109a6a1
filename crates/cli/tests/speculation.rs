//! Speculative decoding is lossless: greedy output is the same token for
//! token with and without drafts (n-gram lookup or a draft model; through a
//! swarm that loses a node mid-answer in `swarm.rs`), and sampled output
//! keeps its distribution — a statistical check that also catches a
//! deliberately wrong acceptance rule.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hotpot_engine::{Acceptance, ClientParts, Device, GenerationParams, HiddenStates, KvCache, ModelFile, SamplingParams, Span};
use hotpot_gateway::{
    ChainConfig, ChainContext, ChainError, ChoiceJob, Pipeline, RemoteChain, SessionContext, SessionEvent, Speculation, SpeculationStats, StageRecord, drive,
};

fn run(args: &[&str]) -> (String, String) {
    let out = hotpot(args, Duration::from_secs(300));
    assert!(out.status.success(), "hotpot {args:?}: {}", text(&out.stderr));
    (text(&out.stdout), text(&out.stderr))
}

/// `[speculation: D drafted, A accepted ...]` from `hotpot run`'s stderr.
fn drafted_accepted(stderr: &str) -> (usize, usize) {
    let line = stderr.lines().find(|l| l.starts_with("[speculation: ")).unwrap_or_else(|| panic!("no speculation report in {stderr}"));
    let numbers: Vec<usize> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    (numbers[0], numbers[1])
}

#[test]
fn greedy_output_is_unchanged_by_drafts() {
    let _serial = serial();
    let prompt = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\ndef fib2(n):\n";
    let plain = run(&["run", "smollm2-135m", prompt, "--temperature", "0", "-n", "40", "-t", "1"]).0;
    let (lookup, report) = run(&["run", "smollm2-135m", prompt, "--temperature", "0", "-n", "40", "-t", "1", "--draft", "ngram"]);
    assert_eq!(lookup, plain, "n-gram drafts changed the greedy output");
    let (drafted, accepted) = drafted_accepted(&report);
    println!("smollm2-135m, n-gram drafts: {drafted} drafted, {accepted} accepted");
    assert!(drafted > 0 && accepted > 0, "the code prompt repeats itself: drafts were made and kept ({report})");

    // The real pair: Qwen2.5-Coder 1.5B checked, 0.5B drafting.
    let prompt = "Write a Python function that returns the sum of a list of numbers.";
    let args = ["run", "qwen2.5-coder-1.5b", prompt, "--chat", "--temperature", "0", "-n", "16"];
    let plain = run(&args).0;
    let (drafted_text, report) = run(&[&args[..], &["--draft", "qwen2.5-coder-0.5b"]].concat());
    assert_eq!(drafted_text, plain, "the 0.5B draft model changed the 1.5B's greedy output");
    let (drafted, accepted) = drafted_accepted(&report);
    println!("qwen2.5-coder-1.5b, 0.5B drafts: {drafted} drafted, {accepted} accepted");
    assert!(accepted > 0, "{report}");

    // A draft model with another vocabulary is refused, clearly.
    let out = hotpot(&["run", "smollm2-135m", "hi", "-n", "2", "--draft", "gemma3-270m"], Duration::from_secs(120));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("vocabulary"), "{}", text(&out.stderr));
}

/// Pearson's chi-square test of homogeneity between two samples of
/// categories (categories expecting fewer than 5 in either sample are
/// pooled); returns the statistic, degrees of freedom and p-value.
fn homogeneity(a: &HashMap<Vec<u32>, u64>, b: &HashMap<Vec<u32>, u64>) -> (f64, usize, f64) {
    let (na, nb) = (a.values().sum::<u64>() as f64, b.values().sum::<u64>() as f64);
    let mut keys: Vec<&Vec<u32>> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let mut pooled = (0.0, 0.0);
    for key in keys {
        let (x, y) = (*a.get(key).unwrap_or(&0) as f64, *b.get(key).unwrap_or(&0) as f64);
        let total = x + y;
        if total * na.min(nb) / (na + nb) < 5.0 {
            pooled.0 += x;
            pooled.1 += y;
        } else {
            cells.push((x, y));
        }
    }
    if pooled.0 + pooled.1 > 0.0 {
        cells.push(pooled);
    }
    let mut stat = 0.0;
    for &(x, y) in &cells {
        let total = x + y;
        let (ea, eb) = (total * na / (na + nb), total * nb / (na + nb));
        stat += (x - ea).powi(2) / ea + (y - eb).powi(2) / eb;
    }
    let df = cells.len().saturating_sub(1).max(1);
    (stat, df, chi_square_survival(stat, df as f64))
}

/// P(X > x) for X ~ chi-square with `k` degrees of freedom (Wilson–Hilferty).
fn chi_square_survival(x: f64, k: f64) -> f64 {
    let z = ((x / k).powf(1.0 / 3.0) - (1.0 - 2.0 / (9.0 * k))) / (2.0 / (9.0 * k)).sqrt();
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The complementary error function (Numerical Recipes' erfcc, error < 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06 + t * (0.278_868_07 + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// One span in this process whose sessions start from a copy of the
/// prompt's cache: the prompt is computed once for thousands of sessions
/// (its rows are bit-identical whichever pass computes them), everything
/// after it for real.
struct Prefilled<'a> {
    span: &'a Span,
    cache: KvCache,
    prompt_out: &'a HiddenStates,
}

impl Pipeline for Prefilled<'_> {
    async fn forward(&mut self, hidden: HiddenStates, start: usize) -> Result<HiddenStates, ChainError> {
        let prompt = self.prompt_out.rows();
        if start > 0 {
            return Ok(self.span.forward(&mut self.cache, &hidden, start)?);
        }
        assert!(hidden.rows() >= prompt, "the prompt comes whole");
        let dim = hidden.dim();
        let mut rows = self.prompt_out.as_slice().to_vec();
        if hidden.rows() > prompt {
            let rest = HiddenStates::new(hidden.rows() - prompt, dim, hidden.as_slice()[prompt * dim..].to_vec())?;
            rows.extend(self.span.forward(&mut self.cache, &rest, prompt)?.into_vec());
        }
        Ok(HiddenStates::new(hidden.rows(), dim, rows)?)
    }

    async fn truncate(&mut self, len: usize) -> Result<(), ChainError> {
        self.cache.truncate(len);
        Ok(())
    }

    async fn close(&mut self) {}

    fn stages(&self) -> Vec<StageRecord> {
        Vec::new()
    }
}

/// One session: its tokens and speculation counts.
async fn one_session<P: Pipeline>(
    client: &Arc<ClientParts>,
    pipeline: &mut P,
    job: &ChoiceJob,
    context: &SessionContext,
) -> (Vec<u32>, Option<SpeculationStats>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let mut sink = tx;
    let outcome = drive(client, pipeline, job, context, &mut sink).await;
    drop(sink);
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let mut tokens = Vec::new();
    while let Some(event) = rx.recv().await {
        if let SessionEvent::Token { token, .. } = event {
            tokens.push(token);
        }
    }
    (tokens, outcome.record.speculation)
}

/// [`Prefilled`] through a remote chain: the prompt was run through it
/// once; each session starts by rolling the chain back to the prompt.
struct PrefilledChain<'a> {
    chain: &'a mut RemoteChain,
    prompt_out: &'a HiddenStates,
}

impl Pipeline for PrefilledChain<'_> {
    async fn forward(&mut self, hidden: HiddenStates, start: usize) -> Result<HiddenStates, ChainError> {
        if start > 0 {
            return self.chain.forward(hidden, start).await;
        }
        let (prompt, dim) = (self.prompt_out.rows(), hidden.dim());
        assert!(hidden.rows() >= prompt, "the prompt comes whole");
        self.chain.truncate(prompt).await?;
        let mut rows = self.prompt_out.as_slice().to_vec();
        if hidden.rows() > prompt {
            let rest = HiddenStates::new(hidden.rows() - prompt, dim, hidden.as_slice()[prompt * dim..].to_vec())?;
            rows.extend(self.chain.forward(rest, prompt).await?.into_vec());
        }
        Ok(HiddenStates::new(hidden.rows(), dim, rows)?)
    }

    async fn truncate(&mut self, len: usize) -> Result<(), ChainError> {
        self.chain.truncate(len).await
    }

    async fn close(&mut self) {}

    fn stages(&self) -> Vec<StageRecord> {
        Vec::new()
    }
}

/// Temperature 0.8 with fixed seeds: the first 4 tokens of 2,000 sessions
/// with n-gram drafts (exact speculative sampling) through a pushed chain
/// of three nodes are distributed like 2,000 without drafts in one
/// process; the same test rejects a wrong acceptance rule (on 500).
#[test]
fn speculative_sampling_keeps_the_distribution() {
    let _serial = serial();
    let file = ModelFile::open(model_path()).expect("model");
    let device = Device::cpu(2).expect("threads");
    let client = Arc::new(ClientParts::load(&file, &device).expect("client"));
    let spans = vec![Span::load(&file, file.config().full_span(), &device).expect("span")];
    let prompt = client.tokenizer().encode("red green blue red green blue red green blue red green").expect("encodes");
    let model_id = file.model_id().expect("id");
    let span = &spans[0];
    let mut prompt_cache = span.new_cache(prompt.len() + 8);
    let prompt_out = span.forward(&mut prompt_cache, &client.embed(&prompt).expect("embeds"), 0).expect("prefill");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let session = |seed: u64, speculation: &Option<Speculation>| {
        let params = GenerationParams {
            sampling: SamplingParams { temperature: 0.8, seed: Some(seed), ..SamplingParams::default() },
            max_tokens: 4,
            stop: Vec::new(),
            logprobs: None,
        };
        let job =
            ChoiceJob { index: 0, prompt: prompt.clone(), params, prompt_logprobs: None, bills_prompt: true, speculation: speculation.clone(), grammar: None };
        (job, SessionContext { id: format!("s{seed}"), caller: None, model: "smollm2-135m".into(), model_id, heads: None })
    };
    // Sessions of `seeds` seeds in this process, or through `chain`.
    let sample = |speculation: Option<Speculation>, seeds: u64, mut chain: Option<&mut RemoteChain>| -> (HashMap<Vec<u32>, u64>, (usize, usize)) {
        runtime.block_on(async {
            let mut counts = HashMap::new();
            let (mut drafted, mut accepted) = (0, 0);
            for seed in 0..seeds {
                let (job, context) = session(seed, &speculation);
                let (tokens, stats) = match chain.as_deref_mut() {
                    Some(chain) => one_session(&client, &mut PrefilledChain { chain, prompt_out: &prompt_out }, &job, &context).await,
                    None => one_session(&client, &mut Prefilled { span, cache: prompt_cache.clone(), prompt_out: &prompt_out }, &job, &context).await,
                };
                if let Some(s) = stats {
                    drafted += s.drafted;
                    accepted += s.accepted;
                }
                *counts.entry(tokens).or_default() += 1;
            }
            (counts, (drafted, accepted))
        })
    };
    let seeds = 2000;
    let (plain, _) = sample(None, seeds, None);
    // Exact speculative sampling through three real nodes pushing to each
    // other: every refused draft rolls the nodes back on the next step.
    let head = NodeProc::start("0..10", None, &[]);
    let _rest = [NodeProc::start("10..20", Some(&head.addr), &[]), NodeProc::start("20..30", Some(&head.addr), &[])];
    let (network, mut chain) = runtime.block_on(async {
        let network = hotpot_net::Network::start(hotpot_net::NetworkConfig {
            key: hotpot_core::NodeKey::generate(),
            listen: vec![],
            join: vec![head.addr.parse().expect("addr")],
            dht_server: false,
            mdns: false,
            relay: Default::default(),
        })
        .await
        .expect("joins");
        let n_blocks = file.config().n_blocks;
        let directory = hotpot_gateway::SharedDirectory::follow(&network, model_id).await;
        directory.refresh(&network, &model_id, n_blocks, Duration::from_secs(3)).await;
        let context = ChainContext {
            network: network.clone(),
            directory,
            model: model_id,
            n_blocks,
            dim: file.config().dim,
            observer: None,
            selector: None,
            eligible: None,
        };
        let mut chain = RemoteChain::open(context, ChainConfig { max_len: prompt.len() + 16, ..ChainConfig::default() }).await.expect("route");
        assert!(chain.route().len() == 3 && chain.pushed(), "a pushed chain of three nodes");
        let out = chain.forward(client.embed(&prompt).expect("embeds"), 0).await.expect("prefill");
        assert_eq!(out.as_slice(), prompt_out.as_slice(), "the chain computes the prompt's bits");
        (network, chain)
    });
    let (exact, (drafted, accepted)) = sample(Some(Speculation::ngram()), seeds, Some(&mut chain));
    assert_eq!(chain.failovers(), 0);
    assert!(chain.pushed(), "the chain pushed to the end");
    runtime.block_on(async {
        chain.close().await;
        network.shutdown().await;
    });
    // A wrong rule is far off: fewer seeds show it.
    let (wrong, _) = sample(Some(Speculation { rule: Acceptance::AnyPossible, ..Speculation::ngram() }), 500, None);
    let (stat, df, p) = homogeneity(&plain, &exact);
    let (wrong_stat, wrong_df, wrong_p) = homogeneity(&plain, &wrong);
    println!(
        "first 4 tokens over {seeds} seeds: exact speculative sampling chi-square {stat:.1} (df {df}, p {p:.3}), {drafted} drafted, {accepted} accepted; \
         wrong rule chi-square {wrong_stat:.1} (df {wrong_df}, p {wrong_p:.2e})"
    );
    assert!(drafted > 1000 && accepted > 0 && accepted < drafted, "drafts were made, some kept and some refused ({accepted}/{drafted})");
    assert!(p > 0.01, "exact speculative sampling changed the distribution: chi-square {stat:.1}, df {df}, p {p}");
    assert!(wrong_p < 0.01, "the same test missed a wrong acceptance rule: chi-square {wrong_stat:.1}, df {wrong_df}, p {wrong_p}");
}
