//! The follower against real stores: events reach the view, heartbeats wake nobody, and a
//! broken watch (compaction, an etcd restart) is re-established so later changes are seen.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use trellis_cluster::objects;
use trellis_resources::{parse_documents, Kind, Resource};
use trellis_store::{
    Datastore, KeyValue, Listing, Precondition, StoreError, TxnOp, TxnOutcome, Watch,
};
use trellis_testutil::{temp_dir, EtcdServer};

use super::*;

/// A store whose watches can be broken on demand with `Compacted`, as when a watcher falls
/// behind the retention.
struct Breakable {
    inner: Arc<dyn Datastore>,
    breaks: Arc<Notify>,
}

#[async_trait::async_trait]
impl Datastore for Breakable {
    async fn get(&self, key: &str) -> trellis_store::Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> trellis_store::Result<Listing> {
        self.inner.list(prefix).await
    }
    async fn txn(
        &self,
        pre: Vec<Precondition>,
        ops: Vec<TxnOp>,
    ) -> trellis_store::Result<TxnOutcome> {
        self.inner.txn(pre, ops).await
    }
    async fn watch(&self, prefix: &str, from: i64) -> trellis_store::Result<Watch> {
        self.watch_prefixes(&[prefix.to_string()], from).await
    }
    async fn watch_prefixes(&self, p: &[String], from: i64) -> trellis_store::Result<Watch> {
        let mut inner = self.inner.watch_prefixes(p, from).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let breaks = self.breaks.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = inner.next() => match ev {
                        Some(ev) => if tx.send(ev).await.is_err() { return },
                        None => return,
                    },
                    _ = breaks.notified() => {
                        let _ = tx.send(Err(StoreError::Compacted { requested: from, compacted: from + 1 })).await;
                        return;
                    }
                }
            }
        });
        Ok(Watch::new(rx))
    }
    async fn compact(&self, revision: i64) -> trellis_store::Result<()> {
        self.inner.compact(revision).await
    }
    async fn revision(&self) -> trellis_store::Result<i64> {
        self.inner.revision().await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn pool(name: &str, cidr: &str) -> Resource {
    parse_documents(&format!(
        "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  cidr: {cidr}\n"
    ))
    .unwrap()
    .remove(0)
}

/// Waits until `f` holds, polling the in-memory view (no datastore reads), or panics at the
/// deadline.
async fn until(what: &str, within: Duration, f: impl Fn() -> bool) -> Duration {
    let start = tokio::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

fn has_pool(shared: &SharedView, name: &str) -> bool {
    shared.read().pools().any(|p| p.metadata.name == name)
}

async fn sqlite() -> (Arc<dyn Datastore>, tempfile::TempDir) {
    let dir = temp_dir("view");
    let spec = format!("sqlite:{}", dir.path().join("v.db").display());
    (trellis_store::open(&spec).await.unwrap(), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_watch_is_relisted_and_later_changes_arrive() {
    let (store, _dir) = sqlite().await;
    let breaks = Arc::new(Notify::new());
    let store: Arc<dyn Datastore> = Arc::new(Breakable {
        inner: store,
        breaks: breaks.clone(),
    });
    objects::apply(&*store, &pool("a", "10.1.0.0/16"), false)
        .await
        .unwrap();
    let shared = SharedView::new();
    load(&*store, &shared).await.unwrap();
    assert!(has_pool(&shared, "a"));
    tokio::spawn(follow(store.clone(), shared.clone()));
    objects::apply(&*store, &pool("b", "10.2.0.0/16"), false)
        .await
        .unwrap();
    until("pool b", Duration::from_secs(5), || has_pool(&shared, "b")).await;
    // The watch falls behind a compaction: the follower lists again and watches from there.
    breaks.notify_one();
    until("the relist", Duration::from_secs(5), || {
        shared.lists.load(Ordering::Relaxed) >= 2
    })
    .await;
    objects::apply(&*store, &pool("c", "10.3.0.0/16"), false)
        .await
        .unwrap();
    until("pool c", Duration::from_secs(5), || has_pool(&shared, "c")).await;
    assert!(has_pool(&shared, "a") && has_pool(&shared, "b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_reach_the_view_but_wake_nobody() {
    let (store, _dir) = sqlite().await;
    let address = "192.0.2.5/24".parse().unwrap();
    let labels = Default::default();
    crate::register_node(&*store, "n1", address, &labels)
        .await
        .unwrap();
    let shared = SharedView::new();
    load(&*store, &shared).await.unwrap();
    tokio::spawn(follow(store.clone(), shared.clone()));
    let mut changes = shared.subscribe();
    changes.borrow_and_update();
    let generation = shared.read().generation(Kind::Node);
    let seen = shared.events.load(Ordering::Relaxed);
    // A heartbeat rewrites the Node with a new lastHeartbeat (and nothing else).
    let beat = |n: u64| {
        let store = store.clone();
        async move {
            crate::update_node(&*store, "n1", |node| {
                node.status = Some(trellis_resources::NodeStatus {
                    last_heartbeat: Some(n),
                })
            })
            .await
            .unwrap()
        }
    };
    beat(1).await;
    beat(2).await;
    until(
        "the heartbeats to reach the view",
        Duration::from_secs(5),
        || shared.events.load(Ordering::Relaxed) >= seen + 2,
    )
    .await;
    assert!(
        !changes.has_changed().unwrap(),
        "a heartbeat woke the loops"
    );
    assert_eq!(shared.read().generation(Kind::Node), generation);
    let node = shared.read().nodes().next().cloned().unwrap();
    assert_eq!(node.status.unwrap().last_heartbeat, Some(2));
    // A label change is visible.
    crate::update_node(&*store, "n1", |node| {
        node.metadata.labels.insert("rack".into(), "r1".into());
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("a visible change wakes the loops")
        .unwrap();
    assert_eq!(shared.read().generation(Kind::Node), generation + 1);
}

/// etcd goes away and comes back: the loops keep the last view meanwhile, and the watch is
/// re-established (list + watch) so a change made after the restart is seen in seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restart_is_survived() {
    let mut server = EtcdServer::start();
    let spec = format!("etcd:{}", server.endpoint);
    let mut store = None;
    for _ in 0..100 {
        if let Ok(s) = trellis_store::open(&spec).await {
            store = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let store = store.expect("etcd answers");
    objects::apply(&*store, &pool("a", "10.1.0.0/16"), false)
        .await
        .unwrap();
    let shared = SharedView::new();
    load(&*store, &shared).await.unwrap();
    tokio::spawn(follow(store.clone(), shared.clone()));
    // A change seen through the watch: it is established before etcd goes.
    objects::apply(&*store, &pool("a2", "10.4.0.0/16"), false)
        .await
        .unwrap();
    until("pool a2", Duration::from_secs(5), || {
        has_pool(&shared, "a2")
    })
    .await;
    assert_eq!(shared.lists.load(Ordering::Relaxed), 1);
    server.stop();
    until("the follower to notice", Duration::from_secs(10), || {
        shared.failures.load(Ordering::Relaxed) >= 1
    })
    .await;
    assert!(has_pool(&shared, "a"), "the last view is kept");
    server.restart();
    // The client reconnects by itself; writes may fail until it has.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while objects::apply(&*store, &pool("b", "10.2.0.0/16"), false)
        .await
        .is_err()
    {
        assert!(tokio::time::Instant::now() < deadline, "etcd is back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until("pool b after the restart", Duration::from_secs(15), || {
        has_pool(&shared, "b")
    })
    .await;
    assert!(shared.lists.load(Ordering::Relaxed) >= 2, "listed again");
    let written = tokio::time::Instant::now();
    objects::apply(&*store, &pool("c", "10.3.0.0/16"), false)
        .await
        .unwrap();
    let latency = until("pool c", Duration::from_secs(5), || has_pool(&shared, "c")).await;
    assert!(
        latency < Duration::from_secs(2),
        "a change after the restart took {:?} (written {:?} ago)",
        latency,
        written.elapsed()
    );
}

/// A listing of many records that do not decode (a hostile writer, or an older version's
/// records) is skipped in time linear in its size: each bad record's revision used to be
/// searched for in the whole listing, under the view's write lock and before the agent serves
/// its socket. The deadline only catches that (it is far above what the listing takes).
#[test]
fn a_listing_of_many_bad_records_is_not_quadratic() {
    const N: usize = 100_000;
    let (tx, rx) = std::sync::mpsc::channel();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (store, dir) = rt.block_on(sqlite());
    rt.block_on(async {
        let ops = (0..N)
            .map(|i| {
                TxnOp::Put(
                    format!("{}g{i}", Kind::BgpFilter.prefix()),
                    b"{not json".to_vec(),
                )
            })
            .collect();
        store.txn(vec![], ops).await.unwrap();
        objects::apply(&*store, &pool("a", "10.1.0.0/16"), false)
            .await
            .unwrap();
    });
    let shared = SharedView::new();
    let (s, st) = (shared.clone(), store.clone());
    std::thread::spawn(move || {
        let r = rt.block_on(load(&*st, &s));
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("listing 100 000 bad records did not finish")
        .unwrap();
    assert!(has_pool(&shared, "a"), "the good record is in the view");
    assert_eq!(shared.read().bgp_filters().count(), 0);
    drop(dir);
}

/// The view's revision reaches the store's even when only kinds it does not follow changed
/// (an IPAM handle here), on both stores: the policy applier reports it as synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_revision_follows_the_store_through_unwatched_writes() {
    let etcd = EtcdServer::start();
    let (sqlite, _dir) = sqlite().await;
    let etcd_store = trellis_store::open(&format!("etcd:{}", etcd.endpoint))
        .await
        .unwrap();
    for store in [sqlite, etcd_store] {
        let shared = SharedView::new();
        load(&*store, &shared).await.unwrap();
        let follower = tokio::spawn(follow(store.clone(), shared.clone()));
        for i in 0..3 {
            let put = TxnOp::Put(format!("/trellis/v1/ipamhandles/h{i}"), b"{}".to_vec());
            store.txn(vec![], vec![put]).await.unwrap();
            let want = store.revision().await.unwrap();
            until("the view's revision", Duration::from_secs(10), || {
                shared.revision() >= want
            })
            .await;
        }
        // A watched change is in the view once its revision is reached.
        objects::apply(&*store, &pool("r", "10.9.0.0/16"), false)
            .await
            .unwrap();
        let want = store.revision().await.unwrap();
        until("the pool's revision", Duration::from_secs(10), || {
            shared.revision() >= want
        })
        .await;
        assert!(
            has_pool(&shared, "r"),
            "revision {want} reached before its event was applied"
        );
        follower.abort();
    }
}
