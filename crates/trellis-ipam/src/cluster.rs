//! Cluster IPAM decisions, pure: pools carved into blocks (`blockSize`, /26 by default) that are
//! claimed with affinity to a node; addresses allocated inside blocks to handles (one handle per
//! attachment: network, container, interface). The shell reads blocks from the datastore, calls
//! these functions, and writes the result back with compare-and-swap.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha256};
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
    #[error("ips (CNI_ARGS IP, runtimeConfig.ips, args.cni.ips): {} IPv{family} addresses requested ({}); at most one address per family is allowed", ips.len(), ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    TooManyRequested { family: u8, ips: Vec<IpAddr> },
    #[error("node {node} has no podCIDR yet (--use-pod-cidr makes the Kubernetes Node's spec.podCIDRs, mirrored by the kube-controller, the node's blocks)")]
    NoPodCidr { node: String },
    #[error("podCIDR {pod_cidr} of node {node} cannot be a block: /{} is outside /{}-/{}", pod_cidr.prefix_len(), trellis_resources::validate::block_prefix_range(pod_cidr.addr().is_ipv4()).start(), trellis_resources::validate::block_prefix_range(pod_cidr.addr().is_ipv4()).end())]
    PodCidrNotBlock { node: String, pod_cidr: IpNet },
    #[error(
        "podCIDR {pod_cidr} of node {node} is not inside any enabled IPPool serving it ({pools})"
    )]
    PodCidrOutsidePools {
        node: String,
        pod_cidr: IpNet,
        pools: String,
    },
    #[error("podCIDR {pod_cidr} of node {node} overlaps block {block} ({})", owner.as_deref().map_or("affine to no node".to_string(), |o| format!("affine to node {o}")))]
    PodCidrOverlaps {
        node: String,
        pod_cidr: IpNet,
        block: IpNet,
        owner: Option<String>,
    },
    #[error("no free address in podCIDR {pod_cidr} of node {node} (--use-pod-cidr: no other block is claimed or borrowed)")]
    PodCidrExhausted { node: String, pod_cidr: IpNet },
    #[error("address {ip}: its block {block} would overlap block {existing}, which is of another size (left by a pool with another blockSize); release that block's addresses first")]
    BlockOverlaps {
        ip: IpAddr,
        block: IpNet,
        existing: IpNet,
    },
}

/// The datastore name of a block: its CIDR with `.`/`:`/`/` turned into `-`.
pub fn block_name(cidr: &IpNet) -> String {
    cidr.to_string().replace(['.', ':', '/'], "-")
}

/// The CIDR a block's datastore name stands for: the inverse of [`block_name`] (`None` when
/// `name` is not a name [`block_name`] gives), so that a record at a block's key that does not
/// decode still claims its range.
pub fn block_cidr_of_name(name: &str) -> Option<IpNet> {
    let (addr, prefix) = name.rsplit_once('-')?;
    let prefix: u8 = prefix.parse().ok()?;
    let ip: IpAddr = match addr.replace('-', ".").parse() {
        Ok(v4) => v4,
        Err(_) => addr.replace('-', ":").parse().ok()?,
    };
    let cidr = IpNet::new(ip, prefix).ok()?;
    (cidr == cidr.trunc() && block_name(&cidr) == name).then_some(cidr)
}

/// Whether two CIDRs share an address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The name of a node's affinity to a block.
pub fn affinity_name(node: &str, cidr: &IpNet) -> String {
    format!("{node}-{}", block_name(cidr))
}

/// Longest datastore name segment (Kubernetes' limit for object names).
const MAX_NAME: usize = 253;

/// Joins `parts` into one datastore name, injectively: letters, digits and `-` stay as they
/// are, every other byte becomes `_XX` (two upper-case hex digits; `.` is `_2E`), and the parts
/// are joined with `.`, so an encoded part never contains the separator and two different lists
/// of parts never give the same name. Typical names (`k8s-pod-network`, hex container IDs,
/// `eth0`) come out unchanged, so the name stays readable. A result longer than 253 characters
/// or not starting with a letter or digit is replaced by `PREFIX.SHA256` (the first part's
/// encoding, at most 64 characters, or `h`; then 64 hex digits of SHA-256 of the full
/// encoding). That form has exactly one `.`; the plain form of three or more parts has at least
/// two, so the forms cannot collide. (Two parts would give one `.`: a second part spelling a
/// digest could then equal a hashed name, so every caller passes three.)
///
/// The plain form is not disjoint from the legacy names (parts joined unescaped): today's name
/// of container `a.b` is `…a_2Eb…`, the legacy name of container `a_2Eb`. Whoever finds a
/// record under such a name must check whose it is (see `trellis-cluster`'s `lookup_handle`).
pub fn attachment_name(parts: &[&str]) -> String {
    let enc: Vec<String> = parts.iter().map(|p| escape_part(p)).collect();
    let joined = enc.join(".");
    if joined.len() <= MAX_NAME && joined.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return joined;
    }
    let digest = Sha256::digest(joined.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let first = enc.first().map(String::as_str).unwrap_or("");
    let prefix: String = if first.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        first.chars().take(64).collect()
    } else {
        "h".into()
    };
    format!("{prefix}.{hex}")
}

fn escape_part(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

/// The handle of one attachment: [`attachment_name`] of network, container ID and interface.
/// (Calico's is `NETWORK.CONTAINERID`; the interface makes a second attachment of one container
/// its own handle.)
pub fn handle_id(network: &str, container_id: &str, ifname: &str) -> String {
    attachment_name(&[network, container_id, ifname])
}

/// The handle written by Trellis before [`handle_id`]: the parts joined with `.` unescaped,
/// which is ambiguous when a part contains a dot (network `k8s.v2`, container `c` and network
/// `k8s`, container `v2.c` share it). Read only to release records written by that version,
/// after proving from the record that it is the attachment's (see `trellis-cluster`).
pub fn legacy_handle_id(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{network}.{container_id}.{ifname}")
}

/// Calico's rule: at most one requested address per family.
pub fn one_per_family(ips: &[IpAddr]) -> Result<(), ClusterIpamError> {
    for (v4, family) in [(true, 4), (false, 6)] {
        let of: Vec<IpAddr> = ips.iter().copied().filter(|i| i.is_ipv4() == v4).collect();
        if of.len() > 1 {
            return Err(ClusterIpamError::TooManyRequested { family, ips: of });
        }
    }
    Ok(())
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

/// The first block of `pool` that overlaps no claimed block, in address order, skipping blocks
/// wholly inside a reservation. A claimed block of another size (left by a pool deleted and
/// created again with another `blockSize`) claims every block of this size it overlaps: the
/// datastore key of a block names its CIDR, so a compare-and-swap on the new block's key alone
/// would not see it.
pub fn next_unclaimed_block(
    pool: &IpPoolSpec,
    claimed: &HashSet<IpNet>,
    reserved: &[IpNet],
) -> Option<IpNet> {
    let prefix = pool.block_prefix();
    let other_sizes: Vec<&IpNet> = claimed
        .iter()
        .filter(|c| c.prefix_len() != prefix)
        .collect();
    let subnets = pool.cidr.subnets(prefix).ok()?;
    subnets.into_iter().find(|b| {
        !claimed.contains(b)
            && !other_sizes.iter().any(|c| overlaps(c, b))
            && !reserved.iter().any(|r| r.contains(b))
    })
}

/// `--use-pod-cidr`: the pool that node `node`'s podCIDR `pod_cidr` (its block) lies in, among
/// the `pools` eligible for it, given the `claimed` block CIDRs and the node each is affine to.
/// Refused: a podCIDR that cannot be a block (prefix outside the `blockSize` range), one outside
/// every pool, or one overlapping a block other than its own (same CIDR, affine to `node`).
pub fn pod_cidr_pool<'a>(
    node: &str,
    pod_cidr: &IpNet,
    pools: &[&'a Pool],
    claimed: &[(IpNet, Option<&str>)],
) -> Result<&'a Pool, ClusterIpamError> {
    if !trellis_resources::validate::block_prefix_range(pod_cidr.addr().is_ipv4())
        .contains(&pod_cidr.prefix_len())
    {
        return Err(ClusterIpamError::PodCidrNotBlock {
            node: node.into(),
            pod_cidr: *pod_cidr,
        });
    }
    let pool = pools
        .iter()
        .find(|p| !p.spec.disabled && p.spec.cidr.contains(pod_cidr))
        .ok_or_else(|| ClusterIpamError::PodCidrOutsidePools {
            node: node.into(),
            pod_cidr: *pod_cidr,
            pools: pools
                .iter()
                .map(|p| format!("{} {}", p.name, p.spec.cidr))
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let own = |c: &IpNet, owner: Option<&str>| c == pod_cidr && owner == Some(node);
    if let Some((block, owner)) = claimed
        .iter()
        .find(|(c, owner)| overlaps(c, pod_cidr) && !own(c, *owner))
    {
        return Err(ClusterIpamError::PodCidrOverlaps {
            node: node.into(),
            pod_cidr: *pod_cidr,
            block: *block,
            owner: owner.map(str::to_string),
        });
    }
    Ok(pool)
}

/// The block to allocate the requested `ip` of `pool` in: the claimed block holding it, whatever
/// its size (`Ok((cidr, true))`), or else the pool's block for it (`Ok((cidr, false))`), which
/// must overlap no claimed block.
pub fn block_for_ip(
    pool: &IpPoolSpec,
    ip: IpAddr,
    claimed: &HashSet<IpNet>,
) -> Result<(IpNet, bool), ClusterIpamError> {
    if let Some(c) = claimed.iter().find(|c| c.contains(&ip)) {
        return Ok((*c, true));
    }
    let block = IpNet::new(ip, pool.block_prefix())
        .map(|n| n.trunc())
        .map_err(|_| ClusterIpamError::OutsidePools { ip })?;
    match claimed.iter().find(|c| overlaps(c, &block)) {
        Some(existing) => Err(ClusterIpamError::BlockOverlaps {
            ip,
            block,
            existing: *existing,
        }),
        None => Ok((block, false)),
    }
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

    /// A pool created again over the blocks of a deleted pool with another block size.
    #[test]
    fn claimed_blocks_of_another_size_claim_what_they_overlap() {
        let p = pool("p2", "10.0.0.0/24", None).spec;
        let p = IpPoolSpec {
            block_size: Some(28),
            ..p
        };
        let old: IpNet = "10.0.0.0/26".parse().unwrap();
        let claimed: HashSet<IpNet> = [old, "10.0.0.64/28".parse().unwrap()].into();
        assert_eq!(
            next_unclaimed_block(&p, &claimed, &[]),
            Some("10.0.0.80/28".parse().unwrap())
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(block_for_ip(&p, ip("10.0.0.9"), &claimed), Ok((old, true)));
        assert_eq!(
            block_for_ip(&p, ip("10.0.0.99"), &claimed),
            Ok(("10.0.0.96/28".parse().unwrap(), false))
        );
        let small: HashSet<IpNet> = ["10.0.0.72/30".parse().unwrap()].into();
        let p26 = IpPoolSpec {
            block_size: Some(26),
            ..p
        };
        assert!(matches!(
            block_for_ip(&p26, ip("10.0.0.70"), &small),
            Err(ClusterIpamError::BlockOverlaps { .. })
        ));
    }

    #[test]
    fn a_pod_cidr_must_be_a_free_block_inside_an_enabled_pool() {
        let p = pool("p", "10.244.0.0/16", None);
        let mut off = pool("off", "10.9.0.0/16", None);
        off.spec.disabled = true;
        let pools = [&off, &p];
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let mine = net("10.244.1.0/24");
        assert_eq!(pod_cidr_pool("n1", &mine, &pools, &[]), Ok(&p));
        // Its own block (affine to it) is no overlap; another node's is, as is an unaffine one.
        assert_eq!(
            pod_cidr_pool("n1", &mine, &pools, &[(mine, Some("n1"))]),
            Ok(&p)
        );
        for (block, owner) in [
            (mine, Some("n2")),
            (net("10.244.1.64/26"), Some("n2")),
            (net("10.244.0.0/20"), None),
        ] {
            assert_eq!(
                pod_cidr_pool("n1", &mine, &pools, &[(block, owner)]),
                Err(ClusterIpamError::PodCidrOverlaps {
                    node: "n1".into(),
                    pod_cidr: mine,
                    block,
                    owner: owner.map(str::to_string),
                })
            );
        }
        for outside in ["10.245.0.0/24", "10.9.1.0/24"] {
            let e = pod_cidr_pool("n1", &net(outside), &pools, &[]).unwrap_err();
            assert!(
                matches!(e, ClusterIpamError::PodCidrOutsidePools { .. }),
                "{e}"
            );
            assert!(e.to_string().contains(outside), "{e}");
        }
        let e = pod_cidr_pool("n1", &net("10.244.0.0/16"), &pools, &[]).unwrap_err();
        assert!(matches!(e, ClusterIpamError::PodCidrNotBlock { .. }), "{e}");
    }

    #[test]
    fn block_names_parse_back() {
        for c in [
            "10.0.0.64/26",
            "fd00::40/122",
            "fd00:1::40/122",
            "fd00:1:2:3::/116",
            "10.1.2.3/32",
        ] {
            let cidr: IpNet = c.parse().unwrap();
            assert_eq!(block_cidr_of_name(&block_name(&cidr)), Some(cidr), "{c}");
        }
        for bad in [
            "10-0-0-0",
            "x-26",
            "10-0-0-1-26",
            "10-0-0-0-33",
            "10-0-0-0-26-old",
            "",
        ] {
            assert_eq!(block_cidr_of_name(bad), None, "{bad}");
        }
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

    #[test]
    fn attachment_names_are_injective_valid_and_bounded() {
        // Dots in a part no longer make two attachments share a handle.
        assert_ne!(
            handle_id("k8s.v2", "c", "eth0"),
            handle_id("k8s", "v2.c", "eth0")
        );
        assert_eq!(
            legacy_handle_id("k8s.v2", "c", "eth0"),
            legacy_handle_id("k8s", "v2.c", "eth0")
        );
        // Typical names are unchanged (and equal to the legacy form).
        assert_eq!(
            handle_id("k8s-pod-network", "0af3", "eth0"),
            "k8s-pod-network.0af3.eth0"
        );
        assert_eq!(handle_id("k8s.v2", "c_1", "eth0"), "k8s_2Ev2.c_5F1.eth0");
        let long = "a".repeat(300);
        let h = handle_id("net", &long, "eth0");
        assert!(
            h.len() <= 253 && h.starts_with("net.") && h.matches('.').count() == 1,
            "{h}"
        );
        assert_ne!(h, handle_id("net", &"a".repeat(301), "eth0"));
        assert!(handle_id("-x", "c", "eth0").starts_with("h."));
    }

    #[test]
    fn one_address_per_family() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(one_per_family(&[ip("10.0.0.1"), ip("fd00::1")]).is_ok());
        let err = one_per_family(&[ip("10.0.0.1"), ip("10.0.0.2")]).unwrap_err();
        assert!(
            err.to_string().starts_with("ips ") && err.to_string().contains("IPv4"),
            "{err}"
        );
    }

    proptest! {
        /// Different attachments never share a name, and every name is a valid datastore name.
        #[test]
        fn attachment_names_never_collide(
            a in proptest::collection::vec("[a-z0-9._-]{0,6}", 3),
            b in proptest::collection::vec("[a-z0-9._-]{0,6}", 3),
        ) {
            let na = attachment_name(&a.iter().map(String::as_str).collect::<Vec<_>>());
            let nb = attachment_name(&b.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert_eq!(na == nb, a == b);
            prop_assert!(na.len() <= 253);
            prop_assert!(na.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
        }

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
