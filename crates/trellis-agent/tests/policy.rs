//! The policy applier against the real kernel, inside a test namespace (never the root one):
//! a datastore (SQLite in a temp dir) followed by the agent's view, the applier programming
//! `inet trellis_policy` in the namespace. Checks that the kernel's table is always
//! `compile(translate(datastore))` after each change, that a change is one small transaction
//! (not a reload), that a rule deleted by hand comes back (drift repair, counted), that a
//! restarted applier adopts the table with a single replacing transaction, and that a record
//! that does not translate is reported without stopping anything. Needs root.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_agent::policy::{self, ElementPath, Kernel, PolicyError, Status};
use trellis_agent::view::{self, SharedView};
use trellis_cluster::objects;
use trellis_dataplane::{nft, Netns};
use trellis_policy::compile::elements::SetKeys;
use trellis_policy::compile::{compile, drift, Ruleset};
use trellis_policy::translate::translate;
use trellis_resources::{parse_documents, Kind, Resource};
use trellis_store::{Datastore, TxnOp};
use trellis_testutil::{temp_dir, TestNetns};

const NODE: &str = "n1";
const LIMIT: Duration = Duration::from_secs(20);

/// nft inside the test namespace, recording every batch it applies.
struct InNetns {
    ns: Netns,
    /// Every batch, as nft JSON or (element-only, sent over netlink) `{"elements": [...]}`.
    batches: Mutex<Vec<Value>>,
    elements: ElementPath,
    /// Listings and generation reads asked for (by the applier or the test).
    lists: AtomicUsize,
    generations: AtomicUsize,
}

impl Kernel for InNetns {
    fn apply(&self, doc: &Value) -> Result<(), PolicyError> {
        self.batches.lock().unwrap().push(doc.clone());
        Ok(self.ns.run(|| nft::apply_document(doc)).unwrap()?)
    }

    fn apply_elements(&self, keys: &[SetKeys]) -> Result<(), PolicyError> {
        let listed: Vec<Value> = keys
            .iter()
            .map(|k| serde_json::json!({"add": k.add, "set": k.set, "keys": k.keys.len()}))
            .collect();
        self.batches
            .lock()
            .unwrap()
            .push(serde_json::json!({ "elements": listed }));
        // The socket opens in the namespace on first use and stays there.
        self.ns.run(|| self.elements.apply(keys)).unwrap()
    }

    fn list(&self) -> Result<Option<Value>, PolicyError> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        Ok(self
            .ns
            .run(|| nft::list_table_numeric("inet", "trellis_policy"))
            .unwrap()?)
    }

    fn generation(&self) -> Result<Option<u32>, PolicyError> {
        self.generations.fetch_add(1, Ordering::Relaxed);
        self.ns.run(|| self.elements.generation()).unwrap()
    }
}

fn docs(yaml: &str) -> Vec<Resource> {
    parse_documents(yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn wep(name: &str, node: &str, ip: &str, labels: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1\nkind: WorkloadEndpoint\nmetadata: {{name: {name}, namespace: x, labels: {{{labels}}}}}\n\
         spec: {{node: {node}, pod: {name}, interfaceName: trl{name}, ipNetworks: [{ip}/32]}}\n---\n"
    )
}

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: x}\n\
spec: {podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {matchLabels: {role: web}}}]}]}\n";

/// The test's world: a namespace, a store, a view and an applier.
/// The invalid-records tracker is per process and every listing resets its kinds, so the
/// tests of this binary (each lists its own store) run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct World {
    _serial: std::sync::MutexGuard<'static, ()>,
    _dir: tempfile::TempDir,
    _ns: TestNetns,
    store: Arc<dyn Datastore>,
    view: Arc<SharedView>,
    status: Arc<Status>,
    kernel: Arc<InNetns>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl World {
    async fn new(tag: &str) -> World {
        let dir = temp_dir(tag);
        let spec = format!("sqlite:{}", dir.path().join("store.db").display());
        World::on(tag, &spec, dir).await
    }

    async fn on(tag: &str, spec: &str, dir: tempfile::TempDir) -> World {
        let store = trellis_store::open(spec).await.unwrap();
        let ns = TestNetns::new(tag);
        let kernel = Arc::new(InNetns {
            ns: Netns::open(ns.path()).unwrap(),
            batches: Mutex::new(Vec::new()),
            elements: ElementPath::default(),
            lists: AtomicUsize::new(0),
            generations: AtomicUsize::new(0),
        });
        World {
            _serial: ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()),
            _dir: dir,
            _ns: ns,
            store,
            view: SharedView::new(),
            status: Arc::new(Status::default()),
            kernel,
            tasks: Vec::new(),
        }
    }

    async fn start(&mut self) {
        view::load(&*self.store, &self.view).await.unwrap();
        self.tasks.push(tokio::spawn(view::follow(
            self.store.clone(),
            self.view.clone(),
        )));
        self.start_applier();
    }

    fn start_applier(&mut self) {
        self.tasks.push(tokio::spawn(policy::run(
            NODE.into(),
            self.view.clone(),
            self.status.clone(),
            self.kernel.clone(),
            Duration::from_millis(200),
        )));
    }

    async fn apply(&self, yaml: &str) {
        for r in docs(yaml) {
            objects::apply(&*self.store, &r, false).await.unwrap();
        }
    }

    /// What the table must be: the compiler's output for everything stored.
    async fn expected(&self) -> Ruleset {
        let mut all = Vec::new();
        for kind in view::POLICY_KINDS {
            all.extend(
                objects::list(&*self.store, kind)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|s| s.resource),
            );
        }
        compile(&translate(&all).model, NODE)
    }

    fn differences(&self, want: &Ruleset) -> Vec<String> {
        drift::differences(self.kernel.list().unwrap().as_ref(), want)
    }

    /// Waits until the kernel holds what the store says and the applier reports the store's
    /// revision as synced.
    async fn converged(&self, what: &str) {
        let want = self.expected().await;
        let revision = self.store.revision().await.unwrap();
        let deadline = Instant::now() + LIMIT;
        loop {
            let synced = self.status.synced_revision.load(Ordering::Acquire);
            let diff = self.differences(&want);
            if synced >= revision && diff.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not converged within {LIMIT:?} (synced {synced}, store {revision}):\n{}",
                diff.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn batches(&self) -> Vec<Value> {
        self.kernel.batches.lock().unwrap().clone()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Whether a batch replaces the whole table (`add table; delete table; add table`).
fn is_replace(batch: &Value) -> bool {
    let cmds = batch["nftables"].as_array().unwrap();
    cmds.len() >= 3
        && cmds[1]
            .get("delete")
            .is_some_and(|d| d.get("table").is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_follows_the_datastore_change_by_change() {
    trellis_testutil::require_root();
    let mut w = World::new("polapl").await;
    let mut yaml = String::new();
    yaml += &wep("a", NODE, "10.0.0.1", "app: db");
    yaml += &wep("b", NODE, "10.0.0.2", "role: web");
    yaml += &wep("c", "n2", "10.0.1.3", "role: other");
    yaml += POLICY;
    w.apply(&yaml).await;
    w.start().await;
    w.converged("startup").await;
    assert!(w.status.enforced.load(Ordering::Acquire));
    assert_eq!(w.batches().len(), 1, "startup is one transaction");
    assert!(is_replace(&w.batches()[0]));

    // A remote pod's label change: one small batch of set elements.
    w.apply(&wep("c", "n2", "10.0.1.3", "role: web")).await;
    w.converged("remote relabel").await;
    let batches = w.batches();
    assert_eq!(batches.len(), 2, "one transaction for the change");
    assert!(
        batches[1].get("elements").is_some(),
        "a relabel changes set elements only, sent without nft: {}",
        batches[1]
    );

    // The policy goes: the pod is open again.
    objects::delete(&*w.store, Kind::KubernetesNetworkPolicy, Some("x"), "web")
        .await
        .unwrap();
    w.converged("policy deleted").await;
    assert!(!is_replace(w.batches().last().unwrap()));

    // A policy in a tier that does not exist (written around the validating edge, as a tier
    // deleted behind the store's back leaves it) is left out and reported; nothing stops.
    let orphan = docs(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: orphan}\n\
         spec: {tier: missing, selector: all(), types: [Ingress]}\n",
    )
    .remove(0);
    let put = TxnOp::Put(orphan.key(), objects::encode(&orphan));
    w.store.txn(vec![], vec![put]).await.unwrap();
    w.apply(&wep("b", NODE, "10.0.0.2", "role: web, extra: '1'"))
        .await;
    w.converged("after an untranslatable record").await;
    let deadline = Instant::now() + LIMIT;
    while trellis_cluster::invalid::counts().get(&Kind::GlobalNetworkPolicy) != Some(&1) {
        assert!(
            Instant::now() < deadline,
            "the orphan policy was not reported: invalid records {:?}",
            trellis_cluster::invalid::counts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The resync reads the rules' counters, and a rule deleted by hand in the node's namespace comes
/// back on the next resync, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_deleted_by_hand_comes_back() {
    trellis_testutil::require_root();
    let mut w = World::new("poldrift").await;
    w.apply(&(wep("a", NODE, "10.0.0.1", "app: db") + POLICY))
        .await;
    w.start().await;
    w.converged("startup").await;
    // The resync reads the per-rule counters (the metrics' source) from the same listing.
    let deadline = Instant::now() + LIMIT;
    while !w
        .status
        .counters
        .lock()
        .unwrap()
        .contains_key("knp/x/web/in/0")
    {
        assert!(Instant::now() < deadline, "the rule's counter was not read");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = w.status.drift_repairs.get();
    let listing = w.kernel.list().unwrap().unwrap();
    let handle = nft::rules(&listing)
        .into_iter()
        .find(|(chain, _, _)| chain == "forward")
        .map(|(_, h, _)| h)
        .expect("a forward rule");
    w._ns.exec_ok(&[
        "nft",
        "delete",
        "rule",
        "inet",
        "trellis_policy",
        "forward",
        "handle",
        &handle.to_string(),
    ]);
    assert!(
        !w.differences(&w.expected().await).is_empty(),
        "the deletion took"
    );
    let deadline = Instant::now() + LIMIT;
    while w.status.drift_repairs.get() == before || !w.differences(&w.expected().await).is_empty() {
        assert!(Instant::now() < deadline, "the rule did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// At rest the resync reads the nf_tables generation and lists the table only when it moved (or
/// for the counters, every tenth tick): a change anywhere in nf_tables — even another table's —
/// makes the next tick list and compare again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_table_is_not_listed_at_rest() {
    trellis_testutil::require_root();
    let mut w = World::new("polrest").await;
    w.apply(&(wep("a", NODE, "10.0.0.1", "app: db") + POLICY))
        .await;
    w.start().await;
    w.converged("startup").await;
    let k = w.kernel.clone();
    let ticks = |n: usize| {
        let k = k.clone();
        async move {
            let from = k.generations.load(Ordering::Relaxed);
            let deadline = Instant::now() + LIMIT;
            while k.generations.load(Ordering::Relaxed) < from + n {
                assert!(Instant::now() < deadline, "the resync stopped ticking");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    ticks(2).await; // the first tick after the last change lists, and verifies
    let lists = w.kernel.lists.load(Ordering::Relaxed);
    ticks(5).await;
    let at_rest = w.kernel.lists.load(Ordering::Relaxed) - lists;
    assert!(at_rest <= 1, "{at_rest} listings in 5 quiet resyncs");
    // Another table's change moves the generation: the next tick lists again.
    w._ns.exec_ok(&["nft", "add", "table", "ip", "itest_other"]);
    let lists = w.kernel.lists.load(Ordering::Relaxed);
    ticks(2).await;
    assert!(
        w.kernel.lists.load(Ordering::Relaxed) > lists,
        "a moved generation was not listed"
    );
}

/// Waits until the applier has read the generation `n` more times (resync ticks).
async fn resyncs(kernel: &InNetns, n: usize) {
    let from = kernel.generations.load(Ordering::Relaxed);
    let deadline = Instant::now() + LIMIT;
    while kernel.generations.load(Ordering::Relaxed) < from + n {
        assert!(Instant::now() < deadline, "the resync stopped ticking");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A table can leave nf_tables without moving the generation: one created with `flags owner`
/// goes with its creator's netlink socket (`nft_rcv_nl_event`, no commit). Another tool that
/// swaps Trellis's table for an owned copy (same contents: the resync verifies it) and then exits
/// takes all policy away while the generation stands where the resync verified it; the next
/// resync must still find the table gone and put it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_its_owner_took_away_comes_back_at_the_next_resync() {
    trellis_testutil::require_root();
    let mut w = World::new("polowner").await;
    w.apply(&(wep("a", NODE, "10.0.0.1", "app: db") + POLICY))
        .await;
    w.start().await;
    w.converged("startup").await;
    let list = ["nft", "list", "table", "inet", "trellis_policy"];
    let owned = w._ns.exec_ok(&list).replacen(
        "table inet trellis_policy {",
        "table inet trellis_policy {\n\tflags owner",
        1,
    );
    let file = w._dir.path().join("owned.nft");
    std::fs::write(&file, format!("delete table inet trellis_policy\n{owned}")).unwrap();
    // `nft -i` keeps its socket (the owner) open until its input ends.
    struct Owner(std::process::Child);
    impl Drop for Owner {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut owner = Owner(
        w._ns
            .command("nft")
            .arg("-i")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut input = owner.0.stdin.take().unwrap();
    use std::io::Write as _;
    writeln!(input, "include \"{}\"", file.display()).unwrap();
    let deadline = Instant::now() + LIMIT;
    while !w._ns.exec_ok(&list).contains("flags owner") {
        assert!(Instant::now() < deadline, "the owned copy did not land");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The resync lists the owned copy (the generation moved) and finds nothing to repair.
    let repairs = w.status.drift_repairs.get();
    resyncs(&w.kernel, 2).await;
    assert_eq!(w.status.drift_repairs.get(), repairs, "the copy differed");
    assert!(w._ns.exec_ok(&list).contains("flags owner"));
    // The owner exits: its table goes with its socket, the generation stays.
    drop(input);
    let status = owner.0.wait().unwrap();
    assert!(status.success(), "nft -i: {status}");
    let from = w.kernel.generations.load(Ordering::Relaxed);
    let deadline = Instant::now() + LIMIT;
    while w.status.drift_repairs.get() == repairs {
        let ticks = w.kernel.generations.load(Ordering::Relaxed) - from;
        assert!(
            ticks < 3 && Instant::now() < deadline,
            "the table was still gone after {ticks} resyncs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.converged("after the owner left").await;
}

/// A policy the translation leaves out counts as an invalid record exactly while it is left out,
/// whatever the decoder says meanwhile: replaced by an undecodable value it is still one record
/// (now the decoder's), deleted none; an orphan whose tier comes is taken back, and reported
/// again when the tier goes. Counted from what earlier tests of this binary left (the tracker is
/// per process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untranslatable_policy_is_reported_exactly_while_it_is_left_out() {
    trellis_testutil::require_root();
    let mut w = World::new("polreport").await;
    w.apply(&(wep("a", NODE, "10.0.0.1", "app: db") + POLICY))
        .await;
    w.start().await;
    w.converged("startup").await;
    let gnp = || {
        trellis_cluster::invalid::counts()
            .get(&Kind::GlobalNetworkPolicy)
            .copied()
            .unwrap_or(0)
    };
    let base = gnp();
    let orphan = |name: &str, tier: &str| {
        docs(&format!(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\n\
             spec: {{tier: {tier}, selector: all(), types: [Ingress]}}\n"
        ))
        .remove(0)
    };
    let put = |r: &Resource| TxnOp::Put(r.key(), objects::encode(r));
    let one = orphan("report-one", "missing-one");
    w.store.txn(vec![], vec![put(&one)]).await.unwrap();
    w.converged("an orphan").await;
    assert_eq!(gnp(), base + 1, "the orphan is reported");
    let garbage = TxnOp::Put(one.key(), b"{not a policy".to_vec());
    w.store.txn(vec![], vec![garbage]).await.unwrap();
    w.converged("the orphan undecodable").await;
    assert_eq!(gnp(), base + 1, "undecodable: one record");
    w.store
        .txn(vec![], vec![TxnOp::Delete(one.key())])
        .await
        .unwrap();
    w.converged("the orphan deleted").await;
    assert_eq!(gnp(), base, "deleted: nothing reported");

    let two = orphan("report-two", "missing-two");
    w.store.txn(vec![], vec![put(&two)]).await.unwrap();
    w.converged("another orphan").await;
    assert_eq!(gnp(), base + 1);
    let tier = "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: missing-two}\nspec: {order: 100}\n";
    w.apply(tier).await;
    w.converged("its tier came").await;
    assert_eq!(gnp(), base, "taken back when its tier came");
    // Around the validating edge (which refuses to delete a tier in use), as a restore might.
    let tier_key = docs(tier).remove(0).key();
    w.store
        .txn(vec![], vec![TxnOp::Delete(tier_key)])
        .await
        .unwrap();
    w.converged("its tier went").await;
    assert_eq!(gnp(), base + 1, "left out again when its tier went");
    w.store
        .txn(vec![], vec![TxnOp::Delete(two.key())])
        .await
        .unwrap();
    w.converged("the second orphan deleted").await;
    assert_eq!(gnp(), base);
}

/// A restarted applier finds the previous one's table (with a stray rule) and replaces it in
/// one transaction: the table is never deleted on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_applier_adopts_the_table_in_one_transaction() {
    trellis_testutil::require_root();
    let mut w = World::new("poladopt").await;
    w.apply(&(wep("a", NODE, "10.0.0.1", "app: db") + POLICY))
        .await;
    w.start().await;
    w.converged("first applier").await;
    w.tasks.pop().unwrap().abort();
    w._ns.exec_ok(&[
        "nft",
        "add",
        "rule",
        "inet",
        "trellis_policy",
        "forward",
        "accept",
    ]);
    w.kernel.batches.lock().unwrap().clear();
    w.status = Arc::new(Status::default());
    w.start_applier();
    w.converged("second applier").await;
    let batches = w.batches();
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert!(is_replace(&batches[0]));
}

/// With the datastore gone (etcd stopped) the table stays and is still repaired from the
/// view's last state; once etcd is back, changes flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforcement_survives_an_unreachable_datastore() {
    trellis_testutil::require_root();
    let mut etcd = trellis_testutil::EtcdServer::start();
    let spec = format!("etcd:{}", etcd.endpoint);
    let mut w = World::on("poletcd", &spec, temp_dir("poletcd")).await;
    w.apply(&(wep("a", NODE, "10.0.0.1", "app: db") + POLICY))
        .await;
    w.start().await;
    w.converged("startup").await;
    let want = w.expected().await;
    etcd.stop();
    // The watch broke and a listing failed: the view has met the outage.
    let deadline = Instant::now() + LIMIT;
    while w.view.failures.load(Ordering::Relaxed) < 2 {
        assert!(
            Instant::now() < deadline,
            "the view did not notice etcd stopping"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = w.status.drift_repairs.get();
    let listing = w.kernel.list().unwrap().unwrap();
    let (_, handle, _) = nft::rules(&listing)
        .into_iter()
        .find(|(chain, _, _)| chain == "forward")
        .expect("a forward rule");
    w._ns.exec_ok(&[
        "nft",
        "delete",
        "rule",
        "inet",
        "trellis_policy",
        "forward",
        "handle",
        &handle.to_string(),
    ]);
    let deadline = Instant::now() + LIMIT;
    while w.status.drift_repairs.get() == before || !w.differences(&want).is_empty() {
        assert!(Instant::now() < deadline, "not repaired while etcd is down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(w.status.enforced.load(Ordering::Acquire));
    etcd.restart();
    w.apply(&wep("b", NODE, "10.0.0.2", "role: web")).await;
    w.converged("after etcd came back").await;
}

/// A pod allocated by the node's own IPAM is programmed from the allocator's write, not from
/// the watch: here nothing follows the datastore after the first listing, yet the new pod's
/// interface is confirmed programmed (the agent's `endpointReady`) and its chains are in the
/// kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_own_allocation_is_programmed_without_the_watch() {
    use trellis_cluster::ipam::{NodeIpam, Request};
    trellis_testutil::require_root();
    let mut w = World::new("polown").await;
    w.apply(&format!(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: pool}}\n\
         spec: {{cidr: 10.81.0.0/16, blockSize: 26}}\n---\n\
         apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {{name: {NODE}}}\nspec: {{}}\n---\n{POLICY}"
    ))
    .await;
    view::load(&*w.store, &w.view).await.unwrap();
    w.start_applier();
    let ipam =
        NodeIpam::new(w.store.clone(), NODE, Default::default()).with_observer(w.view.clone());
    let req = Request {
        network: "k8s".into(),
        container_id: "c0ffee".into(),
        ifname: "eth0".into(),
        namespace: Some("x".into()),
        pod: Some("p".into()),
        pod_uid: None,
        host_interface: Some("trlown0".into()),
        requested_ips: vec![],
        ipv4_pools: vec![],
        ipv6_pools: vec![],
        no_endpoint: false,
    };
    ipam.allocate(&req).await.unwrap();
    w.status
        .wait_programmed("trlown0", LIMIT)
        .await
        .expect("programmed from the own write");
    let table = w.kernel.list().unwrap().expect("a table");
    assert!(
        table.to_string().contains("trlown0"),
        "the pod's interface is in the kernel's maps"
    );
}
