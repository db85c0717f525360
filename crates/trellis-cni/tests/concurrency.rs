//! Parallel ADDs for different containers, and `kill -9` at known points inside an ADD: no
//! address is ever handed to two containers, and a retried ADD or a DEL after the kill leaves a
//! clean state. Each kill waits until the plugin has visibly reached its point — blocked on a
//! lock the test holds (seen in /proc/locks), holding the container's lock (a non-blocking flock
//! from the test fails), or its address recorded — so the test knows where every kill landed.

mod common;

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{link_gone, pod, Node};
use nix::fcntl::{Flock, FlockArg};
use serde_json::{json, Value};
use trellis_cni::lock::{bridge_lock_path, container_lock_path, FileLock};
use trellis_cni::veth::host_veth_name;
use trellis_testutil::TestNetns;

#[test]
fn parallel_adds_get_distinct_addresses() {
    let node = Node::new("par");
    let pods: Vec<_> = (0..24).map(|i| pod(&format!("pa{i}"))).collect();
    let conf = node.conf("1.0.0", json!({}));
    let children: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            node.spawn(
                "trellis-cni",
                "ADD",
                &format!("par-{i}"),
                Some(p.path()),
                "eth0",
                &conf,
                &[],
            )
        })
        .collect();
    let mut ips = HashSet::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            ips.insert(v["ips"][0]["address"].as_str().unwrap().to_string()),
            "duplicate address"
        );
    }
    assert_eq!(node.allocations("testnet").len(), 24);
    for (i, p) in pods.iter().enumerate() {
        node.call("DEL", &format!("par-{i}"), Some(p.path()), &conf)
            .ok();
    }
    assert!(node.allocations("testnet").is_empty());
}

/// Waits (up to 10 s) for `cond`, panicking with `what` if it never holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether process `pid` is blocked waiting for a flock on the file at `path` (/proc/locks lists
/// waiters as `N: -> FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...`).
fn blocked_on(pid: u32, path: &Path) -> bool {
    let Ok(ino) = std::fs::metadata(path).map(|m| m.ino()) else {
        return false;
    };
    std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("->"))
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 7
                && f[5] == pid.to_string()
                && f[6].rsplit(':').next() == Some(&ino.to_string())
        })
}

/// Whether someone holds the flock on `path` (a non-blocking attempt fails).
fn held(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(_mine) => false,
        Err((_, e)) => {
            assert_eq!(e, nix::errno::Errno::EWOULDBLOCK, "{}", path.display());
            true
        }
    }
}

/// One container's attachment in the kill test.
struct Subject<'a> {
    node: &'a Node,
    pod: &'a TestNetns,
    cid: String,
    conf: Value,
}

impl Subject<'_> {
    fn spawn_add(&self) -> Child {
        self.node.spawn(
            "trellis-cni",
            "ADD",
            &self.cid,
            Some(self.pod.path()),
            "eth0",
            &self.conf,
            &[],
        )
    }

    fn owner(&self) -> String {
        format!("{}/eth0", self.cid)
    }

    fn recorded(&self, net: &str) -> Vec<String> {
        self.node
            .allocations(net)
            .into_iter()
            .filter(|(_, o)| *o == self.owner())
            .map(|(ip, _)| ip)
            .collect()
    }

    fn host_veth_exists(&self) -> bool {
        let name = host_veth_name(&self.cid, "eth0");
        self.node
            .ns
            .exec(&["ip", "link", "show", &name])
            .status
            .success()
    }

    /// SIGKILLs the ADD (asserting it was still running) and reports what it had done.
    fn kill(&self, mut child: Child, point: &str, net: &str) -> String {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{point}: the ADD finished before the kill"
        );
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{point}: the ADD was not killed but ended with {status:?}"
        );
        format!(
            "{point}: killed with address recorded={:?}, host veth present={}",
            self.recorded(net),
            self.host_veth_exists()
        )
    }

    /// SIGKILLs an ADD that was not held at a known point: it may finish between the look and
    /// the kill, and the report says which happened.
    fn kill_or_completed(&self, mut child: Child, point: &str, net: &str) -> String {
        let _ = child.kill();
        let status = child.wait().unwrap();
        match std::os::unix::process::ExitStatusExt::signal(&status) {
            Some(9) => format!(
                "{point}: killed with address recorded={:?}, host veth present={}",
                self.recorded(net),
                self.host_veth_exists()
            ),
            _ => format!("{point}: the ADD had completed ({status:?})"),
        }
    }

    /// The invariants after a kill: the container's lock is free, every record is complete and
    /// no owner holds two addresses; then a retried ADD (when `retry`) gets the address the
    /// killed one recorded, and a DEL leaves no record, no veth, no pod interface and no
    /// masquerade rule.
    fn assert_recoverable(&self, net: &str, retry: bool, landed: &str) {
        assert!(
            !held(&container_lock_path(&self.cid)),
            "{landed}: container lock still held"
        );
        let mut owners = HashSet::new();
        for (ip, owner) in self.node.allocations(net) {
            let parts: Vec<&str> = owner.split('/').collect();
            assert!(
                parts.len() == 2 && parts.iter().all(|p| !p.is_empty()),
                "{landed}: incomplete record {ip} -> {owner:?}"
            );
            assert!(
                owners.insert(owner.clone()),
                "{landed}: {owner} holds two addresses"
            );
        }
        let before = self.recorded(net);
        if retry {
            let out = self
                .node
                .call("ADD", &self.cid, Some(self.pod.path()), &self.conf);
            assert_eq!(out.code, 0, "{landed}: retried ADD failed: {}", out.stdout);
            let ip = common::ip_of(&out.json(), 0);
            if let Some(prev) = before.first() {
                assert_eq!(&ip, prev, "{landed}: the retried ADD took another address");
            }
            assert_eq!(self.recorded(net), vec![ip], "{landed}");
        }
        let out = self
            .node
            .call("DEL", &self.cid, Some(self.pod.path()), &self.conf);
        assert_eq!(out.code, 0, "{landed}: DEL failed: {}", out.stdout);
        assert!(
            self.recorded(net).is_empty(),
            "{landed}: address still recorded after DEL"
        );
        let host = host_veth_name(&self.cid, "eth0");
        assert!(
            link_gone(&self.node.ns, &host),
            "{landed}: {host} left after DEL"
        );
        assert!(
            !self.pod.exec_ok(&["ip", "link"]).contains("eth0"),
            "{landed}: pod interface left after DEL"
        );
        let nft = self
            .node
            .ns
            .exec(&["nft", "list", "table", "inet", "trellis_cni_masq"]);
        let rules = String::from_utf8_lossy(&nft.stdout);
        assert!(
            !rules.contains("masquerade"),
            "{landed}: masquerade rule left after DEL: {rules}"
        );
    }
}

/// Removes a file on drop (the lock file of this test's bridge, named for the test process).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn kill_nine_at_known_points_leaves_a_recoverable_state() {
    let node = Node::new("kill");
    let p = pod("kill");
    let tag = std::process::id();
    let bridge = format!("trk{}", tag % 100_000);
    let _bridge_lock = RemoveOnDrop(bridge_lock_path(&bridge));
    let net = "testnet";
    let routed = node.conf("1.0.0", json!({}));
    let bridged = node.conf(
        "1.0.0",
        json!({"mode": "bridge", "bridge": bridge, "isGateway": true,
        "ipMasq": true, "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.77.0.0/24"}]],
        "dataDir": node.data_dir()}}),
    );
    let store_lock: PathBuf = node.data_dir().join(net).join("lock");
    let subject = |n: u32, conf: &Value| Subject {
        node: &node,
        pod: &p,
        cid: format!("kill{tag}-{n}"),
        conf: conf.clone(),
    };
    let mut landed = Vec::new();

    // 1. Blocked on the container's lock (held by the test): nothing done yet.
    let s = subject(1, &routed);
    let mine = FileLock::acquire(&container_lock_path(&s.cid)).unwrap();
    let child = s.spawn_add();
    let pid = child.id();
    wait_for("the ADD waits for the container lock", || {
        blocked_on(pid, &container_lock_path(&s.cid))
    });
    landed.push(s.kill(child, "waiting for the container lock", net));
    drop(mine);
    s.assert_recoverable(net, true, landed.last().unwrap());

    // 2. Holding the container's lock, blocked on the IPAM store's lock (held by the test).
    let s = subject(2, &routed);
    let mine = FileLock::acquire(&store_lock).unwrap();
    let child = s.spawn_add();
    let pid = child.id();
    wait_for("the ADD waits for the store lock", || {
        blocked_on(pid, &store_lock)
    });
    assert!(
        held(&container_lock_path(&s.cid)),
        "the ADD should hold the container lock"
    );
    landed.push(s.kill(
        child,
        "holding the container lock, waiting for the IPAM store",
        net,
    ));
    drop(mine);
    assert!(s.recorded(net).is_empty());
    s.assert_recoverable(net, false, landed.last().unwrap());

    // 3. Address recorded, waiting to attach to the bridge (its lock held by the test): no veth.
    let s = subject(3, &bridged);
    let mine = FileLock::acquire(&bridge_lock_path(&bridge)).unwrap();
    let child = s.spawn_add();
    let pid = child.id();
    wait_for("the ADD waits for the bridge lock", || {
        blocked_on(pid, &bridge_lock_path(&bridge))
    });
    assert_eq!(s.recorded(net).len(), 1, "the address should be recorded");
    assert!(!s.host_veth_exists());
    landed.push(s.kill(child, "address recorded, before the veth", net));
    drop(mine);
    s.assert_recoverable(net, true, landed.last().unwrap());

    // 4. Address recorded, veth created and the pod configured, waiting to install the
    // masquerade rule (the nftables lock held by the test, briefly: it is the node's).
    let s = subject(4, &bridged);
    let mine = FileLock::acquire(Path::new(trellis_cni::masq::LOCK)).unwrap();
    let child = s.spawn_add();
    let pid = child.id();
    wait_for("the ADD waits for the nftables lock", || {
        blocked_on(pid, Path::new(trellis_cni::masq::LOCK))
    });
    assert!(s.host_veth_exists(), "the veth should exist");
    landed.push(s.kill(child, "veth up, before the masquerade rule", net));
    drop(mine);
    s.assert_recoverable(net, true, landed.last().unwrap());

    // 5. Unsynchronised: killed as soon as the address shows up in the store (routed mode),
    // several times; each report says what the ADD had done by then.
    for n in 5..10 {
        let s = subject(n, &routed);
        let child = s.spawn_add();
        wait_for("the address is recorded", || !s.recorded(net).is_empty());
        landed.push(s.kill_or_completed(child, &format!("after the record (round {n})"), net));
        s.assert_recoverable(net, n % 2 == 0, landed.last().unwrap());
    }
    eprintln!("kills landed:\n  {}", landed.join("\n  "));
    assert!(node.allocations(net).is_empty());
}
