//! The policy applier: keeps Trellis's nftables table `inet trellis_policy` equal to what the
//! cluster's policy says for this node. A shell over `trellis_policy` — the pure
//! [`ModelSync`] (stored objects key by key → model changes) and [`PolicyEngine`] (model
//! changes → small nft batches) do the thinking; this module reads the agent's view, runs
//! `nft` (through the [`Kernel`] seam) and reports. Does I/O (nft, in the agent's network
//! namespace; never another table).
//!
//! - Startup: the whole table in one transaction (`add table; delete table; add table; ...`),
//!   which also adopts the table a previous agent left: it is replaced atomically, never
//!   deleted and re-added in two steps, so enforcement has no gap across a restart.
//! - Each change of a policy-relevant object: only the keys whose revision moved are
//!   translated and fed to the engine; its ops go to the kernel as ONE atomic transaction. A
//!   refused batch leaves the previous table fully in force; the applier then replaces the
//!   table whole (the engine already holds the desired state), and keeps retrying on the resync
//!   tick until the kernel takes it.
//! - Every resync tick: the kernel's table is compared with the expected one
//!   (`compile::drift`) and replaced whole on any difference (a rule deleted by hand comes
//!   back); the same listing feeds the per-rule counters. A tick that finds the namespace's
//!   nf_tables generation where it was when the table last matched, and the table still there
//!   (an owned table goes without a commit), skips the listing (nothing was committed since),
//!   except that the counters are read every tenth tick.
//! - An unreachable datastore changes nothing here: the view keeps its last state, and so
//!   does the table.
//!
//! Policy applies to routed-mode pod interfaces (`trl*`, forward hook). Bridge-mode pods
//! talk through the bridge and are not policed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::Value;
use tokio::sync::watch;
use trellis_cluster::invalid::{self, Invalid};
use trellis_cluster::view::ClusterView;
use trellis_dataplane::nft_elements::{ElementChange, ElementSocket, NFPROTO_INET};
use trellis_policy::compile::drift::{self, RuleCounter};
use trellis_policy::compile::elements::SetKeys;
use trellis_policy::compile::ruleset::FROM_ENDPOINT;
use trellis_policy::compile::{CompileConfig, Ops, PolicyEngine, Ruleset};
use trellis_policy::sync::ModelSync;
use trellis_resources::{Kind, Resource};

use crate::view::{SharedView, POLICY_KINDS};

/// The table the applier owns (the compiler's name for it).
const FAMILY: &str = "inet";
const TABLE: &str = "trellis_policy";

/// Policy applier failures.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("nft: {0}")]
    Nft(#[from] trellis_dataplane::DataplaneError),
    #[error("the nft task failed: {0}")]
    Task(String),
    #[error("interface {interface}: its policy was not programmed within {waited:?}")]
    NotProgrammed { interface: String, waited: Duration },
}

/// The kernel side: one atomic nft batch, one atomic element-only batch, and the table's
/// numeric listing.
pub trait Kernel: Send + Sync {
    fn apply(&self, doc: &Value) -> Result<(), PolicyError>;
    /// A batch that only adds or removes elements of hash sets (a pod's labels changed, a pod
    /// on another node came or went), as one transaction without running `nft`.
    fn apply_elements(&self, keys: &[SetKeys]) -> Result<(), PolicyError>;
    /// `None` when the table does not exist.
    fn list(&self) -> Result<Option<Value>, PolicyError>;
    /// The namespace's nf_tables generation, which moves on every committed change of any
    /// table, while the table exists (`None`: it does not). A table can leave without a commit
    /// (one created with `flags owner` goes with its creator's socket), so a table the resync
    /// verified is still as verified while the generation stands still AND it is still there.
    fn generation(&self) -> Result<Option<u32>, PolicyError>;
}

/// Element-only batches over one netlink socket, opened on first use in the calling thread's
/// network namespace and kept: closing it would make nf_tables wait for an RCU grace period
/// after every deleted element (see `trellis_dataplane::nft_elements`).
#[derive(Default)]
pub struct ElementPath(Mutex<Option<ElementSocket>>);

impl ElementPath {
    pub fn apply(&self, keys: &[SetKeys]) -> Result<(), PolicyError> {
        let changes: Vec<ElementChange> = keys
            .iter()
            .map(|k| ElementChange {
                add: k.add,
                set: k.set.clone(),
                keys: k.keys.clone(),
            })
            .collect();
        let mut sock = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if sock.is_none() {
            *sock = Some(ElementSocket::open()?);
        }
        let sock = sock.as_mut().expect("opened above");
        Ok(sock.apply(NFPROTO_INET, TABLE, &changes)?)
    }

    /// The namespace's nf_tables generation while the policy table exists (`None`: it does not)
    /// over the same socket (see [`ElementSocket::generation`] and
    /// [`ElementSocket::table_exists`]); a socket that failed is dropped and opened afresh next
    /// time.
    pub fn generation(&self) -> Result<Option<u32>, PolicyError> {
        let mut sock = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if sock.is_none() {
            *sock = Some(ElementSocket::open()?);
        }
        let s = sock.as_mut().expect("opened above");
        let read = s
            .generation()
            .and_then(|g| Ok(s.table_exists(NFPROTO_INET, TABLE)?.then_some(g)));
        if read.is_err() {
            *sock = None;
        }
        Ok(read?)
    }
}

/// `nft` and the element path in the agent's own network namespace.
#[derive(Default)]
pub struct Nft {
    elements: ElementPath,
    /// Batches through an `nft` started ahead of need (a new pod's ADD waits for its batch).
    batches: trellis_dataplane::nft::WarmApply,
}

impl Kernel for Nft {
    fn apply(&self, doc: &Value) -> Result<(), PolicyError> {
        Ok(self.batches.apply(doc)?)
    }

    fn apply_elements(&self, keys: &[SetKeys]) -> Result<(), PolicyError> {
        self.elements.apply(keys)
    }

    fn list(&self) -> Result<Option<Value>, PolicyError> {
        Ok(trellis_dataplane::nft::list_table_numeric(FAMILY, TABLE)?)
    }

    fn generation(&self) -> Result<Option<u32>, PolicyError> {
        self.elements.generation()
    }
}

/// What the applier shows the metrics endpoint and the socket server.
pub struct Status {
    /// The table is in the kernel and follows the view.
    pub enforced: AtomicBool,
    /// The datastore revision the kernel's table reflects (0: none yet): everything written
    /// up to it is in the kernel.
    pub synced_revision: AtomicI64,
    /// The newest object revision the kernel holds (it may be ahead of `synced_revision`,
    /// which waits for the watch's progress report): when a given write is in the kernel.
    pub newest_revision: AtomicI64,
    pub drift_repairs: Counter,
    /// Batches nft refused (each followed by a whole-table replace).
    pub refused: Counter,
    /// Seconds from a change reaching the agent to the kernel holding it.
    pub programming: Histogram,
    /// Seconds `endpointReady` requests (the CNI ADD) waited for their pod's policy: what
    /// enforcement adds to an ADD.
    pub endpoint_ready: Histogram,
    /// Per-rule counters by rule label, as of the last resync.
    pub counters: Mutex<BTreeMap<String, RuleCounter>>,
    /// Interfaces whose endpoint chains are in the kernel.
    programmed: watch::Sender<BTreeSet<String>>,
}

impl Default for Status {
    fn default() -> Self {
        let buckets = [
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0,
        ];
        Status {
            enforced: AtomicBool::new(false),
            synced_revision: AtomicI64::new(0),
            newest_revision: AtomicI64::new(0),
            drift_repairs: Counter::default(),
            refused: Counter::default(),
            programming: Histogram::new(buckets),
            endpoint_ready: Histogram::new(buckets),
            counters: Mutex::new(BTreeMap::new()),
            programmed: watch::channel(BTreeSet::new()).0,
        }
    }
}

impl Status {
    /// Waits until `interface`'s policy is in the kernel, at most `limit`. Before the applier's
    /// first table is in the kernel (startup; every transaction refused) nothing closes the
    /// interface — on a fresh node there is no table at all — so it is not ready then either:
    /// the CNI ADD fails closed rather than leave an unpoliced pod.
    pub async fn wait_programmed(
        &self,
        interface: &str,
        limit: Duration,
    ) -> Result<(), PolicyError> {
        let mut rx = self.programmed.subscribe();
        let wait = async {
            loop {
                let programmed = rx.borrow_and_update().contains(interface);
                if programmed && self.enforced.load(Ordering::Acquire) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(limit, wait).await;
        self.endpoint_ready.observe(started.elapsed().as_secs_f64());
        r.map_err(|_| PolicyError::NotProgrammed {
            interface: interface.to_string(),
            waited: limit,
        })
    }

    fn publish(&self, rs: &Ruleset) {
        let now: BTreeSet<String> = rs
            .maps
            .get(FROM_ENDPOINT)
            .map(|m| m.elements.keys().cloned().collect())
            .unwrap_or_default();
        self.programmed.send_if_modified(|old| {
            let moved = *old != now;
            *old = now;
            moved
        });
    }
}

/// One policy-relevant key whose revision moved (`None`: gone from the view).
#[derive(Debug, Clone)]
pub struct Delta {
    pub kind: Kind,
    pub key: String,
    pub revision: i64,
    pub object: Option<Resource>,
}

/// The pure part of the applier: what changed in the view, and the engine it feeds.
pub struct Applier {
    sync: ModelSync,
    engine: PolicyEngine,
    /// Revision of every key fed so far.
    seen: HashMap<String, (Kind, i64)>,
    /// Each kind's view generation at the last look (unchanged kinds are not scanned).
    generations: BTreeMap<Kind, u64>,
}

impl Applier {
    pub fn new(node: &str) -> Applier {
        Applier::with_config(node, CompileConfig::default())
    }

    pub fn with_config(node: &str, cfg: CompileConfig) -> Applier {
        Applier {
            sync: ModelSync::new(),
            engine: PolicyEngine::with_config(node, cfg),
            seen: HashMap::new(),
            generations: BTreeMap::new(),
        }
    }

    pub fn engine(&self) -> &PolicyEngine {
        &self.engine
    }

    /// The keys of [`POLICY_KINDS`] whose revision moved since the last call. Scans only the
    /// kinds whose generation moved, comparing revisions; clones only what changed. Tiers come
    /// first and deleted tiers last, so a tier written or deleted together with its policies
    /// (one `apply -f`) never leaves them waiting for it in between.
    pub fn deltas(&mut self, view: &ClusterView) -> Vec<Delta> {
        let mut out = self.scan(view);
        let (last, mut first): (Vec<Delta>, Vec<Delta>) = out
            .drain(..)
            .partition(|d| d.kind == Kind::Tier && d.object.is_none());
        first.extend(last);
        first
    }

    fn scan(&mut self, view: &ClusterView) -> Vec<Delta> {
        let mut out = Vec::new();
        for kind in POLICY_KINDS {
            let g = view.generation(kind);
            if self.generations.get(&kind) == Some(&g) {
                continue;
            }
            self.generations.insert(kind, g);
            let mut present = BTreeSet::new();
            for s in view.stored(kind) {
                let key = s.resource.key();
                if self.seen.get(&key).map(|(_, r)| *r) != Some(s.revision) {
                    out.push(Delta {
                        kind,
                        key: key.clone(),
                        revision: s.revision,
                        object: Some(s.resource.clone()),
                    });
                }
                present.insert(key);
            }
            let gone = self
                .seen
                .iter()
                .filter(|(k, (kd, _))| *kd == kind && !present.contains(*k));
            out.extend(gone.map(|(k, (kind, r))| Delta {
                kind: *kind,
                key: k.clone(),
                revision: *r,
                object: None,
            }));
        }
        for d in &out {
            match &d.object {
                Some(_) => self.seen.insert(d.key.clone(), (d.kind, d.revision)),
                None => self.seen.remove(&d.key),
            };
        }
        out
    }

    /// Feeds the deltas (of [`Applier::deltas`], each exactly once) to the engine: the ops of all of them, in order (one transaction),
    /// and the keys whose standing changed (`Some`: left out of the model, and why).
    pub fn feed(&mut self, deltas: Vec<Delta>) -> (Ops, Vec<(Delta, Option<String>)>) {
        let mut changes = Vec::new();
        let mut reports = Vec::new();
        for d in deltas {
            let up = self.sync.update(&d.key, d.object.as_ref());
            changes.extend(up.changes);
            for (key, why) in up.reports {
                let (kind, revision) = self
                    .seen
                    .get(&key)
                    .copied()
                    .or_else(|| Some((kind_of(&key)?, d.revision)))
                    .unwrap_or((d.kind, d.revision));
                let delta = Delta {
                    kind,
                    key,
                    revision,
                    object: None,
                };
                reports.push((delta, why.map(|e| e.to_string())));
            }
        }
        (self.engine.handle_all(changes), reports)
    }
}

/// The policy kind a key belongs to.
fn kind_of(key: &str) -> Option<Kind> {
    POLICY_KINDS
        .into_iter()
        .find(|k| key.starts_with(&k.prefix()))
}

/// Records what the translation left out (and what it takes back) in the invalid-records
/// tracker's policy layer: logged once per key and revision, counted in
/// `trellis_datastore_invalid_records`. The view's own observations (decodes or not) never clear
/// these, whatever order the watch, relists and policy passes run in.
fn report(reports: Vec<(Delta, Option<String>)>) {
    for (d, why) in reports {
        let i = why.map(|reason| Invalid {
            key: d.key.clone(),
            revision: d.revision,
            reason: format!("policy: {reason}"),
        });
        invalid::observe_translation(d.kind, &d.key, i.as_ref());
    }
}

/// Runs `f` with the kernel on a blocking thread.
async fn kernel_call<T: Send + 'static>(
    kernel: &Arc<dyn Kernel>,
    f: impl FnOnce(&dyn Kernel) -> Result<T, PolicyError> + Send + 'static,
) -> Result<T, PolicyError> {
    let k = kernel.clone();
    tokio::task::spawn_blocking(move || f(&*k))
        .await
        .map_err(|e| PolicyError::Task(e.to_string()))?
}

/// The applier's loop state.
struct Loop {
    view: Arc<SharedView>,
    status: Arc<Status>,
    kernel: Arc<dyn Kernel>,
    applier: Applier,
    /// The kernel's table is not known to be the engine's (startup, a refused batch).
    need_full: bool,
    /// The nf_tables generation at which a listing last matched the engine's table, and how
    /// many resyncs ago the rules' counters were read (see [`Loop::resync`]).
    verified: Option<u32>,
    resyncs_since_listing: u32,
}

/// A resync that finds the nf_tables generation unchanged since the table was verified skips the
/// listing (and its drift diff), but reads the counters at least every this many resyncs (every
/// 20 s at the default 2 s resync).
const COUNTERS_EVERY_RESYNCS: u32 = 10;

impl Loop {
    /// One pass: the view's changes into the engine, and into the kernel.
    async fn pass(&mut self) {
        let since = self.view.take_policy_changed_at();
        // Read before the view: what it holds is then at least this recent.
        let revision = self.view.revision();
        let (ops, newest) = {
            let v = self.view.read();
            let deltas = self.applier.deltas(&v);
            let newest = deltas.iter().map(|d| d.revision).max().unwrap_or(0);
            let (ops, reports) = self.applier.feed(deltas);
            report(reports);
            (ops, newest)
        };
        if self.need_full || !ops.is_empty() {
            self.verified = None; // the table changes: the next resync lists it again
        }
        let applied = if self.need_full {
            self.replace().await
        } else if ops.is_empty() {
            Ok(false)
        } else {
            // Element-only batches (the common case: labels, remote pods) skip `nft`.
            let batch = match ops.element_keys(&self.applier.engine().full().sets) {
                Some(keys) => kernel_call(&self.kernel, move |k| k.apply_elements(&keys)).await,
                None => kernel_call(&self.kernel, move |k| k.apply(&ops.to_nft_json())).await,
            };
            match batch {
                Ok(()) => Ok(true),
                Err(e) => {
                    self.status.refused.inc();
                    tracing::warn!(error = %e, "nft refused a policy batch; replacing the table whole");
                    self.replace().await
                }
            }
        };
        match applied {
            Ok(did) => {
                self.status.publish(self.applier.engine().full());
                self.status
                    .synced_revision
                    .fetch_max(revision, Ordering::Release);
                self.status
                    .newest_revision
                    .fetch_max(newest, Ordering::Release);
                if did {
                    if let Some(t) = since {
                        self.status.programming.observe(t.elapsed().as_secs_f64());
                    }
                }
            }
            Err(e) => {
                self.need_full = true;
                tracing::error!(error = %e, "programming the policy table failed; the previous table stays in force, retrying on the next resync");
            }
        }
    }

    /// Replaces the whole table in one transaction (adopting whatever table is there).
    async fn replace(&mut self) -> Result<bool, PolicyError> {
        let doc = self.applier.engine().full().to_nft_json();
        kernel_call(&self.kernel, move |k| k.apply(&doc)).await?;
        if !self.status.enforced.swap(true, Ordering::AcqRel) {
            tracing::info!("policy enforced (table inet trellis_policy programmed)");
        }
        self.need_full = false;
        Ok(true)
    }

    /// Compares the kernel's table with the expected one and replaces it on any difference;
    /// reads the per-rule counters from the same listing.
    async fn resync(&mut self) {
        if self.need_full {
            self.verified = None;
            return self.pass().await;
        }
        // Read before the listing: a change after it moves the generation past this one.
        // `None` (the table is gone) always lists.
        let generation = match kernel_call(&self.kernel, |k| k.generation()).await {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(error = %e, "reading the nf_tables generation failed; listing");
                None
            }
        };
        self.resyncs_since_listing += 1;
        if generation.is_some()
            && generation == self.verified
            && self.resyncs_since_listing < COUNTERS_EVERY_RESYNCS
        {
            return; // nothing in nf_tables changed since the table matched
        }
        self.resyncs_since_listing = 0;
        self.verified = None;
        let listing = match kernel_call(&self.kernel, |k| k.list()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing the policy table failed");
                return;
            }
        };
        if let Some(l) = &listing {
            *self
                .status
                .counters
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = drift::rule_counters(l);
        }
        let diff = drift::differences(listing.as_ref(), self.applier.engine().full());
        drop(listing);
        // The listing is the agent's largest transient at rest (the whole table as JSON, many
        // small allocations): hand the pages it spread over the heap back.
        crate::release_free_memory();
        if diff.is_empty() {
            self.verified = generation;
            return;
        }
        tracing::warn!(differences = ?diff.iter().take(5).collect::<Vec<_>>(), total = diff.len(), "the policy table drifted; replacing it whole");
        match self.replace().await {
            Ok(_) => {
                self.status.drift_repairs.inc();
            }
            Err(e) => {
                self.need_full = true;
                tracing::error!(error = %e, "repairing the policy table failed");
            }
        }
    }
}

/// Runs the applier until the agent stops: programs the whole table, then follows the view.
/// The applier's settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Between resyncs (drift repair, counters).
    pub resync: Duration,
    /// Flow logs' NFLOG group, when on.
    pub flow_log_group: Option<u16>,
}

pub async fn run(
    node: String,
    view: Arc<SharedView>,
    status: Arc<Status>,
    kernel: Arc<dyn Kernel>,
    settings: Settings,
) {
    tracing::info!(
        "policy is enforced on routed-mode pod interfaces (trl*); bridge-mode pods are not policed"
    );
    let mut changes = view.subscribe_policy();
    let mut revisions = view.subscribe_revision();
    let mut l = Loop {
        view,
        status,
        kernel,
        applier: Applier::with_config(
            &node,
            CompileConfig {
                flow_log_group: settings.flow_log_group,
                ..CompileConfig::default()
            },
        ),
        need_full: true,
        verified: None,
        resyncs_since_listing: 0,
    };
    let mut tick = tokio::time::interval(settings.resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    l.pass().await;
    loop {
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() { return; }
                l.pass().await;
            }
            r = revisions.changed() => {
                if r.is_err() { return; }
                l.pass().await;
            }
            _ = tick.tick() => l.resync().await,
        }
    }
}

#[cfg(test)]
mod tests;
