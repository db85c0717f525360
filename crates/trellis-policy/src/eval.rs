//! The evaluator: given the [`Model`] and a [`Flow`], the verdict and the path that decided it
//! — every tier, policy and rule considered, why each rule did or did not match (the first
//! field that failed), and what decided. `trellis policy trace` prints it; the conformance
//! truth tables are checked against it. Pure.
//!
//! Semantics (see [`crate::model`]): egress is evaluated on the source endpoint, ingress on
//! the destination endpoint; a flow is allowed when both are. Per direction: tiers by order
//! then name, only those with a policy that applies to the endpoint for the direction; in a
//! tier, its applying policies by order then name; rules in order — Allow and Deny decide,
//! Pass ends the tier, Log records and continues; a tier no rule decided or passed ends with
//! its default action (Deny, or Pass to the next tier). After the tiers, the endpoint's
//! profiles in the order it lists them (Allow/Deny decide, Pass goes to the next profile; none
//! matched: Deny). No applying policy and no profile: allowed; every tier passed and no
//! profile: allowed (what Calico's per-namespace profile does). Not evaluated: a side that is
//! not an endpoint (a bare address), traffic between a pod and its own node (kubelet probes),
//! and a pod talking to itself (it never leaves the pod). Replies of allowed connections are
//! the dataplane's (conntrack), not a question for the evaluator.
//!
//! Matching follows Calico's rule semantics: a selector matches an address when an endpoint
//! holding it, or a NetworkSet containing it, has matching labels in the rule's namespace
//! scope (the policy's own namespace for namespaced policies unless a namespaceSelector is
//! given; `global()` as namespaceSelector: only GlobalNetworkSets); as soon as a namespaced
//! policy's rule uses selector, notSelector, namespaceSelector or serviceAccounts, the address
//! must belong to something in scope; `notSelector` is not scoped; a named port matches when
//! the endpoint holding the address declares that name with the flow's protocol and port.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use trellis_resources::Selector;

use crate::model::*;

/// One end of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    /// A workload endpoint by namespace and name.
    Endpoint { namespace: String, name: String },
    /// An address: an endpoint's (then it is that endpoint) or anything else.
    Address(IpAddr),
    /// A node's own address (host traffic).
    Node { node: String, address: IpAddr },
}

/// A connection attempt to judge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub source: Peer,
    pub destination: Peer,
    pub protocol: Protocol,
    /// The destination port (protocols with ports).
    pub port: Option<u16>,
    /// The source port, when it matters (rules with source ports); unknown otherwise.
    pub source_port: Option<u16>,
    /// ICMP type and code (ICMP and ICMPv6 flows).
    pub icmp: Option<IcmpMatch>,
}

/// A flow's end as the evaluator resolved it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// (namespace, name) of the endpoint, when it is one.
    pub endpoint: Option<(String, String)>,
    pub pod: Option<String>,
    /// The node it runs on (an endpoint) or is (a node address).
    pub node: Option<String>,
    pub address: Option<IpAddr>,
    /// An endpoint the flow names that the model does not have.
    pub unknown: bool,
}

/// The whole explanation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub source: PeerView,
    pub destination: PeerView,
    /// Policy of the source endpoint for traffic leaving it.
    pub egress: DirectionTrace,
    /// Policy of the destination endpoint for traffic reaching it.
    pub ingress: DirectionTrace,
    pub allowed: bool,
}

/// One direction's path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectionTrace {
    pub direction: Direction,
    /// Tiers with a policy that applies to the endpoint, in order, as far as evaluation went.
    pub tiers: Vec<TierTrace>,
    /// Profiles considered (after the tiers).
    pub profiles: Vec<ProfileTrace>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierTrace {
    pub tier: String,
    pub order: Option<f64>,
    pub default_action: TierDefault,
    pub policies: Vec<PolicyTrace>,
    /// How the tier ended when it did not decide (`None`: a rule in it decided).
    pub passed: Option<PassedBy>,
}

/// Why evaluation went on to the next tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PassedBy {
    Rule(RuleId),
    /// The tier's default action is Pass.
    TierDefault,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyTrace {
    pub policy: PolicyId,
    pub order: Option<f64>,
    pub rules: Vec<RuleTrace>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleTrace {
    pub index: usize,
    pub action: Action,
    /// `None`: it matched.
    pub mismatch: Option<Mismatch>,
    /// The written rule it came from, when that is not rule `index` itself (a
    /// ClusterNetworkPolicy rule with several peers or protocols: [`Policy::origin`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<RuleOrigin>,
}

/// The first field of a rule that did not match, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    /// `protocol`, `source.selector`, `destination.ports`, ...
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileTrace {
    pub profile: String,
    /// Listed by the endpoint but not in the model (it then has no rules).
    pub missing: bool,
    pub rules: Vec<RuleTrace>,
}

/// What decided a direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// This side is not an endpoint: no policy of this direction applies.
    NotAnEndpoint,
    /// The flow names an endpoint that does not exist.
    UnknownEndpoint,
    /// Between a pod and its own node: never filtered.
    OwnNode,
    /// A pod to itself: it never leaves the pod.
    SameEndpoint,
    /// No policy applies and the endpoint lists no profile.
    NoPolicy,
    /// A rule of a policy decided.
    Rule { rule: RuleId, action: Action },
    /// A tier in which policies applied ended with its default action, Deny.
    TierDefault { tier: String },
    /// Every tier passed and the endpoint lists no profile.
    EndOfTiers,
    /// A profile's rule decided.
    ProfileRule {
        profile: String,
        index: usize,
        action: Action,
    },
    /// The endpoint lists profiles and none of their rules decided.
    ProfileDefault,
}

impl DirectionTrace {
    /// The label of the kernel rule that decides this direction — the one whose counter counts
    /// it and whose flow-log copy names it (`compile::names`); `None` where no rule of an
    /// endpoint's chains decides (not an endpoint, its own node, itself).
    pub fn deciding_label(&self) -> Option<String> {
        use crate::compile::names;
        let d = self.direction;
        Some(match &self.verdict {
            Verdict::Rule { rule, .. } => names::rule_label(rule),
            Verdict::ProfileRule { profile, index, .. } => {
                names::profile_rule_label(profile, d, *index)
            }
            Verdict::TierDefault { tier } => names::tier_default_label(tier, d),
            Verdict::NoPolicy | Verdict::EndOfTiers => names::endpoint_default_label(false, d),
            Verdict::ProfileDefault => names::endpoint_default_label(true, d),
            Verdict::NotAnEndpoint
            | Verdict::UnknownEndpoint
            | Verdict::OwnNode
            | Verdict::SameEndpoint => return None,
        })
    }
}

impl Verdict {
    pub fn allows(&self) -> bool {
        match self {
            Verdict::NotAnEndpoint
            | Verdict::OwnNode
            | Verdict::SameEndpoint
            | Verdict::NoPolicy
            | Verdict::EndOfTiers => true,
            Verdict::Rule { action, .. } | Verdict::ProfileRule { action, .. } => {
                *action == Action::Allow
            }
            Verdict::UnknownEndpoint | Verdict::TierDefault { .. } | Verdict::ProfileDefault => {
                false
            }
        }
    }
}

/// Judges a flow.
pub fn evaluate(model: &Model, flow: &Flow) -> Trace {
    let (src_ep, src) = resolve(model, &flow.source, other_address(model, &flow.destination));
    let (dst_ep, dst) = resolve(model, &flow.destination, src.address);
    let sides = Sides {
        src: Side {
            address: src.address,
            endpoint: src_ep,
            port: flow.source_port,
        },
        dst: Side {
            address: dst.address,
            endpoint: dst_ep,
            port: flow.port,
        },
        protocol: flow.protocol,
        icmp: flow.icmp,
    };
    let not_policed = |v: Verdict, d| DirectionTrace {
        direction: d,
        tiers: Vec::new(),
        profiles: Vec::new(),
        verdict: v,
    };
    let shortcut = if src_ep.is_some() && src_ep == dst_ep {
        Some(Verdict::SameEndpoint)
    } else if own_node(&src, &dst) {
        Some(Verdict::OwnNode)
    } else {
        None
    };
    let side = |ep: Option<&Endpoint>, view: &PeerView, d: Direction| match (&shortcut, ep) {
        (Some(v), _) => not_policed(v.clone(), d),
        (None, Some(ep)) => direction(model, ep, d, &sides),
        (None, None) if view.unknown => not_policed(Verdict::UnknownEndpoint, d),
        (None, None) => not_policed(Verdict::NotAnEndpoint, d),
    };
    let egress = side(src_ep, &src, Direction::Egress);
    let ingress = side(dst_ep, &dst, Direction::Ingress);
    Trace {
        allowed: egress.verdict.allows() && ingress.verdict.allows(),
        source: src,
        destination: dst,
        egress,
        ingress,
    }
}

/// One pod and its own node, either way round.
fn own_node(a: &PeerView, b: &PeerView) -> bool {
    fn node_of_pod(v: &PeerView) -> Option<&String> {
        v.endpoint.as_ref().and(v.node.as_ref())
    }
    fn host(v: &PeerView) -> Option<&String> {
        v.endpoint.is_none().then_some(v.node.as_ref()).flatten()
    }
    matches!((node_of_pod(a), host(b)), (Some(x), Some(y)) if x == y)
        || matches!((host(a), node_of_pod(b)), (Some(x), Some(y)) if x == y)
}

/// The address a peer has without resolving endpoints (to pick an endpoint's family).
fn other_address(model: &Model, p: &Peer) -> Option<IpAddr> {
    match p {
        Peer::Address(a) | Peer::Node { address: a, .. } => Some(*a),
        Peer::Endpoint { namespace, name } => model
            .endpoints
            .get(&(namespace.clone(), name.clone()))
            .and_then(|e| e.addresses.first().copied()),
    }
}

/// The endpoint a peer is (by name or by address) and its view. An endpoint's address is one of
/// the family of `other` when it has one, else its first.
fn resolve<'m>(
    model: &'m Model,
    p: &Peer,
    other: Option<IpAddr>,
) -> (Option<&'m Endpoint>, PeerView) {
    let ep = match p {
        Peer::Endpoint { namespace, name } => {
            let found = model.endpoints.get(&(namespace.clone(), name.clone()));
            if found.is_none() {
                let view = PeerView {
                    endpoint: Some((namespace.clone(), name.clone())),
                    unknown: true,
                    ..Default::default()
                };
                return (None, view);
            }
            found
        }
        Peer::Address(a) => endpoint_at(model, *a),
        Peer::Node { node, address } => {
            let view = PeerView {
                node: Some(node.clone()),
                address: Some(*address),
                ..Default::default()
            };
            return (None, view);
        }
    };
    match ep {
        Some(e) => {
            let address = match p {
                Peer::Address(a) => Some(*a),
                _ => e
                    .addresses
                    .iter()
                    .find(|a| other.is_none_or(|o| o.is_ipv4() == a.is_ipv4()))
                    .or(e.addresses.first())
                    .copied(),
            };
            let view = PeerView {
                endpoint: Some((e.namespace.clone(), e.name.clone())),
                pod: e.pod.clone(),
                node: Some(e.node.clone()),
                address,
                unknown: false,
            };
            (Some(e), view)
        }
        None => {
            let Peer::Address(a) = p else {
                unreachable!("endpoints and nodes returned above")
            };
            let view = PeerView {
                address: Some(*a),
                ..Default::default()
            };
            (None, view)
        }
    }
}

/// The endpoint holding an address.
pub fn endpoint_at(model: &Model, a: IpAddr) -> Option<&Endpoint> {
    model.endpoints.values().find(|e| e.addresses.contains(&a))
}

/// What rules match against.
struct Sides<'m> {
    src: Side<'m>,
    dst: Side<'m>,
    protocol: Protocol,
    icmp: Option<IcmpMatch>,
}

struct Side<'m> {
    address: Option<IpAddr>,
    endpoint: Option<&'m Endpoint>,
    port: Option<u16>,
}

/// The labels a NetworkSet shows selectors ([`NetworkSet::effective_labels`], which the
/// compiler reads too).
pub fn network_set_labels(s: &NetworkSet) -> Labels {
    s.effective_labels()
}

/// Labels of a namespace as namespace selectors see them ([`Model::namespace_labels`]).
pub fn namespace_labels(model: &Model, ns: &str) -> Labels {
    model.namespace_labels(ns)
}

/// Whether an object in `namespace` (`None`: global) is in `scope` ([`Model::scope_covers`]).
pub fn in_scope(model: &Model, scope: &NamespaceScope, namespace: Option<&str>) -> bool {
    model.scope_covers(scope, namespace)
}

/// Labels of an endpoint's service account ([`Model::service_account_labels`]).
pub fn service_account_labels(model: &Model, e: &Endpoint) -> Labels {
    model.service_account_labels(e)
}

/// Whether a policy applies to an endpoint (either direction): its namespace scope, selector
/// and service account selector.
pub fn applies(model: &Model, p: &Policy, e: &Endpoint) -> bool {
    model.policy_applies(p, e, &e.effective_labels(&model.profiles))
}

/// The tiers with policies that apply to an endpoint for a direction, each with those
/// policies, in evaluation order (`trellis policy show`).
pub fn applying<'m>(model: &'m Model, e: &Endpoint, d: Direction) -> Vec<(Tier, Vec<&'m Policy>)> {
    model
        .ordered_tiers()
        .into_iter()
        .filter_map(|t| {
            let ps: Vec<&Policy> = model
                .ordered_policies(&t.name)
                .into_iter()
                .filter(|p| p.rules(d).is_some() && applies(model, p, e))
                .collect();
            (!ps.is_empty()).then_some((t, ps))
        })
        .collect()
}

fn direction(model: &Model, ep: &Endpoint, d: Direction, s: &Sides) -> DirectionTrace {
    let mut out = DirectionTrace {
        direction: d,
        tiers: Vec::new(),
        profiles: Vec::new(),
        verdict: Verdict::NoPolicy,
    };
    for (tier, policies) in applying(model, ep, d) {
        let mut tt = TierTrace {
            tier: tier.name.clone(),
            order: tier.order,
            default_action: tier.default_action,
            policies: Vec::new(),
            passed: None,
        };
        let mut decided = None;
        'policies: for p in policies {
            let mut pt = PolicyTrace {
                policy: p.id.clone(),
                order: p.order,
                rules: Vec::new(),
            };
            let scope = default_scope(p);
            for (index, r) in p.rules(d).unwrap_or_default().iter().enumerate() {
                let mismatch = rule_matches(model, &scope, r, s).err();
                let matched = mismatch.is_none();
                pt.rules.push(RuleTrace {
                    index,
                    action: r.action,
                    mismatch,
                    origin: p.origin(d, index).cloned(),
                });
                if !matched {
                    continue;
                }
                let id = RuleId {
                    policy: p.id.clone(),
                    direction: d,
                    index,
                };
                match r.action {
                    Action::Log => {}
                    Action::Pass => {
                        tt.passed = Some(PassedBy::Rule(id));
                        tt.policies.push(pt);
                        break 'policies;
                    }
                    action @ (Action::Allow | Action::Deny) => {
                        decided = Some(Verdict::Rule { rule: id, action });
                        tt.policies.push(pt);
                        break 'policies;
                    }
                }
            }
            tt.policies.push(pt);
        }
        if decided.is_none() && tt.passed.is_none() {
            match tier.default_action {
                TierDefault::Deny => {
                    decided = Some(Verdict::TierDefault {
                        tier: tier.name.clone(),
                    })
                }
                TierDefault::Pass => tt.passed = Some(PassedBy::TierDefault),
            }
        }
        out.tiers.push(tt);
        if let Some(v) = decided {
            out.verdict = v;
            return out;
        }
    }
    if ep.profiles.is_empty() {
        out.verdict = if out.tiers.is_empty() {
            Verdict::NoPolicy
        } else {
            Verdict::EndOfTiers
        };
        return out;
    }
    out.verdict = profiles(model, ep, d, s, &mut out.profiles);
    out
}

/// The endpoint's profiles in its order; a profile's rules see every namespace.
fn profiles(
    model: &Model,
    ep: &Endpoint,
    d: Direction,
    s: &Sides,
    out: &mut Vec<ProfileTrace>,
) -> Verdict {
    for name in &ep.profiles {
        let Some(p) = model.profiles.get(name) else {
            out.push(ProfileTrace {
                profile: name.clone(),
                missing: true,
                rules: Vec::new(),
            });
            continue;
        };
        let mut pt = ProfileTrace {
            profile: name.clone(),
            missing: false,
            rules: Vec::new(),
        };
        let rules = match d {
            Direction::Ingress => &p.ingress,
            Direction::Egress => &p.egress,
        };
        let mut verdict = None;
        for (index, r) in rules.iter().enumerate() {
            let mismatch = rule_matches(model, &NamespaceScope::Any, r, s).err();
            let matched = mismatch.is_none();
            pt.rules.push(RuleTrace {
                index,
                action: r.action,
                mismatch,
                origin: None,
            });
            match (matched, r.action) {
                (false, _) | (true, Action::Log) => {}
                (true, Action::Pass) => break,
                (true, action) => {
                    verdict = Some(Verdict::ProfileRule {
                        profile: name.clone(),
                        index,
                        action,
                    });
                    break;
                }
            }
        }
        out.push(pt);
        if let Some(v) = verdict {
            return v;
        }
    }
    Verdict::ProfileDefault
}

/// Where a rule's selectors look when it gives no namespaceSelector.
pub fn default_scope(p: &Policy) -> NamespaceScope {
    match (&p.id.kind, &p.id.namespace) {
        (PolicyKind::Global, _) | (_, None) => NamespaceScope::Any,
        (_, Some(ns)) => NamespaceScope::Only(ns.clone()),
    }
}

fn miss<T>(field: &str, reason: impl Into<String>) -> Result<T, Mismatch> {
    Err(Mismatch {
        field: field.into(),
        reason: reason.into(),
    })
}

/// Whether a rule matches, or the first field that does not.
fn rule_matches(
    model: &Model,
    scope: &NamespaceScope,
    r: &Rule,
    s: &Sides,
) -> Result<(), Mismatch> {
    let family = s
        .dst
        .address
        .or(s.src.address)
        .map(|a| if a.is_ipv4() { 4 } else { 6 });
    if let Some(v) = r.ip_version {
        if family != Some(v) {
            return miss("ipVersion", format!("the flow is not IPv{v}"));
        }
    }
    let proto = s.protocol.number();
    if let Some(p) = r.protocol {
        if p.number() != proto {
            return miss(
                "protocol",
                format!(
                    "the flow's protocol is {}, not {}",
                    name(s.protocol),
                    name(p)
                ),
            );
        }
    }
    if let Some(p) = r.not_protocol {
        if p.number() == proto {
            return miss("notProtocol", format!("the flow's protocol is {}", name(p)));
        }
    }
    if let Some(m) = &r.icmp {
        if !icmp_matches(m, s.icmp) {
            return miss("icmp", format!("the flow is not ICMP {}", icmp_text(m)));
        }
    }
    if let Some(m) = &r.not_icmp {
        if icmp_matches(m, s.icmp) {
            return miss("notICMP", format!("the flow is ICMP {}", icmp_text(m)));
        }
    }
    entity_matches(model, scope, "source", &r.source, &s.src, s.protocol)?;
    entity_matches(
        model,
        scope,
        "destination",
        &r.destination,
        &s.dst,
        s.protocol,
    )
}

fn name(p: Protocol) -> String {
    match p {
        Protocol::Tcp => "TCP".into(),
        Protocol::Udp => "UDP".into(),
        Protocol::Sctp => "SCTP".into(),
        Protocol::Icmp => "ICMP".into(),
        Protocol::Icmpv6 => "ICMPv6".into(),
        Protocol::UdpLite => "UDPLite".into(),
        Protocol::Number(n) => n.to_string(),
    }
}

fn icmp_matches(m: &IcmpMatch, flow: Option<IcmpMatch>) -> bool {
    flow.is_some_and(|f| f.icmp_type == m.icmp_type && m.code.is_none_or(|c| f.code == Some(c)))
}

fn icmp_text(m: &IcmpMatch) -> String {
    match m.code {
        Some(c) => format!("type {} code {c}", m.icmp_type),
        None => format!("type {}", m.icmp_type),
    }
}

/// Something with labels an address can belong to.
enum Entity<'m> {
    Endpoint(&'m Endpoint),
    Set(&'m NetworkSet),
}

impl Entity<'_> {
    fn in_scope(&self, model: &Model, scope: &NamespaceScope) -> bool {
        match self {
            Entity::Endpoint(e) => in_scope(model, scope, Some(&e.namespace)),
            Entity::Set(s) => model.set_in_scope(scope, s),
        }
    }
    fn labels(&self, model: &Model) -> Labels {
        match self {
            Entity::Endpoint(e) => e.effective_labels(&model.profiles),
            Entity::Set(s) => network_set_labels(s),
        }
    }
}

/// The endpoint a side is, and every NetworkSet containing its address.
fn entities<'m>(model: &'m Model, side: &Side<'m>) -> Vec<Entity<'m>> {
    let mut out = Vec::new();
    let ep = side
        .endpoint
        .or_else(|| side.address.and_then(|a| endpoint_at(model, a)));
    if let Some(e) = ep {
        out.push(Entity::Endpoint(e));
    }
    if let Some(a) = side.address {
        out.extend(
            model
                .network_sets
                .iter()
                .filter(|s| s.nets.iter().any(|n| n.contains(&a)))
                .map(Entity::Set),
        );
    }
    out
}

fn sa_matches(model: &Model, m: &ServiceAccountMatch, e: &Entity) -> bool {
    match e {
        Entity::Endpoint(e) => model.service_account_matches(m, e),
        Entity::Set(_) => false,
    }
}

fn entity_matches(
    model: &Model,
    default: &NamespaceScope,
    side: &str,
    m: &EntityMatch,
    s: &Side,
    proto: Protocol,
) -> Result<(), Mismatch> {
    let f = |x: &str| format!("{side}.{x}");
    let addr = s.address;
    if !m.nets.is_empty() {
        match addr {
            Some(a) if m.nets.iter().any(|n| n.contains(&a)) => {}
            Some(a) => return miss(&f("nets"), format!("{a} is in none of {}", list(&m.nets))),
            None => return miss(&f("nets"), "the address is unknown"),
        }
    }
    if let Some(n) = addr.and_then(|a| m.not_nets.iter().find(|n| n.contains(&a))) {
        return miss(&f("notNets"), format!("{} is in {n}", addr.expect("found")));
    }
    let scope = m.namespaces.as_ref().unwrap_or(default);
    let scoped = *scope != NamespaceScope::Any;
    let positive = m.selector.is_some()
        || m.service_accounts.is_some()
        || (scoped && (m.not_selector.is_some() || m.namespaces.is_some()));
    let ents =
        if positive || m.not_selector.is_some() || !m.ports.is_empty() || !m.not_ports.is_empty() {
            entities(model, s)
        } else {
            Vec::new()
        };
    // A named port resolves against the endpoints the side selects (all of the address's
    // when it does not select): not against an endpoint that only shares its address with a
    // matching network set.
    let mut selected: Vec<&Entity> = ents.iter().collect();
    if positive {
        let sel = m.selector.as_ref().unwrap_or(&Selector::All);
        selected.retain(|e| {
            e.in_scope(model, scope)
                && sel.matches(&e.labels(model))
                && m.service_accounts
                    .as_ref()
                    .is_none_or(|sa| sa_matches(model, sa, e))
        });
        if selected.is_empty() {
            let field = if m.selector.is_some() {
                "selector"
            } else if m.service_accounts.is_some() {
                "serviceAccounts"
            } else {
                "namespaceSelector"
            };
            return miss(&f(field), positive_reason(model, m, scope, &ents));
        }
    }
    if let Some(ns) = &m.not_selector {
        // Unscoped (every namespace and global object), but never a Node's set: only a
        // ClusterNetworkPolicy's `nodes` peer sees those.
        let hit =
            |e: &Entity| e.in_scope(model, &NamespaceScope::Any) && ns.matches(&e.labels(model));
        if ents.iter().any(hit) {
            return miss(
                &f("notSelector"),
                format!("{} matches {ns}", describe(&ents, hit)),
            );
        }
    }
    let port = s.port;
    if !m.ports.is_empty() {
        match port {
            None => return miss(&f("ports"), "the flow's port is unknown or it has none"),
            Some(p)
                if m.ports
                    .iter()
                    .any(|pm| port_matches(pm, p, proto, &selected)) => {}
            Some(p) => {
                return miss(
                    &f("ports"),
                    format!("port {p} is none of {}", ports_text(&m.ports)),
                )
            }
        }
    }
    if let Some(p) = port {
        if let Some(pm) = m
            .not_ports
            .iter()
            .find(|pm| port_matches(pm, p, proto, &selected))
        {
            return miss(
                &f("notPorts"),
                format!("port {p} is {}", ports_text(std::slice::from_ref(pm))),
            );
        }
    }
    Ok(())
}

fn positive_reason(
    model: &Model,
    m: &EntityMatch,
    scope: &NamespaceScope,
    ents: &[Entity],
) -> String {
    if ents.is_empty() {
        return "the address belongs to no endpoint or network set".into();
    }
    let in_scope: Vec<&Entity> = ents.iter().filter(|e| e.in_scope(model, scope)).collect();
    if in_scope.is_empty() {
        return format!(
            "{} is outside {}",
            describe(ents, |_| true),
            scope_text(scope)
        );
    }
    match &m.selector {
        Some(sel) if !in_scope.iter().any(|e| sel.matches(&e.labels(model))) => {
            format!(
                "{} does not match {sel}",
                describe(ents, |e| in_scope.iter().any(|x| std::ptr::eq(*x, e)))
            )
        }
        _ => "its service account does not match".into(),
    }
}

fn scope_text(s: &NamespaceScope) -> String {
    match s {
        NamespaceScope::Only(ns) => format!("namespace {ns}"),
        NamespaceScope::Matching(Selector::Global) => "global() (only global network sets)".into(),
        NamespaceScope::Matching(sel) => format!("the namespaces matching {sel}"),
        NamespaceScope::Any => "every namespace".into(),
        NamespaceScope::Nodes => "the nodes".into(),
    }
}

fn describe(ents: &[Entity], keep: impl Fn(&Entity) -> bool) -> String {
    let names: Vec<String> = ents
        .iter()
        .filter(|e| keep(e))
        .map(|e| match e {
            Entity::Endpoint(e) => format!("endpoint {}/{}", e.namespace, e.name),
            Entity::Set(s) => match &s.namespace {
                Some(ns) => format!("network set {ns}/{}", s.name),
                None => format!("global network set {}", s.name),
            },
        })
        .collect();
    names.join(", ")
}

fn port_matches(pm: &PortMatch, p: u16, proto: Protocol, ents: &[&Entity]) -> bool {
    match pm {
        PortMatch::Range { first, last } => (*first..=*last).contains(&p),
        PortMatch::Named(n) => ents.iter().any(|e| match e {
            Entity::Endpoint(e) => e
                .ports
                .iter()
                .any(|np| &np.name == n && np.port == p && np.protocol.number() == proto.number()),
            Entity::Set(_) => false,
        }),
    }
}

fn ports_text(ps: &[PortMatch]) -> String {
    let items: Vec<String> = ps
        .iter()
        .map(|p| match p {
            PortMatch::Range { first, last } if first == last => first.to_string(),
            PortMatch::Range { first, last } => format!("{first}:{last}"),
            PortMatch::Named(n) => format!("{n} (named)"),
        })
        .collect();
    items.join(", ")
}

fn list(nets: &[IpNet]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
