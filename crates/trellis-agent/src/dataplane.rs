//! The agent's dataplane loop: from the agent's view of the cluster (nodes, blocks, pools, and
//! endpoints' floating addresses; see [`crate::view`]) to the kernel, every few seconds — so drift (a route deleted by hand) is
//! repaired, from the last view even while the datastore is unreachable — and again when the
//! view changes what a pass reads. Pure decisions come from [`trellis_routing`]; this module does the I/O: the VTEP
//! (`vxlan.trellis`, its tunnel address from IPAM, published on the Node), routes, neighbours,
//! FDB entries, and natOutgoing and floating-address DNAT in Trellis's own nftables tables
//! (`ip trellis`, `ip6 trellis`; built by [`crate::nat`]).
//! A restart converges to the same state without removing anything first, so routes do not flap.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::Value;
use sha2::{Digest, Sha256};
use trellis_cluster::ipam::Request;
use trellis_cluster::view::ClusterView;
use trellis_dataplane::netlink::VxlanSpec;
use trellis_dataplane::{ethtool, routing, sysctl, Netlink};
use trellis_ipam::cluster as alloc;
use trellis_resources::{Encapsulation, IpPoolSpec};
use trellis_routing::{
    desired_with, foreign_conflicts, merge_ops, plan, HostRoute, LearnedPlanner, LocalNode, Op,
    PoolRouting, RemoteNode,
};

use crate::{update_node, Agent, AgentError};

/// The VTEP's name (Calico: `vxlan.calico`).
pub const VTEP: &str = "vxlan.trellis";
/// Bytes VXLAN adds (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// nftables tables owned by the agent (`ip trellis` and `ip6 trellis`).
pub const NAT_TABLE: &str = "trellis";

/// VXLAN settings (VNI 4096 / port 4789 like Calico; 1 / 8472 to mimic Flannel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    pub port: u16,
    /// Explicit MTU for the VTEP (and pods); otherwise the uplink's minus 50.
    pub mtu: Option<u32>,
    /// Transmit checksum offload on the VTEP (see [`crate::offload`]).
    pub checksum_offload: crate::offload::ChecksumOffload,
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
    /// The kernel changes among `problems` that failed (route, neighbour, FDB, sysctl, NAT):
    /// the pass did not converge. The rest stem from cluster state no retry here can clear.
    pub failures: Vec<String>,
    /// The VTEP's ifindex, when a pool needs one (its neighbour changes wake the loop).
    pub vtep: Option<u32>,
}

/// Wakes `notify` on every kernel change that concerns Trellis: links, routes, and neighbour or
/// FDB entries of the VTEP whose ifindex `vtep` holds (0: none) — a dedicated thread, as the
/// subscription socket blocks. Ends quietly if the subscription fails; the resync timer remains.
fn watch_kernel(notify: Arc<tokio::sync::Notify>, vtep: Arc<std::sync::atomic::AtomicU32>) {
    std::thread::spawn(move || {
        let mut events = match trellis_dataplane::events::KernelEvents::subscribe() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to kernel events; relying on the periodic resync");
                return;
            }
        };
        while let Ok(batch) = events.wait() {
            let vtep = Some(vtep.load(Ordering::Relaxed)).filter(|i| *i != 0);
            if batch.iter().any(|e| e.concerns_trellis(vtep)) {
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
    /// Pods' addresses outside their node's blocks (floating addresses; addresses given
    /// without IPAM inside a pool), routed to their nodes.
    hosts: Vec<HostRoute>,
    /// This node's floating addresses and their pods'.
    floating: crate::nat::Floating,
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
        let blocks: Vec<(IpNet, String)> = view
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
        let (hosts, floating) = host_routes(view, node, &blocks);
        ViewInputs {
            pools,
            remotes,
            blocks,
            tunnel,
            published,
            hosts,
            floating,
        }
    }
}

/// The pods' addresses that no block routes — each endpoint's floating addresses, and its
/// addresses (given without IPAM) that are in a pool but in no block — and this node's
/// floating mappings. Looked up per prefix length of the blocks, not per block: this is read
/// on every endpoint change.
pub(crate) fn host_routes(
    view: &ClusterView,
    node: &str,
    blocks: &[(IpNet, String)],
) -> (Vec<HostRoute>, crate::nat::Floating) {
    let cidrs: BTreeSet<IpNet> = blocks.iter().map(|(c, _)| *c).collect();
    let lengths: BTreeSet<u8> = cidrs.iter().map(|c| c.prefix_len()).collect();
    let in_block = |ip: IpAddr| {
        lengths.iter().any(|l| {
            IpNet::new(ip, *l)
                .map(|n| cidrs.contains(&n.trunc()))
                .unwrap_or(false)
        })
    };
    let pools: Vec<IpNet> = view.pools().map(|p| p.spec.cidr).collect();
    let mut hosts = Vec::new();
    let mut floating = crate::nat::Floating::default();
    for w in view.endpoints() {
        for n in &w.spec.ip_nats {
            hosts.push(HostRoute {
                dst: IpNet::from(n.external_ip),
                node: w.spec.node.clone(),
                via: n.internal_ip,
            });
            floating.reachable.push(IpNet::from(n.external_ip));
            if w.spec.node == node {
                floating.dnat.push(n.clone());
            }
        }
        for a in w.spec.ip_networks.iter().map(|n| n.addr()) {
            if !in_block(a) && pools.iter().any(|p| p.contains(&a)) {
                hosts.push(HostRoute {
                    dst: IpNet::from(a),
                    node: w.spec.node.clone(),
                    via: a,
                });
            }
        }
    }
    hosts.sort();
    floating.dnat.sort();
    floating.reachable.sort();
    (hosts, floating)
}

/// Runs passes forever: every `every` (the kernel may have drifted), soon after any kernel
/// change (so drift is repaired at once), and soon after a view change that alters what a pass
/// reads. Passes use the last view even while the datastore is unreachable. Never runs a pass
/// before the view was first loaded (an empty view would remove every route).
pub async fn run(agent: Arc<Agent>, every: Duration) {
    let kernel = Arc::new(tokio::sync::Notify::new());
    let vtep_index = Arc::new(std::sync::atomic::AtomicU32::new(0));
    watch_kernel(kernel.clone(), vtep_index.clone());
    let mut last_problems = BTreeSet::new();
    let mut nat_applied: Option<String> = None;
    let mut changes = agent.view.subscribe();
    // Endpoints' floating addresses are read too; their changes come with the policy kinds'.
    let mut endpoint_changes = agent.view.subscribe_policy();
    loop {
        agent
            .health
            .beat(crate::LIVENESS_LOOP, std::time::Instant::now());
        let inputs = {
            let view = agent.view.read();
            view.loaded()
                .then(|| ViewInputs::read(&view, &agent.config.node))
        };
        if let Some(inputs) = &inputs {
            tracing::debug!("dataplane pass");
            let result = pass(&agent, inputs, &mut nat_applied).await;
            agent.health.pass(
                std::time::Instant::now(),
                match &result {
                    Ok(r) => Ok(r.failures.clone()),
                    Err(e) => Err(e.to_string()),
                },
            );
            match result {
                Ok(r) => {
                    vtep_index.store(r.vtep.unwrap_or(0), Ordering::Relaxed);
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
        wait_for_work(
            &agent,
            every,
            &kernel,
            [&mut changes, &mut endpoint_changes],
            inputs.as_ref(),
        )
        .await;
    }
}

/// Waits until a pass is due: the resync period passed, the kernel changed, BGP's routes
/// changed, or the view changed what a pass reads (other view changes are absorbed here).
async fn wait_for_work(
    agent: &Agent,
    every: Duration,
    kernel: &tokio::sync::Notify,
    changes: [&mut tokio::sync::watch::Receiver<u64>; 2],
    last: Option<&ViewInputs>,
) {
    let [changes, endpoint_changes] = changes;
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
            Ok(()) = async {
                tokio::select! {
                    r = changes.changed() => r,
                    r = endpoint_changes.changed() => r,
                }
            } => {
                // Let a burst of changes settle into one pass.
                tokio::time::sleep(Duration::from_millis(100)).await;
                changes.borrow_and_update();
                endpoint_changes.borrow_and_update();
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
    /// The kernel changes that failed (also in `problems`).
    failures: Vec<String>,
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
    let mut problems = ipip_problems(&pools).await;
    let vxlan_pools = vxlan_pools(&pools);
    let vtep = if vxlan_pools.is_empty() {
        None
    } else {
        Some(ensure_vtep(agent, &vxlan_pools, inputs).await?)
    };
    let remotes = inputs.remotes.clone();
    let blocks = inputs.blocks.clone();
    let nat = nat_ruleset_with(&pools, &inputs.floating);
    let nat_text = Value::from(nat.clone()).to_string();
    let nat_changed = nat_applied.as_deref() != Some(nat_text.as_str());
    let bgp_active = agent.bgp.active.load(Ordering::Relaxed);
    let input = KernelInput {
        node: agent.config.node.clone(),
        address: agent.address,
        vxlan: agent.vxlan,
        encapsulated: !vxlan_pools.is_empty(),
        vtep: vtep.map(|v| v.0),
        remotes,
        blocks,
        hosts: inputs.hosts.clone(),
        routing: pool_routing(&pools),
        bgp_active,
        bgp_converged: agent.bgp.converged.load(Ordering::Relaxed),
        // Asked for after the previous pass let go of its copy: one table at a time.
        bgp_routes: if bgp_active {
            agent.bgp.learned_routes().await?
        } else {
            Arc::default()
        },
    };
    let k = tokio::task::spawn_blocking(move || kernel_pass(input))
        .await
        .map_err(|e| AgentError::Autodetect(e.to_string()))?
        .map_err(AgentError::Dataplane)?;
    problems.extend(k.problems);
    let mut failures = k.failures;
    agent.bgp.set_igp(k.igp);
    agent
        .pod_mtu
        .store(k.pod_mtu, std::sync::atomic::Ordering::Relaxed);
    if nat_changed {
        let failed = match tokio::task::spawn_blocking(move || apply_nat(&nat)).await {
            Ok(Ok(())) => {
                *nat_applied = Some(nat_text);
                None
            }
            Ok(Err(e)) => Some(format!("natOutgoing: {e}")),
            Err(e) => Some(format!("natOutgoing: {e}")),
        };
        if let Some(f) = failed {
            problems.push(f.clone());
            failures.push(f);
        }
    }
    Ok(PassReport {
        ops: k.ops,
        routes: k.routes,
        problems,
        failures,
        vtep: vtep.map(|v| v.0),
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
    hosts: Vec<HostRoute>,
    routing: Vec<PoolRouting>,
    bgp_active: bool,
    bgp_converged: bool,
    bgp_routes: crate::bgp::LearnedRoutes,
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
        hosts,
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
    let (want, problems) = desired_with(&local, &remotes, &blocks, &routing, &hosts);
    let mut msgs: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    // The learned routes are planned against the speaker's table in place and the kernel's as
    // its dump is read: neither is copied (a full table is 100 000 routes and more). Without
    // BGP the table is empty and every learned route left in the kernel goes.
    let no_routes = Vec::new();
    let table = if bgp_active {
        &bgp_routes[..]
    } else {
        &no_routes[..]
    };
    let mut learned = LearnedPlanner::new(&local, table, &want);
    let (observed, igp) =
        routing::observe_learned_apart(&mut nl, local.vtep_ifindex, uplink, |r| learned.observe(r))
            .map_err(|e| e.to_string())?;
    let learned = learned.finish(&observed.foreign);
    msgs.extend(learned.off_subnet.iter().map(|(dst, nh)| {
        format!(
            "BGP route {dst} via {nh}: the next hop is not on this node's subnet {}",
            local.address.trunc()
        )
    }));
    let conflicts = foreign_conflicts(&want, &observed).into_iter();
    msgs.extend(conflicts.chain(&learned.conflicts).map(|r| {
        format!(
            "route {r} not installed: the kernel already routes {} by a route Trellis does not own, which it never replaces",
            r.dst
        )
    }));
    // Restarting: keep the routes found until the peers have re-sent their tables (the
    // forwarding state preserved across a graceful restart, RFC 4724).
    let keep_routes = bgp_active && !bgp_converged;
    let node_ops = plan(&want, &observed);
    let mut count = 0;
    let ops = merge_ops(&node_ops, &learned)
        .filter(|op| !(keep_routes && matches!(op, Op::DelRoute(_))))
        .inspect(|op| {
            count += 1;
            tracing::debug!(%op, "dataplane");
        });
    let failed = routing::apply(&mut nl, ops);
    let mut failures: Vec<String> = failed.iter().map(|(op, e)| format!("{op}: {e}")).collect();
    if let Err(e) = sysctl::ensure("net/ipv4/ip_forward", "1") {
        failures.push(format!("enabling IPv4 forwarding: {e}"));
    }
    msgs.extend(failures.iter().cloned());
    Ok(KernelPass {
        ops: count,
        routes: want.routes.len() + table.len(),
        problems: msgs,
        failures,
        pod_mtu,
        igp,
    })
}

/// Whether this kernel has ipip, probed once without side effects (see
/// [`trellis_dataplane::features`]); blocking.
fn kernel_has_ipip() -> Result<bool, String> {
    static PROBE: std::sync::OnceLock<Result<bool, String>> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            let mut nl = Netlink::open().map_err(|e| e.to_string())?;
            let found = trellis_dataplane::features::link_kind_available(&mut nl, "ipip")
                .map_err(|e| e.to_string())?;
            tracing::info!(ipip = found, "probed the kernel for ipip");
            Ok(found)
        })
        .clone()
}

/// What to say about pools that ask for IPIP (pure): Trellis does not implement IPIP routes,
/// so their blocks on other nodes are not routed — never a silent fallback — and the message
/// says truthfully whether the kernel would have it.
pub fn ipip_refusals(
    pools: &[(String, IpPoolSpec)],
    kernel_ipip: &Result<bool, String>,
) -> Vec<String> {
    let why = match kernel_ipip {
        Ok(false) => {
            "this kernel has no ipip support (the ipip link kind is not registered)".to_string()
        }
        Ok(true) => {
            "this kernel has ipip, but Trellis does not implement IPIP routes yet".to_string()
        }
        Err(e) => format!(
            "Trellis does not implement IPIP routes yet (probing the kernel for ipip failed: {e})"
        ),
    };
    pools
        .iter()
        .filter(|(_, p)| asks_for_ipip(p))
        .map(|(name, _)| format!(
            "pool {name} asks for IPIP, but {why}: its blocks on other nodes are not routed (use VXLAN or VXLANCrossSubnet)"
        ))
        .collect()
}

fn asks_for_ipip(p: &IpPoolSpec) -> bool {
    matches!(
        p.effective_encapsulation(),
        Encapsulation::Ipip | Encapsulation::IpipCrossSubnet
    )
}

/// The IPIP refusals for `pools`, probing the kernel (once) only when a pool asks for IPIP.
async fn ipip_problems(pools: &[(String, IpPoolSpec)]) -> Vec<String> {
    if !pools.iter().any(|(_, p)| asks_for_ipip(p)) {
        return Vec::new();
    }
    let probe = tokio::task::spawn_blocking(kernel_has_ipip)
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    ipip_refusals(pools, &probe)
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
    let pools: Vec<(String, IpPoolSpec)> = trellis_cluster::objects::pools(&*agent.store)
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
    let tx_checksum = agent.vxlan_offload.enabled;
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
                    && !i.udp_csum
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
        set_offload(tx_checksum)?;
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

/// Puts the VTEP's transmit checksum offload the way the agent decided at start (see
/// [`crate::offload`]), whatever a previous agent or an operator left; only a change is written.
fn set_offload(on: bool) -> Result<(), String> {
    let now = ethtool::tx_checksum(VTEP).map_err(|e| e.to_string())?;
    if now != on {
        ethtool::set_tx_checksum(VTEP, on).map_err(|e| e.to_string())?;
        tracing::info!(
            "{VTEP}: tx checksum offload turned {}",
            if on { "on" } else { "off" }
        );
    }
    Ok(())
}

pub use crate::nat::{apply_nat, nat_ruleset, nat_ruleset_with};

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

    fn pool(name: &str, yaml_spec: &str) -> (String, IpPoolSpec) {
        let doc = format!("apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {yaml_spec}\n");
        match trellis_resources::parse_documents(&doc).unwrap().remove(0) {
            trellis_resources::Resource::IpPool(p) => (name.to_string(), p.spec),
            _ => unreachable!(),
        }
    }

    #[test]
    fn ipip_refusals_tell_the_truth_about_the_kernel() {
        let pools = [
            pool("v", "{cidr: 10.1.0.0/16, encapsulation: VXLAN}"),
            pool("i", "{cidr: 10.2.0.0/16, encapsulation: IPIPCrossSubnet}"),
        ];
        let absent = ipip_refusals(&pools, &Ok(false));
        assert_eq!(absent.len(), 1);
        assert!(
            absent[0].starts_with("pool i ") && absent[0].contains("no ipip support"),
            "{absent:?}"
        );
        let present = ipip_refusals(&pools, &Ok(true));
        assert!(
            present[0].contains("does not implement IPIP") && !present[0].contains("no ipip"),
            "a kernel with ipip is never said to lack it: {present:?}"
        );
        let unknown = ipip_refusals(&pools, &Err("EPERM".into()));
        assert!(
            unknown[0].contains("EPERM") && !unknown[0].contains("no ipip"),
            "{unknown:?}"
        );
        assert!(ipip_refusals(&pools[..1], &Ok(false)).is_empty());
    }

    /// The commands of `family`'s table in a ruleset, as one JSON text per command.
    fn commands_of(ruleset: &[Value], family: &str) -> Vec<String> {
        ruleset
            .iter()
            .filter(|c| c.to_string().contains(&format!("\"family\":\"{family}\"")))
            .map(Value::to_string)
            .collect()
    }

    #[test]
    fn nat_outgoing_covers_ipv6_pools_in_their_own_table() {
        let pools = [
            pool("v4", "{cidr: 10.1.0.0/16, natOutgoing: true}"),
            pool("v6", "{cidr: 'fd00:10::/64', natOutgoing: true}"),
            pool("v6b", "{cidr: 'fd00:20::/64'}"),
        ];
        let r = nat_ruleset(&pools);
        let v6 = commands_of(&r, "ip6");
        let masq = v6
            .iter()
            .find(|c| c.contains("masq_pools") && c.contains("\"set\""))
            .unwrap();
        assert!(
            masq.contains("ipv6_addr") && masq.contains("fd00:10::") && !masq.contains("fd00:20::"),
            "{masq}"
        );
        let all = v6
            .iter()
            .find(|c| c.contains("\"all_pools\"") && c.contains("\"set\""))
            .unwrap();
        assert!(
            all.contains("fd00:10::") && all.contains("fd00:20::") && !all.contains("10.1.0.0"),
            "{all}"
        );
        let rule = v6.iter().find(|c| c.contains("masquerade")).unwrap();
        assert!(rule.contains("\"protocol\":\"ip6\""), "{rule}");
        let v4 = commands_of(&r, "ip");
        assert!(
            v4.iter().any(|c| c.contains("masquerade")) && !v4.iter().any(|c| c.contains("fd00"))
        );
        // No natOutgoing pool of a family: its table is only removed (add + delete).
        let only4 = nat_ruleset(&pools[..1]);
        let v6 = commands_of(&only4, "ip6");
        assert_eq!(v6.len(), 2, "{v6:?}");
        assert!(v6[1].contains("delete"));
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
