//! The embedded backend: the books in one SQLite file.
//!
//! Tables: `transactions` (id, kind, reference — unique —, time),
//! `entries` (transaction, account, signed micro-credits) and `balances`
//! (per account, kept in the same SQLite transaction as the entries that
//! change them), plus `meta` (the schema version). Every [`Transaction`]
//! is one `BEGIN IMMEDIATE … COMMIT` with `synchronous = FULL`: a process
//! killed at any point leaves it whole or absent. The store fails closed:
//! it is created only when asked to, and a missing, empty or foreign file
//! refuses to open rather than start the books again from nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::{Account, Credits, Ledger, LedgerError, Posted, Transaction};

/// The schema this version writes and reads.
pub const SCHEMA_VERSION: i64 = 1;

/// The books in one SQLite file.
#[derive(Debug)]
pub struct SqliteLedger {
    conn: Mutex<Connection>,
}

impl SqliteLedger {
    /// Opens the books at `path`; creates them only when `create` is set
    /// and the file does not exist.
    pub fn open(path: &Path, create: bool) -> Result<Self, LedgerError> {
        let exists = match std::fs::metadata(path) {
            Ok(meta) if meta.len() == 0 => return Err(LedgerError::Corrupt(format!("{} is empty", path.display()))),
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(LedgerError::Corrupt(format!("cannot read {}: {e}", path.display()))),
        };
        if !exists && !create {
            return Err(LedgerError::Missing { path: path.to_path_buf() });
        }
        let conn = Connection::open(path).map_err(|e| not_sqlite(path, e))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;").map_err(|e| not_sqlite(path, e))?;
        if exists {
            let version = schema_version(&conn)?.ok_or_else(|| LedgerError::Corrupt(format!("{} holds no ledger", path.display())))?;
            if version > SCHEMA_VERSION {
                return Err(LedgerError::Version { found: version, known: SCHEMA_VERSION });
            }
        } else {
            conn.execute_batch(
                "BEGIN;
                 CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 CREATE TABLE transactions (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, reference TEXT UNIQUE, time_ms INTEGER NOT NULL);
                 CREATE TABLE entries (tx INTEGER NOT NULL REFERENCES transactions (id), account TEXT NOT NULL, amount INTEGER NOT NULL);
                 CREATE INDEX entries_by_account ON entries (account);
                 CREATE TABLE balances (account TEXT PRIMARY KEY, balance INTEGER NOT NULL);
                 INSERT INTO meta (key, value) VALUES ('schema_version', 1);
                 COMMIT;",
            )?;
        }
        let ledger = Self { conn: Mutex::new(conn) };
        ledger.check_balances()?;
        Ok(ledger)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cheap check made at every open: the balances sum to zero and
    /// none but external is below zero.
    fn check_balances(&self) -> Result<(), LedgerError> {
        let conn = self.conn();
        let total: i64 = conn.query_row("SELECT coalesce(sum(balance), 0) FROM balances", [], |r| r.get(0))?;
        if total != 0 {
            return Err(LedgerError::Corrupt(format!("the balances sum to {total} micro-credits, not 0")));
        }
        let mut negative = conn.prepare("SELECT account, balance FROM balances WHERE balance < 0 AND account != 'external'")?;
        if let Some((account, balance)) = negative.query_row([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).optional()? {
            return Err(LedgerError::Corrupt(format!("{account} holds {balance} micro-credits")));
        }
        Ok(())
    }

    /// The full check: every transaction's entries sum to zero, and every
    /// balance is the sum of its account's entries.
    pub fn verify(&self) -> Result<(), LedgerError> {
        self.check_balances()?;
        let conn = self.conn();
        let unbalanced: Option<i64> = conn.query_row("SELECT tx FROM entries GROUP BY tx HAVING sum(amount) != 0 LIMIT 1", [], |r| r.get(0)).optional()?;
        if let Some(tx) = unbalanced {
            return Err(LedgerError::Corrupt(format!("transaction {tx} does not balance")));
        }
        let drifted: Option<String> = conn
            .query_row(
                "SELECT b.account FROM balances b LEFT JOIN (SELECT account, sum(amount) AS total FROM entries GROUP BY account) e
                 ON e.account = b.account WHERE b.balance != coalesce(e.total, 0) LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(account) = drifted {
            return Err(LedgerError::Corrupt(format!("the balance of {account} is not the sum of its entries")));
        }
        Ok(())
    }

    /// How many transactions the books hold.
    pub fn transactions(&self) -> Result<u64, LedgerError> {
        Ok(self.conn().query_row("SELECT count(*) FROM transactions", [], |r| r.get::<_, i64>(0))? as u64)
    }
}

impl Ledger for SqliteLedger {
    fn post(&self, tx: &Transaction) -> Result<Posted, LedgerError> {
        tx.check()?;
        let mut deltas: BTreeMap<&Account, i128> = BTreeMap::new();
        for (account, amount) in &tx.entries {
            *deltas.entry(account).or_default() += amount;
        }
        let mut conn = self.conn();
        let t = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(reference) = &tx.reference
            && let Some(id) = t.query_row("SELECT id FROM transactions WHERE reference = ?1", [reference], |r| r.get(0)).optional()?
        {
            return Ok(Posted::Already(id));
        }
        for (account, delta) in &deltas {
            let name = account.to_string();
            let balance: i64 = t.query_row("SELECT balance FROM balances WHERE account = ?1", [&name], |r| r.get(0)).optional()?.unwrap_or(0);
            let new = i128::from(balance) + delta;
            if new < 0 && !account.may_go_negative() {
                return Err(LedgerError::Insufficient {
                    account: (*account).clone(),
                    balance: Credits::from_micros(u64::try_from(balance).unwrap_or(0)),
                    needed: Credits::from_micros(u64::try_from(-delta).unwrap_or(u64::MAX)),
                });
            }
            let new = i64::try_from(new).map_err(|_| LedgerError::Overflow)?;
            if new == 0 {
                t.execute("DELETE FROM balances WHERE account = ?1", [&name])?;
            } else {
                t.execute(
                    "INSERT INTO balances (account, balance) VALUES (?1, ?2) ON CONFLICT (account) DO UPDATE SET balance = excluded.balance",
                    params![name, new],
                )?;
            }
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        t.execute("INSERT INTO transactions (kind, reference, time_ms) VALUES (?1, ?2, ?3)", params![tx.kind.name(), tx.reference, now])?;
        let id = t.last_insert_rowid();
        for (account, amount) in &tx.entries {
            let amount = i64::try_from(*amount).map_err(|_| LedgerError::Overflow)?;
            t.execute("INSERT INTO entries (tx, account, amount) VALUES (?1, ?2, ?3)", params![id, account.to_string(), amount])?;
        }
        t.commit()?;
        Ok(Posted::New(id))
    }

    fn balance(&self, account: &Account) -> Result<i128, LedgerError> {
        let balance: Option<i64> = self.conn().query_row("SELECT balance FROM balances WHERE account = ?1", [account.to_string()], |r| r.get(0)).optional()?;
        Ok(i128::from(balance.unwrap_or(0)))
    }

    fn balances(&self) -> Result<Vec<(Account, i128)>, LedgerError> {
        let conn = self.conn();
        let mut query = conn.prepare("SELECT account, balance FROM balances WHERE balance != 0")?;
        let rows = query.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (account, balance) = row?;
            out.push((account.parse()?, i128::from(balance)));
        }
        out.sort();
        Ok(out)
    }

    fn posted(&self, reference: &str) -> Result<bool, LedgerError> {
        Ok(self.conn().query_row("SELECT count(*) FROM transactions WHERE reference = ?1", [reference], |r| r.get::<_, i64>(0))? > 0)
    }

    fn entries(&self, reference: &str) -> Result<Option<Vec<(Account, i128)>>, LedgerError> {
        let conn = self.conn();
        let Some(id) = conn.query_row("SELECT id FROM transactions WHERE reference = ?1", [reference], |r| r.get::<_, i64>(0)).optional()? else {
            return Ok(None);
        };
        let mut query = conn.prepare("SELECT account, amount FROM entries WHERE tx = ?1 ORDER BY rowid")?;
        let rows = query.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (account, amount) = row?;
            out.push((account.parse()?, i128::from(amount)));
        }
        Ok(Some(out))
    }
}

fn schema_version(conn: &Connection) -> Result<Option<i64>, LedgerError> {
    let has_meta: i64 = conn.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'", [], |r| r.get(0))?;
    if has_meta == 0 {
        return Ok(None);
    }
    Ok(conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0)).optional()?)
}

fn not_sqlite(path: &Path, e: rusqlite::Error) -> LedgerError {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if matches!(f.code, rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
            LedgerError::Corrupt(format!("{} is not an SQLite database", path.display()))
        }
        e => LedgerError::Store(e),
    }
}
