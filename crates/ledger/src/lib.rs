//! Hotpot's books: who holds how many credits.
//!
//! Double entry: every movement of credits is one [`Transaction`] whose
//! entries sum to zero, so credits are never made or lost inside the
//! books — they come in from [`Account::External`] (deposits) and leave to
//! it (withdrawals) or to [`Account::Burned`] (slashes). No other account
//! may go below zero: a transaction that would take one there is refused
//! whole. A transaction may carry a reference (a receipt id, a request id,
//! a conviction): posting the same reference twice posts it once, so
//! settling is idempotent and a retry after a crash counts nothing twice.
//!
//! ```text
//!  external ──deposit──▶ key:alice ──hold──▶ held:alice:req-7 ──settle──▶ node:N, fees
//!                                     ◀──release (what the request did not use)
//!  node:N ──stake──▶ stake:N ──unbond──▶ unbonding:N:<ready> ──withdraw (after the delay)──▶ external
//!  stake:N, unbonding:N:* ──slash──▶ fees (the accuser's share) + burned
//! ```
//!
//! [`Ledger`] is the one interface; [`SqliteLedger`] is the embedded
//! backend (one SQLite file, each transaction one SQLite transaction, so a
//! process killed at any point leaves every transaction whole or absent).
//! [`Books`] holds the operations (deposit, hold, settle, stake, slash, …)
//! on top of any backend. [`StakeBook`] is the interface of the market
//! operations (stake, unbond, withdraw, settle receipts once, slash) that
//! the chain backend (`hotpot-chain`) keeps too, with [`conformance`]
//! tests both run.

mod books;
mod receipts;
mod sqlite;
mod stakes;

use std::fmt;
use std::str::FromStr;

pub use books::{Books, Payment, Settlement};
pub use hotpot_core::Credits;
pub use receipts::{Holder, Kept, RECEIPTS_SCHEMA_VERSION, ReceiptBook};
pub use sqlite::SqliteLedger;
pub use stakes::{BooksStakes, StakeBook, conformance};

/// One account of the books.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Account {
    /// Outside the books: where deposits come from and withdrawals go; the
    /// only account that may go below zero (its balance is minus what the
    /// books hold).
    External,
    /// A key's prepaid credits (by the key's name).
    Key(String),
    /// Credits a request of `key` holds while it runs (`request`: its id).
    Held { key: String, request: String },
    /// A node's earnings (by node id).
    Node(String),
    /// Credits locked against a node's honesty.
    Stake(String),
    /// Stake on its way out, withdrawable from `ready_ms` (Unix ms) on,
    /// and still slashable until then.
    Unbonding { node: String, ready_ms: u64 },
    /// The gateway's fees, and its share of the slashes its audits caused.
    Fees,
    /// Credits destroyed by slashing.
    Burned,
}

impl Account {
    /// Whether the account may go below zero.
    pub fn may_go_negative(&self) -> bool {
        matches!(self, Self::External)
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::External => f.write_str("external"),
            Self::Key(k) => write!(f, "key:{k}"),
            Self::Held { key, request } => write!(f, "held:{key}:{request}"),
            Self::Node(n) => write!(f, "node:{n}"),
            Self::Stake(n) => write!(f, "stake:{n}"),
            Self::Unbonding { node, ready_ms } => write!(f, "unbonding:{node}:{ready_ms}"),
            Self::Fees => f.write_str("fees"),
            Self::Burned => f.write_str("burned"),
        }
    }
}

impl FromStr for Account {
    type Err = LedgerError;

    fn from_str(s: &str) -> Result<Self, LedgerError> {
        let bad = || LedgerError::Corrupt(format!("unknown account {s:?}"));
        let name = |n: &str| if n.is_empty() || n.contains(':') { Err(bad()) } else { Ok(n.to_string()) };
        Ok(match s.split_once(':') {
            None => match s {
                "external" => Self::External,
                "fees" => Self::Fees,
                "burned" => Self::Burned,
                _ => return Err(bad()),
            },
            Some(("key", k)) => Self::Key(name(k)?),
            Some(("node", n)) => Self::Node(name(n)?),
            Some(("stake", n)) => Self::Stake(name(n)?),
            Some(("held", rest)) => {
                let (key, request) = rest.split_once(':').ok_or_else(bad)?;
                Self::Held { key: name(key)?, request: name(request)? }
            }
            Some(("unbonding", rest)) => {
                let (node, ready) = rest.split_once(':').ok_or_else(bad)?;
                Self::Unbonding { node: name(node)?, ready_ms: ready.parse().map_err(|_| bad())? }
            }
            Some(_) => return Err(bad()),
        })
    }
}

/// What a transaction does (for the record and for `hotpot ledger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Deposit,
    Hold,
    Settle,
    Release,
    Stake,
    Unbond,
    Withdraw,
    Slash,
    /// A convicted session's pay goes back to the key that paid it.
    Void,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Deposit => "deposit",
            Self::Hold => "hold",
            Self::Settle => "settle",
            Self::Release => "release",
            Self::Stake => "stake",
            Self::Unbond => "unbond",
            Self::Withdraw => "withdraw",
            Self::Slash => "slash",
            Self::Void => "void",
        }
    }
}

/// A movement of credits: entries that sum to zero, posted whole or not
/// at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub kind: Kind,
    /// Posting a reference a second time posts nothing (idempotence).
    pub reference: Option<String>,
    /// Signed amounts in micro-credits: what each account gains (> 0) or
    /// gives (< 0).
    pub entries: Vec<(Account, i128)>,
}

impl Transaction {
    pub fn new(kind: Kind, reference: Option<String>) -> Self {
        Self { kind, reference, entries: Vec::new() }
    }

    /// Moves `amount` from `from` to `to` (nothing when it is zero).
    pub fn transfer(mut self, from: Account, to: Account, amount: Credits) -> Self {
        if !amount.is_zero() {
            let micros = i128::from(amount.micros());
            self.entries.push((from, -micros));
            self.entries.push((to, micros));
        }
        self
    }

    /// Checks that the entries balance and fit the books' integers.
    pub fn check(&self) -> Result<(), LedgerError> {
        if self.entries.iter().map(|(_, a)| *a).sum::<i128>() != 0 {
            return Err(LedgerError::Unbalanced);
        }
        if self.entries.iter().any(|(_, a)| i64::try_from(*a).is_err()) {
            return Err(LedgerError::Overflow);
        }
        Ok(())
    }
}

/// How a posting went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// Posted now, as transaction `id`.
    New(i64),
    /// Its reference was posted before (as transaction `id`): nothing done.
    Already(i64),
    /// It moved nothing and named no reference: nothing written.
    Nothing,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{account} holds {balance} credits, {needed} are needed")]
    Insufficient { account: Account, balance: Credits, needed: Credits },
    #[error("the entries of a transaction do not sum to zero")]
    Unbalanced,
    #[error("an amount does not fit the books")]
    Overflow,
    #[error("{0}")]
    Refused(String),
    #[error("the ledger store is unusable: {0}")]
    Corrupt(String),
    #[error("the ledger store {path} does not exist; pass --init-store to create it (first start) or restore it")]
    Missing { path: std::path::PathBuf },
    #[error("the ledger store has schema version {found}; this version knows up to {known}")]
    Version { found: i64, known: i64 },
    #[error("ledger store: {0}")]
    Store(#[from] rusqlite::Error),
}

/// The books' one interface; backends keep them (embedded SQLite here, a
/// chain later).
pub trait Ledger: Send + Sync {
    /// Posts `tx` whole, or refuses it whole (an account other than
    /// external would go below zero, the entries do not balance).
    fn post(&self, tx: &Transaction) -> Result<Posted, LedgerError>;

    /// One account's balance (external: what has come in minus what went
    /// out, as a signed number of micro-credits).
    fn balance(&self, account: &Account) -> Result<i128, LedgerError>;

    /// Every account with a non-zero balance, sorted.
    fn balances(&self) -> Result<Vec<(Account, i128)>, LedgerError>;

    /// Whether a transaction with this reference was posted.
    fn posted(&self, reference: &str) -> Result<bool, LedgerError>;

    /// The entries of the transaction posted with this reference.
    fn entries(&self, reference: &str) -> Result<Option<Vec<(Account, i128)>>, LedgerError>;
}
