//! BGP end to end in labs: a full mesh of Trellis nodes routing pods by BGP-learned routes and
//! switching live to a Trellis route reflector; BIRD top-of-rack routers per rack (eBGP) with an
//! outside client reaching pods, and the same with gobgpd; gobgpd as route reflector and as
//! route server; graceful restart keeping forwarding while an agent or BIRD restarts; TCP MD5,
//! GTSM, BGPFilters and bindMode. The helpers live here; [`frr`] runs FRR as ToR and as a
//! graceful restart helper, [`limits`] tests maxPrefixes, [`peer_input`] bad input from a peer.

#[path = "../common/mod.rs"]
mod common;
mod frr;
mod limits;
mod peer_input;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, lab_check, spawn_with_input, trellis, LabGuard};
use serde_json::Value;

/// Brings up a topology given as YAML text under `name`.
fn up(name: &str, yaml: &str) -> LabGuard {
    let guard = LabGuard(name.to_string());
    let path = std::env::temp_dir().join(format!("trellis-test-{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let (ok, out) = trellis(&["lab", "up", "-f", path.to_str().unwrap(), "--name", name]);
    let _ = std::fs::remove_file(&path);
    assert!(ok, "lab up {name}: {out}");
    guard
}

fn example(file: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../../examples/lab/{file}.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn exec(lab: &str, member: &str, argv: &[&str]) -> (bool, String) {
    let mut args = vec!["lab", "exec", lab, member, "--"];
    args.extend_from_slice(argv);
    trellis(&args)
}

fn datastore(lab: &str) -> String {
    format!("sqlite:/run/trellis/lab/{lab}/trellis.db")
}

/// Every node's BGPStatus.
fn status(lab: &str) -> Vec<Value> {
    let out = Command::new(bin("trellis"))
        .args([
            "--datastore",
            &datastore(lab),
            "bgp",
            "status",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn node_status(lab: &str, node: &str) -> Option<Value> {
    status(lab).into_iter().find(|s| s["node"] == node)
}

/// The peers in `node`'s BGP status (none while it has not reported).
fn peers(lab: &str, node: &str) -> Vec<Value> {
    node_status(lab, node)
        .and_then(|s| s["peers"].as_array().cloned())
        .unwrap_or_default()
}

/// Peer addresses of `node` in state Established.
fn established(lab: &str, node: &str) -> Vec<String> {
    peers(lab, node)
        .iter()
        .filter(|p| p["state"] == "Established")
        .map(|p| p["address"].as_str().unwrap().to_string())
        .collect()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn apply(lab: &str, yaml: &str) {
    let out = spawn_with_input(
        Command::new(bin("trellis"))
            .args(["--datastore", &datastore(lab), "apply", "-f", "-"])
            .stderr(Stdio::piped()),
        yaml,
    )
    .wait_with_output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until every node in `nodes` has `sessions` established sessions, then checks the lab's
/// reachability expectations.
fn converge(lab: &str, nodes: &[&str], sessions: usize) {
    for n in nodes {
        wait_for(&format!("{n}'s {sessions} session(s)"), 30, || {
            established(lab, n).len() == sessions
        });
    }
    check(lab);
}

fn check(lab: &str) {
    let (ok, out) = lab_check(lab, 60);
    assert!(ok, "lab check {lab}:\n{out}");
}

fn pod_ip(lab: &str, pod: &str) -> String {
    let s: Value = serde_json::from_slice(
        &std::fs::read(format!("/run/trellis/lab/{lab}/state.json")).unwrap(),
    )
    .unwrap();
    s["pod_ips"][pod].as_str().unwrap().to_string()
}

/// The /26 block (the lab's pools use the default size) a pod's address came from.
fn block_of(lab: &str, pod: &str) -> ipnet::IpNet {
    ipnet::IpNet::new(pod_ip(lab, pod).parse().unwrap(), 26)
        .unwrap()
        .trunc()
}

fn routes(lab: &str, member: &str) -> String {
    exec(lab, member, &["ip", "route"]).1
}

/// Waits (up to 20 s: routes arrive hop by hop) until `member`'s routes contain every line
/// fragment in `want`; the failure shows the table.
fn wait_routes(lab: &str, member: &str, want: &[&str], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = routes(lab, member);
        if want.iter().all(|w| r.contains(w)) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}:\n{r}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A bounded ping (its count and per-reply timeout bound it) running in the background.
struct Pinger {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Pinger {
    /// Waits for the first reply: traffic is flowing.
    fn first_reply(&mut self) {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.out.read_line(&mut line).unwrap();
            assert!(n > 0, "ping ended without a reply");
            if line.contains("bytes from") {
                return;
            }
        }
    }
}

fn ping(lab: &str, from: &str, to_ip: &str, count: u32) -> Pinger {
    let ns = format!("/var/run/netns/tl-{lab}-{from}");
    let mut child = Command::new("nsenter")
        .args([
            &format!("--net={ns}"),
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            to_ip,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    Pinger { child, out }
}

/// (transmitted, received) from ping's summary.
fn ping_result(mut p: Pinger) -> (u32, u32) {
    let mut out = String::new();
    p.out.read_to_string(&mut out).unwrap();
    p.child.wait().unwrap();
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("{out}"));
    let n: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|x| x.parse().ok())
        .collect();
    (n[0], n[1])
}

const MESH_WITH_RR: &str = "
name: x
bgp: {asNumber: 64512, nodeToNodeMesh: true}
pools:
  - {name: pods, cidr: 10.252.0.0/16, encapsulation: None}
subnets:
  - {name: rack1, cidr: 192.168.74.0/24}
nodes:
  - {name: node1, subnet: rack1, routeReflectorClusterID: 244.0.0.1, labels: {route-reflector: 'true'}}
  - {name: node2, subnet: rack1}
  - {name: node3, subnet: rack1}
  - {name: node4, subnet: rack1}
pods:
  - {name: a1, node: node1}
  - {name: b1, node: node2}
  - {name: c1, node: node3}
  - {name: d1, node: node4}
";

#[test]
fn full_mesh_then_live_switch_to_a_trellis_route_reflector() {
    let lab = "tbgpm";
    let _g = up(lab, MESH_WITH_RR);
    converge(lab, &["node1", "node2", "node3", "node4"], 3);
    wait_routes(
        lab,
        "node2",
        &["via 192.168.74.12 dev eth0 proto 231"],
        "BGP-learned route to node3's block",
    );
    // Add the reflector peering, then turn the mesh off, with traffic flowing between non-reflectors.
    let mut pinger = ping(lab, "b1", &pod_ip(lab, "c1"), 60);
    pinger.first_reply();
    apply(lab, "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: to-rr}\nspec: {nodeSelector: all(), peerSelector: route-reflector == 'true'}\n");
    wait_for("node2's session to the reflector", 30, || {
        peers(lab, "node2")
            .iter()
            .any(|p| p["type"] == "global" && p["state"] == "Established")
    });
    apply(lab, "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 64512, nodeToNodeMeshEnabled: false}\n");
    wait_for("node2 peering with the reflector only", 30, || {
        established(lab, "node2") == vec!["192.168.74.10".to_string()]
    });
    let (sent, got) = ping_result(pinger);
    assert!(
        got + 1 >= sent,
        "traffic broke during the switch: {got}/{sent}"
    );
    let rr = node_status(lab, "node1").unwrap();
    assert!(
        rr["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["type"] == "global (RR client)"),
        "{rr}"
    );
    assert_eq!(rr["routeReflectorClusterID"], "244.0.0.1");
    wait_routes(
        lab,
        "node2",
        &["via 192.168.74.12 dev eth0 proto 231"],
        "reflected route keeps node3 as next hop",
    );
    check(lab);
    let (ok, out) = trellis(&[
        "--datastore",
        &datastore(lab),
        "bgp",
        "status",
        "--node",
        "node2",
    ]);
    assert!(
        ok && out.contains("192.168.74.10") && out.contains("Established"),
        "{out}"
    );
    // The reflector's metrics: one established session per client, prefix counts per peer.
    let (ok, m) = exec(lab, "node1", &["python3", "-c", "import urllib.request;print(urllib.request.urlopen('http://192.168.74.10:9091/metrics').read().decode())"]);
    assert!(ok, "{m}");
    assert_eq!(
        m.matches("type=\"global (RR client)\"} 1").count(),
        3,
        "{m}"
    );
    assert!(
        m.contains("trellis_bgp_prefixes_accepted{peer=\"192.168.74.11\"} 1"),
        "{m}"
    );
    // nextHopMode: Self on the reflector's peering puts it in the data path of reflected routes.
    apply(lab, "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: to-rr}\nspec: {nodeSelector: all(), peerSelector: route-reflector == 'true', nextHopMode: Self}\n");
    let block3 = block_of(lab, "c1").to_string();
    wait_routes(
        lab,
        "node2",
        &[&format!("{block3} via 192.168.74.10 dev eth0 proto 231")],
        "node3's block via the reflector",
    );
    check(lab);
    // Removing a node: its agent gone and its Node deleted, the reflector drops the session
    // (stale routes included) and the other nodes lose the route to its block.
    let (pid, _) = agent_of(lab, "node4");
    // SAFETY: kill(2) on the agent process this test's lab started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (ok, out) = trellis(&["--datastore", &datastore(lab), "delete", "node", "node4"]);
    assert!(ok, "{out}");
    let block4 = block_of(lab, "d1").to_string();
    wait_for("node2 to lose node4's block", 30, || {
        !routes(lab, "node2").contains(&block4)
    });
    wait_for("the reflector to drop node4", 30, || {
        peers(lab, "node1").len() == 2
    });
    let (ok, _) = trellis(&[
        "--datastore",
        &datastore(lab),
        "bgp",
        "status",
        "--node",
        "node4",
    ]);
    assert!(!ok, "node4's BGP status went with it");
}

#[test]
fn bird_top_of_rack_per_rack_and_an_outside_client() {
    let lab = "tbgpt";
    // Besides its own ToR, r1n1 peers with rack 2's ToR through the router: eBGP multihop
    // (TTL 255). That ToR's next hop is not on r1n1's subnet; it resolves through r1n1's
    // default route (RFC 4271 §5.1.3), so its shorter paths to rack 2 win and are installed via
    // the router, while rack 1's block still comes from the own ToR.
    let yaml = example("bgp-tor").replace(
        "peers: [r2n1, r2n2, router]",
        "peers: [r2n1, r2n2, router, r1n1]",
    );
    let _g = up(lab, &yaml);
    wait_for("r1n1's multihop session to tor2", 30, || {
        established(lab, "r1n1").contains(&"192.168.72.100".to_string())
    });
    // The check covers pod↔pod across racks both ways and the client reaching pods without NAT.
    converge(lab, &["r1n2", "r2n1", "r2n2"], 1);
    let rack2 = |pod: &str| format!("{} via 192.168.71.1 dev eth0 proto 231", block_of(lab, pod));
    wait_routes(
        lab,
        "r1n1",
        &[
            "via 192.168.71.100 dev eth0 proto 231",
            &rack2("p21"),
            &rack2("p22"),
        ],
        "rack 1 through the own ToR, rack 2 through the multihop peer resolved via the router",
    );
    let (_, tor) = exec(
        lab,
        "tor1",
        &[
            "birdc",
            "-s",
            &format!("/run/trellis/lab/{lab}/tor1.bird.ctl"),
            "show",
            "route",
            "protocol",
            "peer_r1n1",
        ],
    );
    assert!(tor.contains("10.251."), "BIRD learned r1n1's block:\n{tor}");
    // Without the default route that next hop no longer resolves: rack 2 falls back to the
    // paths through the own ToR; with it back, the shorter paths return.
    let via = |gw: &str| {
        let r = routes(lab, "r1n1");
        r.contains(&format!("{} via {gw} ", block_of(lab, "p21")))
    };
    let (ok, out) = exec(lab, "r1n1", &["ip", "route", "del", "default"]);
    assert!(ok, "{out}");
    wait_for("rack 2 through the own ToR", 20, || via("192.168.71.100"));
    let (ok, out) = exec(
        lab,
        "r1n1",
        &["ip", "route", "add", "default", "via", "192.168.71.1"],
    );
    assert!(ok, "{out}");
    wait_for("rack 2 through the router again", 20, || {
        via("192.168.71.1")
    });
    // reachableBy: a host route to tor2 through the router, which the multihop paths resolve
    // through when the default route is gone again; the session is not reset by it.
    let tor2_peer = |extra: &str| {
        format!("apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {{name: lab-tor2-r1n1}}\nspec: {{node: r1n1, peerIP: 192.168.72.100, asNumber: 65002{extra}}}\n")
    };
    let since = |lab: &str| {
        peers(lab, "r1n1")
            .into_iter()
            .find(|p| p["address"] == "192.168.72.100" && p["state"] == "Established")
            .map(|p| p["since"].clone())
    };
    let before = since(lab).expect("the multihop session is up");
    apply(lab, &tor2_peer(", reachableBy: 192.168.71.1"));
    wait_routes(
        lab,
        "r1n1",
        &["192.168.72.100 via 192.168.71.1 dev eth0 proto 231"],
        "the reachableBy route to tor2",
    );
    let log = || std::fs::read_to_string(format!("/run/trellis/lab/{lab}/r1n1.log")).unwrap();
    let resolved = || {
        log()
            .matches("host routes changed; next hops resolve again")
            .count()
    };
    let decided = resolved();
    let (ok, out) = exec(lab, "r1n1", &["ip", "route", "del", "default"]);
    assert!(ok, "{out}");
    // The agent saw the default route go and decided again...
    wait_for("r1n1 to re-resolve without the default route", 20, || {
        resolved() > decided
    });
    // ...and the paths still resolve through the reachableBy route.
    assert!(
        via("192.168.71.1"),
        "rack 2 still through the router without a default route:\n{}",
        routes(lab, "r1n1")
    );
    check(lab);
    assert_eq!(since(lab), Some(before), "the session was not reset");
    let (ok, out) = exec(
        lab,
        "r1n1",
        &["ip", "route", "add", "default", "via", "192.168.71.1"],
    );
    assert!(ok, "{out}");
    apply(lab, &tor2_peer(""));
    wait_for("the reachableBy route to go", 20, || {
        !routes(lab, "r1n1").contains("192.168.72.100 via")
    });
}

#[test]
fn gobgp_top_of_rack_per_rack_and_an_outside_client() {
    // The ToR design again with gobgpd on the ToRs and the spine (the lab programs their
    // kernels from gobgpd's RIB, as zebra would).
    let lab = "tbgptg";
    let _g = up(
        lab,
        &example("bgp-tor").replace("daemon: bird", "daemon: gobgp"),
    );
    converge(lab, &["r1n1", "r1n2", "r2n1", "r2n2"], 1);
    let rack1 = format!(
        "{} via 192.168.72.100 dev eth0 proto 231",
        block_of(lab, "p11")
    );
    wait_routes(lab, "r2n2", &[&rack1], "rack 1's block through the ToR");
}

const GOBGP: &str = "
name: x
bgp: {nodeToNodeMesh: false}
pools:
  - {name: pods, cidr: 10.253.0.0/16, encapsulation: None}
subnets:
  - {name: rack1, cidr: 192.168.75.0/24}
nodes:
  - {name: n1, subnet: rack1, asNumber: ASN1}
  - {name: n2, subnet: rack1, asNumber: ASN2}
  - {name: n3, subnet: rack1, asNumber: ASN3}
external:
  - name: gobgp
    subnet: rack1
    bgp: {daemon: gobgp, asNumber: 64512, peers: [n1, n2, n3], MODE: true}
pods:
  - {name: p1, node: n1}
  - {name: p2, node: n2}
  - {name: p3, node: n3}
";

fn gobgp(lab: &str, mode: &str, asns: [u32; 3]) {
    let yaml = GOBGP
        .replace("MODE", mode)
        .replace("ASN1", &asns[0].to_string())
        .replace("ASN2", &asns[1].to_string())
        .replace("ASN3", &asns[2].to_string());
    let _g = up(lab, &yaml);
    converge(lab, &["n1", "n2", "n3"], 1);
    for (i, n) in ["192.168.75.10", "192.168.75.11", "192.168.75.12"]
        .iter()
        .enumerate()
    {
        let (ok, adj) = exec(lab, "gobgp", &["gobgp", "neighbor", n, "adj-in"]);
        assert!(
            ok && adj.contains("10.253."),
            "gobgpd received node {i}'s block:\n{adj}"
        );
    }
    // Next hops stay the nodes' own (reflection and route serving both keep them).
    wait_routes(
        lab,
        "n1",
        &["via 192.168.75.11 dev eth0 proto 231"],
        "n2's block from gobgpd",
    );
    if mode != "routeReflector" {
        return;
    }
    // A route injected at gobgpd reaches the nodes' kernels, and is withdrawn again.
    let (ok, out) = exec(
        lab,
        "gobgp",
        &[
            "gobgp",
            "global",
            "rib",
            "add",
            "198.51.100.0/24",
            "nexthop",
            "192.168.75.100",
        ],
    );
    assert!(ok, "{out}");
    wait_for("the injected route on n1", 20, || {
        routes(lab, "n1").contains("198.51.100.0/24 via 192.168.75.100 dev eth0 proto 231")
    });
    exec(
        lab,
        "gobgp",
        &["gobgp", "global", "rib", "del", "198.51.100.0/24"],
    );
    wait_for("the withdrawal on n1", 20, || {
        !routes(lab, "n1").contains("198.51.100.0/24")
    });
}

#[test]
fn gobgp_as_route_reflector_and_as_route_server() {
    gobgp("tbgpgr", "routeReflector", [64512, 64512, 64512]);
    gobgp("tbgpgs", "routeServer", [65301, 65302, 65303]);
}

#[test]
fn bird_route_reflector_with_trellis_clients() {
    let lab = "tbgpbrr";
    let yaml = GOBGP
        .replace("name: gobgp", "name: rr")
        .replace("daemon: gobgp", "daemon: bird")
        .replace("MODE", "routeReflector")
        .replace("ASN1", "64512")
        .replace("ASN2", "64512")
        .replace("ASN3", "64512");
    let _g = up(lab, &yaml);
    converge(lab, &["n1", "n2", "n3"], 1);
    wait_routes(
        lab,
        "n1",
        &[
            "via 192.168.75.11 dev eth0 proto 231",
            "via 192.168.75.12 dev eth0 proto 231",
        ],
        "reflected routes keep the nodes as next hops",
    );
    // BIRD restarts gracefully (`birdc graceful restart`, then `bird -R`): its clients keep
    // the reflected routes as stale while it is away and forwarding never stops.
    let p2 = pod_ip(lab, "p2");
    let pinger = ping(lab, "p1", &p2, 60);
    let (pid, argv) = process_of(lab, "rr", "bird");
    let ctl = format!("/run/trellis/lab/{lab}/rr.bird.ctl");
    let (ok, out) = exec(lab, "rr", &["birdc", "-s", &ctl, "graceful", "restart"]);
    assert!(ok, "{out}");
    wait_for("BIRD to exit", 20, || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    wait_for("n1 to see the reflector gone", 20, || {
        established(lab, "n1").is_empty()
    });
    let r = routes(lab, "n1");
    assert!(
        r.contains("via 192.168.75.11 dev eth0 proto 231"),
        "stale routes kept while BIRD restarts:\n{r}"
    );
    // With BIRD away, pods still reach each other over the stale routes.
    let (sent, got) = ping_result(ping(lab, "p1", &p2, 3));
    assert_eq!(got, sent, "forwarding while BIRD is away");
    let recovering: Vec<String> = argv.into_iter().chain(["-R".to_string()]).collect();
    let mut bird = respawn(lab, "rr", &recovering);
    converge(lab, &["n1", "n2", "n3"], 1);
    forwarded_through_a_graceful_restart(lab, pinger, "BIRD");
    wait_for(
        "n1 to take BIRD's End-of-RIB and drop what stayed stale",
        20,
        || {
            std::fs::read_to_string(format!("/run/trellis/lab/{lab}/n1.log"))
                .unwrap()
                .contains("End-of-RIB after restart")
        },
    );
    wait_routes(
        lab,
        "n1",
        &["via 192.168.75.11 dev eth0 proto 231"],
        "the reflected route, fresh again",
    );
    // The lab's `down` would also end it; stop it here so the test waits on its child.
    let _ = bird.kill();
    let _ = bird.wait();
}

const PAIR: &str = "
name: x
bgp: {asNumber: 64512}
pools:
  - {name: pods, cidr: 10.254.0.0/16, encapsulation: None}
subnets:
  - {name: rack1, cidr: 192.168.76.0/24}
nodes:
  - {name: n1, subnet: rack1}
  - {name: n2, subnet: rack1}
external:
  - {name: peer, subnet: rack1}
pods:
  - {name: p1, node: n1}
  - {name: p2, node: n2}
";

/// `, FIELDS` to append to a YAML flow mapping (nothing for none).
fn more_fields(fields: &str) -> String {
    if fields.is_empty() {
        String::new()
    } else {
        format!(", {fields}")
    }
}

/// `{daemon: D, asNumber: 65001, peers: [n1]}` for a ToR, with `extra` settings (which the
/// lab also puts on n1's BGPPeer).
fn tor(daemon: &str, extra: &str) -> String {
    let extra = more_fields(extra);
    format!("  - name: tor\n    subnet: rack1\n    bgp: {{daemon: {daemon}, asNumber: 65001, peers: [n1]{extra}}}")
}

/// n1's BGPPeer towards the ToR with `extra` settings.
fn tor_peer(extra: &str) -> String {
    let extra = more_fields(extra);
    format!("apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {{name: lab-tor-n1}}\nspec: {{node: n1, peerIP: 192.168.76.100, asNumber: 65001{extra}}}\n")
}

/// A BIRD ToR with `protection` on its session with n1 (and on n1's BGPPeer): the session comes
/// up; with n1's side changed to `bad` it drops and stays down while n1 keeps trying (its
/// segments counted at the ToR) and the mesh session is untouched. Returns the lab's guard.
fn refused_when_misconfigured(lab: &str, protection: &str, bad: &str) -> LabGuard {
    let g = up(
        lab,
        &PAIR.replace("  - {name: peer, subnet: rack1}", &tor("bird", protection)),
    );
    converge(lab, &["n1"], 2);
    apply(lab, &tor_peer(bad));
    wait_for(&format!("the session to drop on {bad}"), 20, || {
        !tor_up(lab)
    });
    count_segments_from_n1(lab);
    // n1 keeps trying — SYNs of new attempts, or retransmissions of what the ToR's answers
    // (dropped by n1) never acknowledged, each answered again by the ToR — and none of it
    // brings the session up.
    wait_for("n1 to keep trying", 60, || {
        assert!(!tor_up(lab), "{bad} must not bring the session up");
        segments_from_n1(lab) >= 3
    });
    assert!(!tor_up(lab), "{bad} must not bring the session up");
    assert_eq!(
        established(lab, "n1"),
        vec!["192.168.76.11".to_string()],
        "the mesh session is untouched"
    );
    g
}

/// Counts the TCP segments n1 sends to the ToR (BGP is all they speak TCP for): an nftables
/// counter in the ToR's namespace (which the test's lab made), from now on.
fn count_segments_from_n1(lab: &str) {
    let rule = "ip saddr 192.168.76.10 meta l4proto tcp counter";
    for cmd in [
        "add table inet trellis_test".to_string(),
        "add chain inet trellis_test input { type filter hook input priority 0; policy accept; }"
            .to_string(),
        format!("add rule inet trellis_test input {rule}"),
    ] {
        let (ok, out) = exec(lab, "tor", &["nft", &cmd]);
        assert!(ok, "nft {cmd}: {out}");
    }
}

/// The segments counted since [`count_segments_from_n1`].
fn segments_from_n1(lab: &str) -> u64 {
    let (ok, out) = exec(
        lab,
        "tor",
        &["nft", "list", "table", "inet", "trellis_test"],
    );
    assert!(ok, "{out}");
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "packets")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or_else(|| panic!("no counter in:\n{out}"))
}

fn tor_up(lab: &str) -> bool {
    established(lab, "n1").contains(&"192.168.76.100".to_string())
}

#[test]
fn tcp_md5_passwords_protect_sessions() {
    // BIRD signs and checks every segment: the session comes up only if the agent does too.
    let lab = "tbgpmd5";
    let _g = refused_when_misconfigured(lab, "password: s3cret-md5", "password: wrong");
    apply(lab, &tor_peer("password: s3cret-md5"));
    wait_for("the session back with the right key", 30, || tor_up(lab));
}

#[test]
fn gtsm_interoperates_and_is_enforced() {
    // RFC 5082 with ToRs that check it: they drop segments sent with less than TTL 255, so the
    // sessions come up only because the agent sends 255.
    for (lab, daemon) in [("tbgpgtb", "bird"), ("tbgpgtg", "gobgp")] {
        let _g = up(
            lab,
            &PAIR.replace(
                "  - {name: peer, subnet: rack1}",
                &tor(daemon, "ttlSecurity: 1"),
            ),
        );
        converge(lab, &["n1"], 2);
        // The ToR's side too: a first segment can slip in before its check applies, so the
        // agent's view alone could be one-sided.
        wait_for(&format!("{daemon} to see the session up"), 20, || {
            let (_, out) = match daemon {
                "bird" => exec(
                    lab,
                    "tor",
                    &[
                        "birdc",
                        "-s",
                        &format!("/run/trellis/lab/{lab}/tor.bird.ctl"),
                        "show",
                        "protocols",
                        "peer_n1",
                    ],
                ),
                _ => exec(lab, "tor", &["gobgp", "neighbor"]),
            };
            out.lines().any(|l| {
                (l.contains("peer_n1") || l.contains("192.168.76.10 ")) && l.contains("Establ")
            })
        });
    }
    // The agent's own check: a ToR without GTSM sends TTL 1 to a directly connected eBGP peer,
    // which the agent then drops (IP_MINTTL 255). (Not restored here: a connection whose
    // segments one side drops lingers half-open on BIRD's side until its hold timer.)
    refused_when_misconfigured("tbgpgte", "", "ttlSecurity: 1");
}

#[test]
fn bgp_filters_apply_live_on_import_and_export() {
    let lab = "tbgpflt";
    let _g = up(
        lab,
        &PAIR.replace("  - {name: peer, subnet: rack1}", &tor("gobgp", "")),
    );
    converge(lab, &["n1"], 2);
    let inject = |prefix: &str| {
        let (ok, out) = exec(
            lab,
            "tor",
            &[
                "gobgp",
                "global",
                "rib",
                "add",
                prefix,
                "nexthop",
                "192.168.76.100",
            ],
        );
        assert!(ok, "{out}");
    };
    inject("0.0.0.0/0");
    inject("198.51.100.0/24");
    let block1 = block_of(lab, "p1").to_string();
    let tor_has_block1 = || {
        exec(
            lab,
            "tor",
            &["gobgp", "neighbor", "192.168.76.10", "adj-in"],
        )
        .1
        .contains(&block1)
    };
    wait_routes(
        lab,
        "n1",
        &[
            "default via 192.168.76.100 dev eth0 proto 231",
            "198.51.100.0/24 via 192.168.76.100",
        ],
        "gobgpd's routes, the default route included",
    );
    wait_for("gobgpd to learn n1's block", 20, tor_has_block1);
    // Calico's BGPFilter: no default route from the ToR, and n1's pod block not sent to it.
    apply(
        lab,
        &format!(
            "apiVersion: projectcalico.org/v3\nkind: BGPFilter\nmetadata: {{name: tor-policy}}\nspec:\n  importV4: [{{action: Reject, matchOperator: Equal, cidr: 0.0.0.0/0}}]\n  exportV4: [{{action: Reject, matchOperator: Equal, cidr: {block1}}}]\n---\n{}",
            tor_peer("filters: [tor-policy]")
        ),
    );
    wait_for("the default route to go", 20, || {
        !routes(lab, "n1").contains("default via 192.168.76.100 dev eth0 proto 231")
    });
    wait_for("gobgpd to lose n1's block", 20, || !tor_has_block1());
    assert!(routes(lab, "n1").contains("198.51.100.0/24 via 192.168.76.100"));
    // Applied without resetting the session (ROUTE-REFRESH for the import side).
    let log = std::fs::read_to_string(format!("/run/trellis/lab/{lab}/n1.log")).unwrap();
    assert!(
        log.contains("BGP filters changed")
            && !log.contains("BGP session down peer=192.168.76.100"),
        "{log}"
    );
    // Without the filter, both come back.
    apply(lab, &tor_peer(""));
    wait_routes(
        lab,
        "n1",
        &["default via 192.168.76.100 dev eth0 proto 231"],
        "the default route back",
    );
    wait_for("gobgpd to learn n1's block again", 20, tor_has_block1);
}

#[test]
fn bind_mode_node_ip_listens_on_the_node_address_only() {
    let lab = "tbgpbind";
    let _g = up(lab, PAIR);
    converge(lab, &["n1"], 1);
    let listening = || exec(lab, "n1", &["ss", "-ltnH", "sport = :179"]).1;
    assert!(listening().contains("0.0.0.0:179"), "{}", listening());
    apply(lab, "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 64512, bindMode: NodeIP}\n");
    wait_for("the listener on the node's address", 20, || {
        let l = listening();
        l.contains("192.168.76.10:179") && !l.contains("0.0.0.0:179")
    });
    // n2 (the higher router ID) opens the mesh session: restarted, it comes in through the
    // new listener.
    let (pid, argv) = agent_of(lab, "n2");
    // SAFETY: kill(2) on the agent process this test's lab started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("n1 to see n2 gone", 20, || {
        established(lab, "n1").is_empty()
    });
    let mut n2 = respawn(lab, "n2", &argv);
    wait_for(
        "the mesh session through the node-address listener",
        30,
        || established(lab, "n1").len() == 1,
    );
    let _ = n2.kill();
    let _ = n2.wait();
}

/// Starts `argv` again in a lab member's namespace, its stderr appended to the member's log.
fn respawn(lab: &str, member: &str, argv: &[String]) -> Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(format!("/run/trellis/lab/{lab}/{member}.log"))
        .unwrap();
    Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/tl-{lab}-{member}"))
        .args(argv)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// The agent process of a lab node, with its command line.
fn agent_of(lab: &str, node: &str) -> (i32, Vec<String>) {
    process_of(lab, node, "agent")
}

/// The process in a lab member's namespace whose command line has the word `word`.
fn process_of(lab: &str, member: &str, word: &str) -> (i32, Vec<String>) {
    let pids = Command::new("ip")
        .args(["netns", "pids", &format!("tl-{lab}-{member}")])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv: Vec<String> = cmd
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.iter().any(|a| a == word) {
            return (pid.parse().unwrap(), argv);
        }
    }
    panic!("no {word} in {member}");
}

#[test]
fn graceful_restart_keeps_forwarding_while_an_agent_restarts() {
    let lab = "tbgpgr2";
    let _g = up(lab, PAIR);
    wait_for("the mesh session", 30, || established(lab, "n1").len() == 1);
    check(lab);
    let p2 = pod_ip(lab, "p2");
    let pinger = ping(lab, "p1", &p2, 50);
    let (pid, argv) = agent_of(lab, "n2");
    // SAFETY: kill(2) on the agent process this test's lab started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // n1 noticed the session loss and kept n2's routes as stale.
    wait_for("n1 to see the session down", 20, || {
        established(lab, "n1").is_empty()
    });
    wait_for("n1 to take the loss as a graceful restart", 20, || {
        std::fs::read_to_string(format!("/run/trellis/lab/{lab}/n1.log"))
            .unwrap()
            .contains("BGP session down peer=192.168.76.11 reason=connection closed graceful=true")
    });
    let r = routes(lab, "n1");
    assert!(
        r.contains("via 192.168.76.11 dev eth0 proto 231"),
        "stale route kept during the restart:\n{r}"
    );
    let mut child = respawn(lab, "n2", &argv);
    wait_for("the session back", 30, || established(lab, "n1").len() == 1);
    forwarded_through_a_graceful_restart(lab, pinger, "n2's agent");
    // The lab's `down` would also end it; stop it here so the test waits on its child.
    let _ = child.kill();
    let _ = child.wait();
}

/// The ping across `who`'s restart lost at most one packet, and n1 took the session loss as a
/// graceful restart.
fn forwarded_through_a_graceful_restart(lab: &str, pinger: Pinger, who: &str) {
    let (sent, got) = ping_result(pinger);
    assert!(
        got + 1 >= sent,
        "forwarding broke while {who} restarted: {got}/{sent}"
    );
    let n1log = std::fs::read_to_string(format!("/run/trellis/lab/{lab}/n1.log")).unwrap();
    assert!(
        n1log.contains("graceful=true"),
        "n1 treated {who}'s restart as graceful"
    );
}
