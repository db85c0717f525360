//! Semantic validation of each kind (the serde layer already rejected unknown fields and
//! wrong types). Pure.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::kinds::*;
use crate::policy_validate as pv;
use crate::selector::Selector;
use crate::{Object, Resource, ResourceError};

fn err(field: &str, reason: impl Into<String>) -> ResourceError {
    ResourceError::field(field, reason)
}

/// Names: 1–253 characters of letters, digits, `.`, `_`, `-`, starting with a letter or digit;
/// lower case for the kinds Kubernetes names must be (DNS subdomains).
pub(crate) fn name(n: &str, lowercase: bool) -> Result<(), ResourceError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || ".-_".contains(c);
    if n.is_empty() || n.len() > 253 {
        return Err(err(
            "metadata.name",
            format!("{n:?} must be 1 to 253 characters"),
        ));
    }
    if !n.starts_with(|c: char| c.is_ascii_alphanumeric()) || !n.chars().all(ok_char) {
        return Err(err("metadata.name", format!("{n:?} may hold only letters, digits, '.', '_' and '-', starting with a letter or digit")));
    }
    if lowercase && (n.chars().any(|c| c.is_ascii_uppercase() || c == '_')) {
        return Err(err(
            "metadata.name",
            format!("{n:?} must be lower case (a DNS subdomain)"),
        ));
    }
    Ok(())
}

fn cidr(field: &str, c: &IpNet) -> Result<(), ResourceError> {
    if c.network() != c.addr() {
        return Err(err(
            field,
            format!("{c} has host bits set; the network is {}", c.trunc()),
        ));
    }
    Ok(())
}

/// Prefix lengths a block may have: a pool's `blockSize` range (20-32, 116-128; Calico's).
pub fn block_prefix_range(v4: bool) -> std::ops::RangeInclusive<u8> {
    if v4 {
        20..=32
    } else {
        116..=128
    }
}

/// A pool's CIDR: masked, and clear of addresses no pod may hold
/// ([`crate::addr::forbidden_reason`]: special ranges and, as Calico refuses, link-local ones —
/// 169.254.1.1 is the pods' gateway in routed mode).
fn pool_cidr(c: &IpNet) -> Result<(), ResourceError> {
    cidr("spec.cidr", c)?;
    if let Some(why) = crate::addr::forbidden_reason(c) {
        return Err(err(
            "spec.cidr",
            format!("{c} overlaps {why} addresses, which no pod may hold"),
        ));
    }
    Ok(())
}

/// A block's CIDR: what a pool could have carved, masked, of a block size a pool may have.
fn block_cidr(c: &IpNet) -> Result<(), ResourceError> {
    let range = block_prefix_range(c.addr().is_ipv4());
    if !range.contains(&c.prefix_len()) {
        return Err(err(
            "spec.cidr",
            format!(
                "{c}: a block's prefix length is a pool's blockSize, {}-{}",
                range.start(),
                range.end()
            ),
        ));
    }
    pool_cidr(c)
}

pub(crate) fn resource(r: &Resource) -> Result<(), ResourceError> {
    match r {
        Resource::IpPool(o) => ip_pool(o),
        Resource::Node(o) => node(o),
        Resource::IpamBlock(o) => {
            name(&o.metadata.name, false)?;
            block_cidr(&o.spec.cidr)?;
            let size = block_size(&o.spec.cidr);
            if o.spec.allocations.len() as u128 != size {
                return Err(err(
                    "spec.allocations",
                    format!(
                        "has {} entries; block {} has {size} addresses",
                        o.spec.allocations.len(),
                        o.spec.cidr
                    ),
                ));
            }
            if let Some(bad) = o
                .spec
                .allocations
                .iter()
                .flatten()
                .find(|i| **i >= o.spec.attributes.len())
            {
                return Err(err(
                    "spec.allocations",
                    format!(
                        "refers to attribute {bad}, but there are {}",
                        o.spec.attributes.len()
                    ),
                ));
            }
            Ok(())
        }
        Resource::IpamHandle(o) => {
            name(&o.metadata.name, false)?;
            if o.spec.handle_id.is_empty() {
                return Err(err("spec.handleID", "must not be empty"));
            }
            Ok(())
        }
        Resource::BlockAffinity(o) => {
            name(&o.metadata.name, false)?;
            block_cidr(&o.spec.cidr)?;
            name(&o.spec.node, false).map_err(|e| err("spec.node", e.reason))
        }
        Resource::IpReservation(o) => {
            name(&o.metadata.name, true)?;
            for (i, c) in o.spec.reserved_cidrs.iter().enumerate() {
                parse_cidr_or_ip(c).map_err(|e| err(&format!("spec.reservedCIDRs[{i}]"), e))?;
            }
            Ok(())
        }
        Resource::IpamConfiguration(o) => {
            if o.metadata.name != "default" {
                return Err(err(
                    "metadata.name",
                    format!(
                        "{:?}: the IPAM configuration is a singleton named \"default\"",
                        o.metadata.name
                    ),
                ));
            }
            Ok(())
        }
        Resource::WorkloadEndpoint(o) => {
            name(&o.metadata.name, false)?;
            match &o.metadata.namespace {
                Some(ns) => name(ns, true).map_err(|e| err("metadata.namespace", e.reason))?,
                None => {
                    return Err(err(
                        "metadata.namespace",
                        "is required for WorkloadEndpoint",
                    ))
                }
            }
            name(&o.spec.node, false).map_err(|e| err("spec.node", e.reason))?;
            ip_nats(&o.spec)?;
            crate::policy_validate::endpoint_policy_fields(o)
        }
        Resource::BgpConfiguration(o) => bgp_configuration(o),
        Resource::BgpPeer(o) => bgp_peer(o),
        Resource::BgpFilter(o) => bgp_filter(o),
        Resource::BgpStatus(o) => name(&o.metadata.name, false),
        Resource::KubernetesNetworkPolicy(o) => pv::kubernetes_network_policy(o),
        Resource::NetworkPolicy(o) => pv::network_policy(o),
        Resource::GlobalNetworkPolicy(o) => pv::global_network_policy(o),
        Resource::Tier(o) => pv::tier(o),
        Resource::NetworkSet(o) => pv::network_set(o),
        Resource::GlobalNetworkSet(o) => pv::global_network_set(o),
        Resource::Profile(o) => pv::profile(o),
        Resource::Namespace(o) => pv::namespace(o),
        Resource::ServiceAccount(o) => pv::service_account(o),
        Resource::ClusterNetworkPolicy(o) => crate::cnp::cluster_network_policy(o),
        Resource::AdminNetworkPolicy(o) => crate::anp::admin_network_policy(o),
        Resource::BaselineAdminNetworkPolicy(o) => crate::anp::baseline_admin_network_policy(o),
        Resource::Pod(o) => {
            name(&o.metadata.name, true)?;
            crate::pod::validate(o)
        }
    }
}

/// An AS number Trellis can use: not 0 and not AS_TRANS (23456, RFC 6793).
/// An endpoint's floating addresses: each maps one of the endpoint's own addresses to an
/// external one of the same family, and no external address twice (one DNAT per address).
fn ip_nats(w: &WorkloadEndpointSpec) -> Result<(), ResourceError> {
    for (i, n) in w.ip_nats.iter().enumerate() {
        let f = format!("spec.ipNATs[{i}]");
        if !w.ip_networks.iter().any(|net| net.addr() == n.internal_ip) {
            return Err(err(
                &format!("{f}.internalIP"),
                format!("{} is not one of the endpoint's ipNetworks", n.internal_ip),
            ));
        }
        if n.internal_ip.is_ipv4() != n.external_ip.is_ipv4() {
            return Err(err(
                &format!("{f}.externalIP"),
                format!("{} is not of {}'s family", n.external_ip, n.internal_ip),
            ));
        }
        if w.ip_nats[..i]
            .iter()
            .any(|o| o.external_ip == n.external_ip)
        {
            return Err(err(
                &format!("{f}.externalIP"),
                format!("{} is given twice", n.external_ip),
            ));
        }
    }
    Ok(())
}

fn asn(field: &str, a: u32) -> Result<(), ResourceError> {
    if a == 0 || a == 23456 {
        return Err(err(field, format!("{a} is not a usable AS number")));
    }
    Ok(())
}

/// `aa:nn` (RFC 1997) as its 32-bit value.
pub fn parse_community(s: &str) -> Result<u32, String> {
    let (a, n) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not aa:nn"))?;
    let a: u16 = a
        .parse()
        .map_err(|_| format!("{s:?}: {a:?} is not 0-65535"))?;
    let n: u16 = n
        .parse()
        .map_err(|_| format!("{s:?}: {n:?} is not 0-65535"))?;
    Ok((a as u32) << 16 | n as u32)
}

/// A Go-style duration in whole seconds (`120s`, `2m`).
pub fn parse_seconds(s: &str) -> Result<u32, String> {
    let (num, mult) = if let Some(n) = s.strip_suffix('s') {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60)
    } else {
        (s, 1)
    };
    num.parse::<u32>()
        .ok()
        .and_then(|v| v.checked_mul(mult))
        .filter(|v| *v <= 4095)
        .ok_or_else(|| format!("{s:?} is not a duration of at most 4095s (e.g. 120s)"))
}

/// Most named communities (`spec.communities`), prefix advertisements, and community
/// references over all prefix advertisements. A route carries the communities of every
/// advertisement that covers it, and its attributes must fit in one 4096-byte BGP message
/// (RFC 4271 §4.1): 256 communities are 1 KiB. (More made every agent's BGP speaker fail to
/// pack its announcements.)
pub const MAX_COMMUNITIES: usize = 256;

/// `spec.communities` and `spec.prefixAdvertisements`: each community a value or a name
/// defined in `spec.communities`, within [`MAX_COMMUNITIES`].
fn advertised_communities(s: &BgpConfigurationSpec) -> Result<(), ResourceError> {
    for (field, n) in [
        ("spec.communities", s.communities.len()),
        ("spec.prefixAdvertisements", s.prefix_advertisements.len()),
    ] {
        if n > MAX_COMMUNITIES {
            return Err(err(
                field,
                format!("has {n} entries; at most {MAX_COMMUNITIES}"),
            ));
        }
    }
    let mut named: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (i, c) in s.communities.iter().enumerate() {
        parse_community(&c.value).map_err(|e| err(&format!("spec.communities[{i}].value"), e))?;
        named.insert(&c.name);
    }
    let mut references = 0;
    for (i, a) in s.prefix_advertisements.iter().enumerate() {
        for (j, c) in a.communities.iter().enumerate() {
            let field = || format!("spec.prefixAdvertisements[{i}].communities[{j}]");
            references += 1;
            if references > MAX_COMMUNITIES {
                return Err(err(
                    &field(),
                    format!(
                        "more than {MAX_COMMUNITIES} communities in all prefixAdvertisements: \
                         a route carries those of every advertisement covering it, and they \
                         must fit in one BGP message"
                    ),
                ));
            }
            if !named.contains(c.as_str()) {
                parse_community(c)
                    .map_err(|e| err(&field(), format!("{e}, and no community is named {c:?}")))?;
            }
        }
    }
    Ok(())
}

fn bgp_configuration(o: &Object<BgpConfigurationSpec>) -> Result<(), ResourceError> {
    if o.metadata.name != "default" {
        return Err(err(
            "metadata.name",
            format!(
                "{:?}: the BGP configuration is a singleton named \"default\"",
                o.metadata.name
            ),
        ));
    }
    let s = &o.spec;
    if let Some(a) = s.as_number {
        asn("spec.asNumber", a)?;
    }
    if s.listen_port == Some(0) {
        return Err(err("spec.listenPort", "0 is not a port"));
    }
    if let Some(t) = &s.node_mesh_max_restart_time {
        parse_seconds(t).map_err(|e| err("spec.nodeMeshMaxRestartTime", e))?;
    }
    advertised_communities(s)?;
    Ok(())
}

/// `IP` or `IP:port` (`[v6]:port`).
pub fn parse_peer_ip(s: &str) -> Result<(std::net::IpAddr, Option<u16>), String> {
    if let Ok(ip) = s.parse() {
        return Ok((ip, None));
    }
    let sa: std::net::SocketAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or IP:port"))?;
    Ok((sa.ip(), Some(sa.port())))
}

/// `reachableBy`: a gateway address of the peer's family, other than the peer itself.
pub fn reachable_by(peer: std::net::IpAddr, gw: &str) -> Result<std::net::IpAddr, String> {
    let gw: std::net::IpAddr = gw
        .parse()
        .map_err(|_| format!("{gw:?} is not an IP address"))?;
    if gw.is_ipv4() != peer.is_ipv4() {
        return Err(format!("{gw} is not of the same family as peerIP {peer}"));
    }
    if gw == peer || gw.is_unspecified() || gw.is_multicast() {
        return Err(format!("{gw} cannot be the gateway to {peer}"));
    }
    Ok(gw)
}

fn bgp_peer(o: &Object<BgpPeerSpec>) -> Result<(), ResourceError> {
    name(&o.metadata.name, true)?;
    let s = &o.spec;
    match (&s.peer_ip, &s.peer_selector) {
        (Some(_), Some(_)) => {
            return Err(err(
                "spec.peerSelector",
                "give peerIP or peerSelector, not both",
            ))
        }
        (None, None) => return Err(err("spec.peerIP", "peerIP or peerSelector is required")),
        (Some(ip), None) => {
            let (peer, _) = parse_peer_ip(ip).map_err(|e| err("spec.peerIP", e))?;
            match s.as_number {
                Some(a) => asn("spec.asNumber", a)?,
                None => return Err(err("spec.asNumber", "is required with peerIP")),
            }
            if let Some(gw) = &s.reachable_by {
                reachable_by(peer, gw).map_err(|e| err("spec.reachableBy", e))?;
            }
        }
        (None, Some(sel)) => {
            Selector::parse(sel).map_err(|e| err("spec.peerSelector", e.to_string()))?;
            if s.reachable_by.is_some() {
                return Err(err(
                    "spec.reachableBy",
                    "applies to a peerIP; nodes selected by peerSelector are on the mesh's paths",
                ));
            }
            if s.as_number.is_some() {
                return Err(err(
                    "spec.asNumber",
                    "comes from the selected nodes; leave it out with peerSelector",
                ));
            }
        }
    }
    if s.node.is_some() && s.node_selector.is_some() {
        return Err(err(
            "spec.nodeSelector",
            "give node or nodeSelector, not both",
        ));
    }
    if let Some(n) = &s.node {
        name(n, false).map_err(|e| err("spec.node", e.reason))?;
    }
    if let Some(sel) = &s.node_selector {
        Selector::parse(sel).map_err(|e| err("spec.nodeSelector", e.to_string()))?;
    }
    match &s.password {
        Some(BgpPassword::SecretKeyRef { .. }) => {
            return Err(err("spec.password", "secretKeyRef needs Kubernetes secrets, which Trellis's datastore does not hold; give the password inline"))
        }
        Some(BgpPassword::Inline(p)) if p.is_empty() || p.len() > 80 => {
            return Err(err("spec.password", "must be 1-80 characters (TCP MD5 key length)"))
        }
        _ => {}
    }
    if let Some(t) = &s.max_restart_time {
        parse_seconds(t).map_err(|e| err("spec.maxRestartTime", e))?;
    }
    if s.keep_original_next_hop && s.next_hop_mode.is_some() {
        return Err(err(
            "spec.nextHopMode",
            "keepOriginalNextHop and nextHopMode cannot both be set (keepOriginalNextHop: true is nextHopMode: Keep)",
        ));
    }
    for (i, f) in s.filters.iter().enumerate() {
        name(f, false).map_err(|e| err(&format!("spec.filters[{i}]"), e.reason))?;
    }
    if let Some(n) = s.num_allowed_local_as_numbers {
        if n > MAX_ALLOWED_LOCAL_AS {
            return Err(err(
                "spec.numAllowedLocalASNumbers",
                format!("{n} is more than {MAX_ALLOWED_LOCAL_AS}"),
            ));
        }
    }
    if s.max_prefixes.is_some_and(|m| m.limit == 0) {
        return Err(err(
            "spec.maxPrefixes.limit",
            "0 would refuse every route; give at least 1 (leave maxPrefixes out for no limit)",
        ));
    }
    if let Some(h) = s.ttl_security {
        if h > MAX_TTL_SECURITY_HOPS {
            return Err(err(
                "spec.ttlSecurity",
                format!(
                    "{h}: give the peer's distance in hops, 1-{MAX_TTL_SECURITY_HOPS} (0: off)"
                ),
            ));
        }
    }
    Ok(())
}

fn bgp_filter(o: &Object<BgpFilterSpec>) -> Result<(), ResourceError> {
    name(&o.metadata.name, false)?;
    let s = &o.spec;
    let lists = [
        ("exportV4", &s.export_v4, false, true),
        ("importV4", &s.import_v4, false, false),
        ("exportV6", &s.export_v6, true, true),
        ("importV6", &s.import_v6, true, false),
    ];
    for (list, rules, v6, export) in lists {
        for (i, r) in rules.iter().enumerate() {
            filter_rule(r, v6, export)
                .map_err(|(f, why)| err(&format!("spec.{list}[{i}].{f}"), why))?;
        }
    }
    Ok(())
}

/// A rule's consistency: (field, reason) of the first problem.
fn filter_rule(r: &BgpFilterRule, v6: bool, export: bool) -> Result<(), (&'static str, String)> {
    match (&r.cidr, r.match_operator) {
        (Some(c), Some(_)) => {
            if c.addr().is_ipv6() != v6 {
                let want = if v6 { "IPv6" } else { "IPv4" };
                return Err(("cidr", format!("{c} is not an {want} CIDR")));
            }
            if c.network() != c.addr() {
                return Err(("cidr", format!("{c} has host bits set")));
            }
        }
        (Some(_), None) => return Err(("matchOperator", "is required with cidr".into())),
        (None, Some(_)) => return Err(("cidr", "is required with matchOperator".into())),
        (None, None) => {}
    }
    if let Some(pl) = &r.prefix_length {
        let (Some(c), Some(MatchOperator::In | MatchOperator::NotIn)) = (&r.cidr, r.match_operator)
        else {
            return Err((
                "prefixLength",
                "needs a cidr with matchOperator In or NotIn".into(),
            ));
        };
        let (lo, hi) = (
            pl.min.unwrap_or(c.prefix_len()),
            pl.max.unwrap_or(c.max_prefix_len()),
        );
        if lo < c.prefix_len() || hi > c.max_prefix_len() || lo > hi {
            return Err((
                "prefixLength",
                format!(
                    "{lo}-{hi} is not within {}-{} or is empty",
                    c.prefix_len(),
                    c.max_prefix_len()
                ),
            ));
        }
    }
    if r.source.is_some() && !export {
        return Err(("source", "applies to export rules only".into()));
    }
    Ok(())
}

/// Upper bound of `numAllowedLocalASNumbers` (an AS path segment holds at most 255 ASes).
pub const MAX_ALLOWED_LOCAL_AS: u32 = 255;
/// Upper bound of `ttlSecurity` hops (the lowest accepted TTL is then 2).
pub const MAX_TTL_SECURITY_HOPS: u32 = 254;

/// Number of addresses in a network (saturating: `::/0` holds 2^128).
pub fn block_size(c: &IpNet) -> u128 {
    1u128
        .checked_shl(u32::from(c.max_prefix_len() - c.prefix_len()))
        .unwrap_or(u128::MAX)
}

/// An address or CIDR (an address means its /32 or /128).
pub fn parse_cidr_or_ip(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        if n.network() != n.addr() {
            return Err(format!("{s} has host bits set"));
        }
        return Ok(n);
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an address or CIDR"))
}

fn ip_pool(o: &Object<IpPoolSpec>) -> Result<(), ResourceError> {
    name(&o.metadata.name, true)?;
    let s = &o.spec;
    pool_cidr(&s.cidr)?;
    let range = block_prefix_range(s.cidr.addr().is_ipv4());
    let bs = s.block_prefix();
    if !range.contains(&bs) {
        return Err(err(
            "spec.blockSize",
            format!("{bs} is outside {}–{}", range.start(), range.end()),
        ));
    }
    if bs < s.cidr.prefix_len() {
        return Err(err(
            "spec.blockSize",
            format!("/{bs} blocks do not fit in pool {}", s.cidr),
        ));
    }
    if s.encapsulation.is_some() && (s.ipip_mode.is_some() || s.vxlan_mode.is_some()) {
        return Err(err(
            "spec.encapsulation",
            "set either encapsulation or Calico's ipipMode/vxlanMode, not both",
        ));
    }
    let on =
        |m: Option<TunnelMode>| matches!(m, Some(TunnelMode::Always | TunnelMode::CrossSubnet));
    if on(s.ipip_mode) && on(s.vxlan_mode) {
        return Err(err(
            "spec.vxlanMode",
            "ipipMode and vxlanMode cannot both be enabled",
        ));
    }
    if let Some(sel) = &s.node_selector {
        Selector::parse(sel).map_err(|e| err("spec.nodeSelector", e.to_string()))?;
    }
    for (i, u) in s.allowed_uses.iter().enumerate() {
        if !["Workload", "Tunnel"].contains(&u.as_str()) {
            return Err(err(
                &format!("spec.allowedUses[{i}]"),
                format!("{u:?} is not Workload or Tunnel"),
            ));
        }
    }
    if let Some(m) = &s.assignment_mode {
        if !["Automatic", "Manual"].contains(&m.as_str()) {
            return Err(err(
                "spec.assignmentMode",
                format!("{m:?} is not Automatic or Manual"),
            ));
        }
    }
    Ok(())
}

fn node(o: &Object<NodeSpec>) -> Result<(), ResourceError> {
    name(&o.metadata.name, true)?;
    for (i, a) in o.spec.addresses.iter().enumerate() {
        let addr = a.address.split('/').next().unwrap_or("");
        addr.parse::<std::net::IpAddr>().map_err(|_| {
            err(
                &format!("spec.addresses[{i}].address"),
                format!("{:?} is not an address", a.address),
            )
        })?;
    }
    if let Some(bgp) = &o.spec.bgp {
        if bgp.as_number == Some(0) {
            return Err(err("spec.bgp.asNumber", "0 is not a valid AS number"));
        }
    }
    for (i, c) in o.spec.pod_cidrs.iter().enumerate() {
        let field = format!("spec.podCIDRs[{i}]");
        if c.trunc() != *c {
            return Err(err(&field, format!("{c} has host bits set")));
        }
        if o.spec.pod_cidrs[..i]
            .iter()
            .any(|p| p.addr().is_ipv4() == c.addr().is_ipv4())
        {
            return Err(err(&field, format!("{c}: a second podCIDR of one family")));
        }
    }
    if let Some(mac) = &o.spec.vxlan_tunnel_mac_addr {
        let parts: Vec<&str> = mac.split(':').collect();
        if parts.len() != 6
            || parts
                .iter()
                .any(|p| p.len() != 2 || u8::from_str_radix(p, 16).is_err())
        {
            return Err(err(
                "spec.vxlanTunnelMACAddr",
                format!("{mac:?} is not a MAC address"),
            ));
        }
    }
    Ok(())
}

/// Rejects a pool whose CIDR overlaps another pool's (other than its own earlier version).
pub fn check_pool_overlap(
    new: &Object<IpPoolSpec>,
    existing: &[Object<IpPoolSpec>],
) -> Result<(), ResourceError> {
    PoolIndex::new(existing).check(new)
}

/// Pools indexed by network for overlap checks. Two CIDRs overlap exactly when one contains
/// the other's first address, so a query looks up the new pool's supernets (one lookup per
/// prefix length) and the pools whose first address lies inside it (one range): checking `n`
/// pools against each other costs O(n log n), not O(n²) — a file of tens of thousands of pools
/// is checked in a moment.
#[derive(Debug, Default)]
pub struct PoolIndex<'a> {
    /// (IPv6?, first address, prefix length) → the pools with that network.
    by_network: BTreeMap<(bool, u128, u8), Vec<&'a Object<IpPoolSpec>>>,
}

fn network_key(net: &IpNet) -> (bool, u128, u8) {
    let first = match net.network() {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    };
    (first.0, first.1, net.prefix_len())
}

impl<'a> PoolIndex<'a> {
    pub fn new(pools: impl IntoIterator<Item = &'a Object<IpPoolSpec>>) -> PoolIndex<'a> {
        let mut index = PoolIndex::default();
        for p in pools {
            index.insert(p);
        }
        index
    }

    pub fn insert(&mut self, pool: &'a Object<IpPoolSpec>) {
        self.by_network
            .entry(network_key(&pool.spec.cidr))
            .or_default()
            .push(pool);
    }

    /// A pool that overlaps `new`, other than one of `new`'s name (the version it replaces).
    pub fn overlapping(&self, new: &Object<IpPoolSpec>) -> Option<&'a Object<IpPoolSpec>> {
        let other = |pools: &Vec<&'a Object<IpPoolSpec>>| {
            pools
                .iter()
                .find(|p| p.metadata.name != new.metadata.name)
                .copied()
        };
        let net = new.spec.cidr;
        // Its strict supernets; pools with its own first address are in the range below.
        let containing = (0..net.prefix_len()).find_map(|len| {
            let supernet = IpNet::new(net.network(), len)
                .expect("shorter prefix")
                .trunc();
            self.by_network.get(&network_key(&supernet)).and_then(other)
        });
        if containing.is_some() {
            return containing;
        }
        let (v6, first, _) = network_key(&net);
        let (_, last, _) =
            network_key(&IpNet::new(net.broadcast(), net.max_prefix_len()).expect("host"));
        self.by_network
            .range((v6, first, 0)..=(v6, last, u8::MAX))
            .find_map(|(_, pools)| other(pools))
    }

    /// [`PoolIndex::overlapping`] as the error `apply` reports.
    pub fn check(&self, new: &Object<IpPoolSpec>) -> Result<(), ResourceError> {
        match self.overlapping(new) {
            None => Ok(()),
            Some(p) => Err(ResourceError {
                doc: None,
                object: Some(format!("IPPool/{}", new.metadata.name)),
                field: "spec.cidr".into(),
                reason: format!(
                    "{} overlaps pool {} ({})",
                    new.spec.cidr, p.metadata.name, p.spec.cidr
                ),
            }),
        }
    }
}
