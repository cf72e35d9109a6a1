//! OpenAI's Files API, for batch input and output: each file's bytes in
//! its own file under `$HOTPOT_HOME/files/`, its record in `files.sqlite`
//! beside them (schema version in `meta`). A file belongs to the key that
//! uploaded it (or to everyone on a gateway without keys); another key
//! gets 404 for it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::error::ApiError;

/// The schema this version writes and reads.
pub const FILES_SCHEMA_VERSION: i64 = 1;

/// Largest file accepted (OpenAI's limit for batch input files).
pub const MAX_FILE_BYTES: usize = 200 << 20;

/// What the API says about a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
}

/// Files on disk and their records.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    db: Mutex<Connection>,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "the file store failed");
    ApiError::Internal("the file store is unavailable".into())
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound { message: format!("no file with id `{id}`"), code: "file_not_found" }
}

/// Opens (or creates) the SQLite store at `path` (`what` it is, for
/// errors): WAL with full syncs, a `meta` table holding the schema version
/// (`known` for a new store), then `tables`, all in one transaction;
/// refuses a store of a newer schema. The batch store opens the same way.
pub(crate) fn open_versioned(path: &Path, what: &str, tables: &str, known: i64) -> Result<Connection, String> {
    let db = Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    db.busy_timeout(Duration::from_secs(5)).map_err(|e| e.to_string())?;
    db.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         BEGIN;
         CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
         INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', {known});
         {tables}
         COMMIT;"
    ))
    .map_err(|e| format!("{} is not {what}: {e}", path.display()))?;
    let version: i64 = db.query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0)).map_err(|e| e.to_string())?;
    if version > known {
        return Err(format!("{} has schema version {version}; this gateway knows up to {known}", path.display()));
    }
    Ok(db)
}

impl FileStore {
    /// The store in `dir` (created when missing).
    pub fn open(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join("files.sqlite");
        let db = open_versioned(
            &path,
            "a file store",
            "CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, owner TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
                 bytes INTEGER NOT NULL, created_at INTEGER NOT NULL);",
            FILES_SCHEMA_VERSION,
        )?;
        Ok(Self { dir: dir.to_path_buf(), db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Keeps `bytes` as a new file of `owner`'s; written whole before it is
    /// listed.
    pub fn create(&self, owner: &str, filename: &str, purpose: &str, bytes: &[u8]) -> Result<FileObject, ApiError> {
        if purpose != "batch" {
            return Err(ApiError::bad_param("purpose", format!("purpose `{purpose}` is not supported (only `batch`)")));
        }
        if filename.is_empty() || filename.len() > 255 || filename.chars().any(char::is_control) {
            return Err(ApiError::bad_param("file", "the file needs a name of 1 to 255 characters"));
        }
        let id = format!("file-{}", hotpot_core::hex(&rand::random::<[u8; 12]>()));
        self.put(id, owner, filename, purpose, bytes)
    }

    /// Keeps `bytes` as file `id` of `owner`'s (a batch's output: the same
    /// id again replaces it, so finishing a batch twice leaves one file).
    pub fn put(&self, id: String, owner: &str, filename: &str, purpose: &str, bytes: &[u8]) -> Result<FileObject, ApiError> {
        hotpot_core::fsutil::write_atomic(&self.path(&id), bytes).map_err(internal)?;
        let created_at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.db()
            .execute(
                "INSERT OR REPLACE INTO files (id, owner, filename, purpose, bytes, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, owner, filename, purpose, bytes.len() as i64, created_at as i64],
            )
            .map_err(internal)?;
        Ok(FileObject { id, object: "file", bytes: bytes.len() as u64, created_at, filename: filename.to_string(), purpose: purpose.to_string() })
    }

    /// The record of `id` when `owner` owns it.
    pub fn get(&self, owner: &str, id: &str) -> Result<FileObject, ApiError> {
        self.db()
            .query_row("SELECT id, filename, purpose, bytes, created_at FROM files WHERE id = ?1 AND owner = ?2", params![id, owner], row)
            .optional()
            .map_err(internal)?
            .ok_or_else(|| not_found(id))
    }

    /// `owner`'s files, newest first.
    pub fn list(&self, owner: &str) -> Result<Vec<FileObject>, ApiError> {
        let db = self.db();
        let mut query =
            db.prepare("SELECT id, filename, purpose, bytes, created_at FROM files WHERE owner = ?1 ORDER BY created_at DESC, id").map_err(internal)?;
        let rows = query.query_map(params![owner], row).map_err(internal)?;
        rows.collect::<Result<_, _>>().map_err(internal)
    }

    /// The bytes of `id`.
    pub fn content(&self, owner: &str, id: &str) -> Result<Vec<u8>, ApiError> {
        self.get(owner, id)?;
        std::fs::read(self.path(id)).map_err(internal)
    }

    /// Deletes `id` (its record first: a crash leaves an unlisted file,
    /// never a listed one without bytes).
    pub fn delete(&self, owner: &str, id: &str) -> Result<(), ApiError> {
        let removed = self.db().execute("DELETE FROM files WHERE id = ?1 AND owner = ?2", params![id, owner]).map_err(internal)?;
        if removed == 0 {
            return Err(not_found(id));
        }
        let _ = std::fs::remove_file(self.path(id));
        Ok(())
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileObject> {
    Ok(FileObject {
        id: r.get(0)?,
        object: "file",
        filename: r.get(1)?,
        purpose: r.get(2)?,
        bytes: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
        created_at: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_kept_per_owner_and_deleted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = FileStore::open(dir.path()).expect("opens");
        let f = store.create("alice", "in.jsonl", "batch", b"{\"a\": 1}\n").expect("created");
        assert_eq!(f.bytes, 9);
        assert_eq!(store.get("alice", &f.id).expect("found"), f);
        assert!(matches!(store.get("bob", &f.id), Err(ApiError::NotFound { .. })), "another key does not see it");
        assert_eq!(store.content("alice", &f.id).expect("content"), b"{\"a\": 1}\n");
        assert!(matches!(store.create("alice", "x", "fine-tune", b""), Err(ApiError::BadRequest { .. })));
        drop(store);
        let store = FileStore::open(dir.path()).expect("reopens");
        assert_eq!(store.list("alice").expect("lists"), vec![f.clone()]);
        store.delete("alice", &f.id).expect("deleted");
        assert!(store.list("alice").expect("lists").is_empty());
        assert!(matches!(store.delete("alice", &f.id), Err(ApiError::NotFound { .. })));
    }
}
