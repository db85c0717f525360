//! All-or-nothing writes of several documents (`objects::apply_all`) on both datastores: every
//! refused input leaves the store exactly as it was, and a writer racing between validation and
//! commit makes the transaction conflict, so validation runs again on what it wrote.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trellis_cluster::objects::{self, Applied};
use trellis_cluster::ClusterError;
use trellis_resources::{parse_documents, Resource};
use trellis_store::{
    Datastore, KeyValue, Listing, Precondition, Result as StoreResult, TxnOp, TxnOutcome, Watch,
};
use trellis_testutil::{temp_dir, EtcdServer};

#[allow(dead_code)]
enum Backing {
    Sqlite(tempfile::TempDir),
    Etcd(EtcdServer),
}

async fn sqlite() -> (Arc<dyn Datastore>, Backing) {
    let dir = temp_dir("apply");
    let s = trellis_store::open(&format!("sqlite:{}", dir.path().join("a.db").display()))
        .await
        .unwrap();
    (s, Backing::Sqlite(dir))
}

async fn etcd() -> (Arc<dyn Datastore>, Backing) {
    let server = EtcdServer::start();
    for _ in 0..100 {
        if let Ok(s) = trellis_store::open(&format!("etcd:{}", server.endpoint)).await {
            return (s, Backing::Etcd(server));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd did not answer");
}

/// A datastore that, just before the first transaction it is asked to commit, commits another
/// writer's change: the race lands exactly between `apply_all`'s reads and its commit.
struct Racing {
    inner: Arc<dyn Datastore>,
    race: Mutex<Option<Vec<TxnOp>>>,
    txns: AtomicUsize,
}

#[async_trait::async_trait]
impl Datastore for Racing {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> StoreResult<Listing> {
        self.inner.list(prefix).await
    }
    async fn txn(&self, pre: Vec<Precondition>, ops: Vec<TxnOp>) -> StoreResult<TxnOutcome> {
        self.txns.fetch_add(1, Ordering::SeqCst);
        let race = self.race.lock().unwrap().take();
        if let Some(race) = race {
            let out = self.inner.txn(vec![], race).await?;
            assert!(matches!(out, TxnOutcome::Committed { .. }));
        }
        self.inner.txn(pre, ops).await
    }
    async fn watch(&self, prefix: &str, from: i64) -> StoreResult<Watch> {
        self.inner.watch(prefix, from).await
    }
    async fn compact(&self, revision: i64) -> StoreResult<()> {
        self.inner.compact(revision).await
    }
    async fn revision(&self) -> StoreResult<i64> {
        self.inner.revision().await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn pool(name: &str, cidr: &str, extra: &str) -> String {
    format!("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  cidr: {cidr}\n{extra}---\n")
}

fn node(name: &str) -> String {
    format!("apiVersion: trellis.dev/v1\nkind: Node\nmetadata:\n  name: {name}\nspec: {{}}\n---\n")
}

fn docs(yaml: &str) -> Vec<Resource> {
    parse_documents(yaml).unwrap()
}

/// Everything stored, byte for byte, and the store's revision.
async fn snapshot(s: &dyn Datastore) -> (Vec<KeyValue>, i64) {
    let l = s.list("").await.unwrap();
    (l.items, s.revision().await.unwrap())
}

fn invalid(e: ClusterError) -> trellis_resources::ResourceError {
    match e {
        ClusterError::Invalid(e) => e,
        other => panic!("expected an invalid document, got {other}"),
    }
}

async fn refused_inputs_change_nothing(s: Arc<dyn Datastore>) {
    let s = &*s;
    let applied = objects::apply_all(
        s,
        &docs(&format!("{}{}", pool("p", "10.80.0.0/16", ""), node("n1"))),
        false,
    )
    .await
    .unwrap();
    assert_eq!(applied, vec![Applied::Created, Applied::Created]);
    let before = snapshot(s).await;
    let cases = [
        // The file: a, b, then a again with another CIDR.
        (
            format!(
                "{}{}{}",
                pool("a", "10.81.0.0/16", ""),
                pool("b", "10.82.0.0/16", ""),
                pool("a", "10.83.0.0/16", "")
            ),
            false,
            3,
            "metadata.name",
            "also document 1",
        ),
        // The third document changes a stored pool's CIDR, or its block size.
        (
            format!(
                "{}{}{}",
                pool("a", "10.81.0.0/16", ""),
                node("n2"),
                pool("p", "10.80.0.0/15", "")
            ),
            false,
            3,
            "spec.cidr",
            "cannot change",
        ),
        (
            format!(
                "{}{}{}",
                pool("a", "10.81.0.0/16", ""),
                node("n2"),
                pool("p", "10.80.0.0/16", "  blockSize: 24\n")
            ),
            false,
            3,
            "spec.blockSize",
            "cannot change",
        ),
        // Overlap with a stored pool, and between the input's pools.
        (
            format!("{}{}", node("n2"), pool("a", "10.80.64.0/18", "")),
            false,
            2,
            "spec.cidr",
            "overlaps pool p",
        ),
        (
            format!(
                "{}{}",
                pool("a", "10.84.0.0/16", ""),
                pool("b", "10.84.128.0/17", "")
            ),
            false,
            2,
            "spec.cidr",
            "overlaps pool a",
        ),
        // create on an existing object, after new ones.
        (
            format!("{}{}", node("n2"), node("n1")),
            true,
            2,
            "metadata.name",
            "already exists",
        ),
    ];
    for (yaml, create_only, doc, field, why) in cases {
        let e = invalid(
            objects::apply_all(s, &docs(&yaml), create_only)
                .await
                .unwrap_err(),
        );
        assert_eq!((e.doc, e.field.as_str()), (Some(doc), field), "{e}\n{yaml}");
        assert!(e.reason.contains(why), "{e}");
        assert_eq!(
            snapshot(s).await,
            before,
            "refused input changed the store: {e}"
        );
    }
}

/// Several documents commit as one transaction: one new revision for all of them.
async fn one_transaction(s: Arc<dyn Datastore>) {
    let s = &*s;
    let rev = s.revision().await.unwrap();
    let yaml = format!(
        "{}{}{}",
        pool("a", "10.81.0.0/16", ""),
        node("n1"),
        pool("b", "10.82.0.0/16", "")
    );
    let applied = objects::apply_all(s, &docs(&yaml), false).await.unwrap();
    assert_eq!(applied, vec![Applied::Created; 3]);
    let (items, after) = snapshot(s).await;
    assert_eq!(after, rev + 1);
    assert!(items.iter().all(|kv| kv.mod_revision == after));
    // Again: nothing to write, nothing written.
    let applied = objects::apply_all(s, &docs(&yaml), false).await.unwrap();
    assert_eq!(applied, vec![Applied::Unchanged; 3]);
    assert_eq!(s.revision().await.unwrap(), after);
    let changed = yaml.replace(
        "name: n1\nspec: {}",
        "name: n1\n  labels: {zone: a}\nspec: {}",
    );
    let applied = objects::apply_all(s, &docs(&changed), false).await.unwrap();
    assert_eq!(
        applied,
        vec![Applied::Unchanged, Applied::Updated, Applied::Unchanged]
    );
}

/// A pool created by another writer between `apply_all`'s overlap check and its commit: the
/// transaction conflicts, the retry sees the new pool, and the overlapping pool is refused.
async fn racing_pool_creation_is_caught(s: Arc<dyn Datastore>) {
    let racer = docs(&pool("z", "10.90.128.0/17", ""));
    let racing = Racing {
        inner: s.clone(),
        race: Mutex::new(Some(vec![TxnOp::Put(
            racer[0].key(),
            objects::encode(&racer[0]),
        )])),
        txns: AtomicUsize::new(0),
    };
    let e = invalid(
        objects::apply_all(
            &racing,
            &docs(&format!("{}{}", node("n1"), pool("a", "10.90.0.0/16", ""))),
            false,
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        racing.txns.load(Ordering::SeqCst),
        1,
        "one attempt conflicted"
    );
    assert_eq!((e.doc, e.field.as_str()), (Some(2), "spec.cidr"), "{e}");
    assert!(e.reason.contains("overlaps pool z"), "{e}");
    let keys: Vec<String> = s
        .list("")
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(
        keys,
        vec![racer[0].key()],
        "only the racer's pool is stored"
    );
}

/// Another writer changes a key the input writes: the retry decides on the new value.
async fn racing_write_of_a_written_key_is_caught(s: Arc<dyn Datastore>) {
    let theirs = docs(&node("n1").replace("spec: {}", "spec: {addresses: [{address: 192.0.2.9}]}"));
    let racing = Racing {
        inner: s.clone(),
        race: Mutex::new(Some(vec![TxnOp::Put(
            theirs[0].key(),
            objects::encode(&theirs[0]),
        )])),
        txns: AtomicUsize::new(0),
    };
    let applied = objects::apply_all(
        &racing,
        &docs(&format!("{}{}", pool("a", "10.90.0.0/16", ""), node("n1"))),
        true,
    )
    .await;
    // `create` saw n1 absent, the racer created it: the retry must refuse, not overwrite.
    let e = invalid(applied.unwrap_err());
    assert_eq!((e.doc, e.field.as_str()), (Some(2), "metadata.name"), "{e}");
    assert_eq!(racing.txns.load(Ordering::SeqCst), 1);
    let stored = s.get(&theirs[0].key()).await.unwrap().unwrap();
    assert_eq!(stored.value, objects::encode(&theirs[0]));
    assert!(s
        .get(&docs(&pool("a", "10.90.0.0/16", ""))[0].key())
        .await
        .unwrap()
        .is_none());
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

both!(refused_inputs_change_nothing);
both!(one_transaction);
both!(racing_pool_creation_is_caught);
both!(racing_write_of_a_written_key_is_caught);

/// A stored pool whose selector nests 4 000 parentheses (written by an older version, or
/// straight into the datastore) is reported as a corrupt record by key; reading it used to
/// overflow the stack of every agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_hostile_selector_is_a_corrupt_record() {
    let (s, _b) = sqlite().await;
    let key = "/trellis/v1/ippools/deep";
    let sel = format!("{}all(){}", "(".repeat(4000), ")".repeat(4000));
    let value = serde_json::json!({
        "apiVersion": "trellis.dev/v1", "kind": "IPPool", "metadata": {"name": "deep"},
        "spec": {"cidr": "10.90.0.0/16", "nodeSelector": sel}
    });
    s.txn(
        vec![],
        vec![TxnOp::Put(key.into(), value.to_string().into_bytes())],
    )
    .await
    .unwrap();
    match objects::get(&*s, trellis_resources::Kind::IpPool, None, "deep").await {
        Err(ClusterError::Corrupt { key: k, reason }) => {
            assert_eq!(k, key);
            assert!(reason.contains("spec.nodeSelector"), "{reason}");
        }
        other => panic!("expected a corrupt record, got {other:?}"),
    }
}

/// etcd refuses a transaction of more than 128 conditions or writes (`--max-txn-ops`): a file
/// with more documents than that cannot be applied in one transaction, and says so — naming
/// the count and that nothing was applied — instead of passing on a gRPC error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_too_large_for_one_etcd_transaction_is_refused_clearly() {
    let (s, _b) = etcd().await;
    let before = snapshot(&*s).await;
    let yaml: String = (0..200).map(|i| node(&format!("n{i}"))).collect();
    let e = invalid(
        objects::apply_all(&*s, &docs(&yaml), false)
            .await
            .unwrap_err(),
    );
    assert!(
        e.reason.contains("200 documents") && e.reason.contains("nothing was applied"),
        "{e}"
    );
    assert_eq!(snapshot(&*s).await, before);
}

/// With more pools stored than etcd allows conditions in one transaction, a pool still
/// applies: the overlap check is guarded by one condition over the pool prefix, not one per
/// stored pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_applies_with_many_pools_stored_on_etcd() {
    let (s, _b) = etcd().await;
    for batch in 0..3 {
        let ops = (0..50)
            .map(|i| {
                let n = batch * 50 + i;
                let r = &docs(&pool(&format!("p{n}"), &format!("10.{n}.0.0/16"), ""))[0];
                TxnOp::Put(r.key(), objects::encode(r))
            })
            .collect();
        s.txn(vec![], ops).await.unwrap();
    }
    let applied = objects::apply_all(&*s, &docs(&pool("new", "10.200.0.0/16", "")), false)
        .await
        .unwrap();
    assert_eq!(applied, vec![Applied::Created]);
    let e = invalid(
        objects::apply_all(&*s, &docs(&pool("clash", "10.7.1.0/24", "")), false)
            .await
            .unwrap_err(),
    );
    assert!(e.reason.contains("p7"), "{e}");
}

/// The same pools, built directly (parsing 40 000 documents would dominate the test).
fn many_pools(prefix: &str, n: usize, second_octet: usize) -> Vec<Resource> {
    (0..n)
        .map(|i| {
            let v = serde_json::json!({"apiVersion": "trellis.dev/v1", "kind": "IPPool",
                "metadata": {"name": format!("{prefix}{i}")},
                "spec": {"cidr": format!("10.{}.{}.{}/26", second_octet + i / 1024, (i / 4) % 256, (i % 4) * 64)}});
            Resource::from_value(&v).unwrap()
        })
        .collect()
}

/// Checking every pool of a file against the others and against every stored pool used to
/// compare each pair (and clone every earlier pool for each one): 40 000 pools took many
/// minutes. Now it is O(n log n). The deadline only catches the quadratic behaviour (it is
/// orders of magnitude above the time the check takes); it is not a speed target.
#[test]
fn many_pools_are_checked_without_comparing_every_pair() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let stored = many_pools("old", 20_000, 0);
        let listing = Listing {
            items: stored
                .iter()
                .enumerate()
                .map(|(i, r)| KeyValue {
                    key: r.key(),
                    value: objects::encode(r),
                    create_revision: i as i64 + 1,
                    mod_revision: i as i64 + 1,
                })
                .collect(),
            revision: 20_000,
        };
        let input = many_pools("new", 40_000, 100);
        let observed = objects::Observed {
            current: vec![None; input.len()],
            pools: Some(listing),
            tiers: Default::default(),
        };
        let plan = objects::plan_all(&input, &observed, false).map(|p| p.puts.len());
        // And one overlap at the very end is still found, naming its document.
        let mut clash = input;
        clash.extend(many_pools("late", 1, 0));
        let late = objects::plan_all(&clash, &observed, false).map(|p| p.puts.len());
        let _ = tx.send((plan, late));
    });
    let (plan, late) = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("checking 40 000 pools against 20 000 stored ones did not finish");
    assert_eq!(plan.unwrap(), 40_000);
    let e = invalid(late.unwrap_err());
    assert_eq!(e.doc, Some(40_001), "{e}");
    assert!(e.reason.contains("old0"), "{e}");
}
