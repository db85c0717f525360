//! Issue 9 items 1 and 6: GC (`ipam gc`, `delete node`) racing with allocations, releases and a
//! node registering again, on both stores.
//!
//! - `gc_interleavings_*`: a `Datastore` wrapper runs a hook — allocations, or the node coming
//!   back — before GC's k-th datastore call, for every k of the run. Each hook position is
//!   printed; after each run every live attachment must hold exactly its addresses, nothing may
//!   be recorded twice, and `ipam check` must be clean; more allocations afterwards must not be
//!   handed an address GC freed wrongly.
//! - `stress_*`: several nodes' allocators ADD and DEL in bursts while GC loops, an idle node is
//!   deleted and re-registered, and a busy node is deleted while its agent registers it again;
//!   checked after every round, bounded in rounds and time.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{apply, node_yaml, req, verify_ledger, ManualClock};
use trellis_cluster::ipam::{NodeIpam, Request};
use trellis_cluster::report::{self, GcReport, GcScope};
use trellis_cluster::{objects, Clock, ClusterError};
use trellis_resources::Kind;
use trellis_store::{Datastore, KeyValue, Listing, Precondition, TxnOp, TxnOutcome, Watch};

type Hook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Passes every call to `inner`, but first runs `hook` (once) before call number `fire_before`;
/// records each call, and how many transactions committed after the hook ran.
struct Hooked {
    inner: Arc<dyn Datastore>,
    fire_before: usize,
    calls: AtomicUsize,
    hook: tokio::sync::Mutex<Option<Hook>>,
    log: Mutex<Vec<String>>,
    fired: std::sync::atomic::AtomicBool,
    committed_after_hook: AtomicUsize,
}

impl Hooked {
    fn new(inner: Arc<dyn Datastore>, fire_before: usize, hook: Option<Hook>) -> Hooked {
        Hooked {
            inner,
            fire_before,
            calls: AtomicUsize::new(0),
            hook: tokio::sync::Mutex::new(hook),
            log: Mutex::new(Vec::new()),
            fired: false.into(),
            committed_after_hook: AtomicUsize::new(0),
        }
    }

    async fn call(&self, what: String) {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push(what);
        if n == self.fire_before {
            if let Some(h) = self.hook.lock().await.take() {
                h().await;
                self.fired.store(true, Ordering::SeqCst);
            }
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Datastore for Hooked {
    async fn get(&self, key: &str) -> trellis_store::Result<Option<KeyValue>> {
        self.call(format!("get {key}")).await;
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> trellis_store::Result<Listing> {
        self.call(format!("list {prefix}")).await;
        self.inner.list(prefix).await
    }
    async fn txn(
        &self,
        pre: Vec<Precondition>,
        ops: Vec<TxnOp>,
    ) -> trellis_store::Result<TxnOutcome> {
        let what: Vec<String> = ops
            .iter()
            .map(|o| match o {
                TxnOp::Put(k, _) => format!("put {k}"),
                TxnOp::Delete(k) => format!("delete {k}"),
            })
            .collect();
        self.call(format!("txn [{}]", what.join(", "))).await;
        let out = self.inner.txn(pre, ops).await?;
        if self.fired.load(Ordering::SeqCst) && matches!(out, TxnOutcome::Committed { .. }) {
            self.committed_after_hook.fetch_add(1, Ordering::SeqCst);
        }
        Ok(out)
    }
    async fn watch(&self, prefix: &str, from: i64) -> trellis_store::Result<Watch> {
        self.inner.watch(prefix, from).await
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

/// Deletes every Trellis key (in chunks: etcd limits operations per transaction).
async fn wipe(s: &dyn Datastore) {
    let keys: Vec<String> = s
        .list("/trellis/")
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    for chunk in keys.chunks(100) {
        let ops = chunk.iter().map(|k| TxnOp::Delete(k.clone())).collect();
        s.txn(vec![], ops).await.unwrap();
    }
}

type Ledger = BTreeMap<String, Vec<IpAddr>>;

async fn add(ipam: &NodeIpam, r: &Request, live: &mut Ledger) {
    let ips = ipam.allocate(r).await.unwrap();
    live.insert(r.handle(), ips.into_iter().map(|(ip, _)| ip).collect());
}

/// The world GC runs in: node `a` with a full block and an empty one past its grace, node `c`
/// with a full block, node `d` deleted with one live attachment and one leaked address.
struct World {
    a: NodeIpam,
    c: NodeIpam,
    live: Ledger,
    /// Handles of the deleted node `d`.
    d_handles: Vec<String>,
}

async fn world(s: &Arc<dyn Datastore>, clock: &Arc<ManualClock>) -> World {
    wipe(&**s).await;
    apply(&**s, &common::pool_yaml("p", "10.91.0.0/26", 29)).await;
    for n in ["a", "c", "d"] {
        apply(&**s, &node_yaml(n)).await;
    }
    let ipam = |n: &str| NodeIpam::new(s.clone(), n, BTreeMap::new()).with_clock(clock.clone());
    let (a, c, d) = (ipam("a"), ipam("c"), ipam("d"));
    let mut live = Ledger::new();
    for i in 0..9 {
        add(&a, &req("a", i), &mut live).await;
    }
    // a's second block becomes empty (and stays in a's cache of own blocks).
    a.release(&req("a", 8)).await.unwrap();
    live.remove(&req("a", 8).handle());
    for i in 0..8 {
        add(&c, &req("c", i), &mut live).await;
    }
    let mut scratch = Ledger::new();
    add(&d, &req("d", 0), &mut scratch).await;
    add(&d, &req("d", 1), &mut scratch).await;
    // d/1's handle and endpoint vanish: its address is leaked.
    let h = req("d", 1).handle();
    let hkey = trellis_resources::key_for(Kind::IpamHandle, None, &h);
    let hkv = s.get(&hkey).await.unwrap().unwrap();
    let Ok(trellis_resources::Resource::IpamHandle(obj)) =
        objects::decode(&hkv).map(|st| st.resource)
    else {
        panic!("handle {h}");
    };
    let ep = obj.spec.endpoint.unwrap();
    s.txn(vec![], vec![TxnOp::Delete(hkey), TxnOp::Delete(ep)])
        .await
        .unwrap();
    objects::delete(&**s, Kind::Node, None, "d").await.unwrap();
    World {
        a,
        c,
        live,
        d_handles: vec![req("d", 0).handle()],
    }
}

/// GC through a hooked store: the hook allocates on `a` (into the empty block GC wants to
/// delete) and on `c` (claiming a new block and affinity).
async fn allocations_during_gc(s: Arc<dyn Datastore>, scope: GcScope) {
    let clock = ManualClock::new();
    // A hookless run: how many calls GC makes.
    let w = world(&s, &clock).await;
    let probe = Hooked::new(s.clone(), usize::MAX, None);
    let r = report::gc(&probe, clock.now_secs(), 0, &scope)
        .await
        .unwrap();
    assert_eq!(r.released_handles, w.d_handles, "{r:?}");
    let total = probe.calls();
    eprintln!("{scope:?}: GC makes {total} datastore calls without interference");
    for k in 0..total {
        let w = Arc::new(tokio::sync::Mutex::new(world(&s, &clock).await));
        let w2 = w.clone();
        let hook: Hook = Box::new(move || {
            Box::pin(async move {
                let mut w = w2.lock().await;
                let World { a, c, live, .. } = &mut *w;
                add(a, &req("a", 100), live).await;
                add(c, &req("c", 100), live).await;
            })
        });
        let hooked = Hooked::new(s.clone(), k, Some(hook));
        let r = report::gc(&hooked, clock.now_secs(), 0, &scope)
            .await
            .unwrap();
        let landed = hooked
            .log
            .lock()
            .unwrap()
            .get(k)
            .cloned()
            .unwrap_or_default();
        eprintln!("  hook before call {k} ({landed}): {}", summary(&r));
        let mut w = w.lock().await;
        for h in &r.released_handles {
            assert!(
                w.d_handles.contains(h),
                "GC released {h}, not of the deleted node"
            );
        }
        if let Err(e) = verify_ledger(&*s, &w.live).await {
            panic!("hook before call {k} ({landed}): {e}");
        }
        // More allocations must not be handed an address that is still in use.
        let World { a, c, live, .. } = &mut *w;
        for i in 200..204 {
            add(a, &req("a", i), live).await;
            add(c, &req("c", i), live).await;
        }
        if let Err(e) = verify_ledger(&*s, &w.live).await {
            panic!("hook before call {k} ({landed}), after more allocations: {e}");
        }
    }
}

fn summary(r: &GcReport) -> String {
    format!(
        "released {:?}, leaks {:?}, blocks {:?}, affinities {}, conflicts {}",
        r.released_handles,
        r.released_leaks,
        r.deleted_blocks,
        r.deleted_affinities.len(),
        r.conflicts
    )
}

/// `delete node d` while d's agent registers it again: the hook re-registers d before GC's k-th
/// call; no release may commit after that, and what was released before is exactly reported.
async fn node_returns_during_gc(s: Arc<dyn Datastore>, scope: GcScope) {
    let clock = ManualClock::new();
    let setup = async || {
        wipe(&*s).await;
        apply(&*s, &common::pool_yaml("p", "10.91.0.0/26", 29)).await;
        apply(&*s, &node_yaml("d")).await;
        let d = NodeIpam::new(s.clone(), "d", BTreeMap::new()).with_clock(clock.clone());
        let mut live = Ledger::new();
        for i in 0..3 {
            add(&d, &req("d", i), &mut live).await;
        }
        objects::delete(&*s, Kind::Node, None, "d").await.unwrap();
        live
    };
    // Grace u64::MAX, as `delete node` runs it: every decision is "node d is gone".
    setup().await;
    let probe = Hooked::new(s.clone(), usize::MAX, None);
    let r = report::gc(&probe, clock.now_secs(), u64::MAX, &scope)
        .await
        .unwrap();
    assert_eq!(r.released_handles.len(), 3, "{r:?}");
    let total = probe.calls();
    eprintln!("{scope:?}: GC makes {total} datastore calls without interference");
    for k in 0..total {
        let mut live = setup().await;
        let s2 = s.clone();
        let hook: Hook =
            Box::new(move || Box::pin(async move { apply(&*s2, &node_yaml("d")).await }));
        let hooked = Hooked::new(s.clone(), k, Some(hook));
        let r = report::gc(&hooked, clock.now_secs(), u64::MAX, &scope)
            .await
            .unwrap();
        let landed = hooked
            .log
            .lock()
            .unwrap()
            .get(k)
            .cloned()
            .unwrap_or_default();
        eprintln!("  node back before call {k} ({landed}): {}", summary(&r));
        assert_eq!(
            hooked.committed_after_hook.load(Ordering::SeqCst),
            0,
            "hook before call {k} ({landed}): GC committed after node d registered again: {r:?}"
        );
        for h in &r.released_handles {
            live.remove(h);
        }
        if let Err(e) = verify_ledger(&*s, &live).await {
            panic!("node back before call {k} ({landed}): {e}");
        }
    }
}

/// The agent giving back its empty block while another node takes a requested address in it:
/// the hook allocates before the agent's k-th datastore call; the block stays if it was taken.
async fn allocation_during_empty_block_release(s: Arc<dyn Datastore>) {
    let clock = ManualClock::new();
    let setup = async || {
        wipe(&*s).await;
        apply(&*s, &common::pool_yaml("p", "10.91.0.0/26", 29)).await;
        apply(&*s, &node_yaml("a")).await;
        apply(&*s, &node_yaml("b")).await;
        let a = NodeIpam::new(s.clone(), "a", BTreeMap::new()).with_clock(clock.clone());
        let mut live = Ledger::new();
        add(&a, &req("a", 0), &mut live).await;
        a.release(&req("a", 0)).await.unwrap();
        clock.advance(10);
    };
    setup().await;
    let probe = Hooked::new(s.clone(), usize::MAX, None);
    let a = NodeIpam::new(Arc::new(probe), "a", BTreeMap::new()).with_clock(clock.clone());
    assert_eq!(
        a.release_empty_blocks(Duration::from_secs(5))
            .await
            .unwrap()
            .len(),
        1
    );
    drop(a);
    let mut total = 0;
    for k in 0.. {
        setup().await;
        let live = Arc::new(tokio::sync::Mutex::new(Ledger::new()));
        let (s2, live2, clock2) = (s.clone(), live.clone(), clock.clone());
        let hook: Hook = Box::new(move || {
            Box::pin(async move {
                let b = NodeIpam::new(s2, "b", BTreeMap::new()).with_clock(clock2);
                let mut fixed = req("b", 0);
                fixed.requested_ips = vec!["10.91.0.3".parse().unwrap()];
                add(&b, &fixed, &mut *live2.lock().await).await;
            })
        });
        let hooked = Arc::new(Hooked::new(s.clone(), k, Some(hook)));
        let a = NodeIpam::new(hooked.clone(), "a", BTreeMap::new()).with_clock(clock.clone());
        let released = a
            .release_empty_blocks(Duration::from_secs(5))
            .await
            .unwrap();
        total = hooked.calls();
        if k >= total {
            break; // the hook never ran: every position was tried
        }
        let landed = hooked.log.lock().unwrap()[k].clone();
        eprintln!("  allocation before call {k} ({landed}): released {released:?}");
        let live = live.lock().await.clone();
        if let Err(e) = verify_ledger(&*s, &live).await {
            panic!("allocation before call {k} ({landed}): {e}");
        }
    }
    assert!(total >= 2, "release_empty_blocks made {total} calls");
}

async fn gc_interleavings(s: Arc<dyn Datastore>) {
    allocation_during_empty_block_release(s.clone()).await;
    allocations_during_gc(s.clone(), GcScope::All).await;
    node_returns_during_gc(s.clone(), GcScope::All).await;
    node_returns_during_gc(s, GcScope::Node("d".into())).await;
}

/// A small deterministic generator (xorshift), so a failing round can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What one node's ADD/DEL burst did.
struct Burst {
    added: Vec<(String, Vec<IpAddr>)>,
    deleted: Vec<String>,
    refused: usize,
}

/// `ops` ADDs and DELs on one node, ADD of fresh containers, DEL of this node's live ones.
async fn burst(
    ipam: Arc<NodeIpam>,
    node: String,
    mut mine: Vec<Request>,
    seed: u64,
    serial: usize,
    ops: usize,
) -> (Burst, Vec<Request>) {
    let mut rng = Rng(seed);
    let mut out = Burst {
        added: Vec::new(),
        deleted: Vec::new(),
        refused: 0,
    };
    for i in 0..ops {
        if mine.is_empty() || rng.below(3) != 0 {
            let r = req(&node, serial * 1000 + i);
            match ipam.allocate(&r).await {
                Ok(ips) => {
                    out.added
                        .push((r.handle(), ips.into_iter().map(|(ip, _)| ip).collect()));
                    mine.push(r);
                }
                // The node was deleted for a moment: the runtime would retry later.
                Err(ClusterError::NodeNotRegistered { .. }) => out.refused += 1,
                Err(e) => panic!("ADD {} on {node}: {e}", r.handle()),
            }
        } else {
            let r = mine.swap_remove(rng.below(mine.len()));
            ipam.release(&r).await.unwrap();
            out.deleted.push(r.handle());
        }
    }
    (out, mine)
}

async fn stress(s: Arc<dyn Datastore>) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(40);
    apply(&*s, &common::pool_yaml("p", "10.92.0.0/23", 28)).await;
    let names: Vec<String> = (0..4).map(|i| format!("n{i}")).collect();
    for n in &names {
        apply(&*s, &node_yaml(n)).await;
    }
    let ipams: Vec<Arc<NodeIpam>> = names
        .iter()
        .map(|n| Arc::new(NodeIpam::new(s.clone(), n, BTreeMap::new())))
        .collect();
    let mut live = Ledger::new();
    let mut mine: Vec<Vec<Request>> = vec![Vec::new(); 3];
    let (mut rounds, mut adds, mut dels, mut refused, mut gc_released) = (0, 0, 0, 0, 0);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    while rounds < 40 && Instant::now() < deadline {
        rounds += 1;
        // ADD/DEL bursts on n0..n2 (n3 is idle).
        let bursts: Vec<_> = (0..3)
            .map(|i| {
                let held = std::mem::take(&mut mine[i]);
                tokio::spawn(burst(
                    ipams[i].clone(),
                    names[i].clone(),
                    held,
                    rng.next() | 1,
                    rounds,
                    12,
                ))
            })
            .collect();
        // `ipam gc` in a loop.
        let gc_loop = {
            let s = s.clone();
            tokio::spawn(async move {
                let mut reports = Vec::new();
                for _ in 0..3 {
                    let r = report::gc(&*s, trellis_cluster::now_secs(), 0, &GcScope::All);
                    reports.push(r.await.unwrap());
                }
                reports
            })
        };
        // `delete node n3` (idle): nothing of a live pod may go; then it registers again.
        let idle = {
            let s = s.clone();
            tokio::spawn(async move {
                objects::delete(&*s, Kind::Node, None, "n3").await.unwrap();
                let scope = GcScope::Node("n3".into());
                let r = report::gc(&*s, trellis_cluster::now_secs(), u64::MAX, &scope);
                let r = r.await.unwrap();
                apply(&*s, &node_yaml("n3")).await;
                r
            })
        };
        // `delete node n2` while n2's agent registers it again.
        let busy = {
            let s = s.clone();
            tokio::spawn(async move {
                objects::delete(&*s, Kind::Node, None, "n2").await.unwrap();
                let back = {
                    let s = s.clone();
                    tokio::spawn(async move { apply(&*s, &node_yaml("n2")).await })
                };
                let scope = GcScope::Node("n2".into());
                let r = report::gc(&*s, trellis_cluster::now_secs(), u64::MAX, &scope);
                let r = r.await.unwrap();
                back.await.unwrap();
                r
            })
        };
        for (i, b) in bursts.into_iter().enumerate() {
            let (b, held) = b.await.unwrap();
            adds += b.added.len();
            dels += b.deleted.len();
            refused += b.refused;
            for (h, ips) in b.added {
                live.insert(h, ips);
            }
            for h in b.deleted {
                live.remove(&h);
            }
            mine[i] = held;
        }
        let idle = idle.await.unwrap();
        assert!(idle.released_handles.is_empty(), "idle n3: {idle:?}");
        let mut reports = gc_loop.await.unwrap();
        reports.push(busy.await.unwrap());
        // Releases GC committed were of n2's attachments while n2 was absent (its pods are
        // gone with it); anything else missing from the blocks is a wrongful release.
        for r in &reports {
            for h in &r.released_handles {
                assert!(h.starts_with("k8s.n2-"), "round {rounds}: GC released {h}");
                gc_released += 1;
                live.remove(h);
                mine[2].retain(|q| q.handle() != *h);
            }
        }
        if let Err(e) = verify_ledger(&*s, &live).await {
            panic!("round {rounds}: {e}");
        }
    }
    eprintln!(
        "{}: {rounds} rounds in {:?}: {adds} ADDs ({refused} refused while the node was deleted), {dels} DELs, {gc_released} attachments of the deleted node released by GC, {} live at the end",
        s.describe(),
        started.elapsed(),
        live.len()
    );
    assert!(rounds >= 3, "only {rounds} rounds ran");
}

both!(gc_interleavings);
both!(stress);
