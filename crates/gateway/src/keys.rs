//! API keys: who may call the gateway, how many tokens each may spend, and
//! how many requests per minute.
//!
//! The keys file is JSON:
//! `{"keys": [{"key": "sk-…", "name": "alice", "token_budget": 100000, "requests_per_minute": 60}]}`
//! (`token_budget` and `requests_per_minute` are optional: no limit).
//!
//! A request reserves what it may use (its prompts plus `max_tokens` for
//! every choice) before anything is generated, so concurrent requests can
//! never overspend a budget; each session settles what it really used when
//! it ends, however it ends, and the rest of the reservation is released.
//! What each key has spent outlives the gateway: [`KeyStore::load`] keeps it
//! in an SQLite file beside the keys file (`keys.json` →
//! `keys.spending.sqlite`, schema version [`SCHEMA_VERSION`]), one row per
//! key named by the BLAKE3 hash of the key (the keys themselves stay only
//! in the keys file). The store fails closed: it is created only when asked
//! to ([`Ledger::Create`], `--init-store`), and a missing, empty or corrupt
//! store, or an impossible value in it, refuses to start rather than let
//! every key start again from nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

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
    /// The key pays in credits from its account in the books (topped up
    /// with `hotpot ledger deposit NAME CREDITS`).
    #[serde(default)]
    pub prepaid: bool,
}

#[derive(Debug, Deserialize)]
struct KeysFile {
    keys: Vec<KeySpec>,
}

#[derive(Debug)]
struct Account {
    spec: KeySpec,
    name: String,
    spent: u64,
    /// Held by requests in flight.
    reserved: u64,
    /// Token bucket for the request rate: tokens left and when last filled.
    bucket: f64,
    filled: Instant,
}

/// Why a keys file or its spending store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid keys file: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the keys file lists no keys")]
    Empty,
    #[error("the key named {0:?} appears twice")]
    Duplicate(String),
    #[error("the prepaid key named {0:?} needs a name without ':' or spaces (it names the key's account in the books)")]
    PrepaidName(String),
    #[error("cannot use the spending store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the spending store {path} has schema version {found}; this gateway knows versions up to {SCHEMA_VERSION}")]
    Version { path: PathBuf, found: i64 },
    #[error(
        "the spending store {path} does not exist: without it every key would start again at 0 spent. If this is the first start with these keys, pass --init-store to create it; otherwise restore the file"
    )]
    Missing { path: PathBuf },
    #[error("the spending store {path} is unusable ({what}); restore it from a backup (the gateway will not start every key again at 0 spent)")]
    Corrupt { path: PathBuf, what: String },
}

/// Whether a missing spending store may be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ledger {
    /// The store must exist already.
    Existing,
    /// Create the store if it does not exist (first start).
    Create,
}

/// The configured keys and what each has spent and holds.
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

/// A key's state, as `GET /v1/hotpot/key` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyStatus {
    pub name: String,
    pub token_budget: Option<u64>,
    pub spent: u64,
    pub reserved: u64,
    /// Budget minus spent and reserved (`None`: no budget).
    pub remaining: Option<u64>,
    /// A prepaid key's credits in the books, and what its running
    /// requests hold of them (decimal strings; absent for other keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits_held: Option<String>,
}

/// The version of the spending store's schema. 1: the `spending` table
/// alone (no version recorded); 2: adds the `meta` table that records it.
pub const SCHEMA_VERSION: i64 = 2;

impl KeyStore {
    pub fn parse(text: &str) -> Result<Self, KeysError> {
        let file: KeysFile = serde_json::from_str(text)?;
        if file.keys.is_empty() {
            return Err(KeysError::Empty);
        }
        let mut accounts = HashMap::new();
        for spec in file.keys {
            let bucket = f64::from(spec.requests_per_minute.unwrap_or(0));
            let name = spec.name.clone().unwrap_or_else(|| format!("key-{}", spec.key.chars().take(6).collect::<String>()));
            if accounts.contains_key(&spec.key) {
                return Err(KeysError::Duplicate(name));
            }
            // A prepaid key's name is its account in the books.
            if spec.prepaid {
                if name.is_empty() || name.contains([':', ' ']) {
                    return Err(KeysError::PrepaidName(name));
                }
                if accounts.values().any(|a: &Account| a.spec.prepaid && a.name == name) {
                    return Err(KeysError::Duplicate(name));
                }
            }
            accounts.insert(spec.key.clone(), Account { spec, name, spent: 0, reserved: 0, bucket, filled: Instant::now() });
        }
        Ok(Self { accounts: Mutex::new(accounts), ledger: None })
    }

    /// The keys of `path`, with what they spent before (see the module docs).
    pub fn load(path: &Path, ledger: Ledger) -> Result<Self, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text)?.with_ledger(&ledger_path(path), ledger)
    }

    /// Keeps spending in the SQLite file `path` (created only with
    /// [`Ledger::Create`], migrated if older) and starts each key from what
    /// that file says it spent.
    pub fn with_ledger(mut self, path: &Path, ledger: Ledger) -> Result<Self, KeysError> {
        let fail = |source: rusqlite::Error| match source {
            rusqlite::Error::SqliteFailure(e, _) if matches!(e.code, rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                KeysError::Corrupt { path: path.to_path_buf(), what: "not an SQLite database".into() }
            }
            source => KeysError::Store { path: path.to_path_buf(), source },
        };
        let corrupt = |what: &str| KeysError::Corrupt { path: path.to_path_buf(), what: what.to_string() };
        let exists = match std::fs::metadata(path) {
            Ok(meta) if meta.len() == 0 => return Err(corrupt("the file is empty")),
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(source) => return Err(KeysError::Read { path: path.to_path_buf(), source }),
        };
        if !exists && ledger == Ledger::Existing {
            return Err(KeysError::Missing { path: path.to_path_buf() });
        }
        let conn = Connection::open(path).map_err(fail)?;
        conn.busy_timeout(Duration::from_secs(2)).map_err(fail)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;").map_err(fail)?;
        if exists && schema_version(&conn).map_err(fail)?.is_none() {
            return Err(corrupt("it holds no spending table"));
        }
        migrate(&conn, path)?;
        {
            let accounts = self.accounts.get_mut().unwrap_or_else(|e| e.into_inner());
            let mut query = conn.prepare("SELECT spent FROM spending WHERE key_hash = ?1").map_err(fail)?;
            for (key, account) in accounts.iter_mut() {
                let spent: Option<i64> = query.query_row(params![key_hash(key)], |row| row.get(0)).optional().map_err(fail)?;
                account.spent = match spent {
                    None => 0,
                    Some(s) => u64::try_from(s).map_err(|_| corrupt(&format!("key {:?} has spent {s} tokens", account.name)))?,
                };
            }
        }
        self.ledger = Some(Mutex::new(conn));
        Ok(self)
    }

    fn accounts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Account>> {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks the `Authorization` header and the key's rate; counts the
    /// request. (The budget is checked when the request reserves tokens.)
    pub fn admit(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::Unauthorized("missing API key: send `Authorization: Bearer KEY`".into()))?;
        let mut accounts = self.accounts();
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
        Ok(Caller { key: token.to_string(), name: account.name.clone() })
    }

    /// Tokens `caller` may still reserve (`None`: no budget).
    pub fn available(&self, caller: &Caller) -> Option<u64> {
        let accounts = self.accounts();
        let account = accounts.get(&caller.key)?;
        account.spec.token_budget.map(|b| b.saturating_sub(account.spent + account.reserved))
    }

    /// Holds `tokens` of `caller`'s budget for one request, or refuses with
    /// 429 `insufficient_quota` when they are not left.
    pub fn reserve(self: &Arc<Self>, caller: &Caller, tokens: u64) -> Result<Reservation, ApiError> {
        let mut accounts = self.accounts();
        let account = accounts.get_mut(&caller.key).ok_or_else(|| ApiError::Unauthorized("invalid API key".into()))?;
        if let Some(budget) = account.spec.token_budget {
            let left = budget.saturating_sub(account.spent + account.reserved);
            if tokens > left {
                return Err(ApiError::RateLimited {
                    message: format!(
                        "this request may use up to {tokens} tokens and this key has {left} left of its budget of {budget} (lower max_tokens or n)"
                    ),
                    code: "insufficient_quota",
                });
            }
        }
        account.reserved += tokens;
        Ok(Reservation { store: Arc::clone(self), caller: caller.clone(), held: Mutex::new(tokens) })
    }

    /// Adds `tokens` to what `caller` spent (and to the store, if any).
    fn charge(&self, caller: &Caller, tokens: u64) {
        if let Some(account) = self.accounts().get_mut(&caller.key) {
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
                tracing::warn!(key = %caller.name, error = %e, "cannot record spending in the store");
            }
        }
    }

    /// The state of `caller`'s key.
    pub fn status(&self, caller: &Caller) -> Option<KeyStatus> {
        let accounts = self.accounts();
        let a = accounts.get(&caller.key)?;
        Some(KeyStatus {
            name: a.name.clone(),
            token_budget: a.spec.token_budget,
            spent: a.spent,
            reserved: a.reserved,
            remaining: a.spec.token_budget.map(|b| b.saturating_sub(a.spent + a.reserved)),
            credits: None,
            credits_held: None,
        })
    }

    /// Whether `caller`'s key pays in credits.
    pub fn prepaid(&self, caller: &Caller) -> bool {
        self.accounts().get(&caller.key).is_some_and(|a| a.spec.prepaid)
    }

    /// `(name, spent)` for every key.
    pub fn spending(&self) -> Vec<(String, u64)> {
        let mut out: Vec<_> = self.accounts().values().map(|a| (a.name.clone(), a.spent)).collect();
        out.sort();
        out
    }
}

/// Tokens a request holds against a key's budget. Sessions settle what they
/// used with [`Reservation::settle`]; whatever is still held when the last
/// session lets go of it is released.
#[derive(Debug)]
pub struct Reservation {
    store: Arc<KeyStore>,
    caller: Caller,
    held: Mutex<u64>,
}

impl Reservation {
    /// Charges `tokens` and lets go of as much of the hold.
    pub fn settle(&self, tokens: u64) {
        let released = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let released = tokens.min(*held);
            *held -= released;
            released
        };
        if let Some(account) = self.store.accounts().get_mut(&self.caller.key) {
            account.reserved -= released.min(account.reserved);
        }
        self.store.charge(&self.caller, tokens);
    }

    pub fn caller(&self) -> &Caller {
        &self.caller
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let held = *self.held.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(account) = self.store.accounts().get_mut(&self.caller.key) {
            account.reserved -= held.min(account.reserved);
        }
    }
}

/// The schema version of an existing store (`None`: it holds no store).
fn schema_version(conn: &Connection) -> Result<Option<i64>, rusqlite::Error> {
    let table = |name: &str| -> Result<bool, rusqlite::Error> {
        conn.query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |row| row.get::<_, i64>(0)).map(|n| n > 0)
    };
    if !table("spending")? {
        return Ok(None);
    }
    if !table("meta")? {
        // Version 1 recorded no version.
        return Ok(Some(1));
    }
    conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |row| row.get(0)).optional().map(|v| Some(v.unwrap_or(1)))
}

/// Brings the store at `path` to [`SCHEMA_VERSION`] (a new store: creates it).
fn migrate(conn: &Connection, path: &Path) -> Result<(), KeysError> {
    let fail = |source: rusqlite::Error| KeysError::Store { path: path.to_path_buf(), source };
    let version = schema_version(conn).map_err(fail)?.unwrap_or(0);
    conn.execute_batch("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);").map_err(fail)?;
    if version > SCHEMA_VERSION {
        return Err(KeysError::Version { path: path.to_path_buf(), found: version });
    }
    conn.execute_batch(
        "BEGIN;
         CREATE TABLE IF NOT EXISTS spending (key_hash TEXT PRIMARY KEY, name TEXT NOT NULL, spent INTEGER NOT NULL);
         INSERT INTO meta (key, value) VALUES ('schema_version', 2) ON CONFLICT (key) DO UPDATE SET value = 2;
         COMMIT;",
    )
    .map_err(fail)?;
    if version == 1 {
        tracing::info!(store = %path.display(), "migrated the spending store from schema version 1 to 2");
    }
    Ok(())
}

/// The spending store of a keys file: `keys.json` → `keys.spending.sqlite`.
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
        let store = Arc::new(KeyStore::parse(FILE).expect("parses"));
        assert!(matches!(store.admit(None), Err(ApiError::Unauthorized(_))));
        assert!(matches!(store.admit(Some("Bearer sk-zzz")), Err(ApiError::Unauthorized(_))));
        assert!(matches!(store.admit(Some("sk-a")), Err(ApiError::Unauthorized(_))));
        let alice = store.admit(Some("Bearer sk-a")).expect("admitted");
        assert_eq!(alice.name, "alice");
        store.reserve(&alice, 10).expect("reserves").settle(10);
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
        // No store yet: refused unless asked to create one.
        assert!(matches!(KeyStore::load(&keys, Ledger::Existing), Err(KeysError::Missing { .. })));
        let store = Arc::new(KeyStore::load(&keys, Ledger::Create).expect("loads"));
        let alice = store.admit(Some("Bearer sk-a")).expect("admitted");
        store.reserve(&alice, 8).expect("reserves").settle(6);
        drop(store);

        // A restarted gateway remembers the 6 tokens: 4 more exhaust the budget.
        let store = Arc::new(KeyStore::load(&keys, Ledger::Existing).expect("loads again"));
        assert_eq!(store.spending(), vec![("alice".to_string(), 6), ("key-sk-b".to_string(), 0)]);
        let alice = store.admit(Some("Bearer sk-a")).expect("still within budget");
        store.reserve(&alice, 4).expect("reserves").settle(4);
        assert!(matches!(store.admit(Some("Bearer sk-a")), Err(ApiError::RateLimited { code: "insufficient_quota", .. })));
        drop(store);
        let store = KeyStore::load(&keys, Ledger::Existing).expect("loads a third time");
        assert!(matches!(store.admit(Some("Bearer sk-a")), Err(ApiError::RateLimited { code: "insufficient_quota", .. })));

        // The ledger holds hashes of the keys, never the keys.
        let ledger = std::fs::read(ledger_path(&keys)).expect("the ledger exists");
        assert!(!ledger.windows(4).any(|w| w == b"sk-a"));
        // A file that is not SQLite is a clear error.
        std::fs::write(ledger_path(&keys), b"not a database, just some bytes that are long enough").expect("writes");
        let _ = std::fs::remove_file(dir.path().join("keys.spending.sqlite-wal"));
        let _ = std::fs::remove_file(dir.path().join("keys.spending.sqlite-shm"));
        let err = KeyStore::load(&keys, Ledger::Create).expect_err("refused").to_string();
        assert!(err.contains("spending store") && err.contains("not an SQLite database"), "{err}");
    }

    /// A deleted, emptied or tampered store never starts every key at 0.
    #[test]
    fn stores_fail_closed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let keys = dir.path().join("keys.json");
        std::fs::write(&keys, FILE).expect("writes");
        let store = Arc::new(KeyStore::load(&keys, Ledger::Create).expect("creates"));
        let alice = store.admit(Some("Bearer sk-a")).expect("admitted");
        store.reserve(&alice, 5).expect("reserves").settle(5);
        drop(store);
        let ledger = ledger_path(&keys);
        let sidecars = |dir: &Path| {
            let _ = std::fs::remove_file(dir.join("keys.spending.sqlite-wal"));
            let _ = std::fs::remove_file(dir.join("keys.spending.sqlite-shm"));
        };
        // A negative value is an error, not 0.
        Connection::open(&ledger).expect("opens").execute("UPDATE spending SET spent = -3", []).expect("tampers");
        let err = KeyStore::load(&keys, Ledger::Existing).expect_err("refused").to_string();
        assert!(err.contains("-3"), "{err}");
        // Emptied: refused, even when asked to create a store.
        sidecars(dir.path());
        std::fs::write(&ledger, b"").expect("empties");
        for ledger_mode in [Ledger::Existing, Ledger::Create] {
            let err = KeyStore::load(&keys, ledger_mode).expect_err("refused").to_string();
            assert!(err.contains("empty"), "{err}");
        }
        // Deleted: refused unless asked to create it again.
        std::fs::remove_file(&ledger).expect("deletes");
        let err = KeyStore::load(&keys, Ledger::Existing).expect_err("refused").to_string();
        assert!(err.contains("does not exist") && err.contains("--init-store"), "{err}");
        // A database without the spending table is not a store.
        Connection::open(&ledger).expect("creates").execute_batch("CREATE TABLE other (x INTEGER);").expect("table");
        assert!(matches!(KeyStore::load(&keys, Ledger::Create), Err(KeysError::Corrupt { .. })));
    }

    /// Reservations are atomic: what is held counts against the budget until
    /// it is settled or released, and a request that does not fit is refused.
    #[test]
    fn reservations_hold_and_release() {
        let store = Arc::new(KeyStore::parse(FILE).expect("parses"));
        let alice = store.admit(Some("Bearer sk-a")).expect("admitted");
        let first = store.reserve(&alice, 7).expect("fits");
        assert!(matches!(store.reserve(&alice, 4), Err(ApiError::RateLimited { code: "insufficient_quota", .. })));
        let status = store.status(&alice).expect("status");
        assert_eq!((status.spent, status.reserved, status.remaining), (0, 7, Some(3)));
        first.settle(2);
        assert_eq!(store.status(&alice).map(|s| (s.spent, s.reserved)), Some((2, 5)));
        drop(first);
        assert_eq!(store.status(&alice).map(|s| (s.spent, s.reserved, s.remaining)), Some((2, 0, Some(8))));
        let second = store.reserve(&alice, 8).expect("fits again");
        second.settle(3);
        second.settle(3);
        drop(second);
        assert_eq!(store.status(&alice).map(|s| (s.spent, s.reserved)), Some((8, 0)));
    }

    /// A version-1 store (no version recorded) is migrated and keeps its
    /// numbers; a store from a newer gateway is refused.
    #[test]
    fn old_stores_migrate_and_newer_ones_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let keys = dir.path().join("keys.json");
        std::fs::write(&keys, FILE).expect("writes");
        {
            let conn = Connection::open(ledger_path(&keys)).expect("opens");
            conn.execute_batch("CREATE TABLE spending (key_hash TEXT PRIMARY KEY, name TEXT NOT NULL, spent INTEGER NOT NULL);").expect("v1");
            conn.execute("INSERT INTO spending VALUES (?1, 'alice', 9)", params![key_hash("sk-a")]).expect("row");
        }
        let store = KeyStore::load(&keys, Ledger::Existing).expect("migrates");
        assert_eq!(store.spending()[0], ("alice".to_string(), 9));
        drop(store);
        let conn = Connection::open(ledger_path(&keys)).expect("opens");
        let version: i64 = conn.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0)).expect("recorded");
        assert_eq!(version, SCHEMA_VERSION);
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'", []).expect("bumps");
        drop(conn);
        assert!(matches!(KeyStore::load(&keys, Ledger::Existing), Err(KeysError::Version { found: 99, .. })));
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(KeyStore::parse("{}").is_err());
        assert!(KeyStore::parse(r#"{"keys": []}"#).is_err());
        assert!(KeyStore::parse(r#"{"keys": [{"key": 3}]}"#).is_err());
    }
}
