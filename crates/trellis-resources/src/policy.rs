//! Calico's policy kinds (`projectcalico.org/v3`, also accepted as `trellis.dev/v1`):
//! NetworkPolicy, GlobalNetworkPolicy, Tier, NetworkSet, GlobalNetworkSet, Profile, and the rule
//! types they share. Field names and defaults are Calico's (libcalico-go's `api/pkg/apis/
//! projectcalico/v3`), so an operator's YAML applies unchanged. Pure data plus the defaulting
//! Calico's API server does; the semantic checks are in [`crate::policy_validate`].

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The tier every policy without a `tier` belongs to; it exists without a Tier object.
pub const DEFAULT_TIER: &str = "default";
/// The order of the `default` tier (Calico's `DefaultTierOrder`).
pub const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RuleAction {
    Allow,
    Deny,
    Pass,
    Log,
}

/// What a tier does with traffic that a policy in it selected but no rule decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TierAction {
    #[default]
    Deny,
    Pass,
}

/// A policy's direction (`types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

/// A rule's protocol: one of Calico's names (`TCP`, `UDP`, `ICMP`, `ICMPv6`, `SCTP`,
/// `UDPLite`, any case) or a number 1-255. Written back as the canonical name or the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleProtocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Sctp,
    UdpLite,
    Number(u8),
}

impl RuleProtocol {
    const NAMES: [(&'static str, RuleProtocol); 6] = [
        ("TCP", RuleProtocol::Tcp),
        ("UDP", RuleProtocol::Udp),
        ("ICMP", RuleProtocol::Icmp),
        ("ICMPv6", RuleProtocol::Icmpv6),
        ("SCTP", RuleProtocol::Sctp),
        ("UDPLite", RuleProtocol::UdpLite),
    ];

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            RuleProtocol::Icmp => 1,
            RuleProtocol::Tcp => 6,
            RuleProtocol::Udp => 17,
            RuleProtocol::Icmpv6 => 58,
            RuleProtocol::Sctp => 132,
            RuleProtocol::UdpLite => 136,
            RuleProtocol::Number(n) => n,
        }
    }

    /// Whether the protocol has ports (TCP, UDP, SCTP, UDPLite).
    pub fn has_ports(self) -> bool {
        matches!(self.number(), 6 | 17 | 132 | 136)
    }

    /// ICMP or ICMPv6 (what `icmp`/`notICMP` need).
    pub fn is_icmp(self) -> bool {
        matches!(self.number(), 1 | 58)
    }

    /// Parses a name (any case) or a number 1-255.
    pub fn parse(s: &str) -> Option<RuleProtocol> {
        if let Some((_, p)) = Self::NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(s)) {
            return Some(*p);
        }
        s.parse::<u8>()
            .ok()
            .filter(|n| *n > 0)
            .map(RuleProtocol::Number)
    }
}

impl fmt::Display for RuleProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleProtocol::Number(n) => write!(f, "{n}"),
            p => {
                let name = Self::NAMES
                    .iter()
                    .find(|(_, q)| q == p)
                    .map(|(n, _)| *n)
                    .expect("named");
                f.write_str(name)
            }
        }
    }
}

impl Serialize for RuleProtocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RuleProtocol::Number(n) => s.serialize_u8(*n),
            p => s.serialize_str(&p.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for RuleProtocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RuleProtocol;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or a protocol number 1-255")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RuleProtocol, E> {
                match u8::try_from(v) {
                    Ok(n) if n > 0 => Ok(RuleProtocol::Number(n)),
                    _ => Err(E::custom(format!("{v} is not a protocol number (1-255)"))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RuleProtocol, E> {
                Err(E::custom(format!("{v} is not a protocol number (1-255)")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RuleProtocol, E> {
                Self::Value::NAMES
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(v))
                    .map(|(_, p)| *p)
                    .ok_or_else(|| E::custom(format!("{v:?} is not TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or a protocol number")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Longest named port (Calico's `numorstring` limit).
pub const MAX_PORT_NAME: usize = 128;

/// A port match in a rule: a number, a range `a:b`, or a named port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortSpec {
    Range { first: u16, last: u16 },
    Named(String),
}

impl PortSpec {
    /// Parses `80`, `80:90` or a name (letters, digits, `_`, `.`, `-`, at most 128).
    pub fn parse(s: &str) -> Result<PortSpec, String> {
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        let num = |t: &str| {
            t.parse::<u16>()
                .map_err(|_| format!("{t:?} is not a port number (0-65535)"))
        };
        if digits(s) {
            let p = num(s)?;
            return Ok(PortSpec::Range { first: p, last: p });
        }
        if let Some((a, b)) = s.split_once(':') {
            if digits(a) && digits(b) {
                let (first, last) = (num(a)?, num(b)?);
                if first > last {
                    return Err(format!(
                        "{s:?}: the range starts after it ends ({first} > {last})"
                    ));
                }
                return Ok(PortSpec::Range { first, last });
            }
        }
        let ok = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
        if s.is_empty() || s.len() > MAX_PORT_NAME || !s.chars().all(ok) {
            return Err(format!(
                "{s:?} is not a port, a range a:b or a port name (letters, digits, '_', '.', '-', at most {MAX_PORT_NAME})"
            ));
        }
        Ok(PortSpec::Named(s.to_string()))
    }

    pub fn is_named(&self) -> bool {
        matches!(self, PortSpec::Named(_))
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Range { first, last } if first == last => write!(f, "{first}"),
            PortSpec::Range { first, last } => write!(f, "{first}:{last}"),
            PortSpec::Named(n) => f.write_str(n),
        }
    }
}

impl Serialize for PortSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PortSpec::Range { first, last } if first == last => s.serialize_u16(*first),
            p => s.serialize_str(&p.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number, a range \"a:b\" or a port name")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortSpec, E> {
                let p = u16::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not a port number (0-65535)")))?;
                Ok(PortSpec::Range { first: p, last: p })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortSpec, E> {
                Err(E::custom(format!("{v} is not a port number (0-65535)")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortSpec, E> {
                PortSpec::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// ICMP type and code (`icmp`, `notICMP`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpFields {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
}

/// Service accounts a rule matches: names and/or a selector over the accounts' labels (AND).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountMatchSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// The source or destination half of a rule (Calico's `EntityRule`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_nets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<PortSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<ServiceAccountMatchSpec>,
    /// Calico's Kubernetes Service match: accepted by the parser only to be refused with a
    /// message (Trellis has no Service view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<serde_json::Value>,
}

impl EntityRule {
    pub fn is_empty(&self) -> bool {
        *self == EntityRule::default()
    }
}

/// Free-form rule metadata (kept, not interpreted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A rule of a policy or profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    pub action: RuleAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<RuleProtocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_protocol: Option<RuleProtocol>,
    #[serde(default, rename = "icmp", skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpFields>,
    #[serde(default, rename = "notICMP", skip_serializing_if = "Option::is_none")]
    pub not_icmp: Option<IcmpFields>,
    #[serde(default, skip_serializing_if = "EntityRule::is_empty")]
    pub source: EntityRule,
    #[serde(default, skip_serializing_if = "EntityRule::is_empty")]
    pub destination: EntityRule,
    /// Calico's HTTP match (needs an L7 proxy): parsed only to be refused with a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<RuleMetadata>,
}

/// `projectcalico.org/v3` NetworkPolicy (namespaced).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    /// Defaults to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<String>,
    /// Defaulted from the rules present when omitted (Calico's rule).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<PolicyType>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<RuleSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<RuleSpec>,
    /// Hints to Calico's engine; never change behaviour (kept, not used).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub performance_hints: Vec<String>,
}

/// GlobalNetworkPolicy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlobalNetworkPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Only endpoints in namespaces whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<PolicyType>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<RuleSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<RuleSpec>,
    /// Host-endpoint options: Trellis polices forwarded pod traffic only, so `doNotTrack` and
    /// `preDNAT` are refused and `applyOnForward` is what it always does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_not_track: Option<bool>,
    #[serde(default, rename = "preDNAT", skip_serializing_if = "Option::is_none")]
    pub pre_dnat: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_on_forward: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub performance_hints: Vec<String>,
}

/// Calico's defaulting of `types` when omitted: Ingress unless the policy has only egress
/// rules; Egress when it has egress rules.
pub fn default_types(ingress: &[RuleSpec], egress: &[RuleSpec]) -> Vec<PolicyType> {
    match (ingress.is_empty(), egress.is_empty()) {
        (_, true) => vec![PolicyType::Ingress],
        (true, false) => vec![PolicyType::Egress],
        (false, false) => vec![PolicyType::Ingress, PolicyType::Egress],
    }
}

impl NetworkPolicySpec {
    /// What Calico's API server stores: `tier` and `types` filled in.
    pub fn apply_defaults(&mut self) {
        self.tier.get_or_insert_with(|| DEFAULT_TIER.into());
        if self.types.is_empty() {
            self.types = default_types(&self.ingress, &self.egress);
        }
    }

    pub fn tier_name(&self) -> &str {
        self.tier.as_deref().unwrap_or(DEFAULT_TIER)
    }
}

impl GlobalNetworkPolicySpec {
    pub fn apply_defaults(&mut self) {
        self.tier.get_or_insert_with(|| DEFAULT_TIER.into());
        if self.types.is_empty() {
            self.types = default_types(&self.ingress, &self.egress);
        }
    }

    pub fn tier_name(&self) -> &str {
        self.tier.as_deref().unwrap_or(DEFAULT_TIER)
    }
}

/// A Tier: policies are grouped in tiers, evaluated in tier order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    /// Defaults to Deny.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<TierAction>,
}

impl TierSpec {
    pub fn apply_defaults(&mut self, name: &str) {
        self.default_action.get_or_insert(TierAction::Deny);
        if name == DEFAULT_TIER {
            self.order.get_or_insert(DEFAULT_TIER_ORDER);
        }
    }
}

/// NetworkSet (namespaced) and GlobalNetworkSet: networks that selectors match by the set's
/// labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSetSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,
}

/// Profile: rules applied after the tiers to the endpoints that list it, and labels it gives
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfileSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<RuleSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<RuleSpec>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels_to_apply: BTreeMap<String, String>,
}

// Orders are finite (validation refuses NaN and infinities), so equality is an equivalence.
impl Eq for NetworkPolicySpec {}
impl Eq for GlobalNetworkPolicySpec {}
impl Eq for TierSpec {}
