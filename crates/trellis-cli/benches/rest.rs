//! Rest: what an agent costs when nothing happens, and what the embedded store's watch poll
//! costs against what it buys.
//!
//! 1. One real agent (this tree's binary, embedded SQLite store, no BGP) on a node namespace
//!    with PODS pods (default 100) made by the real CNI plugin with agent IPAM, in a VXLAN
//!    pool with natOutgoing. After the pods are up and the agent has settled, over WINDOW
//!    seconds (default 60): its CPU time from /proc — its own and that of the processes it
//!    waited for (`nft`) — and its RSS. Then the same agent restarted with `--resync 3600`, so
//!    the difference is what the 2 s resync costs. Targets: RSS <= 30 MB, CPU <= 1 % of a core.
//! 2. The SQLite watch: for each poll interval, the latency from a write to the watcher
//!    receiving it (p50/p90 over 40 writes at random moments) and the CPU an idle process with
//!    one watch spends per minute (measured on this process, nothing else running in it).
//!
//! Figures only. Run as root after `cargo build --release -p trellis-cni`:
//! `cargo bench -p trellis --bench rest` (WINDOW=20 for a quick look).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_store::sqlite::SqliteStore;
use trellis_store::{Datastore, TxnOp};
use trellis_testutil::{
    proc_cpu_secs, proc_status_kb, spawn_with_input, temp_dir, veth_between, TestNetns,
};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn binary(name: &str) -> PathBuf {
    // target/release/deps/rest-HASH → target/release/NAME
    let p = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join(name);
    assert!(p.exists(), "{} is not built", p.display());
    p
}

fn start_agent(node: &TestNetns, dir: &Path, spec: &str, extra: &[&str]) -> Agent {
    let socket = dir.join("agent.sock");
    let _ = std::fs::remove_file(&socket);
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let agent = Agent(
        node.command(binary("trellis").to_str().unwrap())
            .args(["--datastore", spec, "agent", "--node", "node0"])
            .args(["--ip", "interface=upl0"])
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start agent"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the agent did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

/// ADD of pod `i` through the real plugin with agent IPAM, in `node`'s namespace.
fn add_pod(node: &TestNetns, dir: &Path, i: usize) -> TestNetns {
    let pod = TestNetns::new(&format!("rp{i}"));
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "k8s", "type": "trellis-cni",
        "ipam": {"type": "trellis-ipam", "agentSocket": dir.join("agent.sock")}});
    let mut plugin = node.command(binary("trellis-cni").to_str().unwrap());
    plugin
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("rest-pod-{i}"))
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", dir)
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{i}"),
        )
        .stderr(Stdio::null());
    let out = spawn_with_input(&mut plugin, &conf.to_string())
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "ADD pod {i}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    pod
}

/// The agent's cost over `window`: (own CPU s, children's CPU s, RSS MB, peak RSS MB).
fn at_rest(agent: &Agent, window: Duration) -> (f64, f64, f64, f64) {
    let pid = agent.0.id();
    let before = proc_cpu_secs(pid);
    std::thread::sleep(window);
    let after = proc_cpu_secs(pid);
    (
        after.0 - before.0,
        after.1 - before.1,
        proc_status_kb(pid, "VmRSS") as f64 / 1024.0,
        proc_status_kb(pid, "VmHWM") as f64 / 1024.0,
    )
}

fn agent_part(window: Duration, pods: usize) {
    let dir = temp_dir("rest");
    let node = TestNetns::new("restnode");
    let peer = TestNetns::new("restpeer");
    veth_between(
        &node,
        "upl0",
        "192.0.2.10/24",
        &peer,
        "upl1",
        "192.0.2.1/24",
    );
    let db = dir.path().join("trellis.db");
    let spec = format!("sqlite:{}", db.display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = trellis_store::open(&spec).await.unwrap();
        let pool = "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.90.0.0/16, blockSize: 26, encapsulation: VXLAN, natOutgoing: true}\n";
        for r in trellis_resources::parse_documents(pool).unwrap() {
            trellis_cluster::objects::apply(&*store, &r, false)
                .await
                .unwrap();
        }
    });
    std::os::unix::fs::symlink(binary("trellis-cni"), dir.path().join("trellis-ipam")).unwrap();
    let agent = start_agent(&node, dir.path(), &spec, &[]);
    let started = Instant::now();
    let pod_ns: Vec<TestNetns> = (0..pods).map(|i| add_pod(&node, dir.path(), i)).collect();
    let routes = node.exec_ok(&["ip", "route"]);
    let pod_routes = routes.lines().filter(|l| l.contains(" dev trl")).count();
    assert_eq!(pod_routes, pods, "{routes}");
    println!(
        "{pods} pods up in {:.1} s; settling 10 s",
        started.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(10));
    let per_min = |s: f64| s * 60.0 / window.as_secs_f64();
    let pct = |s: f64| s * 100.0 / window.as_secs_f64();
    println!(
        "{:<34} {:>10} {:>12} {:>10} {:>9} {:>9}",
        "agent at rest (sqlite, no BGP)",
        "CPU s/min",
        "nft s/min",
        "% of core",
        "RSS MB",
        "peak MB"
    );
    let (own, children, rss, hwm) = at_rest(&agent, window);
    println!(
        "{:<34} {:>10.2} {:>12.2} {:>10.2} {:>9.1} {:>9.1}",
        "default (resync 2 s)",
        per_min(own),
        per_min(children),
        pct(own + children),
        rss,
        hwm
    );
    drop(agent);
    let quiet = start_agent(&node, dir.path(), &spec, &["--resync", "3600"]);
    std::thread::sleep(Duration::from_secs(10));
    let (q_own, q_children, q_rss, _) = at_rest(&quiet, window);
    println!(
        "{:<34} {:>10.2} {:>12.2} {:>10.2} {:>9.1}",
        "resync 3600 s",
        per_min(q_own),
        per_min(q_children),
        pct(q_own + q_children),
        q_rss
    );
    let passes = window.as_secs_f64() / 2.0;
    println!(
        "the 2 s resync (dataplane + policy): {:.2} ms of CPU per resync, {:.2} % of a core",
        ((own + children) - (q_own + q_children)) * 1e3 / passes,
        pct((own + children) - (q_own + q_children))
    );
    println!(
        "targets: RSS {rss:.1} MB (<= 30 MB: {}), CPU {:.2} % of a core (<= 1 %: {})",
        if rss <= 30.0 { "met" } else { "MISSED" },
        pct(own + children),
        if pct(own + children) <= 1.0 {
            "met"
        } else {
            "MISSED"
        }
    );
    drop(quiet);
    drop(pod_ns);
}

/// This process's CPU time (user + system), in seconds.
fn self_cpu() -> f64 {
    proc_cpu_secs(std::process::id()).0
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// (latency p50, p90 in ms; idle CPU s/min with one watch) for one poll interval.
async fn poll_part(dir: &Path, poll: Duration, idle: Duration) -> (f64, f64, f64) {
    let path = dir.join(format!("poll{}.db", poll.as_millis()));
    let path = path.to_str().unwrap();
    let writer = SqliteStore::open(path).await.unwrap();
    let watcher: Arc<dyn Datastore> =
        Arc::new(SqliteStore::open(path).await.unwrap().with_poll(poll));
    let mut watch = watcher
        .watch("/bench/", writer.revision().await.unwrap() + 1)
        .await
        .unwrap();
    // Idle: one watch polling, nothing written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu0 = self_cpu();
    tokio::time::sleep(idle).await;
    let idle_cpu = (self_cpu() - cpu0) * 60.0 / idle.as_secs_f64();
    let mut lat = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for n in 0..40 {
        // A write at a random moment of the poll cycle (xorshift; no dependency for this).
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let wait = Duration::from_micros(seed % (poll.as_micros() as u64 * 2 + 1));
        tokio::time::sleep(wait).await;
        let t = Instant::now();
        let op = TxnOp::Put(format!("/bench/{n}"), b"x".to_vec());
        writer.txn(vec![], vec![op]).await.unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("the watch delivered the write within 5 s");
        assert!(matches!(ev, Some(Ok(_))), "{ev:?}");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (quantile(&mut lat, 0.5), quantile(&mut lat, 0.9), idle_cpu)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let window = Duration::from_secs(env_u64("WINDOW", 60));
    let pods = env_u64("PODS", 100) as usize;
    agent_part(window, pods);
    let dir = temp_dir("restpoll");
    let idle = Duration::from_secs(env_u64("IDLE", 10));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "sqlite watch: poll interval vs write-to-event latency vs idle CPU of one watching process"
    );
    println!(
        "{:>8} {:>12} {:>12} {:>16} {:>10}",
        "poll ms", "p50 ms", "p90 ms", "idle CPU s/min", "% of core"
    );
    for ms in [10u64, 25, 50, 100, 200, 500] {
        let (p50, p90, cpu) = rt.block_on(poll_part(dir.path(), Duration::from_millis(ms), idle));
        println!(
            "{ms:>8} {p50:>12.1} {p90:>12.1} {cpu:>16.3} {:>10.3}",
            cpu * 100.0 / 60.0
        );
    }
}
