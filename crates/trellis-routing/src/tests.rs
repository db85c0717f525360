use super::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn local() -> LocalNode {
    LocalNode {
        name: "n1".into(),
        address: net("192.168.1.10/24"),
        uplink_ifindex: 2,
        vtep_ifindex: Some(9),
        bgp: false,
    }
}

fn remotes() -> Vec<RemoteNode> {
    vec![
        RemoteNode {
            name: "n2".into(),
            address: ip("192.168.1.11"),
            vtep_ip: Some(ip("10.244.1.0")),
            vtep_mac: Some([0x66, 0, 0, 0, 0, 2]),
        },
        RemoteNode {
            name: "n3".into(),
            address: ip("192.168.2.12"),
            vtep_ip: Some(ip("10.244.2.0")),
            vtep_mac: Some([0x66, 0, 0, 0, 0, 3]),
        },
    ]
}

fn blocks() -> Vec<(IpNet, String)> {
    vec![
        (net("10.244.0.0/26"), "n1".into()),
        (net("10.244.1.0/26"), "n2".into()),
        (net("10.244.2.0/26"), "n3".into()),
    ]
}

fn pool(enc: Encapsulation) -> Vec<PoolRouting> {
    vec![PoolRouting {
        cidr: net("10.244.0.0/16"),
        encapsulation: enc,
    }]
}

fn render(d: &Desired) -> Vec<String> {
    plan(d, &Observed::default())
        .iter()
        .map(|o| o.to_string())
        .collect()
}

/// Golden: the seeds' VXLAN shape — neighbour + FDB per remote VTEP, onlink routes via VTEP IPs.
#[test]
fn vxlan_golden() {
    let (d, problems) = desired(&local(), &remotes(), &blocks(), &pool(Encapsulation::Vxlan));
    assert!(problems.is_empty());
    assert_eq!(
        render(&d),
        vec![
            "fdb append 66:00:00:00:00:02 dst 192.168.1.11 dev #9",
            "fdb append 66:00:00:00:00:03 dst 192.168.2.12 dev #9",
            "neigh replace 10.244.1.0 lladdr 66:00:00:00:00:02 dev #9",
            "neigh replace 10.244.2.0 lladdr 66:00:00:00:00:03 dev #9",
            "route replace blackhole 10.244.0.0/26",
            "route replace 10.244.1.0/26 via 10.244.1.0 dev #9 onlink",
            "route replace 10.244.2.0/26 via 10.244.2.0 dev #9 onlink",
        ]
    );
}

/// Golden: CrossSubnet is direct inside the subnet and VXLAN across it.
#[test]
fn cross_subnet_golden() {
    let (d, problems) = desired(
        &local(),
        &remotes(),
        &blocks(),
        &pool(Encapsulation::VxlanCrossSubnet),
    );
    assert!(problems.is_empty());
    assert_eq!(
        render(&d),
        vec![
            "fdb append 66:00:00:00:00:03 dst 192.168.2.12 dev #9",
            "neigh replace 10.244.2.0 lladdr 66:00:00:00:00:03 dev #9",
            "route replace blackhole 10.244.0.0/26",
            "route replace 10.244.1.0/26 via 192.168.1.11 dev #2",
            "route replace 10.244.2.0/26 via 10.244.2.0 dev #9 onlink",
        ]
    );
}

#[test]
fn direct_needs_adjacency_and_ipip_is_refused() {
    let (d, problems) = desired(&local(), &remotes(), &blocks(), &pool(Encapsulation::None));
    assert_eq!(d.routes.len(), 2);
    assert!(matches!(problems.as_slice(), [Problem::NotAdjacent { .. }]));
    let (_, problems) = desired(&local(), &remotes(), &blocks(), &pool(Encapsulation::Ipip));
    assert_eq!(problems.len(), 2);
    assert!(problems[0].to_string().contains("IPIP"));
}

#[test]
fn resync_is_a_no_op_and_changes_are_minimal() {
    let (d, _) = desired(&local(), &remotes(), &blocks(), &pool(Encapsulation::Vxlan));
    let observed = Observed {
        routes: d.routes.clone(),
        neighbours: d.neighbours.clone(),
        fdb: d.fdb.clone(),
        ..Default::default()
    };
    assert!(plan(&d, &observed).is_empty());
    // n3 leaves: its route goes first, then its neighbour and FDB entry.
    let (d2, _) = desired(
        &local(),
        &remotes()[..1],
        &blocks()[..2],
        &pool(Encapsulation::Vxlan),
    );
    let ops: Vec<String> = plan(&d2, &observed).iter().map(|o| o.to_string()).collect();
    assert_eq!(
        ops,
        vec![
            "route del 10.244.2.0/26 via 10.244.2.0 dev #9 onlink",
            "neigh del 10.244.2.0 dev #9",
            "fdb del 66:00:00:00:00:03 dst 192.168.2.12 dev #9",
        ]
    );
    // A changed next hop is replaced in place, never deleted then added.
    let (d3, _) = desired(
        &local(),
        &remotes(),
        &blocks(),
        &pool(Encapsulation::VxlanCrossSubnet),
    );
    let ops = plan(&d3, &observed);
    assert!(ops
        .iter()
        .any(|o| matches!(o, Op::ReplaceRoute(r) if r.dst == net("10.244.1.0/26"))));
    assert!(!ops
        .iter()
        .any(|o| matches!(o, Op::DelRoute(r) if r.dst == net("10.244.1.0/26"))));
}

#[test]
fn missing_vtep_and_unknown_node_reported() {
    let mut r = remotes();
    r[0].vtep_mac = None;
    let mut b = blocks();
    b.push((net("10.244.3.0/26"), "ghost".into()));
    let (d, problems) = desired(&local(), &r, &b, &pool(Encapsulation::Vxlan));
    assert_eq!(d.routes.len(), 2);
    assert_eq!(problems.len(), 2);
}

#[test]
fn bgp_owns_direct_routes_and_adds_learned_ones_at_its_metric() {
    let mut l = local();
    l.bgp = true;
    // With BGP on, None pools get no direct routes from the planner (BGP supplies them); the
    // other-subnet part of CrossSubnet stays VXLAN.
    let (d, problems) = desired(&l, &remotes(), &blocks(), &pool(Encapsulation::None));
    assert_eq!(
        d.routes.len(),
        1,
        "only the local blackhole: {:?}",
        d.routes
    );
    assert_eq!(
        problems.len(),
        0,
        "n3 off-subnet is BGP's business, not a problem"
    );
    let (x, _) = desired(
        &l,
        &remotes(),
        &blocks(),
        &pool(Encapsulation::VxlanCrossSubnet),
    );
    assert!(x.routes.iter().any(|r| r.dst == net("10.244.2.0/26")));
    assert!(!x.routes.iter().any(|r| r.dst == net("10.244.1.0/26")));
    let learned = vec![
        (net("10.9.0.0/16"), ip("192.168.9.1")), // next hop off-subnet: reported
        (net("10.244.0.0/26"), ip("192.168.1.11")), // our own block: the blackhole stays
        (net("10.244.1.0/26"), ip("192.168.1.11")),
    ];
    let plan_bgp = LearnedPlanner::new(&l, &learned, &d).finish(&BTreeSet::new());
    assert_eq!(
        plan_bgp.off_subnet,
        vec![(net("10.9.0.0/16"), ip("192.168.9.1"))]
    );
    let bgp: Vec<String> = plan_bgp.ops().map(|o| o.to_string()).collect();
    assert_eq!(
        bgp,
        vec!["route replace [metric 32] 10.244.1.0/26 via 192.168.1.11 dev #2"]
    );
    // A direct route left from before BGP (metric 0) is removed once the BGP one (metric 32) is in.
    let observed = Observed {
        routes: [Route {
            dst: net("10.244.1.0/26"),
            metric: 0,
            kind: RouteKind::Via {
                gateway: ip("192.168.1.11"),
                ifindex: 2,
                onlink: false,
            },
        }]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let ops: Vec<String> = merge_ops(&plan(&d, &observed), &plan_bgp)
        .map(|o| o.to_string())
        .collect();
    assert_eq!(
        ops,
        vec![
            "route replace blackhole 10.244.0.0/26",
            "route replace [metric 32] 10.244.1.0/26 via 192.168.1.11 dev #2",
            "route del 10.244.1.0/26 via 192.168.1.11 dev #2",
        ]
    );
}

fn bgp_route(dst: &str, nh: &str) -> Route {
    Route {
        dst: net(dst),
        metric: BGP_METRIC,
        kind: RouteKind::Via {
            gateway: ip(nh),
            ifindex: 2,
            onlink: false,
        },
    }
}

/// The learned routes against what the kernel holds of them: nothing to do when equal, a
/// changed next hop replaced in place, what is no longer learned (or now yields to a route of
/// the node's own plan) deleted, what is missing added — unless a foreign route holds it.
#[test]
fn learned_routes_are_diffed_against_the_kernel_in_place() {
    let mut l = local();
    l.bgp = true;
    let (d, _) = desired(&l, &remotes(), &blocks(), &pool(Encapsulation::None));
    let table = vec![
        (net("10.8.0.0/24"), ip("192.168.1.11")),
        (net("10.8.1.0/24"), ip("192.168.1.12")),
        (net("10.8.2.0/24"), ip("192.168.1.11")),
        (net("10.8.3.0/24"), ip("192.168.1.11")),
        (net("10.244.0.0/26"), ip("192.168.1.11")), // our own block: learned, not installed
    ];
    let steady = |kernel: &[Route]| {
        let mut p = LearnedPlanner::new(&l, &table, &d);
        for r in kernel {
            p.observe(r.clone());
        }
        p
    };
    let all: Vec<Route> = table[..4]
        .iter()
        .map(|(d, n)| bgp_route(&d.to_string(), &n.to_string()))
        .collect();
    let resync = steady(&all).finish(&BTreeSet::new());
    assert!(
        resync.is_empty() && resync.off_subnet.is_empty() && resync.conflicts.is_empty(),
        "a resync of an installed table is a no-op: {resync:?}"
    );
    let kernel = vec![
        bgp_route("10.8.1.0/24", "192.168.1.11"), // next hop changed
        bgp_route("10.8.2.0/24", "192.168.1.11"), // as wanted
        bgp_route("10.244.0.0/26", "192.168.1.11"), // our block's blackhole wins
        bgp_route("10.7.0.0/24", "192.168.1.11"), // withdrawn
    ];
    let foreign: BTreeSet<(IpNet, u32)> = [(net("10.8.3.0/24"), BGP_METRIC)].into();
    let plan = steady(&kernel).finish(&foreign);
    let ops: Vec<String> = plan.ops().map(|o| o.to_string()).collect();
    assert_eq!(
        ops,
        vec![
            "route replace [metric 32] 10.8.1.0/24 via 192.168.1.12 dev #2",
            "route replace [metric 32] 10.8.0.0/24 via 192.168.1.11 dev #2",
            "route del [metric 32] 10.244.0.0/26 via 192.168.1.11 dev #2",
            "route del [metric 32] 10.7.0.0/24 via 192.168.1.11 dev #2",
        ]
    );
    assert_eq!(
        plan.conflicts,
        vec![bgp_route("10.8.3.0/24", "192.168.1.11")]
    );
}

/// What a kernel holds after `ops`: one route per destination and metric, one neighbour per
/// device and address (`neigh replace`), FDB entries as a set (`fdb append`).
fn kernel_after(observed: &Observed, ops: &[Op]) -> Observed {
    let mut routes: BTreeMap<(IpNet, u32), Route> = observed
        .routes
        .iter()
        .map(|r| ((r.dst, r.metric), r.clone()))
        .collect();
    let mut neigh: BTreeMap<(u32, IpAddr), Neighbour> = observed
        .neighbours
        .iter()
        .map(|n| ((n.ifindex, n.ip), n.clone()))
        .collect();
    let mut fdb = observed.fdb.clone();
    for op in ops {
        match op {
            Op::SetFdb(e) => {
                fdb.insert(e.clone());
            }
            Op::DelFdb(e) => {
                fdb.remove(e);
            }
            Op::SetNeighbour(n) => {
                neigh.insert((n.ifindex, n.ip), n.clone());
            }
            Op::DelNeighbour(n) => {
                neigh.remove(&(n.ifindex, n.ip));
            }
            Op::ReplaceRoute(r) => {
                routes.insert((r.dst, r.metric), r.clone());
            }
            Op::DelRoute(r) => {
                routes.remove(&(r.dst, r.metric));
            }
        }
    }
    Observed {
        routes: routes.into_values().collect(),
        neighbours: neigh.into_values().collect(),
        fdb,
        ..Default::default()
    }
}

/// A Node record that publishes another node's VTEP address (stale, or hostile): the first by
/// name keeps it, the other is reported and not routed, and a resync is a no-op. Planning both
/// made every pass flip the kernel's one neighbour for that address (and each flip, a kernel
/// event, woke the next pass: a busy loop with traffic to the address alternating).
#[test]
fn a_vtep_published_twice_is_used_once_and_converges() {
    let mut r = remotes();
    r.push(RemoteNode {
        name: "n4".into(),
        address: ip("192.168.1.14"),
        vtep_ip: Some(ip("10.244.1.0")),
        vtep_mac: Some([0x66, 0, 0, 0, 0, 4]),
    });
    let mut b = blocks();
    b.push((net("10.244.4.0/26"), "n4".into()));
    let (d, problems) = desired(&local(), &r, &b, &pool(Encapsulation::Vxlan));
    let mut kernel = Observed::default();
    for pass in 0..3 {
        let ops = plan(&d, &kernel);
        assert!(pass == 0 || ops.is_empty(), "pass {pass} changes {ops:?}");
        kernel = kernel_after(&kernel, &ops);
    }
    assert!(
        kernel.routes.iter().any(|r| r.dst == net("10.244.1.0/26")),
        "{kernel:?}"
    );
    assert!(!kernel.routes.iter().any(|r| r.dst == net("10.244.4.0/26")));
    assert!(
        problems.iter().any(
            |p| matches!(p, Problem::VtepTaken { node, by, .. } if node == "n4" && by == "n2")
        ),
        "{problems:?}"
    );
}

/// A floating address (or one given without IPAM) of a pod on another node is routed to that
/// node as its pod's pool says; this node's own get no route (DNAT or the pod's host route
/// reaches them), and one whose pod is in no pool is reported.
#[test]
fn host_routes_follow_their_pods_pool() {
    let hosts = vec![
        HostRoute {
            dst: net("203.0.113.9/32"),
            node: "n2".into(),
            via: ip("10.244.1.5"),
        },
        HostRoute {
            dst: net("203.0.113.10/32"),
            node: "n1".into(),
            via: ip("10.244.0.5"),
        },
        HostRoute {
            dst: net("203.0.113.11/32"),
            node: "n3".into(),
            via: ip("172.16.0.1"),
        },
    ];
    let (d, problems) = desired_with(
        &local(),
        &remotes(),
        &[],
        &pool(Encapsulation::VxlanCrossSubnet),
        &hosts,
    );
    assert_eq!(
        render(&d),
        vec!["route replace 203.0.113.9/32 via 192.168.1.11 dev #2"]
    );
    assert_eq!(
        problems,
        vec![Problem::NoPool {
            block: net("203.0.113.11/32")
        }]
    );
    let (d, _) = desired_with(
        &local(),
        &remotes(),
        &[],
        &pool(Encapsulation::Vxlan),
        &hosts,
    );
    assert!(render(&d)
        .contains(&"route replace 203.0.113.9/32 via 10.244.1.0 dev #9 onlink".to_string()));
}
