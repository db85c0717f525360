//! Stored resources → [`Model`]: every policy kind into one form. Pure.
//!
//! Kubernetes NetworkPolicy follows upstream's semantics the way Calico's own conversion
//! (libcalico-go `K8sNetworkPolicyToCalico`) expresses them: one policy in tier `default` at
//! order 1000 whose selector is the podSelector; per direction, one Allow rule for each
//! protocol named by the ports × each peer (no peers: any; no ports: any protocol and port);
//! a podSelector peer is the pods of the policy's namespace, a namespaceSelector peer every
//! pod of the matching namespaces, both together the matching pods of the matching
//! namespaces, an ipBlock the CIDR minus its `except`s. Pod selectors also require
//! `projectcalico.org/orchestrator == 'k8s'`, as Calico's do, so they match pods and never
//! NetworkSets. Since every rule allows, the union of a pod's policies allows, and a pod that a
//! policy of a given type selects is isolated for that direction (the `default` tier's default
//! is Deny).
//!
//! ClusterNetworkPolicy, its v1alpha1 predecessors AdminNetworkPolicy and
//! BaselineAdminNetworkPolicy (mapped onto it), and the Nodes its `nodes` peers match are in
//! [`cluster`].
//!
//! Calico's kinds map field for field. Every namespace an object mentions gets an entry with
//! at least Kubernetes' implicit `kubernetes.io/metadata.name` label. Objects that cannot be
//! translated (a policy in a tier that does not exist) are left out and reported.

use std::collections::{BTreeMap, BTreeSet};

use trellis_resources::k8s::{
    IntOrString, KubeProtocol, KubernetesNetworkPolicySpec, NetworkPolicyPeer, NetworkPolicyPort,
};
use trellis_resources::policy::{
    EntityRule, IcmpFields, PolicyType, PortSpec, RuleAction, RuleProtocol, RuleSpec, TierAction,
};
use trellis_resources::policy_validate::parse_net;
use trellis_resources::{Object, Resource, Selector, WorkloadEndpointSpec};

use crate::model::*;

/// The model and what could not be part of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translation {
    pub model: Model,
    pub skipped: Vec<Skipped>,
}

/// An object left out of the model, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `Kind/namespace/name`.
    pub object: String,
    pub reason: TranslateError,
}

/// Why an object cannot be part of the model. Stored objects were validated when written, so
/// only a tier deleted behind the datastore's back or a record written by hand gets here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("its tier {tier:?} does not exist")]
    MissingTier { tier: String },
    /// A Calico policy naming a ClusterNetworkPolicy tier (`admin`, `baseline`), or a
    /// ClusterNetworkPolicy outside them: written around the validating edge.
    #[error("tier {tier:?} is for ClusterNetworkPolicies only, and they go nowhere else")]
    ClusterTier { tier: String },
    #[error("{field} {value:?}: {source}")]
    Selector {
        field: &'static str,
        value: String,
        source: trellis_resources::SelectorError,
    },
    #[error("{reason}")]
    Net { reason: String },
}

type Result<T, E = TranslateError> = std::result::Result<T, E>;

/// One stored object as the model holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Tier(Tier),
    /// A namespace's labels, the implicit `kubernetes.io/metadata.name` included.
    Namespace {
        name: String,
        labels: Labels,
    },
    ServiceAccount {
        namespace: String,
        name: String,
        labels: Labels,
    },
    NetworkSet(NetworkSet),
    Profile(Profile),
    Endpoint(Endpoint),
    /// A policy; whether its tier exists is for the caller to check ([`Model::tier`]).
    Policy(Policy),
}

/// Translates one stored object (`None`: a kind policy does not read).
pub fn item(r: &Resource) -> Result<Option<Item>> {
    let item = match r {
        Resource::Tier(o) => Item::Tier(Tier {
            name: o.metadata.name.clone(),
            order: o.spec.order,
            default_action: match o.spec.default_action.unwrap_or_default() {
                TierAction::Deny => TierDefault::Deny,
                TierAction::Pass => TierDefault::Pass,
            },
        }),
        Resource::Namespace(o) => {
            let mut labels = o.metadata.labels.clone();
            labels.insert(LABEL_NAMESPACE_NAME.into(), o.metadata.name.clone());
            Item::Namespace {
                name: o.metadata.name.clone(),
                labels,
            }
        }
        Resource::ServiceAccount(o) => Item::ServiceAccount {
            namespace: namespace(&o.metadata),
            name: o.metadata.name.clone(),
            labels: o.metadata.labels.clone(),
        },
        Resource::NetworkSet(o) | Resource::GlobalNetworkSet(o) => Item::NetworkSet(network_set(
            r.kind() == trellis_resources::Kind::NetworkSet,
            o,
        )?),
        Resource::Profile(o) => Item::Profile(profile(o)?),
        Resource::WorkloadEndpoint(o) => Item::Endpoint(endpoint(o)),
        Resource::KubernetesNetworkPolicy(o) => Item::Policy(kubernetes_policy(o)?),
        Resource::NetworkPolicy(o) => {
            let id = PolicyId {
                kind: PolicyKind::Namespaced,
                namespace: Some(namespace(&o.metadata)),
                name: o.metadata.name.clone(),
            };
            let s = &o.spec;
            let scope = NamespaceScope::Only(namespace(&o.metadata));
            Item::Policy(calico_policy(
                id,
                s.tier_name(),
                s.order,
                &s.selector,
                None,
                &s.service_account_selector,
                &s.types,
                &s.ingress,
                &s.egress,
                scope,
            )?)
        }
        Resource::GlobalNetworkPolicy(o) => {
            let id = PolicyId {
                kind: PolicyKind::Global,
                namespace: None,
                name: o.metadata.name.clone(),
            };
            let s = &o.spec;
            Item::Policy(calico_policy(
                id,
                s.tier_name(),
                s.order,
                &s.selector,
                s.namespace_selector.as_deref(),
                &s.service_account_selector,
                &s.types,
                &s.ingress,
                &s.egress,
                NamespaceScope::Any,
            )?)
        }
        Resource::ClusterNetworkPolicy(o) => Item::Policy(cluster::cluster_policy(
            PolicyKind::Cluster,
            &o.metadata.name,
            &o.spec,
        )?),
        Resource::AdminNetworkPolicy(o) => Item::Policy(cluster::cluster_policy(
            PolicyKind::AdminV1alpha1,
            &o.metadata.name,
            &o.spec.to_cluster(),
        )?),
        Resource::BaselineAdminNetworkPolicy(o) => Item::Policy(cluster::cluster_policy(
            PolicyKind::BaselineV1alpha1,
            &o.metadata.name,
            &o.spec.to_cluster(),
        )?),
        Resource::Node(o) => Item::NetworkSet(cluster::node_set(o)),
        _ => return Ok(None),
    };
    Ok(Some(item))
}

/// `Kind/namespace/name` of an object, as [`Skipped`] names it.
pub fn object_name(r: &Resource) -> String {
    let md = r.metadata();
    match &md.namespace {
        Some(ns) => format!("{}/{ns}/{}", r.kind(), md.name),
        None => format!("{}/{}", r.kind(), md.name),
    }
}

/// The kinds the model is built from: every stored object `translate` and `item` read.
pub const INPUT_KINDS: [trellis_resources::Kind; 14] = [
    trellis_resources::Kind::Tier,
    trellis_resources::Kind::KubernetesNetworkPolicy,
    trellis_resources::Kind::NetworkPolicy,
    trellis_resources::Kind::GlobalNetworkPolicy,
    trellis_resources::Kind::NetworkSet,
    trellis_resources::Kind::GlobalNetworkSet,
    trellis_resources::Kind::Profile,
    trellis_resources::Kind::Namespace,
    trellis_resources::Kind::ServiceAccount,
    trellis_resources::Kind::WorkloadEndpoint,
    trellis_resources::Kind::ClusterNetworkPolicy,
    trellis_resources::Kind::AdminNetworkPolicy,
    trellis_resources::Kind::BaselineAdminNetworkPolicy,
    trellis_resources::Kind::Node,
];

/// Builds the model from every stored object that concerns policy (others are ignored).
pub fn translate(resources: &[Resource]) -> Translation {
    let mut t = Translation::default();
    let m = &mut t.model;
    // Tiers first: policies are checked against them.
    for r in resources {
        if let Ok(Some(Item::Tier(tier))) = item(r) {
            m.tiers.insert(tier.name.clone(), tier);
        }
    }
    for r in resources {
        let result = item(r).and_then(|i| match i {
            None | Some(Item::Tier(_)) => Ok(()),
            Some(Item::Namespace { name, labels }) => {
                m.namespaces.insert(name, labels);
                Ok(())
            }
            Some(Item::ServiceAccount {
                namespace,
                name,
                labels,
            }) => {
                m.service_accounts.insert((namespace, name), labels);
                Ok(())
            }
            Some(Item::NetworkSet(s)) => {
                m.network_sets.push(s);
                Ok(())
            }
            Some(Item::Profile(p)) => {
                m.profiles.insert(p.name.clone(), p);
                Ok(())
            }
            Some(Item::Endpoint(e)) => {
                m.endpoints.insert((e.namespace.clone(), e.name.clone()), e);
                Ok(())
            }
            Some(Item::Policy(p)) => add(m, Ok(p)),
        });
        if let Err(reason) = result {
            t.skipped.push(Skipped {
                object: object_name(r),
                reason,
            });
        }
    }
    implicit_namespaces(m);
    t
}

/// Adds a policy whose tier exists (the `default` tier always does).
fn add(m: &mut Model, p: Result<Policy>) -> Result<()> {
    let p = p?;
    check_tier(m, &p)?;
    m.policies.insert(p.id.clone(), p);
    Ok(())
}

/// A policy's tier exists, and the ClusterNetworkPolicy tiers hold only ClusterNetworkPolicies
/// (a Calico policy naming `admin` written around the validating edge is left out).
pub fn check_tier(m: &Model, p: &Policy) -> Result<()> {
    let cluster_tier = builtin_cluster_tier(&p.tier).is_some();
    if cluster_tier != p.id.kind.is_cluster() {
        return Err(TranslateError::ClusterTier {
            tier: p.tier.clone(),
        });
    }
    if m.tier(&p.tier).is_none() {
        return Err(TranslateError::MissingTier {
            tier: p.tier.clone(),
        });
    }
    Ok(())
}

/// Every namespace an endpoint, policy, network set or service account is in has labels, at
/// least the implicit one, so namespace selectors see it as Kubernetes would.
fn implicit_namespaces(m: &mut Model) {
    let mut named: Vec<String> = m.endpoints.keys().map(|(ns, _)| ns.clone()).collect();
    named.extend(m.policies.keys().filter_map(|p| p.namespace.clone()));
    named.extend(m.network_sets.iter().filter_map(|s| s.namespace.clone()));
    named.extend(m.service_accounts.keys().map(|(ns, _)| ns.clone()));
    for ns in named {
        m.namespaces
            .entry(ns.clone())
            .or_default()
            .insert(LABEL_NAMESPACE_NAME.into(), ns);
    }
}

fn namespace(md: &trellis_resources::Metadata) -> String {
    md.namespace.clone().unwrap_or_else(|| "default".into())
}

fn parse(field: &'static str, s: &str) -> Result<Selector> {
    Selector::parse(s).map_err(|source| TranslateError::Selector {
        field,
        value: s.to_string(),
        source,
    })
}

fn opt_parse(field: &'static str, s: &Option<String>) -> Result<Option<Selector>> {
    s.as_deref().map(|s| parse(field, s)).transpose()
}

pub(crate) fn protocol(p: RuleProtocol) -> Protocol {
    match p {
        RuleProtocol::Tcp => Protocol::Tcp,
        RuleProtocol::Udp => Protocol::Udp,
        RuleProtocol::Icmp => Protocol::Icmp,
        RuleProtocol::Icmpv6 => Protocol::Icmpv6,
        RuleProtocol::Sctp => Protocol::Sctp,
        RuleProtocol::UdpLite => Protocol::UdpLite,
        RuleProtocol::Number(n) => Protocol::Number(n),
    }
}

fn port(p: &PortSpec) -> PortMatch {
    match p {
        PortSpec::Range { first, last } => PortMatch::Range {
            first: *first,
            last: *last,
        },
        PortSpec::Named(n) => PortMatch::Named(n.clone()),
    }
}

fn icmp(f: &Option<IcmpFields>) -> Option<IcmpMatch> {
    f.and_then(|f| {
        f.icmp_type.map(|t| IcmpMatch {
            icmp_type: t,
            code: f.code,
        })
    })
}

fn net(n: &str) -> Result<ipnet::IpNet> {
    parse_net(n).map_err(|reason| TranslateError::Net { reason })
}

fn nets(list: &[String]) -> Result<Vec<ipnet::IpNet>> {
    list.iter().map(|n| net(n)).collect()
}

fn entity(e: &EntityRule) -> Result<EntityMatch> {
    Ok(EntityMatch {
        nets: nets(&e.nets)?,
        not_nets: nets(&e.not_nets)?,
        selector: opt_parse("selector", &e.selector)?,
        not_selector: opt_parse("notSelector", &e.not_selector)?,
        namespaces: opt_parse("namespaceSelector", &e.namespace_selector)?
            .map(NamespaceScope::Matching),
        ports: e.ports.iter().map(port).collect(),
        not_ports: e.not_ports.iter().map(port).collect(),
        service_accounts: match &e.service_accounts {
            Some(sa) => Some(ServiceAccountMatch {
                names: sa.names.clone(),
                selector: opt_parse("serviceAccounts.selector", &sa.selector)?,
            }),
            None => None,
        },
    })
}

/// A Calico rule.
pub fn rule(r: &RuleSpec) -> Result<Rule> {
    Ok(Rule {
        action: match r.action {
            RuleAction::Allow => Action::Allow,
            RuleAction::Deny => Action::Deny,
            RuleAction::Pass => Action::Pass,
            RuleAction::Log => Action::Log,
        },
        ip_version: r.ip_version,
        protocol: r.protocol.map(protocol),
        not_protocol: r.not_protocol.map(protocol),
        icmp: icmp(&r.icmp),
        not_icmp: icmp(&r.not_icmp),
        source: entity(&r.source)?,
        destination: entity(&r.destination)?,
    })
}

fn rules(list: &[RuleSpec]) -> Result<Vec<Rule>> {
    list.iter().map(rule).collect()
}

#[allow(clippy::too_many_arguments)]
fn calico_policy(
    id: PolicyId,
    tier: &str,
    order: Option<f64>,
    selector: &Option<String>,
    namespace_selector: Option<&str>,
    sa_selector: &Option<String>,
    types: &[PolicyType],
    ingress: &[RuleSpec],
    egress: &[RuleSpec],
    scope: NamespaceScope,
) -> Result<Policy> {
    // Types as stored are defaulted; defaulting again covers objects written without them.
    let types = if types.is_empty() {
        trellis_resources::policy::default_types(ingress, egress)
    } else {
        types.to_vec()
    };
    let namespaces = match namespace_selector {
        Some(s) => NamespaceScope::Matching(parse("namespaceSelector", s)?),
        None => scope,
    };
    Ok(Policy {
        id,
        tier: tier.to_string(),
        order,
        selector: opt_parse("selector", selector)?.unwrap_or(Selector::All),
        namespaces,
        service_account_selector: opt_parse("serviceAccountSelector", sa_selector)?,
        ingress: if types.contains(&PolicyType::Ingress) {
            Some(rules(ingress)?)
        } else {
            None
        },
        egress: if types.contains(&PolicyType::Egress) {
            Some(rules(egress)?)
        } else {
            None
        },
        ingress_origins: Vec::new(),
        egress_origins: Vec::new(),
    })
}

fn profile(o: &Object<trellis_resources::ProfileSpec>) -> Result<Profile> {
    Ok(Profile {
        name: o.metadata.name.clone(),
        labels_to_apply: o.spec.labels_to_apply.clone(),
        ingress: rules(&o.spec.ingress)?,
        egress: rules(&o.spec.egress)?,
    })
}

fn network_set(
    namespaced: bool,
    o: &Object<trellis_resources::NetworkSetSpec>,
) -> Result<NetworkSet> {
    Ok(NetworkSet {
        namespace: namespaced.then(|| namespace(&o.metadata)),
        name: o.metadata.name.clone(),
        labels: o.metadata.labels.clone(),
        nets: nets(&o.spec.nets)?,
        node: false,
    })
}

fn endpoint(o: &Object<WorkloadEndpointSpec>) -> Endpoint {
    let s = &o.spec;
    Endpoint {
        namespace: namespace(&o.metadata),
        name: o.metadata.name.clone(),
        pod: s.pod.clone(),
        node: s.node.clone(),
        interface: s.interface_name.clone(),
        addresses: s.ip_networks.iter().map(|n| n.addr()).collect(),
        labels: o.metadata.labels.clone(),
        service_account: s.service_account_name.clone(),
        ports: s
            .ports
            .iter()
            .map(|p| NamedPort {
                name: p.name.clone(),
                protocol: protocol(p.protocol),
                port: p.port,
            })
            .collect(),
        profiles: s.profiles.clone(),
    }
}

/// `projectcalico.org/orchestrator == 'k8s' && <selector>`: a Kubernetes pod selector as Calico
/// writes it.
fn pod_selector(s: Selector) -> Selector {
    let k8s = Selector::Eq(LABEL_ORCHESTRATOR.into(), "k8s".into());
    match s {
        Selector::All => k8s,
        Selector::And(mut xs) => {
            xs.insert(0, k8s);
            Selector::And(xs)
        }
        other => Selector::And(vec![k8s, other]),
    }
}

fn kube_protocol(p: Option<KubeProtocol>) -> Protocol {
    match p.unwrap_or_default() {
        KubeProtocol::Tcp => Protocol::Tcp,
        KubeProtocol::Udp => Protocol::Udp,
        KubeProtocol::Sctp => Protocol::Sctp,
    }
}

/// Ports grouped by protocol; an empty list for a protocol means every port of it. `None`:
/// no port restriction at all (no ports given).
fn ports_by_protocol(ports: &[NetworkPolicyPort]) -> Option<BTreeMap<Protocol, Vec<PortMatch>>> {
    if ports.is_empty() {
        return None;
    }
    let mut by: BTreeMap<Protocol, Option<Vec<PortMatch>>> = BTreeMap::new();
    // What each list already holds: Kubernetes bounds neither the ports of a rule nor the
    // rules (only the object's size does), so no step here may look through a list.
    let mut seen: BTreeSet<(Protocol, PortMatch)> = BTreeSet::new();
    for p in ports {
        let entry = by
            .entry(kube_protocol(p.protocol))
            .or_insert(Some(Vec::new()));
        let m = match &p.port {
            None => {
                // A protocol without a port: all its ports, whatever else was listed.
                *entry = None;
                continue;
            }
            Some(IntOrString::Int(n)) => {
                let first = u16::try_from(*n).unwrap_or(0);
                let last = p
                    .end_port
                    .and_then(|e| u16::try_from(e).ok())
                    .unwrap_or(first);
                PortMatch::Range { first, last }
            }
            Some(IntOrString::String(name)) => PortMatch::Named(name.clone()),
        };
        if let Some(list) = entry {
            if seen.insert((kube_protocol(p.protocol), m.clone())) {
                list.push(m);
            }
        }
    }
    Some(
        by.into_iter()
            .map(|(p, l)| (p, l.unwrap_or_default()))
            .collect(),
    )
}

/// A peer as the far end of a rule (`None`: any).
fn peer(p: Option<&NetworkPolicyPeer>) -> Result<EntityMatch> {
    let Some(p) = p else {
        return Ok(EntityMatch::default());
    };
    if let Some(b) = &p.ip_block {
        return Ok(EntityMatch {
            nets: vec![net(&b.cidr)?],
            not_nets: nets(&b.except)?,
            ..Default::default()
        });
    }
    let pods = p
        .pod_selector
        .as_ref()
        .map(|s| s.to_selector())
        .unwrap_or(Selector::All);
    Ok(EntityMatch {
        selector: Some(pod_selector(pods)),
        // No namespaceSelector: the policy's own namespace (its scope).
        namespaces: p
            .namespace_selector
            .as_ref()
            .map(|s| NamespaceScope::Matching(s.to_selector())),
        ..Default::default()
    })
}

/// One direction's rules: protocols × peers, each an Allow.
fn kubernetes_rules(
    peers: &[NetworkPolicyPeer],
    ports: &[NetworkPolicyPort],
    ingress: bool,
) -> Result<Vec<Rule>> {
    let peers: Vec<Option<&NetworkPolicyPeer>> = if peers.is_empty() {
        vec![None]
    } else {
        peers.iter().map(Some).collect()
    };
    let protocols: Vec<(Option<Protocol>, Vec<PortMatch>)> = match ports_by_protocol(ports) {
        None => vec![(None, Vec::new())],
        Some(by) => by.into_iter().map(|(p, l)| (Some(p), l)).collect(),
    };
    let mut out = Vec::new();
    for (proto, ports) in &protocols {
        for p in &peers {
            let far = peer(*p)?;
            let mut rule = Rule {
                action: Action::Allow,
                ip_version: None,
                protocol: *proto,
                not_protocol: None,
                icmp: None,
                not_icmp: None,
                source: EntityMatch::default(),
                destination: EntityMatch::default(),
            };
            if ingress {
                rule.source = far;
                rule.destination.ports = ports.clone();
            } else {
                rule.destination = far;
                rule.destination.ports = ports.clone();
            }
            out.push(rule);
        }
    }
    Ok(out)
}

fn kubernetes_policy(o: &Object<KubernetesNetworkPolicySpec>) -> Result<Policy> {
    let ns = namespace(&o.metadata);
    let mut spec: KubernetesNetworkPolicySpec = o.spec.clone();
    spec.apply_defaults();
    let mut ingress = Vec::new();
    for r in &spec.ingress {
        ingress.extend(kubernetes_rules(&r.from, &r.ports, true)?);
    }
    let mut egress = Vec::new();
    for r in &spec.egress {
        egress.extend(kubernetes_rules(&r.to, &r.ports, false)?);
    }
    Ok(Policy {
        id: PolicyId {
            kind: PolicyKind::Kubernetes,
            namespace: Some(ns.clone()),
            name: o.metadata.name.clone(),
        },
        tier: DEFAULT_TIER.into(),
        order: Some(KUBERNETES_POLICY_ORDER),
        selector: pod_selector(spec.pod_selector.to_selector()),
        namespaces: NamespaceScope::Only(ns),
        service_account_selector: None,
        ingress: spec
            .policy_types
            .contains(&PolicyType::Ingress)
            .then_some(ingress),
        egress: spec
            .policy_types
            .contains(&PolicyType::Egress)
            .then_some(egress),
        ingress_origins: Vec::new(),
        egress_origins: Vec::new(),
    })
}

mod cluster;
#[cfg(test)]
mod tests;

pub use cluster::{node_addresses, node_set_name};
