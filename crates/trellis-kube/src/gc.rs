//! IPAM garbage collection driven by the Kubernetes API — the shell (I/O): one pass reads the
//! IPAM records and the Trellis Nodes, lets the planner ([`crate::gc_plan`]) decide, checks
//! each due candidate against the API server again (a fresh list, then a GET of that pod or
//! node), and releases what is still gone, each release one transaction guarded by the
//! revisions the decision read and by the leader's fence record. Runs only in the leader.
//!
//! A released pod address is logged with its pod, addresses and how long it was seen gone, and
//! counted in [`GcStats`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use kube::{Api, Client};
use trellis_cluster::gc::{gc, GcScope};
use trellis_cluster::objects;
use trellis_cluster::release::{release_decided, Attempt};
use trellis_cluster::snapshot::Snapshot;
use trellis_cluster::{Clock, SystemClock};
use trellis_resources::{key_for, Kind, Resource};
use trellis_store::{Datastore, Precondition, TxnOp, TxnOutcome};

use crate::controller::FENCE_KEY;
use crate::gc_plan::{
    confirm_node, confirm_pod, fresh_list_ok, DueNode, DuePod, GcConfig, GcState, Identity,
    StoredNode, View, MIRROR_ANNOTATION,
};
use crate::lease::Leadership;
use crate::translate::KUBE_LABELS;
use crate::Result;

/// The record where the leader reports what GC has seen gone and since when (outside the
/// resource tree, like the fence): `trellis ipam check` prints it beside each leak. Written
/// only when the set of candidates changes; a report, never read back by GC.
pub const GC_STATUS_KEY: &str = "/trellis/kube-controller/ipam-gc";

/// The content of [`GC_STATUS_KEY`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GcStatus {
    /// When it was written (seconds since the epoch).
    pub updated: u64,
    /// The grace period, in seconds.
    pub grace: u64,
    /// Each candidate (an endpoint's key, or `node/NAME`) and when it was first seen gone
    /// (seconds since the epoch) by the controller that wrote this.
    pub seen_gone_since: BTreeMap<String, u64>,
}

/// Counters of the GC (what a metrics endpoint would export; tests wait on them).
#[derive(Debug, Default)]
pub struct GcStats {
    /// Passes run (as leader).
    pub passes: AtomicU64,
    /// Pod attachments released, and their addresses.
    pub released_attachments: AtomicU64,
    pub released_addresses: AtomicU64,
    /// Nodes whose blocks were released.
    pub released_nodes: AtomicU64,
    /// Passes (per kind) that observed nothing because the view was not trustworthy.
    pub refused: AtomicU64,
    /// Due candidates the re-check against the API server found alive (or could not check).
    pub spared: AtomicU64,
    /// Releases that conflicted with a concurrent writer (decided again at the next pass).
    pub conflicts: AtomicU64,
    /// Candidates counting at the last pass.
    pub pending: AtomicU64,
}

impl GcStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::SeqCst);
    }
}

/// The GC's seams: the clock (tests move it instead of waiting minutes) and its counters.
#[derive(Clone)]
pub struct GcHooks {
    pub clock: Arc<dyn Clock>,
    pub stats: Arc<GcStats>,
}

impl Default for GcHooks {
    fn default() -> GcHooks {
        GcHooks {
            clock: Arc::new(SystemClock),
            stats: Arc::default(),
        }
    }
}

impl fmt::Debug for GcHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcHooks")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// What the API server says of a pod.
pub fn pod_identity(p: &Pod) -> Identity {
    Identity {
        uid: p.metadata.uid.clone().filter(|u| !u.is_empty()),
        node: p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        mirror_of: mirror_of(p.metadata.annotations.as_ref()),
    }
}

/// The static pod's UID a mirror pod names ([`MIRROR_ANNOTATION`]).
fn mirror_of(annotations: Option<&BTreeMap<String, String>>) -> Option<String> {
    annotations?
        .get(MIRROR_ANNOTATION)
        .filter(|u| !u.is_empty())
        .cloned()
}

/// What the API server says of a node.
pub fn node_identity(n: &Node) -> Identity {
    Identity {
        uid: n.metadata.uid.clone().filter(|u| !u.is_empty()),
        node: None,
        mirror_of: None,
    }
}

/// What one pass needs besides the view.
pub(crate) struct Pass<'a> {
    pub client: &'a Client,
    pub store: &'a dyn Datastore,
    pub cfg: &'a GcConfig,
    pub hooks: &'a GcHooks,
    pub leadership: &'a Leadership,
    /// The revision of this leader's fence record (required by every write).
    pub fence: i64,
}

impl Pass<'_> {
    fn fenced(&self) -> Precondition {
        Precondition::ModRevision(FENCE_KEY.into(), self.fence)
    }

    /// One pass (see the module docs).
    pub async fn run(&self, state: &mut GcState, view: View<'_>) -> Result<()> {
        let stats = &self.hooks.stats;
        let snap = Snapshot::read(self.store).await?;
        let stored = self.stored_nodes().await?;
        let now = self.hooks.clock.instant();
        let d = state.observe(self.cfg, now, view, &snap, &stored);
        GcStats::add(&stats.passes, 1);
        stats
            .pending
            .store(d.pending.len() as u64, Ordering::SeqCst);
        for why in &d.refused {
            tracing::warn!(reason = %why, "IPAM GC: not trusting the Kubernetes view this pass");
            GcStats::add(&stats.refused, 1);
        }
        for why in &d.bad {
            tracing::warn!(record = %why, "IPAM GC: bad record");
        }
        for p in &d.pending {
            tracing::debug!(candidate = %p.what, absent_secs = p.absent_for.as_secs(), observations = p.observations, "IPAM GC: seen gone, not released yet");
        }
        // One fresh list of pods serves both re-checks: a due pod's, and a due node's (no pod
        // may be bound to it).
        let fresh_pods = if d.pods.is_empty() && d.nodes.is_empty() {
            Ok(BTreeMap::new())
        } else {
            self.fresh_pods(view.pods.len()).await
        };
        if !d.pods.is_empty() {
            match &fresh_pods {
                Ok(fresh) => {
                    for due in &d.pods {
                        self.release_pod(&snap, fresh, due).await?;
                    }
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "IPAM GC: re-check of pods failed; nothing released, counting starts again");
                    state.forget_pods();
                    GcStats::add(&stats.spared, d.pods.len() as u64);
                }
            }
        }
        if !d.nodes.is_empty() {
            let fresh = match fresh_pods {
                Ok(pods) => self.fresh_nodes(view.nodes.len()).await.map(|n| (n, pods)),
                Err(why) => Err(why),
            };
            match fresh {
                Ok((fresh, pods)) => {
                    for due in &d.nodes {
                        self.release_node(&fresh, &pods, due).await?;
                    }
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "IPAM GC: re-check of nodes failed; nothing released, counting starts again");
                    state.forget_nodes();
                    GcStats::add(&stats.spared, d.nodes.len() as u64);
                }
            }
        }
        if let Some(c) = state.changed_candidates(now) {
            self.publish(c).await?;
        }
        Ok(())
    }

    /// Writes [`GC_STATUS_KEY`] (fenced, like every write of this leader).
    async fn publish(&self, candidates: BTreeMap<String, std::time::Duration>) -> Result<()> {
        let now = self.hooks.clock.now_secs();
        let status = GcStatus {
            updated: now,
            grace: self.cfg.grace.as_secs(),
            seen_gone_since: candidates
                .into_iter()
                .map(|(k, d)| (k, now.saturating_sub(d.as_secs())))
                .collect(),
        };
        let value = serde_json::to_vec(&status).expect("a plain struct serialises");
        let put = vec![TxnOp::Put(GC_STATUS_KEY.into(), value)];
        if let TxnOutcome::Conflict = self.store.txn(vec![self.fenced()], put).await? {
            tracing::debug!("IPAM GC status not written: fenced out");
        }
        Ok(())
    }

    /// The Trellis Nodes with their revisions, and whether each was synced from Kubernetes.
    async fn stored_nodes(&self) -> Result<BTreeMap<String, StoredNode>> {
        let mut out = BTreeMap::new();
        for kv in self.store.list(&Kind::Node.prefix()).await?.items {
            let Some(name) = kv.key.strip_prefix(&Kind::Node.prefix()) else {
                continue;
            };
            // A record that does not decode is still a node: kept, never deleted here.
            let from_kubernetes = matches!(
                objects::decode(&kv).map(|s| s.resource),
                Ok(Resource::Node(n)) if n.metadata.annotations.contains_key(KUBE_LABELS)
            );
            out.insert(
                name.to_string(),
                StoredNode {
                    rev: kv.mod_revision,
                    from_kubernetes,
                },
            );
        }
        Ok(out)
    }

    /// A fresh list of pods, refused when it is much shorter than the controller's view.
    async fn fresh_pods(
        &self,
        cached: usize,
    ) -> std::result::Result<BTreeMap<String, Identity>, String> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing pods: {e}"))?;
        let fresh: BTreeMap<String, Identity> = list
            .items
            .iter()
            .map(|p| {
                let ns = p
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                let name = p.metadata.name.clone().unwrap_or_default();
                (format!("{ns}/{name}"), pod_identity(p))
            })
            .collect();
        fresh_list_ok(cached, fresh.len(), self.cfg.max_shrink)
            .map_err(|why| format!("fresh pod list: {why}"))?;
        Ok(fresh)
    }

    async fn fresh_nodes(
        &self,
        cached: usize,
    ) -> std::result::Result<BTreeMap<String, Identity>, String> {
        let api: Api<Node> = Api::all(self.client.clone());
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing nodes: {e}"))?;
        let fresh: BTreeMap<String, Identity> = list
            .items
            .iter()
            .map(|n| {
                (
                    n.metadata.name.clone().unwrap_or_default(),
                    node_identity(n),
                )
            })
            .collect();
        fresh_list_ok(cached, fresh.len(), self.cfg.max_shrink)
            .map_err(|why| format!("fresh node list: {why}"))?;
        Ok(fresh)
    }

    /// Re-checks a due pod address (fresh list, GET) and releases it, guarded by what the
    /// pass read.
    async fn release_pod(
        &self,
        snap: &Snapshot,
        fresh: &BTreeMap<String, Identity>,
        due: &DuePod,
    ) -> Result<()> {
        let stats = &self.hooks.stats;
        let a = &due.attachment;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &a.namespace);
        let got = match api.get_opt(&a.pod).await {
            Ok(p) => p.as_ref().map(pod_identity),
            Err(e) => {
                tracing::warn!(pod = %a.pod_key(), error = %e, "IPAM GC: cannot re-check the pod; not released");
                GcStats::add(&stats.spared, 1);
                return Ok(());
            }
        };
        if !confirm_pod(a, fresh, got.as_ref()) {
            tracing::info!(pod = %a.pod_key(), endpoint = %a.endpoint, "IPAM GC: the re-check found the pod; not released");
            GcStats::add(&stats.spared, 1);
            return Ok(());
        }
        let (Some(ep), Some(h)) = (snap.endpoints.get(&a.endpoint), snap.handles.get(&a.handle))
        else {
            return Ok(());
        };
        // Checked before every write: a leader whose lease lapsed stops at once.
        if !self.leadership.is_leader() {
            return Ok(());
        }
        let now = self.hooks.clock.now_secs();
        match release_decided(self.store, ep, h, &[self.fenced()], now).await? {
            Attempt::Released(ips) => {
                GcStats::add(&stats.released_attachments, 1);
                GcStats::add(&stats.released_addresses, ips.len() as u64);
                let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
                tracing::info!(
                    pod = %a.pod_key(),
                    uid = a.uid.as_deref().unwrap_or("-"),
                    node = %a.node,
                    addresses = %ips.join(","),
                    absent_secs = due.absent_for.as_secs(),
                    observations = due.observations,
                    "IPAM GC: released the address of a pod that no longer exists"
                );
            }
            Attempt::Conflict | Attempt::NotHeld => {
                tracing::info!(pod = %a.pod_key(), endpoint = %a.endpoint, "IPAM GC: the attachment changed since the decision; deciding again next pass");
                GcStats::add(&stats.conflicts, 1);
            }
        }
        Ok(())
    }

    /// Re-checks a due node (fresh list, GET, no pod of the fresh pod list `pods` bound to it)
    /// and releases it: its Trellis Node deleted (guarded by the revision read and the fence),
    /// then its addresses, blocks, affinities and tunnel address as `trellis delete node` does
    /// — each on condition the node is still absent.
    async fn release_node(
        &self,
        fresh: &BTreeMap<String, Identity>,
        pods: &BTreeMap<String, Identity>,
        due: &DueNode,
    ) -> Result<()> {
        let stats = &self.hooks.stats;
        let api: Api<Node> = Api::all(self.client.clone());
        let got = match api.get_opt(&due.node).await {
            Ok(n) => n.as_ref().map(node_identity),
            Err(e) => {
                tracing::warn!(node = %due.node, error = %e, "IPAM GC: cannot re-check the node; not released");
                GcStats::add(&stats.spared, 1);
                return Ok(());
            }
        };
        if !confirm_node(&due.node, fresh, got.as_ref(), pods) {
            tracing::info!(node = %due.node, "IPAM GC: the re-check found the node, or a pod bound to it; not released");
            GcStats::add(&stats.spared, 1);
            return Ok(());
        }
        if !self.leadership.is_leader() {
            return Ok(());
        }
        if let Some(rev) = due.record {
            let key = key_for(Kind::Node, None, &due.node);
            let pre = vec![Precondition::ModRevision(key.clone(), rev), self.fenced()];
            if let TxnOutcome::Conflict = self.store.txn(pre, vec![TxnOp::Delete(key)]).await? {
                tracing::info!(node = %due.node, "IPAM GC: the node's record changed since the decision; deciding again next pass");
                GcStats::add(&stats.conflicts, 1);
                return Ok(());
            }
        }
        let now = self.hooks.clock.now_secs();
        let r = gc(self.store, now, u64::MAX, &GcScope::Node(due.node.clone())).await?;
        // Its BGP status report goes with it, as with `trellis delete node`.
        match objects::delete(self.store, Kind::BgpStatus, None, &due.node).await {
            Ok(()) | Err(trellis_cluster::ClusterError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        GcStats::add(&stats.released_nodes, 1);
        tracing::info!(
            node = %due.node,
            absent_secs = due.absent_for.as_secs(),
            attachments = r.released_handles.len(),
            blocks = r.deleted_blocks.len(),
            affinities = r.deleted_affinities.len(),
            conflicts = r.conflicts,
            "IPAM GC: released a node that no longer exists in Kubernetes"
        );
        Ok(())
    }
}

/// An address `trellis ipam check` reports as leaked in Kubernetes mode.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodLeak {
    pub namespace: String,
    pub pod: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub node: String,
    pub endpoint: String,
    pub handle: String,
    pub addresses: Vec<String>,
    /// How long the leading kube-controller's GC has seen the pod gone (`None`: not yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen_gone_secs: Option<u64>,
    /// Its grace period, when it reported one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_secs: Option<u64>,
}

/// Addresses of pods that have no Pod record (the kube-controller's mirror of the API server),
/// judged as GC judges them ([`crate::gc_plan::pod_leaks`]), with how long GC has seen each
/// gone. `None` outside Kubernetes mode (no Pod record and no kube-controller ever led).
/// Reads only. The Pod records are read after the IPAM records, so an endpoint's record (which
/// the agent writes only once its pod's record exists) is never reported for a live pod.
pub async fn pod_leaks(store: &dyn Datastore, now: u64) -> Result<Option<Vec<PodLeak>>> {
    let snap = Snapshot::read(store).await?;
    let records = objects::list(store, Kind::Pod).await?;
    if records.is_empty() && store.get(FENCE_KEY).await?.is_none() {
        return Ok(None);
    }
    let pods: BTreeMap<String, Identity> = records
        .into_iter()
        .filter_map(|s| match s.resource {
            Resource::Pod(p) => Some((
                format!(
                    "{}/{}",
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.metadata.name
                ),
                Identity {
                    uid: p.metadata.uid.clone(),
                    node: p.spec.node_name.clone(),
                    mirror_of: mirror_of(Some(&p.metadata.annotations)),
                },
            )),
            _ => None,
        })
        .collect();
    let status: Option<GcStatus> = match store.get(GC_STATUS_KEY).await? {
        Some(kv) => serde_json::from_slice(&kv.value)
            .map_err(|e| tracing::warn!(key = GC_STATUS_KEY, error = %e, "IPAM GC status does not decode; ignored"))
            .ok(),
        None => None,
    };
    Ok(Some(
        crate::gc_plan::pod_leaks(&snap, &pods)
            .into_iter()
            .map(|a| {
                let since = status
                    .as_ref()
                    .and_then(|s| s.seen_gone_since.get(&a.endpoint));
                PodLeak {
                    seen_gone_secs: since.map(|t| now.saturating_sub(*t)),
                    grace_secs: status.as_ref().map(|s| s.grace),
                    namespace: a.namespace,
                    pod: a.pod,
                    uid: a.uid,
                    node: a.node,
                    endpoint: a.endpoint,
                    handle: a.handle,
                    addresses: a.ips.iter().map(|n| n.addr().to_string()).collect(),
                }
            })
            .collect(),
    ))
}
