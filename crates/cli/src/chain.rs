//! `hotpot chain …`: the market contract on an EVM chain (deploy, register
//! gateways, deposit, stake, unstake, withdraw, claim, settle a node's own
//! receipts, status), and the `--wallet`/`--chain-rpc`/`--market` options
//! of `node` and `gateway`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use hotpot_chain::{Address, Config, Market, U256, Wallet};
use hotpot_core::NodeKey;

use crate::store::Store;
use crate::swarm::runtime;

/// A chain market's options on `node` and `gateway`.
#[derive(Args, Debug, Clone, Default)]
pub struct ChainArgs {
    /// This process's wallet on the chain (a secp256k1 key, created on
    /// first use; its address is printed at start).
    #[arg(long, value_name = "FILE")]
    pub wallet: Option<PathBuf>,
    /// The chain's JSON-RPC endpoint.
    #[arg(long, value_name = "URL", requires_all = ["market", "wallet"])]
    pub chain_rpc: Option<String>,
    /// The market contract's address on that chain (`hotpot chain deploy`).
    #[arg(long, value_name = "ADDRESS", requires = "chain_rpc")]
    pub market: Option<Address>,
    /// Where receipts signed for the contract are kept until settled
    /// [default: $HOTPOT_HOME/chain-receipts.sqlite for a node,
    /// gateway-chain-receipts.sqlite for a gateway].
    #[arg(long, value_name = "FILE")]
    pub chain_receipts: Option<PathBuf>,
}

impl ChainArgs {
    /// The wallet, loaded or created, with its address printed.
    pub fn wallet(&self) -> Result<Option<Wallet>> {
        let Some(path) = &self.wallet else { return Ok(None) };
        let (wallet, created) = Wallet::load_or_create(path)?;
        println!("wallet: {}{}", wallet.address(), if created { format!(" (created in {})", path.display()) } else { String::new() });
        Ok(Some(wallet))
    }
}

/// A node's wallet, bound to its key, as `NodeInfo` announces it.
pub fn wallet_proof(wallet: &Wallet, key: &NodeKey) -> Result<hotpot_wire::WalletProof> {
    let binding = wallet.bind(key)?;
    Ok(hotpot_wire::WalletProof {
        address: binding.address.into_array(),
        node_signature: hotpot_core::Signature(binding.node_signature.as_slice().try_into().context("a node signature is 64 bytes")?),
        wallet_signature: binding.wallet_signature.as_slice().try_into().context("a wallet signature is 65 bytes")?,
    })
}

#[derive(Args, Debug)]
pub struct ChainCommandArgs {
    #[command(subcommand)]
    pub command: ChainCommand,
}

/// Where and as whom.
#[derive(Args, Debug, Clone)]
pub struct Endpoint {
    /// The chain's JSON-RPC endpoint.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8545")]
    pub rpc: String,
    /// The wallet that signs (created on first use).
    #[arg(long, value_name = "FILE")]
    pub wallet: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct OnMarket {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// The market contract's address.
    #[arg(long, value_name = "ADDRESS")]
    pub market: Address,
}

#[derive(Subcommand, Debug)]
pub enum ChainCommand {
    /// Print a wallet's address (creating the wallet if the file is missing).
    Wallet {
        #[arg(long, value_name = "FILE")]
        wallet: PathBuf,
    },
    /// Deploy a new market contract (the wallet becomes its owner, who
    /// registers gateways); prints its address.
    Deploy {
        #[command(flatten)]
        endpoint: Endpoint,
        /// Seconds a stake stays slashable after `unstake`.
        #[arg(long, default_value_t = 7 * 24 * 3600)]
        unbonding_delay: u64,
        /// Auditor signatures a slash needs.
        #[arg(long, default_value_t = 2)]
        quorum: u64,
        /// Percent of a slashed stake that goes to the accuser (the rest
        /// is burned).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
        accuser_share: u32,
        /// Wei per off-chain credit (default 10^12: a credit is 10^-6 of the coin).
        #[arg(long, default_value = "1000000000000")]
        wei_per_credit: U256,
    },
    /// Register (or with --remove, unregister) a gateway/auditor (owner only).
    Register {
        #[command(flatten)]
        on: OnMarket,
        gateway: Address,
        #[arg(long)]
        remove: bool,
    },
    /// Add to this wallet's gateway deposit (in the chain's coin, e.g. 1.5).
    Deposit {
        #[command(flatten)]
        on: OnMarket,
        amount: String,
    },
    /// Add to this wallet's node stake (in the chain's coin).
    Stake {
        #[command(flatten)]
        on: OnMarket,
        amount: String,
    },
    /// Start taking stake out: withdrawable after the unbonding delay.
    Unstake {
        #[command(flatten)]
        on: OnMarket,
        amount: String,
    },
    /// Pay out the unstaked amount whose delay has passed.
    Withdraw {
        #[command(flatten)]
        on: OnMarket,
    },
    /// Pay this wallet what the market settled to it.
    Claim {
        #[command(flatten)]
        on: OnMarket,
    },
    /// Settle the vouchers gateways signed for this node (kept in its
    /// chain receipts store) that are not settled yet: a node collects
    /// what it is owed without its gateway.
    Settle {
        #[command(flatten)]
        on: OnMarket,
        /// The node's chain receipts [default: $HOTPOT_HOME/chain-receipts.sqlite].
        #[arg(long)]
        store: Option<PathBuf>,
        /// Vouchers (one per gateway) per transaction.
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
    /// Measure the contract on a local anvil (which funds the wallets it
    /// makes): gas per settled receipt in batches of 1, 10 and 100
    /// receipts paid to 1 and to 3 nodes, gas per slash, and settlement
    /// latency. Prints a JSON line per figure.
    Bench {
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8545")]
        rpc: String,
        /// Settlement rounds per batch size (latency is their median).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Stakes, deposits, earnings, settlements; with --store, the
    /// vouchers kept there and not settled yet.
    Status {
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8545")]
        rpc: String,
        #[arg(long, value_name = "ADDRESS")]
        market: Address,
        #[arg(long)]
        store: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn coin(amount: &str) -> Result<U256> {
    hotpot_chain::parse_coin(amount).with_context(|| format!("{amount:?} is not an amount of the chain's coin (e.g. 1.5)"))
}

async fn open(on: &OnMarket) -> Result<(Wallet, Market)> {
    let (wallet, _) = Wallet::load_or_create(&on.endpoint.wallet)?;
    let market = Market::connect(&on.endpoint.rpc, &wallet, on.market).await?;
    Ok((wallet, market))
}

fn sent(what: &str, s: &hotpot_chain::Sent) {
    println!("{what}: transaction {} (block {}, gas {})", s.tx, s.block, s.gas_used);
}

pub fn chain(args: &ChainCommandArgs) -> Result<()> {
    runtime()?.block_on(async {
        match &args.command {
            ChainCommand::Wallet { wallet } => {
                let (wallet, created) = Wallet::load_or_create(wallet)?;
                println!("{}{}", wallet.address(), if created { " (created)" } else { "" });
            }
            ChainCommand::Deploy { endpoint, unbonding_delay, quorum, accuser_share, wei_per_credit } => {
                let (wallet, _) = Wallet::load_or_create(&endpoint.wallet)?;
                let config = Config {
                    unbonding_delay_s: *unbonding_delay,
                    quorum: *quorum,
                    accuser_share_ppm: accuser_share * 10_000,
                    wei_per_micro_credit: *wei_per_credit / U256::from(1_000_000u64),
                };
                if config.wei_per_micro_credit.is_zero() {
                    bail!("--wei-per-credit must be at least 10^6 (one wei per micro-credit)");
                }
                let (market, s) = Market::deploy(&endpoint.rpc, &wallet, &config).await?;
                eprintln!("deployed by {} on chain {} (gas {})", wallet.address(), market.chain_id(), s.gas_used);
                println!("{}", market.address());
            }
            ChainCommand::Register { on, gateway, remove } => {
                let (_, market) = open(on).await?;
                sent(if *remove { "unregistered" } else { "registered" }, &market.set_gateway(*gateway, !remove).await?);
            }
            ChainCommand::Deposit { on, amount } => {
                let (wallet, market) = open(on).await?;
                sent("deposited", &market.deposit(coin(amount)?).await?);
                println!("deposit of {}: {} wei", wallet.address(), market.deposit_of(wallet.address()).await?);
            }
            ChainCommand::Stake { on, amount } => {
                let (wallet, market) = open(on).await?;
                sent("staked", &market.stake(coin(amount)?).await?);
                println!("stake of {}: {} wei", wallet.address(), market.stake_of(wallet.address()).await?);
            }
            ChainCommand::Unstake { on, amount } => {
                let (wallet, market) = open(on).await?;
                sent("unstaking", &market.request_unstake(coin(amount)?).await?);
                let (wei, ready) = market.unstaking(wallet.address()).await?;
                println!("{wei} wei unstaking, withdrawable from Unix time {ready}; {} wei still at stake", market.stake_of(wallet.address()).await?);
            }
            ChainCommand::Withdraw { on } => {
                let (_, market) = open(on).await?;
                sent("withdrawn", &market.withdraw().await?);
            }
            ChainCommand::Claim { on } => {
                let (wallet, market) = open(on).await?;
                let due = market.earnings_of(wallet.address()).await?;
                sent(&format!("claimed {due} wei"), &market.claim().await?);
            }
            ChainCommand::Settle { on, store, batch } => {
                let (wallet, market) = open(on).await?;
                let path = match store {
                    Some(p) => p.clone(),
                    None => Store::from_env()?.chain_receipts_path(),
                };
                let outbox = outbox(&path)?;
                let pending: Vec<_> = outbox.pending(market.chain_id(), market.address())?.into_iter().filter(|p| p.voucher.node == wallet.address()).collect();
                if pending.is_empty() {
                    println!("nothing to settle for {}", wallet.address());
                    return Ok(());
                }
                let done = outbox.settle(&market, *batch, pending).await?;
                for t in &done.sent {
                    sent("settled", t);
                }
                println!(
                    "{} receipt(s) settled now ({} micro-credits), {} voucher(s) already settled on chain; {} wei to claim",
                    done.receipts,
                    done.micros,
                    done.already,
                    market.earnings_of(wallet.address()).await?
                );
            }
            ChainCommand::Status { rpc, market, store, json } => status(rpc, *market, store.as_deref(), *json).await?,
            ChainCommand::Bench { rpc, rounds } => bench(rpc, *rounds).await?,
        }
        Ok(())
    })
}

fn outbox(path: &Path) -> Result<hotpot_chain::Outbox> {
    Ok(hotpot_chain::Outbox::open(path)?)
}

async fn status(rpc: &str, address: Address, store: Option<&Path>, json: bool) -> Result<()> {
    // Views need no key: a throwaway wallet reads them.
    let reader = Wallet::from_hex(&format!("{:064x}", 1))?;
    let market = Market::connect(rpc, &reader, address).await?;
    let view = market.view().await?;
    // What the store still holds as pending, less what someone settled meanwhile.
    let mut unsettled = Vec::new();
    if let Some(path) = store {
        for p in outbox(path)?.pending(market.chain_id(), market.address())? {
            if !market.settled(p.voucher.id()).await? {
                unsettled.push(p);
            }
        }
    }
    if json {
        let unsettled: Vec<_> = unsettled
            .iter()
            .map(|p| {
                serde_json::json!({"id": p.voucher.id(), "gateway": p.voucher.gateway, "node": p.voucher.node, "total": p.voucher.total,
                    "receipts": p.unsettled_receipts, "micros": p.unsettled_micros})
            })
            .collect();
        let value = serde_json::json!({ "market": view, "unsettled": unsettled });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let c = &view.config;
    println!("market {} on chain {}", view.address, view.chain_id);
    println!(
        "  unbonding {} s, quorum {}, accuser share {}%, {} wei per credit",
        c.unbonding_delay_s,
        c.quorum,
        c.accuser_share_ppm / 10_000,
        c.wei_per_micro_credit * U256::from(1_000_000u64)
    );
    println!("  {} settlement(s), {} wei paid; {} wei burned by slashing", view.settlements, view.settled_wei, view.burned_wei);
    println!("gateways:");
    for g in &view.gateways {
        println!(
            "  {} {:<12} deposit {} wei, to claim {} wei",
            g.address,
            if g.registered { "registered" } else { "unregistered" },
            g.deposit_wei,
            g.earnings_wei
        );
    }
    println!("nodes:");
    for n in &view.nodes {
        println!(
            "  {} stake {} wei, unstaking {} wei (from {}), to claim {} wei",
            n.address, n.stake_wei, n.unstaking_wei, n.unstaking_ready_at, n.earnings_wei
        );
    }
    if store.is_some() {
        let receipts: u64 = unsettled.iter().map(|p| p.unsettled_receipts).sum();
        let micros: u64 = unsettled.iter().map(|p| p.unsettled_micros).sum();
        println!("unsettled in the store: {receipts} receipt(s) in {} voucher(s) ({micros} micro-credits)", unsettled.len());
    }
    Ok(())
}

/// The settlement options of `gateway` and `up`.
#[derive(Args, Debug, Clone)]
pub struct SettleArgs {
    /// Settle a node's voucher once it covers this many receipts not
    /// settled yet (every voucher due goes in one transaction).
    #[arg(long, default_value_t = 100)]
    pub settle_every: usize,
    /// Settle a voucher with a receipt this old (seconds) even if it
    /// covers fewer.
    #[arg(long, default_value_t = 300)]
    pub settle_after: u64,
}

impl SettleArgs {
    pub fn settle_after(&self) -> Duration {
        Duration::from_secs(self.settle_after)
    }
}

/// One line of `hotpot chain bench`: median gas and latency of settling
/// `vouchers` vouchers of `per_voucher` receipts each.
fn settle_row(by: &str, vouchers: usize, per_voucher: usize, gas: &[u64], latency: &mut [f64]) {
    let mut gas = gas.to_vec();
    gas.sort_unstable();
    latency.sort_by(f64::total_cmp);
    let median = gas[gas.len() / 2] as f64;
    println!(
        "{}",
        serde_json::json!({"what": "settle", "by": by, "vouchers": vouchers, "receipts_per_voucher": per_voucher, "gas_per_tx": median,
            "gas_per_receipt": median / (vouchers * per_voucher) as f64, "latency_ms_median": latency[latency.len() / 2]})
    );
}

/// `hotpot chain bench`: the contract's costs on a local anvil.
///
/// Receipts go through the gateway's own path: each is counted into its
/// node's running total and the new voucher signed (`Outbox::issue`);
/// a settlement sends each node's latest voucher in one transaction. Each
/// (gateway, node) pair is settled once before measuring (the first
/// settlement of a pair also creates its storage: reported apart), so the
/// figures are a node's steady state.
async fn bench(rpc: &str, rounds: usize) -> Result<()> {
    let funded = |w: &Wallet| {
        let (rpc, address) = (rpc.to_string(), w.address());
        async move { hotpot_chain::fund_on_anvil(&rpc, address, hotpot_chain::parse_coin("1000000")?).await }
    };
    let (owner, gateway, auditor) = (Wallet::random(), Wallet::random(), Wallet::random());
    let nodes: Vec<Wallet> = (0..3).map(|_| Wallet::random()).collect();
    for w in [&owner, &gateway, &auditor].into_iter().chain(&nodes) {
        funded(w).await?;
    }
    let config = Config { unbonding_delay_s: 3600, quorum: 2, ..Config::default() };
    let (market, deployed) = Market::deploy(rpc, &owner, &config).await?;
    println!("{}", serde_json::json!({"what": "deploy", "gas": deployed.gas_used}));
    market.set_gateway(gateway.address(), true).await?;
    market.set_gateway(auditor.address(), true).await?;
    let gw = Market::connect(rpc, &gateway, market.address()).await?;
    gw.deposit(hotpot_chain::parse_coin("100000")?).await?;
    let outbox = hotpot_chain::Outbox::in_memory()?;
    let mut next_id = 0u64;
    // A session of 1,000 positions at 0.5 credits per 1,000.
    let mut issue = |node: &Wallet| {
        next_id += 1;
        outbox.issue(&gw, &gateway, hotpot_chain::B256::from(U256::from(next_id)), node.address(), 500_000, 0)
    };
    for node in &nodes {
        issue(node)?;
    }
    let first = outbox.settle(&gw, hotpot_chain::MAX_BATCH, outbox.pending(gw.chain_id(), gw.address())?).await?;
    let first_gas: u64 = first.sent.iter().map(|t| t.gas_used).sum();
    println!("{}", serde_json::json!({"what": "first", "vouchers": nodes.len(), "gas_per_tx": first_gas}));
    // `vouchers` nodes each owed `per_voucher` receipts, settled by the
    // gateway in one transaction.
    for vouchers in [1usize, 3] {
        for per_voucher in [1usize, 10, 100] {
            let mut gas = Vec::new();
            let mut latency = Vec::new();
            for _ in 0..rounds.max(1) {
                for node in &nodes[..vouchers] {
                    for _ in 0..per_voucher {
                        issue(node)?;
                    }
                }
                let pending = outbox.pending(gw.chain_id(), gw.address())?;
                let started = std::time::Instant::now();
                let done = outbox.settle(&gw, hotpot_chain::MAX_BATCH, pending).await?;
                latency.push(started.elapsed().as_secs_f64() * 1000.0);
                let receipts = (vouchers * per_voucher) as u64;
                anyhow::ensure!(done.receipts == receipts, "settled {} receipts, not {receipts}", done.receipts);
                gas.push(done.sent.iter().map(|t| t.gas_used).sum::<u64>());
            }
            settle_row("gateway", vouchers, per_voucher, &gas, &mut latency);
        }
    }
    // A node settling its own voucher (the contract checks the gateway's
    // signature): what it pays to collect without its gateway.
    let node_market = Market::connect(rpc, &nodes[0], market.address()).await?;
    let mut gas = Vec::new();
    let mut latency = Vec::new();
    for _ in 0..rounds.max(1) {
        for _ in 0..100 {
            issue(&nodes[0])?;
        }
        let pending = outbox.pending(gw.chain_id(), gw.address())?;
        let started = std::time::Instant::now();
        let done = outbox.settle(&node_market, hotpot_chain::MAX_BATCH, pending).await?;
        latency.push(started.elapsed().as_secs_f64() * 1000.0);
        gas.push(done.sent.iter().map(|t| t.gas_used).sum::<u64>());
    }
    settle_row("node", 1, 100, &gas, &mut latency);
    let node = &nodes[0];
    node_market.stake(hotpot_chain::parse_coin("1")?).await?;
    let au = Market::connect(rpc, &auditor, market.address()).await?;
    let (model, evidence) = (hotpot_chain::B256::repeat_byte(1), hotpot_chain::B256::repeat_byte(2));
    let signed = vec![gw.sign_conviction(&gateway, node.address(), model, evidence)?, au.sign_conviction(&auditor, node.address(), model, evidence)?];
    let started = std::time::Instant::now();
    let slash = gw.slash(&signed).await?;
    println!("{}", serde_json::json!({"what": "slash", "signatures": 2, "gas": slash.gas_used, "latency_ms": started.elapsed().as_secs_f64() * 1000.0}));
    Ok(())
}
