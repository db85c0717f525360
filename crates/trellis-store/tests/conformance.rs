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
both!(one_watch_for_several_prefixes);
both!(messages_larger_than_grpc_default);

/// A listing, and a watch response catching up on several revisions, can each be larger than
/// gRPC's default message limit (4 MiB): six values of 1 MiB (under etcd's 1.5 MiB request
/// limit each) under one prefix. Past that limit etcd's listings of the prefix failed every
/// time, so one kind of object (a few thousand blocks, or three large records) stopped every
/// agent from loading its view.
async fn messages_larger_than_grpc_default(s: Arc<dyn Datastore>) {
    let start = s.revision().await.unwrap() + 1;
    let big = vec![b'x'; 1 << 20];
    for i in 0..6 {
        let op = TxnOp::Put(format!("/big/{i}"), big.clone());
        committed(&*s, vec![], vec![op]).await;
    }
    let listing = s.list("/big/").await.expect("a 6 MiB listing");
    assert_eq!(listing.items.len(), 6);
    assert!(listing.items.iter().all(|kv| kv.value.len() == 1 << 20));
    let mut w = s.watch("/big/", start).await.unwrap();
    for i in 0..6 {
        let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("watch event in time")
            .expect("the watch goes on")
            .expect("a 6 MiB catch-up is delivered");
        assert_eq!(ev.key, format!("/big/{i}"));
    }
}

/// A watch on an etcd that stops answering without closing its connection (frozen here; a host
/// that died, a partition) ends with an error within the keep-alive bounds, so the watcher lists
/// again (and can fail over) instead of waiting forever for its next event with a view that has
/// silently stopped changing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_an_unresponsive_etcd_ends() {
    let (s, backing) = etcd().await;
    let Backing::Etcd(server) = &backing else {
        unreachable!()
    };
    let mut w = s.watch("/h/", 1).await.unwrap();
    committed(&*s, vec![], vec![put("/h/a", "1")]).await;
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("the watch is established")
        .unwrap()
        .unwrap();
    assert_eq!(ev.key, "/h/a");
    server.pause();
    // Keep-alive pings every 10 s, answered within 5 s; the rest is slack for a loaded machine.
    let bound = Duration::from_secs(40);
    let end = tokio::time::timeout(bound, w.next()).await;
    server.resume();
    match end {
        Ok(Some(Err(_)) | None) => {}
        Ok(Some(Ok(ev))) => panic!("an event from a frozen server: {ev:?}"),
        Err(_) => panic!("the watch still waits {bound:?} after etcd stopped answering"),
    }
}

/// `watch_prefixes`: events of the prefixes asked for, in revision order per prefix, and none of
/// the others.
async fn one_watch_for_several_prefixes(s: Arc<dyn Datastore>) {
    let start = s.revision().await.unwrap() + 1;
    committed(&*s, vec![], vec![put("/m/a/1", "1")]).await;
    committed(&*s, vec![], vec![put("/m/c/1", "not watched")]).await;
    committed(&*s, vec![], vec![put("/m/b/1", "2"), put("/m/a/2", "3")]).await;
    let mut w = s
        .watch_prefixes(&["/m/a/".to_string(), "/m/b/".to_string()], start)
        .await
        .unwrap();
    committed(&*s, vec![], vec![TxnOp::Delete("/m/a/1".into())]).await;
    committed(&*s, vec![], vec![put("/m/c/2", "not watched")]).await;
    committed(&*s, vec![], vec![put("/m/b/1", "4")]).await;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("watch event in time")
            .unwrap()
            .unwrap();
        seen.push((ev.key, ev.revision));
    }
    assert!(
        seen.iter().all(|(k, _)| !k.starts_with("/m/c/")),
        "{seen:?}"
    );
    for prefix in ["/m/a/", "/m/b/"] {
        let revs: Vec<i64> = seen
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, r)| *r)
            .collect();
        assert!(revs.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    }
    let mut keys: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["/m/a/1", "/m/a/1", "/m/a/2", "/m/b/1", "/m/b/1"]);
}

/// Writes single-key revisions under `/g/` until a watch from revision 1 reports `Compacted`
/// (the store compacted on its own), or the deadline passes.
async fn write_until_compacted(s: &dyn Datastore, deadline: Duration) -> i64 {
    let end = tokio::time::Instant::now() + deadline;
    let mut n = 0;
    loop {
        for _ in 0..20 {
            committed(
                s,
                vec![],
                vec![put(&format!("/g/{}", n % 7), &n.to_string())],
            )
            .await;
            n += 1;
        }
        let mut w = s.watch("/g/", 1).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
            Ok(Some(Err(StoreError::Compacted { compacted, .. }))) => return compacted,
            Ok(Some(Ok(_))) => {}
            other => panic!("unexpected watch result {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < end,
            "no automatic compaction after {n} writes"
        );
    }
}

/// The embedded store compacts its change log by itself, keeping the last N revisions or the
/// last T, whichever retains more; a recent watch is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_compacts_automatically() {
    let dir = temp_dir("autocompact");
    let path = dir.path().join("a.db");
    let path = path.to_str().unwrap();
    // Count-bound: nothing is young enough to keep beyond the last 10 revisions.
    let s = trellis_store::sqlite::SqliteStore::open_with(
        path,
        Some(trellis_store::Retention {
            revisions: 10,
            age: Duration::ZERO,
        }),
    )
    .await
    .unwrap();
    let compacted = write_until_compacted(&s, Duration::from_secs(30)).await;
    let now = s.revision().await.unwrap();
    assert!(
        compacted > now - 10 - trellis_store::sqlite::COMPACT_EVERY,
        "compacted at {compacted}, store at {now}: keeps about 10 revisions"
    );
    let mut w = s.watch("/g/", now - 5).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .expect("a recent revision is still there");
    assert_eq!(ev.revision, now - 5);
    // Age-bound: young history is kept even though it is more than 10 revisions.
    let dir2 = temp_dir("autocompact-age");
    let path2 = dir2.path().join("b.db");
    let s2 = trellis_store::sqlite::SqliteStore::open_with(
        path2.to_str().unwrap(),
        Some(trellis_store::Retention {
            revisions: 10,
            age: Duration::from_secs(3600),
        }),
    )
    .await
    .unwrap();
    for n in 0..(3 * trellis_store::sqlite::COMPACT_EVERY) {
        committed(&s2, vec![], vec![put("/g/k", &n.to_string())]).await;
    }
    let mut w = s2.watch("/g/", 1).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .expect("young history is kept");
    assert_eq!(ev.revision, 1);
}

/// Entries older than the retention's age go once there are more than its revision count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_compacts_by_age() {
    let dir = temp_dir("autocompact-old");
    let path = dir.path().join("c.db");
    let s = trellis_store::sqlite::SqliteStore::open_with(
        path.to_str().unwrap(),
        Some(trellis_store::Retention {
            revisions: 10,
            age: Duration::from_millis(300),
        }),
    )
    .await
    .unwrap();
    write_until_compacted(&s, Duration::from_secs(30)).await;
}

/// etcd compacts by itself when started with `--auto-compaction-retention`; the backend reports
/// it to watchers as `Compacted`, the same as the embedded store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_auto_compaction_reaches_watchers() {
    let server = EtcdServer::start_with(&[
        "--auto-compaction-mode",
        "periodic",
        "--auto-compaction-retention",
        "1s",
    ]);
    let spec = format!("etcd:{}", server.endpoint);
    let mut s = None;
    for _ in 0..100 {
        if let Ok(st) = trellis_store::open(&spec).await {
            s = Some(st);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = s.expect("etcd answers");
    write_until_compacted(&*s, Duration::from_secs(60)).await;
}

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
