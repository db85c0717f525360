//! What this node's speaker should do, computed from the datastore's resources the way Calico's
//! confd computes BIRD's configuration: its AS and router ID, whether it reflects routes, the
//! peers (node-to-node mesh, global / node-specific / selector BGPPeers, symmetric peerSelector
//! peerings) with their session options and compiled BGPFilters, and the prefixes it
//! originates. Pure.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use trellis_bgp::policy::{PrefixMatch, PrefixOp, Rule};
use trellis_bgp::{LimitAction, NextHopMode, PrefixLimit};
use trellis_resources::validate::{parse_community, parse_peer_ip, parse_seconds, reachable_by};
use trellis_resources::{
    BgpConfigurationSpec, BgpFilterRule, BgpFilterSpec, BgpPassword, BgpPeerSpec, BindMode,
    FilterAction, IpPoolSpec, MatchOperator, NodeSpec, Object, PrefixLimitAction, Selector,
    SourceAddress,
};

/// Calico's default AS.
pub const DEFAULT_ASN: u32 = 64512;
pub const DEFAULT_PORT: u16 = 179;
pub const DEFAULT_RESTART_TIME: u16 = 120;

/// How a peering came about (shown by `trellis bgp status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerKind {
    Mesh,
    Global,
    NodeSpecific,
}

impl PeerKind {
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Mesh => "node-to-node mesh",
            PeerKind::Global => "global",
            PeerKind::NodeSpecific => "node specific",
        }
    }
}

/// One configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub address: IpAddr,
    pub port: u16,
    pub asn: u32,
    pub kind: PeerKind,
    /// Another Trellis node (its router ID is its address).
    pub node: Option<String>,
    pub rr_client: bool,
    pub options: SessionOptions,
    /// Gateway of a host route to the peer (`reachableBy`), installed with the learned routes.
    pub reachable_by: Option<IpAddr>,
}

/// What a BGPPeer sets on its sessions (the defaults for mesh peerings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOptions {
    /// TCP MD5 key (RFC 2385).
    pub password: Option<String>,
    /// The next hop sent for learned routes (`nextHopMode`, `keepOriginalNextHop`).
    pub next_hop: NextHopMode,
    /// Graceful restart time we offer (RFC 4724).
    pub restart_time: u16,
    /// Bind outgoing connections to the node's address (`sourceAddress: UseNodeIP`).
    pub bind_source: bool,
    /// Occurrences of our AS accepted in a path from this peer (`numAllowedLocalASNumbers`).
    pub allow_local_as: usize,
    /// GTSM (RFC 5082) with the peer at most this many hops away (`ttlSecurity`).
    pub ttl_security: Option<u8>,
    /// The peer's BGPFilters, compiled (import, export).
    pub filters: (Vec<Rule>, Vec<Rule>),
    /// The most prefixes held for the peer (`maxPrefixes`), if limited.
    pub max_prefixes: Option<PrefixLimit>,
}

impl SessionOptions {
    /// From a BGPPeer, or without one the defaults with `restart_time` (the mesh's).
    fn new(
        p: Option<&BgpPeerSpec>,
        restart_time: u16,
        filters: &[Object<BgpFilterSpec>],
    ) -> SessionOptions {
        let Some(p) = p else {
            return SessionOptions {
                password: None,
                next_hop: NextHopMode::Auto,
                restart_time,
                bind_source: true,
                allow_local_as: 0,
                ttl_security: None,
                filters: (Vec::new(), Vec::new()),
                max_prefixes: None,
            };
        };
        SessionOptions {
            filters: compile_filters(&p.filters, filters),
            password: match &p.password {
                Some(BgpPassword::Inline(s)) => Some(s.clone()),
                _ => None, // secretKeyRef is refused on write
            },
            next_hop: match (p.next_hop_mode, p.keep_original_next_hop) {
                (Some(m), _) => next_hop_mode(m),
                (None, true) => NextHopMode::Keep,
                (None, false) => NextHopMode::Auto,
            },
            restart_time: p
                .max_restart_time
                .as_deref()
                .and_then(|t| parse_seconds(t).ok())
                .map_or(DEFAULT_RESTART_TIME, |t| t as u16),
            bind_source: p.source_address != Some(SourceAddress::None),
            allow_local_as: p.num_allowed_local_as_numbers.map_or(0, |n| n as usize),
            // Validated on write to 0-254; 0 (Calico's default) means off.
            ttl_security: p
                .ttl_security
                .and_then(|h| u8::try_from(h).ok())
                .filter(|h| (1..=254).contains(h)),
            max_prefixes: p.max_prefixes.map(|m| PrefixLimit {
                limit: m.limit as usize,
                action: match m.action {
                    PrefixLimitAction::Warn => LimitAction::Warn,
                    PrefixLimitAction::Reject => LimitAction::Reject,
                    PrefixLimitAction::Restart => LimitAction::Restart,
                },
            }),
        }
    }
}

fn next_hop_mode(m: trellis_resources::NextHopMode) -> NextHopMode {
    match m {
        trellis_resources::NextHopMode::Auto => NextHopMode::Auto,
        trellis_resources::NextHopMode::NodeSelf => NextHopMode::SetSelf,
        trellis_resources::NextHopMode::Keep => NextHopMode::Keep,
    }
}

/// The TTL settings of a session's socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TtlPolicy {
    /// TTL of sent packets (`None`: the system default).
    pub ttl: Option<u8>,
    /// Received packets with a lower TTL are dropped (`IP_MINTTL`).
    pub min_ttl: Option<u8>,
}

impl SpeakerConfig {
    /// GTSM when configured (TTL 255 out, at least 256 − hops in, RFC 5082 §3); otherwise for
    /// eBGP TTL 1 inside the node's subnet and 255 (multihop) beyond it; iBGP the default.
    pub fn ttl_policy(&self, p: &PeerConfig) -> TtlPolicy {
        if let Some(hops) = p.options.ttl_security {
            return TtlPolicy {
                ttl: Some(255),
                min_ttl: Some((256 - u16::from(hops)) as u8),
            };
        }
        if p.asn == self.asn {
            return TtlPolicy::default();
        }
        TtlPolicy {
            ttl: Some(if self.subnet.contains(&p.address) {
                1
            } else {
                255
            }),
            min_ttl: None,
        }
    }

    /// Host routes to the peers that have a `reachableBy` gateway (peer/32 or /128 → gateway).
    pub fn peer_routes(&self) -> impl Iterator<Item = (IpNet, IpAddr)> + '_ {
        self.peers
            .values()
            .filter_map(|p| Some((IpNet::from(p.address), p.reachable_by?)))
    }
}

/// The speaker's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeakerConfig {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    pub address: IpAddr,
    /// The node's subnet (eBGP peers inside it are directly connected: TTL 1).
    pub subnet: IpNet,
    pub cluster_id: Option<Ipv4Addr>,
    pub port: u16,
    /// Listen on the node's address only (`bindMode: NodeIP`), not on every address.
    pub listen_on_node_ip: bool,
    pub peers: BTreeMap<IpAddr, PeerConfig>,
    /// Prefixes to originate, with their communities.
    pub exports: BTreeMap<IpNet, Vec<u32>>,
    /// What the operator should know about this configuration (logged when it changes).
    pub warnings: Vec<String>,
}

/// The inputs, already read from the datastore.
pub struct Inputs<'a> {
    pub node: &'a str,
    pub nodes: &'a [Object<NodeSpec>],
    pub config: Option<&'a BgpConfigurationSpec>,
    pub peers: &'a [Object<BgpPeerSpec>],
    pub pools: &'a [IpPoolSpec],
    pub filters: &'a [Object<BgpFilterSpec>],
    /// (block, affine node).
    pub blocks: &'a [(IpNet, String)],
    /// Pods' addresses outside their node's blocks (floating addresses, addresses given
    /// without IPAM): this node's are exported as /32s (/128s).
    pub hosts: &'a [trellis_routing::HostRoute],
}

/// A node as BGP sees it.
struct NodeView<'a> {
    name: &'a str,
    labels: &'a BTreeMap<String, String>,
    address: Option<Ipv4Addr>,
    subnet: Option<IpNet>,
    asn: u32,
    cluster_id: Option<Ipv4Addr>,
}

fn view<'a>(n: &'a Object<NodeSpec>, default_asn: u32) -> NodeView<'a> {
    let bgp = n.spec.bgp.as_ref();
    NodeView {
        name: &n.metadata.name,
        labels: &n.metadata.labels,
        address: bgp
            .and_then(|b| b.ipv4_address)
            .and_then(|a| match a.addr() {
                IpAddr::V4(v) => Some(v),
                _ => None,
            }),
        subnet: bgp.and_then(|b| b.ipv4_address).map(|a| a.trunc()),
        asn: bgp.and_then(|b| b.as_number).unwrap_or(default_asn),
        cluster_id: bgp
            .and_then(|b| b.route_reflector_cluster_id.as_deref())
            .and_then(|c| c.parse().ok()),
    }
}

fn matches(sel: &str, labels: &BTreeMap<String, String>) -> bool {
    Selector::parse(sel).is_ok_and(|s| s.matches(labels))
}

/// Does this BGPPeer's node side (node / nodeSelector / global) include `n`?
fn node_side(p: &BgpPeerSpec, n: &NodeView) -> bool {
    match (&p.node, &p.node_selector) {
        (Some(name), _) => name == n.name,
        (None, Some(sel)) => matches(sel, n.labels),
        (None, None) => true,
    }
}

fn kind_of(p: &BgpPeerSpec) -> PeerKind {
    if p.node.is_some() {
        PeerKind::NodeSpecific
    } else {
        PeerKind::Global
    }
}

/// Computes the configuration; `Err` when this node has no IPv4 BGP address yet.
pub fn compute(i: &Inputs) -> Result<SpeakerConfig, String> {
    let cfg = i.config.cloned().unwrap_or_default();
    let default_asn = cfg.as_number.unwrap_or(DEFAULT_ASN);
    let views: Vec<NodeView> = i.nodes.iter().map(|n| view(n, default_asn)).collect();
    let me = views
        .iter()
        .find(|v| v.name == i.node)
        .ok_or_else(|| format!("node {} is not registered", i.node))?;
    let router_id = me
        .address
        .ok_or_else(|| format!("node {} has no IPv4 BGP address", i.node))?;
    let port = cfg.listen_port.unwrap_or(DEFAULT_PORT);
    let mesh_restart = cfg
        .node_mesh_max_restart_time
        .as_deref()
        .and_then(|t| parse_seconds(t).ok())
        .map_or(DEFAULT_RESTART_TIME, |t| t as u16);
    let mut peers = BTreeMap::new();
    let node_peer = |v: &NodeView, kind: PeerKind, p: Option<&BgpPeerSpec>| -> Option<PeerConfig> {
        let a = v.address?;
        Some(PeerConfig {
            address: IpAddr::V4(a),
            port,
            asn: v.asn,
            kind,
            node: Some(v.name.to_string()),
            // RFC 4456: a reflector's peers outside its cluster are its clients.
            rr_client: me.cluster_id.is_some() && v.cluster_id != me.cluster_id,
            options: SessionOptions::new(p, mesh_restart, i.filters),
            reachable_by: None,
        })
    };
    if cfg.node_to_node_mesh_enabled.unwrap_or(true) {
        for v in views.iter().filter(|v| v.name != i.node) {
            if let Some(pc) = node_peer(v, PeerKind::Mesh, None) {
                peers.insert(pc.address, pc);
            }
        }
    }
    for o in i.peers {
        let p = &o.spec;
        if let Some(ip) = &p.peer_ip {
            let (Ok((address, port_override)), Some(asn)) = (parse_peer_ip(ip), p.as_number) else {
                continue; // validated on write; a bad stored object is skipped
            };
            if node_side(p, me) && address != IpAddr::V4(router_id) {
                peers.insert(
                    address,
                    PeerConfig {
                        address,
                        port: port_override.unwrap_or(port),
                        asn,
                        kind: kind_of(p),
                        node: None,
                        rr_client: false,
                        options: SessionOptions::new(Some(p), DEFAULT_RESTART_TIME, i.filters),
                        // Validated on write; a bad stored value is ignored.
                        reachable_by: p
                            .reachable_by
                            .as_deref()
                            .and_then(|gw| reachable_by(address, gw).ok()),
                    },
                );
            }
        } else if let Some(sel) = &p.peer_selector {
            // Symmetric, as in Calico: node side peers with the selected nodes and back.
            let selected = |v: &NodeView| matches(sel, v.labels);
            for v in views.iter().filter(|v| v.name != i.node) {
                let wanted = (node_side(p, me) && selected(v)) || (selected(me) && node_side(p, v));
                if wanted {
                    if let Some(pc) = node_peer(v, kind_of(p), Some(p)) {
                        peers.insert(pc.address, pc);
                    }
                }
            }
        }
    }
    Ok(SpeakerConfig {
        asn: me.asn,
        router_id,
        address: IpAddr::V4(router_id),
        subnet: me.subnet.unwrap_or(IpNet::from(IpAddr::V4(router_id))),
        cluster_id: me.cluster_id,
        port,
        listen_on_node_ip: cfg.bind_mode == Some(BindMode::NodeIp),
        peers,
        exports: exports(i, &cfg),
        warnings: missing_filters(i.peers, i.filters)
            .into_iter()
            .map(|(peer, filter)| {
                format!("BGPPeer {peer} names BGPFilter {filter}, which does not exist: it rejects every route until it does")
            })
            .collect(),
    })
}

/// The rules of the named BGPFilters, in order: (import, export). A filter that does not exist
/// rejects every route it would have judged (fail closed), so a typo never opens a peering up.
fn compile_filters(names: &[String], filters: &[Object<BgpFilterSpec>]) -> (Vec<Rule>, Vec<Rule>) {
    let reject_all = |ipv6| Rule {
        ipv6,
        prefix: None,
        learned_only: false,
        accept: false,
    };
    let (mut import, mut export) = (Vec::new(), Vec::new());
    for name in names {
        let Some(f) = filters.iter().find(|f| &f.metadata.name == name) else {
            for out in [&mut import, &mut export] {
                out.extend([reject_all(false), reject_all(true)]);
            }
            continue;
        };
        let s = &f.spec;
        import.extend(s.import_v4.iter().map(|r| rule(r, false)));
        import.extend(s.import_v6.iter().map(|r| rule(r, true)));
        export.extend(s.export_v4.iter().map(|r| rule(r, false)));
        export.extend(s.export_v6.iter().map(|r| rule(r, true)));
    }
    (import, export)
}

/// (BGPPeer, BGPFilter) names where the filter does not exist.
fn missing_filters<'a>(
    peers: &'a [Object<BgpPeerSpec>],
    filters: &[Object<BgpFilterSpec>],
) -> Vec<(&'a str, &'a str)> {
    peers
        .iter()
        .flat_map(|p| {
            p.spec
                .filters
                .iter()
                .map(move |f| (p.metadata.name.as_str(), f.as_str()))
        })
        .filter(|(_, f)| !filters.iter().any(|x| x.metadata.name == *f))
        .collect()
}

fn rule(r: &BgpFilterRule, ipv6: bool) -> Rule {
    Rule {
        ipv6,
        prefix: r.cidr.zip(r.match_operator).map(|(cidr, op)| {
            let m = PrefixMatch::new(
                cidr,
                match op {
                    MatchOperator::Equal => PrefixOp::Equal,
                    MatchOperator::NotEqual => PrefixOp::NotEqual,
                    MatchOperator::In => PrefixOp::In,
                    MatchOperator::NotIn => PrefixOp::NotIn,
                },
            );
            let pl = r.prefix_length.unwrap_or_default();
            PrefixMatch {
                lengths: (pl.min.unwrap_or(m.lengths.0), pl.max.unwrap_or(m.lengths.1)),
                ..m
            }
        }),
        learned_only: r.source.is_some(),
        accept: r.action == FilterAction::Accept,
    }
}

/// This node's blocks and its pods' addresses outside them (unless their pool has
/// disableBGPExport) and the service ranges, each with the communities its
/// prefixAdvertisements give it.
fn exports(i: &Inputs, cfg: &BgpConfigurationSpec) -> BTreeMap<IpNet, Vec<u32>> {
    let mut out = BTreeMap::new();
    let exported = |a: IpAddr| {
        let pool = i.pools.iter().find(|p| p.cidr.contains(&a));
        pool.is_some_and(|p| !p.disable_bgp_export)
    };
    for (block, node) in i.blocks {
        if node == i.node && exported(block.network()) {
            out.insert(*block, Vec::new());
        }
    }
    for h in i.hosts {
        // A floating address is exported as its pod's address is: by the pod's pool.
        if h.node == i.node && exported(h.via) {
            out.insert(h.dst, Vec::new());
        }
    }
    let services = cfg
        .service_cluster_ips
        .iter()
        .chain(&cfg.service_external_ips)
        .chain(&cfg.service_load_balancer_ips);
    for c in services {
        out.insert(c.cidr, Vec::new());
    }
    for (prefix, comms) in out.iter_mut() {
        for adv in &cfg.prefix_advertisements {
            if !adv.cidr.contains(prefix) {
                continue;
            }
            for c in &adv.communities {
                let named = cfg
                    .communities
                    .iter()
                    .find(|n| &n.name == c)
                    .map(|n| &n.value);
                if let Ok(v) = parse_community(named.unwrap_or(c)) {
                    if !comms.contains(&v) {
                        comms.push(v);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
