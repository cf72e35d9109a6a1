//! `hotpot verify` (re-check evidence of cheating) and `hotpot calibrate`
//! (measure honest differences, store the audit tolerance).

use anyhow::{Context, Result, bail};
use clap::Args;
use hotpot_core::LayerSpan;
use hotpot_engine::kernels::Isa;
use hotpot_engine::{ClientParts, Device, LocalChain, ModelFile, Span};
use hotpot_gateway::LocalExecutor;
use hotpot_verify::{Evidence, Sketch, SketchThresholds, Tolerance, compare};

use crate::store::Store;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// An evidence file written by a gateway.
    pub evidence: std::path::PathBuf,
    /// The model to recompute with (default: the evidence's model id, from the store).
    #[arg(long)]
    pub model: Option<String>,
    /// Compute threads (0: one per core).
    #[arg(short, long, default_value_t = 0)]
    pub threads: usize,
}

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// Model name, id or .gguf path (a registered model stores the result).
    #[arg(default_value = "smollm2-135m")]
    pub model: String,
    /// Positions in each measured sequence.
    #[arg(long, default_value_t = 96)]
    pub positions: usize,
}

pub fn verify(args: &VerifyArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.evidence).with_context(|| format!("reading {}", args.evidence.display()))?;
    let evidence: Evidence = serde_json::from_str(&text).with_context(|| format!("{} is not an evidence file", args.evidence.display()))?;
    let (inputs, _) = evidence.check_signatures().context("the evidence does not hold up")?;
    let positions = inputs.len() / evidence.dim.max(1);
    println!(
        "evidence: node {} on blocks {} of {} ({}), {positions} positions in {} signed steps",
        evidence.node,
        evidence.span,
        evidence.model_name,
        evidence.model,
        evidence.steps.len()
    );
    println!("signatures and hashes: valid (the node signed exactly these inputs and outputs)");
    match evidence.check_accuser().context("the accuser's signature does not hold up")? {
        Some(gateway) => match hotpot_net::peer_id_of(&gateway) {
            Some(peer) => println!("accused by gateway {peer} (its signature of this evidence is valid)"),
            None => println!("accused by gateway key {gateway} (its signature of this evidence is valid)"),
        },
        None => println!("no accuser signed this evidence"),
    }
    let store = Store::from_env()?;
    let name = args.model.clone().unwrap_or_else(|| evidence.model.to_full_string());
    let entry = store.resolve(&name)?;
    let file = ModelFile::open(&entry.path)?;
    if file.model_id()? != evidence.model {
        bail!("{} is not the evidence's model {}", entry.path.display(), evidence.model);
    }
    let tolerance = entry.tolerance.unwrap_or_default();
    let executor = LocalExecutor::load(&entry.path, &Device::cpu(args.threads)?).map_err(anyhow::Error::msg)?;
    let verdict = evidence.verify(&executor, &tolerance)?;
    let c = verdict.comparison;
    println!(
        "recomputed with {}: max |Δ| = {:.3e}, max relative Δ = {:.3e} (tolerance {:.1e}){}",
        entry.name,
        c.max_abs,
        c.max_relative,
        tolerance.max_relative,
        c.first_bad.map(|p| format!(", first bad position {p}")).unwrap_or_default()
    );
    if verdict.cheat {
        println!("verdict: CHEAT — node {} signed outputs that are not blocks {} of this model applied to its inputs", evidence.node, evidence.span);
    } else {
        println!("verdict: not proven — the node's outputs are what the model computes");
    }
    Ok(())
}

/// Final hidden states of `tokens` through the whole model, computed one way.
fn run(file: &ModelFile, client: &ClientParts, tokens: &[u32], threads: usize, isa: Isa, decode: bool, split: bool) -> Result<Vec<f32>> {
    let device = Device::cpu_with(threads, isa)?;
    let n = file.config().n_blocks;
    let chain = if split { vec![LayerSpan::new(0, n / 2)?, LayerSpan::new(n / 2, n)?] } else { vec![file.config().full_span()] };
    let spans = chain.iter().map(|s| Span::load(file, *s, &device)).collect::<Result<Vec<_>, _>>()?;
    let mut pipeline = LocalChain::new(&spans, tokens.len());
    if decode {
        let mut out = Vec::new();
        for (pos, &t) in tokens.iter().enumerate() {
            out.extend(pipeline.forward(client.embed(&[t])?, pos)?.into_vec());
        }
        Ok(out)
    } else {
        Ok(pipeline.forward(client.embed(tokens)?, 0)?.into_vec())
    }
}

pub fn calibrate(args: &CalibrateArgs) -> Result<()> {
    let store = Store::from_env()?;
    let entry = store.resolve(&args.model)?;
    let file = ModelFile::open(&entry.path)?;
    let dim = file.config().dim;
    let client = ClientParts::load(&file, &Device::cpu(1)?)?;
    let text = "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who had \
                spent his whole life repairing the clocks of the villagers. Every morning he opened his shop at seven, and \
                every evening he walked home along the river, counting the boats and the birds and the stars.";
    let mut tokens = client.tokenizer().encode(text)?;
    while tokens.len() < args.positions {
        tokens.extend_from_within(..);
    }
    tokens.truncate(args.positions.max(2));
    let best = Isa::detect();
    println!("calibrating {} on {} positions; reference: prefill, 1 thread, {} kernels", entry.name, tokens.len(), best.name());
    let reference = run(&file, &client, &tokens, 1, best, false, false)?;
    let sketch = Sketch::of(0, tokens.len() as u32, &reference);
    let mut worst_relative = 0.0f32;
    let mut worst_sketch = (0usize, 0.0f32);
    println!("| variant | identical | max relative Δ | sketch exponent mismatches | sketch mantissa mean |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for isa in Isa::available() {
        for threads in [1, 2] {
            for (mode, decode, split) in [("prefill", false, false), ("decode", true, false), ("2 spans, decode", true, true)] {
                let out = run(&file, &client, &tokens, threads, isa, decode, split)?;
                let c = compare(&out, &reference, dim, &Tolerance::default());
                let s = sketch.check(&out);
                worst_relative = worst_relative.max(c.max_relative);
                worst_sketch = (worst_sketch.0.max(s.exponent_mismatches), worst_sketch.1.max(s.mantissa_mean));
                println!(
                    "| {} kernels, {threads} thread(s), {mode} | {} | {:.2e} | {} | {:.2} |",
                    isa.name(),
                    if c.identical { "yes" } else { "no" },
                    c.max_relative,
                    s.exponent_mismatches,
                    s.mantissa_mean
                );
            }
        }
    }
    // Honest variants differ by at most what was seen; allow four times that.
    let tolerance = Tolerance {
        max_relative: worst_relative * 4.0,
        sketch: SketchThresholds {
            max_exponent_mismatches: SketchThresholds::default().max_exponent_mismatches.max(worst_sketch.0 * 4),
            max_mantissa_mean: SketchThresholds::default().max_mantissa_mean.max(worst_sketch.1 * 4.0),
            ..SketchThresholds::default()
        },
    };
    println!(
        "\nrecommended tolerance: max relative Δ {:.2e}{}",
        tolerance.max_relative,
        if tolerance.max_relative == 0.0 { " (every honest variant gave the same bits: audits compare exactly)" } else { "" }
    );
    match store.set_tolerance(&entry.path, tolerance) {
        Ok(()) => println!("stored with the model entry `{}` in {}", entry.name, store.registry_display()),
        Err(e) => println!("not stored: {e:#}"),
    }
    Ok(())
}
