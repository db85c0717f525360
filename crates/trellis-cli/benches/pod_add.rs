//! What policy enforcement adds to a CNI ADD (routed mode, agent IPAM): a pod's ADD returns only
//! once the agent has its policy in the kernel (`endpointReady`), so the pod is never reachable
//! against its policy — the wait is the whole cost. 50 sequential ADDs of pods through the real
//! plugin on one node, first with no policy in the cluster, then in a namespace under
//! default-deny with an allow rule; for each, the ADD's wall time and the time the agent held
//! the `endpointReady` request (its `trellis_policy_endpoint_ready_seconds` histogram, read
//! around each ADD). Target: the wait ≤ 1 ms. Figures only; run as root:
//! `cargo build --release --workspace && cargo bench -p trellis --bench pod_add`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Cluster;

const PODS: usize = 50;

const POLICY: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: default}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web, namespace: default}
spec:
  podSelector: {}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/8}}]
";

/// The agent's `endpointReady` wait so far (sum of seconds, count) and its policy programming
/// time so far (sum of seconds).
fn ready_wait(c: &Cluster) -> (f64, u64, f64) {
    let text = c.nodes[0].ns.exec_ok(&[
        "python3",
        "-c",
        "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9091/metrics').read().decode())",
    ]);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .trim()
            .to_string()
    };
    (
        value("trellis_policy_endpoint_ready_seconds_sum")
            .parse()
            .unwrap(),
        value("trellis_policy_endpoint_ready_seconds_count")
            .parse()
            .unwrap(),
        value("trellis_policy_programming_seconds_sum")
            .parse()
            .unwrap(),
    )
}

fn pct(v: &mut [Duration], p: usize) -> f64 {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1000.0
}

/// `PODS` sequential ADDs; (ADD wall times, endpointReady waits, the agent's programming time
/// of each ADD's change).
fn adds(c: &Cluster, tag: &str) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    let (mut add, mut wait, mut prog) = (Vec::new(), Vec::new(), Vec::new());
    let mut pods = Vec::new();
    for k in 0..PODS {
        let (before, n0, p0) = ready_wait(c);
        // The pod's namespace exists before ADD, as a runtime makes it first.
        let name = format!("{tag}{k}");
        let pod = trellis_testutil::TestNetns::new(&name);
        let t = Instant::now();
        let out = c.spawn_add(0, &name, &pod).wait_with_output().unwrap();
        add.push(t.elapsed());
        assert!(
            out.status.success(),
            "ADD {name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        pods.push(pod);
        let (after, n1, p1) = ready_wait(c);
        assert_eq!(n1, n0 + 1, "one endpointReady per ADD");
        wait.push(Duration::from_secs_f64(after - before));
        prog.push(Duration::from_secs_f64(p1 - p0));
    }
    (add, wait, prog)
}

fn run(etcd: bool) {
    let store = if etcd { "etcd" } else { "sqlite" };
    let mut c = Cluster::new_with(
        if etcd { "bpe" } else { "bps" },
        etcd,
        1,
        &["--metrics-listen", "127.0.0.1:9091"],
    );
    let (mut add0, mut wait0, mut prog0) = adds(&c, "pa");
    c.cli_ok(&["apply", "-f", "-"], Some(POLICY));
    let (mut add1, mut wait1, mut prog1) = adds(&c, "pb");
    for (what, add, wait, prog) in [
        ("no policy", &mut add0, &mut wait0, &mut prog0),
        ("default-deny + allow", &mut add1, &mut wait1, &mut prog1),
    ] {
        let w50 = pct(wait, 50);
        println!(
            "{store:<7} {what:<22} ADD p50 {:>6.2} ms  p90 {:>6.2} ms   endpointReady wait p50 {w50:>5.2} ms  p90 {:>5.2} ms (target <= 1 ms: {})   programming p50 {:>5.2} ms",
            pct(add, 50),
            pct(add, 90),
            pct(wait, 90),
            if w50 <= 1.0 { "met" } else { "missed" },
            pct(prog, 50),
        );
    }
    c.kill_agent(0);
}

fn main() {
    trellis_testutil::require_root();
    run(false);
    run(true);
}
