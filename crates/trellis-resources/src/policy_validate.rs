//! Semantic validation of the policy kinds (Calico's and Kubernetes'), the namespaces and
//! service accounts they select, and the endpoint fields policy reads. The serde layer already
//! refused unknown fields and wrong types; this checks what Calico's validator and the
//! Kubernetes API server check, naming the field. Pure.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::k8s::*;
use crate::policy::*;
use crate::selector::Selector;
use crate::{labels, Object, ResourceError, WorkloadEndpointSpec};

type Result<T = (), E = ResourceError> = std::result::Result<T, E>;

fn err(field: impl Into<String>, reason: impl Into<String>) -> ResourceError {
    ResourceError::field(field, reason)
}

/// Most rules in one policy direction (Calico's CRD limit).
pub const MAX_RULES: usize = 1024;
/// Most nets in one rule field (Calico's CRD limit) — and in a NetworkSet.
pub const MAX_NETS: usize = 256;
/// Most nets in a NetworkSet (Calico sets no limit; this bounds what one object costs).
pub const MAX_SET_NETS: usize = 10_000;
/// Most ports in one rule field (Calico's CRD limit).
pub const MAX_PORTS: usize = 50;

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63: a DNS label.
pub fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// DNS labels separated by dots, at most 253.
pub fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

fn name_with(field: &str, n: &str, ok: bool, what: &str) -> Result {
    if ok {
        Ok(())
    } else {
        Err(err(field, format!("{n:?} must be {what}")))
    }
}

/// Namespace names are DNS labels.
pub fn namespace_name(field: &str, n: &str) -> Result {
    name_with(
        field,
        n,
        dns_label(n),
        "a DNS label (1-63 lower-case letters, digits and '-', starting and ending with a letter or digit)",
    )
}

/// Policy names: a DNS label, or two joined by one dot (Calico's `tier.name` form, which
/// Calico no longer requires; the tier comes from `spec.tier`).
fn policy_name(n: &str) -> Result {
    let ok = n.len() <= 253 && {
        let parts: Vec<&str> = n.split('.').collect();
        parts.len() <= 2 && parts.iter().all(|p| dns_label(p))
    };
    name_with(
        "metadata.name",
        n,
        ok,
        "a DNS label, or two joined by a dot (lower-case letters, digits and '-')",
    )
}

/// Tier names are DNS labels (no dots: they appear inside other names).
pub fn tier_name(field: &str, n: &str) -> Result {
    name_with(
        field,
        n,
        dns_label(n),
        "a DNS label (1-63 lower-case letters, digits and '-'; no dots)",
    )
}

pub(crate) fn subdomain_name(n: &str) -> Result {
    name_with(
        "metadata.name",
        n,
        dns_subdomain(n),
        "a DNS subdomain (lower-case letters, digits, '-' and '.')",
    )
}

/// A namespaced object's namespace (defaulted before validation, so present).
fn namespace_of(meta: &crate::Metadata) -> Result {
    match &meta.namespace {
        Some(ns) => namespace_name("metadata.namespace", ns),
        None => Err(err("metadata.namespace", "is required")),
    }
}

/// Parses a selector; the error gives the position.
pub fn selector(field: &str, s: &str) -> Result<Selector> {
    Selector::parse(s).map_err(|e| err(field, format!("{s:?}: {e}")))
}

fn contains_global(s: &Selector) -> bool {
    let mut stack = vec![s];
    while let Some(s) = stack.pop() {
        match s {
            Selector::Global => return true,
            Selector::Not(x) => stack.push(x),
            Selector::And(xs) | Selector::Or(xs) => stack.extend(xs),
            _ => {}
        }
    }
    false
}

/// A selector that may not use `global()` (everything but a rule's namespaceSelector).
fn endpoint_selector(field: &str, s: &Option<String>) -> Result {
    if let Some(s) = s {
        if contains_global(&selector(field, s)?) {
            return Err(err(
                field,
                "global() can only be used in a rule's namespaceSelector",
            ));
        }
    }
    Ok(())
}

fn order(field: &str, o: Option<f64>) -> Result {
    match o {
        Some(o) if !o.is_finite() => Err(err(field, format!("{o} is not a finite number"))),
        _ => Ok(()),
    }
}

/// A net of a rule, NetworkSet or ipBlock: a CIDR or a bare address (its /32 or /128). Host
/// bits are cleared, as Calico does.
pub fn parse_net(s: &str) -> std::result::Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not a CIDR or an address"))
}

fn nets(field: &str, list: &[String], max: usize) -> Result<Vec<IpNet>> {
    if list.len() > max {
        return Err(err(
            field,
            format!("has {} entries; at most {max}", list.len()),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, n)| parse_net(n).map_err(|e| err(format!("{field}[{i}]"), e)))
        .collect()
}

fn types(field: &str, t: &[PolicyType]) -> Result {
    for (i, x) in t.iter().enumerate() {
        if t[..i].contains(x) {
            return Err(err(field, format!("{x:?} is given twice")));
        }
    }
    Ok(())
}

fn rules(field: &str, list: &[RuleSpec]) -> Result {
    if list.len() > MAX_RULES {
        return Err(err(
            field,
            format!("has {} rules; at most {MAX_RULES}", list.len()),
        ));
    }
    for (i, r) in list.iter().enumerate() {
        rule(&format!("{field}[{i}]"), r)?;
    }
    Ok(())
}

/// One rule, with Calico's consistency rules: ports need a protocol that has ports (named
/// ports may go without a protocol), `icmp`/`notICMP` need ICMP or ICMPv6 (so a rule cannot
/// have both ports and ICMP), ICMP goes with IPv4 and ICMPv6 with IPv6, nets of one family.
pub fn rule(f: &str, r: &RuleSpec) -> Result {
    if r.http.is_some() {
        return Err(err(
            format!("{f}.http"),
            "HTTP matches need an L7 proxy, which Trellis does not run",
        ));
    }
    if let Some(v) = r.ip_version {
        if v != 4 && v != 6 {
            return Err(err(format!("{f}.ipVersion"), format!("{v} is not 4 or 6")));
        }
    }
    let has_ports = |e: &EntityRule| !e.ports.is_empty() || !e.not_ports.is_empty();
    if (r.icmp.is_some() || r.not_icmp.is_some())
        && (has_ports(&r.source) || has_ports(&r.destination))
    {
        let which = if r.icmp.is_some() { "icmp" } else { "notICMP" };
        return Err(err(
            format!("{f}.{which}"),
            "a rule cannot match both ports and ICMP (ports need TCP, UDP, SCTP or UDPLite; ICMP has no ports)",
        ));
    }
    for (name, icmp) in [("icmp", &r.icmp), ("notICMP", &r.not_icmp)] {
        let Some(icmp) = icmp else { continue };
        if !r.protocol.is_some_and(RuleProtocol::is_icmp) {
            return Err(err(format!("{f}.{name}"), "needs protocol ICMP or ICMPv6"));
        }
        if icmp.icmp_type == Some(255) {
            return Err(err(
                format!("{f}.{name}.type"),
                "255 is not an ICMP type (0-254)",
            ));
        }
        if icmp.code.is_some() && icmp.icmp_type.is_none() {
            return Err(err(format!("{f}.{name}.code"), "needs a type"));
        }
    }
    for (name, p) in [("protocol", r.protocol), ("notProtocol", r.not_protocol)] {
        let want = match p.map(RuleProtocol::number) {
            Some(1) => 4,
            Some(58) => 6,
            _ => continue,
        };
        if r.ip_version.is_some_and(|v| v != want) {
            return Err(err(
                format!("{f}.{name}"),
                format!("{} goes with ipVersion {want}", p.expect("set")),
            ));
        }
    }
    let mut families: Option<(bool, String)> = None;
    for (side, e) in [("source", &r.source), ("destination", &r.destination)] {
        entity(&format!("{f}.{side}"), e, r.protocol)?;
        for (name, list) in [("nets", &e.nets), ("notNets", &e.not_nets)] {
            let field = format!("{f}.{side}.{name}");
            for n in nets(&field, list, MAX_NETS)? {
                let v4 = n.addr().is_ipv4();
                if r.ip_version.is_some_and(|v| (v == 4) != v4) {
                    return Err(err(
                        &field,
                        format!("{n} is not of ipVersion {}", r.ip_version.expect("set")),
                    ));
                }
                if name == "notNets" && n.prefix_len() == 0 {
                    return Err(err(&field, format!("{n} in a negation matches no traffic")));
                }
                match &families {
                    Some((fam, first)) if *fam != v4 => {
                        return Err(err(
                            &field,
                            format!("{n} and {first}: a rule's nets must all be IPv4 or all IPv6"),
                        ))
                    }
                    Some(_) => {}
                    None => families = Some((v4, n.to_string())),
                }
            }
        }
    }
    Ok(())
}

fn entity(f: &str, e: &EntityRule, protocol: Option<RuleProtocol>) -> Result {
    if e.services.is_some() {
        return Err(err(
            format!("{f}.services"),
            "Kubernetes Service matches are not supported; select the Service's pods instead",
        ));
    }
    endpoint_selector(&format!("{f}.selector"), &e.selector)?;
    endpoint_selector(&format!("{f}.notSelector"), &e.not_selector)?;
    if let Some(ns) = &e.namespace_selector {
        let field = format!("{f}.namespaceSelector");
        let s = selector(&field, ns)?;
        if s != Selector::Global && contains_global(&s) {
            return Err(err(field, "global() must be the whole namespaceSelector"));
        }
    }
    if let Some(sa) = &e.service_accounts {
        for (i, n) in sa.names.iter().enumerate() {
            subdomain_name(n)
                .map_err(|x| err(format!("{f}.serviceAccounts.names[{i}]"), x.reason))?;
        }
        endpoint_selector(&format!("{f}.serviceAccounts.selector"), &sa.selector)?;
    }
    for (name, ports) in [("ports", &e.ports), ("notPorts", &e.not_ports)] {
        let field = format!("{f}.{name}");
        if ports.len() > MAX_PORTS {
            return Err(err(
                field,
                format!("has {} ports; at most {MAX_PORTS}", ports.len()),
            ));
        }
        if ports.is_empty() {
            continue;
        }
        match protocol {
            Some(p) if !p.has_ports() => {
                return Err(err(field, format!("protocol {p} has no ports (ports need TCP, UDP, SCTP or UDPLite)")))
            }
            None if !ports.iter().all(PortSpec::is_named) => {
                return Err(err(field, "port numbers need a protocol (TCP, UDP, SCTP or UDPLite); only named ports may go without"))
            }
            _ => {}
        }
    }
    Ok(())
}

pub fn network_policy(o: &Object<NetworkPolicySpec>) -> Result {
    policy_name(&o.metadata.name)?;
    namespace_of(&o.metadata)?;
    labels::check("metadata.labels", &o.metadata.labels)?;
    let s = &o.spec;
    tier_name("spec.tier", s.tier_name())?;
    not_reserved_tier(s.tier_name())?;
    order("spec.order", s.order)?;
    endpoint_selector("spec.selector", &s.selector)?;
    endpoint_selector("spec.serviceAccountSelector", &s.service_account_selector)?;
    types("spec.types", &s.types)?;
    hints(&s.performance_hints)?;
    rules("spec.ingress", &s.ingress)?;
    rules("spec.egress", &s.egress)
}

pub fn global_network_policy(o: &Object<GlobalNetworkPolicySpec>) -> Result {
    policy_name(&o.metadata.name)?;
    labels::check("metadata.labels", &o.metadata.labels)?;
    let s = &o.spec;
    tier_name("spec.tier", s.tier_name())?;
    not_reserved_tier(s.tier_name())?;
    order("spec.order", s.order)?;
    endpoint_selector("spec.selector", &s.selector)?;
    endpoint_selector("spec.namespaceSelector", &s.namespace_selector)?;
    endpoint_selector("spec.serviceAccountSelector", &s.service_account_selector)?;
    types("spec.types", &s.types)?;
    hints(&s.performance_hints)?;
    for (field, v) in [
        ("spec.doNotTrack", s.do_not_track),
        ("spec.preDNAT", s.pre_dnat),
    ] {
        if v == Some(true) {
            return Err(err(field, "Trellis polices forwarded pod traffic only; host-endpoint policy (doNotTrack, preDNAT) is not supported"));
        }
    }
    rules("spec.ingress", &s.ingress)?;
    rules("spec.egress", &s.egress)
}

fn hints(h: &[String]) -> Result {
    for (i, x) in h.iter().enumerate() {
        if x != "AssumeNeededOnEveryNode" {
            return Err(err(
                format!("spec.performanceHints[{i}]"),
                format!("{x:?} is not AssumeNeededOnEveryNode"),
            ));
        }
    }
    Ok(())
}

/// Tier names taken by ClusterNetworkPolicy's built-in tiers (evaluated before and after every
/// Tier; see trellis-policy's model).
pub const RESERVED_TIERS: [&str; 2] = ["admin", "baseline"];

/// A Calico policy cannot join a ClusterNetworkPolicy tier.
fn not_reserved_tier(t: &str) -> Result {
    if RESERVED_TIERS.contains(&t) {
        return Err(err(
            "spec.tier",
            format!("{t:?} is the built-in tier of ClusterNetworkPolicies"),
        ));
    }
    Ok(())
}

pub fn tier(o: &Object<TierSpec>) -> Result {
    tier_name("metadata.name", &o.metadata.name)?;
    if RESERVED_TIERS.contains(&o.metadata.name.as_str()) {
        return Err(err(
            "metadata.name",
            format!(
                "{:?} is the built-in tier of ClusterNetworkPolicies (tier: {}); choose another name",
                o.metadata.name,
                if o.metadata.name == "admin" { "Admin" } else { "Baseline" }
            ),
        ));
    }
    labels::check("metadata.labels", &o.metadata.labels)?;
    order("spec.order", o.spec.order)?;
    if o.metadata.name == DEFAULT_TIER {
        if o.spec.order != Some(DEFAULT_TIER_ORDER) {
            return Err(err(
                "spec.order",
                format!("the default tier's order is {DEFAULT_TIER_ORDER}"),
            ));
        }
        if o.spec.default_action != Some(TierAction::Deny) {
            return Err(err(
                "spec.defaultAction",
                "the default tier's default action is Deny",
            ));
        }
    }
    Ok(())
}

fn set_labels(meta: &crate::Metadata) -> Result {
    labels::check("metadata.labels", &meta.labels)?;
    if meta.labels.contains_key(crate::LABEL_NAMESPACE) {
        return Err(err(
            "metadata.labels",
            format!(
                "{} is set by the system, not in the object",
                crate::LABEL_NAMESPACE
            ),
        ));
    }
    Ok(())
}

pub fn network_set(o: &Object<NetworkSetSpec>) -> Result {
    subdomain_name(&o.metadata.name)?;
    namespace_of(&o.metadata)?;
    set_labels(&o.metadata)?;
    nets("spec.nets", &o.spec.nets, MAX_SET_NETS).map(drop)
}

pub fn global_network_set(o: &Object<NetworkSetSpec>) -> Result {
    subdomain_name(&o.metadata.name)?;
    set_labels(&o.metadata)?;
    nets("spec.nets", &o.spec.nets, MAX_SET_NETS).map(drop)
}

pub fn profile(o: &Object<ProfileSpec>) -> Result {
    subdomain_name(&o.metadata.name)?;
    labels::check("metadata.labels", &o.metadata.labels)?;
    labels::check("spec.labelsToApply", &o.spec.labels_to_apply)?;
    rules("spec.ingress", &o.spec.ingress)?;
    rules("spec.egress", &o.spec.egress)
}

pub fn namespace(o: &Object<NamespaceSpec>) -> Result {
    namespace_name("metadata.name", &o.metadata.name)?;
    if o.metadata.namespace.is_some() {
        return Err(err("metadata.namespace", "a Namespace is not namespaced"));
    }
    labels::check("metadata.labels", &o.metadata.labels)
}

pub fn service_account(o: &Object<ServiceAccountSpec>) -> Result {
    subdomain_name(&o.metadata.name)?;
    namespace_of(&o.metadata)?;
    labels::check("metadata.labels", &o.metadata.labels)
}

/// The fields of a WorkloadEndpoint that policy reads.
pub fn endpoint_policy_fields(o: &Object<WorkloadEndpointSpec>) -> Result {
    labels::check("metadata.labels", &o.metadata.labels)?;
    if let Some(sa) = &o.spec.service_account_name {
        subdomain_name(sa).map_err(|e| err("spec.serviceAccountName", e.reason))?;
    }
    for (i, p) in o.spec.ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        PortSpec::parse(&p.name)
            .ok()
            .filter(PortSpec::is_named)
            .ok_or_else(|| {
                err(
                    format!("{f}.name"),
                    format!("{:?} is not a port name", p.name),
                )
            })?;
        if p.port == 0 {
            return Err(err(format!("{f}.port"), "0 is not a port"));
        }
        if !p.protocol.has_ports() {
            return Err(err(
                format!("{f}.protocol"),
                format!("{} has no ports", p.protocol),
            ));
        }
        if o.spec.ports[..i]
            .iter()
            .any(|q| q.name == p.name && q.protocol == p.protocol)
        {
            return Err(err(
                format!("{f}.name"),
                format!("{} {} is declared twice", p.protocol, p.name),
            ));
        }
    }
    for (i, p) in o.spec.profiles.iter().enumerate() {
        subdomain_name(p).map_err(|e| err(format!("spec.profiles[{i}]"), e.reason))?;
    }
    Ok(())
}

pub(crate) fn label_selector(f: &str, s: &LabelSelector) -> Result {
    labels::check(&format!("{f}.matchLabels"), &s.match_labels)?;
    for (i, r) in s.match_expressions.iter().enumerate() {
        let f = format!("{f}.matchExpressions[{i}]");
        labels::key(&r.key).map_err(|e| err(format!("{f}.key"), e))?;
        match r.operator {
            SelectorOperator::In | SelectorOperator::NotIn if r.values.is_empty() => {
                return Err(err(
                    format!("{f}.values"),
                    "must be non-empty for In and NotIn",
                ))
            }
            SelectorOperator::Exists | SelectorOperator::DoesNotExist if !r.values.is_empty() => {
                return Err(err(
                    format!("{f}.values"),
                    "must be empty for Exists and DoesNotExist",
                ))
            }
            _ => {}
        }
        for (j, v) in r.values.iter().enumerate() {
            labels::value(v).map_err(|e| err(format!("{f}.values[{j}]"), e))?;
        }
    }
    Ok(())
}

fn peer(f: &str, p: &NetworkPolicyPeer) -> Result {
    let selects = p.pod_selector.is_some() || p.namespace_selector.is_some();
    match (&p.ip_block, selects) {
        (Some(_), true) => {
            return Err(err(
                f,
                "give ipBlock or podSelector/namespaceSelector, not both",
            ))
        }
        (None, false) => {
            return Err(err(
                f,
                "must give podSelector, namespaceSelector or ipBlock",
            ))
        }
        (Some(b), false) => {
            let cidr: IpNet = b.cidr.parse().map_err(|_| {
                err(
                    format!("{f}.ipBlock.cidr"),
                    format!("{:?} is not a CIDR", b.cidr),
                )
            })?;
            for (i, x) in b.except.iter().enumerate() {
                let fx = format!("{f}.ipBlock.except[{i}]");
                let e: IpNet = x
                    .parse()
                    .map_err(|_| err(&fx, format!("{x:?} is not a CIDR")))?;
                let strict =
                    cidr.trunc().contains(&e.trunc()) && e.prefix_len() > cidr.prefix_len();
                if !strict {
                    return Err(err(
                        fx,
                        format!("{x} must be a strict subset of cidr {}", b.cidr),
                    ));
                }
            }
        }
        (None, true) => {}
    }
    if let Some(s) = &p.pod_selector {
        label_selector(&format!("{f}.podSelector"), s)?;
    }
    if let Some(s) = &p.namespace_selector {
        label_selector(&format!("{f}.namespaceSelector"), s)?;
    }
    Ok(())
}

fn kube_port(f: &str, p: &NetworkPolicyPort) -> Result {
    match &p.port {
        Some(IntOrString::Int(n)) if !(1..=65535).contains(n) => {
            return Err(err(
                format!("{f}.port"),
                format!("{n} is not a port number (1-65535)"),
            ))
        }
        Some(IntOrString::String(s)) => {
            valid_port_name(s).map_err(|e| err(format!("{f}.port"), e))?;
        }
        _ => {}
    }
    if let Some(end) = p.end_port {
        match &p.port {
            Some(IntOrString::Int(start)) if end >= *start && end <= 65535 => {}
            Some(IntOrString::Int(start)) => {
                return Err(err(
                    format!("{f}.endPort"),
                    format!("{end} must be between port {start} and 65535"),
                ))
            }
            Some(IntOrString::String(_)) => {
                return Err(err(format!("{f}.endPort"), "may not go with a named port"))
            }
            None => return Err(err(format!("{f}.endPort"), "needs a port")),
        }
    }
    Ok(())
}

pub fn kubernetes_network_policy(o: &Object<KubernetesNetworkPolicySpec>) -> Result {
    subdomain_name(&o.metadata.name)?;
    namespace_of(&o.metadata)?;
    labels::check("metadata.labels", &o.metadata.labels)?;
    let s = &o.spec;
    label_selector("spec.podSelector", &s.pod_selector)?;
    types("spec.policyTypes", &s.policy_types)?;
    let dirs = s
        .ingress
        .iter()
        .map(|r| ("ingress", "from", &r.from, &r.ports))
        .chain(s.egress.iter().map(|r| ("egress", "to", &r.to, &r.ports)));
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (dir, peers_name, peers, ports) in dirs {
        let i = index.entry(dir).or_default();
        let f = format!("spec.{dir}[{i}]");
        *i += 1;
        for (j, p) in peers.iter().enumerate() {
            peer(&format!("{f}.{peers_name}[{j}]"), p)?;
        }
        for (j, p) in ports.iter().enumerate() {
            kube_port(&format!("{f}.ports[{j}]"), p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
