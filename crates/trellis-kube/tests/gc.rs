//! IPAM garbage collection driven by the Kubernetes API, against the in-tree test API server
//! (a test double) and a real datastore (SQLite, and etcd where the race matters). Each test
//! tries to trick the GC into releasing a live pod's address: a pod recreated under the same
//! name, a restarted controller, the API server listing nothing (or leaving one pod out), a
//! node deleted and added again, and a DEL and ADD racing the release. Time is a clock the
//! test moves (no waiting for grace periods); every wait has a deadline.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use trellis_cluster::ipam::{NodeIpam, Request};
use trellis_cluster::{objects, report, Clock};
use trellis_kube::controller::{self, ControllerConfig};
use trellis_kube::gc::{GcHooks, GcStats};
use trellis_kube::gc_plan::GcConfig;
use trellis_kube::lease::{Leadership, LeaseConfig};
use trellis_kube_testapi::{TestApiServer, NAMESPACES, NODES, PODS};
use trellis_resources::{key_for, parse_documents, Kind, Resource};
use trellis_store::{Datastore, KeyValue, Listing, Precondition, TxnOp, TxnOutcome, Watch};

const DEADLINE: Duration = Duration::from_secs(30);
const GRACE: u64 = 300;
/// One GC interval of the test clock (the passes themselves run every 50 ms of real time; only
/// clock time counts for observations and grace).
const STEP: u64 = 120;

/// A clock that moves only when the test says so.
struct ManualClock {
    base: Instant,
    offset: AtomicU64,
}

impl ManualClock {
    fn advance(&self, secs: u64) {
        self.offset.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_secs(&self) -> u64 {
        1_700_000_000 + self.offset.load(Ordering::SeqCst)
    }
    fn instant(&self) -> Instant {
        self.base + Duration::from_secs(self.offset.load(Ordering::SeqCst))
    }
}

/// The controller's store: transactions deleting an IPAM handle (only GC's releases do, in
/// the controller) wait at a gate the test can close — a release in flight.
struct Gated {
    inner: Arc<dyn Datastore>,
    gate: tokio::sync::RwLock<()>,
    waiting: AtomicU64,
}

#[async_trait::async_trait]
impl Datastore for Gated {
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
        let handles = Kind::IpamHandle.prefix();
        let release = ops
            .iter()
            .any(|op| matches!(op, TxnOp::Delete(k) if k.starts_with(&handles)));
        let _open = if release {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let g = self.gate.read().await;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            Some(g)
        } else {
            None
        };
        self.inner.txn(pre, ops).await
    }
    async fn watch(&self, prefix: &str, from: i64) -> trellis_store::Result<Watch> {
        self.inner.watch(prefix, from).await
    }
    async fn watch_prefixes(&self, prefixes: &[String], from: i64) -> trellis_store::Result<Watch> {
        self.inner.watch_prefixes(prefixes, from).await
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

struct Env {
    api: TestApiServer,
    dir: tempfile::TempDir,
    store: Arc<dyn Datastore>,
    clock: Arc<ManualClock>,
    _etcd: Option<trellis_testutil::EtcdServer>,
}

/// A running controller; aborted (killed) when dropped.
struct Running {
    task: tokio::task::JoinHandle<()>,
    stats: Arc<GcStats>,
    store: Arc<Gated>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn env(etcd: bool) -> Env {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let etcd = etcd.then(trellis_testutil::EtcdServer::start);
    let api = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = match &etcd {
        Some(e) => format!("etcd:{}", e.endpoint),
        None => format!("sqlite:{}", dir.path().join("t.db").display()),
    };
    let store = trellis_store::open(&spec).await.unwrap();
    std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig()).unwrap();
    let pool = "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.70.0.0/24, blockSize: 28}\n";
    for doc in [pool, &node_yaml("n1")] {
        objects::apply(&*store, &parse_documents(doc).unwrap()[0], false)
            .await
            .unwrap();
    }
    api.put(NODES, json!({"metadata": {"name": "n1", "uid": "node-n1"}}));
    Env {
        api,
        dir,
        store,
        clock: Arc::new(ManualClock {
            base: Instant::now(),
            offset: AtomicU64::new(0),
        }),
        _etcd: etcd,
    }
}

fn node_yaml(name: &str) -> String {
    format!("apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{}}\n")
}

fn pod(ns: &str, name: &str, uid: &str, node: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "uid": uid},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}
    })
}

/// The CNI ADD of pod `ns/name` (UID `uid`) in container `cid` on `node`.
fn add_req(ns: &str, name: &str, uid: Option<&str>, cid: &str) -> Request {
    Request {
        network: "k8s".into(),
        container_id: cid.into(),
        ifname: "eth0".into(),
        namespace: Some(ns.into()),
        pod: Some(name.into()),
        pod_uid: uid.map(str::to_string),
        ..Default::default()
    }
}

impl Env {
    async fn controller(&self, identity: &str) -> Running {
        let client = controller::client(Some(&self.dir.path().join("kubeconfig")))
            .await
            .unwrap();
        let stats = Arc::new(GcStats::default());
        let gated = Arc::new(Gated {
            inner: self.store.clone(),
            gate: Default::default(),
            waiting: AtomicU64::new(0),
        });
        let cfg = ControllerConfig {
            lease: LeaseConfig {
                namespace: "kube-system".into(),
                name: "trellis-kube-controller".into(),
                identity: identity.into(),
                lease_duration: Duration::from_secs(2),
                renew_deadline: Duration::from_millis(1400),
                retry_period: Duration::from_millis(200),
            },
            resync: Duration::from_secs(60),
            gc: GcConfig {
                grace: Duration::from_secs(GRACE),
                // Real time between passes; observations count only when the test clock moved
                // at least half of it — which it does in steps of minutes.
                interval: Duration::from_millis(50),
                max_shrink: 0.5,
                enabled: true,
            },
            gc_hooks: GcHooks {
                clock: self.clock.clone(),
                stats: stats.clone(),
            },
        };
        let store: Arc<dyn Datastore> = gated.clone();
        let task = tokio::spawn(async move {
            let l = Arc::new(Leadership::default());
            controller::run_with(client, store, cfg, l, std::future::pending())
                .await
                .unwrap();
        });
        Running {
            task,
            stats,
            store: gated,
        }
    }

    fn ipam(&self, node: &str) -> NodeIpam {
        NodeIpam::new(self.store.clone(), node, BTreeMap::new()).with_clock(self.clock.clone())
    }

    async fn add(&self, node: &str, req: &Request) -> IpAddr {
        self.ipam(node).allocate(req).await.unwrap()[0].0
    }

    async fn endpoint_exists(&self, node: &str, req: &Request) -> bool {
        let name = format!("{node}.{}.eth0", req.container_id);
        let ns = req.namespace.as_deref();
        objects::get(&*self.store, Kind::WorkloadEndpoint, ns, &name)
            .await
            .unwrap()
            .is_some()
    }

    /// The addresses `req`'s handle holds (empty when released).
    async fn held(&self, req: &Request) -> Vec<IpAddr> {
        trellis_cluster::ipam::held_addresses(&*self.store, &req.handle())
            .await
            .unwrap()
            .unwrap_or_default()
            .into_iter()
            .map(|(ip, _)| ip)
            .collect()
    }

    /// Waits until the controller's mirror of pod `ns/name` shows `uid` (`None`: no record):
    /// the controller's view has taken in the change.
    async fn synced_pod(&self, ns: &str, name: &str, uid: Option<&str>) {
        until(&format!("pod record {ns}/{name} = {uid:?}"), || async {
            let r = objects::get(&*self.store, Kind::Pod, Some(ns), name)
                .await
                .unwrap();
            match r.map(|s| s.resource) {
                Some(Resource::Pod(p)) => p.metadata.uid.as_deref() == uid,
                _ => uid.is_none(),
            }
        })
        .await;
    }

    /// Moves the clock and waits until two whole GC passes ran after the move (so one pass
    /// observed the world at the new time).
    async fn step(&self, c: &Running, secs: u64) {
        self.clock.advance(secs);
        passes(c, 2).await;
    }
}

/// Ends every watch and compacts the history past a change (a namespace created meanwhile), so
/// every watcher's resume gets 410 Gone and it lists again.
fn relist(api: &TestApiServer) {
    api.gap(|st| {
        st.put(NAMESPACES, json!({"metadata": {"name": "gap"}}));
    });
}

async fn passes(c: &Running, n: u64) {
    let p = c.stats.passes.load(Ordering::SeqCst);
    until("GC passes", || async {
        c.stats.passes.load(Ordering::SeqCst) >= p + n
    })
    .await;
}

async fn until<F: std::future::Future<Output = bool>>(what: &str, f: impl Fn() -> F) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn released(c: &Running) -> u64 {
    c.stats.released_attachments.load(Ordering::SeqCst)
}

async fn recreated_pod(etcd: bool) {
    let e = env(etcd).await;
    e.api.put(PODS, pod("a", "web-0", "uid-1", "n1"));
    let c = e.controller("a").await;
    e.synced_pod("a", "web-0", Some("uid-1")).await;
    let old = add_req("a", "web-0", Some("uid-1"), "old");
    let old_ip = e.add("n1", &old).await;
    // The pod is deleted without a DEL reaching Trellis, and recreated under the same name on
    // the same node (a StatefulSet) with a new UID; its ADD gets another address.
    e.api.delete(PODS, "a", "web-0");
    e.api.put(PODS, pod("a", "web-0", "uid-2", "n1"));
    e.synced_pod("a", "web-0", Some("uid-2")).await;
    let new = add_req("a", "web-0", Some("uid-2"), "new");
    let new_ip = e.add("n1", &new).await;
    assert_ne!(old_ip, new_ip);
    e.step(&c, 0).await;
    for _ in 0..2 {
        e.step(&c, STEP).await;
        assert!(e.endpoint_exists("n1", &old).await, "released before grace");
    }
    e.step(&c, STEP).await;
    until("the old pod's address released", || async {
        !e.endpoint_exists("n1", &old).await
    })
    .await;
    assert!(e.held(&old).await.is_empty());
    // The new pod keeps its address, however long GC runs.
    for _ in 0..4 {
        e.step(&c, STEP).await;
    }
    assert_eq!(e.held(&new).await, vec![new_ip]);
    assert!(e.endpoint_exists("n1", &new).await);
    assert_eq!(released(&c), 1);
    assert!(report::check(&*e.store).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_recreated_under_its_name_keeps_its_address_and_the_old_one_goes() {
    recreated_pod(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_recreated_under_its_name_keeps_its_address_and_the_old_one_goes_on_etcd() {
    recreated_pod(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_counts_again_and_never_releases_early() {
    let e = env(false).await;
    e.api.put(PODS, pod("a", "gone", "uid-g", "n1"));
    let c = e.controller("a").await;
    e.synced_pod("a", "gone", Some("uid-g")).await;
    let gone = add_req("a", "gone", Some("uid-g"), "g");
    e.add("n1", &gone).await;
    e.api.delete(PODS, "a", "gone");
    e.synced_pod("a", "gone", None).await;
    // Two observations, 240 s of the 300 s grace.
    e.step(&c, 0).await;
    e.step(&c, STEP).await;
    e.step(&c, STEP).await;
    assert_eq!(c.stats.pending.load(Ordering::SeqCst), 1);
    // Killed mid-GC; by the old count the address would be due now.
    drop(c);
    e.clock.advance(STEP);
    let c = e.controller("b").await;
    passes(&c, 2).await;
    assert!(
        e.endpoint_exists("n1", &gone).await,
        "released at the first sighting"
    );
    e.step(&c, STEP).await;
    e.step(&c, STEP).await;
    assert!(
        e.endpoint_exists("n1", &gone).await,
        "released less than the grace period after this controller first saw it gone"
    );
    e.step(&c, STEP).await;
    until("the address released", || async {
        !e.endpoint_exists("n1", &gone).await
    })
    .await;
    assert_eq!(released(&c), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_listing_no_pods_releases_nothing() {
    let e = env(false).await;
    let mut reqs = Vec::new();
    for i in 0..4 {
        let (name, uid) = (format!("p{i}"), format!("uid-{i}"));
        e.api.put(PODS, pod("a", &name, &uid, "n1"));
        reqs.push(add_req("a", &name, Some(&uid), &format!("c{i}")));
    }
    let c = e.controller("a").await;
    e.synced_pod("a", "p3", Some("uid-3")).await;
    for r in &reqs {
        e.add("n1", r).await;
    }
    e.step(&c, 0).await;
    // Lists answer nothing (GETs still answer); the watch is cut so the controller lists again.
    e.api.hide(PODS, None, false);
    relist(&e.api);
    e.synced_pod("a", "p3", None).await;
    for _ in 0..8 {
        e.step(&c, STEP).await;
    }
    for r in &reqs {
        assert!(e.endpoint_exists("n1", r).await, "{r:?} released");
    }
    assert!(
        c.stats.refused.load(Ordering::SeqCst) >= 1,
        "the shrink was not noticed"
    );
    assert!(
        c.stats.spared.load(Ordering::SeqCst) >= 4,
        "the GET re-check never ran"
    );
    assert_eq!(released(&c), 0);
    // The API server answers properly again: nothing was lost.
    e.api.unhide(PODS);
    relist(&e.api);
    e.synced_pod("a", "p3", Some("uid-3")).await;
    for _ in 0..4 {
        e.step(&c, STEP).await;
    }
    assert_eq!(released(&c), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_left_out_of_lists_is_saved_by_the_get() {
    // One pod of three missing from lists (a shrink the guard lets through), but a GET finds
    // it: the re-check just before release keeps its address.
    let e = env(false).await;
    let mut reqs = Vec::new();
    for i in 0..3 {
        let (name, uid) = (format!("p{i}"), format!("uid-{i}"));
        e.api.put(PODS, pod("a", &name, &uid, "n1"));
        reqs.push(add_req("a", &name, Some(&uid), &format!("c{i}")));
    }
    let c = e.controller("a").await;
    e.synced_pod("a", "p2", Some("uid-2")).await;
    for r in &reqs {
        e.add("n1", r).await;
    }
    e.api.hide(PODS, Some("a/p0"), false);
    relist(&e.api);
    e.synced_pod("a", "p0", None).await;
    for _ in 0..6 {
        e.step(&c, STEP).await;
    }
    assert!(
        e.endpoint_exists("n1", &reqs[0]).await,
        "a live pod's address released"
    );
    assert!(c.stats.spared.load(Ordering::SeqCst) >= 1);
    assert_eq!(released(&c), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deleted_and_added_again_before_grace_keeps_everything() {
    let e = env(false).await;
    objects::apply(
        &*e.store,
        &parse_documents(&node_yaml("n2")).unwrap()[0],
        false,
    )
    .await
    .unwrap();
    e.api
        .put(NODES, json!({"metadata": {"name": "n2", "uid": "node-n2"}}));
    e.api.put(PODS, pod("a", "on-n2", "uid-2", "n2"));
    e.api.put(PODS, pod("a", "on-n1", "uid-1", "n1"));
    let c = e.controller("a").await;
    // The controller synced n2 from Kubernetes (what makes it one this GC may delete).
    until("n2 synced from Kubernetes", || async {
        matches!(
            objects::get(&*e.store, Kind::Node, None, "n2").await.unwrap().map(|s| s.resource),
            Some(Resource::Node(n)) if n.metadata.annotations.contains_key(trellis_kube::translate::KUBE_LABELS)
        )
    })
    .await;
    let on_n2 = add_req("a", "on-n2", Some("uid-2"), "x2");
    let on_n1 = add_req("a", "on-n1", Some("uid-1"), "x1");
    e.add("n2", &on_n2).await;
    let kept = e.add("n1", &on_n1).await;
    let tunnel = Request {
        network: "vxlan".into(),
        container_id: "tunnel-n2".into(),
        ifname: "vxlan".into(),
        no_endpoint: true,
        ..Default::default()
    };
    e.add("n2", &tunnel).await;
    let node_record = || async {
        objects::get(&*e.store, Kind::Node, None, "n2")
            .await
            .unwrap()
            .is_some()
    };
    // Deleted, seen gone twice, then back before the grace period ends (a new Node object);
    // deleted once more right after it was seen back.
    e.api.delete(NODES, "", "n2");
    e.step(&c, 0).await;
    e.step(&c, STEP).await;
    e.api.put(
        NODES,
        json!({"metadata": {"name": "n2", "uid": "node-n2b"}}),
    );
    until("n2 back in the controller's view", || async {
        c.stats.pending.load(Ordering::SeqCst) == 0
    })
    .await;
    e.step(&c, STEP).await;
    e.api.delete(NODES, "", "n2");
    // Its pod goes too (the pod GC controller removes pods bound to a deleted node): while one
    // is bound to it, the node is not released at all.
    e.api.delete(PODS, "a", "on-n2");
    e.synced_pod("a", "on-n2", None).await;
    until("n2 seen gone again", || async {
        c.stats.pending.load(Ordering::SeqCst) == 1
            || c.stats.released_nodes.load(Ordering::SeqCst) > 0
    })
    .await;
    passes(&c, 1).await;
    // By the first deletion's count it would be due now: it must count again.
    assert!(
        node_record().await,
        "n2 released by an observation from before it came back"
    );
    e.step(&c, STEP).await;
    e.step(&c, STEP).await;
    assert!(node_record().await, "n2 released before the grace period");
    assert_eq!(c.stats.released_nodes.load(Ordering::SeqCst), 0);
    e.step(&c, 2 * STEP).await;
    until("n2 released", || async { !node_record().await }).await;
    until("n2's blocks released", || async {
        e.held(&tunnel).await.is_empty() && e.held(&on_n2).await.is_empty()
    })
    .await;
    let snap = trellis_cluster::snapshot::Snapshot::read(&*e.store)
        .await
        .unwrap();
    assert!(snap
        .blocks
        .iter()
        .all(|b| trellis_ipam::cluster::block_node(&b.object.spec) != Some("n2")));
    assert!(snap.affinities.values().all(|a| a.object.spec.node != "n2"));
    assert_eq!(e.held(&on_n1).await, vec![kept]);
    assert!(report::check(&*e.store).await.unwrap().is_empty());
}

async fn racing_del_and_add(etcd: bool) {
    let e = env(etcd).await;
    e.api.put(PODS, pod("a", "web-0", "uid-1", "n1"));
    let c = e.controller("a").await;
    e.synced_pod("a", "web-0", Some("uid-1")).await;
    let old = add_req("a", "web-0", Some("uid-1"), "old");
    let ip = e.add("n1", &old).await;
    e.api.delete(PODS, "a", "web-0");
    e.synced_pod("a", "web-0", None).await;
    e.step(&c, 0).await;
    e.step(&c, STEP).await;
    // The release GC is about to commit waits at the gate.
    let closed = c.store.gate.write().await;
    e.clock.advance(2 * STEP);
    until("GC's release in flight", || async {
        c.store.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    // Meanwhile the runtime's DEL arrives, and a new pod gets the freed address.
    e.ipam("n1").release(&old).await.unwrap();
    e.api.put(PODS, pod("a", "web-0", "uid-2", "n1"));
    let new = Request {
        requested_ips: vec![ip],
        ..add_req("a", "web-0", Some("uid-2"), "new")
    };
    assert_eq!(e.add("n1", &new).await, ip);
    drop(closed);
    until("GC's release to finish", || async {
        c.stats.conflicts.load(Ordering::SeqCst) + released(&c) >= 1
    })
    .await;
    assert_eq!(e.held(&new).await, vec![ip], "the new pod lost its address");
    assert_eq!(c.stats.conflicts.load(Ordering::SeqCst), 1);
    e.synced_pod("a", "web-0", Some("uid-2")).await;
    for _ in 0..3 {
        e.step(&c, STEP).await;
    }
    assert_eq!(e.held(&new).await, vec![ip], "the new pod lost its address");
    assert!(e.endpoint_exists("n1", &new).await);
    assert_eq!(released(&c), 0);
    assert!(report::check(&*e.store).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_del_and_add_racing_the_release_win_cleanly() {
    racing_del_and_add(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_del_and_add_racing_the_release_win_cleanly_on_etcd() {
    racing_del_and_add(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_without_uid_is_judged_by_name_and_node() {
    // A runtime that does not pass K8S_POD_UID: the pod of that name on that node keeps it.
    let e = env(false).await;
    e.api.put(PODS, pod("a", "p", "uid-1", "n1"));
    let c = e.controller("a").await;
    e.synced_pod("a", "p", Some("uid-1")).await;
    let r = add_req("a", "p", None, "c");
    e.add("n1", &r).await;
    for _ in 0..5 {
        e.step(&c, STEP).await;
    }
    assert!(e.endpoint_exists("n1", &r).await);
    let key = key_for(Kind::Pod, Some("a"), "p");
    assert!(e.store.get(&key).await.unwrap().is_some());
    e.api.delete(PODS, "a", "p");
    for _ in 0..4 {
        e.step(&c, STEP).await;
    }
    until("released", || async { !e.endpoint_exists("n1", &r).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_pod_keeps_its_address_though_its_mirror_pod_has_another_uid() {
    // The kubelet runs a static pod under a UID it hashes from the manifest — what the runtime
    // passes as K8S_POD_UID — while the API server holds a mirror pod with a UID of its own,
    // naming the kubelet's in `kubernetes.io/config.mirror`.
    let e = env(false).await;
    let hash = "6576683a93d91d8e2119df2c2755f2f1";
    let mirror = |uid: &str, hash: &str| {
        let mut p = pod("a", "web-n1", uid, "n1");
        p["metadata"]["annotations"] = json!({
            "kubernetes.io/config.mirror": hash,
            "kubernetes.io/config.hash": hash,
            "kubernetes.io/config.source": "file",
        });
        p
    };
    e.api
        .put(PODS, mirror("5c582d4d-bb18-402b-8790-53bf48cb9396", hash));
    let c = e.controller("a").await;
    e.synced_pod("a", "web-n1", Some("5c582d4d-bb18-402b-8790-53bf48cb9396"))
        .await;
    let r = add_req("a", "web-n1", Some(hash), "s1");
    let ip = e.add("n1", &r).await;
    // `trellis ipam check` judges it the same way: no leak.
    let leaks = trellis_kube::gc::pod_leaks(&*e.store, e.clock.now_secs())
        .await
        .unwrap();
    assert_eq!(leaks, Some(vec![]), "a live static pod reported as a leak");
    for _ in 0..6 {
        e.step(&c, STEP).await;
    }
    assert_eq!(
        e.held(&r).await,
        vec![ip],
        "a live static pod's address released"
    );
    assert!(e.endpoint_exists("n1", &r).await);
    assert_eq!(released(&c), 0);
    // The manifest changes: the kubelet runs the pod under a new hash and replaces the mirror.
    // The old sandbox's address (its DEL lost) is no longer anyone's.
    let hash2 = "9aac5b5c8815def09a2ef9e37b89da55";
    e.api.delete(PODS, "a", "web-n1");
    e.api
        .put(PODS, mirror("1fa419d8-454b-29b5-4d32-95c64c05e200", hash2));
    e.synced_pod("a", "web-n1", Some("1fa419d8-454b-29b5-4d32-95c64c05e200"))
        .await;
    let r2 = add_req("a", "web-n1", Some(hash2), "s2");
    let ip2 = e.add("n1", &r2).await;
    for _ in 0..4 {
        e.step(&c, STEP).await;
    }
    until("the old static pod's address released", || async {
        !e.endpoint_exists("n1", &r).await
    })
    .await;
    assert_eq!(e.held(&r2).await, vec![ip2]);
    assert_eq!(released(&c), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deleted_while_its_pods_still_exist_keeps_their_addresses() {
    // A Node object deleted (kubectl delete node, a cloud controller's mistake) while pods bound
    // to it still exist in the API server (the pod GC controller has not removed them, or is
    // down): the node's addresses are those pods' until the pods are gone.
    let e = env(false).await;
    objects::apply(
        &*e.store,
        &parse_documents(&node_yaml("n2")).unwrap()[0],
        false,
    )
    .await
    .unwrap();
    e.api
        .put(NODES, json!({"metadata": {"name": "n2", "uid": "node-n2"}}));
    e.api.put(PODS, pod("a", "on-n2", "uid-2", "n2"));
    let c = e.controller("a").await;
    until("n2 synced from Kubernetes", || async {
        matches!(
            objects::get(&*e.store, Kind::Node, None, "n2").await.unwrap().map(|s| s.resource),
            Some(Resource::Node(n)) if n.metadata.annotations.contains_key(trellis_kube::translate::KUBE_LABELS)
        )
    })
    .await;
    e.synced_pod("a", "on-n2", Some("uid-2")).await;
    let on_n2 = add_req("a", "on-n2", Some("uid-2"), "x2");
    let ip = e.add("n2", &on_n2).await;
    e.api.delete(NODES, "", "n2");
    until("n2 seen gone", || async {
        c.stats.pending.load(Ordering::SeqCst) >= 1
            || c.stats.released_nodes.load(Ordering::SeqCst) > 0
    })
    .await;
    for _ in 0..6 {
        e.step(&c, STEP).await;
    }
    assert_eq!(
        e.held(&on_n2).await,
        vec![ip],
        "the address of a pod that still exists released with its node"
    );
    assert!(e.endpoint_exists("n2", &on_n2).await);
    assert_eq!(c.stats.released_nodes.load(Ordering::SeqCst), 0);
    // The pod goes too: then the node and its addresses go.
    e.api.delete(PODS, "a", "on-n2");
    e.synced_pod("a", "on-n2", None).await;
    for _ in 0..3 {
        e.step(&c, STEP).await;
    }
    until("n2 released", || async {
        c.stats.released_nodes.load(Ordering::SeqCst) == 1 && e.held(&on_n2).await.is_empty()
    })
    .await;
    assert!(report::check(&*e.store).await.unwrap().is_empty());
}
