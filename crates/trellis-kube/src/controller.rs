//! The sync shell (I/O): kube-runtime watchers keep a cache per kind (replaced whole at the end
//! of every list, so a relist after 410 Gone drops what vanished meanwhile); a datastore watch
//! says when stored records change (a WorkloadEndpoint created by a CNI ADD after its pod was
//! seen, say); and while this process leads, each changed kind is planned against a fresh
//! listing of the store ([`crate::plan`]) and the ops are committed one guarded transaction
//! each. A kind is planned only once its first list is complete, so a controller that is still
//! listing deletes nothing. Everything is level-based: a periodic resync, a resumed watch, a
//! relist and a restarted controller all converge without writing anything already stored.
//!
//! Writes are fenced: a leader first writes [`FENCE_KEY`] and every write it makes carries that
//! record's revision as a precondition, so once a successor has written the fence, a write the
//! deposed leader still had in flight (a paused process, a slow store) fails instead of landing
//! under the successor — the check of the Lease's deadline before each write cannot cover a
//! write already sent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use trellis_resources::{key_for, Kind, Resource};
use trellis_store::{Datastore, Precondition, TxnOp, TxnOutcome};

use crate::gc::{node_identity, pod_identity, GcHooks, Pass};
use crate::gc_plan::{GcConfig, GcState, Identity, Trust, View};
use crate::lease::{Leadership, LeaseConfig};
use crate::plan::{plan_nodes, plan_owned, plan_pods, Desired, NodeDesired, Op, PodDesired};
use crate::translate::{self, TranslateError};
use crate::{KubeError, Result};

/// The fence record (outside the resource tree: no agent or listing reads it). Holds the
/// identity of the leader that wrote it last; its revision is what that leader's writes require.
pub const FENCE_KEY: &str = "/trellis/kube-controller/fence";

/// Controller settings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub lease: LeaseConfig,
    /// Every kind is planned again this often, even without events.
    pub resync: Duration,
    /// IPAM garbage collection ([`crate::gc`]).
    pub gc: GcConfig,
    /// Its clock and counters.
    pub gc_hooks: GcHooks,
}

/// A Kubernetes client from a kubeconfig file, or inferred (in-cluster service account, then
/// `KUBECONFIG` / `~/.kube/config`) when none is given.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let bad = |reason: String| KubeError::Kubeconfig {
                path: path.display().to_string(),
                reason,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| bad(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Kubeconfig {
                path: "(inferred)".into(),
                reason: e.to_string(),
            })?,
    };
    Ok(Client::try_from(config)?)
}

/// What the controller plans as one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Namespaces,
    ServiceAccounts,
    NetworkPolicies,
    Pods,
    Nodes,
    ClusterNetworkPolicies,
}

impl Target {
    pub const ALL: [Target; 6] = [
        Target::Namespaces,
        Target::ServiceAccounts,
        Target::NetworkPolicies,
        Target::Pods,
        Target::Nodes,
        Target::ClusterNetworkPolicies,
    ];

    /// The stored kinds the target's plan reads and writes (the first is the one it lists
    /// whole for plans of every kind but pods).
    pub fn kinds(self) -> &'static [Kind] {
        match self {
            Target::Namespaces => &[Kind::Namespace],
            Target::ServiceAccounts => &[Kind::ServiceAccount],
            Target::NetworkPolicies => &[Kind::KubernetesNetworkPolicy],
            Target::Pods => &[Kind::Pod, Kind::WorkloadEndpoint],
            Target::Nodes => &[Kind::Node],
            Target::ClusterNetworkPolicies => &[Kind::ClusterNetworkPolicy],
        }
    }
}

/// One change from a watcher, already translated.
#[derive(Debug)]
pub(crate) enum Change {
    Init,
    /// An object (its cache key, its translation, what GC needs of it).
    Apply(String, Entry, Identity),
    Delete(String),
    InitDone,
    /// The watch failed (it resumes or lists again): what GC counted from it is forgotten.
    Error,
}

#[derive(Debug, Clone)]
pub(crate) enum Entry {
    Mirror(Desired),
    Pod(PodDesired),
    Node(NodeDesired),
}

/// A unit of planning: a whole target, or the pods of one namespace (a pod event or an
/// endpoint change re-plans only its namespace: one listing of that namespace's endpoints).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Work {
    All(Target),
    PodNamespace(String),
}

impl Work {
    fn target(&self) -> Target {
        match self {
            Work::All(t) => *t,
            Work::PodNamespace(_) => Target::Pods,
        }
    }
}

#[derive(Debug)]
pub(crate) enum Input {
    Kube(Target, Change),
    /// A stored record of this kind changed (its key).
    Stored(Kind, String),
    /// The store watch was re-established: anything may have changed.
    StoredAll,
}

/// A kind's objects as Kubernetes lists and watches them.
#[derive(Debug, Default)]
struct Cache {
    /// Set once the first list completed.
    ready: bool,
    items: BTreeMap<String, Entry>,
    /// What GC needs of each object (also of those that do not translate), by the same key.
    ids: BTreeMap<String, Identity>,
    /// A list in progress (replaces `items` and `ids` when done).
    building: Option<(BTreeMap<String, Entry>, BTreeMap<String, Identity>)>,
    /// Bumped by every relist and watch error (see [`Trust`]).
    epoch: u64,
}

impl Cache {
    fn handle(&mut self, change: Change) {
        match change {
            Change::Init => {
                self.epoch += 1;
                self.building = Some(Default::default());
            }
            Change::Apply(k, e, id) => {
                let (items, ids) = match &mut self.building {
                    Some((b, i)) => (b, i),
                    None => (&mut self.items, &mut self.ids),
                };
                ids.insert(k.clone(), id);
                items.insert(k, e);
            }
            Change::Delete(k) => {
                self.items.remove(&k);
                self.ids.remove(&k);
            }
            Change::InitDone => {
                (self.items, self.ids) = self.building.take().unwrap_or_default();
                self.ready = true;
            }
            Change::Error => self.epoch += 1,
        }
    }

    /// Whether GC may believe this cache now.
    fn trust(&self) -> Trust {
        if !self.ready {
            Trust::Untrusted("the first list is not complete".into())
        } else if self.building.is_some() {
            Trust::Untrusted("listing again (after 410 Gone or a watch error)".into())
        } else {
            Trust::Complete { epoch: self.epoch }
        }
    }
}

/// Runs the controller: the election, the watchers and the sync loop, until an error of the
/// datastore ends it (watch errors are retried with backoff).
pub async fn run(client: Client, store: Arc<dyn Datastore>, cfg: ControllerConfig) -> Result<()> {
    let leadership = Arc::new(Leadership::default());
    run_with(client, store, cfg, leadership, std::future::pending()).await
}

/// [`run`], publishing whether it leads into `leadership` (which callers may watch), until
/// `shutdown` completes: then it stops writing, stops renewing and gives the Lease up.
pub async fn run_with(
    client: Client,
    store: Arc<dyn Datastore>,
    cfg: ControllerConfig,
    leadership: Arc<Leadership>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.lease.namespace);
    // Ends with this future, also when it is dropped (a killed controller stops renewing).
    let election = AbortOnDrop(vec![tokio::spawn(crate::lease::run(
        leases.clone(),
        cfg.lease.clone(),
        leadership.clone(),
    ))]);
    let result = tokio::select! {
        r = sync(client, store, &cfg, leadership.clone()) => r,
        _ = shutdown => {
            tracing::info!("shutting down");
            Ok(())
        }
    };
    leadership.resign();
    drop(election);
    crate::lease::release(&leases, &cfg.lease).await;
    result
}

/// The sync loop (see the module docs); writes only while `leadership` says so.
pub async fn sync(
    client: Client,
    store: Arc<dyn Datastore>,
    cfg: &ControllerConfig,
    leadership: Arc<Leadership>,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<Input>(1024);
    let mut tasks = vec![
        spawn_watch::<Namespace>(Api::all(client.clone()), Target::Namespaces, tx.clone()),
        spawn_watch::<ServiceAccount>(
            Api::all(client.clone()),
            Target::ServiceAccounts,
            tx.clone(),
        ),
        spawn_watch::<NetworkPolicy>(
            Api::all(client.clone()),
            Target::NetworkPolicies,
            tx.clone(),
        ),
        spawn_watch::<Pod>(Api::all(client.clone()), Target::Pods, tx.clone()),
        spawn_watch::<Node>(Api::all(client.clone()), Target::Nodes, tx.clone()),
        crate::cnp::spawn_watch(client.clone(), tx.clone()),
    ];
    tasks.push(tokio::spawn(watch_store(store.clone(), tx)));
    let _abort = AbortOnDrop(tasks);
    let mut caches: BTreeMap<Target, Cache> =
        Target::ALL.iter().map(|t| (*t, Cache::default())).collect();
    let all = || Target::ALL.into_iter().map(Work::All);
    let mut dirty: BTreeSet<Work> = all().collect();
    let mut resync = tokio::time::interval(cfg.resync);
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let mut was_leader = false;
    // The revision of the fence record this leader wrote (see the module docs).
    let mut fence: Option<i64> = None;
    let mut gc_tick = tokio::time::interval(cfg.gc.interval);
    gc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gc_due = false;
    // In memory only: a restarted controller or a new leader counts again from nothing.
    let mut gc_state = GcState::default();
    loop {
        tokio::select! {
            input = rx.recv() => match input {
                Some(i) => note(i, &mut caches, &mut dirty),
                None => return Ok(()),
            },
            _ = resync.tick() => dirty.extend(all()),
            _ = gc_tick.tick() => gc_due = cfg.gc.enabled,
            _ = poll.tick() => {}
        }
        while let Ok(i) = rx.try_recv() {
            note(i, &mut caches, &mut dirty);
        }
        let leader = leadership.is_leader();
        if leader && !was_leader {
            // What the previous leader wrote (or did not) is unknown: plan everything.
            dirty.extend(all());
        }
        was_leader = leader;
        if !leader {
            fence = None;
            gc_state = GcState::default();
            continue;
        }
        if dirty.contains(&Work::All(Target::Pods)) {
            dirty.retain(|w| !matches!(w, Work::PodNamespace(_)));
        }
        if !gc_due && !dirty.iter().any(|w| caches[&w.target()].ready) {
            continue;
        }
        fence = match ensure_fence(&*store, &cfg.lease.identity, fence, &leadership).await {
            Ok(Some(rev)) => Some(rev),
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "writing the fence record failed; retrying");
                continue;
            }
        };
        let Some(rev) = fence else { continue };
        for w in dirty.clone() {
            let cache = &caches[&w.target()];
            if !cache.ready {
                continue;
            }
            match reconcile(&*store, &w, cache, &leadership, rev).await {
                Ok(true) => {
                    dirty.remove(&w);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(work = ?w, error = %e, "sync failed; retrying"),
            }
        }
        if std::mem::take(&mut gc_due) {
            let (pods, nodes) = (&caches[&Target::Pods], &caches[&Target::Nodes]);
            let (pods_trust, nodes_trust) = (pods.trust(), nodes.trust());
            let view = View {
                pods: &pods.ids,
                pods_trust: &pods_trust,
                nodes: &nodes.ids,
                nodes_trust: &nodes_trust,
            };
            let pass = Pass {
                client: &client,
                store: &*store,
                cfg: &cfg.gc,
                hooks: &cfg.gc_hooks,
                leadership: &leadership,
                fence: rev,
            };
            if let Err(e) = pass.run(&mut gc_state, view).await {
                tracing::warn!(error = %e, "IPAM GC pass failed; retrying at the next");
            }
        }
    }
}

fn note(input: Input, caches: &mut BTreeMap<Target, Cache>, dirty: &mut BTreeSet<Work>) {
    match input {
        Input::Kube(t, change) => {
            let work = match (&change, t) {
                (Change::Apply(k, _, _) | Change::Delete(k), Target::Pods) => k
                    .split_once('/')
                    .map(|(ns, _)| Work::PodNamespace(ns.to_string()))
                    .unwrap_or(Work::All(t)),
                _ => Work::All(t),
            };
            caches
                .get_mut(&t)
                .expect("a cache per target")
                .handle(change);
            dirty.insert(work);
        }
        Input::Stored(kind @ (Kind::WorkloadEndpoint | Kind::Pod), key) => {
            let ns = key
                .strip_prefix(&kind.prefix())
                .and_then(|rest| rest.split_once('/'))
                .map(|(ns, _)| ns.to_string());
            dirty.insert(ns.map_or(Work::All(Target::Pods), Work::PodNamespace));
        }
        Input::Stored(kind, _) => dirty.extend(
            Target::ALL
                .into_iter()
                .filter(|t| t.kinds().contains(&kind))
                .map(Work::All),
        ),
        Input::StoredAll => dirty.extend(Target::ALL.into_iter().map(Work::All)),
    }
}

/// Makes sure the fence record is this leader's: `current` (the revision it wrote) when the
/// record still has it, else writes it again (guarded by what was read) while still leading.
/// `None`: not leading, or another candidate wrote it meanwhile (retried at the next pass).
async fn ensure_fence(
    store: &dyn Datastore,
    identity: &str,
    current: Option<i64>,
    leadership: &Leadership,
) -> Result<Option<i64>> {
    let kv = store.get(FENCE_KEY).await?;
    if let (Some(kv), Some(rev)) = (&kv, current) {
        if kv.mod_revision == rev {
            return Ok(Some(rev));
        }
    }
    if !leadership.is_leader() {
        return Ok(None);
    }
    let pre = match &kv {
        Some(kv) => Precondition::ModRevision(FENCE_KEY.into(), kv.mod_revision),
        None => Precondition::Absent(FENCE_KEY.into()),
    };
    let value = serde_json::to_vec(&serde_json::json!({ "holder": identity }))
        .expect("a JSON object serialises");
    match store
        .txn(vec![pre], vec![TxnOp::Put(FENCE_KEY.into(), value)])
        .await?
    {
        TxnOutcome::Committed { revision } => {
            tracing::info!(revision, "fenced out earlier leaders' writes");
            Ok(Some(revision))
        }
        TxnOutcome::Conflict => Ok(None),
    }
}

/// Plans `w` against a fresh listing and commits the ops, each also requiring the fence record
/// at revision `fence`; `Ok(true)` when all committed (a conflict or lost leadership leaves the
/// work dirty for the next pass).
async fn reconcile(
    store: &dyn Datastore,
    w: &Work,
    cache: &Cache,
    leadership: &Leadership,
    fence: i64,
) -> Result<bool> {
    let t = w.target();
    let (scope, pods_of) = match w {
        Work::All(_) => (String::new(), String::new()),
        Work::PodNamespace(ns) => (format!("{ns}/"), format!("{ns}/")),
    };
    let listing = store
        .list(&format!("{}{scope}", t.kinds()[0].prefix()))
        .await?;
    let ops = match t {
        Target::Pods => {
            // Cache keys are `namespace/name`: one namespace's pods are one range.
            let pods: BTreeMap<(String, String), PodDesired> = cache
                .items
                .range(pods_of.clone()..)
                .take_while(|(k, _)| k.starts_with(&pods_of))
                .filter_map(|(k, e)| match e {
                    Entry::Pod(p) => {
                        let (ns, name) = k.split_once('/')?;
                        Some(((ns.to_string(), name.to_string()), p.clone()))
                    }
                    _ => None,
                })
                .collect();
            let endpoints = store
                .list(&format!("{}{scope}", Kind::WorkloadEndpoint.prefix()))
                .await?;
            plan_pods(&pods, &listing.items, &endpoints.items)
        }
        Target::Nodes => {
            let nodes: BTreeMap<String, NodeDesired> = cache
                .items
                .iter()
                .filter_map(|(k, e)| match e {
                    Entry::Node(n) => Some((k.clone(), n.clone())),
                    _ => None,
                })
                .collect();
            plan_nodes(&nodes, &listing.items)
        }
        _ => {
            let desired: BTreeMap<String, Desired> = cache
                .items
                .iter()
                .filter_map(|(k, e)| match e {
                    Entry::Mirror(d) => Some((k.clone(), d.clone())),
                    _ => None,
                })
                .collect();
            plan_owned(&desired, &listing.items)
        }
    };
    let mut complete = true;
    for op in ops {
        // Checked before every write: a leader whose lease lapsed stops at once.
        if !leadership.is_leader() {
            return Ok(false);
        }
        let (pre, txn_op) = match &op {
            Op::Put {
                key,
                value,
                precondition,
            } => (precondition.clone(), TxnOp::Put(key.clone(), value.clone())),
            Op::Delete { key, revision } => (
                Precondition::ModRevision(key.clone(), *revision),
                TxnOp::Delete(key.clone()),
            ),
        };
        let fenced = Precondition::ModRevision(FENCE_KEY.into(), fence);
        // A write that fails (a record too large for the store, say) is reported and retried
        // at the next pass; it does not hold up the writes after it.
        let outcome = match store.txn(vec![pre, fenced], vec![txn_op]).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(key = op.key(), error = %e, "writing a synced record failed; retrying");
                complete = false;
                continue;
            }
        };
        match outcome {
            TxnOutcome::Committed { revision } => {
                tracing::info!(key = op.key(), revision, write = %if matches!(op, Op::Delete { .. }) { "delete" } else { "put" }, "synced from Kubernetes");
            }
            TxnOutcome::Conflict => complete = false,
        }
    }
    Ok(complete)
}

/// Translates a watched object into its cache key and entry; a bad one is reported.
trait Watched: kube::Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static {
    fn entry(&self) -> (String, Entry);
    /// What IPAM GC needs of the object (pods and nodes).
    fn identity(&self) -> Identity {
        Identity::default()
    }
}

fn report(e: &TranslateError) {
    tracing::warn!(kind = e.kind, object = %e.object, field = %e.field, reason = %e.reason, "skipping a Kubernetes object that does not translate");
}

pub(crate) fn mirror(
    kind: Kind,
    meta: &kube::api::ObjectMeta,
    r: std::result::Result<Resource, TranslateError>,
) -> (String, Entry) {
    let key = key_for(
        kind,
        meta.namespace.as_deref(),
        meta.name.as_deref().unwrap_or_default(),
    );
    match r {
        Ok(r) => (key, Entry::Mirror(Desired::Object(Box::new(r)))),
        Err(e) => {
            report(&e);
            (key, Entry::Mirror(Desired::Invalid))
        }
    }
}

impl Watched for Namespace {
    fn entry(&self) -> (String, Entry) {
        for e in translate::namespace_annotation_errors(self) {
            report(&e);
        }
        mirror(Kind::Namespace, &self.metadata, translate::namespace(self))
    }
}

impl Watched for ServiceAccount {
    fn entry(&self) -> (String, Entry) {
        mirror(
            Kind::ServiceAccount,
            &self.metadata,
            translate::service_account(self),
        )
    }
}

impl Watched for NetworkPolicy {
    fn entry(&self) -> (String, Entry) {
        mirror(
            Kind::KubernetesNetworkPolicy,
            &self.metadata,
            translate::network_policy(self),
        )
    }
}

impl Watched for Node {
    fn identity(&self) -> Identity {
        node_identity(self)
    }
    fn entry(&self) -> (String, Entry) {
        let key = self.metadata.name.clone().unwrap_or_default();
        match translate::node(self) {
            Ok(n) => (key, Entry::Node(NodeDesired::Node(Box::new(n)))),
            Err(e) => {
                report(&e);
                (key, Entry::Node(NodeDesired::Invalid))
            }
        }
    }
}

impl Watched for Pod {
    fn identity(&self) -> Identity {
        pod_identity(self)
    }
    fn entry(&self) -> (String, Entry) {
        let ns = self
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let key = format!("{ns}/{}", self.metadata.name.clone().unwrap_or_default());
        match translate::pod(self) {
            Ok(p) => {
                if let Err(e) = &p.ipam {
                    report(e);
                }
                (key, Entry::Pod(PodDesired::Pod(Box::new(p))))
            }
            Err(e) => {
                report(&e);
                (key, Entry::Pod(PodDesired::Invalid))
            }
        }
    }
}

fn spawn_watch<K: Watched>(
    api: Api<K>,
    t: Target,
    tx: mpsc::Sender<Input>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(watch_kind(api, t, tx, |o: &K| {
        let (k, e) = o.entry();
        (k, e, o.identity())
    }))
}

/// Follows one kind, translating each object with `entry` (its key, what to mirror, and what
/// IPAM GC needs of it), until the receiver is gone.
pub(crate) async fn watch_kind<K>(
    api: Api<K>,
    t: Target,
    tx: mpsc::Sender<Input>,
    entry: impl Fn(&K) -> (String, Entry, Identity),
) where
    K: kube::Resource + Clone + Debug + DeserializeOwned + Send + 'static,
{
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        let change = match ev {
            Ok(Event::Init) => Change::Init,
            Ok(Event::InitApply(o) | Event::Apply(o)) => {
                let (k, e, id) = entry(&o);
                Change::Apply(k, e, id)
            }
            Ok(Event::Delete(o)) => Change::Delete(entry(&o).0),
            Ok(Event::InitDone) => Change::InitDone,
            Err(e) => {
                tracing::warn!(target_kind = ?t, error = %e, "Kubernetes watch failed; listing or resuming again");
                // IPAM GC distrusts the cache until its next complete list.
                Change::Error
            }
        };
        if tx.send(Input::Kube(t, change)).await.is_err() {
            return;
        }
    }
}

/// Follows the stored kinds the plans read; re-established (and everything marked changed)
/// when the watch ends or falls behind a compaction.
async fn watch_store(store: Arc<dyn Datastore>, tx: mpsc::Sender<Input>) {
    let kinds: Vec<Kind> = Target::ALL
        .iter()
        .flat_map(|t| t.kinds().iter().copied())
        .collect();
    let prefixes: Vec<String> = kinds.iter().map(|k| k.prefix()).collect();
    loop {
        let watch = match store.revision().await {
            Ok(rev) => store.watch_prefixes(&prefixes, rev + 1).await,
            Err(e) => Err(e),
        };
        match watch {
            Ok(mut w) => {
                if tx.send(Input::StoredAll).await.is_err() {
                    return;
                }
                // Every agent rewrites its Node at each heartbeat: only a Node not seen before
                // (an agent that registered) needs a plan; a change of its labels by anyone
                // else is put right at the next resync.
                let mut nodes_seen = std::collections::HashSet::new();
                while let Some(Ok(ev)) = w.next().await {
                    let kind = kinds
                        .iter()
                        .copied()
                        .find(|k| ev.key.starts_with(&k.prefix()));
                    let kind = match kind {
                        Some(Kind::Node) if ev.kind == trellis_store::WatchEventKind::Delete => {
                            nodes_seen.remove(&ev.key);
                            None
                        }
                        Some(Kind::Node) if !nodes_seen.insert(ev.key.clone()) => None,
                        k => k,
                    };
                    if let Some(k) = kind {
                        if tx.send(Input::Stored(k, ev.key)).await.is_err() {
                            return;
                        }
                    }
                }
                tracing::info!(store = %store.describe(), "datastore watch ended; watching again");
            }
            Err(e) => tracing::warn!(error = %e, "datastore watch failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nothing_is_written_without_leadership() {
        let dir = tempfile::tempdir().unwrap();
        let spec = format!("sqlite:{}", dir.path().join("t.db").display());
        let store = trellis_store::open(&spec).await.unwrap();
        let ns = trellis_resources::parse_documents(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .unwrap()
        .remove(0);
        let mut cache = Cache::default();
        cache.handle(Change::Init);
        cache.handle(Change::Apply(
            ns.key(),
            Entry::Mirror(Desired::Object(Box::new(ns.clone()))),
            Identity::default(),
        ));
        cache.handle(Change::InitDone);
        let follower = Leadership::default();
        assert_eq!(
            ensure_fence(&*store, "a", None, &follower).await.unwrap(),
            None
        );
        assert!(!reconcile(
            &*store,
            &Work::All(Target::Namespaces),
            &cache,
            &follower,
            0
        )
        .await
        .unwrap());
        assert!(store
            .list(&Kind::Namespace.prefix())
            .await
            .unwrap()
            .items
            .is_empty());
        let leader = Leadership::default();
        leader.set(Some(std::time::Instant::now() + Duration::from_secs(60)));
        let fence = ensure_fence(&*store, "a", None, &leader)
            .await
            .unwrap()
            .unwrap();
        assert!(reconcile(
            &*store,
            &Work::All(Target::Namespaces),
            &cache,
            &leader,
            fence
        )
        .await
        .unwrap());
        assert_eq!(
            store
                .list(&Kind::Namespace.prefix())
                .await
                .unwrap()
                .items
                .len(),
            1
        );
    }

    #[test]
    fn a_relist_replaces_the_cache_and_forgets_what_vanished() {
        let mut cache = Cache::default();
        let e = Entry::Mirror(Desired::Invalid);
        cache.handle(Change::Init);
        cache.handle(Change::Apply("a".into(), e.clone(), Identity::default()));
        cache.handle(Change::Apply("b".into(), e.clone(), Identity::default()));
        cache.handle(Change::InitDone);
        assert!(cache.ready);
        cache.handle(Change::Init);
        cache.handle(Change::Apply("a".into(), e.clone(), Identity::default()));
        // Until the list is done, the old contents stand.
        assert_eq!(cache.items.len(), 2);
        cache.handle(Change::InitDone);
        assert_eq!(cache.items.keys().collect::<Vec<_>>(), ["a"]);
    }
}
