//! Shared by the cluster IPAM tests: a datastore of either backend, resources from YAML, a
//! clock the test moves, and a ledger check of what live attachments were given.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_cluster::ipam::Request;
use trellis_cluster::{objects, report, Clock};
use trellis_resources::parse_documents;
use trellis_store::Datastore;
use trellis_testutil::{temp_dir, EtcdServer};

/// Keeps the backing store alive for the test.
pub enum Backing {
    Sqlite(tempfile::TempDir),
    Etcd(EtcdServer),
}

pub async fn sqlite() -> (Arc<dyn Datastore>, Backing) {
    let dir = temp_dir("cluster");
    let s = trellis_store::open(&format!("sqlite:{}", dir.path().join("c.db").display()))
        .await
        .unwrap();
    (s, Backing::Sqlite(dir))
}

pub async fn etcd() -> (Arc<dyn Datastore>, Backing) {
    let server = EtcdServer::start();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match trellis_store::open(&format!("etcd:{}", server.endpoint)).await {
            Ok(s) => return (s, Backing::Etcd(server)),
            Err(e) if Instant::now() > deadline => panic!("etcd did not answer: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

pub async fn apply(s: &dyn Datastore, yaml: &str) {
    for r in parse_documents(yaml).unwrap() {
        objects::apply(s, &r, false).await.unwrap();
    }
}

pub fn node_yaml(name: &str) -> String {
    format!("apiVersion: trellis.dev/v1\nkind: Node\nmetadata:\n  name: {name}\nspec: {{}}\n")
}

pub fn pool_yaml(name: &str, cidr: &str, block: u8) -> String {
    format!("apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  cidr: {cidr}\n  blockSize: {block}\n")
}

pub fn ipam_config_yaml(strict: bool, max_blocks: Option<u32>) -> String {
    let max = max_blocks
        .map(|m| format!("  maxBlocksPerHost: {m}\n"))
        .unwrap_or_default();
    format!("apiVersion: trellis.dev/v1\nkind: IPAMConfiguration\nmetadata:\n  name: default\nspec:\n  strictAffinity: {strict}\n{max}")
}

pub fn req(node: &str, i: usize) -> Request {
    Request {
        network: "k8s".into(),
        container_id: format!("{node}-c{i}"),
        ifname: "eth0".into(),
        namespace: Some("default".into()),
        pod: Some(format!("p{i}")),
        ..Default::default()
    }
}

/// A clock that moves only when the test says so.
pub struct ManualClock {
    base: Instant,
    offset_secs: AtomicU64,
    epoch_secs: u64,
}

impl ManualClock {
    pub fn new() -> Arc<ManualClock> {
        Arc::new(ManualClock {
            base: Instant::now(),
            offset_secs: AtomicU64::new(0),
            epoch_secs: 1_700_000_000,
        })
    }
    pub fn advance(&self, secs: u64) {
        self.offset_secs.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_secs(&self) -> u64 {
        self.epoch_secs + self.offset_secs.load(Ordering::SeqCst)
    }
    fn instant(&self) -> Instant {
        self.base + Duration::from_secs(self.offset_secs.load(Ordering::SeqCst))
    }
}

/// Checks the datastore against what live attachments were given (handle → addresses): every
/// live handle holds exactly its addresses, no address was given to two live handles, and
/// `ipam check` finds nothing. Returns a description of the first violation.
pub async fn verify_ledger(
    s: &dyn Datastore,
    live: &BTreeMap<String, Vec<IpAddr>>,
) -> Result<(), String> {
    let mut owner: BTreeMap<IpAddr, &str> = BTreeMap::new();
    for (h, ips) in live {
        for ip in ips {
            if let Some(other) = owner.insert(*ip, h) {
                return Err(format!("{ip} was given to live handles {other} and {h}"));
            }
        }
    }
    let mut recorded: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (b, _) in objects::blocks(s).await.map_err(|e| e.to_string())? {
        for (ip, attr) in trellis_ipam::cluster::allocations(&b.spec) {
            recorded.entry(attr.handle_id.clone()).or_default().push(ip);
        }
    }
    for (h, ips) in live {
        let mut want = ips.clone();
        want.sort();
        let mut got = recorded.get(h).cloned().unwrap_or_default();
        got.sort();
        if want != got {
            return Err(format!(
                "live handle {h} was given {want:?} but the blocks record {got:?}"
            ));
        }
    }
    let problems = report::check(s).await.map_err(|e| e.to_string())?;
    if !problems.is_empty() {
        return Err(format!("ipam check: {problems:?}"));
    }
    Ok(())
}

/// Runs `$name(store)` as one test per backend.
#[macro_export]
macro_rules! both {
    ($name:ident) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sqlite() {
                let (s, _b) = common::sqlite().await;
                super::$name(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_etcd() {
                let (s, _b) = common::etcd().await;
                super::$name(s).await;
            }
        }
    };
}

/// A datastore that, just before the first transaction it is asked to commit, commits another
/// writer's change: the race lands exactly between a decision's reads and its commit.
pub struct Racing {
    pub inner: Arc<dyn Datastore>,
    pub race: std::sync::Mutex<Option<Vec<trellis_store::TxnOp>>>,
    pub txns: std::sync::atomic::AtomicUsize,
}

impl Racing {
    pub fn new(inner: Arc<dyn Datastore>, race: Vec<trellis_store::TxnOp>) -> Racing {
        Racing {
            inner,
            race: std::sync::Mutex::new(Some(race)),
            txns: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl Datastore for Racing {
    async fn get(&self, key: &str) -> trellis_store::Result<Option<trellis_store::KeyValue>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> trellis_store::Result<trellis_store::Listing> {
        self.inner.list(prefix).await
    }
    async fn txn(
        &self,
        pre: Vec<trellis_store::Precondition>,
        ops: Vec<trellis_store::TxnOp>,
    ) -> trellis_store::Result<trellis_store::TxnOutcome> {
        self.txns.fetch_add(1, Ordering::SeqCst);
        let race = self.race.lock().unwrap().take();
        if let Some(race) = race {
            let out = self.inner.txn(vec![], race).await?;
            assert!(matches!(out, trellis_store::TxnOutcome::Committed { .. }));
        }
        self.inner.txn(pre, ops).await
    }
    async fn watch(&self, prefix: &str, from: i64) -> trellis_store::Result<trellis_store::Watch> {
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
