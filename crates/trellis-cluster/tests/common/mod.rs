//! Shared by the cluster IPAM tests: a datastore of either backend, resources from YAML, a
//! clock the test moves, and a ledger check of what live attachments were given.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_cluster::ipam::Request;
use trellis_cluster::{objects, report, Clock};
use trellis_resources::parse_documents;
use trellis_store::{Datastore, KeyValue, Listing, Precondition, TxnOp, TxnOutcome, Watch};
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

/// Writes an attachment the way Trellis did before the injective names: handle
/// `network.container.ifname`, endpoint `node-<first 12 of the ID>-ifname` without the network
/// annotation — all in one transaction, into the node's existing block.
pub async fn write_legacy(s: &dyn Datastore, node: &str, r: &Request, ip: &str) {
    use trellis_resources::{key_for, IpamHandleSpec, Kind, Metadata, Object, Resource};
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let handle = trellis_ipam::cluster::legacy_handle_id(&r.network, &r.container_id, &r.ifname);
    let (mut block, rev) = objects::blocks(s)
        .await
        .unwrap()
        .into_iter()
        .find(|(b, _)| b.spec.cidr.contains(&ip))
        .expect("a block holds the legacy address");
    let sec = BTreeMap::from([("node".to_string(), node.to_string())]);
    trellis_ipam::cluster::allocate_specific(&mut block.spec, ip, &handle, &sec).unwrap();
    let short: String = r.container_id.chars().take(12).collect();
    let mut wep = Object {
        metadata: Metadata {
            name: format!("{node}-{short}-{}", r.ifname),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: trellis_resources::WorkloadEndpointSpec {
            node: node.into(),
            container_id: Some(r.container_id.clone()),
            endpoint: Some(r.ifname.clone()),
            ip_networks: vec![ip.into()],
            ..Default::default()
        },
        status: None,
    };
    wep.metadata
        .annotations
        .insert("trellis.dev/handle".into(), handle.clone());
    let wep = Resource::WorkloadEndpoint(wep);
    let h = Resource::IpamHandle(Object {
        metadata: Metadata {
            name: handle.clone(),
            ..Default::default()
        },
        spec: IpamHandleSpec {
            handle_id: handle.clone(),
            block: BTreeMap::from([(block.spec.cidr.to_string(), 1)]),
            endpoint: Some(wep.key()),
        },
        status: None,
    });
    let bkey = key_for(Kind::IpamBlock, None, &block.metadata.name);
    let out = s
        .txn(
            vec![
                Precondition::ModRevision(bkey.clone(), rev),
                Precondition::Absent(h.key()),
            ],
            vec![
                TxnOp::Put(bkey, objects::encode(&Resource::IpamBlock(block))),
                TxnOp::Put(h.key(), objects::encode(&h)),
                TxnOp::Put(wep.key(), objects::encode(&wep)),
            ],
        )
        .await
        .unwrap();
    assert!(matches!(out, TxnOutcome::Committed { .. }));
}

/// Something to run between two datastore calls of the code under test.
pub type Hook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A datastore that passes every call to `inner` and, once armed, runs a hook before the k-th
/// call from then on; it logs each call so a test can say where the hook landed.
pub struct Armed {
    inner: Arc<dyn Datastore>,
    calls: AtomicUsize,
    fire_at: AtomicUsize,
    hook: tokio::sync::Mutex<Option<Hook>>,
    log: std::sync::Mutex<Vec<String>>,
}

impl Armed {
    pub fn new(inner: Arc<dyn Datastore>) -> Arc<Armed> {
        Arc::new(Armed {
            inner,
            calls: AtomicUsize::new(0),
            fire_at: AtomicUsize::new(usize::MAX),
            hook: tokio::sync::Mutex::new(None),
            log: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Runs `hook` before the `k`-th call from now (0: the next call).
    pub async fn arm(&self, k: usize, hook: Hook) {
        *self.hook.lock().await = Some(hook);
        self.fire_at
            .store(self.calls.load(Ordering::SeqCst) + k, Ordering::SeqCst);
    }

    /// Calls made so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Whether the armed hook ran (or none was armed).
    pub async fn fired(&self) -> bool {
        self.hook.lock().await.is_none()
    }

    /// The `n`-th call made (for messages).
    pub fn call(&self, n: usize) -> String {
        self.log.lock().unwrap().get(n).cloned().unwrap_or_default()
    }

    async fn enter(&self, what: String) {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push(what);
        if n == self.fire_at.load(Ordering::SeqCst) {
            if let Some(h) = self.hook.lock().await.take() {
                h().await;
            }
        }
    }
}

#[async_trait::async_trait]
impl Datastore for Armed {
    async fn get(&self, key: &str) -> trellis_store::Result<Option<KeyValue>> {
        self.enter(format!("get {key}")).await;
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> trellis_store::Result<Listing> {
        self.enter(format!("list {prefix}")).await;
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
        self.enter(format!("txn [{}]", what.join(", "))).await;
        self.inner.txn(pre, ops).await
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
pub async fn wipe(s: &dyn Datastore) {
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
