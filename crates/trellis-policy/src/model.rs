//! The policy model: the one internal form that Kubernetes NetworkPolicy and Calico's policy
//! kinds translate into, and what the evaluator and the compiler both read. Pure data.
//!
//! Evaluation order (DESIGN.md "Policy"; Calico's semantics): tiers by `order` (lowest first,
//! `None` last) then name; within a tier, policies by `order` then name; within a policy,
//! rules in order. Allow and Deny end the evaluation of a direction, Pass skips to the next
//! tier, Log records and continues. A tier in which at least one policy applies to the
//! endpoint for the direction but no rule decided ends with the tier's default action. After
//! the tiers, the endpoint's profiles (if it lists any) decide, ending in Deny when none of
//! their rules matched (as Calico's profiles do). An endpoint that no policy selects for a
//! direction, and that lists no profile, is allowed. Kubernetes NetworkPolicies live in the
//! `default` tier at order 1000, as in Calico. Traffic between a pod and its own node is always
//! allowed (kubelet probes).
//!
//! ClusterNetworkPolicies (sig-network's policy API) live in two built-in tiers around all of
//! those: [`ADMIN_TIER`] before every other tier and [`BASELINE_TIER`] after every other tier
//! (whatever their orders), so the order is Admin → Calico/Trellis tiers and Kubernetes
//! NetworkPolicy → Baseline → profiles → allow. Both end in Pass: an Admin policy that does not
//! decide hands the flow to the NetworkPolicy tiers (its Pass rules do so at once), a Baseline
//! one to the profiles (none: allowed). Within them, policies by priority, then name.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use trellis_resources::Selector;

/// Labels of an endpoint, namespace, network set or service account.
pub type Labels = BTreeMap<String, String>;

/// The tier Kubernetes NetworkPolicies and tier-less Calico policies belong to.
pub const DEFAULT_TIER: &str = "default";
/// The built-in tier of ClusterNetworkPolicies with `tier: Admin` (evaluated first).
pub const ADMIN_TIER: &str = "admin";
/// The built-in tier of ClusterNetworkPolicies with `tier: Baseline` (evaluated last).
pub const BASELINE_TIER: &str = "baseline";
/// Calico's order for the `default` tier (tiers without an order sort after it).
pub const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;
/// The order Kubernetes NetworkPolicies get in the `default` tier (as in Calico).
pub const KUBERNETES_POLICY_ORDER: f64 = 1000.0;

/// Implicit labels every endpoint carries (Calico's names), so selectors can name them.
pub const LABEL_NAMESPACE: &str = "projectcalico.org/namespace";
pub const LABEL_ORCHESTRATOR: &str = "projectcalico.org/orchestrator";
pub const LABEL_SERVICE_ACCOUNT: &str = "projectcalico.org/serviceaccount";
/// The label Kubernetes puts on every namespace (1.21+): its own name.
pub const LABEL_NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";
/// The label Calico gives namespaces and service accounts as selectors see them: the name.
pub const LABEL_NAME: &str = "projectcalico.org/name";

/// A direction as seen from the endpoint a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// Traffic to the endpoint.
    Ingress,
    /// Traffic from the endpoint.
    Egress,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
    /// Skip the rest of this tier; evaluation continues with the next tier.
    Pass,
    /// Record the packet and continue with the next rule.
    Log,
}

/// What a tier does when policies in it apply to an endpoint but none decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TierDefault {
    Deny,
    Pass,
}

/// An IP protocol a rule can name (Calico: TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite, or 1–255).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
    UdpLite,
    Number(u8),
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Icmp => 1,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmpv6 => 58,
            Protocol::Sctp => 132,
            Protocol::UdpLite => 136,
            Protocol::Number(n) => n,
        }
    }

    /// Whether packets of this protocol have ports (rules with ports need one of these).
    pub fn has_ports(self) -> bool {
        matches!(self.number(), 6 | 17 | 132 | 136)
    }
}

/// A destination or source port match.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PortMatch {
    /// `first..=last` (a single port has `first == last`).
    Range { first: u16, last: u16 },
    /// A named port, resolved against the ports the matched endpoint declares.
    Named(String),
}

/// An ICMP type, optionally with a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IcmpMatch {
    pub icmp_type: u8,
    pub code: Option<u8>,
}

/// Which namespaces a selector in a rule (or a policy's own selector) looks in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamespaceScope {
    /// Only this namespace (a namespaced policy's selectors without a namespaceSelector).
    Only(String),
    /// Namespaces whose labels match (a namespaceSelector).
    Matching(#[serde(with = "selector_text")] Selector),
    /// Every namespace, and global objects (a global policy's selectors).
    Any,
    /// Nodes (a ClusterNetworkPolicy's `nodes` peer): only the node sets
    /// ([`NetworkSet::node`]), which no other scope covers.
    Nodes,
}

/// Service accounts a rule matches (Calico's `serviceAccounts`: names and/or a selector over
/// the service account's labels), in the namespaces the rule's scope allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccountMatch {
    pub names: Vec<String>,
    #[serde(with = "opt_selector_text")]
    pub selector: Option<Selector>,
}

/// The source or destination half of a rule. Every field that is set must match (AND); an
/// empty `EntityMatch` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityMatch {
    /// The address must be in one of these.
    pub nets: Vec<IpNet>,
    /// The address must be in none of these.
    pub not_nets: Vec<IpNet>,
    /// The address must belong to an endpoint or network set whose labels match, within
    /// `namespaces` (`None`: the policy's own scope).
    #[serde(with = "opt_selector_text")]
    pub selector: Option<Selector>,
    /// The address must not belong to an endpoint or network set whose labels match.
    #[serde(with = "opt_selector_text")]
    pub not_selector: Option<Selector>,
    /// Where `selector` looks (a rule's namespaceSelector); `None` is the policy's own scope.
    pub namespaces: Option<NamespaceScope>,
    /// The port must be one of these (none: any port).
    pub ports: Vec<PortMatch>,
    /// The port must be none of these.
    pub not_ports: Vec<PortMatch>,
    pub service_accounts: Option<ServiceAccountMatch>,
}

impl EntityMatch {
    /// Whether this half matches every packet.
    pub fn is_any(&self) -> bool {
        *self == EntityMatch::default()
    }
}

/// A stable identity for a rule: its policy, direction and index. Names counters in the kernel
/// and verdicts in traces and flow logs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleId {
    pub policy: PolicyId,
    pub direction: Direction,
    pub index: usize,
}

/// One rule: a match and an action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub action: Action,
    /// 4 or 6 (`None`: both).
    pub ip_version: Option<u8>,
    pub protocol: Option<Protocol>,
    pub not_protocol: Option<Protocol>,
    pub icmp: Option<IcmpMatch>,
    pub not_icmp: Option<IcmpMatch>,
    pub source: EntityMatch,
    pub destination: EntityMatch,
}

/// Which kind of object a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    /// `networking.k8s.io/v1` NetworkPolicy (namespaced; tier `default`, order 1000).
    Kubernetes,
    /// Calico's (or Trellis's) namespaced NetworkPolicy.
    Namespaced,
    /// GlobalNetworkPolicy.
    Global,
    /// sig-network's ClusterNetworkPolicy (tier [`ADMIN_TIER`] or [`BASELINE_TIER`]).
    Cluster,
    /// Its `v1alpha1` predecessors: AdminNetworkPolicy (tier [`ADMIN_TIER`]) and
    /// BaselineAdminNetworkPolicy (tier [`BASELINE_TIER`]).
    AdminV1alpha1,
    BaselineV1alpha1,
}

impl PolicyKind {
    /// Whether policies of this kind live in the ClusterNetworkPolicy tiers (and only they do).
    pub fn is_cluster(self) -> bool {
        matches!(
            self,
            PolicyKind::Cluster | PolicyKind::AdminV1alpha1 | PolicyKind::BaselineV1alpha1
        )
    }
}

/// A policy's identity: kind, namespace (for namespaced kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyId {
    pub kind: PolicyKind,
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for PolicyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            PolicyKind::Kubernetes => "knp",
            PolicyKind::Namespaced => "np",
            PolicyKind::Global => "gnp",
            PolicyKind::Cluster => "cnp",
            PolicyKind::AdminV1alpha1 => "anp",
            PolicyKind::BaselineV1alpha1 => "banp",
        };
        match &self.namespace {
            Some(ns) => write!(f, "{kind}/{ns}/{}", self.name),
            None => write!(f, "{kind}/{}", self.name),
        }
    }
}

/// A policy in the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub id: PolicyId,
    pub tier: String,
    /// Lower first; `None` sorts last (Calico treats a missing order as infinite).
    pub order: Option<f64>,
    /// The endpoints it applies to, within `namespaces`.
    #[serde(with = "selector_text")]
    pub selector: Selector,
    /// Where `selector` looks: the policy's namespace for namespaced kinds; `Any` or a
    /// namespaceSelector for global ones.
    pub namespaces: NamespaceScope,
    /// Calico's `serviceAccountSelector`: the endpoint's service account must match too.
    #[serde(with = "opt_selector_text")]
    pub service_account_selector: Option<Selector>,
    /// Ingress rules; `None` when the policy does not apply to ingress (its types).
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules; `None` when the policy does not apply to egress.
    pub egress: Option<Vec<Rule>>,
    /// For each ingress rule, the written rule it came from, when one written rule became
    /// several (a ClusterNetworkPolicy rule is one model rule per peer × protocol); empty when
    /// the model's rules are the written ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_origins: Vec<RuleOrigin>,
    /// The same for egress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_origins: Vec<RuleOrigin>,
}

/// A written rule a model rule came from: its index in the object and its name, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleOrigin {
    pub index: usize,
    pub name: Option<String>,
}

impl Policy {
    pub fn rules(&self, d: Direction) -> Option<&[Rule]> {
        match d {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// The written rule a model rule came from (see [`Policy::ingress_origins`]).
    pub fn origin(&self, d: Direction, index: usize) -> Option<&RuleOrigin> {
        match d {
            Direction::Ingress => self.ingress_origins.get(index),
            Direction::Egress => self.egress_origins.get(index),
        }
    }
}

/// A tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tier {
    pub name: String,
    pub order: Option<f64>,
    pub default_action: TierDefault,
}

/// A profile: rules applied after the tiers to endpoints that list it, and labels it gives them
/// (`labelsToApply`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    pub labels_to_apply: Labels,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

/// A set of networks selectors can match by label: a namespaced NetworkSet
/// (`namespace: Some`) or a GlobalNetworkSet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSet {
    pub namespace: Option<String>,
    pub name: String,
    pub labels: Labels,
    pub nets: Vec<IpNet>,
    /// A Node's addresses (name `node/NAME`, the Node's labels): matched only by a
    /// [`NamespaceScope::Nodes`] selection, never by Calico selectors.
    #[serde(default)]
    pub node: bool,
}

/// A named port an endpoint declares (Kubernetes container ports, Calico's WEP `ports`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A workload endpoint (a pod's interface) as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub namespace: String,
    /// The WorkloadEndpoint's name (unique within the namespace).
    pub name: String,
    /// The pod it belongs to, when known.
    pub pod: Option<String>,
    pub node: String,
    /// The host-side interface (`trl…`) on `node`.
    pub interface: Option<String>,
    pub addresses: Vec<IpAddr>,
    /// Its own labels (without the implicit ones; see [`Endpoint::effective_labels`]).
    pub labels: Labels,
    pub service_account: Option<String>,
    pub ports: Vec<NamedPort>,
    pub profiles: Vec<String>,
}

impl Endpoint {
    /// The labels selectors see: its own, then the implicit ones (namespace, orchestrator,
    /// service account), then — for keys it does not have — those its profiles apply. The
    /// implicit ones replace labels of the same keys the endpoint carries, as Calico sets them
    /// over a pod's own labels: a pod labelling itself `projectcalico.org/orchestrator` must
    /// not leave every pod selector (Kubernetes NetworkPolicy, ClusterNetworkPolicy subjects
    /// and peers).
    pub fn effective_labels(&self, profiles: &BTreeMap<String, Profile>) -> Labels {
        let mut l = self.labels.clone();
        l.insert(LABEL_NAMESPACE.into(), self.namespace.clone());
        l.insert(LABEL_ORCHESTRATOR.into(), "k8s".into());
        match &self.service_account {
            Some(sa) => l.insert(LABEL_SERVICE_ACCOUNT.into(), sa.clone()),
            None => l.remove(LABEL_SERVICE_ACCOUNT),
        };
        for p in self.profiles.iter().filter_map(|p| profiles.get(p)) {
            for (k, v) in &p.labels_to_apply {
                l.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        l
    }
}

/// Everything policy decisions depend on, cluster-wide.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// Tiers by name (`default` is always present: see [`Model::tier`]).
    pub tiers: BTreeMap<String, Tier>,
    pub policies: BTreeMap<PolicyId, Policy>,
    pub profiles: BTreeMap<String, Profile>,
    /// Namespaces and their labels (the implicit `kubernetes.io/metadata.name` included).
    pub namespaces: BTreeMap<String, Labels>,
    /// Service accounts' labels by (namespace, name).
    pub service_accounts: BTreeMap<(String, String), Labels>,
    pub network_sets: Vec<NetworkSet>,
    /// Endpoints by (namespace, name).
    pub endpoints: BTreeMap<(String, String), Endpoint>,
}

impl Model {
    /// A tier by name; `default`, `admin` and `baseline` exist even when no Tier object does
    /// (the last two are built in: a Tier object cannot take their names).
    pub fn tier(&self, name: &str) -> Option<Tier> {
        if let Some(t) = builtin_cluster_tier(name) {
            return Some(t);
        }
        self.tiers.get(name).cloned().or_else(|| {
            (name == DEFAULT_TIER).then(|| Tier {
                name: DEFAULT_TIER.into(),
                order: Some(DEFAULT_TIER_ORDER),
                default_action: TierDefault::Deny,
            })
        })
    }

    /// The tiers that hold policies, in evaluation order (order, then name).
    pub fn ordered_tiers(&self) -> Vec<Tier> {
        let mut names: Vec<&str> = self.policies.values().map(|p| p.tier.as_str()).collect();
        names.sort();
        names.dedup();
        let mut tiers: Vec<Tier> = names.into_iter().filter_map(|n| self.tier(n)).collect();
        tiers.sort_by_key(tier_key);
        tiers
    }

    /// The policies of a tier, in evaluation order (order, then name, then kind/namespace).
    pub fn ordered_policies(&self, tier: &str) -> Vec<&Policy> {
        let mut ps: Vec<&Policy> = self.policies.values().filter(|p| p.tier == tier).collect();
        ps.sort_by(|a, b| {
            order_key(a.order, &a.id.name)
                .cmp(&order_key(b.order, &b.id.name))
                .then_with(|| a.id.cmp(&b.id))
        });
        ps
    }
}

// ---------------------------------------------------------------------------------------------
// Matching: which endpoints and network sets a policy or one side of a rule covers. The
// compiler turns these into nftables sets; the evaluator can answer the same questions directly.
//
// - A policy applies to an endpoint when the endpoint's namespace is in the policy's
//   `namespaces`, its effective labels match `selector`, and — with a `serviceAccountSelector` —
//   it has a service account whose labels match.
// - A rule side without `namespaces` looks in the policy's own scope: its namespace for
//   namespaced kinds, every namespace (and global network sets) for global policies and
//   profiles ([`Policy::rule_scope`]).
// - A side *selects* (has a positive selection) when it sets `selector` or `serviceAccounts`,
//   or — when its scope is not `Any` — `namespaces` or `notSelector` (Calico namespaces the
//   rule's selector whenever a namespaced policy's rule sets selector or notSelector, or a
//   rule sets namespaceSelector: libcalico-go `RuleAPIV2ToBackend`); a missing `selector` then
//   means `all()`. It covers endpoints in scope whose labels match (and whose service account
//   matches), and — without `serviceAccounts` — network sets in scope whose labels match.
// - `notSelector` is not scoped (Calico keeps `NotSrcSelector` as written): it covers every
//   endpoint and network set whose labels match; the address must be in none of it.
// - A named port resolves against the endpoints the side selects, or every endpoint when the
//   side does not select (Kubernetes: an egress rule's named port matches any pod declaring it).
// ---------------------------------------------------------------------------------------------

/// What one side of a rule selects by label: a scope, a selector within it and optionally a
/// service-account match. Its [`Display`](std::fmt::Display) text is canonical (equal
/// selections print equal), so it can key a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub scope: NamespaceScope,
    pub selector: Selector,
    pub service_accounts: Option<ServiceAccountMatch>,
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.scope {
            NamespaceScope::Only(ns) => write!(f, "ns={ns:?}")?,
            NamespaceScope::Matching(s) => write!(f, "nssel={:?}", s.to_string())?,
            NamespaceScope::Any => write!(f, "any")?,
            NamespaceScope::Nodes => write!(f, "nodes")?,
        }
        write!(f, " sel={:?}", self.selector.to_string())?;
        if let Some(sa) = &self.service_accounts {
            let sel = sa.selector.as_ref().map(|s| s.to_string());
            write!(f, " sa={:?}/{:?}", sa.names, sel)?;
        }
        Ok(())
    }
}

impl Selection {
    /// Whether the selection covers an endpoint, given its effective labels.
    pub fn matches_endpoint(&self, model: &Model, ep: &Endpoint, labels: &Labels) -> bool {
        model.scope_covers(&self.scope, Some(&ep.namespace))
            && self.selector.matches(labels)
            && self
                .service_accounts
                .as_ref()
                .is_none_or(|sa| model.service_account_matches(sa, ep))
    }

    /// Whether the selection covers a network set (never with a service-account match).
    pub fn matches_network_set(&self, model: &Model, set: &NetworkSet) -> bool {
        self.service_accounts.is_none()
            && model.set_in_scope(&self.scope, set)
            && self.selector.matches(&set.effective_labels())
    }
}

impl EntityMatch {
    /// The positive selection of this side, if it selects (see the matching notes above).
    pub fn selection(&self, default_scope: &NamespaceScope) -> Option<Selection> {
        let scope = self
            .namespaces
            .clone()
            .unwrap_or_else(|| default_scope.clone());
        let scoped = scope != NamespaceScope::Any
            && (self.namespaces.is_some() || self.not_selector.is_some());
        if self.selector.is_none() && self.service_accounts.is_none() && !scoped {
            return None;
        }
        Some(Selection {
            scope,
            selector: self.selector.clone().unwrap_or(Selector::All),
            service_accounts: self.service_accounts.clone(),
        })
    }

    /// What `notSelector` covers, if set: everything whose labels match, in every namespace
    /// and globally (see the matching notes above).
    pub fn not_selection(&self, _default_scope: &NamespaceScope) -> Option<Selection> {
        let not = self.not_selector.clone()?;
        Some(Selection {
            scope: NamespaceScope::Any,
            selector: not,
            service_accounts: None,
        })
    }
}

impl Policy {
    /// Where rule selectors without a namespaceSelector look: the policy's namespace for
    /// namespaced kinds, everywhere for global ones.
    pub fn rule_scope(&self) -> NamespaceScope {
        match (&self.id.kind, &self.id.namespace) {
            (PolicyKind::Global, _) | (_, None) => NamespaceScope::Any,
            (_, Some(ns)) => NamespaceScope::Only(ns.clone()),
        }
    }
}

impl NetworkSet {
    /// Its labels plus, for a namespaced set, the implicit namespace label; never
    /// `projectcalico.org/orchestrator`, which marks pods (pod selectors of Kubernetes
    /// NetworkPolicy and ClusterNetworkPolicy require it: a set carrying it would pass for pods).
    pub fn effective_labels(&self) -> Labels {
        let mut l = self.labels.clone();
        l.remove(LABEL_ORCHESTRATOR);
        if let Some(ns) = &self.namespace {
            l.insert(LABEL_NAMESPACE.into(), ns.clone());
        }
        l
    }
}

impl Model {
    /// A namespace's labels as namespace selectors see them: its own (with Kubernetes'
    /// `kubernetes.io/metadata.name`, also when the model has no Namespace object) and
    /// Calico's `projectcalico.org/name`.
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        let mut l = self.namespaces.get(ns).cloned().unwrap_or_default();
        l.entry(LABEL_NAMESPACE_NAME.into())
            .or_insert_with(|| ns.to_string());
        l.entry(LABEL_NAME.into()).or_insert_with(|| ns.to_string());
        l
    }

    /// Whether `scope` covers an object in namespace `ns` (`None`: a global object). Calico's
    /// `namespaceSelector: global()` covers only global objects.
    pub fn scope_covers(&self, scope: &NamespaceScope, ns: Option<&str>) -> bool {
        match (scope, ns) {
            (NamespaceScope::Nodes, _) => false,
            (NamespaceScope::Any, _) => true,
            (NamespaceScope::Only(only), Some(ns)) => only == ns,
            (NamespaceScope::Only(_), None) => false,
            (NamespaceScope::Matching(Selector::Global), ns) => ns.is_none(),
            (NamespaceScope::Matching(_), None) => false,
            (NamespaceScope::Matching(sel), Some(ns)) => sel.matches(&self.namespace_labels(ns)),
        }
    }

    /// Whether `scope` covers a network set: node sets only [`NamespaceScope::Nodes`], other
    /// sets as [`Model::scope_covers`] says for their namespace.
    pub fn set_in_scope(&self, scope: &NamespaceScope, set: &NetworkSet) -> bool {
        if set.node {
            *scope == NamespaceScope::Nodes
        } else {
            self.scope_covers(scope, set.namespace.as_deref())
        }
    }

    /// Labels of an endpoint's service account as service-account selectors see them: its own
    /// and Calico's `projectcalico.org/name`; none when the endpoint has no service account
    /// (Calico matches the selector against the endpoint's `pcsa.` labels, which it then
    /// lacks, so `!has(k)` matches it).
    pub fn service_account_labels(&self, ep: &Endpoint) -> Labels {
        let Some(sa) = &ep.service_account else {
            return Labels::new();
        };
        let mut l = self
            .service_accounts
            .get(&(ep.namespace.clone(), sa.clone()))
            .cloned()
            .unwrap_or_default();
        l.entry(LABEL_NAME.into()).or_insert_with(|| sa.clone());
        l
    }

    /// Whether an endpoint's service account satisfies `sa`: its name is one of `names` (any,
    /// when none are given) and its labels match `selector` (when given).
    pub fn service_account_matches(&self, sa: &ServiceAccountMatch, ep: &Endpoint) -> bool {
        let named = sa.names.is_empty()
            || ep
                .service_account
                .as_ref()
                .is_some_and(|n| sa.names.contains(n));
        named
            && sa
                .selector
                .as_ref()
                .is_none_or(|sel| sel.matches(&self.service_account_labels(ep)))
    }

    /// Whether `policy` applies to `ep` (whose effective labels are `labels`), in either
    /// direction (see [`Policy::rules`] for which directions it has).
    pub fn policy_applies(&self, policy: &Policy, ep: &Endpoint, labels: &Labels) -> bool {
        self.scope_covers(&policy.namespaces, Some(&ep.namespace))
            && policy.selector.matches(labels)
            && policy
                .service_account_selector
                .as_ref()
                .is_none_or(|sel| sel.matches(&self.service_account_labels(ep)))
    }
}

/// The ClusterNetworkPolicy tiers: built in, no order (their place is fixed by
/// [`tier_key`]), and Pass when no rule decided.
pub fn builtin_cluster_tier(name: &str) -> Option<Tier> {
    (name == ADMIN_TIER || name == BASELINE_TIER).then(|| Tier {
        name: name.into(),
        order: None,
        default_action: TierDefault::Pass,
    })
}

/// Sort key of tiers in evaluation order: the Admin tier first, every Calico/Trellis tier by
/// (order, name), the Baseline tier last.
pub(crate) fn tier_key(t: &Tier) -> (u8, (u8, OrderedF64, String)) {
    let band = match t.name.as_str() {
        ADMIN_TIER => 0,
        BASELINE_TIER => 2,
        _ => 1,
    };
    (band, order_key(t.order, &t.name))
}

/// Sort key for (order, name): `None` orders sort after every number.
pub(crate) fn order_key(order: Option<f64>, name: &str) -> (u8, OrderedF64, String) {
    match order {
        Some(o) => (0, OrderedF64(o), name.to_string()),
        None => (1, OrderedF64(0.0), name.to_string()),
    }
}

/// A total order on the finite orders validation lets through.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct OrderedF64(f64);

impl Eq for OrderedF64 {}

impl PartialOrd for OrderedF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Serialises a selector as its text (for golden files and traces).
mod selector_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use trellis_resources::Selector;

    pub fn serialize<S: Serializer>(s: &Selector, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(&s.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Selector, D::Error> {
        let s = String::deserialize(de)?;
        Selector::parse(&s).map_err(serde::de::Error::custom)
    }
}

mod opt_selector_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use trellis_resources::Selector;

    pub fn serialize<S: Serializer>(s: &Option<Selector>, ser: S) -> Result<S::Ok, S::Error> {
        match s {
            Some(s) => ser.serialize_some(&s.to_string()),
            None => ser.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Selector>, D::Error> {
        match Option::<String>::deserialize(de)? {
            Some(s) => Selector::parse(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tier: &str, name: &str, order: Option<f64>) -> Policy {
        Policy {
            id: PolicyId {
                kind: PolicyKind::Global,
                namespace: None,
                name: name.into(),
            },
            tier: tier.into(),
            order,
            selector: Selector::All,
            namespaces: NamespaceScope::Any,
            service_account_selector: None,
            ingress: Some(Vec::new()),
            egress: None,
            ingress_origins: Vec::new(),
            egress_origins: Vec::new(),
        }
    }

    #[test]
    fn tiers_and_policies_sort_by_order_then_name_with_none_last() {
        let mut m = Model::default();
        m.tiers.insert(
            "security".into(),
            Tier {
                name: "security".into(),
                order: Some(100.0),
                default_action: TierDefault::Deny,
            },
        );
        m.tiers.insert(
            "late".into(),
            Tier {
                name: "late".into(),
                order: None,
                default_action: TierDefault::Pass,
            },
        );
        for p in [
            policy("default", "b", Some(10.0)),
            policy("default", "a", Some(10.0)),
            policy("default", "z", None),
            policy("default", "c", Some(5.0)),
            policy("security", "s", None),
            policy("late", "l", Some(1.0)),
        ] {
            m.policies.insert(p.id.clone(), p);
        }
        let tiers: Vec<String> = m.ordered_tiers().into_iter().map(|t| t.name).collect();
        assert_eq!(tiers, ["security", "default", "late"]);
        let names: Vec<&str> = m
            .ordered_policies("default")
            .iter()
            .map(|p| p.id.name.as_str())
            .collect();
        assert_eq!(names, ["c", "a", "b", "z"]);
    }

    #[test]
    fn implicit_labels_and_profile_labels() {
        let mut profiles = BTreeMap::new();
        profiles.insert(
            "p".to_string(),
            Profile {
                name: "p".into(),
                labels_to_apply: [("team".to_string(), "x".to_string())].into(),
                ingress: Vec::new(),
                egress: Vec::new(),
            },
        );
        let ep = Endpoint {
            namespace: "ns1".into(),
            name: "e".into(),
            pod: None,
            node: "n".into(),
            interface: None,
            addresses: Vec::new(),
            labels: [("app".to_string(), "web".to_string())].into(),
            service_account: Some("sa".into()),
            ports: Vec::new(),
            profiles: vec!["p".into()],
        };
        let l = ep.effective_labels(&profiles);
        assert_eq!(l["app"], "web");
        assert_eq!(l[LABEL_NAMESPACE], "ns1");
        assert_eq!(l[LABEL_SERVICE_ACCOUNT], "sa");
        assert_eq!(l["team"], "x");
    }
}
