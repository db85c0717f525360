//! Whole-topology validation, so that `up` creates nothing for a topology it would reject
//! half way: names (reserved, unique across member kinds, short enough for the namespace and
//! file names built from them), limits, subnets (IPv4, no host bits, no overlaps, room for
//! their members), pools and every other resource the lab applies (typed, validated as
//! `trellis apply` validates them), pool addresses for the pods, BGP daemons, expectations.
//! Errors name the member and field (`pods[3].name "router": ...`). Pure.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::{IpNet, Ipv4Net};
use trellis_resources::{Encapsulation, Resource, Selector};

use crate::resources::{self, encapsulation, speakers};
use crate::topology::{
    addresses, Addrs, DaemonSpec, Topology, FIRST_EXTERNAL_HOST, FIRST_NODE_HOST,
};
use crate::LabError;

/// Longest lab or member name (they make namespace names `tl-LAB-MEMBER`, file names in the
/// lab directory and the agents' Unix socket paths, which must stay under 108 bytes).
pub const MAX_NAME: usize = 20;
pub const MAX_NODES: usize = 50;
pub const MAX_PODS: usize = 250;
pub const MAX_EXTERNALS: usize = 20;
pub const MAX_SUBNETS: usize = 16;
pub const MAX_POOLS: usize = 16;
pub const MAX_EXPECT: usize = 1000;
pub const MAX_PEERS: usize = 64;
pub const MAX_LABELS: usize = 32;
/// Largest `resources:` (and `policies:`) text.
pub const MAX_RESOURCES_BYTES: usize = 256 * 1024;
/// Member names the lab uses itself: its namespaces (`fabric`, `router`, `control`) and files
/// in the lab directory (`etcd`, `etcd.log`).
pub const RESERVED_NAMES: [&str; 4] = ["fabric", "router", "control", "etcd"];
/// The BGP daemons the lab can run.
pub const DAEMONS: [&str; 3] = ["bird", "gobgp", "frr"];

/// A topology that passed every check, with what the lab derives from it: the members'
/// addresses and the resources it applies. Only [`validate`] makes one.
#[derive(Debug, Clone)]
pub struct Lab {
    topology: Topology,
    addresses: Addrs,
    resources: Vec<Resource>,
    policies: Vec<Resource>,
}

impl Lab {
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn addresses(&self) -> &Addrs {
        &self.addresses
    }

    /// The resources `up` applies, in order.
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }

    /// The policy documents `up` applies once the pods serve, in order.
    pub fn policies(&self) -> &[Resource] {
        &self.policies
    }
}

fn bad(field: impl Into<String>, value: impl Into<String>, reason: impl Into<String>) -> LabError {
    LabError::invalid(field, value, reason)
}

/// Checks everything about a topology that can be checked without building it.
pub fn validate(t: &Topology) -> Result<Lab, LabError> {
    header(t)?;
    limits(t)?;
    subnets(t)?;
    member_names(t)?;
    nodes(t)?;
    externals(t)?;
    subnet_room(t)?;
    pods(t)?;
    workloads::namespaces(t)?;
    workloads::pods(t)?;
    pools(t)?;
    bgp(t)?;
    expectations(t)?;
    for (field, text) in [("resources", &t.resources), ("policies", &t.policies)] {
        if let Some(r) = text {
            if r.len() > MAX_RESOURCES_BYTES {
                return Err(bad(
                    field,
                    "",
                    format!("{} bytes; at most {MAX_RESOURCES_BYTES}", r.len()),
                ));
            }
        }
    }
    let addresses = addresses(t);
    let resources = resources::build(t, &addresses)?;
    let policies = resources::policies(t, &resources)?;
    Ok(Lab {
        topology: t.clone(),
        addresses,
        resources,
        policies,
    })
}

/// A DNS label of at most `max` characters: lower-case letters, digits and '-', starting and
/// ending with a letter or digit.
fn dns_label(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max {
        return Err(format!("must be 1-{max} characters"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err("may hold only lower-case letters, digits and '-'".into());
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

fn name_field(field: String, s: &str, max: usize) -> Result<(), LabError> {
    dns_label(s, max).map_err(|r| bad(field, format!("{s:?}"), r))
}

/// A lab name: it names the lab's directory and namespaces, so `down ..` must not reach
/// outside `/run/trellis/lab`.
pub fn lab_name(name: &str) -> Result<(), LabError> {
    name_field("name".into(), name, MAX_NAME)
}

fn header(t: &Topology) -> Result<(), LabError> {
    lab_name(&t.name)?;
    if !["embedded", "etcd"].contains(&t.datastore.as_str()) {
        return Err(bad(
            "datastore",
            format!("{:?}", t.datastore),
            "must be embedded or etcd",
        ));
    }
    if let Some(k) = &t.kubernetes {
        if !k.kubeconfig.starts_with('/') {
            return Err(bad(
                "kubernetes.kubeconfig",
                format!("{:?}", k.kubeconfig),
                "must be an absolute path",
            ));
        }
        // The kube-controller runs on the host (where the API server is reachable); an etcd
        // lab's etcd listens only inside the lab's control namespace.
        if t.datastore != "embedded" {
            return Err(bad(
                "kubernetes",
                "",
                "needs the embedded datastore (the kube-controller runs on the host, which does not reach an etcd lab's control namespace)",
            ));
        }
    }
    Ok(())
}

fn limits(t: &Topology) -> Result<(), LabError> {
    let counts = [
        ("nodes", t.nodes.len(), MAX_NODES),
        ("pods", t.pods.len(), MAX_PODS),
        ("external", t.external.len(), MAX_EXTERNALS),
        ("subnets", t.subnets.len(), MAX_SUBNETS),
        ("pools", t.pools.len(), MAX_POOLS),
        ("expect", t.expect.len(), MAX_EXPECT),
    ];
    for (field, n, max) in counts {
        if n > max {
            return Err(bad(
                field,
                "",
                format!("{n} entries; a lab has at most {max}"),
            ));
        }
    }
    for (field, n) in [("subnets", t.subnets.len()), ("pools", t.pools.len())] {
        if n == 0 {
            return Err(bad(field, "", "at least one is needed"));
        }
    }
    Ok(())
}

/// Ranges neither a subnet nor a pool may touch: pods use 169.254.1.1 as their gateway.
fn special(net: &IpNet) -> Option<&'static str> {
    let ranges: [(&str, &str); 5] = [
        ("0.0.0.0/8", "\"this network\""),
        ("127.0.0.0/8", "loopback"),
        (
            "169.254.0.0/16",
            "link-local (pods' gateway is 169.254.1.1)",
        ),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    ];
    ranges.into_iter().find_map(|(r, what)| {
        let r: IpNet = r.parse().expect("constant");
        overlaps(net, &r).then_some(what)
    })
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// `what` is unique among `names` (field prefix, name): the second use is the error.
fn unique<'a>(names: impl Iterator<Item = (String, &'a str)>) -> Result<(), LabError> {
    let mut seen: BTreeMap<&str, String> = BTreeMap::new();
    for (field, n) in names {
        if let Some(first) = seen.insert(n, field.clone()) {
            return Err(bad(
                format!("{field}.name"),
                format!("{n:?}"),
                format!("already used by {first}"),
            ));
        }
    }
    Ok(())
}

fn subnets(t: &Topology) -> Result<(), LabError> {
    for (i, s) in t.subnets.iter().enumerate() {
        name_field(format!("subnets[{i}].name"), &s.name, MAX_NAME)?;
        let field = format!("subnets[{i}].cidr");
        let IpNet::V4(v4) = s.cidr else {
            return Err(bad(
                field,
                s.cidr.to_string(),
                "the lab's nodes need IPv4 subnets",
            ));
        };
        if v4.network() != v4.addr() {
            return Err(bad(
                field,
                s.cidr.to_string(),
                format!("has host bits set; the network is {}", s.cidr.trunc()),
            ));
        }
        if v4.prefix_len() > 28 {
            return Err(bad(
                field,
                s.cidr.to_string(),
                "must be a /28 or larger (nodes take addresses from .10)",
            ));
        }
        if let Some(what) = special(&s.cidr) {
            return Err(bad(
                field,
                s.cidr.to_string(),
                format!("overlaps the {what} range"),
            ));
        }
        for (j, o) in t.subnets[..i].iter().enumerate() {
            if overlaps(&s.cidr, &o.cidr) {
                return Err(bad(
                    field,
                    s.cidr.to_string(),
                    format!("overlaps subnets[{j}] ({}, {})", o.name, o.cidr),
                ));
            }
        }
    }
    unique(
        t.subnets
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("subnets[{i}]"), s.name.as_str())),
    )
}

/// Every member as (`nodes[0]`, name), in topology order.
fn members(t: &Topology) -> impl Iterator<Item = (String, &str)> {
    let nodes = t
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("nodes[{i}]"), n.name.as_str()));
    let pods = t
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("pods[{i}]"), p.name.as_str()));
    let external = t
        .external
        .iter()
        .enumerate()
        .map(|(i, e)| (format!("external[{i}]"), e.name.as_str()));
    nodes.chain(pods).chain(external)
}

fn member_names(t: &Topology) -> Result<(), LabError> {
    for (field, n) in members(t) {
        name_field(format!("{field}.name"), n, MAX_NAME)?;
        if RESERVED_NAMES.contains(&n) {
            return Err(bad(
                format!("{field}.name"),
                format!("{n:?}"),
                format!(
                    "reserved (the lab itself uses {})",
                    RESERVED_NAMES.join(", ")
                ),
            ));
        }
    }
    unique(members(t))
}

fn subnet_index(t: &Topology, field: String, subnet: &str) -> Result<usize, LabError> {
    t.subnets
        .iter()
        .position(|s| s.name == subnet)
        .ok_or_else(|| bad(field, format!("{subnet:?}"), "no such subnet"))
}

/// Kubernetes label syntax: `[prefix/]name`, name and value at most 63 characters of
/// letters, digits, '-', '_', '.', starting and ending with a letter or digit.
fn labels(field: String, labels: &BTreeMap<String, String>) -> Result<(), LabError> {
    if labels.len() > MAX_LABELS {
        return Err(bad(field, "", format!("at most {MAX_LABELS} labels")));
    }
    let part = |s: &str, max: usize| {
        s.len() <= max
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    for (k, v) in labels {
        let (prefix, name) = k.rsplit_once('/').unwrap_or(("", k));
        let prefix_ok = prefix.is_empty() || (dns_label(&prefix.replace('.', "-"), 253).is_ok());
        if !prefix_ok || !part(name, 63) {
            return Err(bad(
                field,
                format!("{k:?}"),
                "not a label key ([prefix/]name, name 1-63 letters, digits, '-', '_', '.')",
            ));
        }
        if !v.is_empty() && !part(v, 63) {
            return Err(bad(
                format!("{field}.{k}"),
                format!("{v:?}"),
                "not a label value (0-63 letters, digits, '-', '_', '.')",
            ));
        }
    }
    Ok(())
}

fn nodes(t: &Topology) -> Result<(), LabError> {
    for (i, n) in t.nodes.iter().enumerate() {
        subnet_index(t, format!("nodes[{i}].subnet"), &n.subnet)?;
        labels(format!("nodes[{i}].labels"), &n.labels)?;
        if let Some(id) = &n.route_reflector_cluster_id {
            if id.parse::<std::net::Ipv4Addr>().is_err() {
                return Err(bad(
                    format!("nodes[{i}].routeReflectorClusterID"),
                    format!("{id:?}"),
                    "must be an IPv4 address (e.g. 244.0.0.1)",
                ));
            }
        }
    }
    Ok(())
}

fn externals(t: &Topology) -> Result<(), LabError> {
    for (i, e) in t.external.iter().enumerate() {
        subnet_index(t, format!("external[{i}].subnet"), &e.subnet)?;
        let Some(v) = &e.via else { continue };
        let field = format!("external[{i}].via");
        if e.bgp.is_some() {
            return Err(bad(
                field,
                format!("{v:?}"),
                "a host running BGP learns its routes; leave via out",
            ));
        }
        let on_subnet = t
            .nodes
            .iter()
            .map(|n| (&n.name, &n.subnet))
            .chain(t.external.iter().map(|x| (&x.name, &x.subnet)))
            .any(|(name, subnet)| name == v && *subnet == e.subnet);
        if !on_subnet || v == &e.name {
            return Err(bad(
                field,
                format!("{v:?}"),
                format!(
                    "must be a node or another external host on subnet {}",
                    e.subnet
                ),
            ));
        }
    }
    Ok(())
}

/// Every node and external host gets an address on its subnet: nodes from .10 (below .100),
/// externals from .100, all below the broadcast address.
fn subnet_room(t: &Topology) -> Result<(), LabError> {
    let mut used: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    let kinds = t
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("nodes[{i}]"), &n.name, &n.subnet, true))
        .chain(
            t.external
                .iter()
                .enumerate()
                .map(|(i, e)| (format!("external[{i}]"), &e.name, &e.subnet, false)),
        );
    for (field, name, subnet, is_node) in kinds {
        let s = t
            .subnets
            .iter()
            .find(|s| &s.name == subnet)
            .expect("checked");
        let IpNet::V4(net) = s.cidr else {
            unreachable!("checked")
        };
        let c = used.entry(subnet.as_str()).or_default();
        let (offset, limit) = if is_node {
            c.0 += 1;
            (FIRST_NODE_HOST + c.0 - 1, FIRST_EXTERNAL_HOST)
        } else {
            c.1 += 1;
            (FIRST_EXTERNAL_HOST + c.1 - 1, u32::MAX)
        };
        let size = host_count(&net);
        if offset >= limit.min(size - 1) {
            return Err(bad(
                field,
                format!("{name:?}"),
                format!(
                    "subnet {subnet} ({}) has no address .{offset} for it (nodes take .{FIRST_NODE_HOST}-.{}, external hosts .{FIRST_EXTERNAL_HOST} up, below the broadcast address; use a larger subnet)",
                    s.cidr,
                    FIRST_EXTERNAL_HOST - 1,
                ),
            ));
        }
    }
    // The router's .1 and the control namespace's .2 always fit: subnets are /28 or larger.
    Ok(())
}

fn host_count(net: &Ipv4Net) -> u32 {
    1u32 << (32 - net.prefix_len())
}

fn pods(t: &Topology) -> Result<(), LabError> {
    for (i, p) in t.pods.iter().enumerate() {
        if !t.nodes.iter().any(|n| n.name == p.node) {
            return Err(bad(
                format!("pods[{i}].node"),
                format!("{:?}", p.node),
                "no such node",
            ));
        }
        name_field(format!("pods[{i}].namespace"), &p.namespace, 63)?;
        labels(format!("pods[{i}].labels"), &p.labels)?;
    }
    Ok(())
}

/// Pool names, encapsulation and CIDRs against the subnets (the rest is the IPPool's own
/// validation), and enough pool addresses for the pods and VXLAN tunnel addresses.
fn pools(t: &Topology) -> Result<(), LabError> {
    unique(
        t.pools
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("pools[{i}]"), p.name.as_str())),
    )?;
    let mut selectors = Vec::new();
    for (i, p) in t.pools.iter().enumerate() {
        if encapsulation(&p.encapsulation).is_none() {
            return Err(bad(
                format!("pools[{i}].encapsulation"),
                format!("{:?}", p.encapsulation),
                format!("must be {}", resources::ENCAPSULATIONS),
            ));
        }
        let field = format!("pools[{i}].cidr");
        if let Some(what) = special(&p.cidr) {
            return Err(bad(
                field,
                p.cidr.to_string(),
                format!("overlaps the {what} range"),
            ));
        }
        if let Some((j, s)) = t
            .subnets
            .iter()
            .enumerate()
            .find(|(_, s)| overlaps(&p.cidr, &s.cidr))
        {
            return Err(bad(
                field,
                p.cidr.to_string(),
                format!("overlaps subnets[{j}] ({}, {})", s.name, s.cidr),
            ));
        }
        let sel = match &p.node_selector {
            Some(s) => Some(Selector::parse(s).map_err(|e| {
                bad(
                    format!("pools[{i}].nodeSelector"),
                    format!("{s:?}"),
                    e.to_string(),
                )
            })?),
            None => None,
        };
        selectors.push(sel);
    }
    pool_room(t, &selectors)
}

/// Every node with pods is selected by a pool, and the pools have an address for every pod
/// and every VXLAN tunnel (an upper bound: blocks are claimed per node, so a lab near it may
/// still run short).
fn pool_room(t: &Topology, selectors: &[Option<Selector>]) -> Result<(), LabError> {
    let mut demand: u128 = 0;
    let mut usable: BTreeSet<usize> = BTreeSet::new();
    for (i, n) in t.nodes.iter().enumerate() {
        let picks: Vec<usize> = selectors
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_none_or(|s| s.matches(&n.labels)))
            .map(|(j, _)| j)
            .collect();
        let pods = t.pods.iter().filter(|p| p.node == n.name).count() as u128;
        if pods > 0 && picks.is_empty() {
            return Err(bad(
                format!("nodes[{i}]"),
                format!("{:?}", n.name),
                "has pods, but no pool's nodeSelector selects it",
            ));
        }
        let vxlan = picks.iter().any(|&j| {
            matches!(
                encapsulation(&t.pools[j].encapsulation),
                Some(Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet)
            )
        });
        demand += pods + u128::from(vxlan);
        usable.extend(picks);
    }
    let supply: u128 = usable
        .iter()
        .map(|&j| &t.pools[j].cidr)
        .filter(|c| c.addr().is_ipv4())
        .map(|c| 1u128 << (32 - c.prefix_len()))
        .sum();
    if demand > supply {
        return Err(bad(
            "pools",
            "",
            format!("{demand} pod and VXLAN tunnel addresses are needed, but the pools the nodes use hold {supply}"),
        ));
    }
    Ok(())
}

fn bgp(t: &Topology) -> Result<(), LabError> {
    if t.router.as_ref().is_some_and(|r| r.bgp.is_some()) && t.subnets.len() < 2 {
        return Err(bad(
            "router.bgp",
            "",
            "the lab has a router only with two or more subnets",
        ));
    }
    let all = speakers(t);
    for (field, name, b) in &all {
        speaker(t, &all, field, name, b)?;
    }
    Ok(())
}

fn speaker(
    t: &Topology,
    all: &[(String, &str, &DaemonSpec)],
    field: &str,
    name: &str,
    b: &DaemonSpec,
) -> Result<(), LabError> {
    if !DAEMONS.contains(&b.daemon.as_str()) {
        return Err(bad(
            format!("{field}.daemon"),
            format!("{:?}", b.daemon),
            format!("must be one of {}", DAEMONS.join(", ")),
        ));
    }
    if b.as_number == 0 || b.as_number == 23456 {
        return Err(bad(
            format!("{field}.asNumber"),
            b.as_number.to_string(),
            "not a usable AS number",
        ));
    }
    if let Some(h @ (0 | 255)) = b.ttl_security {
        return Err(bad(
            format!("{field}.ttlSecurity"),
            h.to_string(),
            "give the hops to the peers, 1-254",
        ));
    }
    if let Some(pw) = &b.password {
        // It is written into BIRD's and gobgpd's configuration files as a quoted string.
        let ok = (1..=80).contains(&pw.len())
            && pw
                .chars()
                .all(|c| c == ' ' || (c.is_ascii_graphic() && c != '"' && c != '\\'));
        if !ok {
            return Err(bad(
                format!("{field}.password"),
                "",
                "must be 1-80 printable ASCII characters without '\"' or '\\'",
            ));
        }
    }
    if b.peers.len() > MAX_PEERS {
        return Err(bad(
            format!("{field}.peers"),
            "",
            format!("at most {MAX_PEERS}"),
        ));
    }
    for (k, p) in b.peers.iter().enumerate() {
        let known = t.nodes.iter().any(|n| &n.name == p)
            || all.iter().any(|(_, other, _)| other == p && *other != name);
        let field = format!("{field}.peers[{k}]");
        if !known {
            return Err(bad(
                field,
                format!("{p:?}"),
                "not a node or another BGP speaker",
            ));
        }
        if b.peers[..k].contains(p) {
            return Err(bad(field, format!("{p:?}"), "listed twice"));
        }
    }
    Ok(())
}

fn expectations(t: &Topology) -> Result<(), LabError> {
    let is_pod = |m: &str| t.pods.iter().any(|p| p.name == m);
    let is_external = |m: &str| t.external.iter().any(|e| e.name == m);
    for (i, x) in t.expect.iter().enumerate() {
        if !is_pod(&x.from) && !is_external(&x.from) {
            return Err(bad(
                format!("expect[{i}].from"),
                format!("{:?}", x.from),
                "not a pod or external host",
            ));
        }
        if !is_pod(&x.to) && !is_external(&x.to) || x.to == x.from {
            return Err(bad(
                format!("expect[{i}].to"),
                format!("{:?}", x.to),
                "not a pod or external host other than from",
            ));
        }
        if let Some(s) = &x.seen_as {
            let field = format!("expect[{i}].seenAs");
            if s != "node" && s != "pod" {
                return Err(bad(field, format!("{s:?}"), "must be node or pod"));
            }
            if !is_external(&x.to) || !is_pod(&x.from) {
                return Err(bad(
                    field,
                    format!("{s:?}"),
                    "applies from a pod to an external host",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
mod workloads;
