//! Kernel change notifications against the real kernel, in a namespace: which changes concern
//! Trellis (and so wake the agent's reconcile loop for a full pass).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use trellis_dataplane::events::{KernelEvent, KernelEvents};
use trellis_dataplane::netlink::VxlanSpec;
use trellis_dataplane::{Netlink, Netns};
use trellis_testutil::TestNetns;

/// ARP churn on the uplink (a peer's entry going reachable, stale, away) does not concern
/// Trellis; its own neighbour entries on the VTEP, and routes, do. Every neighbour change
/// anywhere used to wake a full pass — several a second on a node with busy pods.
#[test]
fn only_vtep_neighbours_and_routes_concern_trellis() {
    let ns = TestNetns::new("events");
    // No IPv6: its autoconfiguration would add events of its own while the test runs.
    ns.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    ns.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
    ns.exec_ok(&[
        "ip", "link", "add", "upl0", "type", "veth", "peer", "name", "upl1",
    ]);
    ns.exec_ok(&["ip", "addr", "add", "192.168.1.10/24", "dev", "upl0"]);
    ns.exec_ok(&["ip", "link", "set", "upl0", "up"]);
    ns.exec_ok(&["ip", "link", "set", "upl1", "up"]);
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
    let vtep = nl.link("vxlan.trellis").unwrap().unwrap().index;
    nl.set_up(vtep).unwrap();

    let mut events = handle.run(KernelEvents::subscribe).unwrap().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Bounded: the test reads at most this many batches.
        for _ in 0..1000 {
            let Ok(batch) = events.wait() else { return };
            if tx.send(batch).is_err() {
                return;
            }
        }
    });
    let peer = ["192.168.1.50", "lladdr", "02:00:00:00:00:50", "dev", "upl0"];
    for state in ["reachable", "stale", "delay"] {
        let mut argv = vec!["ip", "neigh", "replace"];
        argv.extend(peer);
        argv.extend(["nud", state]);
        ns.exec_ok(&argv);
    }
    ns.exec_ok(&["ip", "neigh", "del", "192.168.1.50", "dev", "upl0"]);
    let own = [
        "10.244.1.0",
        "lladdr",
        "66:00:00:00:00:02",
        "dev",
        "vxlan.trellis",
    ];
    let mut argv = vec!["ip", "neigh", "replace"];
    argv.extend(own);
    argv.extend(["nud", "permanent"]);
    ns.exec_ok(&argv);
    ns.exec_ok(&["ip", "neigh", "del", "10.244.1.0", "dev", "vxlan.trellis"]);
    ns.exec_ok(&["ip", "route", "add", "10.244.9.0/24", "via", "192.168.1.1"]);

    // Everything up to the route's event.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen: Vec<KernelEvent> = Vec::new();
    while !seen.contains(&KernelEvent::Route) {
        let left = deadline.saturating_duration_since(Instant::now());
        seen.extend(rx.recv_timeout(left).expect("the route's event in time"));
    }
    let on = |ifindex: u32| -> Vec<&KernelEvent> {
        seen.iter()
            .filter(|e| **e == KernelEvent::Neighbour { ifindex })
            .collect()
    };
    assert!(on(uplink).len() >= 2, "the ARP churn is reported: {seen:?}");
    assert!(
        on(uplink).iter().all(|e| !e.concerns_trellis(Some(vtep))),
        "ARP churn on the uplink wakes the agent: {seen:?}"
    );
    assert!(!on(vtep).is_empty(), "{seen:?}");
    assert!(on(vtep).iter().all(|e| e.concerns_trellis(Some(vtep))));
    assert!(
        !on(vtep)[0].concerns_trellis(None),
        "no VTEP, no neighbours of Trellis's"
    );
    assert!(KernelEvent::Route.concerns_trellis(Some(vtep)));
}
