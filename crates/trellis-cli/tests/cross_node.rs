//! Pods on different nodes reach each other: agents program VXLAN (VTEP, neighbour, FDB,
//! onlink routes) or direct routes from the datastore; switching a pool's encapsulation
//! re-plans live; a route deleted by hand comes back; natOutgoing lives in Trellis's table.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use trellis_testutil::TestNetns;

fn ping(from: &TestNetns, to: &std::net::IpAddr) -> bool {
    (0..10).any(|_| {
        let ok = from
            .exec(&["ping", "-c1", "-W1", &to.to_string()])
            .status
            .success();
        if !ok {
            std::thread::sleep(Duration::from_millis(300));
        }
        ok
    })
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pool(encapsulation: &str, nat: bool) -> String {
    format!("apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: pool\nspec:\n  cidr: 10.70.0.0/16\n  blockSize: 26\n  encapsulation: {encapsulation}\n  natOutgoing: {nat}\n")
}

#[test]
fn pods_talk_across_nodes_vxlan_then_direct() {
    let c = Cluster::new("xnode", false, 2);
    c.cli_ok(&["apply", "-f", "-"], Some(&pool("VXLAN", true)));
    let (p0, ip0) = c.add_pod(0, "xp0");
    let (p1, ip1) = c.add_pod(1, "xp1");
    // VXLAN: the VTEP exists on both nodes with the seeds' shape.
    wait_for("VXLAN routes", || {
        c.nodes[0]
            .ns
            .exec_ok(&["ip", "route"])
            .contains("dev vxlan.trellis proto 231 onlink")
    });
    let link = c.nodes[0]
        .ns
        .exec_ok(&["ip", "-d", "link", "show", "vxlan.trellis"]);
    assert!(
        link.contains("vxlan id 4096")
            && link.contains("dstport 4789")
            && link.contains("mtu 1450"),
        "{link}"
    );
    let fdb = c.nodes[0]
        .ns
        .exec_ok(&["bridge", "fdb", "show", "dev", "vxlan.trellis"]);
    assert!(fdb.contains("dst 192.0.2.11 self permanent"), "{fdb}");
    assert!(
        c.nodes[0]
            .ns
            .exec_ok(&["ip", "route"])
            .contains("blackhole 10.70."),
        "local block blackholed"
    );
    assert!(
        ping(&p0, &ip1),
        "pod on node0 cannot reach pod on node1 over VXLAN"
    );
    assert!(ping(&p1, &ip0));
    // natOutgoing: Trellis's own table, pools excluded from masquerade.
    let nat = c.nodes[0]
        .ns
        .exec_ok(&["nft", "list", "table", "ip", "trellis"]);
    assert!(
        nat.contains("@masq_pools") && nat.contains("@all_pools") && nat.contains("masquerade"),
        "{nat}"
    );
    // Drift: a route deleted by hand comes back within a few seconds.
    let routes = c.nodes[0].ns.exec_ok(&["ip", "route"]);
    let line = routes
        .lines()
        .find(|l| l.contains("vxlan.trellis") && l.contains("onlink"))
        .unwrap()
        .to_string();
    let dst = line.split_whitespace().next().unwrap().to_string();
    c.nodes[0].ns.exec_ok(&["ip", "route", "del", &dst]);
    wait_for("the deleted route to come back", || {
        c.nodes[0].ns.exec_ok(&["ip", "route"]).contains(&dst)
    });
    // Switch the pool to direct routing: routes move to the uplink, traffic keeps flowing.
    c.cli_ok(&["apply", "-f", "-"], Some(&pool("None", false)));
    wait_for("direct routes", || {
        c.nodes[0]
            .ns
            .exec_ok(&["ip", "route"])
            .contains(&format!("{dst} via 192.0.2.11 dev upl0 proto 231"))
    });
    assert!(ping(&p0, &ip1), "pod-to-pod over direct routes");
    wait_for("the NAT table to go", || {
        !c.nodes[0]
            .ns
            .exec(&["nft", "list", "table", "ip", "trellis"])
            .status
            .success()
    });
}

#[test]
fn ipip_pools_are_refused_with_a_clear_message() {
    let c = Cluster::new("xipip", false, 2);
    c.cli_ok(&["apply", "-f", "-"], Some(&pool("IPIP", false)));
    let _ = c.add_pod(1, "ipp1");
    wait_for("the agent to refuse IPIP", || {
        c.agent_log(0).contains("no ipip support")
    });
    assert!(
        !c.nodes[0]
            .ns
            .exec_ok(&["ip", "route"])
            .contains("via 192.0.2.11"),
        "no silent fallback to direct routing"
    );
}
