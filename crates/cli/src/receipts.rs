//! `hotpot receipts`: the receipts this machine keeps (countersigned by its
//! nodes, signed by its gateway), and `hotpot receipts verify FILE`, which
//! checks an exported set offline: both signatures of each, its amount
//! against its positions and price, the totals, and — given the gateway's
//! session log — each receipt's commitment root against the session's.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use hotpot_core::{Credits, Receipt};
use hotpot_ledger::{Kept, ReceiptBook};
use serde::{Deserialize, Serialize};

use crate::store::Store;

#[derive(Args, Debug)]
pub struct ReceiptsArgs {
    /// The receipts [default: $HOTPOT_HOME/receipts.sqlite].
    #[arg(long, global = true)]
    pub store: Option<PathBuf>,
    /// Print JSON (the form `hotpot receipts verify` reads).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Option<ReceiptsCommand>,
}

#[derive(Subcommand, Debug)]
pub enum ReceiptsCommand {
    /// Check the receipts in FILE (`hotpot receipts --json` output):
    /// signatures, amounts, totals, and commitment roots against a session log.
    Verify {
        file: PathBuf,
        /// The gateway's session log (`--session-log`): every receipt's
        /// node, positions and commitment root must match a stage in it.
        #[arg(long)]
        session_log: Option<PathBuf>,
        /// Every receipt must be countersigned by its node.
        #[arg(long)]
        countersigned: bool,
    },
}

/// What `hotpot receipts --json` prints.
#[derive(Debug, Serialize, Deserialize)]
struct Export {
    receipts: Vec<ExportedReceipt>,
    /// Per node (its id, hex): what the valid receipts (not void) pay it.
    totals: BTreeMap<String, Credits>,
    /// All of them together.
    total: Credits,
}

#[derive(Debug, Serialize, Deserialize)]
struct ExportedReceipt {
    /// The receipt's id (hex), as the books reference its settlement.
    #[serde(default)]
    id: Option<String>,
    holder: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    void: Option<String>,
    #[serde(flatten)]
    receipt: Receipt,
}

fn totals<'a>(receipts: impl Iterator<Item = &'a ExportedReceipt>) -> (BTreeMap<String, Credits>, Credits) {
    let mut by_node: BTreeMap<String, Credits> = BTreeMap::new();
    let mut seen = HashSet::new();
    for r in receipts.filter(|r| r.void.is_none()) {
        // A receipt kept by both its node and its gateway pays once.
        if !seen.insert(r.receipt.id()) {
            continue;
        }
        let sum = by_node.entry(hotpot_core::hex(r.receipt.node.as_bytes())).or_default();
        *sum = sum.checked_add(r.receipt.amount).unwrap_or(*sum);
    }
    let total = by_node.values().fold(Credits::ZERO, |a, b| a.checked_add(*b).unwrap_or(a));
    (by_node, total)
}

pub fn receipts(args: &ReceiptsArgs) -> Result<()> {
    if let Some(ReceiptsCommand::Verify { file, session_log, countersigned }) = &args.command {
        return verify(file, session_log.as_deref(), *countersigned, args.json);
    }
    let path = match &args.store {
        Some(path) => path.clone(),
        None => Store::from_env()?.receipts_path(),
    };
    if !path.exists() {
        bail!("{} does not exist: no node or gateway has kept a receipt on this machine yet", path.display());
    }
    let book = ReceiptBook::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let kept = book.all()?;
    let receipts: Vec<ExportedReceipt> = kept
        .into_iter()
        .map(|Kept { holder, receipt, void }| ExportedReceipt { id: Some(receipt.id_hex()), holder: holder.to_string(), void, receipt })
        .collect();
    let (by_node, total) = totals(receipts.iter());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&Export { receipts, totals: by_node, total })?);
        return Ok(());
    }
    println!("{:<8} {:<13} {:<12} {:<8} {:>9} {:>10} {:>12}  STATE", "HOLDER", "NODE", "SESSION", "BLOCKS", "POSITIONS", "PRICE/1K", "AMOUNT");
    for r in &receipts {
        let state = match (&r.void, r.receipt.node_signature.is_some()) {
            (Some(_), _) => "void (conviction)",
            (None, true) => "countersigned",
            (None, false) => "not countersigned",
        };
        println!(
            "{:<8} {:<13} {:<12} {:<8} {:>9} {:>10} {:>12}  {state}",
            r.holder,
            r.receipt.node.to_string(),
            hotpot_core::hex(&r.receipt.session.0[..4]),
            r.receipt.span.to_string(),
            r.receipt.positions,
            r.receipt.price_per_1k.to_string(),
            r.receipt.amount.to_string()
        );
    }
    println!("{} receipts; owed in all: {total} credits", receipts.len());
    for (node, sum) in &by_node {
        println!("  node {}…: {sum}", &node[..12]);
    }
    Ok(())
}

/// One stage of a session log line: what the receipts are checked against.
#[derive(Debug, Deserialize)]
struct LoggedStage {
    node: Option<hotpot_core::NodeId>,
    positions: u64,
    commitments_root: String,
}

#[derive(Debug, Deserialize)]
struct LoggedSession {
    route: Vec<LoggedStage>,
}

fn verify(file: &std::path::Path, session_log: Option<&std::path::Path>, countersigned: bool, json: bool) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let export: Export = serde_json::from_str(&text).with_context(|| format!("{} is not a `hotpot receipts --json` export", file.display()))?;
    let logged: Option<Vec<LoggedStage>> = match session_log {
        None => None,
        Some(path) => {
            let log = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let mut stages = Vec::new();
            for (i, line) in log.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let session: LoggedSession = serde_json::from_str(line).with_context(|| format!("{}:{}: not a session record", path.display(), i + 1))?;
                stages.extend(session.route);
            }
            Some(stages)
        }
    };
    let mut problems = Vec::new();
    let mut ids = HashSet::new();
    for (i, r) in export.receipts.iter().enumerate() {
        let name = format!("receipt {i} ({}…)", &r.receipt.id_hex()[..12]);
        let checked = if countersigned { r.receipt.check_countersigned() } else { r.receipt.check() };
        if let Err(e) = checked {
            problems.push(format!("{name}: {e}"));
        }
        if r.id.as_ref().is_some_and(|id| *id != r.receipt.id_hex()) {
            problems.push(format!("{name}: its id is not the hash of what it says"));
        }
        if !ids.insert((r.receipt.id(), r.holder.clone())) {
            problems.push(format!("{name}: appears twice"));
        }
        if let Some(stages) = &logged {
            let root = hotpot_core::hex(&r.receipt.commitments_root);
            let found = stages.iter().any(|s| s.node == Some(r.receipt.node) && s.commitments_root == root && s.positions == r.receipt.positions);
            if !found {
                problems.push(format!("{name}: no session in the log has this node with these positions and commitment root"));
            }
        }
    }
    let (by_node, total) = totals(export.receipts.iter());
    if by_node != export.totals {
        problems.push("the per-node totals are not the sums of the receipts".into());
    }
    if total != export.total {
        problems.push(format!("the total says {}, the receipts sum to {total}", export.total));
    }
    if json {
        println!("{}", serde_json::json!({ "receipts": export.receipts.len(), "total": total, "problems": problems }));
    } else {
        println!("{} receipts, {total} credits in all", export.receipts.len());
        for p in &problems {
            println!("  FAIL {p}");
        }
    }
    if problems.is_empty() {
        if !json {
            println!("verdict: every receipt holds");
        }
        Ok(())
    } else {
        bail!("{} problem(s) with the receipts in {}", problems.len(), file.display())
    }
}
