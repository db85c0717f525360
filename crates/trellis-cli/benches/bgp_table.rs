//! A full table over BGP: BIRD announces 100 000 prefixes to one Trellis node; the time from
//! enabling the session until every prefix is a kernel route on the node, against BIRD receiving
//! the same table from the same BIRD in the same run, and the agent's memory at that size
//! against that BIRD's. Targets: time ≤ BIRD's; agent RSS ≤ 2 × BIRD's, both as the table
//! lands (the agent's peak, VmHWM) and settled. Figures only, no assertion.
//! Run as root: `cargo bench -p trellis --bench bgp_table` (PREFIXES=N to change the size;
//! TRELLIS_BIN=/path/to/trellis to measure another build of the agent, e.g. an older one).

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trellis_testutil::{proc_status_kb, temp_dir, veth_between, TestNetns};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bird(ns: &TestNetns, dir: &std::path::Path, name: &str, conf: &str) -> Kill {
    let c = dir.join(format!("{name}.conf"));
    std::fs::write(&c, conf).unwrap();
    let ctl = dir.join(format!("{name}.ctl"));
    let child = ns
        .command("bird")
        .args(["-f", "-c", c.to_str().unwrap(), "-s", ctl.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("bird (install bird2)");
    Kill(child)
}

fn birdc(ns: &TestNetns, dir: &std::path::Path, name: &str, args: &[&str]) -> String {
    let ctl = dir.join(format!("{name}.ctl"));
    let out = ns
        .command("birdc")
        .arg("-s")
        .arg(&ctl)
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kernel routes in `ns` with protocol `proto`.
fn count(ns: &TestNetns, proto: &str) -> usize {
    let out = ns
        .command("ip")
        .args(["-4", "route", "show", "proto", proto])
        .output()
        .unwrap();
    out.stdout.iter().filter(|b| **b == b'\n').count()
}

fn wait_count(ns: &TestNetns, proto: &str, n: usize, t0: Instant) -> Duration {
    let deadline = t0 + Duration::from_secs(300);
    loop {
        if count(ns, proto) >= n {
            return t0.elapsed();
        }
        assert!(Instant::now() < deadline, "{proto}: table did not arrive");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A memory figure of a process in MB (see [`proc_status_kb`]).
fn mb(pid: u32, field: &str) -> f64 {
    proc_status_kb(pid, field) as f64 / 1024.0
}

fn met(yes: bool) -> &'static str {
    if yes {
        "met"
    } else {
        "missed"
    }
}

fn main() {
    let n: usize = std::env::var("PREFIXES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = temp_dir("bgpbench");
    let src = TestNetns::new("bsrc");
    let dut = TestNetns::new("bdut");
    let refr = TestNetns::new("bref");
    veth_between(&src, "to-dut", "192.0.2.1/30", &dut, "eth0", "192.0.2.2/30");
    veth_between(
        &src,
        "to-ref",
        "192.0.2.5/30",
        &refr,
        "eth0",
        "192.0.2.6/30",
    );
    // The source: n static /24s, both sessions disabled until the measurement starts.
    let mut statics = String::new();
    for i in 0..n as u32 {
        let a = std::net::Ipv4Addr::from(0x1000_0000u32 + (i << 8));
        let _ = writeln!(statics, "  route {a}/24 blackhole;");
    }
    let src_conf = format!(
        "router id 192.0.2.1;\nprotocol device {{}}\nprotocol static {{ ipv4;\n{statics}}}\n\
         protocol bgp dut {{ disabled; local 192.0.2.1 as 65010; neighbor 192.0.2.2 as 65020; ipv4 {{ import none; export all; next hop self; }}; }}\n\
         protocol bgp refr {{ disabled; local 192.0.2.5 as 65010; neighbor 192.0.2.6 as 65030; ipv4 {{ import none; export all; next hop self; }}; }}\n"
    );
    let _src = bird(&src, dir.path(), "src", &src_conf);
    let ref_conf = "router id 192.0.2.6;\nprotocol device {}\nprotocol kernel { ipv4 { import none; export all; }; }\n\
         protocol bgp upstream { local 192.0.2.6 as 65030; neighbor 192.0.2.5 as 65010; ipv4 { import all; export none; }; }\n";
    let refd = bird(&refr, dir.path(), "ref", ref_conf);
    // The node: a Trellis agent with its datastore, peering with the source.
    let ds = format!("sqlite:{}", dir.path().join("trellis.db").display());
    let trellis_bin =
        std::env::var("TRELLIS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_trellis").into());
    let trellis = trellis_bin.as_str();
    let mut apply = Command::new(trellis)
        .args(["--datastore", &ds, "apply", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    apply.stdin.take().unwrap().write_all(b"apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 65020, nodeToNodeMeshEnabled: false}\n---\napiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: src}\nspec: {peerIP: 192.0.2.1, asNumber: 65010}\n").unwrap();
    assert!(apply.wait().unwrap().success());
    let agent = Kill(
        dut.command(trellis)
            .args([
                "--datastore",
                &ds,
                "agent",
                "--node",
                "dut",
                "--ip",
                "192.0.2.2/30",
                "--socket",
            ])
            .arg(dir.path().join("agent.sock"))
            .env("TRELLIS_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..100 {
        if birdc(&src, dir.path(), "src", &["show", "route", "count"])
            .contains(&format!("{n} of {n} routes"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss_idle = mb(agent.0.id(), "VmRSS");
    let t0 = Instant::now();
    birdc(&src, dir.path(), "src", &["enable", "dut"]);
    let trellis_time = wait_count(&dut, "231", n, t0);
    let rss_full = mb(agent.0.id(), "VmRSS");
    std::thread::sleep(Duration::from_secs(5));
    let rss_settled = mb(agent.0.id(), "VmRSS");
    let t0 = Instant::now();
    birdc(&src, dir.path(), "src", &["enable", "refr"]);
    let bird_time = wait_count(&refr, "bird", n, t0);
    let bird_rss = mb(refd.0.id(), "VmRSS");
    let bird_peak = mb(refd.0.id(), "VmHWM");
    let agent_peak = mb(agent.0.id(), "VmHWM");
    println!(
        "{n} prefixes from BIRD into the kernel: Trellis {:.2} s, BIRD {:.2} s (ratio {:.2}, target <= 1.0: {})",
        trellis_time.as_secs_f64(),
        bird_time.as_secs_f64(),
        trellis_time.as_secs_f64() / bird_time.as_secs_f64(),
        met(trellis_time.as_secs_f64() <= bird_time.as_secs_f64())
    );
    println!(
        "agent memory: {rss_idle:.1} MB before, {rss_full:.1} MB as the table lands, {rss_settled:.1} MB 5 s later, peak {agent_peak:.1} MB; BIRD receiving: {bird_rss:.1} MB (peak {bird_peak:.1} MB)"
    );
    let (peak_ratio, settled_ratio) = (agent_peak / bird_rss, rss_settled / bird_rss);
    println!(
        "agent RSS / BIRD RSS: peak {peak_ratio:.2}, settled {settled_ratio:.2} (target <= 2.0: {})",
        met(peak_ratio.max(settled_ratio) <= 2.0)
    );
    drop(agent);
}
