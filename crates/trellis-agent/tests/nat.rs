//! natOutgoing for IPv6 pools, against the kernel: a node namespace between a pod namespace
//! (in the pool) and an external host gets the agent's ruleset through the agent's own apply
//! function; the external host sees the pod's connection come from the node's IPv6 address,
//! and Trellis's tables are the only ones there.

use std::io::BufRead;
use std::process::Stdio;

use trellis_agent::dataplane::{apply_nat, nat_ruleset};
use trellis_dataplane::Netns;
use trellis_resources::{parse_documents, IpPoolSpec, Resource};
use trellis_testutil::{veth_between, TestNetns};

fn pools(yaml: &str) -> Vec<(String, IpPoolSpec)> {
    parse_documents(yaml)
        .unwrap()
        .into_iter()
        .map(|r| match r {
            Resource::IpPool(p) => (p.metadata.name, p.spec),
            _ => unreachable!(),
        })
        .collect()
}

/// The address `ext` sees a TCP connection from `pod` come from. Bounded: the listener waits
/// at most 8 s for the connection, the client 5 s.
fn peer_seen_by(ext: &TestNetns, pod: &TestNetns) -> String {
    let server = "import socket;s=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('::',7070));s.listen(1);print('listening',flush=True);s.settimeout(8);c,a=s.accept();print(a[0]);c.close()";
    let mut listener = ext
        .command("python3")
        .args(["-c", server])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(listener.stdout.take().unwrap()).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("listening")
    );
    let client =
        "import socket;socket.create_connection(('2001:db8:7::100',7070),timeout=5).close()";
    let out = pod.exec(&["python3", "-c", client]);
    let seen = lines.next().and_then(Result::ok).unwrap_or_default();
    let _ = listener.wait();
    assert!(
        out.status.success(),
        "the pod could not connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    seen.trim().to_string()
}

#[test]
fn ipv6_pod_traffic_leaves_as_the_node() {
    let node = TestNetns::new("nat6n");
    let pod = TestNetns::new("nat6p");
    let ext = TestNetns::new("nat6x");
    // IPv4 link addresses only to satisfy the helper; the test's traffic is IPv6 (nodad, so
    // the addresses are usable at once).
    veth_between(&pod, "eth0", "192.0.2.2/30", &node, "pod0", "192.0.2.1/30");
    veth_between(&node, "eth1", "192.0.2.5/30", &ext, "eth0", "192.0.2.6/30");
    pod.exec_ok(&["ip", "addr", "add", "fd00:10::5/64", "dev", "eth0", "nodad"]);
    pod.exec_ok(&["ip", "route", "add", "default", "via", "fd00:10::1"]);
    node.exec_ok(&["ip", "addr", "add", "fd00:10::1/64", "dev", "pod0", "nodad"]);
    node.exec_ok(&[
        "ip",
        "addr",
        "add",
        "2001:db8:7::1/64",
        "dev",
        "eth1",
        "nodad",
    ]);
    node.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    // The external host has no route back to the pool: only masqueraded traffic can return.
    ext.exec_ok(&[
        "ip",
        "addr",
        "add",
        "2001:db8:7::100/64",
        "dev",
        "eth0",
        "nodad",
    ]);

    let rules = nat_ruleset(&pools(
        "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: v4}\nspec: {cidr: 10.1.0.0/16, natOutgoing: true}\n---\napiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: v6}\nspec: {cidr: 'fd00:10::/64', natOutgoing: true}\n",
    ));
    let handle = Netns::open(node.path()).unwrap();
    handle.run(|| apply_nat(&rules)).unwrap().unwrap();
    let tables = node.exec_ok(&["nft", "list", "tables"]);
    assert_eq!(
        tables.lines().collect::<Vec<_>>(),
        ["table ip trellis", "table ip6 trellis"],
        "{tables}"
    );
    assert_eq!(peer_seen_by(&ext, &pod), "2001:db8:7::1");

    // Without natOutgoing the ip6 table goes and the pod's own address is seen (given a route).
    let off = nat_ruleset(&pools(
        "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: v6}\nspec: {cidr: 'fd00:10::/64'}\n",
    ));
    handle.run(|| apply_nat(&off)).unwrap().unwrap();
    assert_eq!(node.exec_ok(&["nft", "list", "tables"]).trim(), "");
    ext.exec_ok(&["ip", "route", "add", "fd00:10::/64", "via", "2001:db8:7::1"]);
    assert_eq!(peer_seen_by(&ext, &pod), "fd00:10::5");
}

/// Pools whose CIDRs overlap (a stored pool written by an older version or directly; `apply`
/// refuses them) still get one valid ruleset: nft refuses overlapping elements in an interval
/// set, and the failed batch left natOutgoing off for every pool.
#[test]
fn overlapping_pools_do_not_turn_nat_off() {
    let node = TestNetns::new("natovl");
    let rules = nat_ruleset(&pools(
        "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.1.0.0/16, natOutgoing: true}\n---\napiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: b}\nspec: {cidr: 10.1.0.0/24, natOutgoing: true}\n---\napiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: c}\nspec: {cidr: 10.2.0.0/16}\n",
    ));
    let handle = Netns::open(node.path()).unwrap();
    handle
        .run(|| apply_nat(&rules))
        .unwrap()
        .expect("the ruleset applies");
    let masq = node.exec_ok(&["nft", "list", "set", "ip", "trellis", "masq_pools"]);
    assert!(masq.contains("10.1.0.0/16"), "{masq}");
    let all = node.exec_ok(&["nft", "list", "set", "ip", "trellis", "all_pools"]);
    assert!(
        all.contains("10.1.0.0/16") && all.contains("10.2.0.0/16"),
        "{all}"
    );
}
