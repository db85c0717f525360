//! The sync shell against the in-tree test API server (a test double) and a real SQLite
//! datastore: arrival, change and deletion, watch resume, 410 → relist, restart, and leader
//! election. Every wait has a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use trellis_cluster::objects;
use trellis_kube::controller::{self, ControllerConfig};
use trellis_kube::lease::{Leadership, LeaseConfig};
use trellis_kube_testapi::{
    TestApiServer, CLUSTER_NETWORK_POLICIES, CLUSTER_NETWORK_POLICIES_V1ALPHA2, LEASES, NAMESPACES,
    NETWORK_POLICIES, NODES, PODS, SERVICE_ACCOUNTS,
};
use trellis_resources::{key_for, parse_documents, Kind, Resource};
use trellis_store::{Datastore, KeyValue, Listing, Precondition, TxnOp, TxnOutcome, Watch};

const DEADLINE: Duration = Duration::from_secs(20);

/// The store, counting the transactions that committed through it (one controller's writes).
struct Counting {
    inner: Arc<dyn Datastore>,
    writes: AtomicU64,
    /// The prefixes listed, in order.
    lists: std::sync::Mutex<Vec<String>>,
    /// Held (written) by a test to stall this controller's transactions: a write in flight.
    gate: tokio::sync::RwLock<()>,
    /// Transactions waiting at the gate, and transactions finished (committed or not).
    waiting: AtomicU64,
    finished: AtomicU64,
    /// A key whose every write fails as too large for the store (etcd's request limit).
    too_large: std::sync::Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl Datastore for Counting {
    async fn get(&self, key: &str) -> trellis_store::Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> trellis_store::Result<Listing> {
        self.lists.lock().unwrap().push(prefix.to_string());
        self.inner.list(prefix).await
    }
    async fn txn(
        &self,
        pre: Vec<Precondition>,
        ops: Vec<TxnOp>,
    ) -> trellis_store::Result<TxnOutcome> {
        let fence = ops
            .iter()
            .any(|op| matches!(op, TxnOp::Put(k, _) if k == controller::FENCE_KEY));
        let refused = self.too_large.lock().unwrap().clone();
        if ops
            .iter()
            .any(|op| matches!(op, TxnOp::Put(k, _) if Some(k) == refused.as_ref()))
        {
            return Err(trellis_store::StoreError::TxnTooLarge {
                endpoint: "test".into(),
                conditions: pre.len(),
                writes: ops.len(),
                reason: "request is too large".into(),
            });
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let open = self.gate.read().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        let out = self.inner.txn(pre, ops).await;
        drop(open);
        // The fence record a new leader writes once is not a write of synced data.
        if matches!(out, Ok(TxnOutcome::Committed { .. })) && !fence {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
        out
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
    _etcd: Option<trellis_testutil::EtcdServer>,
}

async fn env() -> Env {
    env_on(None).await
}

/// The same, with the datastore in a fresh etcd.
async fn env_etcd() -> Env {
    env_on(Some(trellis_testutil::EtcdServer::start())).await
}

async fn env_on(etcd: Option<trellis_testutil::EtcdServer>) -> Env {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let api = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spec = match &etcd {
        Some(e) => format!("etcd:{}", e.endpoint),
        None => format!("sqlite:{}", dir.path().join("t.db").display()),
    };
    let store = trellis_store::open(&spec).await.unwrap();
    std::fs::write(dir.path().join("kubeconfig"), api.kubeconfig()).unwrap();
    Env {
        api,
        dir,
        store,
        _etcd: etcd,
    }
}

/// A running controller; aborted (killed) when dropped.
struct Running {
    task: tokio::task::JoinHandle<()>,
    writes: Arc<Counting>,
    leadership: Arc<Leadership>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Env {
    async fn controller(&self, identity: &str) -> Running {
        let client = controller::client(Some(&self.dir.path().join("kubeconfig")))
            .await
            .unwrap();
        let counting = Arc::new(Counting {
            inner: self.store.clone(),
            writes: AtomicU64::new(0),
            lists: Default::default(),
            gate: Default::default(),
            waiting: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            too_large: Default::default(),
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
            // IPAM GC has its own tests (tests/gc.rs); its listings would blur the counts here.
            gc: trellis_kube::gc_plan::GcConfig {
                enabled: false,
                ..Default::default()
            },
            gc_hooks: Default::default(),
        };
        let store: Arc<dyn Datastore> = counting.clone();
        let leadership = Arc::new(Leadership::default());
        let l = leadership.clone();
        let task = tokio::spawn(async move {
            controller::run_with(client, store, cfg, l, std::future::pending())
                .await
                .unwrap();
        });
        Running {
            task,
            writes: counting,
            leadership,
        }
    }

    async fn stored(&self, kind: Kind, ns: Option<&str>, name: &str) -> Option<Resource> {
        objects::get(&*self.store, kind, ns, name)
            .await
            .unwrap()
            .map(|s| s.resource)
    }

    /// Waits until `f` holds of the stored object (or its absence).
    async fn wait_for(
        &self,
        what: &str,
        kind: Kind,
        ns: Option<&str>,
        name: &str,
        f: impl Fn(Option<&Resource>) -> bool,
    ) {
        let start = Instant::now();
        loop {
            let r = self.stored(kind, ns, name).await;
            if f(r.as_ref()) {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; stored: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn lease_holder(&self) -> Option<String> {
        self.api
            .get(LEASES, "kube-system", "trellis-kube-controller")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    }

    async fn wait_leader(&self, identity: &str) {
        let start = Instant::now();
        while self.lease_holder().as_deref() != Some(identity) {
            assert!(
                start.elapsed() < DEADLINE,
                "{identity} never led; holder {:?}",
                self.lease_holder()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, node: &str, labels: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": "web",
                 "containers": [{"name": "c", "image": "busybox",
                                 "ports": [{"name": "http", "containerPort": 80}]}]}
    })
}

fn policy(ns: &str, name: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"ports": [{"port": "http"}]}]}
    })
}

/// What the CNI ADD writes for a pod (no labels).
async fn endpoint(store: &dyn Datastore, ns: &str, pod: &str, node: &str, container: &str) {
    let doc = format!(
        "apiVersion: trellis.dev/v1\nkind: WorkloadEndpoint\nmetadata: {{name: {node}.{container}.eth0, namespace: {ns}}}\nspec: {{node: {node}, pod: {pod}, containerID: {container}, endpoint: eth0, orchestrator: trellis, ipNetworks: [10.0.0.{}/32]}}\n",
        container.len()
    );
    objects::apply(store, &parse_documents(&doc).unwrap()[0], false)
        .await
        .unwrap();
}

fn wep_labels(r: Option<&Resource>) -> Option<&std::collections::BTreeMap<String, String>> {
    match r {
        Some(Resource::WorkloadEndpoint(w)) => Some(&w.metadata.labels),
        _ => None,
    }
}

fn label(r: Option<&Resource>, k: &str) -> Option<String> {
    r.and_then(|r| r.metadata().labels.get(k).cloned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_pods_and_policies_arrive_change_and_go() {
    let e = env().await;
    e.api
        .put(NAMESPACES, namespace("shop", json!({"team": "a"})));
    e.api
        .put(PODS, pod("shop", "web-1", "n1", json!({"app": "web"})));
    e.api.put(NETWORK_POLICIES, policy("shop", "allow-http"));
    e.api.put(
        SERVICE_ACCOUNTS,
        json!({"metadata": {"name": "web", "namespace": "shop", "labels": {"role": "front"}}}),
    );
    // web-1's endpoint exists before the controller; web-2's appears after its pod was seen.
    endpoint(&*e.store, "shop", "web-1", "n1", "c1").await;
    let _c = e.controller("a").await;
    e.wait_for("namespace labels", Kind::Namespace, None, "shop", |r| {
        label(r, "team").as_deref() == Some("a")
    })
    .await;
    e.wait_for(
        "pod labels",
        Kind::WorkloadEndpoint,
        Some("shop"),
        "n1.c1.eth0",
        |r| label(r, "app").as_deref() == Some("web"),
    )
    .await;
    let Some(Resource::WorkloadEndpoint(w)) = e
        .stored(Kind::WorkloadEndpoint, Some("shop"), "n1.c1.eth0")
        .await
    else {
        panic!()
    };
    assert_eq!(w.spec.service_account_name.as_deref(), Some("web"));
    assert_eq!(w.spec.ports[0].name, "http");
    e.wait_for(
        "policy",
        Kind::KubernetesNetworkPolicy,
        Some("shop"),
        "allow-http",
        |r| r.is_some(),
    )
    .await;

    e.api.put(
        PODS,
        pod("shop", "web-2", "n1", json!({"app": "web", "v": "2"})),
    );
    // Its first endpoint getting the labels shows the controller knows the pod; a second one
    // (a new sandbox) appears only after that.
    endpoint(&*e.store, "shop", "web-2", "n1", "c21").await;
    e.wait_for(
        "web-2's first endpoint",
        Kind::WorkloadEndpoint,
        Some("shop"),
        "n1.c21.eth0",
        |r| label(r, "v").as_deref() == Some("2"),
    )
    .await;
    endpoint(&*e.store, "shop", "web-2", "n1", "c22").await;
    e.wait_for(
        "a late endpoint gets its pod's labels",
        Kind::WorkloadEndpoint,
        Some("shop"),
        "n1.c22.eth0",
        |r| label(r, "v").as_deref() == Some("2"),
    )
    .await;

    e.api
        .put(PODS, pod("shop", "web-1", "n1", json!({"app": "api"})));
    e.wait_for(
        "a label change",
        Kind::WorkloadEndpoint,
        Some("shop"),
        "n1.c1.eth0",
        |r| label(r, "app").as_deref() == Some("api"),
    )
    .await;
    e.api
        .put(NAMESPACES, namespace("shop", json!({"team": "b"})));
    e.wait_for(
        "a namespace label change",
        Kind::Namespace,
        None,
        "shop",
        |r| label(r, "team").as_deref() == Some("b"),
    )
    .await;

    assert!(e.api.delete(NETWORK_POLICIES, "shop", "allow-http"));
    e.wait_for(
        "the policy's deletion",
        Kind::KubernetesNetworkPolicy,
        Some("shop"),
        "allow-http",
        |r| r.is_none(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_watch_resumes_without_relisting_or_losing_a_change() {
    let e = env().await;
    e.api
        .put(NAMESPACES, namespace("shop", json!({"team": "a"})));
    let _c = e.controller("a").await;
    e.wait_for("namespace", Kind::Namespace, None, "shop", |r| {
        label(r, "team").as_deref() == Some("a")
    })
    .await;
    let (lists, watches) = (e.api.lists(), e.api.watches());
    // Made while every watch is down: only a resume from the last version delivers it.
    e.api.while_dropped(|st| {
        st.put(NAMESPACES, namespace("shop", json!({"team": "b"})));
    });
    e.wait_for(
        "the change made while the watch was down",
        Kind::Namespace,
        None,
        "shop",
        |r| label(r, "team").as_deref() == Some("b"),
    )
    .await;
    assert!(e.api.watches() > watches, "watches resumed");
    assert_eq!(
        e.api.lists(),
        lists,
        "resumed from the last version, not listed again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_410_a_relist_deletes_what_vanished_but_never_what_the_cli_applied() {
    relist_after_410(env().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_410_a_relist_deletes_what_vanished_but_never_what_the_cli_applied_on_etcd() {
    relist_after_410(env_etcd().await).await;
}

async fn relist_after_410(e: Env) {
    e.api.put(NAMESPACES, namespace("keep", json!({})));
    e.api.put(NAMESPACES, namespace("gone", json!({})));
    e.api.put(NETWORK_POLICIES, policy("keep", "p-gone"));
    let cli = parse_documents("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: operator, namespace: keep}\nspec: {podSelector: {}}\n").unwrap();
    objects::apply(&*e.store, &cli[0], false).await.unwrap();
    let cli_ns =
        parse_documents("apiVersion: v1\nkind: Namespace\nmetadata: {name: cli-only}\n").unwrap();
    objects::apply(&*e.store, &cli_ns[0], false).await.unwrap();
    let _c = e.controller("a").await;
    e.wait_for("namespace gone", Kind::Namespace, None, "gone", |r| {
        r.is_some()
    })
    .await;
    e.wait_for(
        "policy p-gone",
        Kind::KubernetesNetworkPolicy,
        Some("keep"),
        "p-gone",
        |r| r.is_some(),
    )
    .await;
    let lists = e.api.lists();
    // Deleted in a gap whose history is then compacted: the resume gets 410 Gone.
    e.api.gap(|st| {
        assert!(st.delete(NAMESPACES, "", "gone"));
        assert!(st.delete(NETWORK_POLICIES, "keep", "p-gone"));
        st.put(NAMESPACES, namespace("keep", json!({"after": "gap"})));
    });
    e.wait_for(
        "the deletion seen by relisting",
        Kind::Namespace,
        None,
        "gone",
        |r| r.is_none(),
    )
    .await;
    e.wait_for(
        "the policy deletion seen by relisting",
        Kind::KubernetesNetworkPolicy,
        Some("keep"),
        "p-gone",
        |r| r.is_none(),
    )
    .await;
    e.wait_for(
        "the change seen by relisting",
        Kind::Namespace,
        None,
        "keep",
        |r| label(r, "after").as_deref() == Some("gap"),
    )
    .await;
    assert!(e.api.lists() > lists, "listed again after 410");
    assert!(
        e.stored(Kind::KubernetesNetworkPolicy, Some("keep"), "operator")
            .await
            .is_some(),
        "a CLI-applied policy survives"
    );
    assert!(
        e.stored(Kind::Namespace, None, "cli-only").await.is_some(),
        "a CLI-applied namespace survives"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_neither_loses_nor_repeats_a_write() {
    restart(env().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_neither_loses_nor_repeats_a_write_on_etcd() {
    restart(env_etcd().await).await;
}

async fn restart(e: Env) {
    e.api
        .put(NAMESPACES, namespace("shop", json!({"team": "a"})));
    e.api
        .put(PODS, pod("shop", "web-1", "n1", json!({"app": "web"})));
    e.api.put(NETWORK_POLICIES, policy("shop", "allow-http"));
    endpoint(&*e.store, "shop", "web-1", "n1", "c1").await;
    let first = e.controller("a").await;
    e.wait_for(
        "pod labels",
        Kind::WorkloadEndpoint,
        Some("shop"),
        "n1.c1.eth0",
        |r| label(r, "app").as_deref() == Some("web"),
    )
    .await;
    e.wait_for(
        "policy",
        Kind::KubernetesNetworkPolicy,
        Some("shop"),
        "allow-http",
        |r| r.is_some(),
    )
    .await;
    e.wait_for("namespace", Kind::Namespace, None, "shop", |r| r.is_some())
        .await;
    drop(first);
    // Changed while no controller runs.
    e.api.put(
        PODS,
        pod("shop", "web-1", "n1", json!({"app": "web", "rev": "2"})),
    );
    let before = e.store.revision().await.unwrap();
    let second = e.controller("a").await;
    e.wait_for(
        "the change made while down",
        Kind::WorkloadEndpoint,
        Some("shop"),
        "n1.c1.eth0",
        |r| label(r, "rev").as_deref() == Some("2"),
    )
    .await;
    // A later change proves the new controller has gone through everything since it started.
    e.api
        .put(NAMESPACES, namespace("shop", json!({"team": "b"})));
    e.wait_for("a later change", Kind::Namespace, None, "shop", |r| {
        label(r, "team").as_deref() == Some("b")
    })
    .await;
    // The pod's change: its record and its endpoint; the namespace's: the namespace.
    assert_eq!(
        second.writes.writes.load(Ordering::SeqCst),
        3,
        "exactly the three writes of the two changes"
    );
    // The three writes, and the fence record the new leader wrote before them.
    assert_eq!(e.store.revision().await.unwrap(), before + 4);
    assert_eq!(
        wep_labels(
            e.stored(Kind::WorkloadEndpoint, Some("shop"), "n1.c1.eth0")
                .await
                .as_ref()
        )
        .unwrap()
        .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_the_other_takes_over_when_it_dies() {
    let e = env().await;
    e.api
        .put(NAMESPACES, namespace("shop", json!({"team": "a"})));
    let a = e.controller("a").await;
    e.wait_leader("a").await;
    let b = e.controller("b").await;
    e.wait_for("namespace", Kind::Namespace, None, "shop", |r| {
        label(r, "team").as_deref() == Some("a")
    })
    .await;
    for i in 0..3 {
        e.api.put(
            NAMESPACES,
            namespace("shop", json!({"team": format!("a{i}")})),
        );
        let want = format!("a{i}");
        e.wait_for("a change", Kind::Namespace, None, "shop", |r| {
            label(r, "team") == Some(want.clone())
        })
        .await;
    }
    assert_eq!(e.lease_holder().as_deref(), Some("a"));
    assert!(a.writes.writes.load(Ordering::SeqCst) >= 4);
    assert_eq!(
        b.writes.writes.load(Ordering::SeqCst),
        0,
        "the follower never writes"
    );
    let killed = Instant::now();
    drop(a);
    e.api
        .put(NAMESPACES, namespace("shop", json!({"team": "after"})));
    e.wait_for(
        "the change, written by the new leader",
        Kind::Namespace,
        None,
        "shop",
        |r| label(r, "team").as_deref() == Some("after"),
    )
    .await;
    assert_eq!(e.lease_holder().as_deref(), Some("b"));
    assert!(b.writes.writes.load(Ordering::SeqCst) >= 1);
    // b waited for the lease (2 s, unrenewed as b saw it) to expire before taking over.
    assert!(
        killed.elapsed() >= Duration::from_millis(1500),
        "took over after {:?}",
        killed.elapsed()
    );
    let _ = key_for(Kind::Namespace, None, "shop");
}

async fn wait_leading(r: &Running, want: bool) {
    let start = Instant::now();
    while r.leadership.is_leader() != want {
        assert!(start.elapsed() < DEADLINE, "leadership never became {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_store_refuses_does_not_stop_the_others() {
    let e = env().await;
    e.api.put(NAMESPACES, namespace("shop", json!({})));
    let c = e.controller("a").await;
    // Too large for the store: every write of it fails, and keeps failing.
    *c.writes.too_large.lock().unwrap() = Some(key_for(
        Kind::KubernetesNetworkPolicy,
        Some("shop"),
        "a-huge",
    ));
    wait_leading(&c, true).await;
    e.wait_for("namespace", Kind::Namespace, None, "shop", |r| r.is_some())
        .await;
    e.api.put(NETWORK_POLICIES, policy("shop", "a-huge"));
    e.api.put(NETWORK_POLICIES, policy("shop", "b-fine"));
    e.wait_for(
        "the policy after the refused one",
        Kind::KubernetesNetworkPolicy,
        Some("shop"),
        "b-fine",
        |r| r.is_some(),
    )
    .await;
}

/// Waits until `f` holds, with the deadline.
async fn until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_flight_when_leadership_is_lost_does_not_land_under_the_next_leader() {
    let e = env().await;
    e.api.put(NAMESPACES, namespace("seed", json!({})));
    let a = e.controller("a").await;
    wait_leading(&a, true).await;
    e.wait_for("seed", Kind::Namespace, None, "seed", |r| r.is_some())
        .await;
    // a decides to create "x" and its write stalls (a paused process, a slow store).
    let stall = a.writes.gate.write().await;
    e.api.put(NAMESPACES, namespace("x", json!({})));
    until("a's write of x in flight", || {
        a.writes.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    // Meanwhile "x" goes away in Kubernetes and b takes the Lease over.
    e.api.while_dropped(|st| {
        assert!(st.delete(NAMESPACES, "", "x"));
    });
    let mut lease = e
        .api
        .get(LEASES, "kube-system", "trellis-kube-controller")
        .unwrap();
    let transitions = lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0);
    lease["spec"]["holderIdentity"] = json!("b");
    lease["spec"]["leaseTransitions"] = json!(transitions + 1);
    e.api.put(LEASES, lease);
    let b = e.controller("b").await;
    wait_leading(&b, true).await;
    wait_leading(&a, false).await;
    e.api.put(NAMESPACES, namespace("after", json!({})));
    e.wait_for(
        "b leading and synced",
        Kind::Namespace,
        None,
        "after",
        |r| r.is_some(),
    )
    .await;
    let committed = a.writes.writes.load(Ordering::SeqCst);
    let finished = a.writes.finished.load(Ordering::SeqCst);
    drop(stall);
    until("a's stalled write finished", || {
        a.writes.finished.load(Ordering::SeqCst) > finished
    })
    .await;
    assert_eq!(
        a.writes.writes.load(Ordering::SeqCst),
        committed,
        "the deposed leader's write landed while b led"
    );
    assert!(e.stored(Kind::Namespace, None, "x").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_stops_leading_and_leads_again_once_it_can() {
    let e = env().await;
    e.api
        .put(NAMESPACES, namespace("shop", json!({"team": "a"})));
    let a = e.controller("a").await;
    wait_leading(&a, true).await;
    e.wait_for("namespace", Kind::Namespace, None, "shop", |r| {
        label(r, "team").as_deref() == Some("a")
    })
    .await;
    let refused = Instant::now();
    e.api.refuse_writes(LEASES, true);
    wait_leading(&a, false).await;
    // Not before the renew deadline (1.4 s) of the last successful renewal (≤ 0.2 s before).
    assert!(
        refused.elapsed() >= Duration::from_millis(1100),
        "lost after {:?}",
        refused.elapsed()
    );
    e.api.refuse_writes(LEASES, false);
    wait_leading(&a, true).await;
    e.api
        .put(NAMESPACES, namespace("shop", json!({"team": "b"})));
    e.wait_for(
        "a change after leading again",
        Kind::Namespace,
        None,
        "shop",
        |r| label(r, "team").as_deref() == Some("b"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_labels_arrive_on_the_node_its_agent_registers() {
    let e = env().await;
    e.api.put(
        NODES,
        json!({"metadata": {"name": "n0", "labels": {"zone": "a"}}}),
    );
    e.api.put(
        NODES,
        json!({"metadata": {"name": "n1", "labels": {"zone": "a"}}}),
    );
    let n0 = parse_documents("apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: n0}\nspec: {addresses: [{address: 192.0.2.2/24}]}\n").unwrap();
    objects::apply(&*e.store, &n0[0], false).await.unwrap();
    let _c = e.controller("a").await;
    // n0 labelled shows the controller's node list (which holds n1 too) is in; n1's agent
    // registers only after that.
    e.wait_for("n0's labels", Kind::Node, None, "n0", |r| {
        label(r, "zone").as_deref() == Some("a")
    })
    .await;
    let agent = parse_documents("apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: n1, labels: {rack: r1}}\nspec: {addresses: [{address: 192.0.2.1/24}]}\n").unwrap();
    objects::apply(&*e.store, &agent[0], false).await.unwrap();
    e.wait_for("node labels", Kind::Node, None, "n1", |r| {
        label(r, "zone").as_deref() == Some("a")
    })
    .await;
    e.api.put(
        NODES,
        json!({"metadata": {"name": "n1", "labels": {"zone": "b"}}}),
    );
    e.wait_for("a node label change", Kind::Node, None, "n1", |r| {
        label(r, "zone").as_deref() == Some("b")
    })
    .await;
    e.api
        .put(NODES, json!({"metadata": {"name": "n1", "labels": {}}}));
    e.wait_for("a removed node label", Kind::Node, None, "n1", |r| {
        label(r, "zone").is_none()
    })
    .await;
    assert_eq!(
        label(e.stored(Kind::Node, None, "n1").await.as_ref(), "rack").as_deref(),
        Some("r1"),
        "the agent's own label stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_change_lists_only_its_namespaces_endpoints() {
    let e = env().await;
    for ns in ["shop", "other"] {
        e.api
            .put(PODS, pod(ns, "web-1", "n1", json!({"app": "web"})));
        endpoint(&*e.store, ns, "web-1", "n1", &format!("c-{ns}")).await;
    }
    let c = e.controller("a").await;
    for ns in ["shop", "other"] {
        let name = format!("n1.c-{ns}.eth0");
        e.wait_for("pod labels", Kind::WorkloadEndpoint, Some(ns), &name, |r| {
            label(r, "app").as_deref() == Some("web")
        })
        .await;
    }
    c.writes.lists.lock().unwrap().clear();
    e.api
        .put(PODS, pod("shop", "web-1", "n1", json!({"app": "api"})));
    e.wait_for(
        "a label change",
        Kind::WorkloadEndpoint,
        Some("shop"),
        "n1.c-shop.eth0",
        |r| label(r, "app").as_deref() == Some("api"),
    )
    .await;
    let lists = c.writes.lists.lock().unwrap().clone();
    let all = Kind::WorkloadEndpoint.prefix();
    assert!(lists.contains(&format!("{all}shop/")), "{lists:?}");
    assert!(
        !lists.contains(&all),
        "no listing of every endpoint: {lists:?}"
    );
    // (`other/` may still be listed once: the echo of the controller's own earlier write.)
}

/// A pod's record is stored as soon as the pod is listed — before any CNI ADD made its
/// endpoint — with its labels, node, service account, named ports and IPAM annotations; it
/// follows the pod's changes and goes with the pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_record_is_stored_before_its_endpoint_exists() {
    let e = env().await;
    let mut p = pod("shop", "db-0", "n1", json!({"app": "db"}));
    p["metadata"]["annotations"] = json!({
        "cni.projectcalico.org/ipv4pools": "[\"db-pool\"]",
        "cni.projectcalico.org/ipAddrs": "[\"10.0.0.7\"]"
    });
    e.api.put(PODS, p);
    let _c = e.controller("a").await;
    e.wait_for("the pod's record", Kind::Pod, Some("shop"), "db-0", |r| {
        label(r, "app").as_deref() == Some("db")
    })
    .await;
    let Some(Resource::Pod(rec)) = e.stored(Kind::Pod, Some("shop"), "db-0").await else {
        panic!()
    };
    assert_eq!(rec.spec.node_name.as_deref(), Some("n1"));
    assert_eq!(rec.spec.service_account_name.as_deref(), Some("web"));
    assert_eq!(rec.spec.ports[0].name, "http");
    assert_eq!(rec.spec.ipv4_pools, ["db-pool"]);
    assert_eq!(
        rec.spec.ip_addrs,
        ["10.0.0.7".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(trellis_kube::translate::owned(&Resource::Pod(rec)));
    e.api.put(
        PODS,
        pod("shop", "db-0", "n1", json!({"app": "db", "v": "2"})),
    );
    e.wait_for("a label change", Kind::Pod, Some("shop"), "db-0", |r| {
        label(r, "v").as_deref() == Some("2")
    })
    .await;
    assert!(e.api.delete(PODS, "shop", "db-0"));
    e.wait_for(
        "the record's deletion",
        Kind::Pod,
        Some("shop"),
        "db-0",
        |r| r.is_none(),
    )
    .await;
}

/// A ClusterNetworkPolicy as the API server holds it (no apiVersion: the server sets it).
fn cnp(name: &str, priority: i64) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"owner": "platform"}},
        "spec": {"tier": "Admin", "priority": priority,
                 "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
                 "ingress": [{"name": "deny-sandbox", "action": "Deny",
                              "from": [{"namespaces": {"matchLabels": {"env": "sandbox"}}}]}]}
    })
}

fn cnp_priority(r: Option<&Resource>) -> Option<i64> {
    match r {
        Some(Resource::ClusterNetworkPolicy(p)) => Some(p.spec.priority),
        _ => None,
    }
}

/// ClusterNetworkPolicies arrive, change and go; a bad one is skipped without holding up the
/// others; ones deleted and added while the watch was gone (410) are seen by relisting; an
/// operator's `trellis apply`d one of the same name is never replaced nor deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_network_policies_arrive_change_and_go() {
    let e = env().await;
    let operator = parse_documents(
        "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: operator}\nspec: {tier: Baseline, priority: 7, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}]}]}\n",
    )
    .unwrap();
    objects::apply(&*e.store, &operator[0], false)
        .await
        .unwrap();
    e.api.put(CLUSTER_NETWORK_POLICIES, cnp("operator", 1));
    e.api.put(CLUSTER_NETWORK_POLICIES, cnp("a", 10));
    e.api.put(CLUSTER_NETWORK_POLICIES, cnp("gone", 11));
    let mut bad = cnp("bad", 1001);
    bad["spec"]["priority"] = json!(1001);
    e.api.put(CLUSTER_NETWORK_POLICIES, bad);
    let _c = e.controller("a").await;
    let cnp_kind = Kind::ClusterNetworkPolicy;
    e.wait_for("a", cnp_kind, None, "a", |r| cnp_priority(r) == Some(10))
        .await;
    let Some(stored) = e.stored(cnp_kind, None, "a").await else {
        panic!()
    };
    let mut want = cnp("a", 10);
    want["apiVersion"] = json!("policy.networking.k8s.io/v1beta1");
    want["kind"] = json!("ClusterNetworkPolicy");
    want["metadata"]["annotations"] = json!({"trellis.dev/managed-by": "kube-controller"});
    want["metadata"]["uid"] =
        e.api.get(CLUSTER_NETWORK_POLICIES, "", "a").unwrap()["metadata"]["uid"].clone();
    assert_eq!(
        stored,
        Resource::from_value(&want).unwrap(),
        "stored as `trellis apply` stores the same document, marked as the controller's"
    );
    e.api.put(CLUSTER_NETWORK_POLICIES, cnp("a", 20));
    e.wait_for("a's change", cnp_kind, None, "a", |r| {
        cnp_priority(r) == Some(20)
    })
    .await;
    assert!(e.api.delete(CLUSTER_NETWORK_POLICIES, "", "a"));
    e.wait_for("a's deletion", cnp_kind, None, "a", |r| r.is_none())
        .await;
    assert!(e.stored(cnp_kind, None, "bad").await.is_none(), "skipped");
    // Deleted and added in a gap whose history is compacted: seen only by listing again.
    let lists = e.api.lists();
    e.api.gap(|st| {
        assert!(st.delete(CLUSTER_NETWORK_POLICIES, "", "gone"));
        st.put(CLUSTER_NETWORK_POLICIES, cnp("new", 12));
    });
    e.wait_for("the one added in the gap", cnp_kind, None, "new", |r| {
        cnp_priority(r) == Some(12)
    })
    .await;
    e.wait_for("the one deleted in the gap", cnp_kind, None, "gone", |r| {
        r.is_none()
    })
    .await;
    assert!(e.api.lists() > lists, "listed again after 410");
    assert!(e.api.delete(CLUSTER_NETWORK_POLICIES, "", "operator"));
    e.api.put(CLUSTER_NETWORK_POLICIES, cnp("after", 13));
    e.wait_for("a later one", cnp_kind, None, "after", |r| r.is_some())
        .await;
    assert_eq!(
        e.stored(cnp_kind, None, "operator").await.as_ref(),
        Some(&operator[0]),
        "the operator's policy is neither replaced nor deleted"
    );
}

/// A cluster whose CRD serves only `v1alpha2`: the controller finds it by discovery and
/// syncs that version; one serving neither syncs the other kinds meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_network_policies_of_the_version_the_cluster_serves() {
    let e = env().await;
    e.api.unserve(CLUSTER_NETWORK_POLICIES, true);
    e.api.unserve(CLUSTER_NETWORK_POLICIES_V1ALPHA2, true);
    e.api.put(CLUSTER_NETWORK_POLICIES_V1ALPHA2, cnp("old", 3));
    e.api.put(NAMESPACES, namespace("shop", json!({})));
    let _c = e.controller("a").await;
    e.wait_for(
        "namespaces without any CNP served",
        Kind::Namespace,
        None,
        "shop",
        |r| r.is_some(),
    )
    .await;
    assert!(e
        .stored(Kind::ClusterNetworkPolicy, None, "old")
        .await
        .is_none());
    e.api.unserve(CLUSTER_NETWORK_POLICIES_V1ALPHA2, false);
    // Asked again after DISCOVERY_RETRY.
    let start = Instant::now();
    while e
        .stored(Kind::ClusterNetworkPolicy, None, "old")
        .await
        .is_none()
    {
        assert!(
            start.elapsed() < DEADLINE + trellis_kube::cnp::DISCOVERY_RETRY,
            "the v1alpha2 policy was never synced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        cnp_priority(
            e.stored(Kind::ClusterNetworkPolicy, None, "old")
                .await
                .as_ref()
        ),
        Some(3)
    );
    assert!(
        e.api
            .seen()
            .iter()
            .any(|r| r.verb == "watch" && r.resource == "clusternetworkpolicies"),
        "watched"
    );
}
