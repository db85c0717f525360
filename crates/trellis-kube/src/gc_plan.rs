//! IPAM garbage collection driven by the Kubernetes API — the pure core (no I/O), after
//! Calico's design/ipam/ipam-gc.md: which pods' addresses and which nodes' blocks are released.
//!
//! A pass ([`GcState::observe`]) takes the controller's view of the API server (pods and nodes
//! as listed and watched, and whether that view is trustworthy), one consistent read of the
//! IPAM records ([`Snapshot`]) and the Trellis Nodes, and the time. An address (a pod's
//! WorkloadEndpoint and its handle) or a node becomes a *candidate* when the view says it is
//! gone; it is *due* only once
//! - it was seen absent in at least two passes at least half an interval apart (the first
//!   sighting is not enough: a pod whose watch event is late, a list that raced its creation),
//! - the grace period has passed since the first sighting,
//! - and the view stayed trustworthy all along: a pass before the first complete list, during a
//!   relist, after a watch error, or whose list shrank by more than `max_shrink` at once (the
//!   API server briefly answering an empty or partial list) observes nothing and forgets every
//!   candidate of that kind, so counting starts again.
//!
//! The state lives in memory only: a restarted controller, or a new leader, starts counting
//! again and never releases before two observations and a grace period of its own. A due
//! candidate is not released yet: the shell first checks it against the API server again (a
//! fresh list, [`fresh_list_ok`], and a GET, [`confirm_pod`] / [`confirm_node`]) and then
//! commits a transaction guarded by the revisions the decision read.
//!
//! "A pod exists" ([`protects`]) means: same namespace and name, and the same UID when the
//! endpoint records one (`K8S_POD_UID`) — for a static pod, the kubelet's UID its mirror pod
//! names in `kubernetes.io/config.mirror`; without a UID (or with an annotation that is no UID),
//! the same node (a pod never moves, so a pod of that name elsewhere, or not scheduled yet, is a
//! later pod). A pod recreated under the same name therefore does not protect the old pod's
//! address, and its own endpoint (its UID) is protected by it.
//!
//! A node gone from Kubernetes is released only once no pod is bound to it any more (in a
//! trusted view, and in the fresh list of the re-check): the node's addresses are its pods'
//! until the API server has no such pod.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use trellis_cluster::ipam::{check_pod_uid, HANDLE_ANNOTATION, POD_UID_ANNOTATION};
use trellis_cluster::snapshot::Snapshot;
use trellis_ipam::cluster as alloc;

/// GC settings (validated from the flags by [`crate::cli`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GcConfig {
    /// How long an address or node must have been seen gone before it is released.
    pub grace: Duration,
    /// How often a pass runs; two observations count only when half of it apart.
    pub interval: Duration,
    /// A list that shrinks by more than this fraction (0-1) since the last pass is not trusted.
    pub max_shrink: f64,
    /// Off: nothing is observed or released.
    pub enabled: bool,
}

impl Default for GcConfig {
    fn default() -> GcConfig {
        GcConfig {
            grace: Duration::from_secs(300),
            interval: Duration::from_secs(60),
            max_shrink: 0.5,
            enabled: true,
        }
    }
}

/// What the API server says of one pod or node (from its metadata, whether or not it
/// translates — a pod that does not translate still exists).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub uid: Option<String>,
    /// `spec.nodeName` of a pod (`None` until scheduled; always `None` for a node).
    pub node: Option<String>,
    /// Of a mirror pod: the UID the kubelet runs its static pod under — what the runtime passes
    /// as `K8S_POD_UID` — from [`MIRROR_ANNOTATION`] (the mirror's own `metadata.uid` differs).
    pub mirror_of: Option<String>,
}

pub use trellis_resources::pod::MIRROR_ANNOTATION;

/// Whether the controller's list of one kind can be believed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Complete: the first list finished, no relist is under way. `epoch` changes with every
    /// relist and watch error, so a pass can tell the view was rebuilt since the last one.
    Complete { epoch: u64 },
    /// Why not.
    Untrusted(String),
}

/// The controller's view of the API server at one pass.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// By `namespace/name`.
    pub pods: &'a BTreeMap<String, Identity>,
    pub pods_trust: &'a Trust,
    /// By name.
    pub nodes: &'a BTreeMap<String, Identity>,
    pub nodes_trust: &'a Trust,
}

/// A Trellis Node record as read: its revision, and whether the controller ever synced it from
/// a Kubernetes Node (it carries [`crate::translate::KUBE_LABELS`]) — only those are ever
/// deleted because Kubernetes has no such node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredNode {
    pub rev: i64,
    pub from_kubernetes: bool,
}

/// A pod's address as GC sees it: the WorkloadEndpoint the CNI ADD wrote, and its handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The endpoint's datastore key (unique per node, container and interface).
    pub endpoint: String,
    pub namespace: String,
    pub pod: String,
    /// The pod UID the ADD recorded, if the runtime passed one (and it is one: see `bad_uid`).
    pub uid: Option<String>,
    /// A pod UID annotation that is no UID (written by hand or another writer): ignored, so the
    /// attachment is judged as one without a UID, and reported.
    pub bad_uid: Option<String>,
    pub node: String,
    pub handle: String,
    pub ips: Vec<IpNet>,
}

impl Attachment {
    /// `namespace/name`, the key of the pod view.
    pub fn pod_key(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }
}

/// Whether the pod `pod` (what the API server says of the attachment's namespace/name, `None`:
/// no such pod) is the attachment's pod.
pub fn protects(pod: Option<&Identity>, a: &Attachment) -> bool {
    let Some(pod) = pod else { return false };
    match (a.uid.as_deref(), pod.uid.as_deref()) {
        // A static pod's endpoint has the kubelet's UID, its mirror pod another.
        (Some(ours), Some(theirs)) => ours == theirs || pod.mirror_of.as_deref() == Some(ours),
        // No UID to compare: a pod never moves, so only a pod of that name on the endpoint's
        // node can be the one that got the address (one not scheduled yet is a later pod).
        _ => pod.node.as_deref() == Some(a.node.as_str()),
    }
}

/// The pods' attachments in `snap`: endpoints naming a namespace and pod, whose handle exists
/// and names the endpoint back (anything else is `ipam check`'s to report, not this GC's).
pub fn attachments(snap: &Snapshot) -> Vec<Attachment> {
    let mut out = Vec::new();
    for (key, w) in &snap.endpoints {
        let o = &w.object;
        let (Some(namespace), Some(pod)) = (o.metadata.namespace.as_ref(), o.spec.pod.as_ref())
        else {
            continue;
        };
        let Some(handle) = o.metadata.annotations.get(HANDLE_ANNOTATION) else {
            continue;
        };
        let Some(h) = snap.handles.get(handle) else {
            continue;
        };
        if h.object.spec.endpoint.as_deref() != Some(key.as_str()) {
            continue;
        }
        let (uid, bad_uid) = match o.metadata.annotations.get(POD_UID_ANNOTATION) {
            Some(u) if check_pod_uid(u).is_ok() => (Some(u.clone()), None),
            Some(u) => (None, Some(u.clone())),
            None => (None, None),
        };
        out.push(Attachment {
            endpoint: key.clone(),
            namespace: namespace.clone(),
            pod: pod.clone(),
            uid,
            bad_uid,
            node: o.spec.node.clone(),
            handle: handle.clone(),
            ips: o.spec.ip_networks.clone(),
        });
    }
    out
}

/// How long something has been seen gone.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Absence {
    since: Instant,
    last: Instant,
    observations: u32,
    /// What was seen gone (an endpoint key reused by another attachment starts again).
    what: String,
}

/// A pod's address due for release (after the re-check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuePod {
    pub attachment: Attachment,
    pub absent_for: Duration,
    pub observations: u32,
}

/// A node due for release (after the re-check): its Trellis Node record as read (`None`: it has
/// none left, only blocks, affinities or addresses naming it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueNode {
    pub node: String,
    pub record: Option<i64>,
    pub absent_for: Duration,
}

/// A candidate not released yet, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The endpoint's datastore key, or `node/NAME`.
    pub key: String,
    pub what: String,
    pub absent_for: Duration,
    pub observations: u32,
}

/// The outcome of one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub pods: Vec<DuePod>,
    pub nodes: Vec<DueNode>,
    /// Candidates still counting.
    pub pending: Vec<Pending>,
    /// Why a kind was not observed this pass (logged by the shell).
    pub refused: Vec<String>,
    /// Bad records judged conservatively (logged by the shell).
    pub bad: Vec<String>,
}

/// One kind's candidates and the list size at the last pass that observed it.
#[derive(Debug, Clone, Default)]
struct Tracker {
    absent: BTreeMap<String, Absence>,
    epoch: Option<u64>,
    count: Option<usize>,
}

impl Tracker {
    /// Whether this kind's view can be used this pass; otherwise every candidate is forgotten
    /// and the reason returned.
    fn admit(
        &mut self,
        kind: &str,
        trust: &Trust,
        count: usize,
        max_shrink: f64,
    ) -> Result<(), String> {
        let refuse = |t: &mut Tracker, why: String| {
            t.absent.clear();
            Err(format!(
                "{kind}: {why}; nothing released, counting starts again"
            ))
        };
        let epoch = match trust {
            Trust::Untrusted(why) => {
                self.epoch = None;
                return refuse(self, why.clone());
            }
            Trust::Complete { epoch } => *epoch,
        };
        let previous = (self.epoch, self.count);
        self.epoch = Some(epoch);
        self.count = Some(count);
        if previous.0.is_some_and(|e| e != epoch) && !self.absent.is_empty() {
            // Relisted or the watch failed since the last pass: what was counted came from
            // another view.
            self.absent.clear();
        }
        if let Some(before) = previous.1 {
            if let Err(why) = fresh_list_ok(before, count, max_shrink) {
                return refuse(self, why);
            }
        }
        Ok(())
    }

    /// Notes `key` (describing `what`) seen gone at `now`; the absence as it stands.
    fn seen_gone(&mut self, key: &str, what: &str, now: Instant, min_gap: Duration) -> &Absence {
        let fresh = Absence {
            since: now,
            last: now,
            observations: 1,
            what: what.to_string(),
        };
        let a = self
            .absent
            .entry(key.to_string())
            .or_insert_with(|| fresh.clone());
        if a.what != what {
            *a = fresh;
        } else if now.saturating_duration_since(a.last) >= min_gap && a.last != now {
            a.observations += 1;
            a.last = now;
        }
        a
    }
}

fn due(a: &Absence, now: Instant, grace: Duration) -> bool {
    a.observations >= 2 && now.saturating_duration_since(a.since) >= grace
}

/// The GC's memory between passes (candidates and list sizes), in memory only.
#[derive(Debug, Clone, Default)]
pub struct GcState {
    pods: Tracker,
    nodes: Tracker,
    /// The candidates last reported by [`GcState::changed_candidates`].
    reported: Option<BTreeSet<String>>,
}

impl GcState {
    /// Every candidate (endpoint keys and `node/NAME`) with how long it has been seen gone,
    /// when the set differs from the one this returned last (`None`: unchanged).
    pub fn changed_candidates(&mut self, now: Instant) -> Option<BTreeMap<String, Duration>> {
        let all: BTreeMap<String, Duration> =
            self.pods
                .absent
                .iter()
                .map(|(k, a)| (k.clone(), now.saturating_duration_since(a.since)))
                .chain(
                    self.nodes.absent.iter().map(|(k, a)| {
                        (format!("node/{k}"), now.saturating_duration_since(a.since))
                    }),
                )
                .collect();
        let keys: BTreeSet<String> = all.keys().cloned().collect();
        if self.reported.as_ref() == Some(&keys) {
            return None;
        }
        self.reported = Some(keys);
        Some(all)
    }

    /// Forgets every pod candidate (a re-check that could not be trusted).
    pub fn forget_pods(&mut self) {
        self.pods.absent.clear();
    }

    /// Forgets every node candidate.
    pub fn forget_nodes(&mut self) {
        self.nodes.absent.clear();
    }

    /// One pass at `now`: updates the candidates from `view` and the stored records, and says
    /// which are due (to be checked against the API server again before release).
    pub fn observe(
        &mut self,
        cfg: &GcConfig,
        now: Instant,
        view: View<'_>,
        snap: &Snapshot,
        stored_nodes: &BTreeMap<String, StoredNode>,
    ) -> Decision {
        let mut d = Decision::default();
        let min_gap = cfg.interval / 2;
        let pods_admitted =
            self.pods
                .admit("pods", view.pods_trust, view.pods.len(), cfg.max_shrink);
        let pods_trusted = pods_admitted.is_ok();
        match pods_admitted {
            Err(why) => d.refused.push(why),
            Ok(()) => {
                let mut seen = BTreeSet::new();
                for a in attachments(snap) {
                    if let Some(bad) = &a.bad_uid {
                        d.bad.push(format!(
                            "endpoint {}: {POD_UID_ANNOTATION} {:?} is no pod UID; judged by name and node",
                            a.endpoint,
                            bad.chars().take(64).collect::<String>()
                        ));
                    }
                    // Only nodes Kubernetes knows: a deleted node is the node rule's, and a
                    // node Kubernetes never had runs workloads this controller cannot judge.
                    if !view.nodes.contains_key(&a.node)
                        || protects(view.pods.get(&a.pod_key()), &a)
                    {
                        continue;
                    }
                    let what = format!("{} {}", a.pod_key(), a.handle);
                    let abs = self
                        .pods
                        .seen_gone(&a.endpoint, &what, now, min_gap)
                        .clone();
                    seen.insert(a.endpoint.clone());
                    let absent_for = now.saturating_duration_since(abs.since);
                    if due(&abs, now, cfg.grace) {
                        d.pods.push(DuePod {
                            attachment: a,
                            absent_for,
                            observations: abs.observations,
                        });
                    } else {
                        d.pending.push(Pending {
                            key: a.endpoint.clone(),
                            what: format!("pod {what}"),
                            absent_for,
                            observations: abs.observations,
                        });
                    }
                }
                // A pod that came back, or an address released by someone else: forgotten.
                self.pods.absent.retain(|k, _| seen.contains(k));
            }
        }
        match self
            .nodes
            .admit("nodes", view.nodes_trust, view.nodes.len(), cfg.max_shrink)
        {
            Err(why) => d.refused.push(why),
            Ok(()) => {
                let mut seen = BTreeSet::new();
                let bound = bound_pods(view.pods);
                for (node, record) in node_candidates(snap, stored_nodes) {
                    if view.nodes.contains_key(&node) {
                        continue;
                    }
                    let abs = self.nodes.seen_gone(&node, &node, now, min_gap).clone();
                    seen.insert(node.clone());
                    let absent_for = now.saturating_duration_since(abs.since);
                    // Its pods' addresses are theirs while a pod is bound to it, and a view of
                    // pods that is not trusted cannot say none is.
                    let held = match bound.get(node.as_str()) {
                        Some(n) => Some(format!("{n} pod(s) still bound to it")),
                        None if !pods_trusted => Some("the pod view is not trusted".into()),
                        None => None,
                    };
                    if let (true, None) = (due(&abs, now, cfg.grace), &held) {
                        d.nodes.push(DueNode {
                            node,
                            record,
                            absent_for,
                        });
                    } else {
                        d.pending.push(Pending {
                            key: format!("node/{node}"),
                            what: match held {
                                Some(why) => format!("node {node} ({why})"),
                                None => format!("node {node}"),
                            },
                            absent_for,
                            observations: abs.observations,
                        });
                    }
                }
                self.nodes.absent.retain(|k, _| seen.contains(k));
            }
        }
        d
    }
}

/// How many pods `pods` binds to each node (`spec.nodeName`).
fn bound_pods(pods: &BTreeMap<String, Identity>) -> BTreeMap<&str, usize> {
    let mut out: BTreeMap<&str, usize> = BTreeMap::new();
    for n in pods.values().filter_map(|p| p.node.as_deref()) {
        *out.entry(n).or_default() += 1;
    }
    out
}

/// Nodes this GC may release when Kubernetes has no such node: Trellis Nodes once synced from
/// a Kubernetes Node, and names that blocks, affinities or allocations still carry but that
/// have no Trellis Node at all (left by a release interrupted after the Node was deleted).
fn node_candidates(
    snap: &Snapshot,
    stored: &BTreeMap<String, StoredNode>,
) -> BTreeMap<String, Option<i64>> {
    let mut out: BTreeMap<String, Option<i64>> = stored
        .iter()
        .filter(|(_, s)| s.from_kubernetes)
        .map(|(n, s)| (n.clone(), Some(s.rev)))
        .collect();
    let mut named: BTreeSet<&str> = BTreeSet::new();
    for b in &snap.blocks {
        named.extend(alloc::block_node(&b.object.spec));
        for (_, a) in alloc::allocations(&b.object.spec) {
            named.extend(a.secondary.get("node").map(String::as_str));
        }
    }
    named.extend(
        snap.affinities
            .values()
            .map(|a| a.object.spec.node.as_str()),
    );
    for n in named {
        if !snap.nodes.contains(n) && !stored.contains_key(n) {
            out.insert(n.to_string(), None);
        }
    }
    out
}

/// Whether a list of `fresh` items can follow one of `before` items: not when it shrank by
/// more than `max_shrink` (a fraction) at once — the API server answering an empty or partial
/// list — unless the drop is a single item.
pub fn fresh_list_ok(before: usize, fresh: usize, max_shrink: f64) -> Result<(), String> {
    let lost = before.saturating_sub(fresh);
    if lost > 1 && lost as f64 > before as f64 * max_shrink {
        return Err(format!(
            "the list shrank from {before} to {fresh} at once (more than {:.0}%)",
            max_shrink * 100.0
        ));
    }
    Ok(())
}

/// `trellis ipam check` in Kubernetes mode: the attachments whose pod is not among `pods` (the
/// mirrored Pod records, by `namespace/name`) — by the same rule GC applies ([`protects`]).
pub fn pod_leaks(snap: &Snapshot, pods: &BTreeMap<String, Identity>) -> Vec<Attachment> {
    attachments(snap)
        .into_iter()
        .filter(|a| !protects(pods.get(&a.pod_key()), a))
        .collect()
}

/// The re-check of a due pod address just before release: still gone from a fresh list
/// (`fresh`, by `namespace/name`) and from a direct GET (`got`: `None` when the API server
/// answered 404 Not Found).
pub fn confirm_pod(
    a: &Attachment,
    fresh: &BTreeMap<String, Identity>,
    got: Option<&Identity>,
) -> bool {
    !protects(fresh.get(&a.pod_key()), a) && !protects(got, a)
}

/// The re-check of a due node: absent from a fresh list and from a direct GET, and no pod of
/// a fresh list of pods (`pods`, by `namespace/name`) bound to it.
pub fn confirm_node(
    node: &str,
    fresh: &BTreeMap<String, Identity>,
    got: Option<&Identity>,
    pods: &BTreeMap<String, Identity>,
) -> bool {
    !fresh.contains_key(node)
        && got.is_none()
        && !pods.values().any(|p| p.node.as_deref() == Some(node))
}

#[cfg(test)]
#[path = "gc_plan_tests.rs"]
mod tests;
