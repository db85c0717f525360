//! One behaviour, two backends: every test here runs against the embedded SQLite store and
//! against a real etcd (Debian's etcd-server, started on a loopback port per test).

use std::sync::Arc;
use std::time::Duration;

use trellis_store::{Datastore, Precondition, StoreError, TxnOp, TxnOutcome, WatchEventKind};
use trellis_testutil::{temp_dir, EtcdServer};

/// Keeps whatever backs a store alive for the test's duration.
#[allow(dead_code)]
enum Backing {
    Sqlite(tempfile::TempDir),
    Etcd(EtcdServer),
}

async fn sqlite() -> (Arc<dyn Datastore>, Backing) {
    let dir = temp_dir("store");
    let spec = format!("sqlite:{}", dir.path().join("t.db").display());
    (
        trellis_store::open(&spec).await.unwrap(),
        Backing::Sqlite(dir),
    )
}

async fn etcd() -> (Arc<dyn Datastore>, Backing) {
    let server = EtcdServer::start();
    let spec = format!("etcd:{}", server.endpoint);
    let mut last = None;
    for _ in 0..100 {
        match trellis_store::open(&spec).await {
            Ok(s) => return (s, Backing::Etcd(server)),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd never answered: {last:?}");
}

fn put(k: &str, v: &str) -> TxnOp {
    TxnOp::Put(k.into(), v.as_bytes().to_vec())
}

async fn committed(s: &dyn Datastore, pre: Vec<Precondition>, ops: Vec<TxnOp>) -> i64 {
    match s.txn(pre, ops).await.unwrap() {
        TxnOutcome::Committed { revision } => revision,
        TxnOutcome::Conflict => panic!("unexpected conflict"),
    }
}

async fn crud_and_revisions(s: Arc<dyn Datastore>) {
    let r1 = committed(&*s, vec![], vec![put("/t/a", "1"), put("/t/b", "2")]).await;
    let r2 = committed(&*s, vec![], vec![put("/t/a", "3")]).await;
    assert!(r2 > r1);
    let a = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!(a.value, b"3");
    assert_eq!(a.create_revision, r1);
    assert_eq!(a.mod_revision, r2);
    committed(&*s, vec![], vec![put("/tx", "other prefix")]).await;
    let l = s.list("/t/").await.unwrap();
    assert_eq!(
        l.items.iter().map(|i| i.key.as_str()).collect::<Vec<_>>(),
        vec!["/t/a", "/t/b"]
    );
    assert!(l.revision >= r2);
    committed(&*s, vec![], vec![TxnOp::Delete("/t/b".into())]).await;
    assert!(s.get("/t/b").await.unwrap().is_none());
    assert_eq!(
        s.revision().await.unwrap(),
        s.list("/").await.unwrap().revision
    );
}

async fn compare_and_swap(s: Arc<dyn Datastore>) {
    let r = committed(
        &*s,
        vec![Precondition::Absent("/c/x".into())],
        vec![put("/c/x", "1")],
    )
    .await;
    assert_eq!(
        s.txn(
            vec![Precondition::Absent("/c/x".into())],
            vec![put("/c/x", "2")]
        )
        .await
        .unwrap(),
        TxnOutcome::Conflict
    );
    assert_eq!(
        s.txn(
            vec![Precondition::ModRevision("/c/x".into(), r - 1)],
            vec![put("/c/x", "2")]
        )
        .await
        .unwrap(),
        TxnOutcome::Conflict
    );
    // All or nothing across keys: one stale precondition and neither write happens.
    let out = s
        .txn(
            vec![
                Precondition::ModRevision("/c/x".into(), r),
                Precondition::Absent("/c/x".into()),
            ],
            vec![put("/c/x", "9"), put("/c/y", "9")],
        )
        .await
        .unwrap();
    assert_eq!(out, TxnOutcome::Conflict);
    assert_eq!(s.get("/c/x").await.unwrap().unwrap().value, b"1");
    assert!(s.get("/c/y").await.unwrap().is_none());
    committed(
        &*s,
        vec![Precondition::ModRevision("/c/x".into(), r)],
        vec![put("/c/x", "2")],
    )
    .await;
    // Exists: holds for any revision of a present key, fails for a missing one.
    committed(
        &*s,
        vec![Precondition::Exists("/c/x".into())],
        vec![put("/c/e", "1")],
    )
    .await;
    assert_eq!(
        s.txn(
            vec![Precondition::Exists("/c/missing".into())],
            vec![put("/c/e", "2")]
        )
        .await
        .unwrap(),
        TxnOutcome::Conflict
    );
    assert_eq!(s.get("/c/e").await.unwrap().unwrap().value, b"1");
}

/// `NoneNewer` fails once any key under the prefix is created or changed after the revision,
/// and holds for an empty prefix or keys outside it.
async fn none_newer_guards_a_listing(s: Arc<dyn Datastore>) {
    let guard = |revision| Precondition::NoneNewer {
        prefix: "/g/".into(),
        revision,
    };
    let empty = s.list("/g/").await.unwrap().revision;
    committed(&*s, vec![guard(empty)], vec![put("/g/a", "1")]).await;
    // A key created since the listing: conflict, nothing written.
    assert_eq!(
        s.txn(vec![guard(empty)], vec![put("/g/b", "1")])
            .await
            .unwrap(),
        TxnOutcome::Conflict
    );
    assert!(s.get("/g/b").await.unwrap().is_none());
    let listed = s.list("/g/").await.unwrap().revision;
    // Writes elsewhere (and to a sibling prefix sharing the text) do not matter.
    committed(
        &*s,
        vec![],
        vec![put("/other", "1"), put("/g", "1"), put("/gx/a", "1")],
    )
    .await;
    committed(&*s, vec![guard(listed)], vec![put("/g/b", "1")]).await;
    // A key changed since the listing: conflict.
    let listed = s.list("/g/").await.unwrap().revision;
    committed(&*s, vec![], vec![put("/g/a", "2")]).await;
    assert_eq!(
        s.txn(vec![guard(listed)], vec![put("/g/c", "1")])
            .await
            .unwrap(),
        TxnOutcome::Conflict
    );
}

/// Writers racing on one counter with read-modify-CAS loops lose no update.
async fn no_lost_updates(s: Arc<dyn Datastore>) {
    committed(&*s, vec![], vec![put("/n", "0")]).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                loop {
                    let kv = s.get("/n").await.unwrap().unwrap();
                    let n: u32 = String::from_utf8(kv.value).unwrap().parse().unwrap();
                    let out = s
                        .txn(
                            vec![Precondition::ModRevision("/n".into(), kv.mod_revision)],
                            vec![put("/n", &(n + 1).to_string())],
                        )
                        .await
                        .unwrap();
                    if out != TxnOutcome::Conflict {
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.get("/n").await.unwrap().unwrap().value, b"100");
}

async fn watch_resumes_and_reports_compaction(s: Arc<dyn Datastore>) {
    let start = s.revision().await.unwrap() + 1;
    committed(&*s, vec![], vec![put("/w/a", "1")]).await;
    committed(&*s, vec![], vec![put("/other", "x")]).await;
    let r3 = committed(&*s, vec![], vec![put("/w/b", "2")]).await;
    committed(&*s, vec![], vec![TxnOp::Delete("/w/a".into())]).await;
    let mut w = s.watch("/w/", start).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("watch event in time")
            .unwrap()
            .unwrap();
        seen.push((ev.kind, ev.key, ev.value));
    }
    assert_eq!(
        seen,
        vec![
            (WatchEventKind::Put, "/w/a".to_string(), b"1".to_vec()),
            (WatchEventKind::Put, "/w/b".to_string(), b"2".to_vec()),
            (WatchEventKind::Delete, "/w/a".to_string(), Vec::new()),
        ]
    );
    // Live events follow.
    committed(&*s, vec![], vec![put("/w/c", "3")]).await;
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.key, "/w/c");
    // Resuming from the middle replays only what came after.
    let mut w2 = s.watch("/w/", r3).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), w2.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((ev.key.as_str(), ev.revision), ("/w/b", r3));
    // After compaction, an old revision is reported, not silently skipped.
    let now = s.revision().await.unwrap();
    s.compact(now).await.unwrap();
    let mut w3 = s.watch("/w/", start).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), w3.next())
        .await
        .unwrap()
    {
        Some(Err(StoreError::Compacted { .. })) => {}
        other => panic!("expected Compacted, got {other:?}"),
    }
}

macro_rules! both {
    ($name:ident) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sqlite() {
                let (s, _b) = sqlite().await;
                super::$name(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_etcd() {
                let (s, _b) = etcd().await;
                super::$name(s).await;
            }
        }
    };
}

both!(crud_and_revisions);
both!(compare_and_swap);
both!(none_newer_guards_a_listing);
both!(no_lost_updates);
both!(watch_resumes_and_reports_compaction);

/// Two handles on one SQLite file (as two processes would have) see each other's writes,
/// and a watch on one sees the other's transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_shared_between_handles() {
    let dir = temp_dir("shared");
    let spec = format!("sqlite:{}", dir.path().join("s.db").display());
    let a = trellis_store::open(&spec).await.unwrap();
    let b = trellis_store::open(&spec).await.unwrap();
    let mut w = a.watch("/s/", 1).await.unwrap();
    committed(
        &*b,
        vec![Precondition::Absent("/s/k".into())],
        vec![put("/s/k", "v")],
    )
    .await;
    assert_eq!(a.get("/s/k").await.unwrap().unwrap().value, b"v");
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.key, "/s/k");
    assert_eq!(
        a.txn(
            vec![Precondition::Absent("/s/k".into())],
            vec![put("/s/k", "w")]
        )
        .await
        .unwrap(),
        TxnOutcome::Conflict
    );
}

#[tokio::test]
async fn unreachable_etcd_is_named() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = format!("etcd:http://127.0.0.1:{port}");
    let err = trellis_store::open(&spec)
        .await
        .err()
        .expect("nothing listens there");
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}
