//! Pods on different nodes reach each other: agents program VXLAN (VTEP, neighbour, FDB,
//! onlink routes) or direct routes from the datastore; switching a pool's encapsulation
//! re-plans live; a route deleted by hand comes back; natOutgoing lives in Trellis's table; an
//! agent restart changes nothing in the kernel; agents follow the datastore through an etcd
//! restart.

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
    wait_for("the FDB entry for node1", || {
        c.nodes[0]
            .ns
            .exec_ok(&["bridge", "fdb", "show", "dev", "vxlan.trellis"])
            .contains("dst 192.0.2.11 self permanent")
    });
    wait_for("the local block's blackhole", || {
        c.nodes[0]
            .ns
            .exec_ok(&["ip", "route"])
            .contains("blackhole 10.70.")
    });
    assert!(
        ping(&p0, &ip1),
        "pod on node0 cannot reach pod on node1 over VXLAN"
    );
    assert!(ping(&p1, &ip0));
    // natOutgoing: Trellis's own table, pools excluded from masquerade.
    wait_for("the NAT table with its pool sets", || {
        let nat = c.nodes[0]
            .ns
            .exec(&["nft", "list", "table", "ip", "trellis"]);
        let nat = String::from_utf8_lossy(&nat.stdout);
        nat.contains("@masq_pools") && nat.contains("@all_pools") && nat.contains("masquerade")
    });
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
    // An external host on the nodes' segment sees pod traffic from the node's address.
    let ext = external_host(&c, "192.0.2.100/24");
    assert_eq!(
        peer_seen_by(&ext, &p0),
        "192.0.2.10",
        "natOutgoing masquerades to the node address"
    );
    // A restart of the agent converges without changing anything (no flap): the kernel's route,
    // neighbour and FDB notifications are recorded across the restart until the restarted agent
    // has completed a whole pass, and none may touch what Trellis owns.
    let before = trellis_state(&c.nodes[0].ns);
    let monitor = KernelMonitor::start(&c.nodes[0].ns);
    let mut c = c;
    c.kill_agent(0);
    c.start_agent(0);
    wait_for("the restarted agent's first dataplane pass", || {
        c.agent_log_all(0).contains("dataplane pass complete")
    });
    let seen = monitor.finish(&c.nodes[0].ns);
    let flaps: Vec<&String> = seen
        .iter()
        // Trellis's routes, and the VTEP's neighbours and FDB entries; the kernel's own routes
        // on the VTEP (its IPv6 link-local once DAD completes) are not Trellis's doing.
        .filter(|l| {
            l.contains("proto 231") || (l.contains("vxlan.trellis") && !l.contains("proto kernel"))
        })
        .collect();
    assert!(
        flaps.is_empty(),
        "the restart changed Trellis's kernel state: {flaps:#?}\n{}",
        c.agent_log_all(0)
    );
    assert_eq!(trellis_state(&c.nodes[0].ns), before);
    assert!(
        !c.agent_log_all(0).contains("dataplane converged"),
        "restart changed the kernel:\n{}",
        c.agent_log_all(0)
    );
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
    // With natOutgoing off the external host sees the pod's own address (it routes pods via node0).
    ext.exec_ok(&["ip", "route", "add", "10.70.0.0/16", "via", "192.0.2.10"]);
    assert_eq!(peer_seen_by(&ext, &p0), ip0.to_string());
    // Removing node1 removes its routes from node0.
    c.kill_agent(1);
    c.cli_ok(&["delete", "node", "node1"], None);
    wait_for("node1's routes to go", || {
        !c.nodes[0]
            .ns
            .exec_ok(&["ip", "route"])
            .contains("via 192.0.2.11")
    });
}

/// A node's IPv4 routes, Trellis's routes in every table, and the VTEP's neighbours and FDB
/// entries, as JSON from iproute2 (IPv6 link-local routes come and go with DAD on their own).
fn trellis_state(ns: &TestNetns) -> Vec<String> {
    [
        &["ip", "-j", "route"][..],
        &["ip", "-j", "route", "show", "table", "all", "proto", "231"],
        &["ip", "-j", "neigh", "show", "dev", "vxlan.trellis"],
        &["bridge", "-j", "fdb", "show", "dev", "vxlan.trellis"],
    ]
    .iter()
    .map(|argv| ns.exec_ok(argv))
    .collect()
}

/// `ip monitor route neigh` (which also reports FDB entries) in a namespace, started and
/// finished on marker routes it is seen to print, so it covers exactly the span between.
struct KernelMonitor {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl KernelMonitor {
    /// Marker routes: the first printed proves the monitor listens, the last that it has
    /// printed everything before it.
    const FIRST: &'static str = "198.51.100.77";
    const LAST: &'static str = "198.51.100.78";

    fn start(ns: &TestNetns) -> KernelMonitor {
        use std::io::BufRead;
        let mut child = ns
            .command("ip")
            .args(["-o", "monitor", "route", "neigh"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        let m = KernelMonitor { child, lines };
        // The monitor subscribes some time after it starts: add the marker until it shows.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            ns.exec_ok(&["ip", "route", "add", "blackhole", Self::FIRST]);
            let shown = Instant::now() + Duration::from_millis(300);
            while Instant::now() < shown && !m.saw(&format!("blackhole {}", Self::FIRST)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            ns.exec_ok(&["ip", "route", "del", "blackhole", Self::FIRST]);
            if m.saw(&format!("blackhole {}", Self::FIRST)) {
                return m;
            }
            assert!(Instant::now() < deadline, "ip monitor never listened");
        }
    }

    fn saw(&self, what: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(what))
    }

    /// Everything printed between the markers (`ns` is the one it was started in).
    fn finish(self, ns: &TestNetns) -> Vec<String> {
        ns.exec_ok(&["ip", "route", "add", "blackhole", Self::LAST]);
        wait_for("the monitor to catch up", || {
            self.saw(&format!("blackhole {}", Self::LAST))
        });
        ns.exec_ok(&["ip", "route", "del", "blackhole", Self::LAST]);
        let lines = self.lines.lock().unwrap().clone();
        lines
            .into_iter()
            .filter(|l| !l.contains(Self::FIRST) && !l.contains(Self::LAST))
            .collect()
    }
}

impl Drop for KernelMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A namespace outside the cluster on the nodes' segment.
fn external_host(c: &Cluster, addr: &str) -> TestNetns {
    let ext = TestNetns::new("xext");
    let ctl = c.control.as_ref().unwrap();
    let out = std::process::Command::new("ip")
        .args([
            "link",
            "add",
            "eth0",
            "netns",
            ext.name(),
            "type",
            "veth",
            "peer",
            "name",
            "vext",
            "netns",
            ctl.name(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    ctl.exec_ok(&["ip", "link", "set", "vext", "master", "br0", "up"]);
    ext.exec_ok(&["ip", "addr", "add", addr, "dev", "eth0"]);
    ext.exec_ok(&["ip", "link", "set", "eth0", "up"]);
    ext
}

/// Connects from `pod` to a one-shot TCP listener on `ext` and returns the peer address the
/// listener saw. Bounded: the listener and the client each give up after a few seconds.
fn peer_seen_by(ext: &TestNetns, pod: &TestNetns) -> String {
    use std::io::BufRead;
    let server = "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',7070));s.listen(1);print('listening',flush=True);s.settimeout(8);c,a=s.accept();print(a[0]);c.close()";
    let mut listener = ext
        .command("python3")
        .args(["-c", server])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Connect only once the listener says it listens (its output ends within 8 s either way).
    let mut lines = std::io::BufReader::new(listener.stdout.take().unwrap()).lines();
    let ready = lines.next().and_then(Result::ok);
    assert_eq!(
        ready.as_deref(),
        Some("listening"),
        "the listener did not start"
    );
    let client = "import socket;socket.create_connection(('192.0.2.100',7070),timeout=5).close()";
    let _ = pod.exec(&["python3", "-c", client]);
    let seen = lines.next().and_then(Result::ok).unwrap_or_default();
    let _ = listener.wait();
    seen.trim().to_string()
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

/// etcd goes away under running agents: they keep repairing kernel drift from their last view;
/// when it is back their watches are re-established (list + watch), and a later change reaches
/// the kernel long before the resync period (10 minutes here, so only the watch can bring it).
#[test]
fn agents_follow_the_datastore_through_an_etcd_restart() {
    let mut c = Cluster::new_with("xetcd", true, 2, &["--resync", "600"]);
    c.cli_ok(&["apply", "-f", "-"], Some(&pool("VXLAN", false)));
    let _ = c.add_pod(1, "xep1");
    let vxlan_route = |c: &Cluster| {
        c.nodes[0]
            .ns
            .exec_ok(&["ip", "route"])
            .lines()
            .find(|l| l.contains("dev vxlan.trellis proto 231 onlink"))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
    };
    wait_for("node1's block routed over VXLAN on node0", || {
        vxlan_route(&c).is_some()
    });
    let dst = vxlan_route(&c).unwrap();
    c.stop_etcd();
    wait_for("node0 to notice etcd is gone", || {
        c.agent_log_all(0).contains("; listing again")
    });
    c.nodes[0].ns.exec_ok(&["ip", "route", "del", &dst]);
    wait_for("the route to come back with etcd down", || {
        vxlan_route(&c).as_deref() == Some(dst.as_str())
    });
    c.restart_etcd();
    wait_for("node0's watch to be re-established", || {
        c.agent_log_all(0)
            .contains("datastore watch re-established")
    });
    // The CLI may need a moment while etcd elects itself leader again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c
        .cli(&["apply", "-f", "-"], Some(&pool("None", false)))
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "etcd did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
    // wait_for's deadline (20 s) is far inside the resync period (600 s).
    wait_for("node0 to route node1's block directly", || {
        c.nodes[0]
            .ns
            .exec_ok(&["ip", "route"])
            .contains(&format!("{dst} via 192.0.2.11 dev upl0 proto 231"))
    });
}
