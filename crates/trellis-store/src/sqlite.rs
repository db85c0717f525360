//! The embedded datastore: one SQLite file in WAL mode shared by every process of a node or lab
//! (agents, CLI, plugin). Revisions are global: each committed transaction takes the next one and
//! appends its changes to a log table, which watches poll. Writers serialise on SQLite's write
//! lock (`BEGIN IMMEDIATE`, with a busy timeout). Does file I/O on blocking threads.
//!
//! The log is compacted automatically, like etcd's `--auto-compaction-retention`: every
//! [`COMPACT_EVERY`]th revision, the writer that takes it drops the log entries older than its
//! [`Retention`] inside its own write transaction (so several processes sharing the file never
//! race, and the cost is proportional to what is dropped). Freed pages are reused by later writes
//! and the WAL is truncated after checkpoints (`journal_size_limit`), so the file stays flat.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, TransactionBehavior};

use crate::types::{
    KeyValue, Listing, Precondition, TxnOp, TxnOutcome, WatchEvent, WatchEventKind,
};
use crate::{prefix_end, Datastore, Result, StoreError, Watch};

/// How often a watch looks for new log entries, unless [`SqliteStore::with_poll`] says otherwise
/// (`cargo bench -p trellis --bench rest` measures the interval against latency and CPU).
pub const POLL: Duration = Duration::from_millis(50);

/// Most log entries one poll reads: a watcher far behind (a slow reader, or a watch from an
/// old revision) catches up in batches of this size rather than reading everything retained
/// (up to the retention's five minutes of a busy cluster) into memory at once. A revision is
/// never split across polls; one with more entries is read whole.
pub const POLL_BATCH: usize = 1024;

/// Writers check the retention every this many revisions.
pub const COMPACT_EVERY: i64 = 64;

/// Largest WAL file kept after a checkpoint (SQLite's `journal_size_limit`); without it the WAL
/// keeps the size of its biggest burst forever.
const WAL_LIMIT_BYTES: i64 = 4 << 20;

/// How much change history the store keeps for watchers that resume from a revision: the last
/// `revisions` revisions or everything younger than `age`, whichever retains more. A watcher
/// further behind gets [`StoreError::Compacted`] and lists again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub revisions: i64,
    pub age: Duration,
}

impl Default for Retention {
    /// 1000 revisions or 5 minutes (kube-apiserver compacts etcd every 5 minutes).
    fn default() -> Retention {
        Retention {
            revisions: 1000,
            age: Duration::from_secs(300),
        }
    }
}

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
  deleted INTEGER NOT NULL,
  ts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS log_rev ON log(rev);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(name, value) VALUES ('revision', 0), ('compacted', 0);
";

/// The SQLite backend.
pub struct SqliteStore {
    path: String,
    conn: Arc<Mutex<Connection>>,
    /// `None`: the log is only compacted by explicit [`Datastore::compact`] calls.
    retention: Option<Retention>,
    /// How often watches poll the change log.
    poll: Duration,
    /// Counts this handle's commits: its own watches poll at once instead of at the next tick,
    /// so what a process writes reaches its own watchers without the poll's delay (the agent's
    /// view sees the endpoint its allocator just wrote). Other processes' writes wait for the
    /// poll.
    commits: Arc<tokio::sync::watch::Sender<u64>>,
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
    let mut conn = Connection::open(path).map_err(sql_err(path))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql_err(path))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql_err(path))?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql_err(path))?;
    conn.pragma_update(None, "journal_size_limit", WAL_LIMIT_BYTES)
        .map_err(sql_err(path))?;
    conn.execute_batch(SCHEMA).map_err(sql_err(path))?;
    add_log_timestamps(&mut conn).map_err(sql_err(path))?;
    Ok(conn)
}

/// Files written before automatic compaction have no `log.ts`; their entries count as old. Under
/// the write lock, so two processes opening the file at once do not both add it.
fn add_log_timestamps(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let has: i64 = tx.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('log') WHERE name = 'ts'",
        [],
        |r| r.get(0),
    )?;
    if has == 0 {
        tx.execute_batch("ALTER TABLE log ADD COLUMN ts INTEGER NOT NULL DEFAULT 0")?;
    }
    tx.commit()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Drops log entries older than revision `cut` and records it as the compaction point.
fn compact_to(tx: &Connection, cut: i64) -> rusqlite::Result<()> {
    if cut > meta(tx, "compacted")? {
        tx.execute("DELETE FROM log WHERE rev < ?1", [cut])?;
        tx.execute(
            "UPDATE meta SET value = MAX(value, ?1) WHERE name = 'compacted'",
            [cut],
        )?;
    }
    Ok(())
}

/// Applies `retention` after `revision` was written: keeps the last `revisions` revisions or
/// those younger than `age`, whichever is more. The age scan walks the log from its oldest
/// entry and stops at the first young one, so it reads only what it drops.
fn auto_compact(
    tx: &Connection,
    revision: i64,
    now_ms: i64,
    retention: &Retention,
) -> rusqlite::Result<()> {
    let by_count = revision + 1 - retention.revisions.max(1);
    let horizon = now_ms.saturating_sub(retention.age.as_millis() as i64);
    let by_age: i64 = tx
        .query_row(
            "SELECT rev FROM log WHERE ts > ?1 ORDER BY id LIMIT 1",
            [horizon],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(revision + 1);
    compact_to(tx, by_count.min(by_age))
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
    /// Opens (creating if needed) the database at `path`, with the default [`Retention`].
    pub async fn open(path: &str) -> Result<SqliteStore> {
        SqliteStore::open_with(path, Some(Retention::default())).await
    }

    /// Opens the database with its own retention; `None` never compacts on its own (what every
    /// version before automatic compaction did).
    pub async fn open_with(path: &str, retention: Option<Retention>) -> Result<SqliteStore> {
        let p = path.to_string();
        let conn = tokio::task::spawn_blocking(move || connect(&p))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(SqliteStore {
            path: path.to_string(),
            conn: Arc::new(Mutex::new(conn)),
            retention,
            poll: POLL,
            commits: Arc::new(tokio::sync::watch::channel(0).0),
        })
    }

    /// The same store with watches that poll the change log every `poll` (default [`POLL`]).
    pub fn with_poll(self, poll: Duration) -> SqliteStore {
        SqliteStore { poll, ..self }
    }

    /// One transaction: preconditions checked and writes made under SQLite's write lock.
    async fn txn_inner(
        &self,
        preconditions: Vec<Precondition>,
        ops: Vec<TxnOp>,
    ) -> Result<TxnOutcome> {
        let retention = self.retention;
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
            let now = now_ms();
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
                        tx.execute("INSERT INTO log(rev, key, value, deleted, ts) VALUES (?1, ?2, ?3, 0, ?4)", params![revision, k, v, now])?;
                    }
                    TxnOp::Delete(k) => {
                        if tx.execute("DELETE FROM kv WHERE key = ?1", [k])? > 0 {
                            changed = true;
                            tx.execute("INSERT INTO log(rev, key, value, deleted, ts) VALUES (?1, ?2, NULL, 1, ?3)", params![revision, k, now])?;
                        }
                    }
                }
            }
            if !changed {
                // Like etcd: a transaction that changes nothing takes no revision.
                return Ok(TxnOutcome::Committed { revision: current });
            }
            tx.execute("UPDATE meta SET value = ?1 WHERE name = 'revision'", [revision])?;
            if let Some(r) = &retention {
                if revision % COMPACT_EVERY == 0 {
                    auto_compact(&tx, revision, now, r)?;
                }
            }
            tx.commit()?;
            Ok(TxnOutcome::Committed { revision })
        })
        .await
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

/// Until the next poll is due or this handle commits (whichever comes first).
async fn wait(poll: Duration, commits: &mut tokio::sync::watch::Receiver<u64>) {
    tokio::select! {
        _ = tokio::time::sleep(poll) => {}
        r = commits.changed() => {
            if r.is_err() {
                // The handle is gone: only the poll is left.
                tokio::time::sleep(poll).await;
            }
        }
    }
}

/// `PRAGMA data_version` of a watch's own connection, which changes whenever another connection
/// (of this or any process) commits; `None` if it cannot be read (then the watch just polls).
/// Runs on the caller's thread: in WAL mode it only looks at the shared-memory index.
fn data_version(conn: &Mutex<Connection>) -> Option<i64> {
    let c = conn.lock().unwrap_or_else(|e| e.into_inner());
    c.query_row("PRAGMA data_version", [], |r| r.get(0)).ok()
}

fn row_kv(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: r.get(0)?,
        value: r.get(1)?,
        create_revision: r.get(2)?,
        mod_revision: r.get(3)?,
    })
}

/// `(k1 OR k2 ...)`: keys under any of `prefixes`, with its parameters.
fn prefixes_clause(prefixes: &[String]) -> (String, Vec<Value>) {
    let mut parts = Vec::new();
    let mut values = Vec::new();
    for p in prefixes {
        values.push(Value::Text(p.clone()));
        let at = values.len();
        match prefix_end(p) {
            Some(end) => {
                values.push(Value::Blob(end));
                parts.push(format!(
                    "(key >= ?{at} AND key < CAST(?{} AS TEXT))",
                    at + 1
                ));
            }
            None => parts.push(format!("key >= ?{at}")),
        }
    }
    if parts.is_empty() {
        parts.push("0".into());
    }
    (format!("({})", parts.join(" OR ")), values)
}

/// What one look at the log found.
#[derive(Debug)]
enum Polled {
    /// Events under the prefixes from the revision asked for (at most a batch, whole revisions),
    /// and the revision to ask for next: past everything the store had when the batch was not
    /// full, whether it matched or not, so a quiet watcher neither rescans other keys' entries
    /// nor is reported compacted for history it never needed.
    Events(Vec<WatchEvent>, i64),
    /// The revision asked for is gone; the oldest kept.
    Compacted(i64),
}

/// Reads the log from revision `from` in one snapshot (a read transaction, so the store
/// revision and the entries agree).
fn poll_log(conn: &mut Connection, prefixes: &[String], from: i64) -> rusqlite::Result<Polled> {
    let tx = conn.transaction()?;
    let compacted = meta(&tx, "compacted")?;
    if from < compacted {
        return Ok(Polled::Compacted(compacted));
    }
    let current = meta(&tx, "revision")?;
    if current < from {
        return Ok(Polled::Events(Vec::new(), from));
    }
    let (clause, values) = prefixes_clause(prefixes);
    // One more than a batch tells whether the batch ends inside a revision.
    let mut events = read_log(&tx, &clause, &values, ">=", from, Some(POLL_BATCH + 1))?;
    let mut next = current + 1;
    if events.len() > POLL_BATCH {
        let cut = events[POLL_BATCH].revision;
        events.retain(|e| e.revision < cut);
        if events.is_empty() {
            // One revision with more entries than a batch: read it whole.
            events = read_log(&tx, &clause, &values, "=", cut, None)?;
            next = cut + 1;
        } else {
            next = cut;
        }
    }
    tx.commit()?;
    Ok(Polled::Events(events, next))
}

/// The log entries under `clause` whose revision compares (`op`: `>=` or `=`) with `rev`, in
/// order, at most `limit`.
fn read_log(
    tx: &Connection,
    clause: &str,
    values: &[Value],
    op: &str,
    rev: i64,
    limit: Option<usize>,
) -> rusqlite::Result<Vec<WatchEvent>> {
    let mut values = values.to_vec();
    values.push(Value::Integer(rev));
    let limit = limit.map_or(String::new(), |n| format!(" LIMIT {n}"));
    let sql = format!(
        "SELECT rev, key, value, deleted FROM log WHERE rev {op} ?{} AND {clause} ORDER BY id{limit}",
        values.len()
    );
    let events = {
        let mut stmt = tx.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(values), |r| {
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
        rows.collect::<rusqlite::Result<Vec<_>>>()?
    };
    Ok(events)
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
        let outcome = self.txn_inner(preconditions, ops).await?;
        if let TxnOutcome::Committed { .. } = outcome {
            self.commits.send_modify(|n| *n += 1);
        }
        Ok(outcome)
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<Watch> {
        self.watch_prefixes(&[prefix.to_string()], from).await
    }
    async fn watch_prefixes(&self, prefixes: &[String], from: i64) -> Result<Watch> {
        // A connection of its own, so polling never waits behind this handle's writers; one
        // poll covers every prefix.
        let path = self.path.clone();
        let conn = {
            let p = path.clone();
            tokio::task::spawn_blocking(move || connect(&p))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))??
        };
        let conn = Arc::new(Mutex::new(conn));
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let prefixes = prefixes.to_vec();
        let progress = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let reached = progress.clone();
        let poll = self.poll;
        let mut commits = self.commits.subscribe();
        tokio::spawn(async move {
            let mut next = from;
            // The file's data_version read before the last poll, when that poll found nothing
            // (and so had read everything): while the version stays, no connection committed,
            // and a poll would find nothing again. Checking costs one pragma on this thread; a
            // poll costs a read transaction on a blocking thread (most of an idle agent's CPU).
            let mut quiet_at: Option<i64> = None;
            loop {
                // Marked seen before the version is read: a commit after this line either shows
                // in the version or wakes the wait below (read the other way round, a commit
                // between the two would have its wake consumed and wait for the poll).
                commits.borrow_and_update();
                let version = data_version(&conn);
                if version.is_some() && version == quiet_at {
                    if tx.is_closed() {
                        return;
                    }
                    wait(poll, &mut commits).await;
                    continue;
                }
                let (c, p) = (conn.clone(), prefixes.clone());
                let polled = tokio::task::spawn_blocking(move || {
                    let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
                    poll_log(&mut c, &p, next)
                })
                .await;
                let batch = match polled {
                    Ok(Ok(Polled::Events(events, after))) => {
                        next = after;
                        events
                    }
                    Ok(Ok(Polled::Compacted(compacted))) => {
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
                quiet_at = if batch.is_empty() { version } else { None };
                for ev in batch {
                    if tx.send(Ok(ev)).await.is_err() {
                        return; // the watcher went away
                    }
                }
                // The poll read the log up to `next - 1` in one snapshot, and its events are
                // all in the channel now.
                reached.store(next - 1, std::sync::atomic::Ordering::Release);
                if tx.is_closed() {
                    return;
                }
                wait(poll, &mut commits).await;
            }
        });
        Ok(Watch::with_progress(rx, progress))
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            compact_to(&tx, revision)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Quiet polls are skipped while no connection commits (see `data_version`); a write from
    /// another connection — another handle, as another process would — or from the watching
    /// handle itself still arrives, each within a few polls.
    #[tokio::test]
    async fn writes_after_quiet_polls_are_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let path = path.to_str().unwrap();
        let poll = Duration::from_millis(10);
        let watching = SqliteStore::open(path).await.unwrap().with_poll(poll);
        let other = SqliteStore::open(path).await.unwrap();
        let mut w = watching.watch("/w/", 1).await.unwrap();
        for (n, store) in [&other, &watching, &other].into_iter().enumerate() {
            // Several quiet polls first.
            tokio::time::sleep(poll * 5).await;
            let op = TxnOp::Put(format!("/w/{n}"), b"x".to_vec());
            store.txn(vec![], vec![op]).await.unwrap();
            let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .unwrap_or_else(|_| panic!("write {n} never arrived"))
                .unwrap()
                .unwrap();
            assert_eq!(ev.key, format!("/w/{n}"));
        }
    }

    /// A write through the watching handle reaches its watch at once, not at the next poll
    /// (here an hour away); one from another handle waits for the poll.
    #[tokio::test]
    async fn own_writes_wake_the_watch_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let path = path.to_str().unwrap();
        let hour = Duration::from_secs(3600);
        let s = SqliteStore::open(path).await.unwrap().with_poll(hour);
        let mut w = s.watch("/o/", 1).await.unwrap();
        for n in 0..3 {
            let op = TxnOp::Put(format!("/o/{n}"), b"x".to_vec());
            s.txn(vec![], vec![op]).await.unwrap();
            let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
                .await
                .unwrap_or_else(|_| panic!("own write {n} did not wake the watch"))
                .unwrap()
                .unwrap();
            assert_eq!(ev.key, format!("/o/{n}"));
        }
        let other = SqliteStore::open(path).await.unwrap();
        let op = TxnOp::Put("/o/other".into(), b"x".to_vec());
        other.txn(vec![], vec![op]).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), w.next())
                .await
                .is_err(),
            "another handle's write waits for the poll"
        );
    }

    /// A watcher whose prefixes saw no change still moves past everything the store had, so it
    /// neither rescans other keys' entries on every poll nor falls behind a compaction.
    #[tokio::test]
    async fn a_quiet_poll_moves_past_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let path = path.to_str().unwrap();
        let s = SqliteStore::open_with(path, None).await.unwrap();
        for n in 0..5 {
            let op = TxnOp::Put(format!("/other/{n}"), b"x".to_vec());
            s.txn(vec![], vec![op]).await.unwrap();
        }
        let mut c = connect(path).unwrap();
        let quiet = ["/quiet/".to_string()];
        match poll_log(&mut c, &quiet, 1).unwrap() {
            Polled::Events(events, next) => {
                assert!(events.is_empty());
                assert_eq!(next, 6, "past the five revisions of other keys");
            }
            other => panic!("{other:?}"),
        }
        s.compact(6).await.unwrap();
        assert!(matches!(
            poll_log(&mut c, &quiet, 6).unwrap(),
            Polled::Events(_, 6)
        ));
        assert!(matches!(
            poll_log(&mut c, &quiet, 5).unwrap(),
            Polled::Compacted(6)
        ));
    }

    /// Automatic compaction runs in the writer's transaction every COMPACT_EVERY revisions.
    #[tokio::test]
    async fn writers_compact_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let path = path.to_str().unwrap();
        let retention = Retention {
            revisions: 3,
            age: Duration::ZERO,
        };
        let s = SqliteStore::open_with(path, Some(retention)).await.unwrap();
        for n in 0..COMPACT_EVERY {
            let op = TxnOp::Put("/k".into(), n.to_string().into_bytes());
            s.txn(vec![], vec![op]).await.unwrap();
        }
        let c = connect(path).unwrap();
        let rows: i64 = c
            .query_row("SELECT COUNT(*) FROM log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 3);
        assert_eq!(meta(&c, "compacted").unwrap(), COMPACT_EVERY - 2);
    }

    /// A watcher far behind reads the log in batches of at most POLL_BATCH entries, whole
    /// revisions each, and gets every event once, in order; a revision larger than a batch
    /// comes whole. It used to read everything retained in one go.
    #[tokio::test]
    async fn a_poll_reads_a_bounded_batch_of_whole_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let path = path.to_str().unwrap();
        let s = SqliteStore::open_with(path, None).await.unwrap();
        let put = |k: String| TxnOp::Put(k, b"x".to_vec());
        // Revisions 1..=1500 of one entry, one of 3 entries, one of 2000.
        let ops: Vec<Vec<TxnOp>> = (0..1500)
            .map(|n| vec![put(format!("/w/{n}"))])
            .chain([
                (0..3).map(|n| put(format!("/w/three/{n}"))).collect(),
                (0..2000).map(|n| put(format!("/w/big/{n}"))).collect(),
            ])
            .collect();
        for txn in ops {
            s.txn(vec![], txn).await.unwrap();
        }
        let mut c = connect(path).unwrap();
        let prefixes = ["/w/".to_string()];
        let (mut from, mut seen, mut polls) = (1, Vec::new(), 0);
        while from <= 1502 {
            let Polled::Events(events, next) = poll_log(&mut c, &prefixes, from).unwrap() else {
                panic!("compacted");
            };
            let whole = events.iter().all(|e| e.revision == 1502);
            assert!(
                events.len() <= POLL_BATCH || whole,
                "{} events",
                events.len()
            );
            assert!(next > from);
            seen.extend(events.into_iter().map(|e| e.revision));
            from = next;
            polls += 1;
            assert!(polls < 10);
        }
        let mut want: Vec<i64> = (1..=1500).collect();
        want.extend([1501; 3]);
        want.extend([1502; 2000]);
        assert_eq!(seen, want);
    }
}
