//! Receipts signed for the contract and not yet known settled, kept in
//! SQLite (`chain-receipts.sqlite`) by the gateway that signed them and by
//! the node they pay, until a settlement is seen on chain.
//!
//! Settling is crash-safe without a two-phase dance: before a batch is
//! sent, every receipt in it is looked up on chain (`settled(id)`), so a
//! receipt whose transaction was mined just before a crash is marked, not
//! sent again; and the contract pays an id once whatever happens.

use std::path::Path;
use std::sync::Mutex;

use alloy::primitives::{Address, B256};
use rusqlite::{Connection, params};

use crate::{ChainError, ChainReceipt, Market, Sent};

/// The schema this version writes and reads.
pub const OUTBOX_SCHEMA_VERSION: i64 = 1;

/// Most receipts one settlement transaction carries.
pub const MAX_BATCH: usize = 200;

/// What one settling round did.
#[derive(Debug, Clone, Default)]
pub struct Settled {
    /// The transactions sent (each a batch).
    pub sent: Vec<Sent>,
    /// Receipts found settled on chain already (by someone else, or by a
    /// transaction mined just before a crash), now marked.
    pub already: usize,
}

/// The receipts in one SQLite file.
#[derive(Debug)]
pub struct Outbox {
    conn: Mutex<Connection>,
}

fn store(e: rusqlite::Error) -> ChainError {
    ChainError::Invalid(format!("chain receipts store: {e}"))
}

impl Outbox {
    /// Opens (or creates) the store at `path`; refuses a file that is not
    /// one (empty, another schema, not SQLite).
    pub fn open(path: &Path) -> Result<Self, ChainError> {
        if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            return Err(ChainError::Invalid(format!("{} is empty (not a chain receipts store)", path.display())));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| ChainError::Invalid(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(store)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(store)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS receipts (
                 id BLOB PRIMARY KEY, chain_id INTEGER NOT NULL, market BLOB NOT NULL,
                 node BLOB NOT NULL, gateway BLOB NOT NULL, amount INTEGER NOT NULL, signature BLOB NOT NULL,
                 settled_tx BLOB, created_ms INTEGER NOT NULL);",
        )
        .map_err(|e| ChainError::Invalid(format!("{} is not a chain receipts store: {e}", path.display())))?;
        let version: Option<i64> =
            conn.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| r.get(0)).map(Some).or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(store(e)),
            })?;
        match version {
            None => {
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?1)", params![OUTBOX_SCHEMA_VERSION]).map_err(store)?;
            }
            Some(OUTBOX_SCHEMA_VERSION) => {}
            Some(v) => return Err(ChainError::Invalid(format!("{} has schema version {v}; this version knows {OUTBOX_SCHEMA_VERSION}", path.display()))),
        }
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `receipt` for `market` (once per id). Returns whether it is new.
    pub fn keep(&self, chain_id: u64, market: Address, receipt: &ChainReceipt) -> Result<bool, ChainError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let n = self
            .conn()
            .execute(
                "INSERT OR IGNORE INTO receipts (id, chain_id, market, node, gateway, amount, signature, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    receipt.id.as_slice(),
                    chain_id as i64,
                    market.as_slice(),
                    receipt.node.as_slice(),
                    receipt.gateway.as_slice(),
                    receipt.amount as i64,
                    receipt.signature,
                    now
                ],
            )
            .map_err(store)?;
        Ok(n == 1)
    }

    /// The receipts for `market` not yet known settled, oldest first.
    pub fn pending(&self, chain_id: u64, market: Address) -> Result<Vec<ChainReceipt>, ChainError> {
        let conn = self.conn();
        let mut q = conn
            .prepare(
                "SELECT id, node, gateway, amount, signature FROM receipts
                 WHERE settled_tx IS NULL AND chain_id = ?1 AND market = ?2 ORDER BY created_ms, id",
            )
            .map_err(store)?;
        let rows = q
            .query_map(params![chain_id as i64, market.as_slice()], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, Vec<u8>>(2)?, r.get::<_, i64>(3)?, r.get::<_, Vec<u8>>(4)?))
            })
            .map_err(store)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, node, gateway, amount, signature) = row.map_err(store)?;
            let bad = || ChainError::Invalid("chain receipts store: a damaged row".into());
            out.push(ChainReceipt {
                id: B256::try_from(id.as_slice()).map_err(|_| bad())?,
                node: Address::try_from(node.as_slice()).map_err(|_| bad())?,
                gateway: Address::try_from(gateway.as_slice()).map_err(|_| bad())?,
                amount: u64::try_from(amount).map_err(|_| bad())?,
                signature,
            });
        }
        Ok(out)
    }

    /// When the oldest receipt pending for `market` was kept (Unix ms).
    pub fn oldest_pending_ms(&self, chain_id: u64, market: Address) -> Result<Option<u64>, ChainError> {
        self.conn()
            .query_row(
                "SELECT MIN(created_ms) FROM receipts WHERE settled_tx IS NULL AND chain_id = ?1 AND market = ?2",
                params![chain_id as i64, market.as_slice()],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|v| v.map(|ms| ms.max(0) as u64))
            .map_err(store)
    }

    /// Marks receipts settled (by `tx`, or by someone else's transaction:
    /// zero).
    pub fn mark_settled(&self, ids: &[B256], tx: B256) -> Result<(), ChainError> {
        let mut conn = self.conn();
        let t = conn.transaction().map_err(store)?;
        for id in ids {
            t.execute("UPDATE receipts SET settled_tx = ?2 WHERE id = ?1", params![id.as_slice(), tx.as_slice()]).map_err(store)?;
        }
        t.commit().map_err(store)
    }

    /// Settles what is pending for `market`, in batches of at most
    /// `batch`; receipts someone already settled on chain are only marked
    /// (counted in [`Settled::already`]). Calls `settled` with each batch's
    /// receipts once its transaction is mined.
    pub async fn settle(&self, market: &Market, batch: usize, mut settled: impl FnMut(&[ChainReceipt])) -> Result<Settled, ChainError> {
        let pending = self.pending(market.chain_id(), market.address())?;
        let mut fresh = Vec::with_capacity(pending.len());
        let mut already = 0;
        for r in pending {
            if market.settled(r.id).await? {
                self.mark_settled(&[r.id], B256::ZERO)?;
                already += 1;
            } else {
                fresh.push(r);
            }
        }
        let mut sent = Vec::new();
        for chunk in fresh.chunks(batch.clamp(1, MAX_BATCH)) {
            let tx = market.settle(chunk).await?;
            self.mark_settled(&chunk.iter().map(|r| r.id).collect::<Vec<_>>(), tx.tx)?;
            settled(chunk);
            sent.push(tx);
        }
        Ok(Settled { sent, already })
    }
}
