//! The agent's dataplane loop: from the agent's view of the cluster (nodes, blocks, pools; see
//! [`crate::view`]) to the kernel, every few seconds — so drift (a route deleted by hand) is
//! repaired, from the last view even while the datastore is unreachable — and again when the
//! view changes what a pass reads. Pure decisions come from [`trellis_routing`]; this module does the I/O: the VTEP
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
use trellis_cluster::view::ClusterView;
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

/// What a pass reads from the agent's view of the cluster. A view change that leaves this
/// equal (a heartbeat, a pod's address in a remote block) needs no pass.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewInputs {
    pools: Vec<(String, IpPoolSpec)>,
    remotes: Vec<RemoteNode>,
    /// (block, affine node).
    blocks: Vec<(IpNet, String)>,
    /// This node's VTEP address as IPAM records it (held by its tunnel handle), if allocated.
    tunnel: Option<Ipv4Addr>,
    /// The VTEP address and MAC this node's Node object publishes.
    published: (Option<IpAddr>, Option<String>),
}

/// The IPAM request for this node's VTEP address.
fn tunnel_request(node: &str, vxlan_pools: &[String]) -> Request {
    Request {
        network: "trellis-tunnel".into(),
        container_id: node.to_string(),
        ifname: "vxlan".into(),
        ipv4_pools: vxlan_pools.to_vec(),
        no_endpoint: true,
        ..Default::default()
    }
}

impl ViewInputs {
    /// Reads the pass's inputs for `node` from the view.
    pub fn read(view: &ClusterView, node: &str) -> ViewInputs {
        let pools: Vec<(String, IpPoolSpec)> = view
            .pools()
            .map(|p| (p.metadata.name.clone(), p.spec.clone()))
            .collect();
        let remotes = view
            .nodes()
            .filter(|n| n.metadata.name != node)
            .filter_map(|n| {
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
        let blocks = view
            .blocks()
            .filter_map(|b| alloc::block_node(&b.spec).map(|n| (b.spec.cidr, n.to_string())))
            .collect();
        let handle = tunnel_request(node, &[]).handle();
        let tunnel = view
            .blocks()
            .flat_map(|b| alloc::held_by(&b.spec, &handle))
            .find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            });
        let published = view
            .nodes()
            .find(|n| n.metadata.name == node)
            .map(|n| {
                (
                    n.spec.ipv4_vxlan_tunnel_addr,
                    n.spec.vxlan_tunnel_mac_addr.clone(),
                )
            })
            .unwrap_or_default();
        ViewInputs {
            pools,
            remotes,
            blocks,
            tunnel,
            published,
        }
    }
}

/// Runs passes forever: every `every` (the kernel may have drifted), soon after any kernel
/// change (so drift is repaired at once), and soon after a view change that alters what a pass
/// reads. Passes use the last view even while the datastore is unreachable. Never runs a pass
/// before the view was first loaded (an empty view would remove every route).
pub async fn run(agent: Arc<Agent>, every: Duration) {
    let kernel = Arc::new(tokio::sync::Notify::new());
    watch_kernel(kernel.clone());
    let mut last_problems = BTreeSet::new();
    let mut nat_applied: Option<String> = None;
    let mut changes = agent.view.subscribe();
    loop {
        let inputs = {
            let view = agent.view.read();
            view.loaded()
                .then(|| ViewInputs::read(&view, &agent.config.node))
        };
        if let Some(inputs) = &inputs {
            tracing::debug!("dataplane pass");
            match pass(&agent, inputs, &mut nat_applied).await {
                Ok(r) => {
                    let passes = agent.dataplane_passes.fetch_add(1, Ordering::Relaxed) + 1;
                    if r.ops > 0 {
                        tracing::info!(changes = r.ops, "dataplane converged");
                    }
                    if passes == 1 {
                        // Tests and operators wait for this after a (re)start.
                        tracing::info!(passes, changes = r.ops, "dataplane pass complete");
                    } else {
                        tracing::debug!(passes, changes = r.ops, "dataplane pass complete");
                    }
                    if r.ops >= 1000 || r.routes >= 10_000 {
                        // A pass over a big table leaves large transient buffers (route dumps,
                        // sets, plans) freed inside malloc's arenas; hand them back to the system.
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
        }
        wait_for_work(&agent, every, &kernel, &mut changes, inputs.as_ref()).await;
    }
}

/// Waits until a pass is due: the resync period passed, the kernel changed, BGP's routes
/// changed, or the view changed what a pass reads (other view changes are absorbed here).
async fn wait_for_work(
    agent: &Agent,
    every: Duration,
    kernel: &tokio::sync::Notify,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    last: Option<&ViewInputs>,
) {
    let tick = tokio::time::sleep(every);
    tokio::pin!(tick);
    loop {
        tokio::select! {
            _ = &mut tick => return,
            _ = kernel.notified() => {
                // Coalesce the burst our own changes (or a script's) produce.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            _ = agent.bgp.kick.notified() => return,
            Ok(()) = changes.changed() => {
                // Let a burst of changes settle into one pass.
                tokio::time::sleep(Duration::from_millis(100)).await;
                changes.borrow_and_update();
                let view = agent.view.read();
                if !view.loaded() {
                    continue;
                }
                if last != Some(&ViewInputs::read(&view, &agent.config.node)) {
                    return;
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

/// One reconciliation pass over `inputs` (read from the view): reads and writes the datastore
/// only when this node's VTEP address or its publication is missing from them.
pub async fn pass(
    agent: &Agent,
    inputs: &ViewInputs,
    nat_applied: &mut Option<String>,
) -> Result<PassReport, AgentError> {
    let pools = inputs.pools.clone();
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
    let vxlan_pools: Vec<String> = pools
        .iter()
        .filter(|(_, p)| {
            !p.disabled
                && matches!(
                    p.effective_encapsulation(),
                    Encapsulation::Vxlan | Encapsulation::VxlanCrossSubnet
                )
        })
        .map(|(n, _)| n.clone())
        .collect();
    let vtep = if vxlan_pools.is_empty() {
        None
    } else {
        Some(ensure_vtep(agent, &vxlan_pools, inputs).await?)
    };
    let remotes = inputs.remotes.clone();
    let blocks = inputs.blocks.clone();
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
    let links = nl.links().map_err(|e| e.to_string())?;
    let addrs = nl.addresses(None).map_err(|e| e.to_string())?;
    let uplink = addrs
        .iter()
        .find(|(_, a)| a.addr() == address.addr())
        .map(|(i, _)| *i)
        .ok_or("the node address is on no interface")?;
    let uplink_mtu = links
        .iter()
        .find(|l| l.index == uplink)
        .map(|l| l.mtu)
        .unwrap_or(1500);
    // An explicit MTU wins; otherwise leave room for the VXLAN header when a pool needs it.
    let pod_mtu = cfg.mtu.unwrap_or(if encapsulated {
        uplink_mtu.saturating_sub(VXLAN_OVERHEAD)
    } else {
        uplink_mtu
    });
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

/// Makes sure the VTEP exists with the right settings, has its tunnel address, and is published
/// on the Node. Returns (ifindex, tunnel address).
async fn ensure_vtep(
    agent: &Agent,
    vxlan_pools: &[String],
    inputs: &ViewInputs,
) -> Result<(u32, Ipv4Addr), AgentError> {
    let tunnel = match inputs.tunnel {
        Some(t) => t,
        None => {
            let req = tunnel_request(&agent.config.node, vxlan_pools);
            let got = agent.ipam.allocate(&req).await?;
            let Some(IpAddr::V4(tunnel)) = got.first().map(|(ip, _)| *ip) else {
                return Err(AgentError::Dataplane(
                    "no IPv4 tunnel address for the VTEP".into(),
                ));
            };
            tunnel
        }
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
        let addrs = nl.addresses(None).map_err(|e| e.to_string())?;
        let uplink_index = addrs
            .iter()
            .find(|(_, a)| a.addr() == IpAddr::V4(local))
            .map(|(i, _)| *i)
            .ok_or("the node address is on no interface")?;
        let uplink = nl
            .links()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|l| l.index == uplink_index)
            .ok_or("uplink vanished")?;
        let mtu = cfg.mtu.unwrap_or(uplink.mtu.saturating_sub(VXLAN_OVERHEAD));
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
    if inputs.published != (Some(IpAddr::V4(tunnel)), Some(mac_str(&mac))) {
        update_node(&*agent.store, &agent.config.node, |n| {
            n.spec.ipv4_vxlan_tunnel_addr = Some(IpAddr::V4(tunnel));
            n.spec.vxlan_tunnel_mac_addr = Some(mac_str(&mac));
        })
        .await?;
    }
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
pub(crate) mod tests {
    use super::*;
    use trellis_resources::{Metadata, NodeAddress, NodeSpec, NodeStatus, Object, Resource};

    pub(crate) fn node(name: &str, addr: &str, heartbeat: u64) -> Resource {
        Resource::Node(Object {
            metadata: Metadata {
                name: name.into(),
                ..Default::default()
            },
            spec: NodeSpec {
                addresses: vec![NodeAddress {
                    address: addr.into(),
                    kind: None,
                }],
                ..Default::default()
            },
            status: Some(NodeStatus {
                last_heartbeat: Some(heartbeat),
            }),
        })
    }

    pub(crate) fn block(cidr: &str, node: &str, pods: &[&str]) -> Resource {
        let cidr: IpNet = cidr.parse().unwrap();
        let mut spec = alloc::new_block(cidr, node);
        for pod in pods {
            alloc::allocate_in_block(&mut spec, pod, &Default::default(), &[]).unwrap();
        }
        Resource::IpamBlock(Object {
            metadata: Metadata {
                name: alloc::block_name(&cidr),
                ..Default::default()
            },
            spec,
            status: None,
        })
    }

    /// A pass's inputs ignore heartbeats and pods in other nodes' blocks (so neither wakes the
    /// loop) but not a node's address or a block's owner.
    #[test]
    fn pass_inputs_ignore_heartbeats_and_remote_pods() {
        let pool = trellis_resources::parse_documents(
            "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: p\nspec:\n  cidr: 10.1.0.0/16\n",
        )
        .unwrap()
        .remove(0);
        let world = |beat: u64, pods: &[&str], addr: &str, owner: &str| {
            crate::view::view_of(&[
                pool.clone(),
                node("me", "192.0.2.1/24", beat),
                node("other", addr, beat),
                block("10.1.0.0/26", owner, pods),
            ])
        };
        let read = |v: &ClusterView| ViewInputs::read(v, "me");
        let base = read(&world(1, &[], "192.0.2.2/24", "other"));
        assert_eq!(base, read(&world(99, &[], "192.0.2.2/24", "other")));
        assert_eq!(
            base,
            read(&world(1, &["pod-a", "pod-b"], "192.0.2.2/24", "other"))
        );
        assert_ne!(base, read(&world(1, &[], "192.0.2.3/24", "other")));
        assert_ne!(base, read(&world(1, &[], "192.0.2.2/24", "me")));
        // This node's tunnel address comes from the view once IPAM holds it.
        assert_eq!(base.tunnel, None);
        let handle = tunnel_request("me", &[]).handle();
        let with_tunnel = read(&world(1, &[handle.as_str()], "192.0.2.2/24", "me"));
        assert_eq!(with_tunnel.tunnel, Some(Ipv4Addr::new(10, 1, 0, 0)));
    }

    #[test]
    fn vtep_mac_is_stable_local_unicast() {
        let m = vtep_mac("node1");
        assert_eq!(m, vtep_mac("node1"));
        assert_ne!(m, vtep_mac("node2"));
        assert_eq!(m[0] & 0b11, 0b10, "locally administered, unicast");
        assert_eq!(parse_mac(&mac_str(&m)), Some(m));
    }
}
