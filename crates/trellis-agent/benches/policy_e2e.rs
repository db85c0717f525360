//! The agent's policy path end to end, figures and ratios in one run (as root): 2 000 policies
//! × 2 000 endpoints (20 namespaces × 100 pods, 5 of each on this node; the model of
//! `trellis-policy`'s bench, as stored resources), followed by the agent's view and applied by
//! its applier into a test namespace's `inet trellis_policy`. Measured: one pod's label change
//! from the datastore write to the kernel holding it (the applier's `newest_revision` reaching
//! the write's, which it sets after nft returned), for a remote and a local pod, on
//! SQLite and on etcd; beside it, in the same run, `nft` applying an empty batch against that
//! table (nft's own start and cache fetch, the floor of any change). Target: ≤ 10 ms.
//!
//! Run: `cargo bench -p trellis-agent --bench policy_e2e` (root).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_agent::policy::{self, ElementPath, Kernel, PolicyError, Status};
use trellis_agent::view::{self, SharedView};
use trellis_cluster::objects;
use trellis_dataplane::{nft, Netns};
use trellis_policy::compile::elements::SetKeys;
use trellis_resources::{parse_documents, Resource};
use trellis_store::{Datastore, TxnOp, TxnOutcome};
use trellis_testutil::{temp_dir, EtcdServer, TestNetns};

const NODE: &str = "n1";
const NAMESPACES: usize = 20;
const PODS_PER_NS: usize = 100;
const LOCAL_PER_NS: usize = 5;
const POLICIES_PER_NS: usize = 100;
const ROUNDS: usize = 30;

/// The agent's kernel paths, run in the test namespace (the element socket opens there on
/// first use and stays there).
struct InNetns(Netns, ElementPath);

impl Kernel for InNetns {
    fn apply(&self, doc: &Value) -> Result<(), PolicyError> {
        Ok(self.0.run(|| nft::apply_document(doc)).unwrap()?)
    }
    fn apply_elements(&self, keys: &[SetKeys]) -> Result<(), PolicyError> {
        self.0.run(|| self.1.apply(keys)).unwrap()
    }
    fn list(&self) -> Result<Option<Value>, PolicyError> {
        Ok(self
            .0
            .run(|| nft::list_table_numeric("inet", "trellis_policy"))
            .unwrap()?)
    }
    fn generation(&self) -> Result<Option<u32>, PolicyError> {
        self.0.run(|| self.1.generation()).unwrap()
    }
}

fn wep(n: usize, j: usize, app: usize) -> String {
    let node = if j < LOCAL_PER_NS { NODE } else { "remote" };
    format!(
        "apiVersion: trellis.dev/v1\nkind: WorkloadEndpoint\nmetadata: {{name: p{j}, namespace: ns{n}, labels: {{app: app{app}, role: r{}}}}}\n\
         spec: {{node: {node}, pod: p{j}, interfaceName: trl{n:03}x{j:03}, ipNetworks: [10.{}.{}.{}/32]}}\n---\n",
        j % LOCAL_PER_NS,
        1 + n,
        j / 200,
        1 + j % 200
    )
}

fn policy(n: usize, i: usize) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: ns{n}}}\n\
         spec:\n  order: {i}\n  selector: \"role == 'r{}'\"\n  types: [Ingress, Egress]\n  ingress:\n\
         \x20 - {{action: Allow, protocol: TCP, source: {{selector: \"app == 'app{}'\"}}, destination: {{ports: [80]}}}}\n\
         \x20 - {{action: Allow, protocol: TCP, source: {{namespaceSelector: \"team == 't{}'\"}}, destination: {{ports: [8080]}}}}\n\
         \x20 - {{action: Deny, source: {{nets: [10.{}.0.0/16]}}}}\n  egress:\n\
         \x20 - {{action: Allow, protocol: TCP, destination: {{selector: \"app == 'app{}'\", ports: [5432]}}}}\n\
         \x20 - {{action: Allow, protocol: UDP, destination: {{nets: [10.96.0.10/32], ports: [53]}}}}\n---\n",
        i % LOCAL_PER_NS,
        i % 50,
        (n + 1 + i % 3) % NAMESPACES,
        200 + i % 50,
        (i + 7) % 50
    )
}

fn world() -> Vec<Resource> {
    let mut yaml = String::new();
    for n in 0..NAMESPACES {
        yaml += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{team: t{n}}}}}\n---\n"
        );
        for j in 0..PODS_PER_NS {
            yaml += &wep(n, j, j % 50);
        }
        for i in 0..POLICIES_PER_NS {
            yaml += &policy(n, i);
        }
    }
    parse_documents(&yaml).unwrap()
}

async fn put(store: &dyn Datastore, rs: &[Resource]) -> i64 {
    let ops = rs
        .iter()
        .map(|r| TxnOp::Put(r.key(), objects::encode(r)))
        .collect();
    match store.txn(vec![], ops).await.unwrap() {
        TxnOutcome::Committed { revision } => revision,
        TxnOutcome::Conflict => unreachable!("no preconditions"),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn pct(mut v: Vec<Duration>, p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// Waits (spinning, bounded) until the kernel holds the object written at `revision`.
async fn programmed(status: &Status, revision: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while status.newest_revision.load(Ordering::Acquire) < revision {
        assert!(
            Instant::now() < deadline,
            "revision {revision} never programmed"
        );
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

async fn run(label: &str, store: Arc<dyn Datastore>, ns: &TestNetns) {
    let all = world();
    let mut last = 0;
    // etcd takes at most 128 operations per transaction.
    for chunk in all.chunks(100) {
        last = put(&*store, chunk).await;
    }
    let shared = SharedView::new();
    view::load(&*store, &shared).await.unwrap();
    let status = Arc::new(Status::default());
    let kernel: Arc<InNetns> = Arc::new(InNetns(
        Netns::open(ns.path()).unwrap(),
        ElementPath::default(),
    ));
    let follower = tokio::spawn(view::follow(store.clone(), shared.clone()));
    let t = Instant::now();
    let applier = tokio::spawn(policy::run(
        NODE.into(),
        shared.clone(),
        status.clone(),
        kernel.clone(),
        policy::Settings {
            resync: Duration::from_secs(3600),
            flow_log_group: None,
        },
    ));
    programmed(&status, last).await;
    println!(
        "{label}: startup (view loaded → whole table in the kernel): {}",
        ms(t.elapsed())
    );
    for (what, n, j) in [("remote", 3, 50), ("local", 3, 1)] {
        let (mut took, mut seen) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let r = parse_documents(&wep(n, j, if round % 2 == 0 { 13 } else { j % 50 })).unwrap();
            let key = r[0].key();
            let t = Instant::now();
            let rev = put(&*store, &r).await;
            let deadline = Instant::now() + Duration::from_secs(60);
            // When the view holds the write, then when the kernel does.
            let mut in_view = None;
            while status.newest_revision.load(Ordering::Acquire) < rev {
                assert!(Instant::now() < deadline, "revision {rev} never programmed");
                if in_view.is_none() && shared.read().get(&key).is_some_and(|s| s.revision >= rev) {
                    in_view = Some(t.elapsed());
                }
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
            took.push(t.elapsed());
            seen.push(in_view.unwrap_or_else(|| t.elapsed()));
        }
        println!(
            "{label}: one {what} pod's label change, write → kernel: median {}, p90 {} (write → agent's view: median {}; {ROUNDS} changes; target ≤ 10 ms)",
            ms(pct(took.clone(), 50)),
            ms(pct(took, 90)),
            ms(pct(seen, 50)),
        );
    }
    let mut empty = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        kernel.apply(&serde_json::json!({"nftables": []})).unwrap();
        empty.push(t.elapsed());
    }
    println!(
        "{label}: reference, nft applying an empty batch to this table: median {}",
        ms(pct(empty, 50))
    );
    let listing = kernel.list().unwrap();
    // nft adding and removing one element of one selector set: what a remote pod's label
    // change costs in nft alone.
    let set = listing
        .as_ref()
        .and_then(|l| l["nftables"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("set"))
        .find(|s| s["type"] == "ipv4_addr" && s.get("flags").is_none())
        .map(|s| s["name"].as_str().unwrap().to_string());
    if let Some(set) = set {
        let elem = |op: &str| {
            serde_json::json!({op: {"element": {"family": "inet", "table": "trellis_policy",
                "name": set, "elem": ["10.250.0.1"]}}})
        };
        let mut one = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            kernel
                .apply(&serde_json::json!({"nftables": [elem("add"), elem("delete")]}))
                .unwrap();
            one.push(t.elapsed());
        }
        println!(
            "{label}: reference, nft adding and deleting one set element in this table: median {}",
            ms(pct(one, 50))
        );
    }
    follower.abort();
    applier.abort();
    assert!(listing.is_some(), "the table is in the kernel");
}

fn main() {
    if !nix_is_root() {
        println!("policy_e2e: needs root (a test namespace holds the table); skipped");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = temp_dir("polbench");
        let spec = format!("sqlite:{}", dir.path().join("store.db").display());
        let ns = TestNetns::new("polbench");
        run("sqlite", trellis_store::open(&spec).await.unwrap(), &ns).await;
        let etcd = EtcdServer::start();
        let ns = TestNetns::new("polbenche");
        let store = trellis_store::open(&format!("etcd:{}", etcd.endpoint))
            .await
            .unwrap();
        run("etcd", store, &ns).await;
    });
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
