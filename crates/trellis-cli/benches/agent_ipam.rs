//! Cluster IPAM through the agent: ADD latency (sequential, the runtime's view: exec of the IPAM
//! plugin + one agent round trip + one datastore transaction) and allocations per second for a
//! burst of 100 ADDs started at once on one node, for the embedded store and for etcd.
//! Then the whole CNI ADD and DEL with agent IPAM (routed mode: the allocation, the veth, and the
//! wait for the endpoint's policy) against Debian's reference `bridge` + `host-local`, both
//! exec'd the same way from inside the node's namespace in the same run (100 sequential calls,
//! one pod namespace per call), with the ratio.
//! Figures only; run as root: `cargo build --release --workspace && cargo bench -p trellis --bench agent_ipam`
//! (the bench runs the release `trellis` and `trellis-cni` binaries; `-- cni` runs only the
//! CNI comparison).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, Cluster};
use serde_json::{json, Value};
use trellis_testutil::{timed_in_netns, TestNetns};

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run(etcd: bool) {
    let c = Cluster::new(if etcd { "bie" } else { "bis" }, etcd, 1);
    let mut lat = Vec::new();
    for k in 0..100 {
        let t = Instant::now();
        let out = c
            .spawn_ipam(0, "ADD", &format!("seq{k}"))
            .wait_with_output()
            .unwrap();
        lat.push(t.elapsed());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let p50 = median(&mut lat);
    let p90 = lat[lat.len() * 9 / 10];
    let t = Instant::now();
    let burst: Vec<_> = (0..100)
        .map(|k| c.spawn_ipam(0, "ADD", &format!("burst{k}")))
        .collect();
    for ch in burst {
        assert!(ch.wait_with_output().unwrap().status.success());
    }
    let rate = 100.0 / t.elapsed().as_secs_f64();
    let mut del = Vec::new();
    for k in 0..100 {
        let t = Instant::now();
        assert!(c
            .spawn_ipam(0, "DEL", &format!("seq{k}"))
            .wait_with_output()
            .unwrap()
            .status
            .success());
        del.push(t.elapsed());
    }
    let store = if etcd { "etcd" } else { "sqlite" };
    let target = if etcd { 15.0 } else { 5.0 };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{store:<7} ADD p50 {:>6.2} ms  p90 {:>6.2} ms (target <= {target} ms: {})   DEL p50 {:>6.2} ms   burst of 100: {:>6.0} allocations/s (target >= 200: {})",
        ms(p50),
        ms(p90),
        if ms(p50) <= target { "met" } else { "MISSED" },
        ms(median(&mut del)),
        rate,
        if rate >= 200.0 { "met" } else { "MISSED" },
    );
}

/// One sequential series of ADDs then DELs of `bin` with `conf`, inside `node`, one pod
/// namespace per call; returns the ADD and DEL medians.
fn cni_series(
    node: &Path,
    pods: &[TestNetns],
    bin: &Path,
    cni_path: &str,
    conf: &Value,
    tag: &str,
) -> (Duration, Duration) {
    let call = |cmd: &str, i: usize, pod: &TestNetns| {
        let cid = format!("{tag}{i}");
        let mut c = Command::new(bin);
        c.env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", &cid)
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_path)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={cid}"),
            );
        let (took, out) = timed_in_netns(node, &mut c, conf.to_string().as_bytes());
        assert!(
            out.status.success(),
            "{tag} {cmd} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        took
    };
    // Warm-up (page cache, the reference's bridge) outside the figures, in a namespace of its
    // own (Trellis deletes the pair after answering DEL: see the trellis-cni add_del bench).
    let warm = TestNetns::new("bcwarm");
    call("ADD", 999, &warm);
    call("DEL", 999, &warm);
    let mut add: Vec<Duration> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| call("ADD", i, p))
        .collect();
    let mut del: Vec<Duration> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| call("DEL", i, p))
        .collect();
    (median(&mut add), median(&mut del))
}

/// The whole CNI ADD/DEL with agent IPAM against the reference, same harness, same run.
fn cni_vs_reference(etcd: bool) {
    let c = Cluster::new(if etcd { "bce" } else { "bcs" }, etcd, 1);
    let node = &c.nodes[0];
    let pods: Vec<TestNetns> = (0..100)
        .map(|i| TestNetns::new(&format!("bc{i}")))
        .collect();
    let plugin_dir = c.dir.path().join("cni");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    std::os::unix::fs::symlink(bin("trellis-cni"), plugin_dir.join("trellis-ipam")).unwrap();
    let trellis_conf = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "trellis-cni",
        "ipam": {"type": "trellis-ipam", "agentSocket": node.socket}});
    let ref_conf = json!({"cniVersion": "1.0.0", "name": "bench-ref", "type": "bridge",
        "bridge": "trlbenchref", "isGateway": true, "isDefaultGateway": true,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.122.0.0/16"}]],
                 "dataDir": c.dir.path().join("ref")}});
    let reference = Path::new("/usr/lib/cni/bridge");
    let (ref_add, ref_del) = cni_series(
        node.ns.path(),
        &pods,
        reference,
        "/usr/lib/cni",
        &ref_conf,
        "ref",
    );
    let trellis_path = format!("{}:/usr/lib/cni", plugin_dir.display());
    let (add, del) = cni_series(
        node.ns.path(),
        &pods,
        &bin("trellis-cni"),
        &trellis_path,
        &trellis_conf,
        "trl",
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let store = if etcd { "etcd" } else { "sqlite" };
    let verdict = |r: f64| if r <= 0.2 { "met" } else { "MISSED" };
    println!(
        "{store:<7} CNI ADD p50 {:>6.2} ms vs reference {:>6.2} ms = {:.3}x (target <= 0.2x: {})   DEL p50 {:>6.2} ms vs {:>6.2} ms = {:.3}x ({})",
        ms(add),
        ms(ref_add),
        ms(add) / ms(ref_add),
        verdict(ms(add) / ms(ref_add)),
        ms(del),
        ms(ref_del),
        ms(del) / ms(ref_del),
        verdict(ms(del) / ms(ref_del)),
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `-- cni` runs only the CNI comparison.
    if !std::env::args().any(|a| a == "cni") {
        println!(
            "cluster IPAM through the agent (one node, 100 sequential ADDs, then 100 at once)"
        );
        run(false);
        run(true);
    }
    println!("\nCNI ADD/DEL, routed mode with agent IPAM, against bridge + host-local (same run)");
    cni_vs_reference(false);
    cni_vs_reference(true);
}
