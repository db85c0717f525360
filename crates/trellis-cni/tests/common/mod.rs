//! Shared harness for the plugin's integration tests: runs the built `trellis-cni` binary (and
//! its `trellis-ipam` name) inside a test "node" namespace with the environment a runtime gives.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use serde_json::{json, Value};
use tempfile::TempDir;
use trellis_testutil::{temp_dir, TestNetns};

pub const BIN: &str = env!("CARGO_BIN_EXE_trellis-cni");

/// A node namespace plus a CNI_PATH holding the plugin under both its names.
pub struct Node {
    pub ns: TestNetns,
    pub dir: TempDir,
}

pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / {}",
                self.stdout, self.stderr
            )
        })
    }
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "plugin failed: {} {}",
            self.stdout, self.stderr
        );
        self
    }
    pub fn err_code(&self) -> u64 {
        assert_ne!(self.code, 0, "expected failure, got {}", self.stdout);
        self.json()["code"].as_u64().expect("error code")
    }
}

impl Node {
    pub fn new(tag: &str) -> Node {
        let ns = TestNetns::new(tag);
        let dir = temp_dir(tag);
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir_all(&bin_dir).unwrap();
        std::os::unix::fs::symlink(BIN, bin_dir.join("trellis-cni")).unwrap();
        std::os::unix::fs::symlink(BIN, bin_dir.join("trellis-ipam")).unwrap();
        Node { ns, dir }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    pub fn cni_path(&self) -> String {
        format!("{}:/usr/lib/cni", self.dir.path().join("bin").display())
    }

    /// A routed-mode config with one IPv4 range (and optionally more fields).
    pub fn conf(&self, version: &str, extra: Value) -> Value {
        let mut c = json!({"cniVersion": version, "name": "testnet", "type": "trellis-cni",
            "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.77.0.0/24"}]],
                     "dataDir": self.data_dir()}});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    /// Starts the plugin (named `name`) inside the node namespace. The arguments mirror the CNI
    /// environment one for one, hence their number.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        &self,
        name: &str,
        command: &str,
        cid: &str,
        netns: Option<&Path>,
        ifname: &str,
        conf: &Value,
        extra_env: &[(&str, &str)],
    ) -> Child {
        let bin = self.dir.path().join("bin").join(name);
        let mut c = self.ns.command(bin.to_str().unwrap());
        c.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", cid)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", self.cni_path())
            .env(
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
            )
            .env_remove("CNI_NETNS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(n) = netns {
            c.env("CNI_NETNS", n);
        }
        for (k, v) in extra_env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("spawn plugin");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        child
    }

    #[allow(clippy::too_many_arguments)]
    pub fn call_as(
        &self,
        name: &str,
        command: &str,
        cid: &str,
        netns: Option<&Path>,
        ifname: &str,
        conf: &Value,
        extra_env: &[(&str, &str)],
    ) -> Outcome {
        let out = self
            .spawn(name, command, cid, netns, ifname, conf, extra_env)
            .wait_with_output()
            .unwrap();
        Outcome {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn call(&self, command: &str, cid: &str, netns: Option<&Path>, conf: &Value) -> Outcome {
        self.call_as("trellis-cni", command, cid, netns, "eth0", conf, &[])
    }

    /// Files in the IPAM store of network `net` that are allocations.
    pub fn allocations(&self, net: &str) -> Vec<(String, String)> {
        let dir = self.data_dir().join(net);
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.parse::<std::net::IpAddr>().is_ok() {
                    let owner = std::fs::read_link(e.path())
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    out.push((name, owner));
                }
            }
        }
        out.sort();
        out
    }
}

/// A pod namespace (its own guard).
pub fn pod(tag: &str) -> TestNetns {
    TestNetns::new(tag)
}

/// The address (without prefix) of `ips[i]` in a result.
pub fn ip_of(result: &Value, i: usize) -> String {
    result["ips"][i]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

/// `ping -c1 -W1` from `from` to `to`, up to 3 tries.
pub fn ping(from: &TestNetns, to: &str) -> bool {
    let prog = if to.contains(':') { "-6" } else { "-4" };
    (0..3).any(|_| {
        from.exec(&["ping", prog, "-c1", "-W1", to])
            .status
            .success()
    })
}

/// Waits (up to 10 s) for a link to disappear: DEL takes the host end down at once and deletes
/// it from a detached child right after answering, so a test must not expect it gone at once.
pub fn link_gone(ns: &TestNetns, name: &str) -> bool {
    for _ in 0..200 {
        if !ns.exec(&["ip", "link", "show", name]).status.success() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

/// What a bounded run produced: the outcome, or that it had to be killed at the deadline.
pub enum Bounded {
    Done(Outcome),
    Hung,
}

impl Bounded {
    /// The outcome; panics naming `what` if the plugin hung.
    pub fn finished(self, what: &str) -> Outcome {
        match self {
            Bounded::Done(o) => o,
            Bounded::Hung => panic!("{what}: the plugin did not finish before its deadline"),
        }
    }
}

static RUN_COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Node {
    /// Runs the plugin (named `name`) inside the node namespace with exactly the CNI variables
    /// in `env` (nothing inherited), `stdin` from a file and stdout/stderr to files (so no pipe
    /// can fill up), killed at `deadline`; with `address_space` set, under that RLIMIT_AS.
    pub fn run_bounded(
        &self,
        name: &str,
        env: &[(&str, &str)],
        stdin: &[u8],
        deadline: std::time::Duration,
        address_space: Option<u64>,
    ) -> Bounded {
        use std::os::fd::AsFd;
        use std::os::unix::process::CommandExt;
        let n = RUN_COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let io = self.dir.path().join(format!("run-{n}"));
        std::fs::create_dir_all(&io).unwrap();
        std::fs::write(io.join("stdin"), stdin).unwrap();
        let bin = self.dir.path().join("bin").join(name);
        let mut c = std::process::Command::new(&bin);
        for k in [
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_ARGS",
            "CNI_PATH",
            "TRELLIS_LOG",
        ] {
            c.env_remove(k);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(std::fs::File::open(io.join("stdin")).unwrap())
            .stdout(std::fs::File::create(io.join("stdout")).unwrap())
            .stderr(std::fs::File::create(io.join("stderr")).unwrap());
        let node_ns = std::fs::File::open(self.ns.path()).unwrap();
        // SAFETY: between fork and exec only async-signal-safe calls (setns, setrlimit).
        unsafe {
            c.pre_exec(move || {
                nix::sched::setns(node_ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                if let Some(limit) = address_space {
                    let rl = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = c.spawn().expect("spawn plugin");
        let end = std::time::Instant::now() + deadline;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if std::time::Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        let read =
            |f: &str| String::from_utf8_lossy(&std::fs::read(io.join(f)).unwrap()).into_owned();
        let out = match status {
            Some(st) => Bounded::Done(Outcome {
                code: st.code().unwrap_or(-1),
                stdout: read("stdout").trim().to_string(),
                stderr: read("stderr"),
            }),
            None => Bounded::Hung,
        };
        let _ = std::fs::remove_dir_all(&io);
        out
    }

    /// The usual CNI environment for one call, as pairs for [`Node::run_bounded`].
    pub fn env<'a>(
        &'a self,
        command: &'a str,
        cid: &'a str,
        netns: Option<&'a str>,
        ifname: &'a str,
        cni_path: &'a str,
    ) -> Vec<(&'a str, &'a str)> {
        let mut v = vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", cid),
            ("CNI_IFNAME", ifname),
            ("CNI_PATH", cni_path),
        ];
        if let Some(n) = netns {
            v.push(("CNI_NETNS", n));
        }
        v
    }
}

/// Links, addresses and routes (all tables, both families) of a namespace, for comparing before
/// and after.
pub fn net_state(ns: &TestNetns) -> String {
    // Names, addresses and routes only: flags such as carrier or DAD state settle on their own.
    let out = ns.sh(
        "ip -o link | awk '{print $2}'; ip -o addr | awk '{print $2, $3, $4}'; \
         ip route show table all; ip -6 route show table all",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Gives the node a default route of its own (through a veth pair inside it), so that a test can
/// see that no call touched it.
pub fn give_default_route(ns: &TestNetns) {
    ns.exec_ok(&[
        "ip", "link", "add", "cnry0", "type", "veth", "peer", "name", "cnry1",
    ]);
    for dev in ["cnry0", "cnry1"] {
        ns.exec_ok(&[
            "sh",
            "-c",
            &format!("echo 1 > /proc/sys/net/ipv6/conf/{dev}/disable_ipv6"),
        ]);
    }
    ns.exec_ok(&["ip", "addr", "add", "192.0.2.2/24", "dev", "cnry0"]);
    ns.exec_ok(&["ip", "link", "set", "cnry0", "up"]);
    ns.exec_ok(&["ip", "link", "set", "cnry1", "up"]);
    ns.exec_ok(&["ip", "route", "add", "default", "via", "192.0.2.1"]);
}

/// A netlink view of a namespace, kept open: the same facts as [`net_state`] without running a
/// process, for tests that compare thousands of times.
pub struct NetView {
    nl: trellis_dataplane::Netlink,
}

impl NetView {
    pub fn of(ns: &TestNetns) -> NetView {
        let handle = trellis_dataplane::Netns::open(ns.path()).expect("open namespace");
        NetView {
            nl: trellis_dataplane::Netlink::open_in(&handle).expect("netlink in namespace"),
        }
    }

    /// One sorted line per link, address and route (every table), interfaces by name.
    pub fn state(&mut self) -> String {
        let links = self.nl.links().expect("dump links");
        let name = |i: u32| {
            links
                .iter()
                .find(|l| l.index == i)
                .map(|l| l.name.clone())
                .unwrap_or_else(|| format!("#{i}"))
        };
        let mut lines = Vec::new();
        for l in &links {
            lines.push(format!(
                "link {} kind={} master={} up={}",
                l.name,
                l.kind.as_deref().unwrap_or("-"),
                l.master.map(name).unwrap_or_else(|| "-".into()),
                l.up
            ));
        }
        for (i, a) in self.nl.addresses(None).expect("dump addresses") {
            lines.push(format!("addr {} {a}", name(i)));
        }
        for r in self.nl.routes().expect("dump routes") {
            lines.push(format!(
                "route table={} {} via {} dev {} {:?} {:?} proto={} metric={:?}",
                r.table,
                r.dst,
                r.gateway
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "-".into()),
                r.oif.map(name).unwrap_or_else(|| "-".into()),
                r.scope,
                r.kind,
                r.protocol,
                r.metric
            ));
        }
        lines.sort();
        lines.join("\n")
    }
}
