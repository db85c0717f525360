//! The routing shell against the real kernel, in a namespace: a VXLAN device, a plan applied
//! and read back (a resync is then a no-op), `bridge fdb append` semantics, foreign routes
//! left alone, and removal in the planned order.

use trellis_dataplane::netlink::VxlanSpec;
use trellis_dataplane::{ethtool, routing, Netlink, Netns};
use trellis_resources::Encapsulation;
use trellis_routing::{
    desired, merge_ops, plan, LearnedPlanner, LocalNode, Op, PoolRouting, RemoteNode,
};
use trellis_testutil::TestNetns;

#[test]
fn vxlan_plan_applies_and_resync_is_a_no_op() {
    let ns = TestNetns::new("route");
    ns.exec_ok(&[
        "ip", "link", "add", "upl0", "type", "veth", "peer", "name", "upl1",
    ]);
    ns.exec_ok(&["ip", "addr", "add", "192.168.1.10/24", "dev", "upl0"]);
    ns.exec_ok(&["ip", "link", "set", "upl0", "up"]);
    ns.exec_ok(&["ip", "link", "set", "upl1", "up"]);
    // A route of someone else's that Trellis must never touch.
    ns.exec_ok(&["ip", "route", "add", "10.244.9.0/24", "via", "192.168.1.1"]);
    let handle = Netns::open(ns.path()).unwrap();
    let mut nl = Netlink::open_in(&handle).unwrap();
    let uplink = nl.link("upl0").unwrap().unwrap().index;
    nl.create_vxlan(&VxlanSpec {
        name: "vxlan.trellis".into(),
        vni: 4096,
        port: 4789,
        local: "192.168.1.10".parse().unwrap(),
        uplink,
        mac: [0x66, 1, 2, 3, 4, 5],
        mtu: Some(1450),
    })
    .unwrap();
    let vtep = nl.link("vxlan.trellis").unwrap().unwrap();
    nl.set_up(vtep.index).unwrap();
    handle
        .run(|| ethtool::set_tx_checksum("vxlan.trellis", false))
        .unwrap()
        .unwrap();
    let info = nl.vxlan_info("vxlan.trellis").unwrap().unwrap();
    assert_eq!(info.vni, 4096);
    assert!(!info.udp_csum, "VTEPs carry no outer UDP checksum");
    assert!(ns
        .exec_ok(&["ip", "-d", "link", "show", "vxlan.trellis"])
        .contains(" noudpcsum "));

    let local = LocalNode {
        name: "n1".into(),
        address: "192.168.1.10/24".parse().unwrap(),
        uplink_ifindex: uplink,
        vtep_ifindex: Some(vtep.index),
        bgp: false,
    };
    let remotes = vec![
        RemoteNode {
            name: "n2".into(),
            address: "192.168.1.11".parse().unwrap(),
            vtep_ip: Some("10.244.1.0".parse().unwrap()),
            vtep_mac: Some([0x66, 0, 0, 0, 0, 2]),
        },
        RemoteNode {
            name: "n3".into(),
            address: "192.168.2.12".parse().unwrap(),
            vtep_ip: Some("10.244.2.0".parse().unwrap()),
            vtep_mac: Some([0x66, 0, 0, 0, 0, 3]),
        },
    ];
    let blocks = vec![
        ("10.244.0.0/26".parse().unwrap(), "n1".to_string()),
        ("10.244.1.0/26".parse().unwrap(), "n2".to_string()),
        ("10.244.2.0/26".parse().unwrap(), "n3".to_string()),
    ];
    let pools = vec![PoolRouting {
        cidr: "10.244.0.0/16".parse().unwrap(),
        encapsulation: Encapsulation::VxlanCrossSubnet,
    }];
    let (want, problems) = desired(&local, &remotes, &blocks, &pools);
    assert!(problems.is_empty());
    let ops = plan(&want, &routing::observe(&mut nl, Some(vtep.index)).unwrap());
    assert_eq!(ops.len(), 5);
    let failed = routing::apply(&mut nl, &ops);
    assert!(failed.is_empty(), "{failed:?}");

    let routes = ns.exec_ok(&["ip", "route"]);
    assert!(
        routes.contains("blackhole 10.244.0.0/26 proto 231"),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.1.0/26 via 192.168.1.11 dev upl0 proto 231"),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.2.0/26 via 10.244.2.0 dev vxlan.trellis proto 231 onlink"),
        "{routes}"
    );
    let fdb = ns.exec_ok(&["bridge", "fdb", "show", "dev", "vxlan.trellis"]);
    assert!(
        fdb.contains("66:00:00:00:00:03 dst 192.168.2.12 self permanent"),
        "{fdb}"
    );
    let neigh = ns.exec_ok(&["ip", "neigh", "show", "dev", "vxlan.trellis"]);
    assert!(
        neigh.contains("10.244.2.0 lladdr 66:00:00:00:00:03 PERMANENT"),
        "{neigh}"
    );

    // Reading the kernel back gives exactly the plan: a resync changes nothing.
    let observed = routing::observe(&mut nl, Some(vtep.index)).unwrap();
    assert!(
        plan(&want, &observed).is_empty(),
        "{:?}",
        plan(&want, &observed)
    );

    // A route deleted by hand is put back by the next plan.
    ns.exec_ok(&["ip", "route", "del", "10.244.2.0/26"]);
    let ops = plan(&want, &routing::observe(&mut nl, Some(vtep.index)).unwrap());
    assert_eq!(ops.len(), 1);
    assert!(routing::apply(&mut nl, &ops).is_empty());

    // Everything gone from the cluster: Trellis removes its own, and only its own.
    let ops = plan(
        &Default::default(),
        &routing::observe(&mut nl, Some(vtep.index)).unwrap(),
    );
    assert!(routing::apply(&mut nl, &ops).is_empty());
    let routes = ns.exec_ok(&["ip", "route"]);
    assert!(!routes.contains("proto 231"), "{routes}");
    assert!(
        routes.contains("10.244.9.0/24 via 192.168.1.1"),
        "a foreign route was touched: {routes}"
    );
    assert!(!ns
        .exec_ok(&["bridge", "fdb", "show", "dev", "vxlan.trellis"])
        .contains("66:00:00:00:00:03"));
}

/// A namespace with an uplink `upl0` (192.168.1.10/24, its peer `upl1`), and netlink in it.
fn uplink_ns(tag: &str) -> (TestNetns, Netlink, u32) {
    let ns = TestNetns::new(tag);
    ns.exec_ok(&[
        "ip", "link", "add", "upl0", "type", "veth", "peer", "name", "upl1",
    ]);
    ns.exec_ok(&["ip", "addr", "add", "192.168.1.10/24", "dev", "upl0"]);
    ns.exec_ok(&["ip", "link", "set", "upl0", "up"]);
    ns.exec_ok(&["ip", "link", "set", "upl1", "up"]);
    let handle = Netns::open(ns.path()).unwrap();
    let mut nl = Netlink::open_in(&handle).unwrap();
    let uplink = nl.link("upl0").unwrap().unwrap().index;
    (ns, nl, uplink)
}

fn local_node(uplink: u32) -> LocalNode {
    LocalNode {
        name: "n1".into(),
        address: "192.168.1.10/24".parse().unwrap(),
        uplink_ifindex: uplink,
        vtep_ifindex: None,
        bgp: false,
    }
}

/// Learned routes through the streamed dump ([`routing::observe_learned_apart`]): a table is
/// applied and reads back as a no-op, a changed next hop is replaced and a withdrawn route
/// deleted, the node's own block keeps its blackhole, and the node's gateway routes are
/// still reported for next-hop resolution.
#[test]
fn learned_routes_apply_and_resync_is_a_no_op() {
    let (ns, mut nl, uplink) = uplink_ns("routebgp");
    ns.exec_ok(&[
        "ip",
        "route",
        "add",
        "198.51.100.0/24",
        "via",
        "192.168.1.1",
    ]);
    let local = local_node(uplink);
    let blocks = vec![("10.244.0.0/26".parse().unwrap(), "n1".to_string())];
    let (want, _) = desired(&local, &[], &blocks, &[]);
    let pass = |nl: &mut Netlink, table: &[(ipnet::IpNet, std::net::IpAddr)]| {
        let mut learned = LearnedPlanner::new(&local, table, &want);
        let (observed, igp) =
            routing::observe_learned_apart(nl, None, uplink, |r| learned.observe(r)).unwrap();
        let learned = learned.finish(&observed.foreign);
        let ops: Vec<Op> = merge_ops(&plan(&want, &observed), &learned).collect();
        (ops, igp)
    };
    let route = |dst: &str, nh: &str| (dst.parse().unwrap(), nh.parse().unwrap());
    let table = vec![
        route("10.8.0.0/24", "192.168.1.11"),
        route("10.8.1.0/24", "192.168.1.11"),
        route("10.244.0.0/26", "192.168.1.11"), // our own block: not installed
    ];
    let (ops, igp) = pass(&mut nl, &table);
    assert_eq!(ops.len(), 3, "{ops:?}");
    assert_eq!(
        igp,
        vec![route("198.51.100.0/24", "192.168.1.1")],
        "gateway routes are still read"
    );
    assert!(routing::apply(&mut nl, &ops).is_empty());
    let (again, _) = pass(&mut nl, &table);
    assert!(again.is_empty(), "a resync changes something: {again:?}");
    let changed = vec![
        route("10.8.1.0/24", "192.168.1.12"),
        route("10.244.0.0/26", "192.168.1.11"),
    ];
    let (ops, _) = pass(&mut nl, &changed);
    assert!(routing::apply(&mut nl, &ops).is_empty());
    let routes = ns.exec_ok(&["ip", "-4", "route", "show", "proto", "231"]);
    assert_eq!(
        routes.lines().map(str::trim).collect::<Vec<_>>(),
        vec![
            "10.8.1.0/24 via 192.168.1.12 dev upl0 metric 32",
            "blackhole 10.244.0.0/26",
        ],
        "{routes}"
    );
    let (again, _) = pass(&mut nl, &changed);
    assert!(again.is_empty(), "{again:?}");
}

/// A local IPv6 block's blackhole stays, and a resync changes nothing: the kernel reports an
/// IPv6 route added without a metric at metric 1024, which used to read back as another route
/// than the one planned — every pass replaced it and then deleted it as stale, and the removal
/// woke the next pass.
#[test]
fn an_ipv6_block_blackhole_converges() {
    let (ns, mut nl, uplink) = uplink_ns("route6");
    let blocks = vec![
        ("fd00:10::/122".parse().unwrap(), "n1".to_string()),
        ("10.244.0.0/26".parse().unwrap(), "n1".to_string()),
    ];
    let (want, problems) = desired(&local_node(uplink), &[], &blocks, &[]);
    assert!(problems.is_empty(), "{problems:?}");
    let ops = plan(&want, &routing::observe(&mut nl, None).unwrap());
    assert_eq!(ops.len(), 2, "{ops:?}");
    let failed = routing::apply(&mut nl, &ops);
    assert!(failed.is_empty(), "{failed:?}");
    let again = plan(&want, &routing::observe(&mut nl, None).unwrap());
    assert!(again.is_empty(), "a resync changes something: {again:?}");
    let failed = routing::apply(&mut nl, &again);
    assert!(failed.is_empty(), "{failed:?}");
    let routes = ns.exec_ok(&["ip", "-6", "route", "show", "proto", "231"]);
    assert!(routes.contains("blackhole fd00:10::/122"), "{routes}");
    // Gone from the cluster: removed.
    let ops = plan(
        &Default::default(),
        &routing::observe(&mut nl, None).unwrap(),
    );
    assert!(routing::apply(&mut nl, &ops).is_empty());
    let routes = ns.exec_ok(&["ip", "-6", "route", "show", "proto", "231"]);
    assert!(routes.trim().is_empty(), "{routes}");
}

/// A route of another protocol to the same destination and metric as one Trellis wants is
/// never replaced (`ip route replace` would, whatever its protocol): a pod's host route for a
/// /32 block (blockSize 32) stays — it was replaced by the block's blackhole, cutting the pod
/// off — and an operator's route to a remote block stays, reported as a conflict.
#[test]
fn foreign_routes_to_a_block_are_never_replaced() {
    let (ns, mut nl, uplink) = uplink_ns("routefrgn");
    // The CNI plugin's host route to a pod (proto boot), and an operator's static route.
    ns.exec_ok(&["ip", "route", "add", "10.244.0.5/32", "dev", "upl0"]);
    ns.exec_ok(&[
        "ip",
        "route",
        "add",
        "10.244.1.0/26",
        "via",
        "192.168.1.1",
        "proto",
        "static",
    ]);
    let remotes = vec![RemoteNode {
        name: "n2".into(),
        address: "192.168.1.11".parse().unwrap(),
        vtep_ip: None,
        vtep_mac: None,
    }];
    let blocks = vec![
        ("10.244.0.5/32".parse().unwrap(), "n1".to_string()),
        ("10.244.1.0/26".parse().unwrap(), "n2".to_string()),
        ("10.244.2.0/26".parse().unwrap(), "n2".to_string()),
    ];
    let pools = vec![PoolRouting {
        cidr: "10.244.0.0/16".parse().unwrap(),
        encapsulation: Encapsulation::None,
    }];
    let (want, problems) = desired(&local_node(uplink), &remotes, &blocks, &pools);
    assert!(problems.is_empty(), "{problems:?}");
    for _ in 0..2 {
        let observed = routing::observe(&mut nl, None).unwrap();
        let failed = routing::apply(&mut nl, plan(&want, &observed));
        assert!(failed.is_empty(), "{failed:?}");
    }
    let routes = ns.exec_ok(&["ip", "route"]);
    assert!(
        routes.contains("10.244.0.5 dev upl0 scope link"),
        "the pod's route was replaced: {routes}"
    );
    assert!(
        routes.contains("10.244.1.0/26 via 192.168.1.1 dev upl0 proto static"),
        "the operator's route was replaced: {routes}"
    );
    assert!(
        routes.contains("10.244.2.0/26 via 192.168.1.11 dev upl0 proto 231"),
        "the rest is still programmed: {routes}"
    );
    // The remote block's route that was not installed is reported; the blackhole yields quietly.
    let observed = routing::observe(&mut nl, None).unwrap();
    let conflicts: Vec<String> = trellis_routing::foreign_conflicts(&want, &observed)
        .iter()
        .map(|r| r.dst.to_string())
        .collect();
    assert_eq!(conflicts, ["10.244.1.0/26"]);
}

/// Transmit checksum offload on a VXLAN device: on by default, turned off and back on, and
/// read back both through the ioctl and by `ethtool -k` — with segmentation offload following
/// it (that is the throughput at stake).
#[test]
fn vtep_tx_checksum_offload_turns_off_and_back_on() {
    let ns = TestNetns::new("csum");
    ns.exec_ok(&[
        "ip", "link", "add", "vx0", "type", "vxlan", "id", "4096", "dstport", "4789",
    ]);
    let handle = Netns::open(ns.path()).unwrap();
    let get = || handle.run(|| ethtool::tx_checksum("vx0")).unwrap().unwrap();
    let set = |on| {
        handle
            .run(|| ethtool::set_tx_checksum("vx0", on))
            .unwrap()
            .unwrap()
    };
    let shown = |feature: &str| {
        let out = ns.exec_ok(&["ethtool", "-k", "vx0"]);
        out.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{feature}: ")))
            .map(|v| v.starts_with("on"))
            .unwrap_or_else(|| panic!("no {feature} in {out}"))
    };
    assert!(get(), "a new VXLAN device has tx checksum offload");
    set(false);
    assert!(!get());
    assert!(!shown("tx-checksumming"));
    assert!(!shown("tx-tcp-segmentation"), "TSO goes with it");
    set(true);
    assert!(get());
    assert!(shown("tx-checksumming"));
    assert!(shown("tx-tcp-segmentation"), "TSO comes back with it");
    let missing = handle
        .run(|| ethtool::set_tx_checksum("nosuchdev0", true))
        .unwrap()
        .unwrap_err();
    assert!(
        missing.to_string().contains("ethtool -K nosuchdev0 tx on") && missing.is_not_found(),
        "{missing}"
    );
}
