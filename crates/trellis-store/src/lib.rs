//! The datastore every Trellis program shares: keyed byte values with revisions,
//! compare-and-swap transactions over several keys, and prefix watches that resume from a
//! revision and say when that revision was compacted away. Two backends behave the same:
//!
//! - [`sqlite::SqliteStore`] — one SQLite file in WAL mode, safe for several processes at once
//!   (the default, `/var/lib/trellis/trellis.db`); watches poll a change log.
//! - [`etcd::EtcdStore`] — etcd v3.
//!
//! [`open`] picks one from `sqlite:PATH` or `etcd:http://HOST:PORT[,HOST:PORT]`. This crate does
//! I/O; the types in [`types`] are plain data.

pub mod etcd;
pub mod sqlite;
pub mod types;

use std::sync::Arc;

pub use sqlite::Retention;
pub use types::{KeyValue, Listing, Precondition, TxnOp, TxnOutcome, WatchEvent, WatchEventKind};

/// Default datastore when none is given.
pub const DEFAULT_SPEC: &str = "sqlite:/var/lib/trellis/trellis.db";

/// Datastore failures. Messages name the backend endpoint or path involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid datastore {spec:?}: {reason} (expected sqlite:PATH or etcd:http://HOST:PORT[,HOST:PORT])")]
    InvalidSpec { spec: String, reason: String },
    #[error("datastore {endpoint} is unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("sqlite datastore {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("etcd datastore {endpoint}: {source}")]
    Etcd {
        endpoint: String,
        #[source]
        source: etcd_client::Error,
    },
    /// The datastore refuses a transaction this large (etcd's `--max-txn-ops`, 128 by default,
    /// or its request size limit): nothing of it was written.
    #[error("datastore {endpoint} refuses a transaction of {conditions} conditions and {writes} writes as too large: {reason}")]
    TxnTooLarge {
        endpoint: String,
        conditions: usize,
        writes: usize,
        reason: String,
    },
    #[error("revision {requested} has been compacted (oldest available: {compacted}); list again")]
    Compacted { requested: i64, compacted: i64 },
    #[error("datastore task failed: {0}")]
    Task(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A stream of watch events; ends with `Err(Compacted)` when the watcher fell behind.
pub struct Watch {
    rx: tokio::sync::mpsc::Receiver<Result<WatchEvent>>,
    progress: Option<std::sync::Arc<std::sync::atomic::AtomicI64>>,
}

impl Watch {
    /// A watch fed by `rx` (backends, and wrappers that filter or inject events).
    pub fn new(rx: tokio::sync::mpsc::Receiver<Result<WatchEvent>>) -> Watch {
        Watch { rx, progress: None }
    }

    /// A watch whose backend reports progress: it stores a revision into `progress` only
    /// after every matching event at or before it is in `rx`.
    pub fn with_progress(
        rx: tokio::sync::mpsc::Receiver<Result<WatchEvent>>,
        progress: std::sync::Arc<std::sync::atomic::AtomicI64>,
    ) -> Watch {
        Watch {
            rx,
            progress: Some(progress),
        }
    }

    /// A revision such that every matching event at or before it has been received or is
    /// waiting in this stream (read it, then drain with [`Watch::try_next`], and the events up
    /// to it are all in). `None` when the backend does not say; 0 until it first does. Lets a
    /// follower tell that it has seen the store as of a revision even when nothing it watches
    /// changed (heartbeats of other kinds move the store revision too).
    pub fn progress(&self) -> Option<i64> {
        self.progress
            .as_ref()
            .map(|p| p.load(std::sync::atomic::Ordering::Acquire))
    }

    /// The next event, or `None` when the store is closed.
    pub async fn next(&mut self) -> Option<Result<WatchEvent>> {
        self.rx.recv().await
    }

    /// An event already received, without waiting (to take a burst in one go).
    pub fn try_next(&mut self) -> Option<Result<WatchEvent>> {
        self.rx.try_recv().ok()
    }

    /// One stream from several: each is forwarded until it ends or the merged watch is
    /// dropped; the first error (or the end of any of them) ends the merged stream.
    pub fn merge(watches: Vec<Watch>) -> Watch {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
        for mut w in watches {
            let tx = tx.clone();
            let (stop_tx, mut stop) = (stop_tx.clone(), stop_tx.subscribe());
            tokio::spawn(async move {
                loop {
                    let ev = tokio::select! {
                        ev = w.next() => ev,
                        _ = tx.closed() => return,
                        _ = stop.recv() => return,
                    };
                    let ended = !matches!(ev, Some(Ok(_)));
                    let sent = match ev {
                        Some(ev) => tx.send(ev).await.is_ok(),
                        None => false,
                    };
                    if ended || !sent {
                        // Ends the others too: the merged stream closes once every sender is gone.
                        let _ = stop_tx.send(());
                        return;
                    }
                }
            });
        }
        Watch::new(rx)
    }
}

/// The datastore interface (see the crate docs).
#[async_trait::async_trait]
pub trait Datastore: Send + Sync {
    /// One key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Every key under `prefix`, in key order, with the store revision they were read at.
    async fn list(&self, prefix: &str) -> Result<Listing>;
    /// Applies `ops` atomically if every precondition holds; one new revision for all of them.
    async fn txn(&self, preconditions: Vec<Precondition>, ops: Vec<TxnOp>) -> Result<TxnOutcome>;
    /// Changes under `prefix` from revision `from` (inclusive) on.
    async fn watch(&self, prefix: &str, from: i64) -> Result<Watch>;
    /// Changes under any of `prefixes` from revision `from` on, in one stream (one watch for the
    /// several kinds a loop follows). Events of one prefix arrive in revision order; events of
    /// different prefixes may interleave out of order, so a broken stream is resumed by listing
    /// again, not from the last revision seen. The stream ends at the first error of any prefix.
    /// Backends override this to share one poll or one server stream; this default merges
    /// separate watches.
    async fn watch_prefixes(&self, prefixes: &[String], from: i64) -> Result<Watch> {
        let mut inner = Vec::new();
        for p in prefixes {
            inner.push(self.watch(p, from).await?);
        }
        Ok(Watch::merge(inner))
    }
    /// Forgets history before `revision`; watches from earlier revisions get `Compacted`.
    async fn compact(&self, revision: i64) -> Result<()>;
    /// The current store revision.
    async fn revision(&self) -> Result<i64>;
    /// A human-readable name (path or endpoints) for messages.
    fn describe(&self) -> String;
}

/// Opens the datastore named by `spec` (`sqlite:PATH` or `etcd:http://HOST:PORT[,...]`).
pub async fn open(spec: &str) -> Result<Arc<dyn Datastore>> {
    if let Some(path) = spec.strip_prefix("sqlite:") {
        if path.is_empty() {
            return Err(StoreError::InvalidSpec {
                spec: spec.into(),
                reason: "empty path".into(),
            });
        }
        return Ok(Arc::new(sqlite::SqliteStore::open(path).await?));
    }
    if let Some(endpoints) = spec.strip_prefix("etcd:") {
        let eps: Vec<String> = endpoints
            .split(',')
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect();
        if eps.is_empty() {
            return Err(StoreError::InvalidSpec {
                spec: spec.into(),
                reason: "no endpoints".into(),
            });
        }
        for e in &eps {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(StoreError::InvalidSpec {
                    spec: spec.into(),
                    reason: format!("endpoint {e:?} needs http:// or https://"),
                });
            }
        }
        return Ok(Arc::new(etcd::EtcdStore::connect(eps).await?));
    }
    Err(StoreError::InvalidSpec {
        spec: spec.into(),
        reason: "unknown backend".into(),
    })
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
pub fn prefix_end(prefix: &str) -> Option<Vec<u8>> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end("/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_end(""), None);
    }

    fn ev(key: &str, revision: i64) -> Result<WatchEvent> {
        Ok(WatchEvent {
            kind: WatchEventKind::Put,
            key: key.into(),
            value: Vec::new(),
            revision,
        })
    }

    /// The default `watch_prefixes` merges watches; the first error ends the merged stream.
    #[tokio::test]
    async fn merged_watches_forward_events_and_end_at_the_first_error() {
        let (a_tx, a_rx) = tokio::sync::mpsc::channel(8);
        let (b_tx, b_rx) = tokio::sync::mpsc::channel(8);
        let mut w = Watch::merge(vec![Watch::new(a_rx), Watch::new(b_rx)]);
        a_tx.send(ev("/a/1", 1)).await.unwrap();
        b_tx.send(ev("/b/1", 2)).await.unwrap();
        let mut keys = vec![
            w.next().await.unwrap().unwrap().key,
            w.next().await.unwrap().unwrap().key,
        ];
        keys.sort();
        assert_eq!(keys, ["/a/1", "/b/1"]);
        b_tx.send(Err(StoreError::Compacted {
            requested: 1,
            compacted: 5,
        }))
        .await
        .unwrap();
        assert!(matches!(
            w.next().await,
            Some(Err(StoreError::Compacted { .. }))
        ));
        // The other watch is dropped too, and the merged stream ends.
        assert!(w.next().await.is_none());
        a_tx.closed().await;
    }

    #[tokio::test]
    async fn bad_specs_are_named() {
        for spec in ["mysql:x", "sqlite:", "etcd:", "etcd:localhost:2379"] {
            let err = open(spec).await.err().expect("must fail");
            assert!(
                err.to_string().contains(spec.split(':').next().unwrap()),
                "{err}"
            );
        }
    }
}
