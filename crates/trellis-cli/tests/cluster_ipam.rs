//! Issue-level test of cluster IPAM: four real agents (one per network namespace) share one
//! datastore; 100 ADDs started at once against each, through the real `trellis-cni` binary in
//! its IPAM role; then `kill -9` of an agent mid-burst, DEL of everything, and release of the
//! empty blocks after the grace period. Run against SQLite and against etcd.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, ip_of, spawn_with_input, Cluster};
use serde_json::{json, Value};

/// The two bursts each start 400 processes; running them at once on a 2-core machine would
/// measure the machine, not Trellis.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn burst_then_release(etcd: bool) {
    let _serial = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let tag = if etcd { "ipe" } else { "ips" };
    let mut c = Cluster::new(tag, etcd, 4);
    // 100 ADDs started at once against each of the 4 agents.
    let started = Instant::now();
    let children: Vec<(usize, String, Child)> = (0..4)
        .flat_map(|i| (0..100).map(move |k| (i, format!("n{i}c{k}"))))
        .map(|(i, cid)| {
            let ch = c.spawn_ipam(i, "ADD", &cid);
            (i, cid, ch)
        })
        .collect();
    let mut seen: BTreeMap<std::net::IpAddr, usize> = BTreeMap::new();
    for (i, cid, ch) in children {
        let out = ch.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "ADD {cid} on node{i} failed: {}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            c.agent_log(i)
        );
        let ip = ip_of(&out).expect("an address");
        assert!(seen.insert(ip, i).is_none(), "{ip} handed out twice");
    }
    eprintln!(
        "400 ADDs through 4 agents ({}): {:?}",
        c.spec,
        started.elapsed()
    );
    assert_eq!(seen.len(), 400);
    let blocks = c.block_affinity();
    for (ip, node) in &seen {
        let (cidr, owner) = blocks
            .iter()
            .find(|(b, _)| b.contains(ip))
            .expect("address inside a block");
        assert_eq!(
            owner,
            &format!("node{node}"),
            "{ip} in {cidr} which is not affine to node{node}"
        );
    }
    c.cli_ok(&["ipam", "check"], None);

    // kill -9 of node0's agent in the middle of a burst, then restart.
    let burst: Vec<(String, Child)> = (0..60)
        .map(|k| format!("k{k}"))
        .map(|cid| {
            let ch = c.spawn_ipam(0, "ADD", &cid);
            (cid, ch)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(60));
    c.kill_agent(0);
    let mut ok = 0;
    for (cid, ch) in burst {
        let out = ch.wait_with_output().unwrap();
        if out.status.success() {
            let ip = ip_of(&out).unwrap();
            assert!(
                seen.insert(ip, 0).is_none(),
                "{ip} ({cid}) handed out twice across the crash"
            );
            ok += 1;
        } else {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                v["code"], 11,
                "an interrupted ADD is 'try again later': {v}"
            );
        }
    }
    eprintln!("{ok}/60 ADDs completed before the agent was killed");
    c.start_agent(0);
    let check = c.cli(&["ipam", "check"], None);
    if !check.status.success() {
        eprintln!(
            "after the crash: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        c.cli_ok(&["ipam", "gc"], None);
        c.cli_ok(&["ipam", "check"], None);
    }
    // The runtime DELs every container it tried to start, successful or not.
    let dels: Vec<Child> = (0..4)
        .flat_map(|i| (0..100).map(move |k| (i, format!("n{i}c{k}"))))
        .chain((0..60).map(|k| (0, format!("k{k}"))))
        .map(|(i, cid)| c.spawn_ipam(i, "DEL", &cid))
        .collect();
    for d in dels {
        let out = d.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "DEL failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let show = c.cli_ok(&["ipam", "show"], None);
    let pool_line = show.lines().find(|l| l.starts_with("pool pool")).unwrap();
    assert!(
        pool_line.split_whitespace().nth(4) == Some("0"),
        "pool still used: {show}"
    );
    assert!(c
        .cli_ok(&["get", "workloadendpoints"], None)
        .contains("No workloadendpoints"));
    c.cli_ok(&["ipam", "check"], None);
    // After the grace period (2 s here) the agents give the empty blocks back.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.block_affinity().is_empty() {
        assert!(
            Instant::now() < deadline,
            "empty blocks were not released: {}",
            c.cli_ok(&["ipam", "show"], None)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(c
        .cli_ok(&["get", "blockaffinities"], None)
        .contains("No blockaffinities"));
    // Deleting a node releases what it held.
    let out = c.spawn_ipam(3, "ADD", "last").wait_with_output().unwrap();
    assert!(out.status.success());
    c.kill_agent(3);
    let msg = c.cli_ok(&["delete", "node", "node3"], None);
    assert!(
        msg.contains("released 1 attachment(s) and 1 block(s)"),
        "{msg}"
    );
    c.cli_ok(&["ipam", "check"], None);
    let unique: HashSet<_> = seen.keys().collect();
    assert_eq!(unique.len(), seen.len());
}

#[test]
fn four_agents_sqlite() {
    burst_then_release(false);
}

#[test]
fn four_agents_etcd() {
    burst_then_release(true);
}

/// Bad input changes nothing: overlap, block size, unknown field, fixed IP outside every pool,
/// an unreachable datastore.
#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let c = Cluster::new("ipbad", false, 1);
    let before = c.cli_ok(&["get", "ippools", "-o", "yaml"], None);
    for (doc, needle) in [
        ("apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: b\nspec:\n  cidr: 10.70.128.0/17\n", "overlaps"),
        ("apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: b\nspec:\n  cidr: 10.71.0.0/16\n  blockSize: 19\n", "spec.blockSize"),
        ("apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: b\nspec:\n  cidr: 10.71.0.0/16\n  bogus: 1\n", "bogus"),
        ("apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: ok\nspec:\n  cidr: 10.72.0.0/16\n---\napiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: b\nspec:\n  cidr: 10.73.0.0/16\n  blockSize: 50\n", "document 2"),
    ] {
        let out = c.cli(&["apply", "-f", "-"], Some(doc));
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert_eq!(
        c.cli_ok(&["get", "ippools", "-o", "yaml"], None),
        before,
        "a rejected apply changed nothing"
    );
    // A fixed address outside every pool.
    let n = &c.nodes[0];
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "trellis-cni", "ipam": {"type": "trellis-ipam", "agentSocket": n.socket}});
    let link = c.dir.path().join("trellis-ipam");
    let _ = std::os::unix::fs::symlink(bin("trellis-cni"), &link);
    let mut plugin = n.ns.command(link.to_str().unwrap());
    plugin
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "fixed")
        .env("CNI_NETNS", n.ns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", c.dir.path())
        .env("CNI_ARGS", "IP=10.99.0.5")
        .stderr(Stdio::null());
    let out = spawn_with_input(&mut plugin, &conf.to_string())
        .wait_with_output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["code"], 7, "{v}");
    assert!(
        v["msg"].as_str().unwrap().contains("not inside any pool"),
        "{v}"
    );
    c.cli_ok(&["ipam", "check"], None);
    // Unreachable datastore.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(bin("trellis"))
        .args([
            "--datastore",
            &format!("etcd:http://127.0.0.1:{port}"),
            "get",
            "ippools",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unreachable"));
}
