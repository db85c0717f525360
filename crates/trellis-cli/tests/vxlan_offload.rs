//! The VTEP's transmit checksum offload (`--vxlan-checksum-offload`): on by default on this
//! kernel (it has the fix for the VXLAN/NAT checksum bug), off when forced off, turned back on
//! when a later agent wants it on; and with it on, encapsulated traffic whose outer header is
//! NATed crosses without a bad checksum or a delay.

mod common;

use std::io::BufRead;
use std::time::{Duration, Instant};

use common::Cluster;
use trellis_testutil::TestNetns;

const VTEP: &str = "vxlan.trellis";

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn vxlan_pool(nat: bool) -> String {
    format!("apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: pool\nspec:\n  cidr: 10.70.0.0/16\n  blockSize: 26\n  encapsulation: VXLAN\n  natOutgoing: {nat}\n")
}

/// An offload feature of a device as `ethtool -k` shows it (`None`: no such device yet).
fn feature(ns: &TestNetns, dev: &str, name: &str) -> Option<bool> {
    let out = ns.exec(&["ethtool", "-k", dev]);
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"));
    Some(v.starts_with("on"))
}

/// One counter of `/proc/net/snmp` in a namespace (e.g. `Udp`, `InCsumErrors`).
fn snmp(ns: &TestNetns, proto: &str, field: &str) -> u64 {
    let text = ns.exec_ok(&["cat", "/proc/net/snmp"]);
    let mut rows = text.lines().filter(|l| l.starts_with(&format!("{proto}:")));
    let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == field)
        .unwrap_or_else(|| panic!("no {proto} {field} in {text}"));
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// `bytes` sent from `client` to a one-shot TCP server on `server` (`addr`), which answers
/// with the count it received. Returns (count, seconds from connect to the answer), or an
/// error after at most ~10 s.
fn tcp_exchange(
    server: &TestNetns,
    client: &TestNetns,
    addr: &std::net::IpAddr,
    bytes: usize,
) -> Result<(usize, f64), String> {
    let serve = "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',7071));s.listen(1);print('listening',flush=True);s.settimeout(10);c,a=s.accept();c.settimeout(10);n=0\nwhile True:\n  d=c.recv(65536)\n  if not d: break\n  n+=len(d)\nc.sendall(str(n).encode());c.close()";
    let mut listener = server
        .command("python3")
        .args(["-c", serve])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(listener.stdout.take().unwrap()).lines();
    let ready = lines.next().and_then(Result::ok);
    if ready.as_deref() != Some("listening") {
        let _ = listener.kill();
        let _ = listener.wait();
        return Err("the server did not start".into());
    }
    let send = format!(
        "import socket,time;t=time.monotonic();c=socket.create_connection(('{addr}',7071),timeout=10);c.settimeout(10);c.sendall(b'x'*{bytes});c.shutdown(socket.SHUT_WR);r=b''\nwhile True:\n  d=c.recv(64)\n  if not d: break\n  r+=d\nprint(r.decode(),time.monotonic()-t)"
    );
    let out = client.exec(&["python3", "-c", &send]);
    let _ = listener.kill();
    let _ = listener.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    match (it.next().map(str::parse), it.next().map(str::parse)) {
        (Some(Ok(n)), Some(Ok(secs))) if out.status.success() => Ok((n, secs)),
        _ => Err(format!(
            "the exchange failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// On this kernel `auto` leaves the offload on, and a TCP exchange between pods on two nodes
/// whose VXLAN packets get their outer UDP header NATed on the way out — what kube-proxy's
/// `MASQUERADE --random-fully` does to encapsulated node→service traffic, the bug's trigger —
/// arrives with valid outer checksums and no delay. Trellis's own natOutgoing never NATs an
/// outer header (its source is the node, not a pool), so the test adds that NAT itself.
///
/// Across veths a packet keeps `CHECKSUM_PARTIAL` and its receiver never checks the outer
/// checksum, so a bad one would go unseen; node0's uplink therefore finishes checksums in
/// software (tx offload off on `upl0`, as a NIC would on the wire), and node1 checks them:
/// the bug showed as node1's UDP `InCsumErrors` rising and every packet of the flow dropped.
#[test]
fn offload_on_by_default_and_nated_vxlan_traffic_is_not_delayed() {
    let c = Cluster::new("vxck", false, 2);
    // node0 has the VTEP an earlier version made: same settings, but with the kernel's default
    // outer UDP checksum, which this path breaks even on this kernel; the agent replaces it.
    let mac = trellis_agent::dataplane::vtep_mac("node0")
        .map(|b| format!("{b:02x}"))
        .join(":");
    c.nodes[0].ns.exec_ok(&[
        "ip",
        "link",
        "add",
        VTEP,
        "address",
        &mac,
        "mtu",
        "1450",
        "type",
        "vxlan",
        "id",
        "4096",
        "dstport",
        "4789",
        "local",
        "192.0.2.10",
        "dev",
        "upl0",
        "nolearning",
        "udpcsum",
    ]);
    c.cli_ok(&["apply", "-f", "-"], Some(&vxlan_pool(true)));
    let (p0, _) = c.add_pod(0, "vxckp0");
    let (p1, ip1) = c.add_pod(1, "vxckp1");
    let n0 = &c.nodes[0].ns;
    let n1 = &c.nodes[1].ns;
    // The agent recreates the old VTEP (delete, then add), so the device may briefly not exist.
    wait_for("node1's FDB entry on node0", || {
        let out = n0.exec(&["bridge", "fdb", "show", "dev", VTEP]);
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("dst 192.0.2.11 self permanent")
    });
    assert!(
        c.agent_log_all(0).contains("recreating vxlan.trellis"),
        "{}",
        c.agent_log_all(0)
    );
    for (i, ns) in [n0, n1].into_iter().enumerate() {
        assert!(
            ns.exec_ok(&["ip", "-d", "link", "show", VTEP])
                .contains(" noudpcsum "),
            "node{i}'s VTEP has an outer UDP checksum"
        );
        assert_eq!(feature(ns, VTEP, "tx-checksumming"), Some(true), "node{i}");
        assert_eq!(
            feature(ns, VTEP, "tx-tcp-segmentation"),
            Some(true),
            "node{i}"
        );
        let log = c.agent_log_all(i);
        assert!(
            log.contains("VXLAN tx checksum offload on")
                && log.contains("has the VXLAN/NAT checksum fix"),
            "node{i} does not say which applies and why:\n{log}"
        );
    }
    n0.exec_ok(&["ethtool", "-K", "upl0", "tx", "off"]);
    let nat = "table ip itest_vxnat {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n  udp dport 4789 counter masquerade fully-random\n }\n}\n";
    let mut nft = n0.command("nft");
    nft.args(["-f", "-"]);
    let out = common::spawn_with_input(&mut nft, nat)
        .wait_with_output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let errors_before = snmp(n1, "Udp", "InCsumErrors");
    let bytes = 4 << 20;
    let (got, secs) = tcp_exchange(&p1, &p0, &ip1, bytes).unwrap_or_else(|e| {
        panic!(
            "{e}\nnode1 UDP InCsumErrors {} → {}",
            errors_before,
            snmp(n1, "Udp", "InCsumErrors")
        )
    });
    eprintln!("4 MiB across NATed VXLAN in {:.1} ms", secs * 1e3);
    assert_eq!(got, bytes);
    let counter = n0.exec_ok(&["nft", "list", "chain", "ip", "itest_vxnat", "post"]);
    let nated: u64 = counter
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(nated > 0, "no outer header was NATed:\n{counter}");
    assert_eq!(
        snmp(n1, "Udp", "InCsumErrors"),
        errors_before,
        "node1 received VXLAN packets with bad outer checksums"
    );
    // Within the first SYN retransmission timeout (1 s): a single lost packet of the
    // handshake shows here, and the bug's loss of every packet never completes at all.
    assert!(secs < 1.0, "the exchange took {secs:.2} s");
}

/// Forced off, the VTEP has no offload (and no segmentation offload); a later agent with the
/// offload on turns it back on instead of inheriting the device as it is.
#[test]
fn forced_off_turns_it_off_and_a_later_agent_turns_it_back_on() {
    let mut c = Cluster::new_with("vxoff", false, 1, &["--vxlan-checksum-offload", "off"]);
    c.cli_ok(&["apply", "-f", "-"], Some(&vxlan_pool(false)));
    wait_for("the VTEP with offload off", || {
        feature(&c.nodes[0].ns, VTEP, "tx-checksumming") == Some(false)
    });
    assert_eq!(
        feature(&c.nodes[0].ns, VTEP, "tx-tcp-segmentation"),
        Some(false)
    );
    assert!(
        c.agent_log_all(0)
            .contains("vxlanChecksumOffload is off (forced)"),
        "{}",
        c.agent_log_all(0)
    );
    c.kill_agent(0);
    c.agent_args = vec!["--vxlan-checksum-offload".into(), "on".into()];
    c.start_agent(0);
    wait_for("the VTEP with offload back on", || {
        feature(&c.nodes[0].ns, VTEP, "tx-checksumming") == Some(true)
    });
    assert_eq!(
        feature(&c.nodes[0].ns, VTEP, "tx-tcp-segmentation"),
        Some(true)
    );
    wait_for("the agent to say it turned the offload on", || {
        c.agent_log_all(0).contains("tx checksum offload turned on")
    });
}
