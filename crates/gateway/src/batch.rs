//! OpenAI's Batch API: a file of requests (one JSON line each) answered in
//! the background, at batch priority on the nodes, into an output file and
//! an error file.
//!
//! Everything lives in `$HOTPOT_HOME/batches.sqlite` (schema version in
//! `meta`): each batch's row and each of its lines, with the line's answer
//! once it has one. A line is charged only after its answer is on disk
//! (the request's [`Commit`]); the line is marked charged after that. So a
//! gateway killed at any point resumes on restart with nothing lost and
//! nothing run or charged twice: lines without an answer run again (their
//! earlier run was never charged), lines with an answer are never run
//! again, and a line whose charge a crash may have cut short is looked up
//! in its key's spend log and charged only when it is not there.
//!
//! Statuses as OpenAI's: `validating` → `in_progress` → `finalizing` →
//! `completed`, or `failed` (the file cannot be read as a batch), `expired`
//! (not done within the 24 h window: what did not run goes to the error
//! file as `batch_expired`), `cancelling` → `cancelled` (lines already
//! running finish; the files hold what was answered).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, oneshot, watch};

use crate::error::ApiError;
use crate::files::FileStore;
use crate::service::{Commit, Gateway};

/// The schema this version writes and reads.
pub const BATCH_SCHEMA_VERSION: i64 = 1;
/// Most requests in one batch (OpenAI's limit).
pub const MAX_LINES: usize = 50_000;
/// The one completion window OpenAI offers.
pub const WINDOW: Duration = Duration::from_secs(24 * 3600);
/// The endpoints a batch may call.
pub const ENDPOINTS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];
/// How often a line the swarm cannot take now (503, 429 busy) is retried
/// before it fails, and the wait between tries.
const RETRIES: u32 = 30;
const RETRY_WAIT: Duration = Duration::from_secs(2);

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A batch's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::Validating, Self::InProgress, Self::Finalizing, Self::Completed, Self::Failed, Self::Expired, Self::Cancelling, Self::Cancelled]
            .into_iter()
            .find(|s| s.as_str() == text)
    }

    /// The column that records when the batch reached this status.
    fn time_column(self) -> &'static str {
        match self {
            Self::Validating => "created_at",
            Self::InProgress => "in_progress_at",
            Self::Finalizing => "finalizing_at",
            Self::Completed => "completed_at",
            Self::Failed => "failed_at",
            Self::Expired => "expired_at",
            Self::Cancelling => "cancelling_at",
            Self::Cancelled => "cancelled_at",
        }
    }

    fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Expired | Self::Cancelled)
    }
}

/// `request_counts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// What the API says about a batch.
#[derive(Debug, Clone, Serialize)]
pub struct BatchObject {
    pub id: String,
    pub object: &'static str,
    pub endpoint: String,
    pub errors: Option<Value>,
    pub input_file_id: String,
    pub completion_window: &'static str,
    pub status: &'static str,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub expires_at: u64,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<Value>,
}

/// `POST /v1/batches`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, Value>>,
}

/// One line of an input file, as validation leaves it.
#[derive(Debug, Clone, PartialEq)]
struct Line {
    custom_id: Option<String>,
    /// The request's body, or the line's error (code, message).
    request: Result<Value, (&'static str, String)>,
}

/// Reads an input file's lines (blank lines skipped): each must be
/// `{"custom_id", "method": "POST", "url": endpoint, "body": {…}}` with
/// a `custom_id` unique in the file. A line that is not gets its error
/// (with its `custom_id` where one can be read) and the others still run.
/// The whole file fails only when it holds no line, or too many.
fn parse_lines(bytes: &[u8], endpoint: &str) -> Result<Vec<Line>, (&'static str, String)> {
    let text = std::str::from_utf8(bytes).map_err(|e| ("invalid_file", format!("the input file is not UTF-8 text: {e}")))?;
    let mut seen = HashSet::new();
    let mut lines = Vec::new();
    for raw in text.lines().filter(|l| !l.trim().is_empty()) {
        if lines.len() == MAX_LINES {
            return Err(("too_many_requests", format!("a batch may hold at most {MAX_LINES} requests")));
        }
        lines.push(parse_line(raw, endpoint, &mut seen));
    }
    if lines.is_empty() {
        return Err(("empty_file", "the input file holds no requests".into()));
    }
    Ok(lines)
}

fn parse_line(raw: &str, endpoint: &str, seen: &mut HashSet<String>) -> Line {
    let value: Value = match serde_json::from_str(raw) {
        Ok(v) => v,
        Err(e) => return Line { custom_id: loose_custom_id(raw), request: Err(("invalid_json_line", format!("this line is not valid JSON: {e}"))) },
    };
    let custom_id = value.get("custom_id").and_then(Value::as_str).map(str::to_string);
    let fail = |code, message: String| Line { custom_id: custom_id.clone(), request: Err((code, message)) };
    let Some(id) = &custom_id else {
        return fail("missing_custom_id", "every line needs a string `custom_id`".into());
    };
    if id.is_empty() || id.len() > 512 {
        return fail("invalid_custom_id", "`custom_id` must be 1 to 512 characters".into());
    }
    if !seen.insert(id.clone()) {
        return fail("duplicate_custom_id", format!("`custom_id` {id:?} appears more than once in the file"));
    }
    if value.get("method").and_then(Value::as_str) != Some("POST") {
        return fail("invalid_method", "`method` must be \"POST\"".into());
    }
    let url = value.get("url").and_then(Value::as_str).unwrap_or_default();
    if url != endpoint {
        return fail("invalid_url", format!("`url` {url:?} is not this batch's endpoint {endpoint}"));
    }
    match value.get("body") {
        Some(body @ Value::Object(_)) => Line { custom_id, request: Ok(body.clone()) },
        _ => fail("invalid_body", "`body` must be a JSON object".into()),
    }
}

/// A `custom_id` read out of a line that is not valid JSON.
fn loose_custom_id(raw: &str) -> Option<String> {
    let at = raw.find("\"custom_id\"")? + "\"custom_id\"".len();
    let rest = raw[at..].trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(rest[..end].to_string())
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "the batch store failed");
    ApiError::Internal("the batch store is unavailable".into())
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound { message: format!("no batch with id `{id}`"), code: "batch_not_found" }
}

/// A line's answer or error as it goes into the output or error file.
fn output_line(batch: &str, idx: i64, custom_id: Option<&str>, response: Option<Value>, error: Option<Value>) -> Value {
    json!({"id": format!("batch_req_{}_{idx}", batch.trim_start_matches("batch_")), "custom_id": custom_id, "response": response, "error": error})
}

/// The batches and their lines.
pub struct BatchStore {
    db: Mutex<Connection>,
    /// Told when a batch is created or cancelled.
    wake: Notify,
    /// Most lines (of all batches) running at once.
    pub parallel: usize,
}

/// A batch's row, as the runner reads it.
struct Row {
    owner: String,
    endpoint: String,
    input_file_id: String,
    status: Status,
    expires_at: u64,
}

impl BatchStore {
    /// The store at `path` (created when missing).
    pub fn open(path: &Path, parallel: usize) -> Result<Self, String> {
        let db = crate::files::open_versioned(
            path,
            "a batch store",
            "CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, owner TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
                 status TEXT NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, in_progress_at INTEGER, finalizing_at INTEGER,
                 completed_at INTEGER, failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
                 output_file_id TEXT, error_file_id TEXT, errors TEXT, metadata TEXT);
             CREATE TABLE IF NOT EXISTS lines (batch_id TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT, request TEXT,
                 state TEXT NOT NULL, output TEXT, tokens INTEGER NOT NULL DEFAULT 0, charged INTEGER NOT NULL DEFAULT 0,
                 PRIMARY KEY (batch_id, idx));",
            BATCH_SCHEMA_VERSION,
        )?;
        Ok(Self { db: Mutex::new(db), wake: Notify::new(), parallel: parallel.max(1) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new batch of `owner`'s, `validating`.
    pub fn create(&self, owner: &str, spec: &CreateBatch) -> Result<BatchObject, ApiError> {
        if !ENDPOINTS.contains(&spec.endpoint.as_str()) {
            return Err(ApiError::bad_param("endpoint", format!("endpoint must be one of {}", ENDPOINTS.join(", "))));
        }
        if spec.completion_window != "24h" {
            return Err(ApiError::bad_param("completion_window", "completion_window must be \"24h\""));
        }
        if let Some(m) = &spec.metadata
            && (m.len() > 16 || m.iter().any(|(k, v)| k.len() > 64 || v.as_str().is_none_or(|v| v.len() > 512)))
        {
            return Err(ApiError::bad_param("metadata", "metadata holds at most 16 string pairs (keys up to 64, values up to 512 characters)"));
        }
        let id = format!("batch_{}", hotpot_core::hex(&rand::random::<[u8; 12]>()));
        let now = now_secs();
        let metadata = spec.metadata.as_ref().map(|m| Value::Object(m.clone()).to_string());
        self.db()
            .execute(
                "INSERT INTO batches (id, owner, endpoint, input_file_id, status, created_at, expires_at, metadata) VALUES (?1, ?2, ?3, ?4, 'validating', ?5, ?6, ?7)",
                params![id, owner, spec.endpoint, spec.input_file_id, now as i64, (now + WINDOW.as_secs()) as i64, metadata],
            )
            .map_err(internal)?;
        self.wake.notify_one();
        self.get(owner, &id)
    }

    /// Batch `id` when `owner` owns it.
    pub fn get(&self, owner: &str, id: &str) -> Result<BatchObject, ApiError> {
        let db = self.db();
        let object = db
            .query_row(&format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1 AND owner = ?2"), params![id, owner], batch_row)
            .optional()
            .map_err(internal)?
            .ok_or_else(|| not_found(id))?;
        with_counts(&db, object)
    }

    /// `owner`'s batches, newest first, after `after` (an id), at most `limit`.
    pub fn list(&self, owner: &str, after: Option<&str>, limit: usize) -> Result<(Vec<BatchObject>, bool), ApiError> {
        let db = self.db();
        let mut query = db
            .prepare(&format!(
                "SELECT {BATCH_COLUMNS} FROM batches WHERE owner = ?1 AND (?2 IS NULL OR rowid < (SELECT rowid FROM batches WHERE id = ?2))
                 ORDER BY rowid DESC LIMIT ?3"
            ))
            .map_err(internal)?;
        let rows: Vec<BatchObject> =
            query.query_map(params![owner, after, (limit + 1) as i64], batch_row).map_err(internal)?.collect::<Result<_, _>>().map_err(internal)?;
        let more = rows.len() > limit;
        let batches = rows.into_iter().take(limit).map(|b| with_counts(&db, b)).collect::<Result<_, _>>()?;
        Ok((batches, more))
    }

    /// Asks batch `id` to stop: `cancelling` until its running lines finish.
    pub fn cancel(&self, owner: &str, id: &str) -> Result<BatchObject, ApiError> {
        let status = self.get(owner, id)?.status;
        if !matches!(status, "validating" | "in_progress") {
            return Err(ApiError::BadRequest {
                message: format!("a batch that is {status} cannot be cancelled"),
                param: None,
                code: Some("batch_not_cancellable"),
            });
        }
        self.db()
            .execute(
                "UPDATE batches SET status = 'cancelling', cancelling_at = ?2 WHERE id = ?1 AND status IN ('validating', 'in_progress')",
                params![id, now_secs() as i64],
            )
            .map_err(internal)?;
        self.wake.notify_one();
        self.get(owner, id)
    }

    fn row(&self, id: &str) -> rusqlite::Result<Row> {
        self.db().query_row("SELECT owner, endpoint, input_file_id, status, expires_at FROM batches WHERE id = ?1", params![id], |r| {
            Ok(Row {
                owner: r.get(0)?,
                endpoint: r.get(1)?,
                input_file_id: r.get(2)?,
                status: Status::parse(&r.get::<_, String>(3)?).unwrap_or(Status::Failed),
                expires_at: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
            })
        })
    }

    fn status(&self, id: &str) -> rusqlite::Result<Status> {
        self.row(id).map(|r| r.status)
    }

    /// Batches not yet in a final status.
    fn unfinished(&self) -> rusqlite::Result<Vec<String>> {
        let db = self.db();
        let mut query = db.prepare("SELECT id FROM batches WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling') ORDER BY rowid")?;
        query.query_map([], |r| r.get(0))?.collect()
    }

    /// Moves batch `id` from `from` to `to` (stamping the time); false when
    /// it was no longer `from`.
    fn advance(&self, id: &str, from: Status, to: Status) -> rusqlite::Result<bool> {
        let sql = format!("UPDATE batches SET status = ?3, {} = ?4 WHERE id = ?1 AND status = ?2", to.time_column());
        Ok(self.db().execute(&sql, params![id, from.as_str(), to.as_str(), now_secs() as i64])? > 0)
    }

    /// Validation's result: every line kept and the batch `in_progress`
    /// (one transaction), or the batch `failed` with its errors.
    fn validated(&self, id: &str, lines: Result<Vec<Line>, (&'static str, String)>) -> rusqlite::Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        match lines {
            Ok(lines) => {
                for (idx, line) in lines.iter().enumerate() {
                    let (request, state, output) = match &line.request {
                        Ok(body) => (Some(body.to_string()), "pending", None),
                        Err((code, message)) => {
                            let error = json!({"code": code, "message": message});
                            (None, "failed", Some(output_line(id, idx as i64, line.custom_id.as_deref(), None, Some(error)).to_string()))
                        }
                    };
                    tx.execute(
                        "INSERT OR IGNORE INTO lines (batch_id, idx, custom_id, request, state, output, charged) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![id, idx as i64, line.custom_id, request, state, output, i64::from(state == "failed")],
                    )?;
                }
                tx.execute(
                    "UPDATE batches SET status = 'in_progress', in_progress_at = ?2 WHERE id = ?1 AND status = 'validating'",
                    params![id, now_secs() as i64],
                )?;
            }
            Err((code, message)) => {
                let errors = json!({"object": "list", "data": [{"code": code, "message": message, "param": null, "line": null}]});
                tx.execute(
                    "UPDATE batches SET status = 'failed', failed_at = ?2, errors = ?3 WHERE id = ?1 AND status IN ('validating', 'cancelling')",
                    params![id, now_secs() as i64, errors.to_string()],
                )?;
            }
        }
        tx.commit()
    }

    /// Lines of batch `id` still to run (index, custom id, body).
    fn pending(&self, id: &str) -> rusqlite::Result<Vec<(i64, Option<String>, String)>> {
        let db = self.db();
        let mut query = db.prepare("SELECT idx, custom_id, request FROM lines WHERE batch_id = ?1 AND state = 'pending' ORDER BY idx")?;
        query.query_map(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, Option<String>>(2)?.unwrap_or_default())))?.collect()
    }

    /// Keeps a line's answer (once: a line answered already keeps its first).
    fn answered(&self, id: &str, idx: i64, ok: bool, output: &Value, tokens: u64) -> rusqlite::Result<()> {
        self.db().execute(
            "UPDATE lines SET state = ?3, output = ?4, tokens = ?5 WHERE batch_id = ?1 AND idx = ?2 AND state = 'pending'",
            params![id, idx, if ok { "ok" } else { "failed" }, output.to_string(), i64::try_from(tokens).unwrap_or(i64::MAX)],
        )?;
        Ok(())
    }

    fn mark_charged(&self, id: &str, idx: i64) -> rusqlite::Result<()> {
        self.db().execute("UPDATE lines SET charged = 1 WHERE batch_id = ?1 AND idx = ?2", params![id, idx])?;
        Ok(())
    }

    /// Answered lines whose charge is not confirmed (index, request id, tokens).
    fn uncharged(&self, id: &str) -> rusqlite::Result<Vec<(i64, String, u64)>> {
        let db = self.db();
        let mut query = db.prepare("SELECT idx, output, tokens FROM lines WHERE batch_id = ?1 AND state != 'pending' AND charged = 0")?;
        query
            .query_map(params![id], |r| {
                let output: Value = serde_json::from_str(&r.get::<_, Option<String>>(1)?.unwrap_or_default()).unwrap_or_default();
                let request = output["response"]["request_id"].as_str().unwrap_or_default().to_string();
                Ok((r.get(0)?, request, u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0)))
            })?
            .collect()
    }

    /// Lines still pending when the window closed fail as `batch_expired`.
    fn expire_pending(&self, id: &str) -> rusqlite::Result<()> {
        for (idx, custom_id, _) in self.pending(id)? {
            let error = json!({"code": "batch_expired", "message": "this request could not be executed before the completion window expired"});
            let output = output_line(id, idx, custom_id.as_deref(), None, Some(error));
            self.db().execute(
                "UPDATE lines SET state = 'failed', output = ?3, charged = 1 WHERE batch_id = ?1 AND idx = ?2 AND state = 'pending'",
                params![id, idx, output.to_string()],
            )?;
        }
        Ok(())
    }

    /// The answered lines' outputs in input order: (ok ones, failed ones).
    fn outputs(&self, id: &str) -> rusqlite::Result<(Vec<String>, Vec<String>)> {
        let db = self.db();
        let mut query = db.prepare("SELECT state, output FROM lines WHERE batch_id = ?1 AND state != 'pending' ORDER BY idx")?;
        let rows: Vec<(String, String)> = query.query_map(params![id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        let (ok, failed): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(state, _)| state == "ok");
        Ok((ok.into_iter().map(|r| r.1).collect(), failed.into_iter().map(|r| r.1).collect()))
    }

    /// The batch's final status with its files.
    fn close(&self, id: &str, from: Status, to: Status, output: Option<String>, errors: Option<String>) -> rusqlite::Result<()> {
        let sql = format!("UPDATE batches SET status = ?3, {} = ?4, output_file_id = ?5, error_file_id = ?6 WHERE id = ?1 AND status = ?2", to.time_column());
        self.db().execute(&sql, params![id, from.as_str(), to.as_str(), now_secs() as i64, output, errors])?;
        Ok(())
    }
}

const BATCH_COLUMNS: &str = "id, endpoint, errors, input_file_id, status, output_file_id, error_file_id, created_at, in_progress_at, expires_at,
    finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at, metadata";

fn batch_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BatchObject> {
    let time = |i: usize| -> rusqlite::Result<Option<u64>> { Ok(r.get::<_, Option<i64>>(i)?.and_then(|t| u64::try_from(t).ok())) };
    let json = |i: usize| -> rusqlite::Result<Option<Value>> { Ok(r.get::<_, Option<String>>(i)?.and_then(|t| serde_json::from_str(&t).ok())) };
    Ok(BatchObject {
        id: r.get(0)?,
        object: "batch",
        endpoint: r.get(1)?,
        errors: json(2)?,
        input_file_id: r.get(3)?,
        completion_window: "24h",
        status: Status::parse(&r.get::<_, String>(4)?).unwrap_or(Status::Failed).as_str(),
        output_file_id: r.get(5)?,
        error_file_id: r.get(6)?,
        created_at: time(7)?.unwrap_or(0),
        in_progress_at: time(8)?,
        expires_at: time(9)?.unwrap_or(0),
        finalizing_at: time(10)?,
        completed_at: time(11)?,
        failed_at: time(12)?,
        expired_at: time(13)?,
        cancelling_at: time(14)?,
        cancelled_at: time(15)?,
        request_counts: RequestCounts::default(),
        metadata: json(16)?,
    })
}

fn with_counts(db: &Connection, mut batch: BatchObject) -> Result<BatchObject, ApiError> {
    let (total, ok, failed): (i64, i64, i64) = db
        .query_row(
            "SELECT count(*), coalesce(sum(state = 'ok'), 0), coalesce(sum(state = 'failed'), 0) FROM lines WHERE batch_id = ?1",
            params![batch.id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(internal)?;
    batch.request_counts = RequestCounts { total: total as u64, completed: ok as u64, failed: failed as u64 };
    Ok(batch)
}

/// Runs every unfinished batch, at most `parallel` lines at a time in all;
/// started with the gateway (so batches left by a killed gateway resume).
pub(crate) async fn run(gateway: Arc<Gateway>, store: Arc<BatchStore>, files: Arc<FileStore>) {
    let slots = Arc::new(Semaphore::new(store.parallel));
    let mut running: HashSet<String> = HashSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        match store.unfinished() {
            Ok(ids) => {
                for id in ids {
                    if running.insert(id.clone()) {
                        let runner = Runner { gateway: Arc::clone(&gateway), store: Arc::clone(&store), files: Arc::clone(&files), slots: Arc::clone(&slots) };
                        tasks.spawn(async move {
                            if let Err(e) = runner.drive(&id).await {
                                tracing::error!(batch = %id, error = %e, "a batch stopped on a storage error; it resumes on the next start");
                            }
                            id
                        });
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the batch store"),
        }
        tokio::select! {
            () = store.wake.notified() => {}
            Some(done) = tasks.join_next() => {
                if let Ok(id) = done {
                    running.remove(&id);
                }
            }
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

struct Runner {
    gateway: Arc<Gateway>,
    store: Arc<BatchStore>,
    files: Arc<FileStore>,
    slots: Arc<Semaphore>,
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> rusqlite::Result<T> + Send + 'static) -> rusqlite::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))
}

impl Runner {
    /// Takes batch `id` from whatever status it is in to a final one.
    async fn drive(&self, id: &str) -> rusqlite::Result<()> {
        let mut reconciled = false;
        loop {
            let (store, key) = (Arc::clone(&self.store), id.to_string());
            let row = blocking(move || store.row(&key)).await?;
            match row.status {
                Status::Validating => self.validate(id, &row).await?,
                Status::InProgress => {
                    if !reconciled {
                        self.reconcile(id, &row).await?;
                        reconciled = true;
                    }
                    if now_secs() >= row.expires_at {
                        let (store, key) = (Arc::clone(&self.store), id.to_string());
                        blocking(move || store.expire_pending(&key)).await?;
                        self.finish(id, &row, Status::InProgress, Status::Expired).await?;
                    } else {
                        self.run_lines(id, &row).await?;
                        if now_secs() >= row.expires_at {
                            continue;
                        }
                        let (store, key) = (Arc::clone(&self.store), id.to_string());
                        if blocking(move || store.advance(&key, Status::InProgress, Status::Finalizing)).await? {
                            self.finish(id, &row, Status::Finalizing, Status::Completed).await?;
                        }
                    }
                }
                Status::Finalizing => self.finish(id, &row, Status::Finalizing, Status::Completed).await?,
                Status::Cancelling => {
                    if !reconciled {
                        self.reconcile(id, &row).await?;
                        reconciled = true;
                    }
                    self.finish(id, &row, Status::Cancelling, Status::Cancelled).await?;
                }
                _ => return Ok(()),
            }
        }
    }

    /// Reads the input file into lines.
    async fn validate(&self, id: &str, row: &Row) -> rusqlite::Result<()> {
        let (files, owner, file) = (Arc::clone(&self.files), row.owner.clone(), row.input_file_id.clone());
        let content = tokio::task::spawn_blocking(move || files.content(&owner, &file)).await;
        let (endpoint, file) = (row.endpoint.clone(), row.input_file_id.clone());
        let lines = match content {
            Ok(Ok(bytes)) => parse_lines(&bytes, &endpoint),
            _ => Err(("invalid_file", format!("the input file {file} cannot be read (was it deleted?)"))),
        };
        if let Ok(lines) = &lines {
            tracing::info!(batch = %id, requests = lines.len(), "batch validated");
        }
        let (store, key) = (Arc::clone(&self.store), id.to_string());
        blocking(move || store.validated(&key, lines)).await
    }

    /// Confirms the charge of every answered line not marked charged (a
    /// crash came between its answer and the mark): charged when its key's
    /// spend log has it, charged now when it does not.
    async fn reconcile(&self, id: &str, row: &Row) -> rusqlite::Result<()> {
        let (store, key) = (Arc::clone(&self.store), id.to_string());
        let open = blocking(move || store.uncharged(&key)).await?;
        for (idx, request, tokens) in open {
            if let (Some(keys), false) = (&self.gateway.config.keys, row.owner == OPEN_OWNER)
                && tokens > 0
                && let Ok(caller) = keys.caller_of(&row.owner)
            {
                let session = format!("{request}/0");
                if !keys.charged(&caller, &session).unwrap_or(true) {
                    tracing::warn!(batch = %id, line = idx, tokens, "charging a line whose charge a restart cut short");
                    keys.charge_tokens(&caller, &session, &self.gateway.model.name, tokens);
                }
            }
            let (store, key) = (Arc::clone(&self.store), id.to_string());
            blocking(move || store.mark_charged(&key, idx)).await?;
        }
        Ok(())
    }

    /// Runs the batch's pending lines until none is left or the batch is
    /// cancelled; waits for the lines it started.
    async fn run_lines(&self, id: &str, row: &Row) -> rusqlite::Result<()> {
        let (store, key) = (Arc::clone(&self.store), id.to_string());
        let pending = blocking(move || store.pending(&key)).await?;
        let mut lines = tokio::task::JoinSet::new();
        for (idx, custom_id, body) in pending {
            let Ok(permit) = Arc::clone(&self.slots).acquire_owned().await else { break };
            let (store, key) = (Arc::clone(&self.store), id.to_string());
            if blocking(move || store.status(&key)).await? != Status::InProgress || now_secs() >= row.expires_at {
                break;
            }
            let line = LineRun {
                gateway: Arc::clone(&self.gateway),
                store: Arc::clone(&self.store),
                batch: id.to_string(),
                owner: row.owner.clone(),
                endpoint: row.endpoint.clone(),
                idx,
                custom_id,
            };
            lines.spawn(async move {
                let result = line.run(&body).await;
                drop(permit);
                result
            });
            while let Some(done) = lines.try_join_next() {
                done.unwrap_or(Ok(()))?;
            }
        }
        while let Some(done) = lines.join_next().await {
            done.unwrap_or(Ok(()))?;
        }
        Ok(())
    }

    /// Writes the output and error files and moves the batch to `to`.
    async fn finish(&self, id: &str, row: &Row, from: Status, to: Status) -> rusqlite::Result<()> {
        let (store, key) = (Arc::clone(&self.store), id.to_string());
        let (ok, failed) = blocking(move || store.outputs(&key)).await?;
        let (files, owner, key) = (Arc::clone(&self.files), row.owner.clone(), id.to_string());
        let written = tokio::task::spawn_blocking(move || {
            let write = |lines: &[String], kind: &str| -> Result<Option<String>, ApiError> {
                if lines.is_empty() {
                    return Ok(None);
                }
                let mut text = lines.join("\n");
                text.push('\n');
                let file = files.put(format!("file-{key}-{kind}"), &owner, &format!("{key}_{kind}.jsonl"), "batch_output", text.as_bytes())?;
                Ok(Some(file.id))
            };
            Ok::<_, ApiError>((write(&ok, "output")?, write(&failed, "error")?))
        })
        .await;
        let (output, errors) = match written {
            Ok(Ok(ids)) => ids,
            _ => return Err(rusqlite::Error::InvalidQuery),
        };
        let (store, key) = (Arc::clone(&self.store), id.to_string());
        blocking(move || store.close(&key, from, to, output, errors)).await?;
        tracing::info!(batch = %id, status = to.as_str(), "batch finished");
        debug_assert!(to.is_final());
        Ok(())
    }
}

/// The owner of files and batches on a gateway without keys.
pub const OPEN_OWNER: &str = "open";

/// One line of a batch, run.
struct LineRun {
    gateway: Arc<Gateway>,
    store: Arc<BatchStore>,
    batch: String,
    owner: String,
    endpoint: String,
    idx: i64,
    custom_id: Option<String>,
}

impl LineRun {
    /// Runs the line (retrying while the swarm is busy or missing blocks),
    /// keeps its answer, then lets its sessions charge and marks it charged.
    async fn run(self, body: &str) -> rusqlite::Result<()> {
        let request_id = format!("{}-{}", self.batch, self.idx);
        let mut attempt = 0;
        let (status, answer, kept, charged) = loop {
            let (kept_tx, kept) = watch::channel(false);
            let (charged_tx, charged) = oneshot::channel();
            let (status, answer) = match self.call(body, &request_id, Commit { kept, charged: charged_tx }).await {
                Ok(done) => done,
                Err(e) => (e.status().as_u16(), e.body()),
            };
            attempt += 1;
            // Busy or not served right now: try again later (this attempt's
            // sessions, if any, close uncharged).
            let busy = status == 503 || (status == 429 && answer["error"]["code"] != "insufficient_quota");
            if busy && attempt < RETRIES {
                drop(kept_tx);
                tokio::time::sleep(RETRY_WAIT).await;
                continue;
            }
            break (status, answer, kept_tx, charged);
        };
        let tokens = answer["usage"]["total_tokens"].as_u64().unwrap_or(0);
        let response = json!({"status_code": status, "request_id": request_id, "body": answer});
        let output = output_line(&self.batch, self.idx, self.custom_id.as_deref(), Some(response), None);
        let (store, batch, idx) = (Arc::clone(&self.store), self.batch.clone(), self.idx);
        blocking(move || store.answered(&batch, idx, status == 200, &output, tokens)).await?;
        // The answer is on disk: the sessions may charge now.
        let _ = kept.send(true);
        let _ = charged.await;
        let (store, batch) = (Arc::clone(&self.store), self.batch.clone());
        blocking(move || store.mark_charged(&batch, idx)).await
    }

    /// The line's request through the same planning, driving and rendering
    /// as the HTTP routes, at batch priority: its status and JSON body.
    async fn call(&self, body: &str, request_id: &str, commit: Commit) -> Result<(u16, Value), ApiError> {
        let gateway = &self.gateway;
        let caller = match &gateway.config.keys {
            Some(keys) if self.owner != OPEN_OWNER => Some(keys.caller_of(&self.owner)?),
            _ => None,
        };
        let size = body.len();
        let response = if self.endpoint == ENDPOINTS[0] {
            let mut request: crate::openai::ChatRequest = serde_json::from_str(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))?;
            request.stream = false;
            let prepared = Arc::clone(gateway);
            let (plan, mut shape) = gateway.prep.run(size, move || crate::plan::chat(&prepared, caller, request)).await??;
            shape.id = format!("chatcmpl-{request_id}");
            let events = gateway.start(plan.batch_line(request_id, commit)).await?;
            crate::render::chat(Arc::clone(gateway), shape, events).await
        } else {
            let mut request: crate::openai::CompletionRequest = serde_json::from_str(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))?;
            request.stream = false;
            let prepared = Arc::clone(gateway);
            let (plan, mut shape) = gateway.prep.run(size, move || crate::plan::completions(&prepared, caller, request)).await??;
            shape.id = format!("cmpl-{request_id}");
            let events = gateway.start(plan.batch_line(request_id, commit)).await?;
            crate::render::completions(Arc::clone(gateway), shape, events).await
        };
        let response = response.unwrap_or_else(axum::response::IntoResponse::into_response);
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_fail_alone_and_the_file_fails_whole() {
        let file = [
            r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}}"#,
            r#"{"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {}}"#,
            r#"{"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "#,
            "",
            r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}"#,
            r#"{"method": "POST", "url": "/v1/chat/completions", "body": {}}"#,
            r#"{"custom_id": "d", "method": "GET", "url": "/v1/chat/completions", "body": {}}"#,
        ]
        .join("\n");
        let lines = parse_lines(file.as_bytes(), "/v1/chat/completions").expect("a batch");
        let got: Vec<(Option<&str>, Option<&str>)> = lines.iter().map(|l| (l.custom_id.as_deref(), l.request.as_ref().err().map(|e| e.0))).collect();
        assert_eq!(
            got,
            vec![
                (Some("a"), None),
                (Some("b"), Some("invalid_url")),
                (Some("c"), Some("invalid_json_line")),
                (Some("a"), Some("duplicate_custom_id")),
                (None, Some("missing_custom_id")),
                (Some("d"), Some("invalid_method")),
            ]
        );
        assert_eq!(parse_lines(b"\n\n", "/v1/completions").expect_err("empty").0, "empty_file");
        assert_eq!(parse_lines(&[0xff, 0xfe], "/v1/completions").expect_err("binary").0, "invalid_file");
    }

    #[test]
    fn batches_are_kept_per_owner_and_cancel_only_while_running() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = BatchStore::open(&dir.path().join("batches.sqlite"), 4).expect("opens");
        let spec = CreateBatch { input_file_id: "file-1".into(), endpoint: "/v1/completions".into(), completion_window: "24h".into(), metadata: None };
        let b = store.create("alice", &spec).expect("created");
        assert_eq!((b.status, b.expires_at - b.created_at), ("validating", WINDOW.as_secs()));
        assert!(matches!(store.get("bob", &b.id), Err(ApiError::NotFound { .. })));
        let bad = CreateBatch { endpoint: "/v1/embeddings".into(), ..spec };
        assert!(matches!(store.create("alice", &bad), Err(ApiError::BadRequest { .. })));
        let lines = parse_lines(br#"{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {}}"#, "/v1/completions");
        store.validated(&b.id, lines).expect("kept");
        let running = store.get("alice", &b.id).expect("found");
        assert_eq!((running.status, running.request_counts.total), ("in_progress", 1));
        assert_eq!(store.cancel("alice", &b.id).expect("cancels").status, "cancelling");
        assert!(store.cancel("alice", &b.id).is_err(), "a cancelling batch cannot be cancelled again");
        drop(store);
        let store = BatchStore::open(&dir.path().join("batches.sqlite"), 4).expect("reopens");
        assert_eq!(store.unfinished().expect("reads"), vec![b.id.clone()]);
        let (listed, more) = store.list("alice", None, 10).expect("lists");
        assert_eq!((listed.len(), more), (1, false));
    }
}
