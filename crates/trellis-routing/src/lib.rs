//! Cross-node routing, pure. From cluster state (this node, the other nodes, who owns which
//! block, each pool's encapsulation) [`desired`] computes what the kernel should hold — a
//! blackhole route per local block, `BLOCK via NODE dev UPLINK` for direct pools,
//! `BLOCK via VTEP dev vxlan.trellis onlink` plus a permanent neighbour and an FDB entry per
//! remote VTEP for VXLAN, either by subnet for CrossSubnet — and [`plan`] diffs it against what
//! the kernel reports into an ordered list of [`Op`]s that a netlink shell applies; routes
//! learned by BGP are planned by [`LearnedPlanner`] against the speaker's table in place. Routes
//! are marked with [`TRELLIS_PROTO`] so only Trellis's own are ever removed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use trellis_resources::Encapsulation;

mod learned;
pub use learned::{merge_ops, LearnedPlan, LearnedPlanner};

/// The routing protocol number on every route Trellis installs (`proto 231`).
pub const TRELLIS_PROTO: u8 = 231;

/// A route as planned: plain data, comparable with what the kernel reports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub dst: IpNet,
    pub kind: RouteKind,
    /// Route priority: 0 for Trellis's own routes, [`BGP_METRIC`] for BGP-learned ones.
    pub metric: u32,
}

/// The metric of BGP-learned routes (BIRD's default): a route the node already has to the same
/// destination, such as its own default route, stays preferred and is never replaced.
pub const BGP_METRIC: u32 = 32;

/// How a route forwards.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    /// `blackhole DST`: a local block's addresses not (yet) used by a pod.
    Blackhole,
    /// `DST via GW dev IFINDEX [onlink]`.
    Via {
        gateway: IpAddr,
        ifindex: u32,
        onlink: bool,
    },
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.metric != 0 {
            write!(f, "[metric {}] ", self.metric)?;
        }
        match &self.kind {
            RouteKind::Blackhole => write!(f, "blackhole {}", self.dst),
            RouteKind::Via {
                gateway,
                ifindex,
                onlink,
            } => {
                write!(
                    f,
                    "{} via {gateway} dev #{ifindex}{}",
                    self.dst,
                    if *onlink { " onlink" } else { "" }
                )
            }
        }
    }
}

/// A permanent neighbour entry on the VTEP (remote VTEP IP → its MAC).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// A VXLAN forwarding entry on the VTEP (remote VTEP MAC → the remote node's underlay address).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fdb {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub dst: IpAddr,
}

/// This node as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    pub name: String,
    /// Underlay address with its prefix (the node's subnet).
    pub address: IpNet,
    pub uplink_ifindex: u32,
    /// The local VTEP's ifindex, when a VXLAN pool needs it.
    pub vtep_ifindex: Option<u32>,
    /// BGP runs: it owns routes to nodes reached without encapsulation (pools with
    /// encapsulation None and the same-subnet part of CrossSubnet), as in Calico's bird backend.
    pub bgp: bool,
}

/// Another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    pub name: String,
    pub address: IpAddr,
    pub vtep_ip: Option<IpAddr>,
    pub vtep_mac: Option<[u8; 6]>,
}

/// A pool's routing-relevant settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRouting {
    pub cidr: IpNet,
    pub encapsulation: Encapsulation,
}

/// What the kernel should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: BTreeSet<Route>,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<Fdb>,
}

/// Why a block could not be routed (reported, not fatal: the rest is still programmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    UnknownNode {
        block: IpNet,
        node: String,
    },
    NoPool {
        block: IpNet,
    },
    NotAdjacent {
        block: IpNet,
        node: String,
        address: IpAddr,
    },
    NoVtep {
        block: IpNet,
        node: String,
    },
    NoLocalVtep {
        block: IpNet,
    },
    IpipUnsupported {
        block: IpNet,
    },
    /// Another node (first by name) already publishes this VTEP address or MAC: a stale or
    /// hostile Node record. The kernel holds one neighbour per address, so planning both made
    /// every pass flip it, each flip a kernel event that woke the next pass.
    VtepTaken {
        block: IpNet,
        node: String,
        by: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::UnknownNode { block, node } => write!(f, "block {block} belongs to unknown node {node}"),
            Problem::NoPool { block } => write!(f, "block {block} is in no pool"),
            Problem::NotAdjacent { block, node, address } => {
                write!(f, "block {block}: node {node} ({address}) is not in this node's subnet; direct routing needs L2 adjacency (use VXLANCrossSubnet or BGP)")
            }
            Problem::NoVtep { block, node } => write!(f, "block {block}: node {node} has not published its VTEP yet"),
            Problem::NoLocalVtep { block } => write!(f, "block {block} needs VXLAN but this node has no VTEP"),
            Problem::IpipUnsupported { block } => write!(f, "block {block}: IPIP pools are refused on this node (no ipip support in the kernel)"),
            Problem::VtepTaken { block, node, by } => write!(f, "block {block}: node {node} publishes the VTEP address or MAC of node {by}; not routed"),
        }
    }
}

/// Which node each VTEP address and MAC belongs to: the first by name that publishes it.
#[derive(Default)]
struct VtepClaims<'a> {
    ips: BTreeMap<IpAddr, &'a str>,
    macs: BTreeMap<[u8; 6], &'a str>,
}

impl<'a> VtepClaims<'a> {
    fn of(remotes: &'a [RemoteNode]) -> VtepClaims<'a> {
        let mut by_name: Vec<&RemoteNode> = remotes.iter().collect();
        by_name.sort_by(|a, b| a.name.cmp(&b.name));
        let mut claims = VtepClaims::default();
        for r in by_name {
            if let (Some(ip), Some(mac)) = (r.vtep_ip, r.vtep_mac) {
                claims.ips.entry(ip).or_insert(&r.name);
                claims.macs.entry(mac).or_insert(&r.name);
            }
        }
        claims
    }

    /// The node that holds `remote`'s VTEP address or MAC, if not `remote` itself.
    fn taken(&self, remote: &RemoteNode, ip: IpAddr, mac: [u8; 6]) -> Option<&'a str> {
        [self.ips.get(&ip), self.macs.get(&mac)]
            .into_iter()
            .flatten()
            .copied()
            .find(|owner| *owner != remote.name)
    }
}

fn vxlan(
    local: &LocalNode,
    block: IpNet,
    remote: &RemoteNode,
    claims: &VtepClaims<'_>,
    out: &mut Desired,
) -> Result<(), Problem> {
    let vtep = local.vtep_ifindex.ok_or(Problem::NoLocalVtep { block })?;
    let (Some(ip), Some(mac)) = (remote.vtep_ip, remote.vtep_mac) else {
        return Err(Problem::NoVtep {
            block,
            node: remote.name.clone(),
        });
    };
    if let Some(by) = claims.taken(remote, ip, mac) {
        return Err(Problem::VtepTaken {
            block,
            node: remote.name.clone(),
            by: by.to_string(),
        });
    }
    out.neighbours.insert(Neighbour {
        ifindex: vtep,
        ip,
        mac,
    });
    out.fdb.insert(Fdb {
        ifindex: vtep,
        mac,
        dst: remote.address,
    });
    out.routes.insert(Route {
        dst: block,
        metric: 0,
        kind: RouteKind::Via {
            gateway: ip,
            ifindex: vtep,
            onlink: true,
        },
    });
    Ok(())
}

fn direct(
    local: &LocalNode,
    block: IpNet,
    remote: &RemoteNode,
    out: &mut Desired,
) -> Result<(), Problem> {
    if !local.address.contains(&remote.address) {
        return Err(Problem::NotAdjacent {
            block,
            node: remote.name.clone(),
            address: remote.address,
        });
    }
    out.routes.insert(Route {
        dst: block,
        metric: 0,
        kind: RouteKind::Via {
            gateway: remote.address,
            ifindex: local.uplink_ifindex,
            onlink: false,
        },
    });
    Ok(())
}

/// A pod address outside its node's blocks that every other node routes to that node like a
/// block: a floating address (`ipNATs`), or an address given without IPAM. `via` is the pod's
/// own address, whose pool says how the node is reached.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostRoute {
    pub dst: IpNet,
    pub node: String,
    pub via: IpAddr,
}

/// What the kernel should hold, and the blocks that could not be routed.
pub fn desired(
    local: &LocalNode,
    remotes: &[RemoteNode],
    blocks: &[(IpNet, String)],
    pools: &[PoolRouting],
) -> (Desired, Vec<Problem>) {
    desired_with(local, remotes, blocks, pools, &[])
}

/// [`desired`], with `hosts` routed to their nodes too (this node's own are reached by the
/// pod's host route or its DNAT, and get no route here).
pub fn desired_with(
    local: &LocalNode,
    remotes: &[RemoteNode],
    blocks: &[(IpNet, String)],
    pools: &[PoolRouting],
    hosts: &[HostRoute],
) -> (Desired, Vec<Problem>) {
    let mut out = Desired::default();
    let mut problems = Vec::new();
    let by_name: BTreeMap<&str, &RemoteNode> =
        remotes.iter().map(|r| (r.name.as_str(), r)).collect();
    let claims = VtepClaims::of(remotes);
    let ctx = Context {
        local,
        by_name: &by_name,
        claims: &claims,
    };
    for (block, node) in blocks {
        let block = *block;
        if *node == local.name {
            out.routes.insert(Route {
                dst: block,
                metric: 0,
                kind: RouteKind::Blackhole,
            });
            continue;
        }
        let pool = pools.iter().find(|p| p.cidr.contains(&block.network()));
        if let Err(p) = ctx.route(block, pool, node, &mut out) {
            problems.push(p);
        }
    }
    for h in hosts.iter().filter(|h| h.node != local.name) {
        let pool = pools.iter().find(|p| p.cidr.contains(&h.via));
        if let Err(p) = ctx.route(h.dst, pool, &h.node, &mut out) {
            problems.push(p);
        }
    }
    (out, problems)
}

/// What routing one destination to a remote node reads.
struct Context<'a> {
    local: &'a LocalNode,
    by_name: &'a BTreeMap<&'a str, &'a RemoteNode>,
    claims: &'a VtepClaims<'a>,
}

impl Context<'_> {
    /// Routes `dst` to `node` as `pool`'s encapsulation says.
    fn route(
        &self,
        dst: IpNet,
        pool: Option<&PoolRouting>,
        node: &str,
        out: &mut Desired,
    ) -> Result<(), Problem> {
        let local = self.local;
        let block = dst;
        let pool = pool.ok_or(Problem::NoPool { block })?;
        let remote = self.by_name.get(node).ok_or_else(|| Problem::UnknownNode {
            block,
            node: node.to_string(),
        })?;
        let same_subnet = local.address.contains(&remote.address);
        let bgp_owns = local.bgp
            && match pool.encapsulation {
                Encapsulation::None => true,
                Encapsulation::VxlanCrossSubnet => same_subnet,
                _ => false,
            };
        match pool.encapsulation {
            _ if bgp_owns => Ok(()),
            Encapsulation::None => direct(local, block, remote, out),
            Encapsulation::Vxlan => vxlan(local, block, remote, self.claims, out),
            Encapsulation::VxlanCrossSubnet if same_subnet => direct(local, block, remote, out),
            Encapsulation::VxlanCrossSubnet => vxlan(local, block, remote, self.claims, out),
            Encapsulation::Ipip | Encapsulation::IpipCrossSubnet => {
                Err(Problem::IpipUnsupported { block })
            }
        }
    }
}

/// What the kernel has of Trellis's: routes with [`TRELLIS_PROTO`], entries on the VTEP; and
/// where the main table already routes by a route Trellis does not own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Trellis's routes except those at [`BGP_METRIC`] (which go to a [`LearnedPlanner`]).
    pub routes: BTreeSet<Route>,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<Fdb>,
    /// (destination, metric) of the main table's routes of other protocols: a pod's host route
    /// (`POD/32 dev cali…`, the same destination as a /32 block), the node's subnet, an
    /// operator's static route. `ip route replace` replaces the route of the same destination
    /// and metric whatever its protocol, so Trellis never plans a route into one of these.
    pub foreign: BTreeSet<(IpNet, u32)>,
}

/// The routes of `desired` that [`plan`] leaves out because a route Trellis does not own holds
/// their destination and metric ([`Observed::foreign`]), for reporting. A local block's
/// blackhole is not among them: it only catches what nothing else routes, so yielding to
/// another route to the same destination is what it is for.
pub fn foreign_conflicts<'a>(desired: &'a Desired, observed: &Observed) -> Vec<&'a Route> {
    desired
        .routes
        .iter()
        .filter(|r| r.kind != RouteKind::Blackhole && observed.foreign.contains(&(r.dst, r.metric)))
        .collect()
}

/// One kernel change.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    SetFdb(Fdb),
    SetNeighbour(Neighbour),
    /// Add or replace (`ip route replace`): a changed next hop never leaves a gap.
    ReplaceRoute(Route),
    DelRoute(Route),
    DelNeighbour(Neighbour),
    DelFdb(Fdb),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mac = |m: &[u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        match self {
            Op::SetFdb(e) => write!(
                f,
                "fdb append {} dst {} dev #{}",
                mac(&e.mac),
                e.dst,
                e.ifindex
            ),
            Op::SetNeighbour(n) => write!(
                f,
                "neigh replace {} lladdr {} dev #{}",
                n.ip,
                mac(&n.mac),
                n.ifindex
            ),
            Op::ReplaceRoute(r) => write!(f, "route replace {r}"),
            Op::DelRoute(r) => write!(f, "route del {r}"),
            Op::DelNeighbour(n) => write!(f, "neigh del {} dev #{}", n.ip, n.ifindex),
            Op::DelFdb(e) => write!(
                f,
                "fdb del {} dst {} dev #{}",
                mac(&e.mac),
                e.dst,
                e.ifindex
            ),
        }
    }
}

/// The changes that turn `observed` into `desired`, in a safe order: forwarding entries before
/// the routes that use them, stale routes removed before the entries they used. A route whose
/// destination stays but whose next hop changes is replaced in place (no flap); a route whose
/// destination and metric a foreign route holds is left out (see [`Observed::foreign`]); a
/// resync with nothing to do yields no ops.
pub fn plan(desired: &Desired, observed: &Observed) -> Vec<Op> {
    let mut ops = Vec::new();
    ops.extend(
        desired
            .fdb
            .difference(&observed.fdb)
            .cloned()
            .map(Op::SetFdb),
    );
    ops.extend(
        desired
            .neighbours
            .difference(&observed.neighbours)
            .cloned()
            .map(Op::SetNeighbour),
    );
    ops.extend(
        desired
            .routes
            .difference(&observed.routes)
            .filter(|r| !observed.foreign.contains(&(r.dst, r.metric)))
            .cloned()
            .map(Op::ReplaceRoute),
    );
    // A route is replaced in place when only its next hop changes (same destination and metric).
    let wanted_dsts: BTreeSet<(IpNet, u32)> =
        desired.routes.iter().map(|r| (r.dst, r.metric)).collect();
    ops.extend(
        observed
            .routes
            .difference(&desired.routes)
            .filter(|r| !wanted_dsts.contains(&(r.dst, r.metric))) // replaced above
            .cloned()
            .map(Op::DelRoute),
    );
    let wanted_neigh: BTreeSet<(u32, IpAddr)> = desired
        .neighbours
        .iter()
        .map(|n| (n.ifindex, n.ip))
        .collect();
    ops.extend(
        observed
            .neighbours
            .difference(&desired.neighbours)
            .filter(|n| !wanted_neigh.contains(&(n.ifindex, n.ip)))
            .cloned()
            .map(Op::DelNeighbour),
    );
    ops.extend(
        observed
            .fdb
            .difference(&desired.fdb)
            .cloned()
            .map(Op::DelFdb),
    );
    ops
}

#[cfg(test)]
mod tests;
