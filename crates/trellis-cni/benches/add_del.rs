//! ADD/DEL latency of `trellis-cni` against the reference `bridge` + `host-local` plugins
//! (Debian's containernetworking-plugins), measured in the same run, the same way (each plugin
//! exec'd inside a private "node" namespace, one pod namespace per call), then a burst of
//! 100 ADDs started at once. Prints medians, p90s and ratios. Not a test: figures only.
//!
//! Run: `cargo bench -p trellis-cni --bench add_del` (as root).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use trellis_testutil::{temp_dir, timed_in_netns, TestNetns};

const N: usize = 100;

struct Plugin {
    label: &'static str,
    bin: PathBuf,
    cni_path: String,
    conf: Value,
}

fn invoke(node: &Path, p: &Plugin, cmd: &str, cid: &str, netns: &Path) -> (Duration, Value) {
    let mut c = Command::new(&p.bin);
    c.env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &p.cni_path);
    let (took, out) = timed_in_netns(node, &mut c, p.conf.to_string().as_bytes());
    if p.label == "floor" {
        return (took, Value::Null);
    }
    assert!(
        out.status.success(),
        "{} {cmd} failed: {}{}",
        p.label,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (took, v)
}

/// Waits (at most 60 s) until the node namespace holds no pod veth: Trellis's DEL deletes the
/// pair from a detached child after answering, and those deletions (each holding the kernel's
/// rtnl lock over RCU grace periods) must not run into the next plugin's series.
fn settle(node: &TestNetns) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let is_pod_veth = |l: &str| {
        l.split(": ")
            .nth(1)
            .is_some_and(|n| n.starts_with("trl") && !n.starts_with("trlbench"))
    };
    while Instant::now() < deadline {
        if !node.exec_ok(&["ip", "-o", "link"]).lines().any(is_pod_veth) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("pod veths still present in the node namespace after 60 s");
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn series(
    node: &TestNetns,
    pods: &[TestNetns],
    p: &Plugin,
) -> (Duration, Duration, Duration, Duration) {
    // Warm-up (page cache, bridge creation) outside the figures, in a namespace of its own:
    // Trellis's DEL deletes the pair from a detached child after answering, so an ADD into the
    // same namespace right after could still find the old `eth0` there.
    let warm = TestNetns::new("bwarm");
    invoke(node.path(), p, "ADD", "warm", warm.path());
    invoke(node.path(), p, "DEL", "warm", warm.path());
    let mut add = Vec::new();
    let mut del = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        add.push(
            invoke(
                node.path(),
                p,
                "ADD",
                &format!("{}-{i}", p.label),
                pod.path(),
            )
            .0,
        );
    }
    for (i, pod) in pods.iter().enumerate() {
        del.push(
            invoke(
                node.path(),
                p,
                "DEL",
                &format!("{}-{i}", p.label),
                pod.path(),
            )
            .0,
        );
    }
    (
        percentile(&mut add, 0.5),
        percentile(&mut add, 0.9),
        percentile(&mut del, 0.5),
        percentile(&mut del, 0.9),
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let reference = Path::new("/usr/lib/cni/bridge");
    assert!(
        reference.exists(),
        "install containernetworking-plugins (scripts/setup.sh) for the reference"
    );
    let node = TestNetns::new("bench");
    let pods: Vec<TestNetns> = (0..N).map(|i| TestNetns::new(&format!("bp{i}"))).collect();
    let dir = temp_dir("bench");
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_trellis-cni"));
    std::os::unix::fs::symlink(&bin, bin_dir.join("trellis-ipam")).unwrap();
    let trellis_path = format!("{}:/usr/lib/cni", bin_dir.display());
    let data = |n: &str| dir.path().join(n);

    let routed = Plugin {
        label: "trellis-routed",
        bin: bin.clone(),
        cni_path: trellis_path.clone(),
        conf: json!({"cniVersion": "1.0.0", "name": "bench-routed", "type": "trellis-cni",
            "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.120.0.0/16"}]], "dataDir": data("t1")}}),
    };
    let bridge = Plugin {
        label: "trellis-bridge",
        bin: bin.clone(),
        cni_path: trellis_path,
        conf: json!({"cniVersion": "1.0.0", "name": "bench-bridge", "type": "trellis-cni", "mode": "bridge",
            "bridge": "trlbench1", "isGateway": true, "isDefaultGateway": true,
            "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.121.0.0/16"}]], "dataDir": data("t2")}}),
    };
    let refp = Plugin {
        label: "reference-bridge-host-local",
        bin: reference.to_path_buf(),
        cni_path: "/usr/lib/cni".into(),
        conf: json!({"cniVersion": "1.0.0", "name": "bench-ref", "type": "bridge",
            "bridge": "trlbench2", "isGateway": true, "isDefaultGateway": true,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.122.0.0/16"}]], "dataDir": data("ref")}}),
    };

    println!("CNI ADD/DEL latency, {N} sequential calls each, one pod namespace per call\n");
    // The floor: spawning a do-nothing process the same way (fork, setns, exec, wait).
    let floor = Plugin {
        label: "floor",
        bin: PathBuf::from("/bin/true"),
        cni_path: String::new(),
        conf: json!({}),
    };
    let mut spawn: Vec<Duration> = (0..N)
        .map(|_| invoke(node.path(), &floor, "VERSION", "x", pods[0].path()).0)
        .collect();
    println!(
        "process spawn floor (/bin/true, same harness): p50 {:.2}ms\n",
        ms(percentile(&mut spawn, 0.5))
    );
    println!(
        "{:<30} {:>10} {:>10} {:>10} {:>10}",
        "plugin", "ADD p50", "ADD p90", "DEL p50", "DEL p90"
    );
    let mut results = Vec::new();
    for p in [&refp, &routed, &bridge] {
        settle(&node);
        let r = series(&node, &pods, p);
        println!(
            "{:<30} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms",
            p.label,
            ms(r.0),
            ms(r.1),
            ms(r.2),
            ms(r.3)
        );
        results.push(r);
    }
    let (rf, rt, bt) = (results[0], results[1], results[2]);
    println!();
    for (label, r) in [("trellis-routed", rt), ("trellis-bridge", bt)] {
        let ok = |v: Duration, refv: Duration| {
            if ms(v) <= 3.0 && ms(v) <= 0.2 * ms(refv) {
                "meets target"
            } else {
                "MISSES target (<=3ms and <=0.2x)"
            }
        };
        println!(
            "{label}: ADD {:.3}x reference ({}), DEL {:.3}x reference ({})",
            ms(r.0) / ms(rf.0),
            ok(r.0, rf.0),
            ms(r.2) / ms(rf.2),
            ok(r.2, rf.2)
        );
    }

    // Burst: 100 ADDs started at once.
    settle(&node);
    let start = Instant::now();
    let children: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let node_path = node.path().to_path_buf();
            let pod_path = pod.path().to_path_buf();
            let conf = routed.conf.clone();
            let bin = routed.bin.clone();
            let cni_path = routed.cni_path.clone();
            std::thread::spawn(move || {
                let p = Plugin {
                    label: "burst",
                    bin,
                    cni_path,
                    conf,
                };
                invoke(&node_path, &p, "ADD", &format!("burst-{i}"), &pod_path).1
            })
        })
        .collect();
    let mut ips = HashSet::new();
    for c in children {
        let v = c.join().expect("burst ADD failed");
        ips.insert(v["ips"][0]["address"].as_str().unwrap().to_string());
    }
    let burst = start.elapsed();
    println!("\nburst: {N} ADDs started at once: {} succeeded with {} distinct addresses in {:.1} ms ({:.0} ADD/s)",
        N, ips.len(), ms(burst), N as f64 / burst.as_secs_f64());
    assert_eq!(ips.len(), N, "duplicate addresses in the burst");
    for (i, pod) in pods.iter().enumerate() {
        invoke(
            node.path(),
            &routed,
            "DEL",
            &format!("burst-{i}"),
            pod.path(),
        );
    }
}
