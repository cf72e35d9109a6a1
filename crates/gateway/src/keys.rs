//! API keys: who may call the gateway, and within which limits.
//!
//! The keys file is JSON:
//! `{"keys": [{"key": "sk-…", "name": "alice", "token_budget": 100000, "requests_per_minute": 60}]}`.
//! Every limit is optional (absent: no limit): `token_budget`,
//! `requests_per_minute`, `credits` (most credits spent in all), `daily_limit`
//! (most credits spent per UTC day), `models` (the only models it may use),
//! `max_price` (most credits per 1,000 positions a request may pay),
//! `expires_at` (Unix seconds); `prepaid: true` makes it pay in credits
//! from its account in the books.
//!
//! A key can mint **child keys** (`POST /v1/hotpot/keys`) whose limits fit
//! inside its own: what a child spends counts against every ancestor, a
//! child pays from its root's account, and revoking a key (or letting it
//! expire) stops its descendants at once. Children live in the store only
//! (by the hash of their key, like every key there).
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
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hotpot_core::{Credits, NodeKey};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::spend::{Charge, SpendEntry, SpendHead, SpendLog};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// The key itself (only in the keys file; children are kept by hash).
    #[serde(default, skip_serializing)]
    pub key: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_budget: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// The key pays in credits from its account in the books (topped up
    /// with `hotpot ledger deposit NAME CREDITS`).
    #[serde(default)]
    pub prepaid: bool,
    /// Most credits the key may spend in all (its children's included).
    #[serde(default, with = "credits_text", skip_serializing_if = "Option::is_none")]
    pub credits: Option<Credits>,
    /// Most credits the key may spend per UTC day (its children's included).
    #[serde(default, with = "credits_text", skip_serializing_if = "Option::is_none")]
    pub daily_limit: Option<Credits>,
    /// The only models the key may use (aliases or ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Most credits per 1,000 positions a request of the key may pay.
    #[serde(default, with = "credits_text", skip_serializing_if = "Option::is_none")]
    pub max_price: Option<Credits>,
    /// When the key stops working (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// Credits as a decimal string, read from a number or a string.
mod credits_text {
    use hotpot_core::Credits;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &Option<Credits>, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Some(c) => s.serialize_str(&c.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Credits>, D::Error> {
        crate::openai::credits_opt(d)
    }
}

#[derive(Debug, Deserialize)]
struct KeysFile {
    keys: Vec<KeySpec>,
}

#[derive(Debug)]
struct Account {
    spec: KeySpec,
    name: String,
    /// The parent's key hash (none: a key of the keys file).
    parent: Option<String>,
    revoked: bool,
    /// Tokens spent and held by requests in flight (descendants' included).
    spent: u64,
    reserved: u64,
    /// Micro-credits spent and held (descendants' included).
    credits_spent: u64,
    credits_reserved: u64,
    /// The UTC day `day_spent` counts (days since the epoch).
    day: u64,
    day_spent: u64,
    /// Token bucket for the request rate: tokens left and when last filled.
    bucket: f64,
    filled: Instant,
    /// The last entry of the key's spend log.
    tail: Option<SpendEntry>,
}

impl Account {
    fn new(spec: KeySpec, name: String, parent: Option<String>) -> Self {
        let bucket = f64::from(spec.requests_per_minute.unwrap_or(0));
        Self {
            spec,
            name,
            parent,
            revoked: false,
            spent: 0,
            reserved: 0,
            credits_spent: 0,
            credits_reserved: 0,
            day: today(),
            day_spent: 0,
            bucket,
            filled: Instant::now(),
            tail: None,
        }
    }

    /// Credits spent today (0 once the day has turned).
    fn spent_today(&mut self) -> u64 {
        let day = today();
        if self.day != day {
            self.day = day;
            self.day_spent = 0;
        }
        self.day_spent
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn today() -> u64 {
    now_secs() / 86_400
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
    #[error("the key named {0:?} needs a name without ':', '/' or spaces (it names the key's account in the books and its spend log)")]
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

/// The configured keys, their children, and what each has spent and holds.
#[derive(Debug)]
pub struct KeyStore {
    /// By the BLAKE3 hash of the key.
    accounts: Mutex<HashMap<String, Account>>,
    /// Where spending is kept across restarts (none for a parsed store).
    ledger: Option<Mutex<Connection>>,
    /// Spend logs of a store without a file.
    memory_logs: Mutex<HashMap<String, Vec<SpendEntry>>>,
    /// The gateway's key, which signs spend logs (none: no logs).
    signer: OnceLock<NodeKey>,
}

/// Who is calling: the key's hash and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key: String,
    pub name: String,
}

/// A key's limits, as `GET /v1/hotpot/key` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daily_limit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_price: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
}

/// A key's state, as `GET /v1/hotpot/key` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyStatus {
    pub name: String,
    /// The parent key's name (a child key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub token_budget: Option<u64>,
    pub spent: u64,
    pub reserved: u64,
    /// Budget minus spent and reserved (`None`: no budget).
    pub remaining: Option<u64>,
    /// Credits spent, held by running requests, and left under the
    /// key's own `credits` limit (decimal strings).
    pub credits_spent: String,
    pub credits_reserved: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits_remaining: Option<String>,
    pub spent_today: String,
    pub limits: Limits,
    /// The account the key pays from in the books (its root's name), its
    /// credits there and what running requests hold of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pays_from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits_held: Option<String>,
}

/// The version of the spending store's schema. 1: the `spending` table
/// alone (no version recorded); 2: adds the `meta` table that records it;
/// 3: credits spent per key, child keys and spend logs.
pub const SCHEMA_VERSION: i64 = 3;

/// A valid key name: it names accounts in the books and spend logs.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && !name.contains([':', ' ', '/']) && !name.chars().any(char::is_control)
}

fn quota(message: String) -> ApiError {
    ApiError::RateLimited { message, code: "insufficient_quota" }
}

fn exceeds(message: String) -> ApiError {
    ApiError::Forbidden { message, code: "limits_exceed_parent" }
}

impl KeyStore {
    pub fn parse(text: &str) -> Result<Self, KeysError> {
        let file: KeysFile = serde_json::from_str(text)?;
        if file.keys.is_empty() {
            return Err(KeysError::Empty);
        }
        let mut accounts: HashMap<String, Account> = HashMap::new();
        for spec in file.keys {
            let name = spec.name.clone().unwrap_or_else(|| format!("key-{}", spec.key.chars().take(6).collect::<String>()));
            let hash = key_hash(&spec.key);
            if accounts.contains_key(&hash) {
                return Err(KeysError::Duplicate(name));
            }
            // A prepaid key's name is its account in the books.
            if spec.prepaid && !valid_name(&name) {
                return Err(KeysError::PrepaidName(name));
            }
            if accounts.values().any(|a| a.name == name) {
                return Err(KeysError::Duplicate(name));
            }
            accounts.insert(hash, Account::new(spec, name, None));
        }
        Ok(Self { accounts: Mutex::new(accounts), ledger: None, memory_logs: Mutex::default(), signer: OnceLock::new() })
    }

    /// The keys of `path`, with what they spent before (see the module docs).
    pub fn load(path: &Path, ledger: Ledger) -> Result<Self, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text)?.with_ledger(&ledger_path(path), ledger)
    }

    /// Keeps spending in the SQLite file `path` (created only with
    /// [`Ledger::Create`], migrated if older) and starts each key from what
    /// that file says it spent; takes up the child keys and spend logs.
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
            // Child keys first: they are accounts like the others.
            let mut children = conn.prepare("SELECT key_hash, parent_hash, name, spec, revoked FROM children ORDER BY rowid").map_err(fail)?;
            let rows = children
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, i64>(4)?)))
                .map_err(fail)?;
            for row in rows {
                let (hash, parent, name, spec, revoked) = row.map_err(fail)?;
                let spec: KeySpec = serde_json::from_str(&spec).map_err(|e| corrupt(&format!("child key {name:?}: {e}")))?;
                let mut account = Account::new(spec, name, Some(parent));
                account.revoked = revoked != 0;
                accounts.insert(hash, account);
            }
            let mut query = conn.prepare("SELECT spent, credits_spent FROM spending WHERE key_hash = ?1").map_err(fail)?;
            let mut tails = conn.prepare("SELECT entry FROM spend_log WHERE key_hash = ?1 ORDER BY seq DESC LIMIT 1").map_err(fail)?;
            for (hash, account) in accounts.iter_mut() {
                let row: Option<(i64, i64)> = query.query_row(params![hash], |row| Ok((row.get(0)?, row.get(1)?))).optional().map_err(fail)?;
                let (spent, credits) = row.unwrap_or((0, 0));
                account.spent = u64::try_from(spent).map_err(|_| corrupt(&format!("key {:?} has spent {spent} tokens", account.name)))?;
                account.credits_spent = u64::try_from(credits).map_err(|_| corrupt(&format!("key {:?} has spent {credits} micro-credits", account.name)))?;
                let tail: Option<String> = tails.query_row(params![hash], |row| row.get(0)).optional().map_err(fail)?;
                account.tail = tail.map(|t| serde_json::from_str(&t)).transpose().map_err(|e| corrupt(&format!("a spend log entry: {e}")))?;
            }
            // What each key and its descendants spent today, from the logs.
            let since_ms = today() * 86_400_000;
            let mut today_query = conn.prepare("SELECT key_hash, entry FROM spend_log WHERE time_ms >= ?1").map_err(fail)?;
            let rows = today_query.query_map(params![since_ms as i64], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(fail)?;
            for row in rows {
                let (hash, entry) = row.map_err(fail)?;
                let entry: SpendEntry = serde_json::from_str(&entry).map_err(|e| corrupt(&format!("a spend log entry: {e}")))?;
                for h in chain_of(accounts, &hash) {
                    if let Some(a) = accounts.get_mut(&h) {
                        a.day_spent += entry.amount.micros();
                    }
                }
            }
        }
        self.ledger = Some(Mutex::new(conn));
        Ok(self)
    }

    /// Sets the key that signs spend logs (the gateway's).
    pub fn set_signer(&self, key: NodeKey) {
        let _ = self.signer.set(key);
    }

    fn accounts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Account>> {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn db(&self, write: impl FnOnce(&Connection) -> rusqlite::Result<()>) {
        if let Some(ledger) = &self.ledger
            && let Err(e) = write(&ledger.lock().unwrap_or_else(|e| e.into_inner()))
        {
            tracing::warn!(error = %e, "cannot write to the keys' store");
        }
    }

    /// Checks the `Authorization` header, that neither the key nor an
    /// ancestor is revoked or expired, and the key's rate; counts the
    /// request. (Budgets are checked when the request reserves.)
    pub fn admit(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::Unauthorized("missing API key: send `Authorization: Bearer KEY`".into()))?;
        let hash = key_hash(token);
        let mut accounts = self.accounts();
        check_standing(&accounts, &hash)?;
        let account = accounts.get_mut(&hash).expect("checked above");
        if let Some(budget) = account.spec.token_budget
            && account.spent >= budget
        {
            return Err(quota(format!("this key has spent its budget of {budget} tokens")));
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
        Ok(Caller { key: hash, name: account.name.clone() })
    }

    /// The caller whose key hashes to `hash` (a batch created by that
    /// key, resumed): refused like [`Self::admit`] when the key or an
    /// ancestor is gone, revoked or expired; no rate limit applies.
    pub fn caller_of(&self, hash: &str) -> Result<Caller, ApiError> {
        let accounts = self.accounts();
        check_standing(&accounts, hash)?;
        Ok(Caller { key: hash.to_string(), name: accounts[hash].name.clone() })
    }

    /// Whether `caller`'s spend log holds a charge for `session`.
    pub fn charged(&self, caller: &Caller, session: &str) -> Result<bool, ApiError> {
        Ok(self.spend_log(caller)?.entries.iter().any(|e| e.session == session))
    }

    /// Charges `tokens` to `caller` and its ancestors outside any request
    /// (a batch line whose charge a crash cut short), and logs it.
    pub fn charge_tokens(&self, caller: &Caller, session: &str, model: &str, tokens: u64) {
        let chain = chain_of(&self.accounts(), &caller.key);
        self.charge(&chain, tokens, 0);
        let charge = Charge { session: session.to_string(), model: model.to_string(), positions: tokens, tokens, amount: Credits::ZERO, balance_after: None };
        self.log_charge(caller, charge);
    }

    /// Whether `caller` and its ancestors may use the model named by any
    /// of `names` (its alias, its id); 403 `model_not_allowed` otherwise.
    pub fn check_model(&self, caller: &Caller, names: &[&str]) -> Result<(), ApiError> {
        let accounts = self.accounts();
        for h in chain_of(&accounts, &caller.key) {
            if let Some(models) = &accounts[&h].spec.models
                && !models.iter().any(|m| names.iter().any(|n| n == m))
            {
                return Err(ApiError::Forbidden {
                    message: format!("this key may use only {}", models.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")),
                    code: "model_not_allowed",
                });
            }
        }
        Ok(())
    }

    /// The lowest `max_price` of `caller` and its ancestors.
    pub fn max_price(&self, caller: &Caller) -> Option<Credits> {
        let accounts = self.accounts();
        chain_of(&accounts, &caller.key).iter().filter_map(|h| accounts[h].spec.max_price).min()
    }

    /// The account `caller` pays from in the books: its root's name, when
    /// the root is prepaid.
    pub fn payer(&self, caller: &Caller) -> Option<String> {
        let accounts = self.accounts();
        let root = chain_of(&accounts, &caller.key).pop()?;
        let root = &accounts[&root];
        root.spec.prepaid.then(|| root.name.clone())
    }

    /// Whether `caller`'s key pays in credits.
    pub fn prepaid(&self, caller: &Caller) -> bool {
        self.payer(caller).is_some()
    }

    /// Tokens `caller` may still reserve (`None`: no budget).
    pub fn available(&self, caller: &Caller) -> Option<u64> {
        let accounts = self.accounts();
        chain_of(&accounts, &caller.key)
            .iter()
            .filter_map(|h| {
                let a = &accounts[h];
                a.spec.token_budget.map(|b| b.saturating_sub(a.spent + a.reserved))
            })
            .min()
    }

    /// Holds `tokens` of `caller`'s budget (and every ancestor's) for one
    /// request, or refuses with 429 `insufficient_quota`.
    pub fn reserve(self: &Arc<Self>, caller: &Caller, tokens: u64) -> Result<Reservation, ApiError> {
        let mut accounts = self.accounts();
        let chain = chain_of(&accounts, &caller.key);
        if chain.is_empty() {
            return Err(ApiError::Unauthorized("invalid API key".into()));
        }
        for (i, h) in chain.iter().enumerate() {
            let a = &accounts[h];
            if let Some(budget) = a.spec.token_budget {
                let left = budget.saturating_sub(a.spent + a.reserved);
                if tokens > left {
                    let whose = if i == 0 { "this key".to_string() } else { format!("its parent key {:?}", a.name) };
                    return Err(quota(format!(
                        "this request may use up to {tokens} tokens and {whose} has {left} left of its budget of {budget} (lower max_tokens or n)"
                    )));
                }
            }
        }
        for h in &chain {
            if let Some(a) = accounts.get_mut(h) {
                a.reserved += tokens;
            }
        }
        Ok(Reservation { store: Arc::clone(self), caller: caller.clone(), chain, held: Mutex::new(tokens) })
    }

    /// Holds `amount` of `caller`'s credit limits (its own and every
    /// ancestor's, in all and today) for one request, or refuses with 429
    /// `insufficient_quota`.
    pub fn reserve_credits(self: &Arc<Self>, caller: &Caller, amount: Credits) -> Result<CreditReservation, ApiError> {
        let mut accounts = self.accounts();
        let chain = chain_of(&accounts, &caller.key);
        let micros = amount.micros();
        for (i, h) in chain.iter().enumerate() {
            let a = accounts.get_mut(h).expect("in the chain");
            let whose = if i == 0 { "this key".to_string() } else { format!("its parent key {:?}", a.name) };
            let busy = a.credits_reserved;
            if let Some(cap) = a.spec.credits {
                let left = cap.micros().saturating_sub(a.credits_spent + busy);
                if micros > left {
                    return Err(quota(format!(
                        "this request may cost up to {amount} credits and {whose} has {} left of its {cap}",
                        Credits::from_micros(left)
                    )));
                }
            }
            if let Some(daily) = a.spec.daily_limit {
                let left = daily.micros().saturating_sub(a.spent_today() + busy);
                if micros > left {
                    return Err(quota(format!(
                        "this request may cost up to {amount} credits and {whose} has {} left of its daily limit of {daily}",
                        Credits::from_micros(left)
                    )));
                }
            }
        }
        for h in &chain {
            if let Some(a) = accounts.get_mut(h) {
                a.credits_reserved += micros;
            }
        }
        Ok(CreditReservation { store: Arc::clone(self), chain, held: Mutex::new(micros) })
    }

    /// Adds `tokens` to what `chain` spent (and to the store, if any).
    fn charge(&self, chain: &[String], tokens: u64, micros: u64) {
        let mut rows = Vec::new();
        {
            let mut accounts = self.accounts();
            for h in chain {
                if let Some(a) = accounts.get_mut(h) {
                    a.spent += tokens;
                    a.credits_spent += micros;
                    a.spent_today();
                    a.day_spent += micros;
                    rows.push((h.clone(), a.name.clone()));
                }
            }
        }
        let (tokens, micros) = (i64::try_from(tokens).unwrap_or(i64::MAX), i64::try_from(micros).unwrap_or(i64::MAX));
        self.db(|db| {
            for (hash, name) in &rows {
                db.execute(
                    "INSERT INTO spending (key_hash, name, spent, credits_spent) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (key_hash) DO UPDATE SET spent = spent + excluded.spent, credits_spent = credits_spent + excluded.credits_spent, name = excluded.name",
                    params![hash, name, tokens, micros],
                )?;
            }
            Ok(())
        });
    }

    /// Appends a charge to `caller`'s spend log (signed by the gateway's
    /// key; nothing without one).
    pub fn log_charge(&self, caller: &Caller, mut charge: Charge) {
        let Some(signer) = self.signer.get() else { return };
        let mut accounts = self.accounts();
        let Some(account) = accounts.get_mut(&caller.key) else { return };
        if charge.balance_after.is_none()
            && let Some(cap) = account.spec.credits
        {
            charge.balance_after = Some(cap.saturating_sub(Credits::from_micros(account.credits_spent)));
        }
        let entry =
            SpendEntry::sign(signer, &account.name, account.tail.as_ref(), (now_secs() * 1000).max(account.tail.as_ref().map_or(0, |t| t.time_ms)), charge);
        account.tail = Some(entry.clone());
        drop(accounts);
        match &self.ledger {
            Some(_) => self.db(|db| {
                let json = serde_json::to_string(&entry).unwrap_or_default();
                db.execute(
                    "INSERT INTO spend_log (key_hash, seq, time_ms, entry) VALUES (?1, ?2, ?3, ?4)",
                    params![caller.key, entry.seq as i64, entry.time_ms as i64, json],
                )
                .map(drop)
            }),
            None => self.memory_logs.lock().unwrap_or_else(|e| e.into_inner()).entry(caller.key.clone()).or_default().push(entry),
        }
    }

    /// `caller`'s spend log with a freshly signed head.
    pub fn spend_log(&self, caller: &Caller) -> Result<SpendLog, ApiError> {
        let signer = self.signer.get().ok_or_else(|| ApiError::Internal("this gateway keeps no spend logs".into()))?;
        let entries: Vec<SpendEntry> = match &self.ledger {
            Some(ledger) => {
                let db = ledger.lock().unwrap_or_else(|e| e.into_inner());
                let read = || -> rusqlite::Result<Vec<String>> {
                    let mut query = db.prepare("SELECT entry FROM spend_log WHERE key_hash = ?1 ORDER BY seq")?;
                    query.query_map(params![caller.key], |r| r.get::<_, String>(0))?.collect()
                };
                let rows = read().map_err(|e| ApiError::Internal(format!("cannot read the spend log: {e}")))?;
                rows.iter().map(|j| serde_json::from_str(j)).collect::<Result<_, _>>().map_err(|e| ApiError::Internal(format!("a spend log entry: {e}")))?
            }
            None => self.memory_logs.lock().unwrap_or_else(|e| e.into_inner()).get(&caller.key).cloned().unwrap_or_default(),
        };
        let head = SpendHead::sign(signer, &caller.name, &entries);
        Ok(SpendLog { gateway: String::new(), entries, head })
    }

    /// Mints a child of `parent` with `spec`'s limits, each within the
    /// parent's (a limit left out is the parent's); returns the new key.
    pub fn mint(&self, parent: &Caller, mut spec: KeySpec) -> Result<(String, KeyStatus), ApiError> {
        let key = format!("sk-hp-{}", hotpot_core::hex(&rand::random::<[u8; 24]>()));
        let hash = key_hash(&key);
        let name = {
            let mut accounts = self.accounts();
            let p = accounts.get_mut(&parent.key).ok_or_else(|| ApiError::Unauthorized("invalid API key".into()))?;
            let name = spec.name.clone().unwrap_or_else(|| format!("{}.{}", p.name, &hash[..6]));
            if !valid_name(&name) {
                return Err(ApiError::bad_param("name", "a key's name is 1 to 64 characters without ':', '/', spaces or control characters"));
            }
            let ps = &p.spec;
            if let Some(cap) = ps.credits {
                let left = Credits::from_micros(cap.micros().saturating_sub(p.credits_spent + p.credits_reserved));
                match spec.credits {
                    Some(c) if c > left => return Err(exceeds(format!("credits {c} is more than the {left} this key has left"))),
                    None => spec.credits = Some(left),
                    _ => {}
                }
            }
            fn within<T: PartialOrd + Copy + std::fmt::Display>(what: &str, child: &mut Option<T>, parent: Option<T>) -> Result<(), ApiError> {
                match (*child, parent) {
                    (Some(c), Some(p)) if c > p => Err(exceeds(format!("{what} {c} is more than this key's {p}"))),
                    (None, Some(p)) => {
                        *child = Some(p);
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            within("daily_limit", &mut spec.daily_limit, ps.daily_limit)?;
            within("max_price", &mut spec.max_price, ps.max_price)?;
            within("expires_at", &mut spec.expires_at, ps.expires_at)?;
            within("requests_per_minute", &mut spec.requests_per_minute, ps.requests_per_minute)?;
            let tokens_left = ps.token_budget.map(|b| b.saturating_sub(p.spent + p.reserved));
            within("token_budget", &mut spec.token_budget, tokens_left)?;
            match (&spec.models, &ps.models) {
                (Some(child), Some(parent)) if !child.iter().all(|m| parent.contains(m)) => {
                    return Err(exceeds(format!("models {child:?} are not all among this key's {parent:?}")));
                }
                (None, Some(parent)) => spec.models = Some(parent.clone()),
                _ => {}
            }
            if spec.expires_at.is_some_and(|t| t <= now_secs()) {
                return Err(ApiError::bad_param("expires_at", "expires_at is in the past"));
            }
            // The root pays; a child is never prepaid itself.
            spec.prepaid = false;
            spec.key = String::new();
            spec.name = Some(name.clone());
            if accounts.values().any(|a| a.name == name) {
                return Err(ApiError::bad_param("name", format!("a key named {name:?} exists already")));
            }
            accounts.insert(hash.clone(), Account::new(spec.clone(), name.clone(), Some(parent.key.clone())));
            name
        };
        let json = serde_json::to_string(&spec).unwrap_or_default();
        self.db(|db| {
            db.execute(
                "INSERT INTO children (key_hash, parent_hash, name, spec, revoked, created_ms) VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                params![hash, parent.key, name, json, (now_secs() * 1000) as i64],
            )
            .map(drop)
        });
        let caller = Caller { key: hash, name };
        let status = self.status(&caller).ok_or_else(|| ApiError::Internal("the new key vanished".into()))?;
        Ok((key, status))
    }

    /// Revokes the key named `name` (and with it its descendants): `caller`
    /// must be that key or one of its ancestors.
    pub fn revoke(&self, caller: &Caller, name: &str) -> Result<(), ApiError> {
        let hash = {
            let mut accounts = self.accounts();
            let target = accounts.iter().find(|(_, a)| a.name == name).map(|(h, _)| h.clone());
            let allowed = target.as_ref().is_some_and(|t| chain_of(&accounts, t).contains(&caller.key));
            let (Some(target), true) = (target, allowed) else {
                return Err(ApiError::NotFound { message: format!("this key has no descendant named {name:?}"), code: "key_not_found" });
            };
            if let Some(a) = accounts.get_mut(&target) {
                a.revoked = true;
            }
            target
        };
        self.db(|db| db.execute("UPDATE children SET revoked = 1 WHERE key_hash = ?1", params![hash]).map(drop));
        if self.accounts().get(&hash).is_some_and(|a| a.parent.is_none()) {
            tracing::warn!(key = name, "a key of the keys file was revoked until the gateway restarts (remove it from the file to revoke it for good)");
        }
        Ok(())
    }

    /// The state of `caller`'s key.
    pub fn status(&self, caller: &Caller) -> Option<KeyStatus> {
        let mut accounts = self.accounts();
        let parent = accounts.get(&caller.key)?.parent.as_ref().and_then(|p| accounts.get(p)).map(|p| p.name.clone());
        let a = accounts.get_mut(&caller.key)?;
        let today = a.spent_today();
        let c = |m: u64| Credits::from_micros(m).to_string();
        let s = &a.spec;
        Some(KeyStatus {
            name: a.name.clone(),
            parent,
            token_budget: s.token_budget,
            spent: a.spent,
            reserved: a.reserved,
            remaining: s.token_budget.map(|b| b.saturating_sub(a.spent + a.reserved)),
            credits_spent: c(a.credits_spent),
            credits_reserved: c(a.credits_reserved),
            credits_remaining: s.credits.map(|cap| c(cap.micros().saturating_sub(a.credits_spent + a.credits_reserved))),
            spent_today: c(today),
            limits: Limits {
                credits: s.credits.map(|x| x.to_string()),
                daily_limit: s.daily_limit.map(|x| x.to_string()),
                models: s.models.clone(),
                max_price: s.max_price.map(|x| x.to_string()),
                expires_at: s.expires_at,
                requests_per_minute: s.requests_per_minute,
            },
            pays_from: None,
            credits: None,
            credits_held: None,
        })
    }

    /// `(name, spent)` for every key.
    pub fn spending(&self) -> Vec<(String, u64)> {
        let mut out: Vec<_> = self.accounts().values().map(|a| (a.name.clone(), a.spent)).collect();
        out.sort();
        out
    }
}

/// `hash` and its ancestors, nearest first (empty for an unknown key).
/// Refuses a key that is unknown, or that (or whose ancestor) is revoked
/// or expired.
fn check_standing(accounts: &HashMap<String, Account>, hash: &str) -> Result<(), ApiError> {
    if !accounts.contains_key(hash) {
        return Err(ApiError::Unauthorized("invalid API key".into()));
    }
    let now = now_secs();
    for (i, h) in chain_of(accounts, hash).iter().enumerate() {
        let a = &accounts[h];
        let whose = if i == 0 { "this API key".to_string() } else { format!("its parent key {:?}", a.name) };
        if a.revoked {
            return Err(ApiError::Unauthorized(format!("{whose} was revoked")));
        }
        if a.spec.expires_at.is_some_and(|t| t <= now) {
            return Err(ApiError::Unauthorized(format!("{whose} has expired")));
        }
    }
    Ok(())
}

fn chain_of(accounts: &HashMap<String, Account>, hash: &str) -> Vec<String> {
    let mut chain = Vec::new();
    let mut at = accounts.get(hash).map(|_| hash.to_string());
    while let Some(h) = at {
        if chain.contains(&h) {
            break;
        }
        at = accounts.get(&h).and_then(|a| a.parent.clone());
        chain.push(h);
    }
    chain
}

/// Tokens a request holds against a key's budget (and its ancestors').
/// Sessions settle what they used with [`Reservation::settle`]; whatever
/// is still held when the last session lets go of it is released.
#[derive(Debug)]
pub struct Reservation {
    store: Arc<KeyStore>,
    caller: Caller,
    chain: Vec<String>,
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
        {
            let mut accounts = self.store.accounts();
            for h in &self.chain {
                if let Some(a) = accounts.get_mut(h) {
                    a.reserved -= released.min(a.reserved);
                }
            }
        }
        self.store.charge(&self.chain, tokens, 0);
    }

    pub fn caller(&self) -> &Caller {
        &self.caller
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let held = *self.held.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut accounts = self.store.accounts();
        for h in &self.chain {
            if let Some(a) = accounts.get_mut(h) {
                a.reserved -= held.min(a.reserved);
            }
        }
    }
}

/// Credits a request holds against its key's credit limits (and its
/// ancestors'); released like [`Reservation`].
#[derive(Debug)]
pub struct CreditReservation {
    store: Arc<KeyStore>,
    chain: Vec<String>,
    held: Mutex<u64>,
}

impl CreditReservation {
    /// Charges `amount` to the key and its ancestors.
    pub fn settle(&self, amount: Credits) {
        let micros = amount.micros();
        let released = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let released = micros.min(*held);
            *held -= released;
            released
        };
        {
            let mut accounts = self.store.accounts();
            for h in &self.chain {
                if let Some(a) = accounts.get_mut(h) {
                    a.credits_reserved -= released.min(a.credits_reserved);
                }
            }
        }
        self.store.charge(&self.chain, 0, micros);
    }
}

impl Drop for CreditReservation {
    fn drop(&mut self) {
        let held = *self.held.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut accounts = self.store.accounts();
        for h in &self.chain {
            if let Some(a) = accounts.get_mut(h) {
                a.credits_reserved -= held.min(a.credits_reserved);
            }
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
    let add_credits = if (1..3).contains(&version) { "ALTER TABLE spending ADD COLUMN credits_spent INTEGER NOT NULL DEFAULT 0;" } else { "" };
    conn.execute_batch(&format!(
        "BEGIN;
         CREATE TABLE IF NOT EXISTS spending (key_hash TEXT PRIMARY KEY, name TEXT NOT NULL, spent INTEGER NOT NULL, credits_spent INTEGER NOT NULL DEFAULT 0);
         {add_credits}
         CREATE TABLE IF NOT EXISTS children (key_hash TEXT PRIMARY KEY, parent_hash TEXT NOT NULL, name TEXT NOT NULL UNIQUE, spec TEXT NOT NULL,
             revoked INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS spend_log (key_hash TEXT NOT NULL, seq INTEGER NOT NULL, time_ms INTEGER NOT NULL, entry TEXT NOT NULL,
             PRIMARY KEY (key_hash, seq));
         INSERT INTO meta (key, value) VALUES ('schema_version', 3) ON CONFLICT (key) DO UPDATE SET value = 3;
         COMMIT;"
    ))
    .map_err(fail)?;
    if (1..SCHEMA_VERSION).contains(&version) {
        tracing::info!(store = %path.display(), from = version, to = SCHEMA_VERSION, "migrated the spending store");
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
