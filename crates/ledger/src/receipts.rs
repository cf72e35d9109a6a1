//! Where receipts are kept: `$HOTPOT_HOME/receipts.sqlite`, by the node
//! that countersigned them and by the gateway that signed them.
//!
//! One row per receipt and holder (`node` or `gateway`: `hotpot up` runs
//! both in one home), keyed by the receipt's id, so keeping a receipt
//! twice keeps it once. A receipt of a convicted session is marked void
//! (it stays, with the conviction that voided it). Like the books, the
//! store is created when first needed and refuses a file that is not one.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use hotpot_core::Receipt;
use rusqlite::{Connection, OptionalExtension, params};

use crate::LedgerError;

/// The schema this version writes and reads.
pub const RECEIPTS_SCHEMA_VERSION: i64 = 1;

/// Who keeps a receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// The node it pays (countersigned by it).
    Node,
    /// The gateway that signed it.
    Gateway,
}

impl Holder {
    pub fn name(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Gateway => "gateway",
        }
    }
}

/// A kept receipt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Kept {
    pub holder: &'static str,
    pub receipt: Receipt,
    /// The conviction (evidence hash, hex) that voided it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub void: Option<String>,
}

/// The receipts in one SQLite file.
#[derive(Debug)]
pub struct ReceiptBook {
    conn: Mutex<Connection>,
}

impl ReceiptBook {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            return Err(LedgerError::Corrupt(format!("{} is empty", path.display())));
        }
        let corrupt = |e: rusqlite::Error| LedgerError::Corrupt(format!("{} is not a receipts store: {e}", path.display()));
        let conn = Connection::open(path).map_err(corrupt)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;").map_err(corrupt)?;
        conn.execute_batch(
            "BEGIN;
             CREATE TABLE IF NOT EXISTS receipts_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT OR IGNORE INTO receipts_meta (key, value) VALUES ('schema_version', 1);
             CREATE TABLE IF NOT EXISTS receipts (
                 id TEXT NOT NULL, holder TEXT NOT NULL, node TEXT NOT NULL, session TEXT NOT NULL,
                 time_ms INTEGER NOT NULL, json TEXT NOT NULL, void TEXT, payer TEXT,
                 PRIMARY KEY (id, holder));
             COMMIT;",
        )
        .map_err(corrupt)?;
        let version: i64 = conn.query_row("SELECT value FROM receipts_meta WHERE key = 'schema_version'", [], |r| r.get(0))?;
        if version > RECEIPTS_SCHEMA_VERSION {
            return Err(LedgerError::Version { found: version, known: RECEIPTS_SCHEMA_VERSION });
        }
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `receipt` (a countersignature added later replaces the row
    /// that lacked it). Returns whether it was new.
    pub fn keep(&self, holder: Holder, receipt: &Receipt) -> Result<bool, LedgerError> {
        self.keep_paid(holder, receipt, None)
    }

    /// [`ReceiptBook::keep`], naming who pays it (`key`, `request`): a
    /// gateway that stops between keeping and settling a receipt settles
    /// it at its next start ([`ReceiptBook::payers`]).
    pub fn keep_paid(&self, holder: Holder, receipt: &Receipt, payer: Option<(&str, &str)>) -> Result<bool, LedgerError> {
        let payer = payer.map(|(key, request)| format!("{key}:{request}"));
        let json = serde_json::to_string(receipt).map_err(|e| LedgerError::Refused(e.to_string()))?;
        let conn = self.conn();
        let existing: Option<String> =
            conn.query_row("SELECT json FROM receipts WHERE id = ?1 AND holder = ?2", params![receipt.id_hex(), holder.name()], |r| r.get(0)).optional()?;
        match existing {
            Some(_) if receipt.node_signature.is_none() => Ok(false),
            Some(_) => {
                conn.execute("UPDATE receipts SET json = ?3 WHERE id = ?1 AND holder = ?2", params![receipt.id_hex(), holder.name(), json])?;
                Ok(false)
            }
            None => {
                conn.execute(
                    "INSERT INTO receipts (id, holder, node, session, time_ms, json, payer) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        receipt.id_hex(),
                        holder.name(),
                        hotpot_core::hex(receipt.node.as_bytes()),
                        hotpot_core::hex(&receipt.session.0),
                        i64::try_from(receipt.time_ms).unwrap_or(i64::MAX),
                        json,
                        payer
                    ],
                )?;
                Ok(true)
            }
        }
    }

    /// Every kept receipt, oldest first.
    pub fn all(&self) -> Result<Vec<Kept>, LedgerError> {
        let conn = self.conn();
        let mut query = conn.prepare("SELECT holder, json, void FROM receipts ORDER BY time_ms, id, holder")?;
        let rows = query.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (holder, json, void) = row?;
            let receipt: Receipt = serde_json::from_str(&json).map_err(|e| LedgerError::Corrupt(format!("a kept receipt does not parse: {e}")))?;
            let holder = if holder == "node" { Holder::Node.name() } else { Holder::Gateway.name() };
            out.push(Kept { holder, receipt, void });
        }
        Ok(out)
    }

    /// The gateway's receipts that name a payer and are not void, with the
    /// payer's key and request.
    pub fn payers(&self) -> Result<Vec<(Receipt, String, String)>, LedgerError> {
        let conn = self.conn();
        let mut query = conn.prepare("SELECT json, payer FROM receipts WHERE holder = 'gateway' AND payer IS NOT NULL AND void IS NULL")?;
        let rows = query.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (json, payer) = row?;
            let receipt: Receipt = serde_json::from_str(&json).map_err(|e| LedgerError::Corrupt(format!("a kept receipt does not parse: {e}")))?;
            let (key, request) = payer.split_once(':').ok_or_else(|| LedgerError::Corrupt(format!("a receipt's payer {payer:?} names no request")))?;
            out.push((receipt, key.to_string(), request.to_string()));
        }
        Ok(out)
    }

    /// Voids every receipt of `node` for `session` (hex ids), naming the
    /// conviction; returns the receipts voided now.
    pub fn void_session(&self, node: &hotpot_core::NodeId, session: &hotpot_core::SessionId, conviction: &str) -> Result<Vec<Receipt>, LedgerError> {
        let conn = self.conn();
        let (node, session) = (hotpot_core::hex(node.as_bytes()), hotpot_core::hex(&session.0));
        let mut query = conn.prepare("SELECT json FROM receipts WHERE node = ?1 AND session = ?2 AND void IS NULL AND holder = 'gateway'")?;
        let voided: Vec<Receipt> = query
            .query_map(params![node, session], |r| r.get::<_, String>(0))?
            .filter_map(Result::ok)
            .filter_map(|json| serde_json::from_str(&json).ok())
            .collect();
        conn.execute("UPDATE receipts SET void = ?3 WHERE node = ?1 AND session = ?2 AND void IS NULL", params![node, session, conviction])?;
        Ok(voided)
    }
}

#[cfg(test)]
mod tests {
    use hotpot_core::{Credits, LayerSpan, ModelId, NodeKey, SessionId};

    use super::*;

    #[test]
    fn receipts_are_kept_once_and_voided() {
        let dir = tempfile::tempdir().expect("temp dir");
        let book = ReceiptBook::open(&dir.path().join("receipts.sqlite")).expect("opens");
        let (gateway, node) = (NodeKey::generate(), NodeKey::generate());
        let mut r = Receipt::sign(
            &gateway,
            SessionId([1; 16]),
            ModelId::from_bytes([2; 32]),
            node.id(),
            LayerSpan::new(0, 4).expect("span"),
            100,
            Credits::from_micros(1_000_000),
            [3; 32],
            5,
        );
        assert!(book.keep(Holder::Gateway, &r).expect("kept"));
        assert!(!book.keep(Holder::Gateway, &r).expect("kept once"));
        r.countersign(&node);
        assert!(!book.keep(Holder::Gateway, &r).expect("the countersigned one replaces it"));
        assert!(book.keep(Holder::Node, &r).expect("the node's copy"));
        let all = book.all().expect("lists");
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|k| k.receipt.node_signature.is_some() && k.void.is_none()));
        let voided = book.void_session(&node.id(), &SessionId([1; 16]), "evidence").expect("voids");
        assert_eq!(voided, vec![r]);
        assert!(book.void_session(&node.id(), &SessionId([1; 16]), "again").expect("voids").is_empty(), "voided once");
        assert!(book.all().expect("lists").iter().all(|k| k.void.as_deref() == Some("evidence")));
        std::fs::write(dir.path().join("bad.sqlite"), b"not a database at all, just bytes").expect("writes");
        assert!(ReceiptBook::open(&dir.path().join("bad.sqlite")).is_err());
    }
}
