//! FRR 8.4 (bgpd with zebra) in labs: as top-of-rack routers and spine, and as a graceful
//! restart helper whose routes a node must not keep when it dies.

use super::*;

#[test]
fn frr_top_of_rack_per_rack_and_an_outside_client() {
    // The ToR design with FRR 8.4 (bgpd, and zebra installing its routes) on the ToRs and the
    // spine: the check covers the client reaching pods through its FRR ToR.
    let lab = "tbgptf";
    let _g = up(
        lab,
        &example("bgp-tor").replace("daemon: bird", "daemon: frr"),
    );
    converge(lab, &["r1n1", "r1n2", "r2n1", "r2n2"], 1);
    let rack1 = format!(
        "{} via 192.168.72.100 dev eth0 proto 231",
        block_of(lab, "p11")
    );
    wait_routes(lab, "r2n2", &[&rack1], "rack 1's block through the FRR ToR");
    // zebra put what bgpd learned into the ToR's own kernel (its lines carry a nexthop ID).
    let block = block_of(lab, "p11").to_string();
    wait_for("r1n1's block in tor1's kernel", 20, || {
        routes(lab, "tor1").lines().any(|l| {
            l.starts_with(&format!("{block} "))
                && l.contains(" via 192.168.71.10 dev eth0 proto bgp")
        })
    });
    let sessions = vtysh(lab, "tor1", "show bgp summary");
    assert!(
        sessions.contains("192.168.71.10") && sessions.contains("192.168.71.11"),
        "{sessions}"
    );
}

/// Runs an FRR command (`vtysh -c`) against a lab member's own FRR instance.
fn vtysh(lab: &str, member: &str, command: &str) -> String {
    let sockets = format!("/run/trellis/lab/{lab}/{member}.frr");
    let (ok, out) = exec(
        lab,
        member,
        &["vtysh", "--vty_socket", &sockets, "-c", command],
    );
    assert!(ok, "vtysh -c {command:?}: {out}");
    out
}

#[test]
fn a_killed_frr_helper_loses_its_routes_at_once() {
    // FRR's default graceful restart is helper mode: its OPEN carries the capability with a
    // restart time of 120 s and no address family, so it preserves no forwarding state. When
    // its bgpd dies without a NOTIFICATION, RFC 4724 §4.2 retains nothing: the node must
    // withdraw FRR's routes from its kernel at once, not after the restart time.
    let lab = "tbgpfgr";
    let _g = up(
        lab,
        &PAIR.replace("  - {name: peer, subnet: rack1}", &tor("frr", "")),
    );
    converge(lab, &["n1"], 2);
    let neighbor = vtysh(lab, "tor", "show bgp neighbors 192.168.76.10");
    assert!(neighbor.contains("Local GR Mode: Helper"), "{neighbor}");
    vtysh_config(
        lab,
        "tor",
        &["address-family ipv4 unicast", "network 198.51.100.0/24"],
    );
    wait_routes(
        lab,
        "n1",
        &["198.51.100.0/24 via 192.168.76.100 dev eth0 proto 231"],
        "FRR's route on n1",
    );
    let log = || std::fs::read_to_string(format!("/run/trellis/lab/{lab}/n1.log")).unwrap();
    assert!(
        log().contains("peer=192.168.76.100 asn=65001 peer_id=192.168.76.100 hold=90 peer_gr=restart 120s, families []"),
        "n1 saw FRR's capability without families:\n{}",
        log()
    );
    let pidfile = format!("/run/trellis/lab/{lab}/tor.frr/bgpd.pid");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "bgpd", "the pid file names FRR's bgpd");
    // SAFETY: kill(2) on the bgpd this test's lab started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("bgpd to die", 10, || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    // Well within the 120 s restart time the node would otherwise keep them for.
    wait_for("n1 to withdraw FRR's route", 10, || {
        !routes(lab, "n1").contains("198.51.100.0/24")
    });
    assert!(
        log().contains(
            "BGP session down peer=192.168.76.100 reason=connection closed graceful=false"
        ),
        "the session ended without a NOTIFICATION and was not kept as a restart:\n{}",
        log()
    );
}

/// Enters FRR configuration lines under `router bgp 65001` on a lab member's FRR.
fn vtysh_config(lab: &str, member: &str, lines: &[&str]) {
    let sockets = format!("/run/trellis/lab/{lab}/{member}.frr");
    let mut argv = vec![
        "vtysh",
        "--vty_socket",
        &sockets,
        "-c",
        "configure terminal",
        "-c",
        "router bgp 65001",
    ];
    for l in lines {
        argv.extend(["-c", l]);
    }
    let (ok, out) = exec(lab, member, &argv);
    assert!(ok, "vtysh {lines:?}: {out}");
}
