//! The embedded datastore: one SQLite file in WAL mode shared by every process of a node or lab
//! (agents, CLI, plugin). Revisions are global: each committed transaction takes the next one and
//! appends its changes to a log table, which watches poll. Writers serialise on SQLite's write
//! lock (`BEGIN IMMEDIATE`, with a busy timeout). Does file I/O on blocking threads.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::types::{
    KeyValue, Listing, Precondition, TxnOp, TxnOutcome, WatchEvent, WatchEventKind,
};
use crate::{prefix_end, Datastore, Result, StoreError, Watch};

/// How often a watch looks for new log entries.
const POLL: Duration = Duration::from_millis(50);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
  key TEXT PRIMARY KEY NOT NULL,
  value BLOB NOT NULL,
  create_rev INTEGER NOT NULL,
  mod_rev INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS log (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  rev INTEGER NOT NULL,
  key TEXT NOT NULL,
  value BLOB,
  deleted INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS log_rev ON log(rev);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(name, value) VALUES ('revision', 0), ('compacted', 0);
";

/// The SQLite backend.
pub struct SqliteStore {
    path: String,
    conn: Arc<Mutex<Connection>>,
}

fn sql_err(path: &str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_string(),
        source,
    }
}

fn connect(path: &str) -> Result<Connection> {
    if let Some(dir) = Path::new(path).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Unreachable {
                endpoint: path.to_string(),
                reason: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
    }
    let conn = Connection::open(path).map_err(sql_err(path))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql_err(path))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql_err(path))?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql_err(path))?;
    conn.execute_batch(SCHEMA).map_err(sql_err(path))?;
    Ok(conn)
}

fn meta(tx: &Connection, name: &str) -> rusqlite::Result<i64> {
    tx.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
        r.get(0)
    })
}

fn range_clause(prefix: &str) -> (String, Vec<u8>) {
    match prefix_end(prefix) {
        Some(end) => ("key >= ?1 AND key < CAST(?2 AS TEXT)".into(), end),
        None => ("key >= ?1 AND ?2 IS NOT NULL".into(), Vec::new()),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub async fn open(path: &str) -> Result<SqliteStore> {
        let p = path.to_string();
        let conn = tokio::task::spawn_blocking(move || connect(&p))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(SqliteStore {
            path: path.to_string(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on a blocking thread.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c).map_err(|source| StoreError::Sqlite { path, source })
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn row_kv(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: r.get(0)?,
        value: r.get(1)?,
        create_revision: r.get(2)?,
        mod_revision: r.get(3)?,
    })
}

fn poll_log(
    conn: &Connection,
    prefix: &str,
    from: i64,
) -> rusqlite::Result<std::result::Result<Vec<WatchEvent>, i64>> {
    let compacted = meta(conn, "compacted")?;
    if from < compacted {
        return Ok(Err(compacted));
    }
    let (clause, end) = range_clause(prefix);
    let sql = format!(
        "SELECT rev, key, value, deleted FROM log WHERE rev >= ?3 AND {clause} ORDER BY id"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![prefix, end, from], |r| {
        let deleted: i64 = r.get(3)?;
        Ok(WatchEvent {
            kind: if deleted != 0 {
                WatchEventKind::Delete
            } else {
                WatchEventKind::Put
            },
            key: r.get(1)?,
            value: r.get::<_, Option<Vec<u8>>>(2)?.unwrap_or_default(),
            revision: r.get(0)?,
        })
    })?;
    Ok(Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?))
}

#[async_trait::async_trait]
impl Datastore for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_string();
        self.with(move |c| {
            c.query_row(
                "SELECT key, value, create_rev, mod_rev FROM kv WHERE key = ?1",
                [key],
                row_kv,
            )
            .optional()
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let prefix = prefix.to_string();
        self.with(move |c| {
            let tx = c.transaction()?;
            let revision = meta(&tx, "revision")?;
            let (clause, end) = range_clause(&prefix);
            let items = {
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT key, value, create_rev, mod_rev FROM kv WHERE {clause} ORDER BY key"
                ))?;
                let rows = stmt.query_map(params![prefix, end], row_kv)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
            };
            tx.commit()?;
            Ok(Listing { items, revision })
        })
        .await
    }

    async fn txn(&self, preconditions: Vec<Precondition>, ops: Vec<TxnOp>) -> Result<TxnOutcome> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for p in &preconditions {
                let key = match p {
                    Precondition::NoneNewer { prefix, revision } => {
                        let (clause, end) = range_clause(prefix);
                        let newer: bool = tx.query_row(
                            &format!("SELECT EXISTS(SELECT 1 FROM kv WHERE {clause} AND mod_rev > ?3)"),
                            params![prefix, end, revision],
                            |r| r.get(0),
                        )?;
                        if newer {
                            return Ok(TxnOutcome::Conflict);
                        }
                        continue;
                    }
                    Precondition::Absent(k)
                    | Precondition::ModRevision(k, _)
                    | Precondition::Exists(k) => k,
                };
                let have: Option<i64> = tx
                    .query_row("SELECT mod_rev FROM kv WHERE key = ?1", [key], |r| r.get(0))
                    .optional()?;
                let holds = match p {
                    Precondition::Absent(_) => have.is_none(),
                    Precondition::ModRevision(_, want) => have == Some(*want),
                    Precondition::Exists(_) => have.is_some(),
                    Precondition::NoneNewer { .. } => unreachable!("checked above"),
                };
                if !holds {
                    return Ok(TxnOutcome::Conflict);
                }
            }
            let current = meta(&tx, "revision")?;
            let revision = current + 1;
            let mut changed = false;
            for op in &ops {
                match op {
                    TxnOp::Put(k, v) => {
                        tx.execute(
                            "INSERT INTO kv(key, value, create_rev, mod_rev) VALUES (?1, ?2, ?3, ?3)
                             ON CONFLICT(key) DO UPDATE SET value = excluded.value, mod_rev = excluded.mod_rev",
                            params![k, v, revision],
                        )?;
                        changed = true;
                        tx.execute("INSERT INTO log(rev, key, value, deleted) VALUES (?1, ?2, ?3, 0)", params![revision, k, v])?;
                    }
                    TxnOp::Delete(k) => {
                        if tx.execute("DELETE FROM kv WHERE key = ?1", [k])? > 0 {
                            changed = true;
                            tx.execute("INSERT INTO log(rev, key, value, deleted) VALUES (?1, ?2, NULL, 1)", params![revision, k])?;
                        }
                    }
                }
            }
            if !changed {
                // Like etcd: a transaction that changes nothing takes no revision.
                return Ok(TxnOutcome::Committed { revision: current });
            }
            tx.execute("UPDATE meta SET value = ?1 WHERE name = 'revision'", [revision])?;
            tx.commit()?;
            Ok(TxnOutcome::Committed { revision })
        })
        .await
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<Watch> {
        // A connection of its own, so polling never waits behind this handle's writers.
        let path = self.path.clone();
        let conn = {
            let p = path.clone();
            tokio::task::spawn_blocking(move || connect(&p))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))??
        };
        let conn = Arc::new(Mutex::new(conn));
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let mut next = from;
            loop {
                let (c, p) = (conn.clone(), prefix.clone());
                let polled = tokio::task::spawn_blocking(move || {
                    let c = c.lock().unwrap_or_else(|e| e.into_inner());
                    poll_log(&c, &p, next)
                })
                .await;
                let batch = match polled {
                    Ok(Ok(Ok(events))) => events,
                    Ok(Ok(Err(compacted))) => {
                        let _ = tx
                            .send(Err(StoreError::Compacted {
                                requested: next,
                                compacted,
                            }))
                            .await;
                        return;
                    }
                    Ok(Err(source)) => {
                        let _ = tx
                            .send(Err(StoreError::Sqlite {
                                path: path.clone(),
                                source,
                            }))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(StoreError::Task(e.to_string()))).await;
                        return;
                    }
                };
                for ev in batch {
                    next = ev.revision + 1;
                    if tx.send(Ok(ev)).await.is_err() {
                        return; // the watcher went away
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(POLL).await;
            }
        });
        Ok(Watch::new(rx))
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM log WHERE rev < ?1", [revision])?;
            tx.execute(
                "UPDATE meta SET value = MAX(value, ?1) WHERE name = 'compacted'",
                [revision],
            )?;
            tx.commit()
        })
        .await
    }

    async fn revision(&self) -> Result<i64> {
        self.with(|c| meta(c, "revision")).await
    }

    fn describe(&self) -> String {
        format!("sqlite:{}", self.path)
    }
}
