//! `hotpot bench`: prefill and decode speed, measured the way llama-bench
//! measures them (random tokens, an empty cache per repetition, mean ± sd).

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use hotpot_engine::kernels::{isa, ops};
use hotpot_engine::{ClientParts, Device, LocalChain, Span, profile};
use rand::{Rng, SeedableRng};

use crate::run::open_model;
use crate::store::human_bytes;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model name, id or .gguf path (not needed with --bandwidth).
    pub model: Option<String>,
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
    /// Measure what verification costs instead: an audit's prefill against
    /// the session it checks, and decode with and without commitments and
    /// sketches.
    #[arg(long)]
    pub verification: bool,
    /// Random sessions of the audit-cost test.
    #[arg(long, default_value_t = 24)]
    pub sessions: usize,
    /// Measure this machine's memory bandwidth instead (a streaming read of
    /// 1 GiB with each thread count), the bound on decode speed.
    #[arg(long)]
    pub bandwidth: bool,
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
    if args.verification {
        return verification(args);
    }
    if args.bandwidth {
        return bandwidth(args);
    }
    let file = open_model(model_name(args)?)?;
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
    let bytes_per_token = decode_bytes_per_token(&file);
    if args.json {
        let records: Vec<serde_json::Value> = results
            .iter()
            .map(|m| {
                serde_json::json!({
                    "model": model, "test": m.test, "threads": m.threads,
                    "kernels": hotpot_engine::kernels::variant(),
                    "tokens_per_second": m.mean, "stddev": m.sd, "peak_rss_bytes": peak,
                    "weight_bytes_per_token": bytes_per_token,
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

/// Bytes of weights one decode step reads: every tensor but the embedding
/// table (one row of it), unless the head is tied to it.
fn decode_bytes_per_token(file: &hotpot_engine::ModelFile) -> u64 {
    let tied = !file.has_tensor("output.weight");
    let embedding = file.tensor("token_embd.weight").map_or(0, |t| t.bytes);
    file.tensor_bytes() - if tied { 0 } else { embedding }
}

/// A streaming read of 1 GiB split over `threads` threads: the most bytes
/// per second this machine's memory delivers (best of five passes), read
/// the way decode reads weights (wide loads of whole cache lines, prefetch
/// ahead; a plain summing loop of unaligned words read 15-30 % less).
fn read_bandwidth(threads: usize) -> f64 {
    const LEN: usize = 1 << 27; // u64s: 1 GiB
    // Memory of the kind the weights live in (2 MiB aligned, huge pages
    // where the kernel grants them): a `Vec` of 4 KiB pages read 2-5 %
    // slower on two threads (2026-12-04, ten pairs).
    let mut buf = hotpot_engine::kernels::AlignedBuf::zeroed(LEN * 8);
    let data = buf.as_mut_words();
    data.iter_mut().enumerate().for_each(|(i, w)| *w = i as u64);
    let data = &*data;
    let mut best = 0.0f64;
    for _ in 0..5 {
        let started = Instant::now();
        let sum: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> =
                data.chunks(LEN.div_ceil(threads)).map(|part| scope.spawn(move || ops::stream_sum(isa::selected(), part))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max((LEN * 8) as f64 / started.elapsed().as_secs_f64());
    }
    best
}

fn model_name(args: &BenchArgs) -> Result<&str> {
    args.model.as_deref().ok_or_else(|| anyhow::anyhow!("name the model to measure (hotpot bench MODEL)"))
}

fn bandwidth(args: &BenchArgs) -> Result<()> {
    let records: Vec<serde_json::Value> =
        args.threads.iter().map(|&threads| serde_json::json!({"threads": threads, "read_bytes_per_second": read_bandwidth(threads)})).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
    } else {
        for r in &records {
            println!("memory read bandwidth, {} thread(s): {:.2} GB/s", r["threads"], r["read_bytes_per_second"].as_f64().unwrap_or(0.0) / 1e9);
        }
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

/// What verification costs a node and an auditor, with the real model:
///
/// - audit cost: for random sessions (prompt and generation lengths drawn
///   from 16..256), the node's work — a prefill of the prompt, then one
///   decode step per generated token — against the audit's one prefill over
///   the same inputs on a fresh cache;
/// - proof overhead: decode through the first half of the blocks (a typical
///   node's span) and through all of them, with and without what a node
///   adds per step — output sketches and a signed commitment over the input
///   and output bytes; repetitions alternate so drift hits both equally;
/// - proof size: sketch bytes per position and commitment bytes per step.
fn verification(args: &BenchArgs) -> Result<()> {
    use hotpot_core::{Commitment, NodeKey, SessionId, StepRecord};
    use hotpot_engine::HiddenStates;
    use hotpot_verify::{CHUNK, SketchBuilder};
    use hotpot_wire::{DType, Tensor, commitment_wire_bytes};

    let file = open_model(model_name(args)?)?;
    let config = file.config().clone();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4321);
    let key = NodeKey::generate();
    let model_id = file.model_id()?;
    let proof_seconds = {
        // What one step's proof costs, piece by piece, on decode-sized tensors.
        let dim = config.dim;
        let values: Vec<f32> = (0..CHUNK * dim).map(|_| rng.random_range(-4.0f32..4.0)).collect();
        let row = Tensor::from_f32(DType::F32, 1, dim, &values[..dim]);
        let (session, span, n) = (SessionId::random(), config.full_span(), 2000u32);
        let record = |pos| StepRecord { session, model: model_id, span, start_pos: pos, rows: 1, input: row.bytes(), output: row.bytes() };
        let started = Instant::now();
        for pos in 0..n {
            std::hint::black_box(Commitment::sign(&key, record(pos), Vec::new()));
        }
        let sign = started.elapsed().as_secs_f64() / f64::from(n);
        let started = Instant::now();
        for _ in 0..n / 20 {
            std::hint::black_box(hotpot_verify::Sketch::of(0, CHUNK as u32, &values));
        }
        let sketch = started.elapsed().as_secs_f64() / f64::from(n / 20);
        println!(
            "proof cost per decode step: {:.1} µs to hash and sign the commitment, {:.1} µs of sketching ({:.0} µs per {CHUNK}-position sketch)",
            sign * 1e6,
            sketch * 1e6 / CHUNK as f64,
            sketch * 1e6
        );
        sign + sketch / CHUNK as f64
    };
    for &threads in &args.threads {
        let device = Device::cpu(threads)?;
        let client = ClientParts::load(&file, &device)?;
        let full = Span::load(&file, config.full_span(), &device)?;
        let embed =
            |rng: &mut rand_chacha::ChaCha8Rng, n: usize| client.embed(&(0..n).map(|_| rng.random_range(0..config.vocab_size as u32)).collect::<Vec<_>>());

        // Audit cost: one prefill against prefill + sequential decode.
        let (mut session_s, mut audit_s, mut ratios) = (0.0f64, 0.0f64, Vec::new());
        for i in 0..=args.sessions {
            let (prompt, generated) = (rng.random_range(16..=256usize), rng.random_range(16..=256usize));
            let inputs = embed(&mut rng, prompt + generated - 1)?;
            let dim = inputs.dim();
            let rows = |from: usize, to: usize| HiddenStates::new(to - from, dim, inputs.as_slice()[from * dim..to * dim].to_vec());
            let mut cache = full.new_cache(prompt + generated);
            let started = Instant::now();
            full.forward(&mut cache, &rows(0, prompt)?, 0)?;
            for pos in prompt..prompt + generated - 1 {
                full.forward(&mut cache, &rows(pos, pos + 1)?, pos)?;
            }
            let session = started.elapsed().as_secs_f64();
            let mut fresh = full.new_cache(prompt + generated);
            let started = Instant::now();
            full.forward(&mut fresh, &inputs, 0)?;
            let audit = started.elapsed().as_secs_f64();
            // The first session warms up caches and the thread pool.
            if i > 0 {
                session_s += session;
                audit_s += audit;
                ratios.push(audit / session);
            }
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "audit cost, {threads} thread(s), {} kernels, {} random sessions (prompt 16..256, generated 16..256): \
             audit prefill / session compute = {:.1} % in total, {:.1} % median, {:.1} % worst",
            hotpot_engine::kernels::variant(),
            ratios.len(),
            100.0 * audit_s / session_s,
            100.0 * ratios[ratios.len() / 2],
            100.0 * ratios[ratios.len() - 1],
        );

        // Proof overhead on decode.
        let half = hotpot_core::LayerSpan::new(0, config.n_blocks / 2)?;
        for span in [half, config.full_span()] {
            let loaded = Span::load(&file, span, &device)?;
            let steps = args.n_gen.max(16);
            let inputs = embed(&mut rng, steps)?;
            let dim = inputs.dim();
            let (mut rates_off, mut rates_on) = (Vec::new(), Vec::new());
            let (mut sketch_bytes, mut commitment_bytes, mut commitments) = (0usize, 0usize, 0usize);
            for rep in 0..=args.repetitions * 2 + 1 {
                let proofs = rep % 2 == 1;
                let mut cache = loaded.new_cache(steps);
                let mut sketches = SketchBuilder::default();
                let session = SessionId::random();
                let started = Instant::now();
                for pos in 0..steps {
                    // Work a node does either way: decode the input tensor,
                    // compute, encode the output tensor.
                    let input = Tensor::from_f32(DType::F32, 1, dim, &inputs.as_slice()[pos * dim..(pos + 1) * dim]);
                    let hidden = HiddenStates::new(1, dim, input.to_f32())?;
                    let out = loaded.forward(&mut cache, &hidden, pos)?;
                    let output = Tensor::from_f32(DType::F32, 1, dim, out.as_slice());
                    if proofs {
                        let made: Vec<Vec<u8>> = sketches.push(pos as u32, 1, out.as_slice()).iter().map(hotpot_verify::Sketch::to_bytes).collect();
                        let record =
                            StepRecord { session, model: model_id, span, start_pos: pos as u32, rows: 1, input: input.bytes(), output: output.bytes() };
                        let commitment = Commitment::sign(&key, record, made);
                        if rep == 1 {
                            sketch_bytes += commitment.sketches.iter().map(Vec::len).sum::<usize>();
                            commitment_bytes += commitment_wire_bytes(&commitment);
                            commitments += 1;
                        }
                    }
                    std::hint::black_box(&output);
                }
                let rate = steps as f64 / started.elapsed().as_secs_f64();
                // The first pair warms up.
                if rep >= 2 {
                    if proofs { rates_on.push(rate) } else { rates_off.push(rate) }
                }
            }
            let (off, on) = (mean(&rates_off), mean(&rates_on));
            println!(
                "proof overhead, blocks {span}, {threads} thread(s), {steps} decode steps x {} reps: {off:.1} tok/s without, {on:.1} tok/s with \
                 commitments and sketches ({:+.2} %; the proof's own cost is {:.2} % of a step); sketches {:.2} bytes/position, commitment {:.0} bytes/step",
                rates_on.len(),
                100.0 * (on - off) / off,
                100.0 * proof_seconds * off,
                sketch_bytes as f64 / steps as f64,
                commitment_bytes as f64 / commitments.max(1) as f64,
            );
        }
    }
    Ok(())
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The process's peak resident set size (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
