//! The incremental engine (pure, no I/O): holds the model and the compiled table, and turns
//! each [`Change`] into the [`Ops`] that carry the previous table to `compile(model)`.
//!
//! Cost per change is proportional to what the change touches. Indexes:
//! - every *active* set spec (one referenced by a chain in the table) knows each contributor's
//!   pieces, so an endpoint or network set change re-evaluates every active selector against
//!   that one object and yields element adds/deletes (overlap components are kept
//!   incrementally by [`IntervalSet`]);
//! - each programmed local endpoint keeps the policies that apply to it, so a policy change
//!   re-evaluates that one policy against the local endpoints, and an endpoint change
//!   re-evaluates every policy against that one endpoint;
//! - shared chains (policies, profiles) and sets are reference-counted and created on first
//!   use, removed when the last user goes (at the end of the change, so a policy rewritten in
//!   place keeps its sets).
//!
//! Chains are snapshotted on first touch and diffed at the end: an unchanged chain costs
//! nothing in the batch, a changed one is flushed and refilled within the same transaction.

mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::intervals::IntervalSet;
use super::names;
use super::rules::{self, Families, Piece, SetSpec};
use super::ruleset::{Chain, Element, Family, Ops, Ruleset};
use super::{CompileConfig, Shared};
use crate::model::{
    Direction, Endpoint, Labels, Model, NetworkSet, Policy, PolicyId, Profile, Tier,
};

/// One change of the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    EndpointUpsert(Endpoint),
    EndpointRemove {
        namespace: String,
        name: String,
    },
    /// A namespace's labels (the implicit `kubernetes.io/metadata.name` included).
    NamespaceUpsert {
        name: String,
        labels: Labels,
    },
    NamespaceRemove {
        name: String,
    },
    PolicyUpsert(Policy),
    PolicyRemove(PolicyId),
    TierUpsert(Tier),
    TierRemove {
        name: String,
    },
    NetworkSetUpsert(NetworkSet),
    NetworkSetRemove {
        namespace: Option<String>,
        name: String,
    },
    ProfileUpsert(Profile),
    ProfileRemove {
        name: String,
    },
    ServiceAccountUpsert {
        namespace: String,
        name: String,
        labels: Labels,
    },
    ServiceAccountRemove {
        namespace: String,
        name: String,
    },
}

type EpKey = (String, String);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Contributor {
    Endpoint(EpKey),
    NetworkSet(Option<String>, String),
}

/// A programmed local endpoint.
#[derive(Debug)]
struct Programmed {
    iface: String,
    /// The policies that apply to it (either direction).
    applying: BTreeSet<PolicyId>,
    chains: BTreeSet<String>,
    shared: BTreeSet<Shared>,
    families: Families,
}

#[derive(Debug)]
struct SharedState {
    users: usize,
    specs: Vec<String>,
}

impl SpecState {
    /// Whether network sets contribute to the family's set (then it is an interval set).
    fn has_nets(&self, f: Family) -> bool {
        self.nets[fam_index(f)] > 0
    }

    fn set_name(&self, f: Family) -> String {
        self.spec.name(f, self.has_nets(f))
    }
}

/// An active set spec and its contents (per family).
#[derive(Debug)]
struct SpecState {
    spec: SetSpec,
    refs: usize,
    members: HashMap<Contributor, Vec<Piece>>,
    /// Network sets contributing to each family.
    nets: [usize; 2],
    /// The shared chains that look this set up.
    referrers: BTreeSet<Shared>,
    addrs: [IntervalSet; 2],
    ports: [BTreeMap<(IpAddr, u8, u16), u32>; 2],
}

/// What one change touched, with the state before it.
#[derive(Debug, Default)]
struct Tx {
    chains: BTreeMap<String, Option<Chain>>,
    maps: BTreeMap<(&'static str, String), Option<String>>,
    sets: BTreeMap<String, SetTouch>,
    /// Specs whose sets changed between hash and interval (their referrers are rewritten).
    flipped: BTreeSet<String>,
    /// Programmed endpoints whose applying policies changed, programmed once at the end of
    /// the batch (so a batch of policies rebuilds each endpoint's chains once, not once per
    /// policy).
    pending: BTreeMap<EpKey, BTreeSet<PolicyId>>,
}

#[derive(Debug)]
struct SetTouch {
    existed: bool,
    adds: BTreeSet<Element>,
    dels: BTreeSet<Element>,
}

/// The compiled state of one node's policy, updated change by change.
#[derive(Debug)]
pub struct PolicyEngine {
    node: String,
    cfg: CompileConfig,
    model: Model,
    fams: Families,
    /// Effective labels of every endpoint.
    labels: HashMap<EpKey, Labels>,
    /// Local endpoints claiming each valid interface (the first owns it).
    claims: BTreeMap<String, BTreeSet<EpKey>>,
    programmed: BTreeMap<EpKey, Programmed>,
    by_iface: BTreeMap<String, EpKey>,
    fam_counts: [usize; 2],
    shared: BTreeMap<Shared, SharedState>,
    specs: HashMap<String, SpecState>,
    ruleset: Ruleset,
    /// Times a local endpoint's chains were compiled (the engine's unit of work per change).
    endpoint_programs: u64,
}

fn fam_index(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl PolicyEngine {
    /// An engine for `node` with an empty model (the table holds only the skeleton).
    pub fn new(node: &str) -> PolicyEngine {
        PolicyEngine::with_config(node, CompileConfig::default())
    }

    pub fn with_config(node: &str, cfg: CompileConfig) -> PolicyEngine {
        PolicyEngine {
            node: node.to_string(),
            cfg,
            model: Model::default(),
            fams: Families::default(),
            labels: HashMap::new(),
            claims: BTreeMap::new(),
            programmed: BTreeMap::new(),
            by_iface: BTreeMap::new(),
            fam_counts: [0, 0],
            shared: BTreeMap::new(),
            specs: HashMap::new(),
            ruleset: rules::skeleton(),
            endpoint_programs: 0,
        }
    }

    /// An engine for `node` holding `model` (apply `full()` as a whole-table replace).
    pub fn with_model(node: &str, model: Model) -> PolicyEngine {
        let mut e = PolicyEngine::new(node);
        e.load(model);
        e
    }

    /// Replaces the whole model; the ops are one whole-table replace.
    pub fn load(&mut self, model: Model) -> Ops {
        self.model = model;
        self.rebuild()
    }

    /// The table as it should be now (equal to `compile(self.model(), node)`).
    pub fn full(&self) -> &Ruleset {
        &self.ruleset
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// How many times a local endpoint's chains have been compiled so far: a batch compiles
    /// each endpoint it touches once, however many of its changes concern that endpoint.
    pub fn endpoint_programs(&self) -> u64 {
        self.endpoint_programs
    }

    /// Applies one change to the model and returns the operations that bring the previous
    /// table to the new one (empty when nothing in this node's table changes).
    pub fn handle(&mut self, change: Change) -> Ops {
        self.handle_all([change])
    }

    /// Applies changes in order as one batch and returns the operations that bring the table
    /// before the first to the table after the last (one transaction). Each endpoint's chains
    /// are rebuilt once per batch, so a batch costs what it touches, not changes × endpoints.
    pub fn handle_all(&mut self, changes: impl IntoIterator<Item = Change>) -> Ops {
        let mut tx = Tx::default();
        for change in changes {
            self.apply_change(&mut tx, change);
        }
        self.program_pending(&mut tx);
        self.rewrite_flipped(&mut tx);
        let now = Families {
            v4: self.fam_counts[0] > 0,
            v6: self.fam_counts[1] > 0,
        };
        if now != self.fams {
            // Every rule and set depends on the families: start again.
            return self.rebuild();
        }
        self.gc(&mut tx);
        self.finish(tx)
    }

    fn apply_change(&mut self, tx: &mut Tx, change: Change) {
        match change {
            Change::EndpointUpsert(ep) => {
                let key = (ep.namespace.clone(), ep.name.clone());
                let old = self.model.endpoints.insert(key.clone(), ep);
                self.endpoint_changed(tx, &key, old.as_ref());
            }
            Change::EndpointRemove { namespace, name } => {
                let key = (namespace, name);
                if let Some(old) = self.model.endpoints.remove(&key) {
                    self.endpoint_changed(tx, &key, Some(&old));
                }
            }
            Change::NamespaceUpsert { name, labels } => {
                self.model.namespaces.insert(name.clone(), labels);
                self.namespace_changed(tx, &name);
            }
            Change::NamespaceRemove { name } => {
                self.model.namespaces.remove(&name);
                self.namespace_changed(tx, &name);
            }
            Change::PolicyUpsert(p) => {
                let id = p.id.clone();
                self.model.policies.insert(id.clone(), p);
                self.policy_changed(tx, &id);
            }
            Change::PolicyRemove(id) => {
                self.model.policies.remove(&id);
                self.policy_changed(tx, &id);
            }
            Change::TierUpsert(t) => {
                let name = t.name.clone();
                self.model.tiers.insert(name.clone(), t);
                self.tier_changed(tx, &name);
            }
            Change::TierRemove { name } => {
                self.model.tiers.remove(&name);
                self.tier_changed(tx, &name);
            }
            Change::NetworkSetUpsert(set) => {
                let c = Contributor::NetworkSet(set.namespace.clone(), set.name.clone());
                let sets = &mut self.model.network_sets;
                match sets
                    .iter_mut()
                    .find(|s| s.namespace == set.namespace && s.name == set.name)
                {
                    Some(s) => *s = set,
                    None => sets.push(set),
                }
                self.refresh_member(tx, &c);
            }
            Change::NetworkSetRemove { namespace, name } => {
                self.model
                    .network_sets
                    .retain(|s| !(s.namespace == namespace && s.name == name));
                self.refresh_member(tx, &Contributor::NetworkSet(namespace, name));
            }
            Change::ProfileUpsert(p) => {
                let name = p.name.clone();
                self.model.profiles.insert(name.clone(), p);
                self.profile_changed(tx, &name);
            }
            Change::ProfileRemove { name } => {
                self.model.profiles.remove(&name);
                self.profile_changed(tx, &name);
            }
            Change::ServiceAccountUpsert {
                namespace,
                name,
                labels,
            } => {
                let key = (namespace, name);
                self.model.service_accounts.insert(key.clone(), labels);
                self.service_account_changed(tx, &key);
            }
            Change::ServiceAccountRemove { namespace, name } => {
                let key = (namespace, name);
                self.model.service_accounts.remove(&key);
                self.service_account_changed(tx, &key);
            }
        }
    }

    /// Rebuilds every derived structure from the model; the ops replace the whole table.
    fn rebuild(&mut self) -> Ops {
        let model = std::mem::take(&mut self.model);
        let cfg = self.cfg.clone();
        *self = PolicyEngine::with_config(&self.node, cfg);
        self.model = model;
        for (key, ep) in &self.model.endpoints {
            self.labels
                .insert(key.clone(), ep.effective_labels(&self.model.profiles));
            if let Some(i) = local_iface(&self.node, ep) {
                self.claims
                    .entry(i.to_string())
                    .or_default()
                    .insert(key.clone());
            }
        }
        let owners: Vec<EpKey> = self
            .claims
            .values()
            .filter_map(|c| c.first().cloned())
            .collect();
        self.fams = Families::of(
            owners
                .iter()
                .flat_map(|k| &self.model.endpoints[k].addresses),
        );
        let mut tx = Tx::default();
        for key in &owners {
            self.program_full(&mut tx, key);
        }
        self.rewrite_flipped(&mut tx);
        self.gc(&mut tx);
        Ops::replace(self.ruleset.clone())
    }

    // ---- model changes -------------------------------------------------------------------

    fn endpoint_changed(&mut self, tx: &mut Tx, key: &EpKey, old: Option<&Endpoint>) {
        self.relabel(key);
        self.refresh_member(tx, &Contributor::Endpoint(key.clone()));
        let old_iface = old
            .and_then(|o| local_iface(&self.node, o))
            .map(str::to_string);
        let new_iface = self
            .model
            .endpoints
            .get(key)
            .and_then(|e| local_iface(&self.node, e))
            .map(str::to_string);
        if let Some(i) = &old_iface {
            if let Some(c) = self.claims.get_mut(i) {
                c.remove(key);
                if c.is_empty() {
                    self.claims.remove(i);
                }
            }
        }
        if let Some(i) = &new_iface {
            self.claims
                .entry(i.clone())
                .or_default()
                .insert(key.clone());
        }
        let ifaces: BTreeSet<String> = old_iface.into_iter().chain(new_iface).collect();
        for i in &ifaces {
            let owner = self.claims.get(i).and_then(|c| c.first()).cloned();
            if let Some(holder) = self.by_iface.get(i).cloned() {
                if Some(&holder) != owner.as_ref() {
                    self.unprogram(tx, &holder);
                }
            }
            if let Some(o) = owner {
                self.program_full(tx, &o);
            }
        }
    }

    /// Labels, set membership and (if programmed) chains of an endpoint whose interface did
    /// not change but whose labels or matches may have (namespace, profile, service account).
    fn endpoint_refresh(&mut self, tx: &mut Tx, key: &EpKey) {
        self.relabel(key);
        self.refresh_member(tx, &Contributor::Endpoint(key.clone()));
        if self.programmed.contains_key(key) {
            self.program_full(tx, key);
        }
    }

    fn namespace_changed(&mut self, tx: &mut Tx, ns: &str) {
        for key in self.endpoints_in(ns) {
            self.endpoint_refresh(tx, &key);
        }
        let sets: Vec<Contributor> = self
            .model
            .network_sets
            .iter()
            .filter(|s| s.namespace.as_deref() == Some(ns))
            .map(|s| Contributor::NetworkSet(s.namespace.clone(), s.name.clone()))
            .collect();
        for c in sets {
            self.refresh_member(tx, &c);
        }
    }

    fn service_account_changed(&mut self, tx: &mut Tx, (ns, sa): &EpKey) {
        for key in self.endpoints_in(ns) {
            if self.model.endpoints[&key].service_account.as_ref() == Some(sa) {
                self.endpoint_refresh(tx, &key);
            }
        }
    }

    fn policy_changed(&mut self, tx: &mut Tx, id: &PolicyId) {
        let keys: Vec<EpKey> = self.programmed.keys().cloned().collect();
        for key in keys {
            let was = self.applying(tx, &key).contains(id);
            let now = self.model.policies.get(id).is_some_and(|p| {
                self.model
                    .policy_applies(p, &self.model.endpoints[&key], &self.labels[&key])
            });
            // Also when it applied before and after: its tier or order may have moved.
            if was || now {
                let mut applying = self.applying(tx, &key).clone();
                if now {
                    applying.insert(id.clone());
                } else {
                    applying.remove(id);
                }
                tx.pending.insert(key, applying);
            }
        }
        for d in [Direction::Ingress, Direction::Egress] {
            self.refresh_shared(tx, &Shared::Policy(id.clone(), d));
        }
    }

    fn tier_changed(&mut self, tx: &mut Tx, tier: &str) {
        let keys: Vec<EpKey> = self.programmed.keys().cloned().collect();
        for key in keys {
            let applying = self.applying(tx, &key);
            let in_tier = applying
                .iter()
                .any(|id| self.model.policies.get(id).is_some_and(|p| p.tier == tier));
            if in_tier {
                let applying = applying.clone();
                tx.pending.insert(key, applying);
            }
        }
    }

    /// The policies that apply to a programmed endpoint as of the batch so far.
    fn applying<'a>(&'a self, tx: &'a Tx, key: &EpKey) -> &'a BTreeSet<PolicyId> {
        tx.pending
            .get(key)
            .unwrap_or_else(|| &self.programmed[key].applying)
    }

    /// Programs the endpoints whose applying policies changed in the batch.
    fn program_pending(&mut self, tx: &mut Tx) {
        while let Some((key, applying)) = tx.pending.pop_first() {
            if self.programmed.contains_key(&key) {
                self.program(tx, &key, applying);
            }
        }
    }

    fn profile_changed(&mut self, tx: &mut Tx, name: &str) {
        let keys: Vec<EpKey> = self
            .model
            .endpoints
            .iter()
            .filter(|(_, e)| e.profiles.iter().any(|p| p == name))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.endpoint_refresh(tx, &key);
        }
        for d in [Direction::Ingress, Direction::Egress] {
            self.refresh_shared(tx, &Shared::Profile(name.to_string(), d));
        }
    }

    fn endpoints_in(&self, ns: &str) -> Vec<EpKey> {
        self.model
            .endpoints
            .range((ns.to_string(), String::new())..)
            .take_while(|(k, _)| k.0 == ns)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn relabel(&mut self, key: &EpKey) {
        match self.model.endpoints.get(key) {
            Some(ep) => {
                let l = ep.effective_labels(&self.model.profiles);
                self.labels.insert(key.clone(), l);
            }
            None => {
                self.labels.remove(key);
            }
        }
    }
}

/// The interface an endpoint is programmed on, if it is local and the name is valid.
fn local_iface<'a>(node: &str, ep: &'a Endpoint) -> Option<&'a str> {
    if ep.node != node {
        return None;
    }
    ep.interface
        .as_deref()
        .filter(|i| names::valid_interface(i))
}
