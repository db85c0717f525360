//! The agent's dataplane loop: from the datastore (nodes, blocks, pools) to the kernel, every
//! few seconds — so drift (a route deleted by hand) is repaired — and again on datastore
//! changes. Pure decisions come from [`trellis_routing`]; this module does the I/O: the VTEP
//! (`vxlan.trellis`, its tunnel address from IPAM, published on the Node), routes, neighbours,
//! FDB entries, and natOutgoing in Trellis's own nftables table. A restart converges to the same
//! state without removing anything first, so routes do not flap.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use trellis_cluster::ipam::Request;
use trellis_cluster::objects;
use trellis_dataplane::netlink::VxlanSpec;
use trellis_dataplane::{nft, routing, sysctl, Netlink};
use trellis_ipam::cluster as alloc;
use trellis_resources::{Encapsulation, IpPoolSpec};
use trellis_routing::{add_bgp_routes, desired, plan, LocalNode, Op, PoolRouting, RemoteNode};

use crate::{update_node, Agent, AgentError};

/// The VTEP's name (Calico: `vxlan.calico`).
pub const VTEP: &str = "vxlan.trellis";
/// Bytes VXLAN adds (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// nftables table owned by the agent.
pub const NAT_TABLE: &str = "trellis";

/// VXLAN settings (VNI 4096 / port 4789 like Calico; 1 / 8472 to mimic Flannel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    pub port: u16,
    /// Explicit MTU for the VTEP (and pods); otherwise the uplink's minus 50.
    pub mtu: Option<u32>,
}

/// A stable, locally administered unicast MAC for this node's VTEP (same after a restart).
pub fn vtep_mac(node: &str) -> [u8; 6] {
    let d = Sha256::digest(node.as_bytes());
    [0x66, d[0], d[1], d[2], d[3], d[4]]
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .filter_map(|p| u8::from_str_radix(p, 16).ok())
        .collect();
    (v.len() == 6).then(|| [v[0], v[1], v[2], v[3], v[4], v[5]])
}

/// What the last pass did, for logs and tests.
#[derive(Debug, Default)]
pub struct PassReport {
    pub ops: usize,
    /// Routes Trellis wants in the kernel (the table size the pass handled).
    pub routes: usize,
    pub problems: Vec<String>,
}

/// Wakes `notify` on every kernel link/neighbour/route change (a dedicated thread: the
/// subscription socket blocks). Ends quietly if the subscription fails; the resync timer remains.
fn watch_kernel(notify: Arc<tokio::sync::Notify>) {
    std::thread::spawn(move || {
        let mut events = match trellis_dataplane::events::KernelEvents::subscribe() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to kernel events; relying on the periodic resync");
                return;
            }
        };
        while let Ok(batch) = events.wait() {
            if !batch.is_empty() {
                notify.notify_one();
            }
        }
    });
}

/// Runs passes forever: every `every`, soon after any datastore change, and soon after any
/// kernel change (so drift is repaired at once).
pub async fn run(agent: Arc<Agent>, every: Duration) {
    let kernel = Arc::new(tokio::sync::Notify::new());
    watch_kernel(kernel.clone());
    let mut last_problems = BTreeSet::new();
    let mut nat_applied: Option<String> = None;
    let mut watch = match agent.store.revision().await {
        Ok(rev) => agent.store.watch("/trellis/v1/", rev + 1).await.ok(),
        Err(_) => None,
    };
    loop {
        tracing::debug!("dataplane pass");
        match pass(&agent, &mut nat_applied).await {
            Ok(r) => {
                if r.ops > 0 {
                    tracing::info!(changes = r.ops, "dataplane converged");
                }
                if r.ops >= 1000 || r.routes >= 10_000 {
                    // A pass over a big table leaves large transient buffers (route dumps, sets,
                    // plans) freed inside malloc's arenas; hand them back to the system.
                    crate::release_free_memory();
                }
                let now: BTreeSet<String> = r.problems.into_iter().collect();
                for p in now.difference(&last_problems) {
                    tracing::warn!("{p}");
                }
                last_problems = now;
            }
            Err(e) => tracing::warn!(error = %e, "dataplane pass failed; retrying"),
        }
        let tick = tokio::time::sleep(every);
        match &mut watch {
            Some(w) => {
                tokio::select! {
                    _ = tick => {}
                    _ = kernel.notified() => {
                        // Coalesce the burst our own changes (or a script's) produce.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    _ = agent.bgp.kick.notified() => {}
                    ev = w.next() => if !matches!(ev, Some(Ok(_))) {
                        watch = None; // compacted or closed: fall back to the timer
                    } else {
                        // Let a burst of changes settle into one pass.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    },
                }
            }
            None => {
                tokio::select! {
                    _ = tick => {}
                    _ = kernel.notified() => tokio::time::sleep(Duration::from_millis(100)).await,
                    _ = agent.bgp.kick.notified() => {}
                }
            }
        }
    }
}

fn pool_routing(pools: &[(String, IpPoolSpec)]) -> Vec<PoolRouting> {
    pools
        .iter()
        .map(|(_, p)| PoolRouting {
            cidr: p.cidr,
            encapsulation: p.effective_encapsulation(),
        })
        .collect()
}

/// What the netlink part of a pass did and read.
struct KernelPass {
    ops: usize,
    routes: usize,
    problems: Vec<String>,
    pod_mtu: u32,
    /// The node's gateway routes, for BGP next-hop resolution.
    igp: Vec<(IpNet, IpAddr)>,
}

/// One reconciliation pass.
pub async fn pass(
    agent: &Agent,
    nat_applied: &mut Option<String>,
) -> Result<PassReport, AgentError> {
    let store = &*agent.store;
    let pools: Vec<(String, IpPoolSpec)> = objects::pools(store)
        .await?
        .into_iter()
        .map(|(p, _)| (p.metadata.name, p.spec))
        .collect();
    let mut problems = Vec::new();
    for (name, p) in &pools {
        if matches!(
            p.effective_encapsulation(),
            Encapsulation::Ipip | Encapsulation::IpipCrossSubnet
        ) {
            problems.push(format!(
                "pool {name} asks for IPIP, but this kernel has no ipip support: its blocks on other nodes are not routed (use VXLAN or VXLANCrossSubnet)"
            ));
        }
    }
    let vxlan_pools = vxlan_pools(&pools);
    let vtep = if vxlan_pools.is_empty() {
        None
    } else {
        Some(ensure_vtep(agent, &vxlan_pools).await?)
    };
    let nodes = objects::nodes(store).await?;
    let remotes: Vec<RemoteNode> = nodes
        .iter()
        .filter(|(n, _)| n.metadata.name != agent.config.node)
        .filter_map(|(n, _)| {
            let a = n
                .spec
                .addresses
                .first()?
                .address
                .split('/')
                .next()?
                .parse()
                .ok()?;
            Some(RemoteNode {
                name: n.metadata.name.clone(),
                address: a,
                vtep_ip: n.spec.ipv4_vxlan_tunnel_addr,
                vtep_mac: n.spec.vxlan_tunnel_mac_addr.as_deref().and_then(parse_mac),
            })
        })
        .collect();
    let blocks: Vec<(IpNet, String)> = objects::blocks(store)
        .await?
        .into_iter()
        .filter_map(|(b, _)| alloc::block_node(&b.spec).map(|n| (b.spec.cidr, n.to_string())))
        .collect();
    let nat = nat_ruleset(&pools);
    let nat_changed = nat_applied.as_deref() != Some(nat.to_string().as_str());
    let input = KernelInput {
        node: agent.config.node.clone(),
        address: agent.address,
        vxlan: agent.vxlan,
        encapsulated: !vxlan_pools.is_empty(),
        vtep: vtep.map(|v| v.0),
        remotes,
        blocks,
        routing: pool_routing(&pools),
        bgp_active: agent.bgp.active.load(Ordering::Relaxed),
        bgp_converged: agent.bgp.converged.load(Ordering::Relaxed),
        bgp_routes: agent.bgp.routes.borrow().clone(),
    };
    let k = tokio::task::spawn_blocking(move || kernel_pass(input))
        .await
        .map_err(|e| AgentError::Autodetect(e.to_string()))?
        .map_err(AgentError::Dataplane)?;
    problems.extend(k.problems);
    agent.bgp.set_igp(k.igp);
    agent
        .pod_mtu
        .store(k.pod_mtu, std::sync::atomic::Ordering::Relaxed);
    if nat_changed {
        match apply_nat(&nat) {
            Ok(()) => *nat_applied = Some(nat.to_string()),
            Err(e) => problems.push(format!("natOutgoing: {e}")),
        }
    }
    Ok(PassReport {
        ops: k.ops,
        routes: k.routes,
        problems,
    })
}

/// What the netlink part of a pass works from.
struct KernelInput {
    node: String,
    address: IpNet,
    vxlan: VxlanConfig,
    encapsulated: bool,
    vtep: Option<u32>,
    remotes: Vec<RemoteNode>,
    blocks: Vec<(IpNet, String)>,
    routing: Vec<PoolRouting>,
    bgp_active: bool,
    bgp_converged: bool,
    bgp_routes: Arc<BTreeMap<IpNet, IpAddr>>,
}

/// The netlink part of a pass (blocking; runs on its own thread): plans the node's routes,
/// neighbours and FDB entries against the kernel's and applies the difference.
fn kernel_pass(input: KernelInput) -> Result<KernelPass, String> {
    let KernelInput {
        node,
        address,
        vxlan: cfg,
        encapsulated,
        vtep,
        remotes,
        blocks,
        routing,
        bgp_active,
        bgp_converged,
        bgp_routes,
    } = input;
    let mut nl = Netlink::open().map_err(|e| e.to_string())?;
    let (uplink, uplink_mtu) = uplink(&mut nl, address.addr())?;
    let pod_mtu = pod_mtu(&cfg, uplink_mtu, encapsulated);
    let local = LocalNode {
        name: node,
        address,
        uplink_ifindex: uplink,
        vtep_ifindex: vtep,
        bgp: bgp_active,
    };
    let (mut want, problems) = desired(&local, &remotes, &blocks, &routing);
    let mut msgs: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    if bgp_active {
        msgs.extend(add_bgp_routes(&local, &bgp_routes, &mut want));
    }
    let kernel = nl.routes().map_err(|e| e.to_string())?;
    let igp = routing::gateway_routes(&kernel, uplink);
    let observed =
        routing::observe_with(&mut nl, &kernel, local.vtep_ifindex).map_err(|e| e.to_string())?;
    drop(kernel);
    let mut ops = plan(&want, &observed);
    if bgp_active && !bgp_converged {
        // Restarting: keep the routes found until the peers have re-sent their tables
        // (the forwarding state preserved across a graceful restart, RFC 4724).
        ops.retain(|op| !matches!(op, Op::DelRoute(_)));
    }
    for op in &ops {
        tracing::debug!(%op, "dataplane");
    }
    let failed = routing::apply(&mut nl, &ops);
    msgs.extend(failed.iter().map(|(op, e)| format!("{op}: {e}")));
    if let Err(e) = sysctl::ensure("net/ipv4/ip_forward", "1") {
        msgs.push(format!("enabling IPv4 forwarding: {e}"));
    }
    Ok(KernelPass {
        ops: ops.len(),
        routes: want.routes.len(),
        problems: msgs,
        pod_mtu,
        igp,
    })
}

/// The enabled pools whose traffic between nodes is VXLAN-encapsulated (always or across
/// subnets).
fn vxlan_pools(pools: &[(String, IpPoolSpec)]) -> Vec<String> {
    pools
        .iter()
        .filter(|(_, p)| {
            !p.disabled
                && matches!(
                    p.effective_encapsulation(),
                    Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet
                )
        })
        .map(|(n, _)| n.clone())
        .collect()
}

/// The MTU pods get: the configured one, else the uplink's, less the VXLAN overhead when a pool
/// encapsulates (a pod's packet must fit the VTEP, whose MTU is the same).
pub fn pod_mtu(cfg: &VxlanConfig, uplink_mtu: u32, encapsulated: bool) -> u32 {
    cfg.mtu.unwrap_or(if encapsulated {
        uplink_mtu.saturating_sub(VXLAN_OVERHEAD)
    } else {
        uplink_mtu
    })
}

/// The uplink — the interface holding the node address — as (ifindex, MTU).
fn uplink(nl: &mut Netlink, address: IpAddr) -> Result<(u32, u32), String> {
    let index = nl
        .addresses(None)
        .map_err(|e| e.to_string())?
        .iter()
        .find(|(_, a)| a.addr() == address)
        .map(|(i, _)| *i)
        .ok_or_else(|| format!("the node address {address} is on no interface"))?;
    let mtu = nl
        .links()
        .map_err(|e| e.to_string())?
        .iter()
        .find(|l| l.index == index)
        .map(|l| l.mtu)
        .ok_or_else(|| format!("the uplink (ifindex {index}) vanished"))?;
    Ok((index, mtu))
}

/// The pod MTU, measured now if no pass has yet (an ADD can arrive before the first pass ends):
/// reads the pools and the uplink's MTU, and remembers the answer for the next ADD.
pub async fn current_pod_mtu(agent: &Agent) -> Result<u32, AgentError> {
    let known = agent.pod_mtu.load(Ordering::Relaxed);
    if known != 0 {
        return Ok(known);
    }
    let pools: Vec<(String, IpPoolSpec)> = objects::pools(&*agent.store)
        .await?
        .into_iter()
        .map(|(p, _)| (p.metadata.name, p.spec))
        .collect();
    let encapsulated = !vxlan_pools(&pools).is_empty();
    let (address, cfg) = (agent.address.addr(), agent.vxlan);
    let mtu = tokio::task::spawn_blocking(move || -> Result<u32, String> {
        let mut nl = Netlink::open().map_err(|e| e.to_string())?;
        let (_, uplink_mtu) = uplink(&mut nl, address)?;
        Ok(pod_mtu(&cfg, uplink_mtu, encapsulated))
    })
    .await
    .map_err(|e| AgentError::Dataplane(e.to_string()))?
    .map_err(AgentError::Dataplane)?;
    // A pass may have measured meanwhile; either answer is from the same inputs.
    let _ = agent
        .pod_mtu
        .compare_exchange(0, mtu, Ordering::Relaxed, Ordering::Relaxed);
    Ok(mtu)
}

/// Makes sure the VTEP exists with the right settings, has its tunnel address, and is published
/// on the Node. Returns (ifindex, tunnel address).
async fn ensure_vtep(agent: &Agent, vxlan_pools: &[String]) -> Result<(u32, Ipv4Addr), AgentError> {
    let req = Request {
        network: "trellis-tunnel".into(),
        container_id: agent.config.node.clone(),
        ifname: "vxlan".into(),
        ipv4_pools: vxlan_pools.to_vec(),
        no_endpoint: true,
        ..Default::default()
    };
    let got = agent.ipam.allocate(&req).await?;
    let Some(IpAddr::V4(tunnel)) = got.first().map(|(ip, _)| *ip) else {
        return Err(AgentError::Dataplane(
            "no IPv4 tunnel address for the VTEP".into(),
        ));
    };
    let mac = vtep_mac(&agent.config.node);
    let (local, cfg) = (agent.address.addr(), agent.vxlan);
    let IpAddr::V4(local) = local else {
        return Err(AgentError::Dataplane(
            "VXLAN needs an IPv4 node address".into(),
        ));
    };
    let ifindex = tokio::task::spawn_blocking(move || -> Result<u32, String> {
        let mut nl = Netlink::open().map_err(|e| e.to_string())?;
        let (uplink_index, uplink_mtu) = uplink(&mut nl, IpAddr::V4(local))?;
        let mtu = pod_mtu(&cfg, uplink_mtu, true);
        let current = nl.link(VTEP).map_err(|e| e.to_string())?;
        let info = nl.vxlan_info(VTEP).map_err(|e| e.to_string())?;
        let fits = match (&current, &info) {
            (Some(l), Some(i)) => {
                i.vni == cfg.vni
                    && i.port == cfg.port
                    && i.local == Some(local)
                    && l.mac == Some(mac)
                    && l.mtu == mtu
            }
            _ => false,
        };
        if current.is_some() && !fits {
            tracing::info!("recreating {VTEP}: its settings changed");
            nl.delete_link(VTEP).map_err(|e| e.to_string())?;
        }
        if !fits {
            nl.create_vxlan(&VxlanSpec {
                name: VTEP.into(),
                vni: cfg.vni,
                port: cfg.port,
                local,
                uplink: uplink_index,
                mac,
                mtu: Some(mtu),
            })
            .map_err(|e| e.to_string())?;
        }
        let vtep = nl
            .link(VTEP)
            .map_err(|e| e.to_string())?
            .ok_or("VTEP vanished")?;
        if !vtep.up {
            nl.set_up(vtep.index).map_err(|e| e.to_string())?;
        }
        routing::disable_tx_checksum(VTEP).map_err(|e| e.to_string())?;
        let want = IpNet::new(IpAddr::V4(tunnel), 32).expect("/32");
        if !nl
            .addresses(Some(vtep.index))
            .map_err(|e| e.to_string())?
            .iter()
            .any(|(_, a)| *a == want)
        {
            nl.add_address(vtep.index, want, false)
                .map_err(|e| e.to_string())?;
        }
        Ok(vtep.index)
    })
    .await
    .map_err(|e| AgentError::Dataplane(e.to_string()))?
    .map_err(AgentError::Dataplane)?;
    update_node(&*agent.store, &agent.config.node, |n| {
        n.spec.ipv4_vxlan_tunnel_addr = Some(IpAddr::V4(tunnel));
        n.spec.vxlan_tunnel_mac_addr = Some(mac_str(&mac));
    })
    .await?;
    Ok((ifindex, tunnel))
}

/// The natOutgoing table: traffic from a natOutgoing pool to anywhere outside every pool is
/// masqueraded; pod-to-pod traffic (any pool to any pool) never is. `None` when no pool wants it.
pub fn nat_ruleset(pools: &[(String, IpPoolSpec)]) -> Value {
    let v4: Vec<&IpPoolSpec> = pools
        .iter()
        .map(|(_, p)| p)
        .filter(|p| p.cidr.addr().is_ipv4())
        .collect();
    let masq: Vec<&&IpPoolSpec> = v4
        .iter()
        .filter(|p| p.nat_outgoing && !p.disabled)
        .collect();
    if masq.is_empty() {
        return Value::Null;
    }
    let elem = |p: &IpPoolSpec| json!({"prefix": {"addr": p.cidr.network().to_string(), "len": p.cidr.prefix_len()}});
    let set = |name: &str, elems: Vec<Value>| json!({"add": {"set": {"family": "ip", "table": NAT_TABLE, "name": name, "type": "ipv4_addr", "flags": ["interval"], "elem": elems}}});
    json!([
        {"add": {"table": {"family": "ip", "name": NAT_TABLE}}},
        {"delete": {"table": {"family": "ip", "name": NAT_TABLE}}},
        {"add": {"table": {"family": "ip", "name": NAT_TABLE}}},
        set("all_pools", v4.iter().map(|p| elem(p)).collect()),
        set("masq_pools", masq.iter().map(|p| elem(p)).collect()),
        {"add": {"chain": {"family": "ip", "table": NAT_TABLE, "name": "postrouting", "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}},
        {"add": {"rule": {"family": "ip", "table": NAT_TABLE, "chain": "postrouting", "comment": "trellis natOutgoing",
            "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@masq_pools"}},
                {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@all_pools"}},
                {"masquerade": null}
            ]}}}
    ])
}

/// Applies the ruleset in one atomic batch (the table is replaced whole), or removes the table.
fn apply_nat(ruleset: &Value) -> Result<(), String> {
    match ruleset {
        Value::Array(cmds) => nft::apply(cmds.clone()).map_err(|e| e.to_string()),
        _ => match nft::list_table("ip", NAT_TABLE).map_err(|e| e.to_string())? {
            Some(_) => nft::apply(vec![
                json!({"delete": {"table": {"family": "ip", "name": NAT_TABLE}}}),
            ])
            .map_err(|e| e.to_string()),
            None => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_mac_is_stable_local_unicast() {
        let m = vtep_mac("node1");
        assert_eq!(m, vtep_mac("node1"));
        assert_ne!(m, vtep_mac("node2"));
        assert_eq!(m[0] & 0b11, 0b10, "locally administered, unicast");
        assert_eq!(parse_mac(&mac_str(&m)), Some(m));
    }
}
