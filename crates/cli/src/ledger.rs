//! `hotpot ledger`: the books a gateway keeps (every account's balance),
//! and the operator's moves on them: prepaying keys, staking nodes,
//! unbonding and withdrawing stake.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hotpot_ledger::{Account, Books, Credits, Ledger, SqliteLedger};

use crate::store::Store;

#[derive(Args, Debug)]
pub struct LedgerArgs {
    /// The books [default: $HOTPOT_HOME/ledger.sqlite, beside the gateway's key].
    #[arg(long, global = true)]
    pub store: Option<PathBuf>,
    /// Create the books if they do not exist yet (first start only: a
    /// missing store is otherwise an error, never a fresh start from 0).
    #[arg(long, global = true)]
    pub init_store: bool,
    /// Print JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Option<LedgerCommand>,
}

#[derive(Subcommand, Debug)]
pub enum LedgerCommand {
    /// Prepay CREDITS to the key named KEY (its `name` in the keys file).
    Deposit { key: String, credits: Credits },
    /// Lock CREDITS against NODE (its peer id): deposited by its operator,
    /// or taken from what it earned with --from-earnings.
    Stake {
        node: String,
        credits: Credits,
        #[arg(long)]
        from_earnings: bool,
    },
    /// Start taking CREDITS of NODE's stake out: still slashable, and
    /// withdrawable once the unbonding delay has passed.
    Unbond {
        node: String,
        credits: Credits,
        /// The unbonding delay, seconds.
        #[arg(long, default_value_t = DEFAULT_UNBONDING_SECS)]
        unbonding_secs: u64,
    },
    /// Pay out NODE's unbonded stake whose delay has passed.
    Withdraw { node: String },
    /// Check every transaction and balance of the books.
    Check,
}

/// How long unbonded stake stays slashable by default: a day.
pub const DEFAULT_UNBONDING_SECS: u64 = 24 * 3600;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The books at `path` (or the default place).
pub fn open(path: Option<&PathBuf>, create: bool) -> Result<Arc<dyn Ledger>> {
    let path = match path {
        Some(path) => path.clone(),
        None => Store::from_env()?.ledger_path(),
    };
    Ok(Arc::new(open_sqlite(&path, create)?))
}

fn open_sqlite(path: &std::path::Path, create: bool) -> Result<SqliteLedger> {
    SqliteLedger::open(path, create).with_context(|| format!("opening the ledger {}", path.display()))
}

pub fn ledger(args: &LedgerArgs) -> Result<()> {
    let path = match &args.store {
        Some(path) => path.clone(),
        None => Store::from_env()?.ledger_path(),
    };
    let store = Arc::new(open_sqlite(&path, args.init_store)?);
    let unbonding = match &args.command {
        Some(LedgerCommand::Unbond { unbonding_secs, .. }) => Duration::from_secs(*unbonding_secs),
        _ => Duration::from_secs(DEFAULT_UNBONDING_SECS),
    };
    let books = Books::new(Arc::clone(&store) as Arc<dyn Ledger>, unbonding);
    match &args.command {
        None => return print_balances(&store, args.json),
        Some(LedgerCommand::Deposit { key, credits }) => {
            books.deposit(key, *credits, None)?;
            println!("key {key}: +{credits} credits, {} now", books.balance(&Account::Key(key.clone()))?);
        }
        Some(LedgerCommand::Stake { node, credits, from_earnings }) => {
            books.stake(node, *credits, *from_earnings)?;
            println!("node {node}: {} credits at stake", books.stake_of(node)?);
        }
        Some(LedgerCommand::Unbond { node, credits, .. }) => {
            let ready = books.unbond(node, *credits, now_ms())?;
            println!("node {node}: {credits} credits unbonding, withdrawable in {} s; {} still at stake", (ready - now_ms()) / 1000, books.stake_of(node)?);
        }
        Some(LedgerCommand::Withdraw { node }) => {
            let paid = books.withdraw_unbonded(node, now_ms())?;
            println!("node {node}: {paid} credits withdrawn");
        }
        Some(LedgerCommand::Check) => {
            store.verify()?;
            println!("the books balance: {} transactions, every one summing to zero, every balance the sum of its entries", store.transactions()?);
        }
    }
    Ok(())
}

fn print_balances(store: &SqliteLedger, json: bool) -> Result<()> {
    let balances = store.balances()?;
    if json {
        let rows: Vec<serde_json::Value> = balances
            .iter()
            .map(|(account, micros)| {
                let shown = if *micros < 0 {
                    format!("-{}", Credits::from_micros(micros.unsigned_abs() as u64))
                } else {
                    Credits::from_micros(*micros as u64).to_string()
                };
                serde_json::json!({"account": account.to_string(), "credits": shown, "micro_credits": *micros as i64})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"accounts": rows}))?);
        return Ok(());
    }
    if balances.is_empty() {
        println!("the books are empty");
        return Ok(());
    }
    let width = balances.iter().map(|(a, _)| a.to_string().len()).max().unwrap_or(7).max(7);
    println!("{:width$}  {:>16}", "account", "credits");
    for (account, micros) in &balances {
        let shown =
            if *micros < 0 { format!("-{}", Credits::from_micros(micros.unsigned_abs() as u64)) } else { Credits::from_micros(*micros as u64).to_string() };
        println!("{:width$}  {shown:>16}", account.to_string());
    }
    Ok(())
}
