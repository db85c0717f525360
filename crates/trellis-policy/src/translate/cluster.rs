//! ClusterNetworkPolicy (sig-network's policy API) and Nodes → the model. Pure.
//!
//! A ClusterNetworkPolicy becomes one policy of kind [`PolicyKind::Cluster`] in the built-in
//! tier [`ADMIN_TIER`] or [`BASELINE_TIER`], ordered by its priority (then name). Its subject
//! is the pods of the namespaces its selector matches (`namespaces`), or those of them its pod
//! selector matches too (`pods`). Each rule becomes, in order, one model rule per peer ×
//! protocol entry with the rule's action (Accept → Allow, Deny → Deny, Pass → Pass): the same
//! first-match result as the rule, since the expansion keeps one action. Peers: `namespaces` =
//! every pod of the matching namespaces, `pods` = the matching pods of the matching namespaces
//! (pod selectors require `projectcalico.org/orchestrator == 'k8s'` as Kubernetes
//! NetworkPolicy's do, so they never match a NetworkSet), `networks` = the CIDRs, `nodes` = the
//! addresses of the matching Nodes (node sets, [`NetworkSet::node`]). A direction with no rules
//! is not affected (`None`).
//!
//! A peer with no field set fails closed, as the API says, for its whole rule: an Accept rule
//! with one matches nothing (no model rule); a Deny or Pass rule with one becomes "Deny all"
//! (one Deny with no peer and no protocol match), whatever its other peers.

use trellis_resources::cnp::{
    ClusterNetworkPolicySpec, CnpAction, CnpEgressPeer, CnpIngressPeer, CnpPort, CnpProtocol,
    CnpTier, NamespacedPod,
};
use trellis_resources::{LabelSelector, NodeSpec, Object, Selector};

use super::{nets, pod_selector, Result};
use crate::model::*;

/// The name a Node's set has in the model (`/` cannot occur in a GlobalNetworkSet's name).
pub fn node_set_name(node: &str) -> String {
    format!("node/{node}")
}

/// A Node's addresses, as `nodes` peers and `policy trace` see them: `spec.addresses` (an
/// address or a CIDR's address), the BGP addresses and the VXLAN tunnel address; sorted, once.
pub fn node_addresses(spec: &NodeSpec) -> Vec<std::net::IpAddr> {
    let mut addrs: Vec<std::net::IpAddr> = spec
        .addresses
        .iter()
        .filter_map(|a| a.address.split('/').next()?.parse().ok())
        .collect();
    if let Some(b) = &spec.bgp {
        addrs.extend(
            b.ipv4_address
                .iter()
                .chain(&b.ipv6_address)
                .map(|n| n.addr()),
        );
    }
    addrs.extend(spec.ipv4_vxlan_tunnel_addr);
    addrs.sort();
    addrs.dedup();
    addrs
}

/// A Node's addresses as a node set ([`node_addresses`]).
pub(super) fn node_set(o: &Object<NodeSpec>) -> NetworkSet {
    let addrs = node_addresses(&o.spec);
    NetworkSet {
        namespace: None,
        name: node_set_name(&o.metadata.name),
        labels: o.metadata.labels.clone(),
        nets: addrs.into_iter().map(ipnet::IpNet::from).collect(),
        node: true,
    }
}

fn namespaces_peer(sel: &LabelSelector) -> EntityMatch {
    EntityMatch {
        selector: Some(pod_selector(Selector::All)),
        namespaces: Some(NamespaceScope::Matching(sel.to_selector())),
        ..Default::default()
    }
}

fn pods_peer(p: &NamespacedPod) -> EntityMatch {
    EntityMatch {
        selector: Some(pod_selector(p.pod_selector.to_selector())),
        namespaces: Some(NamespaceScope::Matching(p.namespace_selector.to_selector())),
        ..Default::default()
    }
}

/// A peer's match, `None` when it has no field this version knows (fails closed).
fn ingress_peer(p: &CnpIngressPeer) -> Option<EntityMatch> {
    match (&p.namespaces, &p.pods) {
        (Some(n), _) => Some(namespaces_peer(n)),
        (None, Some(pods)) => Some(pods_peer(pods)),
        (None, None) => None,
    }
}

fn egress_peer(p: &CnpEgressPeer) -> Result<Option<EntityMatch>> {
    Ok(if let Some(n) = &p.namespaces {
        Some(namespaces_peer(n))
    } else if let Some(pods) = &p.pods {
        Some(pods_peer(pods))
    } else if let Some(n) = &p.nodes {
        Some(EntityMatch {
            selector: Some(n.to_selector()),
            namespaces: Some(NamespaceScope::Nodes),
            ..Default::default()
        })
    } else if !p.networks.is_empty() {
        Some(EntityMatch {
            nets: nets(&p.networks)?,
            ..Default::default()
        })
    } else {
        // domainNames is refused at the edge; a record holding it matches nothing we can
        // enforce, so it fails closed like an unknown peer.
        None
    })
}

fn port_range(p: &Option<CnpPort>) -> Vec<PortMatch> {
    let clamp = |n: i64| u16::try_from(n).unwrap_or(0);
    match p {
        Some(CnpPort {
            number: Some(n), ..
        }) => vec![PortMatch::Range {
            first: clamp(*n),
            last: clamp(*n),
        }],
        Some(CnpPort { range: Some(r), .. }) => vec![PortMatch::Range {
            first: clamp(r.start),
            last: clamp(r.end),
        }],
        _ => Vec::new(),
    }
}

/// One protocol entry: the protocol (none for a named port: the endpoint's declaration says
/// which) and the destination ports.
fn protocol_match(p: &CnpProtocol) -> (Option<Protocol>, Vec<PortMatch>) {
    if let Some(n) = &p.destination_named_port {
        return (None, vec![PortMatch::Named(n.clone())]);
    }
    let entries = [
        (Protocol::Tcp, p.tcp),
        (Protocol::Udp, p.udp),
        (Protocol::Sctp, p.sctp),
    ];
    for (proto, ports) in entries {
        if let Some(ports) = ports {
            return (Some(proto), port_range(&ports.destination_port));
        }
    }
    (None, Vec::new())
}

fn action(a: CnpAction) -> Action {
    match a {
        CnpAction::Accept => Action::Allow,
        CnpAction::Deny => Action::Deny,
        CnpAction::Pass => Action::Pass,
    }
}

fn blank(action: Action) -> Rule {
    Rule {
        action,
        ip_version: None,
        protocol: None,
        not_protocol: None,
        icmp: None,
        not_icmp: None,
        source: EntityMatch::default(),
        destination: EntityMatch::default(),
    }
}

/// One CNP rule's model rules: peers × protocols, in order. `peers` holds `None` for a peer
/// that fails closed.
fn expand(
    a: CnpAction,
    peers: Vec<Option<EntityMatch>>,
    protocols: &[CnpProtocol],
    ingress: bool,
) -> Vec<Rule> {
    let protos: Vec<(Option<Protocol>, Vec<PortMatch>)> = if protocols.is_empty() {
        vec![(None, Vec::new())]
    } else {
        protocols.iter().map(protocol_match).collect()
    };
    // Fail closed (the API: "treat the rule as matching no traffic" for Accept, "as a 'Deny
    // all' rule" for Deny and Pass): the whole rule, whatever its other peers and their order.
    if peers.iter().any(Option::is_none) {
        return match a {
            CnpAction::Accept => Vec::new(),
            CnpAction::Deny | CnpAction::Pass => vec![blank(Action::Deny)],
        };
    }
    let mut out = Vec::new();
    for far in peers.into_iter().flatten() {
        for (proto, ports) in &protos {
            let mut r = blank(action(a));
            r.protocol = *proto;
            if ingress {
                r.source = far.clone();
            } else {
                r.destination = far.clone();
            }
            r.destination.ports = ports.clone();
            out.push(r);
        }
    }
    out
}

/// `n` model rules from written rule `index` (named `name`).
fn origins(index: usize, name: &Option<String>, n: usize) -> Vec<RuleOrigin> {
    vec![
        RuleOrigin {
            index,
            name: name.clone(),
        };
        n
    ]
}

/// A ClusterNetworkPolicy (or a v1alpha1 policy mapped onto one: `kind` says which) as a
/// model policy.
pub(super) fn cluster_policy(
    kind: PolicyKind,
    name: &str,
    s: &ClusterNetworkPolicySpec,
) -> Result<Policy> {
    let (selector, namespaces) = match (&s.subject.namespaces, &s.subject.pods) {
        (Some(n), _) => (Selector::All, n.to_selector()),
        (None, Some(p)) => (
            p.pod_selector.to_selector(),
            p.namespace_selector.to_selector(),
        ),
        // Refused at the edge; a record without a subject selects nothing.
        (None, None) => (Selector::Not(Box::new(Selector::All)), Selector::All),
    };
    let (mut ingress, mut ingress_origins) = (Vec::new(), Vec::new());
    for (index, r) in s.ingress.iter().enumerate() {
        let peers = r.from.iter().map(ingress_peer).collect();
        let rules = expand(r.action, peers, &r.protocols, true);
        ingress_origins.extend(origins(index, &r.name, rules.len()));
        ingress.extend(rules);
    }
    let (mut egress, mut egress_origins) = (Vec::new(), Vec::new());
    for (index, r) in s.egress.iter().enumerate() {
        let peers = r.to.iter().map(egress_peer).collect::<Result<Vec<_>>>()?;
        let rules = expand(r.action, peers, &r.protocols, false);
        egress_origins.extend(origins(index, &r.name, rules.len()));
        egress.extend(rules);
    }
    Ok(Policy {
        id: PolicyId {
            kind,
            namespace: None,
            name: name.to_string(),
        },
        tier: match s.tier {
            CnpTier::Admin => ADMIN_TIER,
            CnpTier::Baseline => BASELINE_TIER,
        }
        .into(),
        order: Some(s.priority as f64),
        selector: pod_selector(selector),
        namespaces: NamespaceScope::Matching(namespaces),
        service_account_selector: None,
        ingress: (!s.ingress.is_empty()).then_some(ingress),
        egress: (!s.egress.is_empty()).then_some(egress),
        ingress_origins,
        egress_origins,
    })
}
