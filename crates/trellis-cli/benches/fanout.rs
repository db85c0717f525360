//! Fan-out: what one agent costs the datastore, and itself, in a busy cluster. 100 simulated
//! nodes (each a Node object with a VTEP and one affine block in a VXLAN pool) heartbeat into one
//! etcd at 10× the normal rate (every 1 s instead of 10 s); one real agent runs in its own
//! namespace, and over a window of WINDOW seconds (default 60) the bench measures the agent's CPU
//! time (from /proc) and the reads it makes: Range requests (gets and lists) and watch events,
//! from etcd's own metrics, minus what the simulators alone cause (measured first with no agent).
//!
//! Before/after in one run: the agent of this tree, and — when `BEFORE=/path/to/trellis` names a
//! binary built from the previous main — that one, against the same cluster in the same run.
//! Figures only. Run as root:
//!
//!     git archive 738d650 | tar -x -C /tmp/trellis-before
//!     cargo build --release -p trellis --manifest-path /tmp/trellis-before/Cargo.toml
//!     BEFORE=/tmp/trellis-before/target/release/trellis cargo bench -p trellis --bench fanout

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_resources::{
    IpamBlockSpec, Metadata, NodeAddress, NodeSpec, NodeStatus, Object, Resource,
};
use trellis_store::{Datastore, TxnOp};
use trellis_testutil::{
    proc_cpu_secs, proc_status_kb, temp_dir, veth_between, EtcdServer, TestNetns,
};

const NODES: usize = 100;
const ETCD_IP: &str = "192.0.2.1";

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// Moves this thread (and every thread it starts later) into the network namespace `ns` (an
/// open namespace file), so the simulators reach etcd on the control namespace's address.
fn enter(ns: &std::fs::File) {
    // SAFETY: setns on a namespace fd we hold open; affects only this thread.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// etcd's Prometheus counters, summed by metric name (labels dropped) and, for gRPC, by method.
fn etcd_metrics(endpoint: &str) -> BTreeMap<String, f64> {
    let addr = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let base = name.split('{').next().unwrap_or(name).to_string();
        let key = match name.split("grpc_method=\"").nth(1) {
            Some(rest) => format!("{base}:{}", rest.split('"').next().unwrap_or("")),
            None => base,
        };
        *out.entry(key).or_insert(0.0) += v;
    }
    out
}

/// What a window cost, per minute.
#[derive(Debug, Default, Clone, Copy)]
struct Costs {
    ranges: f64,
    watch_events: f64,
    sent_bytes: f64,
    cpu_secs: f64,
    rss_kb: u64,
}

fn etcd_costs(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, minutes: f64) -> Costs {
    let d =
        |k: &str| (b.get(k).copied().unwrap_or(0.0) - a.get(k).copied().unwrap_or(0.0)) / minutes;
    Costs {
        ranges: d("grpc_server_handled_total:Range"),
        watch_events: d("etcd_debugging_mvcc_events_total"),
        sent_bytes: d("etcd_network_client_grpc_sent_bytes_total"),
        ..Costs::default()
    }
}

fn block_cidr(i: usize) -> ipnet::IpNet {
    let base = u32::from(Ipv4Addr::new(10, 80, 0, 0)) + 64 * i as u32;
    ipnet::IpNet::new(IpAddr::V4(Ipv4Addr::from(base)), 26).unwrap()
}

fn sim_node(i: usize, heartbeat: u64) -> Resource {
    let tunnel = match block_cidr(i).addr() {
        IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) + 1),
        IpAddr::V6(_) => unreachable!(),
    };
    Resource::Node(Object {
        metadata: Metadata {
            name: format!("sim{i:03}"),
            ..Default::default()
        },
        spec: NodeSpec {
            addresses: vec![NodeAddress {
                address: format!("192.0.2.{}/24", 11 + i),
                kind: Some("InternalIP".into()),
            }],
            ipv4_vxlan_tunnel_addr: Some(IpAddr::V4(tunnel)),
            vxlan_tunnel_mac_addr: Some(format!("66:00:00:00:{:02x}:{:02x}", i / 256, i % 256)),
            ..Default::default()
        },
        status: Some(NodeStatus {
            last_heartbeat: Some(heartbeat),
        }),
    })
}

fn sim_block(i: usize) -> Resource {
    let cidr = block_cidr(i);
    let spec: IpamBlockSpec = trellis_ipam::cluster::new_block(cidr, &format!("sim{i:03}"));
    Resource::IpamBlock(Object {
        metadata: Metadata {
            name: trellis_ipam::cluster::block_name(&cidr),
            ..Default::default()
        },
        spec,
        status: None,
    })
}

/// Heartbeats of the simulated nodes: blind writes (no read), so every Range etcd serves while
/// an agent runs is the agent's. `lastHeartbeat` advances with simulated time.
async fn simulate(
    store: Arc<dyn Datastore>,
    period: Duration,
    speed: u64,
    paused: Arc<AtomicBool>,
) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..NODES {
        let store = store.clone();
        let paused = paused.clone();
        tasks.push(tokio::spawn(async move {
            // Spread the nodes over the period, as real agents started at different times are.
            tokio::time::sleep(period * i as u32 / NODES as u32).await;
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                if paused.load(Ordering::Relaxed) {
                    continue;
                }
                let now = trellis_cluster::now_secs() + start.elapsed().as_secs() * speed;
                let r = sim_node(i, now);
                let put = TxnOp::Put(r.key(), trellis_cluster::objects::encode(&r));
                if let Err(e) = store.txn(vec![], vec![put]).await {
                    eprintln!("simulated heartbeat failed: {e}");
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(bin: &Path, node: &TestNetns, dir: &Path, spec: &str, tag: &str) -> Agent {
    let log = std::fs::File::create(dir.join(format!("{tag}.log"))).unwrap();
    let child = node
        .command(bin.to_str().unwrap())
        .args(["--datastore", spec, "agent", "--node", "node0"])
        .args(["--ip", "interface=upl0"])
        .arg("--socket")
        .arg(dir.join(format!("{tag}.sock")))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start agent");
    Agent(child)
}

/// Routes the agent programmed (proto 231).
fn routes(node: &TestNetns) -> usize {
    node.exec_ok(&["ip", "route", "show", "proto", "231"])
        .lines()
        .count()
}

/// Runs one agent binary: waits until it has programmed every simulated node's block, lets it
/// settle, then measures one window.
fn measure(
    bin: &Path,
    node: &TestNetns,
    dir: &Path,
    etcd: &EtcdServer,
    window: Duration,
    tag: &str,
) -> Costs {
    let spec = format!("etcd:{}", etcd.endpoint);
    let agent = start_agent(bin, node, dir, &spec, tag);
    let deadline = Instant::now() + Duration::from_secs(120);
    while routes(node) < NODES {
        assert!(
            Instant::now() < deadline,
            "{tag} agent did not program {NODES} routes: {}",
            std::fs::read_to_string(dir.join(format!("{tag}.log"))).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(5));
    let pid = agent.0.id();
    let (m0, c0) = (etcd_metrics(&etcd.endpoint), proc_cpu_secs(pid).0);
    std::thread::sleep(window);
    let (m1, c1) = (etcd_metrics(&etcd.endpoint), proc_cpu_secs(pid).0);
    let minutes = window.as_secs_f64() / 60.0;
    let mut costs = etcd_costs(&m0, &m1, minutes);
    costs.cpu_secs = (c1 - c0) / minutes;
    costs.rss_kb = proc_status_kb(pid, "VmRSS");
    drop(agent);
    costs
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let window = env_secs("WINDOW", 60);
    let speed = 10;
    let period = Duration::from_secs(10) / speed as u32;
    let dir = temp_dir("fanout");
    let ctl = TestNetns::new("fanctl");
    let node = TestNetns::new("fannode");
    veth_between(&ctl, "br0", "192.0.2.1/24", &node, "upl0", "192.0.2.10/24");
    let etcd = EtcdServer::start_in(&ctl, ETCD_IP);
    // Back to where we came from before the namespaces go: removing one kills what is in it.
    let home = std::fs::File::open("/proc/self/ns/net").unwrap();
    enter(&std::fs::File::open(ctl.path()).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let spec = format!("etcd:{}", etcd.endpoint);
    let store = rt.block_on(trellis_store::open(&spec)).unwrap();
    let pool = trellis_resources::parse_documents(
        "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: pool\nspec:\n  cidr: 10.80.0.0/16\n  blockSize: 26\n  encapsulation: VXLAN\n",
    )
    .unwrap()
    .remove(0);
    rt.block_on(async {
        trellis_cluster::objects::apply(&*store, &pool, false)
            .await
            .unwrap();
        for i in 0..NODES {
            trellis_cluster::objects::apply(&*store, &sim_node(i, 0), false)
                .await
                .unwrap();
            trellis_cluster::objects::apply(&*store, &sim_block(i), false)
                .await
                .unwrap();
        }
    });
    let paused = Arc::new(AtomicBool::new(false));
    rt.spawn(simulate(store.clone(), period, speed, paused.clone()));
    println!(
        "fan-out: {NODES} simulated nodes heartbeating every {period:?} ({speed}x the default 10 s) into etcd; one real agent (VXLAN pool, {NODES} remote blocks); window {window:?}"
    );
    // What the simulators alone cost etcd.
    std::thread::sleep(Duration::from_secs(3));
    let m0 = etcd_metrics(&etcd.endpoint);
    std::thread::sleep(window);
    let m1 = etcd_metrics(&etcd.endpoint);
    let base = etcd_costs(&m0, &m1, window.as_secs_f64() / 60.0);
    let after_bin: PathBuf = {
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().join("trellis")
    };
    let mut runs = Vec::new();
    if let Ok(before) = std::env::var("BEFORE") {
        runs.push((
            "before",
            measure(
                Path::new(&before),
                &node,
                dir.path(),
                &etcd,
                window,
                "before",
            ),
        ));
    } else {
        println!("(no BEFORE=/path/to/previous/trellis given: measuring this tree only)");
    }
    runs.push((
        "after",
        measure(&after_bin, &node, dir.path(), &etcd, window, "after"),
    ));
    // The same agent in a quiet cluster: what its resync passes (kernel reads) cost alone.
    paused.store(true, Ordering::Relaxed);
    let quiet = measure(&after_bin, &node, dir.path(), &etcd, window, "quiet");
    println!(
        "{:<8} {:>16} {:>18} {:>18} {:>16} {:>10}",
        "agent", "CPU s/min", "Range reqs/min", "watch events/min", "etcd KB/min", "RSS MB"
    );
    let row = |name: &str, c: &Costs| {
        println!(
            "{name:<8} {:>16.2} {:>18.0} {:>18.0} {:>16.0} {:>10.1}",
            c.cpu_secs,
            c.ranges - base.ranges,
            c.watch_events - base.watch_events,
            (c.sent_bytes - base.sent_bytes) / 1024.0,
            c.rss_kb as f64 / 1024.0
        )
    };
    for (name, c) in &runs {
        row(name, c);
    }
    println!(
        "quiet    {:>16.2}   (this tree's agent with the heartbeats paused: the 2 s resync alone)",
        quiet.cpu_secs
    );
    if let [(_, b), (_, a)] = &runs[..] {
        let per_event = |c: &Costs| (c.cpu_secs - quiet.cpu_secs).max(0.0);
        println!(
            "CPU beyond the resync: before {:.2} s/min, after {:.2} s/min ({:.0}x)",
            per_event(b),
            per_event(a),
            per_event(b) / per_event(a).max(0.01)
        );
        let r = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::INFINITY };
        println!(
            "before/after: CPU {:.0}x, Range requests {:.0}x, etcd bytes sent {:.1}x",
            r(b.cpu_secs, a.cpu_secs),
            r(b.ranges - base.ranges, (a.ranges - base.ranges).max(1.0)),
            r(
                b.sent_bytes - base.sent_bytes,
                (a.sent_bytes - base.sent_bytes).max(1.0)
            ),
        );
    }
    println!(
        "(simulators alone: {:.0} Range/min, {:.0} KB/min sent by etcd)",
        base.ranges,
        base.sent_bytes / 1024.0
    );
    rt.shutdown_timeout(Duration::from_secs(1));
    enter(&home);
}
