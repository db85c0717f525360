//! Issue-level test of cluster IPAM: four real agents (one per network namespace) share one
//! datastore; 100 ADDs started at once against each, through the real `trellis-cni` binary in
//! its IPAM role; then `kill -9` of an agent right after the N-th allocation of a burst
//! committed (for several N, with the burst in flight), `ipam check` clean without repair and
//! retried ADDs converging; DEL of everything, and release of the empty blocks after the grace
//! period. Also `ipam gc` and `delete node` looping against ADD/DEL bursts, and one address per
//! family through the plugin. Run against SQLite and against etcd.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::os::fd::AsRawFd;
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

    // kill -9 of node0's agent right after the N-th allocation of a burst committed, for
    // several N, while the burst's ADDs are in flight. Nothing repairs the store afterwards.
    let mut killed_cids = Vec::new();
    for (round, n) in [1usize, 5, 12, 20, 30].into_iter().enumerate() {
        let cids: Vec<String> = (0..40).map(|k| format!("k{round}x{k}")).collect();
        let killer = kill_after_commits(&c, &format!("k8s.k{round}x"), n, 0);
        let burst: Vec<(String, Child)> = cids
            .iter()
            .map(|cid| (cid.clone(), c.spawn_ipam(0, "ADD", cid)))
            .collect();
        let seen_at_kill = killer.join().expect("kill watcher");
        let mut answered = BTreeMap::new();
        for (cid, ch) in burst {
            let out = ch.wait_with_output().unwrap();
            if out.status.success() {
                answered.insert(cid, ip_of(&out).unwrap());
            } else {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(
                    v["code"], 11,
                    "an interrupted ADD is 'try again later': {v}"
                );
            }
        }
        c.kill_agent(0); // reaps it
                         // Where the kill landed: what the store holds for this burst, now that nothing can
                         // write it any more.
        let held = recorded(&c);
        let committed: BTreeMap<&str, std::net::IpAddr> = cids
            .iter()
            .filter_map(|cid| {
                let h = held.get(&format!("k8s.{cid}.eth0"))?;
                assert_eq!(h.len(), 1, "{cid} holds {h:?}");
                Some((cid.as_str(), h[0]))
            })
            .collect();
        eprintln!(
            "kill after allocation {n} (the watcher counted {seen_at_kill} in the blocks): {} of 40 allocations committed, {} ADDs answered, {} interrupted",
            committed.len(),
            answered.len(),
            40 - answered.len()
        );
        assert!(
            committed.len() >= n && committed.len() < cids.len(),
            "the kill must land mid-burst"
        );
        // An answered ADD is recorded with the address it answered; nothing else is half-done.
        for (cid, ip) in &answered {
            assert_eq!(committed.get(cid.as_str()), Some(ip), "{cid}");
            assert!(
                seen.insert(*ip, 0).is_none(),
                "{ip} ({cid}) handed out twice"
            );
        }
        c.cli_ok(&["ipam", "check"], None);
        // The runtime retries after the agent restarts: every ADD converges, and an attachment
        // committed before the kill gets the address it was recorded with.
        c.start_agent(0);
        let retries: Vec<(String, Child)> = cids
            .iter()
            .map(|cid| (cid.clone(), c.spawn_ipam(0, "ADD", cid)))
            .collect();
        for (cid, ch) in retries {
            let out = ch.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "retried ADD {cid}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            let ip = ip_of(&out).unwrap();
            match committed.get(cid.as_str()) {
                Some(was) => assert_eq!(*was, ip, "{cid} came back with another address"),
                None => assert!(
                    seen.insert(ip, 0).is_none(),
                    "{ip} ({cid}) handed out twice"
                ),
            }
        }
        c.cli_ok(&["ipam", "check"], None);
        killed_cids.extend(cids);
    }
    // The runtime DELs every container it tried to start, successful or not.
    let dels: Vec<Child> = (0..4)
        .flat_map(|i| (0..100).map(move |k| (i, format!("n{i}c{k}"))))
        .chain(killed_cids.iter().map(|cid| (0, cid.clone())))
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

/// Issue 9 "done when": `trellis ipam gc` and `trellis delete node` (an idle node, and a node
/// whose running agent registers it again) in a loop against ADD/DEL bursts through real agents
/// and the real plugin. After every round: no address given to two live attachments, every
/// live attachment holds exactly its address, `ipam check` clean. Bounded in rounds and time.
fn gc_and_delete_node_under_bursts(etcd: bool) {
    let _serial = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let tag = if etcd { "gce" } else { "gcs" };
    let c = Cluster::new(tag, etcd, 3);
    let started = Instant::now();
    let mut live: BTreeMap<String, std::net::IpAddr> = BTreeMap::new(); // cid → address
    let mut rounds = 0;
    while rounds < 12 && started.elapsed() < Duration::from_secs(45) {
        rounds += 1;
        let adds: Vec<(String, Child)> = (0..2)
            .flat_map(|i| (0..10).map(move |k| (i, format!("r{rounds}n{i}c{k}"))))
            .map(|(i, cid)| {
                let ch = c.spawn_ipam(i, "ADD", &cid);
                (cid, ch)
            })
            .collect();
        // DEL of every other live attachment (the runtime knows each one's node).
        let doomed: Vec<String> = live.keys().step_by(2).cloned().collect();
        let dels: Vec<(String, Child)> = doomed
            .iter()
            .map(|cid| {
                let node: usize = cid[cid.find('n').unwrap() + 1..][..1].parse().unwrap();
                (cid.clone(), c.spawn_ipam(node, "DEL", cid))
            })
            .collect();
        // Meanwhile: gc, delete of an idle node, delete of node2 (its agent re-registers it).
        let idle = format!("idle{rounds}");
        c.cli_ok(
            &["apply", "-f", "-"],
            Some(&format!(
                "apiVersion: trellis.dev/v1\nkind: Node\nmetadata:\n  name: {idle}\nspec: {{}}\n"
            )),
        );
        let ops = [
            vec!["ipam", "gc", "--grace", "0"],
            vec!["delete", "node", &idle],
            vec!["delete", "node", "node2"],
            vec!["ipam", "gc", "--grace", "0"],
        ];
        let mut outputs = Vec::new();
        for op in &ops {
            outputs.push((op.join(" "), c.cli(op, None)));
        }
        for (cid, ch) in adds {
            let out = ch.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "ADD {cid}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            live.insert(cid, ip_of(&out).unwrap());
        }
        for (cid, ch) in dels {
            let out = ch.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "DEL {cid}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            live.remove(&cid);
        }
        for (what, out) in &outputs {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "trellis {what}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            if what.starts_with("delete node") {
                assert!(
                    text.contains("released 0 attachment(s)"),
                    "trellis {what}: {text}"
                );
            }
        }
        // node2's agent registers it again at its next heartbeat (1 s here).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.cli(&["get", "nodes", "node2"], None).status.success() {
            assert!(Instant::now() < deadline, "node2 was not registered again");
            std::thread::sleep(Duration::from_millis(100));
        }
        // No address twice among live attachments; each holds exactly what it was given.
        let held = recorded(&c);
        let mut owners: BTreeMap<std::net::IpAddr, &str> = BTreeMap::new();
        for (cid, ip) in &live {
            assert!(
                owners.insert(*ip, cid).is_none(),
                "round {rounds}: {ip} given twice"
            );
            assert_eq!(
                held.get(&format!("k8s.{cid}.eth0")),
                Some(&vec![*ip]),
                "round {rounds}: {cid}"
            );
        }
        c.cli_ok(&["ipam", "check"], None);
    }
    eprintln!(
        "{}: {rounds} rounds of ADD/DEL bursts against gc and delete node in {:?}, {} live",
        c.spec,
        started.elapsed(),
        live.len()
    );
    assert!(rounds >= 3, "only {rounds} rounds ran");
}

#[test]
fn gc_and_delete_node_under_bursts_sqlite() {
    gc_and_delete_node_under_bursts(false);
}

#[test]
fn gc_and_delete_node_under_bursts_etcd() {
    gc_and_delete_node_under_bursts(true);
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
    if !link.exists() {
        std::os::unix::fs::symlink(bin("trellis-cni"), &link).unwrap();
    }
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
    // Two addresses of one family (Calico allows one per family): refused, naming the field,
    // and nothing recorded.
    plugin
        .env("CNI_CONTAINERID", "twoips")
        .env("CNI_ARGS", "IP=10.70.0.5,10.70.0.6");
    let out = spawn_with_input(&mut plugin, &conf.to_string())
        .wait_with_output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["code"], 7, "{v}");
    let msg = v["msg"].as_str().unwrap();
    assert!(
        msg.contains("ips")
            && msg.contains("CNI_ARGS IP")
            && msg.contains("one address per family"),
        "{v}"
    );
    assert!(recorded(&c).is_empty(), "nothing recorded");
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

/// Every allocation in the store: handle → addresses (from `trellis get ipamblocks -o json`).
fn recorded(c: &Cluster) -> BTreeMap<String, Vec<std::net::IpAddr>> {
    let v: Value =
        serde_json::from_str(&c.cli_ok(&["get", "ipamblocks", "-o", "json"], None)).unwrap();
    let mut out: BTreeMap<String, Vec<std::net::IpAddr>> = BTreeMap::new();
    for b in v["items"].as_array().unwrap() {
        let cidr: ipnet::IpNet = b["spec"]["cidr"].as_str().unwrap().parse().unwrap();
        let attrs = b["spec"]["attributes"].as_array().unwrap();
        for (ord, a) in b["spec"]["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            if let Some(i) = a.as_u64() {
                let ip = match cidr {
                    ipnet::IpNet::V4(n) => {
                        std::net::IpAddr::V4((u32::from(n.network()) + ord as u32).into())
                    }
                    ipnet::IpNet::V6(n) => {
                        std::net::IpAddr::V6((u128::from(n.network()) + ord as u128).into())
                    }
                };
                let h = attrs[i as usize]["handle_id"].as_str().unwrap().to_string();
                out.entry(h).or_default().push(ip);
            }
        }
    }
    out
}

/// Addresses recorded in the blocks of a listing for handles starting with `handle_prefix`.
fn allocations_of(items: &[trellis_store::KeyValue], handle_prefix: &str) -> usize {
    let mut n = 0;
    for kv in items {
        let b: Value = serde_json::from_slice(&kv.value).unwrap();
        let attrs = b["spec"]["attributes"].as_array().unwrap();
        for a in b["spec"]["allocations"].as_array().unwrap() {
            if let Some(i) = a.as_u64() {
                let h = attrs[i as usize]["handle_id"].as_str().unwrap();
                n += usize::from(h.starts_with(handle_prefix));
            }
        }
    }
    n
}

/// Starts a thread in the cluster's control namespace (where etcd listens) that polls the
/// blocks and SIGKILLs node `i`'s agent as soon as `n` addresses of handles starting with
/// `handle_prefix` are recorded in them (an address in a block without its handle — a write
/// split in two — would be caught right there); returns once the watcher is connected. The
/// thread returns the count it saw.
fn kill_after_commits(
    c: &Cluster,
    prefix: &str,
    n: usize,
    i: usize,
) -> std::thread::JoinHandle<usize> {
    let ns = c
        .control
        .as_ref()
        .expect("control namespace")
        .path()
        .to_path_buf();
    let (spec, prefix) = (c.spec.clone(), prefix.to_string());
    let pid = c.nodes[i].agent.as_ref().expect("agent running").id() as i32;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        // SAFETY: setns on this thread only; the file descriptor is valid for the call.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let store = trellis_store::open(&spec).await.unwrap();
            const BLOCKS: &str = "/trellis/v1/ipamblocks/";
            let listing = store.list(BLOCKS).await.unwrap();
            let mut per_block: BTreeMap<String, usize> = listing
                .items
                .iter()
                .map(|kv| {
                    (
                        kv.key.clone(),
                        allocations_of(std::slice::from_ref(kv), &prefix),
                    )
                })
                .collect();
            // etcd pushes each commit at once; the SQLite store's watch polls every 50 ms, so
            // there the blocks are listed every 2 ms instead.
            let mut watch = if spec.starts_with("etcd:") {
                Some(store.watch(BLOCKS, listing.revision + 1).await.unwrap())
            } else {
                None
            };
            ready_tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let count: usize = per_block.values().sum();
                if count >= n {
                    // SAFETY: kill(2) of the agent this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return count;
                }
                assert!(
                    Instant::now() < deadline,
                    "only {count} of {n} allocations committed in 60 s"
                );
                match &mut watch {
                    Some(w) => {
                        let ev = tokio::time::timeout_at(deadline.into(), w.next())
                            .await
                            .expect("a block change within 60 s")
                            .expect("watch open")
                            .unwrap();
                        let kv = trellis_store::KeyValue {
                            key: ev.key.clone(),
                            value: ev.value,
                            create_revision: ev.revision,
                            mod_revision: ev.revision,
                        };
                        let here = match ev.kind {
                            trellis_store::WatchEventKind::Put => {
                                allocations_of(std::slice::from_ref(&kv), &prefix)
                            }
                            trellis_store::WatchEventKind::Delete => 0,
                        };
                        per_block.insert(ev.key, here);
                    }
                    None => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        per_block = store
                            .list(BLOCKS)
                            .await
                            .unwrap()
                            .items
                            .iter()
                            .map(|kv| {
                                (
                                    kv.key.clone(),
                                    allocations_of(std::slice::from_ref(kv), &prefix),
                                )
                            })
                            .collect();
                    }
                }
            }
        })
    });
    ready_rx.recv().expect("kill watcher connected");
    t
}
