//! Cluster IPAM through the agent: ADD latency (sequential, the runtime's view: exec of the IPAM
//! plugin + one agent round trip + one datastore transaction) and allocations per second for a
//! burst of 100 ADDs started at once on one node, for the embedded store and for etcd.
//! Figures only; run as root: `cargo build --release --workspace && cargo bench -p trellis --bench agent_ipam`
//! (the bench runs the release `trellis` and `trellis-cni` binaries).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Cluster;

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

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!("cluster IPAM through the agent (one node, 100 sequential ADDs, then 100 at once)");
    run(false);
    run(true);
}
