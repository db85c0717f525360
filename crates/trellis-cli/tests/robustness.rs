//! The agent keeps working when its inputs misbehave: socket clients that send nothing, send an
//! endless line or arrive by the hundred are cut off or turned away while others are served;
//! an undecodable record in the datastore is skipped, logged once and counted while the good
//! objects keep being programmed; `--ip ADDR` takes its prefix from the interface.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{bin, Cluster};
use serde_json::Value;
use trellis_store::TxnOp;

/// Sends one request line and reads the reply line (bounded by a 5 s read timeout).
fn ask(socket: &Path, line: &str) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}

fn status_ok(socket: &Path) -> bool {
    ask(socket, r#"{"op":"status"}"#).is_ok_and(|v| v.get("ok").is_some())
}

/// Reads until the agent closes the connection; returns what it sent and how long that took,
/// or panics if it is still open after `limit`.
fn read_until_closed(s: &mut UnixStream, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        // The agent may close with our unread bytes still queued: a reset, also an end.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the agent did not close the connection within {limit:?}: {e}"),
    }
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn slow_and_huge_clients_are_cut_off_while_others_are_served() {
    let c = Cluster::new("rbsock", false, 1);
    let socket = c.nodes[0].socket.clone();
    assert!(status_ok(&socket));

    let mut silent = UnixStream::connect(&socket).unwrap();
    let mut huge = UnixStream::connect(&socket).unwrap();
    let mut writer = huge.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        // 10 MB without a newline; the write fails once the agent hangs up.
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0usize;
        while sent < 10 * 1024 * 1024 {
            match writer.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    });
    let (said, took) = read_until_closed(&mut huge, Duration::from_secs(10));
    assert!(
        said.contains("longer than") && said.contains("\"code\":6"),
        "{said:?}"
    );
    let sent = flood.join().unwrap();
    assert!(
        sent < 10 * 1024 * 1024,
        "the agent read all 10 MB of one line ({took:?})"
    );
    // Meanwhile (the silent client still connected) others are served.
    assert!(status_ok(&socket), "a normal client was not served");
    // The silent client is disconnected after the request deadline.
    let limit = trellis_agent::REQUEST_DEADLINE + Duration::from_secs(10);
    let (said, took) = read_until_closed(&mut silent, limit);
    assert_eq!(said, "", "nothing is said to a client that never asked");
    assert!(took < limit);
    assert!(status_ok(&socket));
}

#[test]
fn a_flood_of_connections_queues_then_is_turned_away() {
    raise_fd_limit(4 * trellis_agent::MAX_CONNECTIONS as u64);
    let c = Cluster::new("rbflood", false, 1);
    let socket = c.nodes[0].socket.clone();
    // Every serving place taken by an idle client (each proven served: it answered a request).
    let mut held: Vec<UnixStream> = (0..trellis_agent::MAX_CLIENTS)
        .map(|_| {
            let mut s = UnixStream::connect(&socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"{\"op\":\"status\"}\n").unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert!(line.contains("\"ok\""), "{line}");
            s
        })
        .collect();
    // The next client is accepted but waits: its request is not answered while every place is
    // taken (a burst of ADDs queues rather than failing).
    let mut first = UnixStream::connect(&socket).unwrap();
    first.write_all(b"{\"op\":\"status\"}\n").unwrap();
    first
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    let early = first.read(&mut byte);
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "a queued client was answered while every place was taken: {early:?}"
    );
    // Fill the queue to the bound; every connection beyond it is answered at once: busy, try
    // again (code 11), and closed.
    let queued: Vec<UnixStream> = (trellis_agent::MAX_CLIENTS + 1..trellis_agent::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    for _ in 0..20 {
        let mut extra = UnixStream::connect(&socket).unwrap();
        let (said, _) = read_until_closed(&mut extra, Duration::from_secs(5));
        assert!(
            said.contains("\"code\":11") && said.contains("try again"),
            "{said:?}"
        );
    }
    // A place frees: the first queued client is served.
    held.pop();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(&first).read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\""), "{line}");
    drop((held, queued, first));
    wait_for("the agent to serve again", 10, || status_ok(&socket));
}

/// An agent started with a service manager's default soft limit on open files (1024, with a
/// higher hard limit), under a flood of socket clients kept at the accepted bound (each one the
/// agent closes is opened again): it still repairs its routes, which needs new descriptors
/// (netlink). The bound alone (1024 connections) used every descriptor the soft limit allowed.
#[test]
fn a_socket_flood_leaves_descriptors_for_the_dataplane() {
    raise_fd_limit(4 * trellis_agent::MAX_CONNECTIONS as u64);
    let mut c = Cluster::new("rbfds", false, 2);
    c.cli_ok(&["apply", "-f", "-"], Some(POOL_NONE));
    let _p1 = c.add_pod(1, "rbfdsp1");
    c.kill_agent(0);
    let n = &c.nodes[0];
    let log = std::fs::File::create(c.dir.path().join("node0.log")).unwrap();
    let child =
        n.ns.command("prlimit")
            .arg("--nofile=1024:8192")
            .arg(bin("trellis"))
            .args(["--datastore", &c.spec, "agent", "--node", &n.name])
            .args(["--heartbeat", "1", "--block-grace", "2", "--socket"])
            .arg(&n.socket)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
    c.nodes[0].agent = Some(child);
    let socket = c.nodes[0].socket.clone();
    wait_for("the agent to start", 20, || status_ok(&socket));
    wait_for("node1's block routed on node0", 20, || {
        !remote_route(&c).is_empty()
    });
    // The flood: MAX_CONNECTIONS + 50 connections, each reopened when the agent closes it,
    // for at most 60 s (or until the test is done).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (socket, stop) = (socket.clone(), stop.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut held: Vec<UnixStream> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(60)
            {
                // Drop the connections the agent closed (a busy reply comes first).
                held.retain(|s| {
                    let mut b = [0u8; 256];
                    match (&*s).read(&mut b) {
                        Ok(0) => false,
                        Ok(_) => true,
                        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                    }
                });
                while held.len() < trellis_agent::MAX_CONNECTIONS + 50 {
                    match UnixStream::connect(&socket) {
                        Ok(s) => {
                            s.set_nonblocking(true).unwrap();
                            held.push(s);
                        }
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            held.len()
        })
    };
    // Kept at the bound for a while (each of the agent's places is taken).
    wait_for("the flood to reach the bound", 20, || {
        std::fs::read_dir(format!(
            "/proc/{}/fd",
            c.nodes[0].agent.as_ref().unwrap().id()
        ))
        .map(|d| d.count() >= trellis_agent::MAX_CONNECTIONS / 2)
        .unwrap_or(false)
    });
    let dst = remote_route(&c);
    c.nodes[0].ns.exec_ok(&["ip", "route", "del", &dst]);
    wait_for(
        "the deleted route to come back during the flood",
        20,
        || remote_route(&c) == dst,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    wait_for("the agent to serve again", 40, || status_ok(&socket));
}

/// Lets this test process hold `n` descriptors (the default soft limit is often 1024).
fn raise_fd_limit(n: u64) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid resource and a pointer to a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        if l.rlim_cur < n {
            l.rlim_cur = n.min(l.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
        }
    }
}

/// Restarts node `i`'s agent with extra flags (the harness's own flags first).
fn restart_agent_with(c: &mut Cluster, i: usize, extra: &[&str]) {
    c.kill_agent(i);
    let n = &c.nodes[i];
    let log = std::fs::File::create(c.dir.path().join(format!("{}.log", n.name))).unwrap();
    let child =
        n.ns.command(bin("trellis").to_str().unwrap())
            .args(["--datastore", &c.spec, "agent", "--node", &n.name])
            .args(["--heartbeat", "1", "--block-grace", "2"])
            .arg("--socket")
            .arg(&n.socket)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
    c.nodes[i].agent = Some(child);
    let socket = c.nodes[i].socket.clone();
    wait_for("the agent to start", 20, || status_ok(&socket));
}

fn put(spec: &str, kvs: &[(&str, &[u8])]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = trellis_store::open(spec).await.unwrap();
        let ops = kvs
            .iter()
            .map(|(k, v)| TxnOp::Put(k.to_string(), v.to_vec()))
            .collect();
        store.txn(vec![], ops).await.unwrap();
    });
}

const POOL_NONE: &str = "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: pool\nspec:\n  cidr: 10.70.0.0/16\n  blockSize: 26\n  encapsulation: None\n";

/// node1's block as routed on node0: `BLOCK via 192.0.2.11`.
fn remote_route(c: &Cluster) -> String {
    let routes = c.nodes[0].ns.exec_ok(&["ip", "route"]);
    routes
        .lines()
        .find(|l| l.contains("via 192.0.2.11") && l.contains("proto 231"))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .unwrap_or_default()
}

#[test]
fn garbage_records_are_skipped_counted_and_logged_once() {
    let mut c = Cluster::new("rbbad", false, 2);
    c.cli_ok(&["apply", "-f", "-"], Some(POOL_NONE));
    restart_agent_with(&mut c, 0, &["--metrics-listen", "192.0.2.10:9091"]);
    let _p1 = c.add_pod(1, "rbbadp1");
    wait_for("node1's block routed on node0", 20, || {
        !remote_route(&c).is_empty()
    });

    let keys = [
        "/trellis/v1/ippools/garbage",
        "/trellis/v1/nodes/garbage",
        "/trellis/v1/ipamblocks/garbage",
    ];
    let kvs: Vec<(&str, &[u8])> = keys.iter().map(|k| (*k, &b"{not json"[..])).collect();
    put(&c.spec, &kvs);

    // The agent keeps programming: a route deleted by hand comes back, twice (two passes that
    // both read the bad records).
    for _ in 0..2 {
        let dst = remote_route(&c);
        c.nodes[0].ns.exec_ok(&["ip", "route", "del", &dst]);
        wait_for("the deleted route to come back", 20, || {
            remote_route(&c) == dst
        });
    }
    // New pods still get addresses and routes.
    let _p0 = c.add_pod(0, "rbbadp0");

    let fetch = "import urllib.request;print(urllib.request.urlopen('http://192.0.2.10:9091/metrics',timeout=5).read().decode())";
    let metrics = c.nodes[0].ns.exec_ok(&["python3", "-c", fetch]);
    for kind in ["IPPool", "Node", "IPAMBlock"] {
        assert!(
            metrics.contains(&format!(
                "trellis_datastore_invalid_records{{kind=\"{kind}\"}} 1\n"
            )),
            "{kind}: {metrics}"
        );
    }
    let log = std::fs::read_to_string(c.dir.path().join("node0.log")).unwrap();
    for key in keys {
        let n = log
            .lines()
            .filter(|l| l.contains("skipping an invalid stored record") && l.contains(key))
            .count();
        assert_eq!(n, 1, "{key} logged {n} times:\n{log}");
    }

    // The CLI shows the good pools, names the bad record on stderr and exits 1.
    let out = c.cli(&["get", "ippools"], None);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("10.70.0.0/16"), "{stdout}");
    assert!(stderr.contains("/trellis/v1/ippools/garbage"), "{stderr}");
}

/// Clients of the metrics port (reachable from pods) that connect and never send cannot take
/// the agent's file descriptors: with the agent limited to 200, another node holds 300 such
/// connections while the CNI socket must still answer and a pod still be added. Unbounded, the
/// metrics server accepted them all, and the agent then had no descriptor left to accept the
/// plugin's connections (nor to open its datastore).
#[test]
fn idle_metrics_clients_cannot_starve_the_socket() {
    let mut c = Cluster::new("rbmet", false, 2);
    c.cli_ok(&["apply", "-f", "-"], Some(POOL_NONE));
    restart_agent_with(&mut c, 0, &["--metrics-listen", "192.0.2.10:9092"]);
    let pid = c.nodes[0].agent.as_ref().unwrap().id().to_string();
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=200:200"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // As many as connect, up to 300 (the bounded agent leaves the rest in its listen queue, and
    // once that is full connects time out); then up to 40 s for the agent to close 16 of them
    // (its connection deadline); then held until our end of its stdin closes, or 90 s.
    let hold = "import socket,sys,select,time
ss=[];fails=0
while len(ss)<300 and fails<3:
  try: ss.append(socket.create_connection(('192.0.2.10',9092),timeout=2))
  except OSError: fails+=1
print('held',len(ss),flush=True)
closed=set();end=time.time()+40
while len(closed)<16 and time.time()<end:
  r,_,_=select.select([s for s in ss if s not in closed],[],[],max(0,end-time.time()))
  for s in r:
    try: d=s.recv(1)
    except OSError: d=b''
    if not d: closed.add(s)
print('closed',len(closed),flush=True)
select.select([sys.stdin],[],[],90)
";
    let mut holder = c.nodes[1]
        .ns
        .command("python3")
        .args(["-c", hold])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    assert!(line.starts_with("held"), "{line}");
    eprintln!("metrics clients {}", line.trim());
    let socket = c.nodes[0].socket.clone();
    wait_for(
        "the CNI socket to answer while 300 metrics clients are held",
        30,
        || status_ok(&socket),
    );
    let _pod = c.add_pod(0, "rbmetp0");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(fds < 150, "the agent holds {fds} descriptors");
    // The connections the agent took are closed at their deadline, idle as they are.
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    let closed: usize = line
        .trim()
        .strip_prefix("closed ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        closed >= trellis_agent::metrics::MAX_CONNECTIONS,
        "{closed} idle metrics connections closed in 40 s"
    );
    drop(holder.stdin.take());
    let _ = holder.wait();
}

#[test]
fn a_bare_ip_takes_the_interface_prefix() {
    let mut c = Cluster::new("rbip", false, 2);
    c.cli_ok(&["apply", "-f", "-"], Some(POOL_NONE));
    let _p1 = c.add_pod(1, "rbipp1");
    restart_agent_with(&mut c, 0, &["--ip", "192.0.2.10"]);
    let nodes: Value =
        serde_json::from_str(&c.cli_ok(&["get", "nodes", "node0", "-o", "json"], None)).unwrap();
    assert_eq!(nodes["spec"]["addresses"][0]["address"], "192.0.2.10/24");
    // node1 is on node0's subnet, so its block is routed directly: a route deleted by hand is
    // put back by this agent (the first one's may still be there).
    wait_for("a direct route to node1's block", 20, || {
        !remote_route(&c).is_empty()
    });
    let dst = remote_route(&c);
    c.nodes[0].ns.exec_ok(&["ip", "route", "del", &dst]);
    wait_for("the direct route to come back", 20, || {
        remote_route(&c) == dst
    });

    // An address no interface holds is refused, naming the flag.
    let out = c.nodes[0]
        .ns
        .command(bin("trellis").to_str().unwrap())
        .args(["--datastore", &c.spec, "agent", "--node", "other"])
        .args(["--ip", "198.51.100.77", "--socket"])
        .arg(c.dir.path().join("other.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--ip 198.51.100.77"), "{err}");
}
