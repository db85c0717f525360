//! sig-network's older `policy.networking.k8s.io/v1alpha1` kinds, AdminNetworkPolicy and
//! BaselineAdminNetworkPolicy (`apis/v1alpha1` of kubernetes-sigs/network-policy-api), which
//! ClusterNetworkPolicy replaced. Stored as written (their own kinds, names and limits) and
//! mapped onto ClusterNetworkPolicy's spec ([`AdminNetworkPolicySpec::to_cluster`]) for
//! validation of the shared parts and for translation. Pure.
//!
//! The mapping: AdminNetworkPolicy is the Admin tier, BaselineAdminNetworkPolicy (a singleton
//! named `default`, no priority) the Baseline tier at priority 0; Allow is Accept; a port
//! `portNumber {protocol, port}` is that protocol's `destinationPort.number`, `portRange` its
//! `range`, `namedPort` `destinationNamedPort`. Limits are v1alpha1's: 100 rules per direction,
//! 100 peers and 100 ports per rule, 25 networks per peer.

use serde::{Deserialize, Serialize};

use crate::cnp::{
    self, ClusterNetworkPolicySpec, CnpAction, CnpEgressPeer, CnpEgressRule, CnpIngressPeer,
    CnpIngressRule, CnpPort, CnpPortRange, CnpProtocol, CnpProtocolPorts, CnpSubject, CnpTier,
    Limits,
};
use crate::k8s::KubeProtocol;
use crate::{Object, ResourceError};

/// The version both kinds are stored and printed with.
pub const ANP_API_VERSION: &str = "policy.networking.k8s.io/v1alpha1";
/// The only name a BaselineAdminNetworkPolicy may have.
pub const BANP_NAME: &str = "default";
/// v1alpha1's limits.
pub const LIMITS: Limits = Limits {
    rules: 100,
    peers: 100,
    protocols: 100,
};

/// v1alpha1's actions (Pass only in AdminNetworkPolicy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AnpAction {
    Allow,
    Deny,
    Pass,
}

/// `portNumber`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnpPortNumber {
    /// Defaulted to TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<KubeProtocol>,
    pub port: i64,
}

/// `portRange`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnpPortRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<KubeProtocol>,
    pub start: i64,
    pub end: i64,
}

/// One port match: exactly one field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnpPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_number: Option<AnpPortNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<AnpPortRange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnpIngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: AnpAction,
    pub from: Vec<CnpIngressPeer>,
    #[serde(
        default,
        deserialize_with = "cnp::non_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<AnpPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnpEgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: AnpAction,
    pub to: Vec<CnpEgressPeer>,
    #[serde(
        default,
        deserialize_with = "cnp::non_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<AnpPort>,
}

/// `AdminNetworkPolicy`'s spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminNetworkPolicySpec {
    pub priority: i64,
    pub subject: CnpSubject,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<AnpIngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<AnpEgressRule>,
}

/// `BaselineAdminNetworkPolicy`'s spec (no priority; actions Allow and Deny).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BaselineAdminNetworkPolicySpec {
    pub subject: CnpSubject,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<AnpIngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<AnpEgressRule>,
}

fn action(a: AnpAction) -> CnpAction {
    match a {
        AnpAction::Allow => CnpAction::Accept,
        AnpAction::Deny => CnpAction::Deny,
        AnpAction::Pass => CnpAction::Pass,
    }
}

fn protocol(protocol: Option<KubeProtocol>, port: CnpPort) -> CnpProtocol {
    let ports = Some(CnpProtocolPorts {
        destination_port: Some(port),
    });
    match protocol.unwrap_or_default() {
        KubeProtocol::Tcp => CnpProtocol {
            tcp: ports,
            ..Default::default()
        },
        KubeProtocol::Udp => CnpProtocol {
            udp: ports,
            ..Default::default()
        },
        KubeProtocol::Sctp => CnpProtocol {
            sctp: ports,
            ..Default::default()
        },
    }
}

/// A port as ClusterNetworkPolicy's protocol match. A port with no field (refused at the
/// edge) becomes an empty match, which validation refuses too.
fn port(p: &AnpPort) -> CnpProtocol {
    if let Some(n) = &p.named_port {
        return CnpProtocol {
            destination_named_port: Some(n.clone()),
            ..Default::default()
        };
    }
    if let Some(n) = p.port_number {
        let number = CnpPort {
            number: Some(n.port),
            range: None,
        };
        return protocol(n.protocol, number);
    }
    if let Some(r) = p.port_range {
        let range = CnpPort {
            number: None,
            range: Some(CnpPortRange {
                start: r.start,
                end: r.end,
            }),
        };
        return protocol(r.protocol, range);
    }
    CnpProtocol::default()
}

fn rules(
    ingress: &[AnpIngressRule],
    egress: &[AnpEgressRule],
) -> (Vec<CnpIngressRule>, Vec<CnpEgressRule>) {
    let i = ingress
        .iter()
        .map(|r| CnpIngressRule {
            name: r.name.clone(),
            action: action(r.action),
            from: r.from.clone(),
            protocols: r.ports.iter().map(port).collect(),
        })
        .collect();
    let e = egress
        .iter()
        .map(|r| CnpEgressRule {
            name: r.name.clone(),
            action: action(r.action),
            to: r.to.clone(),
            protocols: r.ports.iter().map(port).collect(),
        })
        .collect();
    (i, e)
}

impl AdminNetworkPolicySpec {
    /// The same policy as a ClusterNetworkPolicy in the Admin tier.
    pub fn to_cluster(&self) -> ClusterNetworkPolicySpec {
        let (ingress, egress) = rules(&self.ingress, &self.egress);
        ClusterNetworkPolicySpec {
            tier: CnpTier::Admin,
            priority: self.priority,
            subject: self.subject.clone(),
            ingress,
            egress,
        }
    }
}

impl BaselineAdminNetworkPolicySpec {
    /// The same policy as a ClusterNetworkPolicy in the Baseline tier (priority 0).
    pub fn to_cluster(&self) -> ClusterNetworkPolicySpec {
        let (ingress, egress) = rules(&self.ingress, &self.egress);
        ClusterNetworkPolicySpec {
            tier: CnpTier::Baseline,
            priority: 0,
            subject: self.subject.clone(),
            ingress,
            egress,
        }
    }
}

type Result<T = (), E = ResourceError> = std::result::Result<T, E>;

/// The `ports` of v1alpha1's rules, with their own field names (the rest is checked on the
/// mapped form, whose field names are the same).
fn ports(ingress: &[AnpIngressRule], egress: &[AnpEgressRule]) -> Result {
    let lists = ingress
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("spec.ingress[{i}].ports"), &r.ports))
        .chain(
            egress
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("spec.egress[{i}].ports"), &r.ports)),
        );
    for (f, list) in lists {
        for (j, p) in list.iter().enumerate() {
            let set = usize::from(p.port_number.is_some())
                + usize::from(p.named_port.is_some())
                + usize::from(p.port_range.is_some());
            if set != 1 {
                return Err(ResourceError::field(
                    format!("{f}[{j}]"),
                    "give exactly one of portNumber, namedPort and portRange",
                ));
            }
        }
    }
    Ok(())
}

/// Renames the mapped form's field names back to v1alpha1's in an error (see [`port`] for
/// the mapping: `portNumber.port` is `<proto>.destinationPort.number`, `portRange` is
/// `<proto>.destinationPort.range`, `namedPort` is `destinationNamedPort`).
fn v1alpha1_fields(mut e: ResourceError) -> ResourceError {
    e.field = e.field.replace(".protocols", ".ports");
    for proto in ["tcp", "udp", "sctp"] {
        e.field = e
            .field
            .replace(
                &format!(".{proto}.destinationPort.number"),
                ".portNumber.port",
            )
            .replace(&format!(".{proto}.destinationPort.range"), ".portRange");
    }
    e.field = e.field.replace(".destinationNamedPort", ".namedPort");
    e.reason = e.reason.replace(
        "Pass is only valid in the Admin tier",
        "Pass is only valid in AdminNetworkPolicy",
    );
    e
}

pub fn admin_network_policy(o: &Object<AdminNetworkPolicySpec>) -> Result {
    ports(&o.spec.ingress, &o.spec.egress)?;
    let mapped = Object {
        metadata: o.metadata.clone(),
        spec: o.spec.to_cluster(),
        status: None,
    };
    cnp::validate_with(&mapped, LIMITS).map_err(v1alpha1_fields)
}

pub fn baseline_admin_network_policy(o: &Object<BaselineAdminNetworkPolicySpec>) -> Result {
    if o.metadata.name != BANP_NAME {
        return Err(ResourceError::field(
            "metadata.name",
            format!(
                "{:?}: the BaselineAdminNetworkPolicy is a singleton named {BANP_NAME:?}",
                o.metadata.name
            ),
        ));
    }
    ports(&o.spec.ingress, &o.spec.egress)?;
    let mapped = Object {
        metadata: o.metadata.clone(),
        spec: o.spec.to_cluster(),
        status: None,
    };
    cnp::validate_with(&mapped, LIMITS).map_err(v1alpha1_fields)
}

#[cfg(test)]
mod tests;
