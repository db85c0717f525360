use super::*;
use trellis_resources::{parse_documents, Resource};

/// Nodes, the BGP configuration, peers, pools and filters parsed from YAML.
#[derive(Default)]
struct Parsed {
    nodes: Vec<Object<NodeSpec>>,
    cfg: Option<BgpConfigurationSpec>,
    peers: Vec<Object<BgpPeerSpec>>,
    pools: Vec<IpPoolSpec>,
    filters: Vec<Object<BgpFilterSpec>>,
}

fn objects(yaml: &str) -> Parsed {
    let mut o = Parsed::default();
    for r in parse_documents(yaml).unwrap() {
        match r {
            Resource::Node(n) => o.nodes.push(n),
            Resource::BgpConfiguration(c) => o.cfg = Some(c.spec),
            Resource::BgpPeer(p) => o.peers.push(p),
            Resource::IpPool(p) => o.pools.push(p.spec),
            Resource::BgpFilter(f) => o.filters.push(f),
            _ => unreachable!(),
        }
    }
    o
}

const NODES: &str = "
kind: Node
apiVersion: trellis.dev/v1
metadata: {name: n1, labels: {rack: a}}
spec: {bgp: {ipv4Address: 192.0.2.11/24}}
---
kind: Node
apiVersion: trellis.dev/v1
metadata: {name: n2, labels: {rack: a}}
spec: {bgp: {ipv4Address: 192.0.2.12/24}}
---
kind: Node
apiVersion: trellis.dev/v1
metadata: {name: rr, labels: {rack: b, route-reflector: 'true'}}
spec: {bgp: {ipv4Address: 192.0.2.13/24, routeReflectorClusterID: 224.0.0.1}}
---
kind: IPPool
apiVersion: trellis.dev/v1
metadata: {name: pods}
spec: {cidr: 10.10.0.0/16, encapsulation: None}
---
kind: IPPool
apiVersion: trellis.dev/v1
metadata: {name: hidden}
spec: {cidr: 10.20.0.0/16, encapsulation: None, disableBGPExport: true}
";

fn compute_for(node: &str, extra: &str) -> SpeakerConfig {
    let o = objects(&format!("{NODES}{extra}"));
    let blocks = vec![
        ("10.10.1.0/26".parse().unwrap(), "n1".to_string()),
        ("10.20.1.0/26".parse().unwrap(), "n1".to_string()),
        ("10.10.2.0/26".parse().unwrap(), "n2".to_string()),
    ];
    compute(&Inputs {
        node,
        nodes: &o.nodes,
        config: o.cfg.as_ref(),
        peers: &o.peers,
        pools: &o.pools,
        blocks: &blocks,
        filters: &o.filters,
        hosts: &[
            trellis_routing::HostRoute {
                dst: "203.0.113.9/32".parse().unwrap(),
                node: "n1".into(),
                via: "10.10.1.5".parse().unwrap(),
            },
            trellis_routing::HostRoute {
                dst: "203.0.113.10/32".parse().unwrap(),
                node: "n1".into(),
                via: "10.20.1.5".parse().unwrap(),
            },
            trellis_routing::HostRoute {
                dst: "203.0.113.11/32".parse().unwrap(),
                node: "n2".into(),
                via: "10.10.2.5".parse().unwrap(),
            },
        ],
    })
    .unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn default_is_a_full_mesh_exporting_own_blocks() {
    let c = compute_for("n1", "");
    assert_eq!(c.asn, 64512);
    assert_eq!(c.router_id, "192.0.2.11".parse::<Ipv4Addr>().unwrap());
    assert_eq!(
        c.peers.keys().copied().collect::<Vec<_>>(),
        vec![ip("192.0.2.12"), ip("192.0.2.13")]
    );
    assert!(c
        .peers
        .values()
        .all(|p| p.kind == PeerKind::Mesh && !p.rr_client));
    // The disableBGPExport pool's block and other nodes' blocks are not exported.
    // Its own block and its pod's floating address (not the one of a pod in a
    // disableBGPExport pool, nor another node's).
    assert_eq!(
        c.exports.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
        vec!["10.10.1.0/26", "203.0.113.9/32"]
    );
    // The reflector sees the mesh nodes as its clients.
    let rr = compute_for("rr", "");
    assert!(rr.peers.values().all(|p| p.rr_client));
    assert_eq!(rr.cluster_id, Some("224.0.0.1".parse().unwrap()));
}

#[test]
fn reflector_topology_is_symmetric() {
    let extra = "
---
kind: BGPConfiguration
apiVersion: projectcalico.org/v3
metadata: {name: default}
spec: {nodeToNodeMeshEnabled: false, asNumber: 65000}
---
kind: BGPPeer
apiVersion: projectcalico.org/v3
metadata: {name: to-rr}
spec: {nodeSelector: all(), peerSelector: route-reflector == 'true'}
";
    let n1 = compute_for("n1", extra);
    assert_eq!(n1.asn, 65000);
    assert_eq!(
        n1.peers.keys().copied().collect::<Vec<_>>(),
        vec![ip("192.0.2.13")]
    );
    assert_eq!(n1.peers[&ip("192.0.2.13")].kind, PeerKind::Global);
    let rr = compute_for("rr", extra);
    assert_eq!(
        rr.peers.keys().copied().collect::<Vec<_>>(),
        vec![ip("192.0.2.11"), ip("192.0.2.12")]
    );
    assert!(rr.peers.values().all(|p| p.rr_client));
}

#[test]
fn explicit_peers_by_node_selector_with_password_and_port() {
    let extra = "
---
kind: BGPConfiguration
apiVersion: trellis.dev/v1
metadata: {name: default}
spec:
  nodeToNodeMeshEnabled: false
  serviceClusterIPs: [{cidr: 10.96.0.0/12}]
  communities: [{name: pods, value: '65000:100'}]
  prefixAdvertisements: [{cidr: 10.10.0.0/16, communities: [pods, '65000:7']}]
---
kind: BGPPeer
apiVersion: trellis.dev/v1
metadata: {name: tor-a}
spec: {nodeSelector: rack == 'a', peerIP: '192.0.2.1:1179', asNumber: 65001, password: s3cret}
---
kind: BGPPeer
apiVersion: trellis.dev/v1
metadata: {name: n2-only}
spec: {node: n2, peerIP: 192.0.2.2, asNumber: 65002}
";
    let n1 = compute_for("n1", extra);
    let tor = &n1.peers[&ip("192.0.2.1")];
    assert_eq!(
        (tor.port, tor.asn, tor.options.password.as_deref(), tor.kind),
        (1179, 65001, Some("s3cret"), PeerKind::Global)
    );
    assert_eq!(n1.peers.len(), 1);
    assert_eq!(
        n1.exports[&"10.10.1.0/26".parse().unwrap()],
        vec![65000 << 16 | 100, 65000 << 16 | 7]
    );
    assert!(n1.exports.contains_key(&"10.96.0.0/12".parse().unwrap()));
    assert_eq!(compute_for("n2", extra).peers.len(), 2);
    assert!(compute_for("rr", extra).peers.is_empty());
}

#[test]
fn session_options_source_address_local_as_next_hop_and_gtsm() {
    let extra = "
---
kind: BGPConfiguration
apiVersion: trellis.dev/v1
metadata: {name: default}
spec: {bindMode: NodeIP}
---
kind: BGPPeer
apiVersion: trellis.dev/v1
metadata: {name: direct}
spec: {peerIP: 192.0.2.1, asNumber: 65001, sourceAddress: None, numAllowedLocalASNumbers: 2, maxPrefixes: {limit: 100}}
---
kind: BGPPeer
apiVersion: trellis.dev/v1
metadata: {name: far}
spec: {peerIP: 198.51.100.1, asNumber: 65002, keepOriginalNextHop: true, reachableBy: 192.0.2.254}
---
kind: BGPPeer
apiVersion: trellis.dev/v1
metadata: {name: gtsm}
spec: {peerIP: 198.51.100.2, asNumber: 65003, ttlSecurity: 2, nextHopMode: Self, maxPrefixes: {limit: 5, action: Reject}}
---
kind: BGPPeer
apiVersion: trellis.dev/v1
metadata: {name: off}
spec: {peerIP: 198.51.100.3, asNumber: 65004, ttlSecurity: 0, nextHopMode: Keep}
";
    let c = compute_for("n1", extra);
    assert!(c.listen_on_node_ip);
    assert!(!compute_for("n1", "").listen_on_node_ip);
    let direct = &c.peers[&ip("192.0.2.1")];
    assert_eq!(
        (direct.options.bind_source, direct.options.allow_local_as),
        (false, 2)
    );
    let mesh = &c.peers[&ip("192.0.2.12")];
    assert_eq!(
        (mesh.options.bind_source, mesh.options.allow_local_as),
        (true, 0)
    );
    // maxPrefixes: none by default, Restart unless another action is given.
    let limit = |a: &str| c.peers[&ip(a)].options.max_prefixes;
    assert_eq!(limit("192.0.2.12"), None);
    assert_eq!(limit("198.51.100.1"), None);
    assert_eq!(
        limit("192.0.2.1"),
        Some(PrefixLimit {
            limit: 100,
            action: LimitAction::Restart
        })
    );
    assert_eq!(
        limit("198.51.100.2"),
        Some(PrefixLimit {
            limit: 5,
            action: LimitAction::Reject
        })
    );
    // Next hop: Auto by default; keepOriginalNextHop is Keep.
    let next_hop = |a: &str| c.peers[&ip(a)].options.next_hop;
    assert_eq!(next_hop("192.0.2.12"), NextHopMode::Auto);
    assert_eq!(next_hop("192.0.2.1"), NextHopMode::Auto);
    assert_eq!(next_hop("198.51.100.1"), NextHopMode::Keep);
    assert_eq!(next_hop("198.51.100.2"), NextHopMode::SetSelf);
    assert_eq!(next_hop("198.51.100.3"), NextHopMode::Keep);
    // reachableBy: one host route to that peer.
    assert_eq!(
        c.peer_routes().collect::<Vec<_>>(),
        vec![("198.51.100.1/32".parse().unwrap(), ip("192.0.2.254"))]
    );
    let policy = |a: &str| c.ttl_policy(&c.peers[&ip(a)]);
    // iBGP: the system default; eBGP on the subnet: TTL 1; beyond it: 255 (multihop).
    assert_eq!(policy("192.0.2.12"), TtlPolicy::default());
    assert_eq!(policy("192.0.2.1").ttl, Some(1));
    assert_eq!(policy("198.51.100.1").ttl, Some(255));
    assert_eq!(policy("198.51.100.1").min_ttl, None);
    // GTSM two hops away: send 255, accept 254 and 255 (RFC 5082 §3); 0 is off.
    assert_eq!(
        policy("198.51.100.2"),
        TtlPolicy {
            ttl: Some(255),
            min_ttl: Some(254)
        }
    );
    assert_eq!(policy("198.51.100.3").min_ttl, None);
}

#[test]
fn filters_compile_in_order_and_a_missing_one_rejects_everything() {
    let extra = "
---
kind: BGPFilter
apiVersion: projectcalico.org/v3
metadata: {name: no-default}
spec:
  importV4: [{action: Reject, matchOperator: Equal, cidr: 0.0.0.0/0}]
  exportV4: [{action: Accept, matchOperator: In, cidr: 10.10.0.0/16, prefixLength: {max: 26}}, {action: Reject, source: RemotePeers}]
---
kind: BGPPeer
apiVersion: trellis.dev/v1
metadata: {name: tor}
spec: {peerIP: 192.0.2.1, asNumber: 65001, filters: [no-default, typo]}
";
    let c = compute_for("n1", extra);
    let (import, export) = &c.peers[&ip("192.0.2.1")].options.filters;
    let p = |s: &str| -> IpNet { s.parse().unwrap() };
    // no-default's rules first, then typo's reject-all for both families.
    assert_eq!(import.len(), 3);
    assert!(!trellis_bgp::policy::accepts(import, &p("0.0.0.0/0"), true));
    assert!(!trellis_bgp::policy::accepts(
        import,
        &p("198.51.100.0/24"),
        true
    ));
    assert_eq!(export[0].prefix.unwrap().lengths, (16, 26));
    assert!(export[1].learned_only && !export[1].accept);
    assert_eq!(c.warnings.len(), 1);
    assert!(c.warnings[0].contains("typo"), "{:?}", c.warnings);
    // The mesh peering has no filters.
    assert_eq!(c.peers[&ip("192.0.2.12")].options.filters, (vec![], vec![]));
}
