//! Cluster IPAM decisions, pure: pools carved into blocks (`blockSize`, /26 by default) that are
//! claimed with affinity to a node; addresses allocated inside blocks to handles (one handle per
//! attachment: network, container, interface). The shell reads blocks from the datastore, calls
//! these functions, and writes the result back with compare-and-swap.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use trellis_resources::validate::block_size;
use trellis_resources::{AllocationAttribute, IpPoolSpec, IpamBlockSpec, Selector};

/// A pool by name, as the allocator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub spec: IpPoolSpec,
}

/// Why no address could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterIpamError {
    #[error("no enabled IPv{family} pool selects node {node}{}", if requested.is_empty() { String::new() } else { format!(" among the requested pools {}", requested.join(", ")) })]
    NoPool {
        family: u8,
        node: String,
        requested: Vec<String>,
    },
    #[error("requested pool {0:?} does not exist")]
    UnknownPool(String),
    #[error("address {ip} is not inside any pool")]
    OutsidePools { ip: IpAddr },
    #[error("address {ip} is reserved by IPReservation {reservation}")]
    Reserved { ip: IpAddr, reservation: String },
    #[error("address {ip} is already allocated (handle {handle})")]
    InUse { ip: IpAddr, handle: String },
    #[error("no free address in pools {pools} for node {node} (blocks exhausted{})", if *strict { ", strictAffinity forbids borrowing" } else { "" })]
    Exhausted {
        pools: String,
        node: String,
        strict: bool,
    },
}

/// The datastore name of a block: its CIDR with `.`/`:`/`/` turned into `-`.
pub fn block_name(cidr: &IpNet) -> String {
    cidr.to_string().replace(['.', ':', '/'], "-")
}

/// The name of a node's affinity to a block.
pub fn affinity_name(node: &str, cidr: &IpNet) -> String {
    format!("{node}-{}", block_name(cidr))
}

/// The handle of one attachment (Calico's form: `NETWORK.CONTAINERID`, plus the interface).
pub fn handle_id(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{network}.{container_id}.{ifname}")
}

/// `host:NODE`.
pub fn affinity_of(node: &str) -> String {
    format!("host:{node}")
}

/// The node a block is affine to.
pub fn block_node(b: &IpamBlockSpec) -> Option<&str> {
    b.affinity.as_deref().and_then(|a| a.strip_prefix("host:"))
}

/// An empty block affine to `node`.
pub fn new_block(cidr: IpNet, node: &str) -> IpamBlockSpec {
    IpamBlockSpec {
        cidr,
        affinity: Some(affinity_of(node)),
        allocations: vec![None; block_size(&cidr) as usize],
        attributes: Vec::new(),
        empty_since: None,
    }
}

fn nth(cidr: &IpNet, i: u128) -> IpAddr {
    match cidr {
        IpNet::V4(n) => IpAddr::V4((u32::from(n.network()) + i as u32).into()),
        IpNet::V6(n) => IpAddr::V6((u128::from(n.network()) + i).into()),
    }
}

fn ordinal(cidr: &IpNet, ip: IpAddr) -> Option<usize> {
    if !cidr.contains(&ip) {
        return None;
    }
    Some(match (cidr, ip) {
        (IpNet::V4(n), IpAddr::V4(a)) => (u32::from(a) - u32::from(n.network())) as usize,
        (IpNet::V6(n), IpAddr::V6(a)) => (u128::from(a) - u128::from(n.network())) as usize,
        _ => return None,
    })
}

/// Pools that may serve `node` for one family: enabled, matching the node selector, and — when
/// the request names pools (by name or CIDR) — among those, in the requested order.
pub fn eligible_pools<'a>(
    pools: &'a [Pool],
    node: &str,
    node_labels: &BTreeMap<String, String>,
    requested: &[String],
    v4: bool,
) -> Result<Vec<&'a Pool>, ClusterIpamError> {
    let family = |p: &&Pool| p.spec.cidr.addr().is_ipv4() == v4;
    let selected = |p: &&Pool| {
        p.spec
            .node_selector
            .as_deref()
            .map(Selector::parse)
            .transpose()
            .ok()
            .flatten()
            .is_none_or(|s| s.matches(node_labels))
    };
    let out: Vec<&Pool> = if requested.is_empty() {
        pools
            .iter()
            .filter(family)
            .filter(|p| !p.spec.disabled)
            .filter(selected)
            .collect()
    } else {
        let mut out = Vec::new();
        for r in requested {
            let p = pools
                .iter()
                .find(|p| &p.name == r || p.spec.cidr.to_string() == *r)
                .ok_or_else(|| ClusterIpamError::UnknownPool(r.clone()))?;
            // An explicitly requested pool is used even if its selector excludes the node
            // (Calico's annotation behaviour), but never a disabled one.
            if family(&p) && !p.spec.disabled {
                out.push(p);
            }
        }
        out
    };
    if out.is_empty() {
        return Err(ClusterIpamError::NoPool {
            family: if v4 { 4 } else { 6 },
            node: node.into(),
            requested: requested.to_vec(),
        });
    }
    Ok(out)
}

/// The first block of `pool` that nobody has claimed, in address order, skipping blocks wholly
/// inside a reservation.
pub fn next_unclaimed_block(
    pool: &IpPoolSpec,
    claimed: &HashSet<IpNet>,
    reserved: &[IpNet],
) -> Option<IpNet> {
    let prefix = pool.block_prefix();
    let subnets = pool.cidr.subnets(prefix).ok()?;
    subnets
        .into_iter()
        .find(|b| !claimed.contains(b) && !reserved.iter().any(|r| r.contains(b)))
}

/// Whether `ip` is reserved, and by which reservation.
pub fn reserved_by(ip: IpAddr, reservations: &[(String, Vec<IpNet>)]) -> Option<&str> {
    reservations
        .iter()
        .find(|(_, nets)| nets.iter().any(|n| n.contains(&ip)))
        .map(|(n, _)| n.as_str())
}

fn attach(
    block: &mut IpamBlockSpec,
    ord: usize,
    handle: &str,
    secondary: &BTreeMap<String, String>,
) {
    let attr = AllocationAttribute {
        handle_id: handle.to_string(),
        secondary: secondary.clone(),
    };
    let idx = match block.attributes.iter().position(|a| *a == attr) {
        Some(i) => i,
        None => {
            block.attributes.push(attr);
            block.attributes.len() - 1
        }
    };
    block.allocations[ord] = Some(idx);
    block.empty_since = None;
}

/// Allocates the lowest free, unreserved address of `block` to `handle`.
pub fn allocate_in_block(
    block: &mut IpamBlockSpec,
    handle: &str,
    secondary: &BTreeMap<String, String>,
    reservations: &[(String, Vec<IpNet>)],
) -> Option<IpAddr> {
    let cidr = block.cidr;
    let ord = (0..block.allocations.len()).find(|&i| {
        block.allocations[i].is_none() && reserved_by(nth(&cidr, i as u128), reservations).is_none()
    })?;
    attach(block, ord, handle, secondary);
    Some(nth(&cidr, ord as u128))
}

/// Allocates a specific address of `block` to `handle` (idempotent for the same handle).
pub fn allocate_specific(
    block: &mut IpamBlockSpec,
    ip: IpAddr,
    handle: &str,
    secondary: &BTreeMap<String, String>,
) -> Result<(), ClusterIpamError> {
    let ord = ordinal(&block.cidr, ip).ok_or(ClusterIpamError::OutsidePools { ip })?;
    match block.allocations[ord] {
        Some(a) if block.attributes[a].handle_id == handle => Ok(()),
        Some(a) => Err(ClusterIpamError::InUse {
            ip,
            handle: block.attributes[a].handle_id.clone(),
        }),
        None => {
            attach(block, ord, handle, secondary);
            Ok(())
        }
    }
}

/// The addresses `handle` holds in `block`.
pub fn held_by(block: &IpamBlockSpec, handle: &str) -> Vec<IpAddr> {
    block
        .allocations
        .iter()
        .enumerate()
        .filter(|(_, a)| a.is_some_and(|i| block.attributes[i].handle_id == handle))
        .map(|(o, _)| nth(&block.cidr, o as u128))
        .collect()
}

/// Every allocation of a block: address and attribute.
pub fn allocations(block: &IpamBlockSpec) -> Vec<(IpAddr, &AllocationAttribute)> {
    block
        .allocations
        .iter()
        .enumerate()
        .filter_map(|(o, a)| a.map(|i| (nth(&block.cidr, o as u128), &block.attributes[i])))
        .collect()
}

/// Releases what `handle` holds in `block`; marks the block empty at `now` when it becomes so.
/// Unused attributes are compacted away.
pub fn release_handle(block: &mut IpamBlockSpec, handle: &str, now: u64) -> Vec<IpAddr> {
    release_where(block, now, |a, _| a.handle_id == handle)
}

/// Releases one address; returns its handle if it was allocated.
pub fn release_ip(block: &mut IpamBlockSpec, ip: IpAddr, now: u64) -> Option<String> {
    let ord = ordinal(&block.cidr, ip)?;
    let handle = block.allocations[ord].map(|i| block.attributes[i].handle_id.clone())?;
    release_where(block, now, |_, o| o == ord);
    Some(handle)
}

fn release_where(
    block: &mut IpamBlockSpec,
    now: u64,
    doomed: impl Fn(&AllocationAttribute, usize) -> bool,
) -> Vec<IpAddr> {
    let mut released = Vec::new();
    for o in 0..block.allocations.len() {
        if let Some(i) = block.allocations[o] {
            if doomed(&block.attributes[i], o) {
                block.allocations[o] = None;
                released.push(nth(&block.cidr, o as u128));
            }
        }
    }
    // Compact attributes to those still referenced.
    let mut remap = vec![None; block.attributes.len()];
    let mut kept = Vec::new();
    for a in block.allocations.iter_mut().flatten() {
        let new = *remap[*a].get_or_insert_with(|| {
            kept.push(block.attributes[*a].clone());
            kept.len() - 1
        });
        *a = new;
    }
    block.attributes = kept;
    if used(block) == 0 && block.empty_since.is_none() {
        block.empty_since = Some(now);
    }
    released
}

/// Number of allocated addresses.
pub fn used(block: &IpamBlockSpec) -> usize {
    block.allocations.iter().filter(|a| a.is_some()).count()
}

/// Whether an empty block has been empty for at least `grace` seconds at `now`.
pub fn releasable(block: &IpamBlockSpec, now: u64, grace: u64) -> bool {
    used(block) == 0
        && block
            .empty_since
            .is_some_and(|t| now.saturating_sub(t) >= grace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(name: &str, cidr: &str, sel: Option<&str>) -> Pool {
        Pool {
            name: name.into(),
            spec: IpPoolSpec {
                cidr: cidr.parse().unwrap(),
                block_size: None,
                encapsulation: None,
                ipip_mode: None,
                vxlan_mode: None,
                nat_outgoing: false,
                disabled: false,
                node_selector: sel.map(str::to_string),
                disable_bgp_export: false,
                allowed_uses: vec![],
                assignment_mode: None,
            },
        }
    }

    #[test]
    fn pools_by_selector_and_request() {
        let pools = vec![
            pool("a", "10.0.0.0/16", Some("zone == 'a'")),
            pool("b", "10.1.0.0/16", None),
            pool("v6", "fd00::/48", None),
        ];
        let labels: BTreeMap<String, String> = [("zone".to_string(), "b".to_string())].into();
        let got = eligible_pools(&pools, "n1", &labels, &[], true).unwrap();
        assert_eq!(
            got.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            vec!["b"]
        );
        let got = eligible_pools(&pools, "n1", &labels, &["10.0.0.0/16".into()], true).unwrap();
        assert_eq!(got[0].name, "a");
        assert!(matches!(
            eligible_pools(&pools, "n1", &labels, &["zz".into()], true),
            Err(ClusterIpamError::UnknownPool(_))
        ));
        assert_eq!(
            eligible_pools(&pools, "n1", &labels, &[], false).unwrap()[0].name,
            "v6"
        );
    }

    #[test]
    fn blocks_claimed_in_order_skipping_claimed_and_reserved() {
        let p = pool("a", "10.0.0.0/24", None).spec;
        let claimed: HashSet<IpNet> = ["10.0.0.0/26".parse().unwrap()].into();
        let reserved = vec!["10.0.0.64/26".parse().unwrap()];
        assert_eq!(
            next_unclaimed_block(&p, &claimed, &reserved),
            Some("10.0.0.128/26".parse().unwrap())
        );
        let all: HashSet<IpNet> = p.cidr.subnets(26).unwrap().collect();
        assert_eq!(next_unclaimed_block(&p, &all, &[]), None);
    }

    #[test]
    fn allocate_release_and_emptiness() {
        let mut b = new_block("10.0.0.0/30".parse().unwrap(), "n1");
        let sec = BTreeMap::new();
        let res = vec![("r".to_string(), vec!["10.0.0.1/32".parse().unwrap()])];
        let a = allocate_in_block(&mut b, "h1", &sec, &res).unwrap();
        let c = allocate_in_block(&mut b, "h2", &sec, &res).unwrap();
        assert_eq!(
            (a.to_string().as_str(), c.to_string().as_str()),
            ("10.0.0.0", "10.0.0.2")
        );
        assert!(matches!(
            allocate_specific(&mut b, c, "h3", &sec),
            Err(ClusterIpamError::InUse { .. })
        ));
        allocate_specific(&mut b, c, "h2", &sec).unwrap();
        assert_eq!(held_by(&b, "h2"), vec![c]);
        assert_eq!(release_handle(&mut b, "h1", 100), vec![a]);
        assert_eq!(b.attributes.len(), 1, "attributes compacted");
        assert_eq!(release_ip(&mut b, c, 200), Some("h2".into()));
        assert_eq!(used(&b), 0);
        assert_eq!(b.empty_since, Some(200));
        assert!(!releasable(&b, 250, 100));
        assert!(releasable(&b, 300, 100));
        assert_eq!(block_node(&b), Some("n1"));
        assert_eq!(block_name(&b.cidr), "10-0-0-0-30");
    }

    proptest! {
        /// Any interleaving of allocations and releases keeps allocations unique and attributes
        /// consistent.
        #[test]
        fn allocations_stay_unique(ops in proptest::collection::vec((0u8..6, any::<bool>()), 1..80)) {
            let mut b = new_block("10.9.0.0/28".parse().unwrap(), "n");
            for (h, alloc) in ops {
                let handle = format!("h{h}");
                if alloc {
                    let _ = allocate_in_block(&mut b, &handle, &BTreeMap::new(), &[]);
                } else {
                    release_handle(&mut b, &handle, 1);
                }
                let ips: Vec<_> = allocations(&b).into_iter().map(|(ip, _)| ip).collect();
                let uniq: HashSet<_> = ips.iter().collect();
                prop_assert_eq!(ips.len(), uniq.len());
                prop_assert!(b.allocations.iter().flatten().all(|i| *i < b.attributes.len()));
            }
        }
    }
}
