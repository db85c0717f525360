//! The etcd v3 backend: the same semantics as the embedded store on a cluster's etcd
//! (revisions, compare-and-swap on `mod_revision`, prefix watches from a revision, compaction
//! reported to watchers). Does network I/O.
//!
//! History is compacted by etcd itself: run it with `--auto-compaction-mode=periodic
//! --auto-compaction-retention=5m` (or `revision` mode with a revision count), as Kubernetes
//! does. A watcher that falls behind gets [`StoreError::Compacted`], exactly as with the
//! embedded store's automatic compaction, and lists again.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, Txn, TxnOp as EOp,
    WatchClient, WatchOptions,
};

use crate::types::{
    KeyValue, Listing, Precondition, TxnOp, TxnOutcome, WatchEvent, WatchEventKind,
};
use crate::{Datastore, Result, StoreError, Watch};

/// Largest gRPC message the client accepts: a listing, or a watch response carrying a batch of
/// events, is one message. gRPC's default (4 MiB) is reached by a few thousand blocks, or by
/// three values of etcd's own 1.5 MiB request limit under one prefix: every listing of that kind
/// then failed, so an agent could never load its view (nor IPAM list blocks). Kubernetes gives
/// its etcd client `math.MaxInt32` for the same reason.
pub const MAX_MESSAGE_BYTES: usize = i32::MAX as usize;

/// HTTP/2 pings while a call is open (a watch), and how long an answer may take: a watch on a
/// connection whose server stopped answering (a host that died without closing it, a
/// partition, a frozen process) otherwise waits forever for its next event — the request
/// timeout does not cover a stream — and the agent's view silently stops changing. etcd refuses
/// pings more often than every 5 s (`--grpc-keepalive-min-time`), and pings with no call open at
/// all (it closes such a connection with `too_many_pings`), so idle connections do not ping.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The etcd backend.
pub struct EtcdStore {
    endpoints: Vec<String>,
    client: Client,
    kv: KvClient,
    watcher: WatchClient,
}

impl EtcdStore {
    /// Connects and checks that the cluster answers, so a wrong endpoint fails here, clearly.
    pub async fn connect(endpoints: Vec<String>) -> Result<EtcdStore> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(false);
        let joined = endpoints.join(",");
        let unreachable = |e: etcd_client::Error| StoreError::Unreachable {
            endpoint: joined.clone(),
            reason: e.to_string(),
        };
        let client = Client::connect(&endpoints, Some(opts))
            .await
            .map_err(unreachable)?;
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let watcher = client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        kv.get("/trellis/.probe", None).await.map_err(unreachable)?;
        Ok(EtcdStore {
            endpoints,
            client,
            kv,
            watcher,
        })
    }

    fn err(&self) -> impl Fn(etcd_client::Error) -> StoreError + '_ {
        move |source| StoreError::Etcd {
            endpoint: self.endpoints.join(","),
            source,
        }
    }
}

fn to_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    }
}

/// How often a watch asks etcd for a progress report ([`Watch::progress`]).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A progress report: no events, not a creation, cancellation or compaction notice.
fn is_progress(msg: &etcd_client::WatchResponse) -> bool {
    msg.events().is_empty() && !msg.created() && !msg.canceled() && msg.compact_revision() == 0
}

#[async_trait::async_trait]
impl Datastore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self.kv.clone().get(key, None).await.map_err(self.err())?;
        Ok(resp.kvs().first().map(to_kv))
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let opts = if prefix.is_empty() {
            GetOptions::new().with_all_keys()
        } else {
            GetOptions::new().with_prefix()
        };
        let resp = self
            .kv
            .clone()
            .get(prefix, Some(opts))
            .await
            .map_err(self.err())?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut items: Vec<KeyValue> = resp.kvs().iter().map(to_kv).collect();
        items.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Listing { items, revision })
    }

    async fn txn(&self, preconditions: Vec<Precondition>, ops: Vec<TxnOp>) -> Result<TxnOutcome> {
        let compares: Vec<Compare> = preconditions
            .into_iter()
            .map(|p| match p {
                Precondition::Absent(k) => Compare::version(k, CompareOp::Equal, 0),
                Precondition::ModRevision(k, r) => Compare::mod_revision(k, CompareOp::Equal, r),
                // Over a range, etcd requires the comparison of every key in it (and holds for
                // an empty range).
                Precondition::NoneNewer { prefix, revision } => {
                    Compare::mod_revision(prefix, CompareOp::Less, revision + 1).with_prefix()
                }
                Precondition::Exists(k) => Compare::version(k, CompareOp::Greater, 0),
            })
            .collect();
        let ops: Vec<EOp> = ops
            .into_iter()
            .map(|o| match o {
                TxnOp::Put(k, v) => EOp::put(k, v, None),
                TxnOp::Delete(k) => EOp::delete(k, None),
            })
            .collect();
        let (conditions, writes) = (compares.len(), ops.len());
        let resp = self
            .kv
            .clone()
            .txn(Txn::new().when(compares).and_then(ops))
            .await
            .map_err(|e| match &e {
                // etcd's ErrTooManyOps and ErrRequestTooLarge: a limit of the server, not a
                // failure — say so, with the transaction's size.
                etcd_client::Error::GRpcStatus(s)
                    if s.message().contains("too many operations in txn request")
                        || s.message().contains("request is too large") =>
                {
                    StoreError::TxnTooLarge {
                        endpoint: self.endpoints.join(","),
                        conditions,
                        writes,
                        reason: s.message().to_string(),
                    }
                }
                _ => self.err()(e),
            })?;
        if !resp.succeeded() {
            return Ok(TxnOutcome::Conflict);
        }
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok(TxnOutcome::Committed { revision })
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<Watch> {
        self.watch_prefixes(&[prefix.to_string()], from).await
    }

    /// One gRPC watch stream carrying one etcd watch per prefix (etcd groups their events by
    /// watch ID on the stream).
    async fn watch_prefixes(&self, prefixes: &[String], from: i64) -> Result<Watch> {
        let opts = |prefix: &str| {
            let opts = WatchOptions::new().with_start_revision(from.max(1));
            if prefix.is_empty() {
                opts.with_all_keys()
            } else {
                opts.with_prefix()
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let Some((first, rest)) = prefixes.split_first() else {
            return Ok(Watch::new(rx)); // nothing to watch: a stream that ends at once
        };
        let mut stream = self
            .watcher
            .clone()
            .watch(first.as_str(), Some(opts(first)))
            .await
            .map_err(self.err())?;
        for p in rest {
            stream
                .watch(p.as_str(), Some(opts(p)))
                .await
                .map_err(self.err())?;
        }
        let endpoint = self.endpoints.join(",");
        let progress = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
        let reached = progress.clone();
        tokio::spawn(async move {
            let mut ask = tokio::time::interval(PROGRESS_EVERY);
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = tx.closed() => return, // the watcher went away
                    _ = ask.tick() => {
                        // etcd answers once every watcher on the stream is synced (3.4+).
                        let _ = stream.request_progress().await;
                        continue;
                    }
                };
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(source) => {
                        let _ = tx
                            .send(Err(StoreError::Etcd {
                                endpoint: endpoint.clone(),
                                source,
                            }))
                            .await;
                        return;
                    }
                };
                if msg.compact_revision() > 0 {
                    let _ = tx
                        .send(Err(StoreError::Compacted {
                            requested: from,
                            compacted: msg.compact_revision(),
                        }))
                        .await;
                    return;
                }
                if is_progress(&msg) {
                    // Every event up to the header's revision was sent before this response.
                    let r = msg.header().map(|h| h.revision()).unwrap_or(0);
                    reached.fetch_max(r, std::sync::atomic::Ordering::Release);
                    continue;
                }
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let kind = match ev.event_type() {
                        etcd_client::EventType::Put => WatchEventKind::Put,
                        etcd_client::EventType::Delete => WatchEventKind::Delete,
                    };
                    let event = WatchEvent {
                        kind,
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        value: kv.value().to_vec(),
                        revision: kv.mod_revision(),
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                if msg.canceled() {
                    // One prefix's watch ended (etcd gave a reason); the stream as a whole is
                    // incomplete from here on, so end it and let the watcher list again.
                    tracing::warn!(reason = msg.cancel_reason(), "etcd cancelled a watch");
                    return;
                }
            }
        });
        Ok(Watch::with_progress(rx, progress))
    }

    async fn compact(&self, revision: i64) -> Result<()> {
        self.client
            .clone()
            .compact(revision, None)
            .await
            .map_err(self.err())?;
        Ok(())
    }

    async fn revision(&self) -> Result<i64> {
        let resp = self
            .kv
            .clone()
            .get("/trellis/.probe", None)
            .await
            .map_err(self.err())?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    fn describe(&self) -> String {
        format!("etcd:{}", self.endpoints.join(","))
    }
}
