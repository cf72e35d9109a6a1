//! API keys: who may call the gateway, how many tokens each may spend, and
//! how many requests per minute.
//!
//! The keys file is JSON:
//! `{"keys": [{"key": "sk-…", "name": "alice", "token_budget": 100000, "requests_per_minute": 60}]}`
//! (`token_budget` and `requests_per_minute` are optional: no limit).
//!
//! What each key has spent outlives the gateway: [`KeyStore::load`] keeps it
//! in an SQLite file beside the keys file (`keys.json` →
//! `keys.spending.sqlite`), one row per key named by the BLAKE3 hash of the
//! key (the keys themselves stay only in the keys file).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};

use serde::Deserialize;

use crate::error::ApiError;

#[derive(Debug, Clone, Deserialize)]
pub struct KeySpec {
    pub key: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub token_budget: Option<u64>,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct KeysFile {
    keys: Vec<KeySpec>,
}

#[derive(Debug)]
struct Account {
    spec: KeySpec,
    spent: u64,
    /// Token bucket for the request rate: tokens left and when last filled.
    bucket: f64,
    filled: Instant,
}

/// The configured keys and what each has spent.
#[derive(Debug)]
pub struct KeyStore {
    accounts: Mutex<HashMap<String, Account>>,
    /// Where spending is kept across restarts (none for a parsed store).
    ledger: Option<Mutex<Connection>>,
}

/// Who is calling (the key's name, for metrics and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key: String,
    pub name: String,
}

impl KeyStore {
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: KeysFile = serde_json::from_str(text).map_err(|e| format!("invalid keys file: {e}"))?;
        if file.keys.is_empty() {
            return Err("the keys file lists no keys".into());
        }
        let accounts = file
            .keys
            .into_iter()
            .map(|spec| {
                let bucket = f64::from(spec.requests_per_minute.unwrap_or(0));
                (spec.key.clone(), Account { spec, spent: 0, bucket, filled: Instant::now() })
            })
            .collect();
        Ok(Self { accounts: Mutex::new(accounts), ledger: None })
    }

    /// The keys of `path`, with what they spent before (see the module docs).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text)?.with_ledger(&ledger_path(path))
    }

    /// Keeps spending in the SQLite file `path` (created if missing) and
    /// starts each key from what that file says it spent.
    pub fn with_ledger(mut self, path: &Path) -> Result<Self, String> {
        let fail = |e: rusqlite::Error| format!("cannot use the spending ledger {}: {e}", path.display());
        let conn = Connection::open(path).map_err(fail)?;
        conn.busy_timeout(Duration::from_secs(2)).map_err(fail)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS spending (key_hash TEXT PRIMARY KEY, name TEXT NOT NULL, spent INTEGER NOT NULL);",
        )
        .map_err(fail)?;
        {
            let accounts = self.accounts.get_mut().unwrap_or_else(|e| e.into_inner());
            let mut query = conn.prepare("SELECT spent FROM spending WHERE key_hash = ?1").map_err(fail)?;
            for (key, account) in accounts.iter_mut() {
                let spent: Option<i64> = query.query_row(params![key_hash(key)], |row| row.get(0)).optional().map_err(fail)?;
                account.spent = spent.map_or(0, |s| u64::try_from(s).unwrap_or(0));
            }
        }
        self.ledger = Some(Mutex::new(conn));
        Ok(self)
    }

    /// Checks the `Authorization` header, the key's budget and its rate;
    /// counts the request.
    pub fn admit(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::Unauthorized("missing API key: send `Authorization: Bearer KEY`".into()))?;
        let mut accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let account = accounts.get_mut(token).ok_or_else(|| ApiError::Unauthorized("invalid API key".into()))?;
        if let Some(budget) = account.spec.token_budget
            && account.spent >= budget
        {
            return Err(ApiError::RateLimited { message: format!("this key has spent its budget of {budget} tokens"), code: "insufficient_quota" });
        }
        if let Some(rpm) = account.spec.requests_per_minute {
            let rpm = f64::from(rpm);
            let now = Instant::now();
            account.bucket = (account.bucket + now.duration_since(account.filled).as_secs_f64() * rpm / 60.0).min(rpm);
            account.filled = now;
            if account.bucket < 1.0 {
                return Err(ApiError::RateLimited { message: format!("rate limit of {rpm} requests per minute reached"), code: "rate_limit_exceeded" });
            }
            account.bucket -= 1.0;
        }
        let name = account.spec.name.clone().unwrap_or_else(|| format!("key-{}", &token[..token.len().min(6)]));
        Ok(Caller { key: token.to_string(), name })
    }

    /// Adds `tokens` to what `caller` spent (and to the ledger, if any).
    pub fn charge(&self, caller: &Caller, tokens: u64) {
        if let Some(account) = self.accounts.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&caller.key) {
            account.spent += tokens;
        }
        if let Some(ledger) = &self.ledger {
            let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
            let written = ledger.lock().unwrap_or_else(|e| e.into_inner()).execute(
                "INSERT INTO spending (key_hash, name, spent) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key_hash) DO UPDATE SET spent = spent + excluded.spent, name = excluded.name",
                params![key_hash(&caller.key), caller.name, tokens],
            );
            if let Err(e) = written {
                tracing::warn!(key = %caller.name, error = %e, "cannot record spending in the ledger");
            }
        }
    }

    /// `(name, spent)` for every key.
    pub fn spending(&self) -> Vec<(String, u64)> {
        let accounts = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = accounts.iter().map(|(k, a)| (a.spec.name.clone().unwrap_or_else(|| format!("key-{}", &k[..k.len().min(6)])), a.spent)).collect();
        out.sort();
        out
    }
}

/// The ledger of a keys file: `keys.json` → `keys.spending.sqlite`.
pub fn ledger_path(keys: &Path) -> PathBuf {
    keys.with_extension("spending.sqlite")
}

fn key_hash(key: &str) -> String {
    blake3::hash(key.as_bytes()).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"{"keys": [
        {"key": "sk-a", "name": "alice", "token_budget": 10},
        {"key": "sk-b", "requests_per_minute": 2}
    ]}"#;

    #[test]
    fn keys_budgets_and_rates() {
        let store = KeyStore::parse(FILE).expect("parses");
        assert!(matches!(store.admit(None), Err(ApiError::Unauthorized(_))));
        assert!(matches!(store.admit(Some("Bearer sk-zzz")), Err(ApiError::Unauthorized(_))));
        assert!(matches!(store.admit(Some("sk-a")), Err(ApiError::Unauthorized(_))));
        let alice = store.admit(Some("Bearer sk-a")).expect("admitted");
        assert_eq!(alice.name, "alice");
        store.charge(&alice, 10);
        assert!(matches!(store.admit(Some("Bearer sk-a")), Err(ApiError::RateLimited { code: "insufficient_quota", .. })));
        store.admit(Some("Bearer sk-b")).expect("first");
        store.admit(Some("Bearer sk-b")).expect("second");
        assert!(matches!(store.admit(Some("Bearer sk-b")), Err(ApiError::RateLimited { code: "rate_limit_exceeded", .. })));
        assert_eq!(store.spending(), vec![("alice".to_string(), 10), ("key-sk-b".to_string(), 0)]);
    }

    #[test]
    fn spending_outlives_the_gateway() {
        let dir = tempfile::tempdir().expect("temp dir");
        let keys = dir.path().join("keys.json");
        std::fs::write(&keys, FILE).expect("writes");
        let store = KeyStore::load(&keys).expect("loads");
        let alice = store.admit(Some("Bearer sk-a")).expect("admitted");
        store.charge(&alice, 6);
        drop(store);

        // A restarted gateway remembers the 6 tokens: 4 more exhaust the budget.
        let store = KeyStore::load(&keys).expect("loads again");
        assert_eq!(store.spending(), vec![("alice".to_string(), 6), ("key-sk-b".to_string(), 0)]);
        let alice = store.admit(Some("Bearer sk-a")).expect("still within budget");
        store.charge(&alice, 4);
        assert!(matches!(store.admit(Some("Bearer sk-a")), Err(ApiError::RateLimited { code: "insufficient_quota", .. })));
        drop(store);
        let store = KeyStore::load(&keys).expect("loads a third time");
        assert!(matches!(store.admit(Some("Bearer sk-a")), Err(ApiError::RateLimited { code: "insufficient_quota", .. })));

        // The ledger holds hashes of the keys, never the keys.
        let ledger = std::fs::read(ledger_path(&keys)).expect("the ledger exists");
        assert!(!ledger.windows(4).any(|w| w == b"sk-a"));
        // A file that is not SQLite is a clear error.
        std::fs::write(ledger_path(&keys), b"not a database, just some bytes that are long enough").expect("writes");
        let _ = std::fs::remove_file(dir.path().join("keys.spending.sqlite-wal"));
        let _ = std::fs::remove_file(dir.path().join("keys.spending.sqlite-shm"));
        let err = KeyStore::load(&keys).expect_err("refused");
        assert!(err.contains("spending ledger"), "{err}");
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(KeyStore::parse("{}").is_err());
        assert!(KeyStore::parse(r#"{"keys": []}"#).is_err());
        assert!(KeyStore::parse(r#"{"keys": [{"key": 3}]}"#).is_err());
    }
}
