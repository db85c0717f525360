use super::*;
use trellis_resources::{parse_documents, Resource};

/// Nodes, the BGP configuration, peers and pools parsed from YAML.
type Parsed = (
    Vec<Object<NodeSpec>>,
    Option<BgpConfigurationSpec>,
    Vec<Object<BgpPeerSpec>>,
    Vec<IpPoolSpec>,
);

fn objects(yaml: &str) -> Parsed {
    let (mut nodes, mut cfg, mut peers, mut pools) = (vec![], None, vec![], vec![]);
    for r in parse_documents(yaml).unwrap() {
        match r {
            Resource::Node(n) => nodes.push(n),
            Resource::BgpConfiguration(c) => cfg = Some(c.spec),
            Resource::BgpPeer(p) => peers.push(p),
            Resource::IpPool(p) => pools.push(p.spec),
            _ => unreachable!(),
        }
    }
    (nodes, cfg, peers, pools)
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
    let (nodes, cfg, peers, pools) = objects(&format!("{NODES}{extra}"));
    let blocks = vec![
        ("10.10.1.0/26".parse().unwrap(), "n1".to_string()),
        ("10.20.1.0/26".parse().unwrap(), "n1".to_string()),
        ("10.10.2.0/26".parse().unwrap(), "n2".to_string()),
    ];
    compute(&Inputs {
        node,
        nodes: &nodes,
        config: cfg.as_ref(),
        peers: &peers,
        pools: &pools,
        blocks: &blocks,
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
    assert_eq!(
        c.exports.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
        vec!["10.10.1.0/26"]
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
fn session_options_source_address_local_as_and_gtsm() {
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
spec: {peerIP: 192.0.2.1, asNumber: 65001, sourceAddress: None, numAllowedLocalASNumbers: 2}
---
kind: BGPPeer
apiVersion: trellis.dev/v1
metadata: {name: far}
spec: {peerIP: 198.51.100.1, asNumber: 65002}
---
kind: BGPPeer
apiVersion: trellis.dev/v1
metadata: {name: gtsm}
spec: {peerIP: 198.51.100.2, asNumber: 65003, ttlSecurity: 2}
---
kind: BGPPeer
apiVersion: trellis.dev/v1
metadata: {name: off}
spec: {peerIP: 198.51.100.3, asNumber: 65004, ttlSecurity: 0}
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
