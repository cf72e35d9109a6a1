//! Vouchers not yet known settled, kept in SQLite (`chain-receipts.sqlite`)
//! by the gateway that signs them and by the node they pay, until a
//! settlement is seen on chain.
//!
//! One row per (market, gateway, node) pair holds the latest voucher (the
//! running total) and how many receipts it covers; one row per receipt id
//! says which total covers it, so a receipt is counted into a total once.
//! The gateway raises a pair's total and signs the new voucher in one
//! SQLite transaction ([`Outbox::issue`]), so a total never goes down and a
//! node is never handed a voucher the gateway forgot.
//!
//! Settling is crash-safe without a two-phase dance: before a batch is
//! sent, each pair's paid total is read from the chain, so a voucher whose
//! transaction was mined just before a crash is marked, not sent again;
//! and the contract refuses a total already paid whatever happens.

use std::path::Path;
use std::sync::Mutex;

use alloy::primitives::{Address, B256};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::{ChainError, Market, Sent, Voucher, Wallet};

/// The schema this version writes and reads (1 kept one row per receipt,
/// each settled on its own: no longer read).
pub const OUTBOX_SCHEMA_VERSION: i64 = 2;

/// Most vouchers one settlement transaction carries.
pub const MAX_BATCH: usize = 200;

/// What one settling round did.
#[derive(Debug, Clone, Default)]
pub struct Settled {
    /// The transactions sent (each a batch of vouchers).
    pub sent: Vec<Sent>,
    /// Receipts these transactions paid.
    pub receipts: u64,
    /// Micro-credits these transactions paid.
    pub micros: u64,
    /// Vouchers found paid on chain already (by someone else, or by a
    /// transaction mined just before a crash), now marked.
    pub already: usize,
}

/// A voucher not yet known settled, with what it covers beyond the last
/// settlement seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub voucher: Voucher,
    /// Receipts the voucher covers, in all.
    pub receipts: u64,
    /// Receipts not settled yet.
    pub unsettled_receipts: u64,
    /// Micro-credits not settled yet.
    pub unsettled_micros: u64,
    /// When the oldest receipt not settled was kept (Unix ms).
    pub since_ms: u64,
}

/// What keeping a voucher at a node found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    /// The receipt was not kept before.
    pub new: bool,
    /// Micro-credits this node was handed receipts for that the pair's
    /// latest voucher does not cover (zero from an honest gateway, whatever
    /// order its receipts arrive in).
    pub short: u64,
}

/// The vouchers in one SQLite file.
#[derive(Debug)]
pub struct Outbox {
    conn: Mutex<Connection>,
}

fn store(e: rusqlite::Error) -> ChainError {
    ChainError::Invalid(format!("chain receipts store: {e}"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A stored u64 (SQLite integers are signed: values are stored as their
/// bit pattern and read back the same).
fn stored(v: u64) -> i64 {
    v as i64
}

fn unstored(v: i64) -> u64 {
    v as u64
}

fn damaged() -> ChainError {
    ChainError::Invalid("chain receipts store: a damaged row".into())
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
        Self::init(Connection::open(path).map_err(store)?, &path.display().to_string())
    }

    /// A store in memory (for a backend that settles at once).
    pub fn in_memory() -> Result<Self, ChainError> {
        Self::init(Connection::open_in_memory().map_err(store)?, "the in-memory store")
    }

    fn init(conn: Connection, name: &str) -> Result<Self, ChainError> {
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(store)?;
        let not_a_store = |e: rusqlite::Error| ChainError::Invalid(format!("{name} is not a chain receipts store: {e}"));
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);")
            .map_err(not_a_store)?;
        let version: Option<i64> = conn.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| r.get(0)).optional().map_err(store)?;
        match version {
            None | Some(OUTBOX_SCHEMA_VERSION) => {}
            Some(v) => {
                return Err(ChainError::Invalid(format!(
                    "{name} has schema version {v}; this version knows {OUTBOX_SCHEMA_VERSION} (settle it with the version that wrote it, then move it away)"
                )));
            }
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS pairs (
                 chain_id INTEGER NOT NULL, market BLOB NOT NULL, gateway BLOB NOT NULL, node BLOB NOT NULL,
                 total INTEGER NOT NULL, signature BLOB NOT NULL, receipts INTEGER NOT NULL,
                 base INTEGER NOT NULL, received INTEGER NOT NULL,
                 settled_total INTEGER NOT NULL, settled_receipts INTEGER NOT NULL, settled_tx BLOB,
                 since_ms INTEGER,
                 PRIMARY KEY (chain_id, market, gateway, node));
             CREATE TABLE IF NOT EXISTS receipts (
                 id BLOB PRIMARY KEY, chain_id INTEGER NOT NULL, market BLOB NOT NULL, gateway BLOB NOT NULL, node BLOB NOT NULL,
                 amount INTEGER NOT NULL, total INTEGER NOT NULL, kept_ms INTEGER NOT NULL);",
        )
        .map_err(not_a_store)?;
        if version.is_none() {
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?1)", params![OUTBOX_SCHEMA_VERSION]).map_err(store)?;
        }
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the store has a voucher for the pair (a gateway without one
    /// starts the pair's total from what the chain says was paid).
    pub fn has_pair(&self, chain_id: u64, market: Address, gateway: Address, node: Address) -> Result<bool, ChainError> {
        self.conn()
            .query_row(
                "SELECT 1 FROM pairs WHERE chain_id = ?1 AND market = ?2 AND gateway = ?3 AND node = ?4",
                params![stored(chain_id), market.as_slice(), gateway.as_slice(), node.as_slice()],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(store)
    }

    /// The gateway's side: counts receipt `id` (`amount` micro-credits to
    /// `node`) into the pair's total on market `on` and signs the new
    /// voucher with `wallet`, in one transaction. A pair new to this store starts from
    /// `paid` (what the chain says the pair was paid). A receipt id counted
    /// before is not counted again: the latest voucher of the pair it was
    /// counted into is returned.
    pub fn issue(&self, on: &Market, wallet: &Wallet, id: B256, node: Address, amount: u64, paid: u64) -> Result<Voucher, ChainError> {
        let (chain_id, market, gateway) = (on.chain_id(), on.address(), wallet.address());
        let mut conn = self.conn();
        let t = conn.transaction().map_err(store)?;
        let latest = |node: Address| -> Result<Option<(u64, Vec<u8>)>, ChainError> {
            t.query_row(
                "SELECT total, signature FROM pairs WHERE chain_id = ?1 AND market = ?2 AND gateway = ?3 AND node = ?4",
                params![stored(chain_id), market.as_slice(), gateway.as_slice(), node.as_slice()],
                |r| Ok((unstored(r.get(0)?), r.get(1)?)),
            )
            .optional()
            .map_err(store)
        };
        let counted: Option<Vec<u8>> =
            t.query_row("SELECT node FROM receipts WHERE id = ?1", params![id.as_slice()], |r| r.get(0)).optional().map_err(store)?;
        if let Some(counted) = counted {
            let node = Address::try_from(counted.as_slice()).map_err(|_| damaged())?;
            let (total, signature) = latest(node)?.ok_or_else(damaged)?;
            return Ok(Voucher { node, gateway, total, signature });
        }
        let before = latest(node)?.map_or(paid, |(total, _)| total);
        let total = before.checked_add(amount).ok_or_else(|| ChainError::Invalid(format!("the total owed to {node} overflows")))?;
        let voucher = Voucher::sign(wallet, chain_id, market, node, total)?;
        Self::count(&t, chain_id, market, &voucher, id, amount, before)?;
        t.commit().map_err(store)?;
        Ok(voucher)
    }

    /// The node's side: keeps `voucher`, handed with receipt `id` for
    /// `amount` micro-credits, if it raises the pair's total, and counts the
    /// receipt once. The caller has checked the voucher's signature.
    pub fn keep(&self, chain_id: u64, market: Address, voucher: &Voucher, id: B256, amount: u64) -> Result<Kept, ChainError> {
        let mut conn = self.conn();
        let t = conn.transaction().map_err(store)?;
        let known: bool = t.query_row("SELECT 1 FROM receipts WHERE id = ?1", params![id.as_slice()], |_| Ok(())).optional().map_err(store)?.is_some();
        if !known {
            Self::count(&t, chain_id, market, voucher, id, amount, voucher.total.saturating_sub(amount))?;
        }
        let (base, received, total): (i64, i64, i64) = t
            .query_row(
                "SELECT base, received, total FROM pairs WHERE chain_id = ?1 AND market = ?2 AND gateway = ?3 AND node = ?4",
                params![stored(chain_id), market.as_slice(), voucher.gateway.as_slice(), voucher.node.as_slice()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(store)?;
        t.commit().map_err(store)?;
        let short = unstored(base).saturating_add(unstored(received)).saturating_sub(unstored(total));
        Ok(Kept { new: !known, short })
    }

    /// Counts receipt `id` into its pair: the voucher replaces the pair's
    /// if its total is higher. `base` is what the pair was owed before this
    /// receipt; the pair keeps the lowest (what it was owed before every
    /// receipt this store saw, in whatever order they came).
    fn count(t: &Transaction<'_>, chain_id: u64, market: Address, voucher: &Voucher, id: B256, amount: u64, base: u64) -> Result<(), ChainError> {
        let now = now_ms();
        t.execute(
            "INSERT INTO receipts (id, chain_id, market, gateway, node, amount, total, kept_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                id.as_slice(),
                stored(chain_id),
                market.as_slice(),
                voucher.gateway.as_slice(),
                voucher.node.as_slice(),
                stored(amount),
                stored(voucher.total),
                now
            ],
        )
        .map_err(store)?;
        t.execute(
            "INSERT INTO pairs (chain_id, market, gateway, node, total, signature, receipts, base, received, settled_total, settled_receipts, since_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7, ?8, ?7, 0, ?9)
             ON CONFLICT (chain_id, market, gateway, node) DO UPDATE SET
                 signature = CASE WHEN excluded.total > total THEN excluded.signature ELSE signature END,
                 total = MAX(total, excluded.total),
                 receipts = receipts + 1,
                 received = received + excluded.received,
                 base = MIN(base, excluded.base),
                 since_ms = COALESCE(since_ms, excluded.since_ms)",
            params![
                stored(chain_id),
                market.as_slice(),
                voucher.gateway.as_slice(),
                voucher.node.as_slice(),
                stored(voucher.total),
                voucher.signature,
                stored(base),
                stored(amount),
                now
            ],
        )
        .map_err(store)?;
        Ok(())
    }

    /// The vouchers for `market` whose totals are not known paid, oldest
    /// first.
    pub fn pending(&self, chain_id: u64, market: Address) -> Result<Vec<Pending>, ChainError> {
        let conn = self.conn();
        let mut q = conn
            .prepare(
                "SELECT node, gateway, total, signature, receipts, settled_total, settled_receipts, since_ms FROM pairs
                 WHERE total > settled_total AND chain_id = ?1 AND market = ?2 ORDER BY since_ms, gateway, node",
            )
            .map_err(store)?;
        let rows = q
            .query_map(params![stored(chain_id), market.as_slice()], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, Option<i64>>(7)?,
                ))
            })
            .map_err(store)?;
        let mut out = Vec::new();
        for row in rows {
            let (node, gateway, total, signature, receipts, settled_total, settled_receipts, since_ms) = row.map_err(store)?;
            let (total, receipts) = (unstored(total), unstored(receipts));
            out.push(Pending {
                voucher: Voucher {
                    node: Address::try_from(node.as_slice()).map_err(|_| damaged())?,
                    gateway: Address::try_from(gateway.as_slice()).map_err(|_| damaged())?,
                    total,
                    signature,
                },
                receipts,
                unsettled_receipts: receipts.saturating_sub(unstored(settled_receipts)),
                unsettled_micros: total.saturating_sub(unstored(settled_total)),
                since_ms: since_ms.map_or(0, |ms| ms.max(0) as u64),
            });
        }
        Ok(out)
    }

    /// Records that `p`'s voucher is paid (by `tx`, or by someone else's
    /// transaction: zero). Receipts counted since `p` was read stay pending.
    pub fn mark_settled(&self, chain_id: u64, market: Address, p: &Pending, tx: B256) -> Result<(), ChainError> {
        let v = &p.voucher;
        self.conn()
            .execute(
                "UPDATE pairs SET
                     settled_total = MAX(settled_total, ?5), settled_receipts = MAX(settled_receipts, ?6), settled_tx = ?7,
                     since_ms = CASE WHEN total <= ?5 THEN NULL ELSE since_ms END
                 WHERE chain_id = ?1 AND market = ?2 AND gateway = ?3 AND node = ?4",
                params![stored(chain_id), market.as_slice(), v.gateway.as_slice(), v.node.as_slice(), stored(v.total), stored(p.receipts), tx.as_slice()],
            )
            .map(|_| ())
            .map_err(store)
    }

    /// Settles `pending` (vouchers read from this store), in batches of at
    /// most `batch` vouchers; a voucher whose total is paid on chain
    /// already is only marked (counted in [`Settled::already`]).
    pub async fn settle(&self, market: &Market, batch: usize, pending: Vec<Pending>) -> Result<Settled, ChainError> {
        let (chain_id, address) = (market.chain_id(), market.address());
        let mut fresh = Vec::with_capacity(pending.len());
        let mut done = Settled::default();
        for p in pending {
            if market.paid_to(p.voucher.gateway, p.voucher.node).await? >= p.voucher.total {
                self.mark_settled(chain_id, address, &p, B256::ZERO)?;
                done.already += 1;
            } else {
                fresh.push(p);
            }
        }
        for chunk in fresh.chunks(batch.clamp(1, MAX_BATCH)) {
            let vouchers: Vec<Voucher> = chunk.iter().map(|p| p.voucher.clone()).collect();
            let tx = market.settle(&vouchers).await?;
            for p in chunk {
                self.mark_settled(chain_id, address, p, tx.tx)?;
                done.receipts += p.unsettled_receipts;
                done.micros += p.unsettled_micros;
            }
            done.sent.push(tx);
        }
        Ok(done)
    }
}
