//! The agent's `/healthz` and `/readyz` (on its metrics listener) and `trellis node status`
//! (over its socket), with a real agent: ready once started; not ready, naming the datastore,
//! while etcd is stopped, and ready again once it is back; not ready, naming BGP, while a
//! configured peer never comes up or the speaker cannot bind its port.

mod common;

use std::time::{Duration, Instant};

use std::process::Command;

use common::{bin, Cluster};

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET path` on node 0's metrics listener `addr`: (status, body).
fn get(c: &Cluster, addr: &str, path: &str) -> (u16, String) {
    let out = c.nodes[0].ns.exec(&[
        "curl",
        "-s",
        "--max-time",
        "5",
        "-w",
        "\n%{http_code}",
        &format!("http://{addr}{path}"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `trellis node status` against node 0's socket: (exit code, output).
fn node_status(c: &Cluster) -> (i32, String) {
    let out = std::process::Command::new(bin("trellis"))
        .args(["node", "status", "--socket"])
        .arg(&c.nodes[0].socket)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Waits until `/readyz` answers `code` with a body containing `needle`; returns the body.
fn wait_readyz(c: &Cluster, addr: &str, code: u16, needle: &str, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = get(c, addr, "/readyz");
        if last.0 == code && last.1.contains(needle) {
            return last.1;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: last answer {} {}\nagent log:\n{}",
            last.0,
            last.1,
            c.agent_log(0)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn readiness_follows_the_datastore() {
    let addr = "192.0.2.10:9095";
    let mut c = Cluster::new_with("hlds", true, 1, &["--metrics-listen", addr]);
    let body = wait_readyz(&c, addr, 200, "\nready\n", "the agent to be ready");
    for check in [
        "ok   datastore:",
        "ok   dataplane:",
        "ok   bgp: speaker off",
    ] {
        assert!(body.contains(check), "{check}: {body}");
    }
    let (code, live) = get(&c, addr, "/healthz");
    assert_eq!(code, 200, "{live}");
    assert!(
        live.starts_with("ok   loop/dataplane:") && live.ends_with("live\n"),
        "{live}"
    );
    let (code, status) = node_status(&c);
    assert_eq!(code, 0, "{status}");
    assert!(
        status.starts_with("node node0\n") && status.ends_with("\nready\n"),
        "{status}"
    );
    let out = std::process::Command::new(bin("trellis"))
        .args(["node", "status", "-o", "json", "--socket"])
        .arg(&c.nodes[0].socket)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["node"], "node0");
    assert_eq!(v["report"]["ready"], true, "{v}");
    assert_eq!(v["report"]["checks"][1]["name"], "datastore", "{v}");

    c.stop_etcd();
    let body = wait_readyz(
        &c,
        addr,
        503,
        "not ready: datastore",
        "not ready on etcd's stop",
    );
    assert!(body.contains("FAIL datastore: unreachable"), "{body}");
    // The agent is alive: a store outage is no reason to restart it.
    let (code, live) = get(&c, addr, "/healthz");
    assert_eq!(code, 200, "{live}");
    let (code, status) = node_status(&c);
    eprintln!("{status}");
    assert_eq!(code, 1, "{status}");
    assert!(status.contains("FAIL datastore"), "{status}");

    c.restart_etcd();
    wait_readyz(&c, addr, 200, "\nready\n", "ready again once etcd is back");
    let (code, status) = node_status(&c);
    assert_eq!(code, 0, "{status}");
}

/// A datastore that hangs (etcd frozen: connections open, no answer) rather than refusing:
/// every probe still answers within its own timeout (the answers come from memory), readiness
/// turns to not ready naming the datastore once the heartbeat write is overdue, liveness
/// stays, and readiness comes back once etcd answers again.
#[test]
fn probes_answer_while_the_datastore_hangs() {
    let addr = "192.0.2.10:9099";
    let c = Cluster::new_with("hlslow", true, 1, &["--metrics-listen", addr]);
    wait_readyz(&c, addr, 200, "\nready\n", "the agent to be ready");
    c.pause_etcd();
    let resume = Resume(&c);
    // Each probe is answered within curl's 5 s (an unanswered one reads as code 0).
    let body = wait_readyz(
        &c,
        addr,
        503,
        "not ready: datastore",
        "not ready while etcd hangs",
    );
    // Overdue heartbeat, or the client's own request timeout, whichever comes first.
    assert!(body.contains("FAIL datastore: "), "{body}");
    for _ in 0..3 {
        let started = Instant::now();
        let (code, live) = get(&c, addr, "/healthz");
        assert_eq!(code, 200, "{live}");
        let (code, ready) = get(&c, addr, "/readyz");
        assert_eq!(code, 503, "{ready}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    let (code, status) = node_status(&c);
    assert_eq!(code, 1, "{status}");
    drop(resume);
    wait_readyz(&c, addr, 200, "\nready\n", "ready once etcd answers again");
}

/// Resumes a paused etcd when dropped (also on a failed assertion).
struct Resume<'a>(&'a Cluster);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.resume_etcd();
    }
}

#[test]
fn readiness_needs_configured_bgp_sessions_established() {
    let addr = "192.0.2.10:9096";
    let c = Cluster::new_with(
        "hlbgp",
        false,
        1,
        &["--bgp", "on", "--metrics-listen", addr],
    );
    let body = wait_readyz(&c, addr, 200, "\nready\n", "the agent to be ready");
    assert!(
        body.contains("ok   bgp: 0 session(s) Established"),
        "{body}"
    );

    // A peer nothing answers for (on the node's subnet, no host there).
    let peer = "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: nobody}\nspec: {peerIP: 192.0.2.99, asNumber: 65099}\n";
    c.cli_ok(&["apply", "-f", "-"], Some(peer));
    let body = wait_readyz(
        &c,
        addr,
        503,
        "not ready: bgp",
        "not ready with a peer down",
    );
    assert!(
        body.contains("FAIL bgp: not Established: 192.0.2.99"),
        "{body}"
    );
    let (code, status) = node_status(&c);
    assert_eq!(code, 1, "{status}");
    assert!(status.contains("not ready: bgp"), "{status}");

    c.cli_ok(&["delete", "bgppeer", "nobody"], None);
    wait_readyz(&c, addr, 200, "\nready\n", "ready once the peer is gone");
}

/// A TCP listener on `addr` in network namespace `ns` (bound on a thread that entered it;
/// the socket stays in that namespace).
fn listen_in(ns: &std::path::Path, addr: &str) -> std::net::TcpListener {
    use std::os::fd::AsRawFd;
    let (ns, addr) = (ns.to_path_buf(), addr.to_string());
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        // SAFETY: setns on this thread only; the descriptor is valid for the call.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        std::net::TcpListener::bind(&addr).unwrap()
    })
    .join()
    .unwrap()
}

/// A speaker that is on but cannot bind its port (something else holds it) is not ready —
/// also with no session configured, where nothing else would show it — and is ready again
/// once it could bind.
#[test]
fn readiness_needs_the_bgp_listener() {
    let addr = "192.0.2.10:9097";
    let c = Cluster::new_with(
        "hlbind",
        false,
        1,
        &["--bgp", "on", "--metrics-listen", addr],
    );
    wait_readyz(&c, addr, 200, "\nready\n", "the agent to be ready");
    let holder = listen_in(c.nodes[0].ns.path(), "0.0.0.0:1790");
    let moved = "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {listenPort: 1790}\n";
    c.cli_ok(&["apply", "-f", "-"], Some(moved));
    let body = wait_readyz(
        &c,
        addr,
        503,
        "not ready: bgp",
        "not ready while the BGP port is taken",
    );
    assert!(
        body.contains("FAIL bgp: cannot listen on 0.0.0.0:1790"),
        "{body}"
    );
    let (code, status) = node_status(&c);
    assert_eq!(code, 1, "{status}");
    assert!(status.contains("FAIL bgp: cannot listen"), "{status}");
    drop(holder);
    let body = wait_readyz(&c, addr, 200, "\nready\n", "ready once the port is free");
    assert!(
        body.contains("ok   bgp: 0 session(s) Established"),
        "{body}"
    );
}

/// Connects to `addr` from network namespace `ns` and waits up to 20 s for the other end to
/// close the connection (what the speaker does to a connection from an address that is no
/// peer of its): whether it did.
fn closed_by_speaker(ns: &std::path::Path, addr: &str) -> bool {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let (ns, addr) = (ns.to_path_buf(), addr.to_string());
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        // SAFETY: setns on this thread only; the descriptor is valid for the call.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => panic!("the speaker sent something to an unknown address"),
        }
    })
    .join()
    .unwrap()
}

/// The agent's soft limit on open files, set with `prlimit` (`None`: read it).
fn nofile(pid: u32, set: Option<&str>) -> String {
    let pid = pid.to_string();
    let out = match set {
        Some(soft) => Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={soft}:")])
            .output(),
        None => Command::new("prlimit")
            .args([
                "--pid",
                &pid,
                "--nofile",
                "--raw",
                "--noheadings",
                "-o",
                "SOFT",
            ])
            .output(),
    }
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A speaker whose accept fails for want of file descriptors (EMFILE) keeps its listener and
/// accepts again once it has them: before, the accept task ended at the first error, leaving
/// the speaker bound but deaf for good.
#[test]
fn the_bgp_listener_survives_running_out_of_descriptors() {
    let addr = "192.0.2.10:9098";
    let c = Cluster::new_with("hlfd", false, 1, &["--bgp", "on", "--metrics-listen", addr]);
    wait_readyz(&c, addr, 200, "\nready\n", "the agent to be ready");
    let ns = c.nodes[0].ns.path();
    assert!(closed_by_speaker(ns, "192.0.2.10:179"), "no accept at all");
    let pid = c.nodes[0].agent.as_ref().unwrap().id();
    let soft = nofile(pid, None);
    nofile(pid, Some("1"));
    // A connection the speaker cannot take: its accept fails with EMFILE.
    let waiting = {
        let ns = ns.to_path_buf();
        std::thread::spawn(move || closed_by_speaker(&ns, "192.0.2.10:179"))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.agent_log(0).contains("accepting a BGP connection failed") {
        if Instant::now() >= deadline {
            nofile(pid, Some(&soft));
            panic!(
                "no failed accept reported (the accept loop ended?):\n{}",
                c.agent_log(0)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    nofile(pid, Some(&soft));
    assert!(
        waiting.join().unwrap(),
        "the waiting connection was never taken once descriptors were back"
    );
    assert!(
        closed_by_speaker(ns, "192.0.2.10:179"),
        "a new connection was never taken"
    );
}

/// The socket answers whether or not the agent serves HTTP./// The socket answers whether or not the agent serves HTTP.
#[test]
fn node_status_needs_no_metrics_listener() {
    let c = Cluster::new("hlsock", false, 1);
    wait_for("node status to report ready", 60, || node_status(&c).0 == 0);
    let (_, status) = node_status(&c);
    assert!(status.ends_with("\nready\n"), "{status}");
}

#[test]
fn node_status_without_an_agent_is_an_error_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let out = std::process::Command::new(bin("trellis"))
        .args(["node", "status", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot reach the agent") && err.contains("none.sock"),
        "{err}"
    );
}
