//! `hotpot bench`: prefill and decode speed, measured the way llama-bench
//! measures them (random tokens, an empty cache per repetition, mean ± sd).

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use hotpot_engine::{ClientParts, Device, LocalChain, Pipeline, Span, profile};
use rand::{Rng, SeedableRng};

use crate::run::open_model;
use crate::store::human_bytes;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model name, id or .gguf path.
    pub model: String,
    /// Thread counts to measure, comma-separated.
    #[arg(short, long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Prompt length of the prefill test (0: skip).
    #[arg(short = 'p', long, default_value_t = 512)]
    pub n_prompt: usize,
    /// Tokens of the decode test (0: skip).
    #[arg(short = 'n', long, default_value_t = 128)]
    pub n_gen: usize,
    /// Repetitions of each test.
    #[arg(short, long, default_value_t = 5)]
    pub repetitions: usize,
    /// Print JSON records instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also show where the time goes, per operation.
    #[arg(long)]
    pub profile: bool,
}

struct Measurement {
    test: String,
    threads: usize,
    mean: f64,
    sd: f64,
    /// Time per operation over the measured repetitions.
    profile: Vec<(profile::Phase, std::time::Duration)>,
    reps: usize,
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    let file = open_model(&args.model)?;
    let config = file.config().clone();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1234);
    let mut results = Vec::new();
    for &threads in &args.threads {
        let device = Device::cpu(threads)?;
        let client = ClientParts::load(&file, &device)?;
        let spans = vec![Span::load(&file, config.full_span(), &device)?];
        let mut random_tokens = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..config.vocab_size as u32)).collect() };
        let mut run_test = |test: String, n: usize, prefill: bool, tokens: &mut dyn FnMut(usize) -> Vec<u32>| -> Result<()> {
            let mut rates = Vec::new();
            profile::take();
            // One warm-up run, then the measured repetitions.
            for rep in 0..=args.repetitions {
                // The warm-up run is not profiled.
                profile::enable(args.profile && rep > 0);
                let tokens = tokens(n);
                let mut chain = LocalChain::new(&spans, n + 1);
                let started = Instant::now();
                if prefill {
                    let out = chain.forward(client.embed(&tokens)?, 0)?;
                    client.logits(&out.last_row())?;
                } else {
                    for (pos, &token) in tokens.iter().enumerate() {
                        let out = chain.forward(client.embed(&[token])?, pos)?;
                        client.logits(&out)?;
                    }
                }
                let seconds = started.elapsed().as_secs_f64();
                if rep > 0 {
                    rates.push(n as f64 / seconds);
                }
            }
            let mean = rates.iter().sum::<f64>() / rates.len() as f64;
            let var = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (rates.len().max(2) - 1) as f64;
            let profile = profile::take();
            profile::enable(false);
            results.push(Measurement { test, threads, mean, sd: var.sqrt(), profile, reps: rates.len() });
            Ok(())
        };
        if args.n_prompt > 0 {
            run_test(format!("pp{}", args.n_prompt), args.n_prompt, true, &mut random_tokens)?;
        }
        if args.n_gen > 0 {
            run_test(format!("tg{}", args.n_gen), args.n_gen, false, &mut random_tokens)?;
        }
    }
    let peak = peak_rss_bytes();
    let model = format!("{} {:.0}M {}", config.architecture.name(), file.parameters() as f64 / 1e6, file.quantization());
    if args.json {
        let records: Vec<serde_json::Value> = results
            .iter()
            .map(|m| {
                serde_json::json!({
                    "model": model, "test": m.test, "threads": m.threads,
                    "kernels": hotpot_engine::kernels::variant(),
                    "tokens_per_second": m.mean, "stddev": m.sd, "peak_rss_bytes": peak,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    println!("| model | size | params | backend | threads | test | t/s |");
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    for m in &results {
        println!(
            "| {model} | {} | {:.2} M | CPU ({}) | {} | {} | {:.2} ± {:.2} |",
            human_bytes(file.tensor_bytes()),
            file.parameters() as f64 / 1e6,
            hotpot_engine::kernels::variant(),
            m.threads,
            m.test,
            m.mean,
            m.sd
        );
    }
    if let Some(peak) = peak {
        println!("\npeak RSS: {}", human_bytes(peak));
    }
    if args.profile {
        print_profiles(&results);
    }
    Ok(())
}

fn print_profiles(results: &[Measurement]) {
    for m in results {
        let total: f64 = m.profile.iter().map(|(_, d)| d.as_secs_f64()).sum();
        if total == 0.0 {
            continue;
        }
        println!("\nwhere the time goes: {} with {} threads ({} kernels)", m.test, m.threads, hotpot_engine::kernels::variant());
        println!("| operation | share | ms per repetition |");
        println!("| --- | ---: | ---: |");
        let mut rows: Vec<_> = m.profile.iter().filter(|(_, d)| !d.is_zero()).collect();
        rows.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
        for (phase, d) in rows {
            println!("| {} | {:.1} % | {:.2} |", phase.name(), 100.0 * d.as_secs_f64() / total, 1e3 * d.as_secs_f64() / m.reps as f64);
        }
    }
}

/// The process's peak resident set size (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
