//! sig-network's ClusterNetworkPolicy (`policy.networking.k8s.io/v1beta1`, and the same schema
//! as `v1alpha2`): the cluster administrator's policy in the Admin tier (before every
//! NetworkPolicy) or the Baseline tier (after them). Field names and limits are upstream's
//! (kubernetes-sigs/network-policy-api `apis/v1alpha2/clusternetworkpolicy_types.go` and the
//! CRD's validation in `config/crd`). Pure data and its validation; no I/O.
//!
//! Where Trellis differs: `domainNames` peers are refused (no DNS view); a peer with no field
//! set is accepted and fails closed as the API asks of an implementation that meets a peer type
//! it does not know (the CRD refuses `{}`, but a translator from a newer API stores one).

use serde::{Deserialize, Deserializer, Serialize};

use crate::k8s::{valid_port_name, LabelSelector};
use crate::policy_validate::{label_selector, parse_net};
use crate::{labels, Object, ResourceError};

/// The API group of ClusterNetworkPolicy.
pub const POLICY_API_GROUP: &str = "policy.networking.k8s.io";
/// The version ClusterNetworkPolicies are stored and printed with.
pub const CNP_API_VERSION: &str = "policy.networking.k8s.io/v1beta1";
/// The same kind in its alpha version (identical schema), accepted on input.
pub const CNP_API_VERSION_ALPHA2: &str = "policy.networking.k8s.io/v1alpha2";

/// Upstream's limits (CRD `maxItems`/`maximum`/`maxLength`).
pub const MAX_PRIORITY: i64 = 1000;
pub const MAX_RULES: usize = 25;
pub const MAX_PEERS: usize = 25;
pub const MAX_PROTOCOLS: usize = 25;
pub const MAX_NETWORKS: usize = 25;
pub const MAX_RULE_NAME: usize = 100;

/// The count limits of a policy API version (v1alpha1's are larger: see `anp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Rules per direction.
    pub rules: usize,
    /// Peers per rule.
    pub peers: usize,
    /// Protocol (port) matches per rule.
    pub protocols: usize,
}

/// ClusterNetworkPolicy's.
pub const LIMITS: Limits = Limits {
    rules: MAX_RULES,
    peers: MAX_PEERS,
    protocols: MAX_PROTOCOLS,
};

/// Which tier a ClusterNetworkPolicy is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CnpTier {
    /// Before every NetworkPolicy; cannot be overridden by them.
    Admin,
    /// After every NetworkPolicy; only for pods no NetworkPolicy isolates.
    Baseline,
}

/// A rule's action. `Pass` only in the Admin tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CnpAction {
    Accept,
    Deny,
    Pass,
}

/// Pods in namespaces: both selectors must match (empty selects all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespacedPod {
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    pub pod_selector: LabelSelector,
}

/// The pods the policy applies to: exactly one field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpSubject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

/// A source of ingress traffic: exactly one field (none: fails closed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpIngressPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

/// A destination of egress traffic: exactly one field (none: fails closed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpEgressPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    /// The addresses of the matching Nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    /// CIDRs (an address alone is its /32 or /128).
    #[serde(
        default,
        deserialize_with = "non_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub networks: Vec<String>,
    /// Parsed so that it can be refused with a reason: Trellis has no DNS view.
    #[serde(
        default,
        deserialize_with = "non_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub domain_names: Vec<String>,
}

/// An inclusive port range, `start < end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnpPortRange {
    pub start: i64,
    pub end: i64,
}

/// `number` or `range`: exactly one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnpPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<CnpPortRange>,
}

/// `tcp`/`udp`/`sctp`'s matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpProtocolPorts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<CnpPort>,
}

/// One protocol match: exactly one field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpProtocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<CnpProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<CnpProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<CnpProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpIngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: CnpAction,
    pub from: Vec<CnpIngressPeer>,
    #[serde(
        default,
        deserialize_with = "non_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub protocols: Vec<CnpProtocol>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpEgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: CnpAction,
    pub to: Vec<CnpEgressPeer>,
    #[serde(
        default,
        deserialize_with = "non_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub protocols: Vec<CnpProtocol>,
}

/// `ClusterNetworkPolicy`'s spec, as upstream defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterNetworkPolicySpec {
    pub tier: CnpTier,
    /// 0–1000, lower first within the tier.
    pub priority: i64,
    pub subject: CnpSubject,
    /// Ordered; none: the policy does not affect ingress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<CnpIngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<CnpEgressRule>,
}

impl CnpEgressPeer {
    /// How many peer fields are set (upstream: exactly one; none fails closed).
    pub fn fields_set(&self) -> usize {
        [
            self.namespaces.is_some(),
            self.pods.is_some(),
            self.nodes.is_some(),
            !self.networks.is_empty(),
            !self.domain_names.is_empty(),
        ]
        .into_iter()
        .filter(|b| *b)
        .count()
    }
}

/// Upstream's `MinItems=1` on an optional list: absent is fine, `[]` is refused (stored, it
/// would read as absent: a peer with no field, which fails closed, or a rule matching every
/// port). `serde_path_to_error` names the field.
pub(crate) fn non_empty<'de, D, T>(de: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let v = Vec::<T>::deserialize(de)?;
    if v.is_empty() {
        return Err(serde::de::Error::custom(
            "must not be empty: give at least one entry or leave the field out",
        ));
    }
    Ok(v)
}

type Result<T = (), E = ResourceError> = std::result::Result<T, E>;

fn err(field: impl Into<String>, reason: impl Into<String>) -> ResourceError {
    ResourceError::field(field, reason)
}

fn at_most(field: &str, len: usize, max: usize) -> Result {
    if len > max {
        return Err(err(field, format!("has {len} entries; at most {max}")));
    }
    Ok(())
}

fn namespaced_pod(f: &str, p: &NamespacedPod) -> Result {
    label_selector(&format!("{f}.namespaceSelector"), &p.namespace_selector)?;
    label_selector(&format!("{f}.podSelector"), &p.pod_selector)
}

fn subject(f: &str, s: &CnpSubject) -> Result {
    match (&s.namespaces, &s.pods) {
        (Some(n), None) => label_selector(&format!("{f}.namespaces"), n),
        (None, Some(p)) => namespaced_pod(&format!("{f}.pods"), p),
        (Some(_), Some(_)) => Err(err(f, "give namespaces or pods, not both")),
        (None, None) => Err(err(f, "must give namespaces or pods")),
    }
}

fn port_number(f: &str, n: i64) -> Result {
    if !(1..=65535).contains(&n) {
        return Err(err(f, format!("{n} is not a port number (1-65535)")));
    }
    Ok(())
}

fn protocol(f: &str, p: &CnpProtocol) -> Result {
    let set = [p.tcp, p.udp, p.sctp]
        .iter()
        .filter(|x| x.is_some())
        .count()
        + usize::from(p.destination_named_port.is_some());
    if set != 1 {
        return Err(err(
            f,
            "give exactly one of tcp, udp, sctp and destinationNamedPort",
        ));
    }
    if let Some(n) = &p.destination_named_port {
        return valid_port_name(n).map_err(|e| err(format!("{f}.destinationNamedPort"), e));
    }
    for (name, ports) in [("tcp", p.tcp), ("udp", p.udp), ("sctp", p.sctp)] {
        let Some(ports) = ports else { continue };
        let f = format!("{f}.{name}.destinationPort");
        let Some(port) = ports.destination_port else {
            return Err(err(f, "is required"));
        };
        match (port.number, port.range) {
            (Some(n), None) => port_number(&format!("{f}.number"), n)?,
            (None, Some(r)) => {
                port_number(&format!("{f}.range.start"), r.start)?;
                port_number(&format!("{f}.range.end"), r.end)?;
                if r.start >= r.end {
                    return Err(err(
                        format!("{f}.range"),
                        format!("start {} must be less than end {}", r.start, r.end),
                    ));
                }
            }
            _ => return Err(err(f, "give exactly one of number and range")),
        }
    }
    Ok(())
}

fn rule_common(
    f: &str,
    limits: Limits,
    tier: CnpTier,
    name: &Option<String>,
    action: CnpAction,
    peers: (&str, usize),
    protocols: &[CnpProtocol],
) -> Result {
    if let Some(n) = name {
        if n.chars().count() > MAX_RULE_NAME {
            return Err(err(
                format!("{f}.name"),
                format!("is longer than {MAX_RULE_NAME} characters"),
            ));
        }
    }
    if tier == CnpTier::Baseline && action == CnpAction::Pass {
        return Err(err(
            format!("{f}.action"),
            "Pass is only valid in the Admin tier",
        ));
    }
    let (peers_name, n) = peers;
    if n == 0 {
        return Err(err(format!("{f}.{peers_name}"), "needs at least one peer"));
    }
    at_most(&format!("{f}.{peers_name}"), n, limits.peers)?;
    at_most(&format!("{f}.protocols"), protocols.len(), limits.protocols)?;
    for (i, p) in protocols.iter().enumerate() {
        protocol(&format!("{f}.protocols[{i}]"), p)?;
    }
    Ok(())
}

fn egress_peer(f: &str, p: &CnpEgressPeer, named_ports: bool) -> Result {
    if p.fields_set() > 1 {
        return Err(err(
            f,
            "give exactly one of namespaces, pods, nodes and networks",
        ));
    }
    if !p.domain_names.is_empty() {
        return Err(err(
            format!("{f}.domainNames"),
            "is not supported by Trellis (no DNS view); refused rather than ignored",
        ));
    }
    if let Some(n) = &p.namespaces {
        label_selector(&format!("{f}.namespaces"), n)?;
    }
    if let Some(pods) = &p.pods {
        namespaced_pod(&format!("{f}.pods"), pods)?;
    }
    if let Some(n) = &p.nodes {
        label_selector(&format!("{f}.nodes"), n)?;
    }
    let f_net = format!("{f}.networks");
    at_most(&f_net, p.networks.len(), MAX_NETWORKS)?;
    for (i, n) in p.networks.iter().enumerate() {
        if n.len() > 43 {
            return Err(err(format!("{f_net}[{i}]"), "is longer than 43 characters"));
        }
        parse_net(n).map_err(|e| err(format!("{f_net}[{i}]"), e))?;
    }
    if named_ports && (p.nodes.is_some() || !p.networks.is_empty()) {
        return Err(err(
            f,
            "networks and nodes peers cannot go with destinationNamedPort (they have no named ports)",
        ));
    }
    Ok(())
}

/// Checks what upstream's CRD and its CEL rules check, naming the field.
pub fn cluster_network_policy(o: &Object<ClusterNetworkPolicySpec>) -> Result {
    validate_with(o, LIMITS)
}

/// [`cluster_network_policy`] with an API version's count limits.
pub fn validate_with(o: &Object<ClusterNetworkPolicySpec>, limits: Limits) -> Result {
    crate::policy_validate::subdomain_name(&o.metadata.name)?;
    if o.metadata.namespace.is_some() {
        return Err(err(
            "metadata.namespace",
            "ClusterNetworkPolicy is cluster-wide: no namespace",
        ));
    }
    labels::check("metadata.labels", &o.metadata.labels)?;
    let s = &o.spec;
    if !(0..=MAX_PRIORITY).contains(&s.priority) {
        return Err(err(
            "spec.priority",
            format!("{} is out of range (0-{MAX_PRIORITY})", s.priority),
        ));
    }
    subject("spec.subject", &s.subject)?;
    at_most("spec.ingress", s.ingress.len(), limits.rules)?;
    at_most("spec.egress", s.egress.len(), limits.rules)?;
    for (i, r) in s.ingress.iter().enumerate() {
        let f = format!("spec.ingress[{i}]");
        let peers = ("from", r.from.len());
        rule_common(&f, limits, s.tier, &r.name, r.action, peers, &r.protocols)?;
        for (j, p) in r.from.iter().enumerate() {
            let f = format!("{f}.from[{j}]");
            match (&p.namespaces, &p.pods) {
                (Some(_), Some(_)) => return Err(err(f, "give namespaces or pods, not both")),
                (Some(n), None) => label_selector(&format!("{f}.namespaces"), n)?,
                (None, Some(pods)) => namespaced_pod(&format!("{f}.pods"), pods)?,
                (None, None) => {}
            }
        }
    }
    for (i, r) in s.egress.iter().enumerate() {
        let f = format!("spec.egress[{i}]");
        let peers = ("to", r.to.len());
        rule_common(&f, limits, s.tier, &r.name, r.action, peers, &r.protocols)?;
        let named = r
            .protocols
            .iter()
            .any(|p| p.destination_named_port.is_some());
        for (j, p) in r.to.iter().enumerate() {
            egress_peer(&format!("{f}.to[{j}]"), p, named)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
