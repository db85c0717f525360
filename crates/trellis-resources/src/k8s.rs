//! Kubernetes kinds Trellis stores: `networking.k8s.io/v1` NetworkPolicy (unchanged from
//! upstream, with the API server's defaulting), and `v1` Namespace and ServiceAccount (their
//! labels, which selectors match). Pure data, the defaulting, and the conversion of Kubernetes
//! label selectors into Calico's selector AST.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::selector::Selector;

/// `networking.k8s.io/v1`.
pub const NETWORKING_API_VERSION: &str = "networking.k8s.io/v1";
/// The core group's `v1`.
pub const CORE_API_VERSION: &str = "v1";

/// A Kubernetes label selector (`matchLabels` AND `matchExpressions`; empty selects all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// The same set as a Calico selector: `matchLabels` become `==`, `In`/`NotIn` `in`/`not in`
    /// (`not in` is also true when the label is absent, as in Kubernetes), `Exists` `has()`,
    /// `DoesNotExist` `!has()`; all ANDed; empty is `all()`.
    pub fn to_selector(&self) -> Selector {
        let mut terms: Vec<Selector> = self
            .match_labels
            .iter()
            .map(|(k, v)| Selector::Eq(k.clone(), v.clone()))
            .collect();
        for r in &self.match_expressions {
            terms.push(match r.operator {
                SelectorOperator::In => Selector::In(r.key.clone(), r.values.clone()),
                SelectorOperator::NotIn => Selector::NotIn(r.key.clone(), r.values.clone()),
                SelectorOperator::Exists => Selector::Has(r.key.clone()),
                SelectorOperator::DoesNotExist => {
                    Selector::Not(Box::new(Selector::Has(r.key.clone())))
                }
            });
        }
        match terms.len() {
            0 => Selector::All,
            1 => terms.pop().expect("one"),
            _ => Selector::And(terms),
        }
    }
}

/// A port protocol of a Kubernetes NetworkPolicy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KubeProtocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

/// `port`: a number or a named port (Kubernetes' IntOrString).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(i) => write!(f, "{i}"),
            IntOrString::String(s) => f.write_str(s),
        }
    }
}

impl Serialize for IntOrString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrString::Int(i) => s.serialize_i64(*i),
            IntOrString::String(v) => s.serialize_str(v),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom(format!("{v} is not a port number")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyPort {
    /// Defaulted to TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<KubeProtocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// One peer: pods (podSelector, in the policy's namespace unless namespaceSelector is given),
/// namespaces (namespaceSelector), both (AND), or addresses (ipBlock).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyIngressRule {
    /// Empty: every source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<NetworkPolicyPeer>,
    /// Empty: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NetworkPolicyPort>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyEgressRule {
    /// Empty: every destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<NetworkPolicyPeer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NetworkPolicyPort>,
}

/// `networking.k8s.io/v1` NetworkPolicy's spec, as upstream defines it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesNetworkPolicySpec {
    /// Required by Kubernetes; `{}` selects every pod of the namespace.
    pub pod_selector: LabelSelector,
    /// Defaulted when omitted (see [`KubernetesNetworkPolicySpec::apply_defaults`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_types: Vec<crate::policy::PolicyType>,
    /// `None` and `[]` differ only in YAML; both mean no ingress rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<NetworkPolicyIngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<NetworkPolicyEgressRule>,
}

impl KubernetesNetworkPolicySpec {
    /// What the API server stores (`SetDefaults_NetworkPolicy`): `policyTypes` when omitted is
    /// Ingress, plus Egress when there are egress rules; a port's protocol defaults to TCP.
    pub fn apply_defaults(&mut self) {
        use crate::policy::PolicyType;
        if self.policy_types.is_empty() {
            self.policy_types.push(PolicyType::Ingress);
            if !self.egress.is_empty() {
                self.policy_types.push(PolicyType::Egress);
            }
        }
        let ports = self
            .ingress
            .iter_mut()
            .flat_map(|r| r.ports.iter_mut())
            .chain(self.egress.iter_mut().flat_map(|r| r.ports.iter_mut()));
        for p in ports {
            p.protocol.get_or_insert(KubeProtocol::Tcp);
        }
    }
}

/// A Namespace carries only labels Trellis uses; `spec` (finalizers) is kept as given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
}

/// A ServiceAccount has no spec in Kubernetes; Trellis stores an empty one (its labels are in
/// `metadata`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountSpec {}

/// Kubernetes' port names (`IsValidPortName`, IANA service names): 1-15 lower-case letters,
/// digits and '-', at least one letter, no '-' at either end or twice in a row.
pub fn valid_port_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is not a port name (1-15 lower-case letters, digits and '-', with a letter, no '-' at either end or twice in a row)"))
    }
}
