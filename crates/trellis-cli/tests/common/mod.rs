//! Shared harness: a cluster of agents in network namespaces around one datastore (SQLite, or
//! etcd in a bridged control namespace), the CLI, and the IPAM plugin run as a runtime would.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
pub use trellis_testutil::spawn_with_input;
use trellis_testutil::{temp_dir, EtcdServer, TestNetns};

pub fn bin(name: &str) -> PathBuf {
    // target/debug/deps/<test> → target/debug/<name>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built; run cargo build --workspace first",
        p.display()
    );
    p
}

pub struct Node {
    pub name: String,
    pub ns: TestNetns,
    pub socket: PathBuf,
    pub agent: Option<Child>,
}

pub struct Cluster {
    pub spec: String,
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    _etcd: Option<EtcdServer>,
    /// The namespace holding the nodes' L2 segment (bridge `br0`, 192.0.2.1/24); etcd and the
    /// CLI run there.
    pub control: Option<TestNetns>,
    /// Extra `trellis agent` flags for every node.
    pub agent_args: Vec<String>,
    /// Extra environment of agents started from now on.
    pub agent_env: Vec<(String, String)>,
}

impl Cluster {
    pub fn new(tag: &str, etcd: bool, nodes: usize) -> Cluster {
        Cluster::new_with(tag, etcd, nodes, &[])
    }

    /// A cluster whose agents run with `agent_args` added.
    pub fn new_with(tag: &str, etcd: bool, nodes: usize, agent_args: &[&str]) -> Cluster {
        let dir = temp_dir(tag);
        // etcd lives in a control namespace with a bridge every node joins (loopback is per
        // namespace, so a node could not reach an etcd on the test's own 127.0.0.1).
        // Every node joins one L2 segment (a bridge in the control namespace), as cluster nodes
        // on one subnet are.
        let control = Some({
            let ns = TestNetns::new(&format!("{tag}ctl"));
            // A fixed MAC: otherwise the bridge takes its lowest port's MAC and changes it as
            // ports join, leaving nodes with a stale ARP entry for etcd's address.
            ns.exec_ok(&[
                "ip",
                "link",
                "add",
                "br0",
                "address",
                "02:00:00:00:00:01",
                "type",
                "bridge",
            ]);
            ns.exec_ok(&["ip", "addr", "add", "192.0.2.1/24", "dev", "br0"]);
            ns.exec_ok(&["ip", "link", "set", "br0", "up"]);
            ns
        });
        let etcd_server = control
            .as_ref()
            .filter(|_| etcd)
            .map(|ns| EtcdServer::start_in(ns, "192.0.2.1"));
        let spec = match &etcd_server {
            Some(e) => format!("etcd:{}", e.endpoint),
            None => format!("sqlite:{}", dir.path().join("trellis.db").display()),
        };
        let mut c = Cluster {
            spec,
            dir,
            nodes: Vec::new(),
            _etcd: etcd_server,
            control,
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
            agent_env: Vec::new(),
        };
        c.cli_ok(&["apply", "-f", "-"], Some("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: pool\nspec:\n  cidr: 10.70.0.0/16\n  blockSize: 26\n"));
        for i in 0..nodes {
            let ns = TestNetns::new(&format!("{tag}n{i}"));
            match &c.control {
                Some(ctl) => {
                    let port = format!("v{i}");
                    let out = Command::new("ip")
                        .args([
                            "link",
                            "add",
                            "upl0",
                            "netns",
                            ns.name(),
                            "type",
                            "veth",
                            "peer",
                            "name",
                            &port,
                            "netns",
                            ctl.name(),
                        ])
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    ctl.exec_ok(&["ip", "link", "set", &port, "master", "br0", "up"]);
                }
                None => {
                    ns.exec_ok(&[
                        "ip", "link", "add", "upl0", "type", "veth", "peer", "name", "upl1",
                    ]);
                }
            }
            ns.exec_ok(&[
                "ip",
                "addr",
                "add",
                &format!("192.0.2.{}/24", 10 + i),
                "dev",
                "upl0",
            ]);
            ns.exec_ok(&["ip", "link", "set", "upl0", "up"]);
            let socket = c.dir.path().join(format!("node{i}.sock"));
            c.nodes.push(Node {
                name: format!("node{i}"),
                ns,
                socket,
                agent: None,
            });
            c.start_agent(i);
        }
        c
    }

    pub fn start_agent(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", n.name))).unwrap();
        let child =
            n.ns.command(bin("trellis").to_str().unwrap())
                .args([
                    "--datastore",
                    &self.spec,
                    "agent",
                    "--node",
                    &n.name,
                    "--heartbeat",
                    "1",
                    "--block-grace",
                    "2",
                ])
                .arg("--socket")
                .arg(&n.socket)
                .args(&self.agent_args)
                .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start agent");
        n.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !n.socket.exists() || std::os::unix::net::UnixStream::connect(&n.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "agent {} did not start: {}",
                n.name,
                std::fs::read_to_string(self.dir.path().join(format!("{}.log", n.name)))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Node `i`'s whole agent log (since its last start).
    pub fn agent_log_all(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.nodes[i].name)))
            .unwrap_or_default()
    }

    /// Stops etcd (etcd clusters only), until [`Cluster::restart_etcd`].
    pub fn stop_etcd(&mut self) {
        self._etcd.as_mut().expect("an etcd cluster").stop();
    }

    /// Freezes etcd (SIGSTOP, connections left open: requests hang), until
    /// [`Cluster::resume_etcd`] (etcd clusters only).
    pub fn pause_etcd(&self) {
        self._etcd.as_ref().expect("an etcd cluster").pause();
    }

    /// Lets a paused etcd run again.
    pub fn resume_etcd(&self) {
        self._etcd.as_ref().expect("an etcd cluster").resume();
    }

    /// Kills etcd and starts it again on the same address and data (etcd clusters only).
    pub fn restart_etcd(&mut self) {
        self._etcd.as_mut().expect("an etcd cluster").restart();
    }

    /// The last lines of node `i`'s agent log.
    pub fn agent_log(&self, i: usize) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.nodes[i].name)))
                .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut c = match &self.control {
            Some(ctl) => ctl.command(bin("trellis").to_str().unwrap()),
            None => Command::new(bin("trellis")),
        };
        c.args(["--datastore", &self.spec])
            .args(args)
            .stderr(Stdio::piped());
        spawn_with_input(&mut c, stdin.unwrap_or(""))
            .wait_with_output()
            .unwrap()
    }

    pub fn cli_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "trellis {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts the IPAM plugin (trellis-cni under its trellis-ipam name) on node `i`.
    pub fn spawn_ipam(&self, i: usize, cmd: &str, cid: &str) -> Child {
        let link = self.dir.path().join("trellis-ipam");
        if !link.exists() {
            let _ = std::os::unix::fs::symlink(bin("trellis-cni"), &link);
        }
        self.spawn_plugin(&link, i, cmd, cid, self.nodes[i].ns.path(), None)
    }

    /// Runs `program` (the plugin under one of its names) inside node `i`'s namespace with the
    /// CNI environment a runtime gives, agent IPAM in the config.
    fn spawn_plugin(
        &self,
        program: &std::path::Path,
        i: usize,
        cmd: &str,
        cid: &str,
        netns: &std::path::Path,
        uid: Option<&str>,
    ) -> Child {
        let n = &self.nodes[i];
        let conf = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "trellis-cni",
            "ipam": {"type": "trellis-ipam", "agentSocket": n.socket}});
        let mut plugin = n.ns.command(program.to_str().unwrap());
        plugin
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", cid)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.dir.path())
            .env(
                "CNI_ARGS",
                format!(
                    "K8S_POD_NAMESPACE=default;K8S_POD_NAME={cid}{}",
                    uid.map(|u| format!(";K8S_POD_UID={u}")).unwrap_or_default()
                ),
            )
            .stderr(Stdio::null());
        spawn_with_input(&mut plugin, &conf.to_string())
    }

    /// Creates a pod on node `i` through the real plugin (routed mode, agent IPAM); returns its
    /// namespace and address.
    pub fn add_pod(&self, i: usize, name: &str) -> (TestNetns, std::net::IpAddr) {
        let pod = TestNetns::new(name);
        let child = self.spawn_plugin(&bin("trellis-cni"), i, "ADD", name, pod.path(), None);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "ADD {name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let ip = ip_of(&out).unwrap();
        (pod, ip)
    }

    /// Starts ADD for a pod whose namespace the caller made (servers may already listen
    /// there), stdout piped.
    pub fn spawn_add(&self, i: usize, name: &str, pod: &TestNetns) -> Child {
        self.spawn_plugin(&bin("trellis-cni"), i, "ADD", name, pod.path(), None)
    }

    /// [`Cluster::spawn_add`] for the pod with UID `uid` (CNI_ARGS `K8S_POD_UID`).
    pub fn spawn_add_uid(&self, i: usize, name: &str, pod: &TestNetns, uid: &str) -> Child {
        self.spawn_plugin(&bin("trellis-cni"), i, "ADD", name, pod.path(), Some(uid))
    }

    /// Block CIDR → affine node, from `trellis get ipamblocks -o json`.
    pub fn block_affinity(&self) -> Vec<(ipnet::IpNet, String)> {
        let v: Value =
            serde_json::from_str(&self.cli_ok(&["get", "ipamblocks", "-o", "json"], None)).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["spec"]["cidr"].as_str().unwrap().parse().unwrap(),
                    b["spec"]["affinity"]
                        .as_str()
                        .unwrap_or("")
                        .trim_start_matches("host:")
                        .to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_agent(i);
        }
    }
}

pub fn ip_of(out: &Output) -> Option<std::net::IpAddr> {
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["ips"][0]["address"]
        .as_str()?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// Brings a lab down when the test ends, however it ends.
pub struct LabGuard(pub String);

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = Command::new(bin("trellis"))
            .args(["lab", "down", &self.0])
            .output();
    }
}

/// `trellis lab check NAME`, repeated until it passes or `secs` have gone by. Routes converge
/// asynchronously after `lab up` (each BGP hop passes them on after its session comes up), so a
/// failure is only final at the deadline; the last answer is returned.
pub fn lab_check(lab: &str, secs: u64) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (ok, out) = trellis(&["lab", "check", lab]);
        if ok || Instant::now() >= deadline {
            return (ok, out);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn trellis(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("trellis")).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The port [`serve`] listens on and [`reach`] tries.
pub const PORT: &str = "8080";

/// A pod's server (the lab's, TCP [`PORT`]), bound before the pod has an address.
pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn serve(pod: &TestNetns, name: &str, dir: &std::path::Path) -> Server {
    let ready = dir.join(format!("{name}.ready"));
    let child = pod
        .command(bin("trellis").to_str().unwrap())
        .args(["lab", "serve", "--name", name, "--tcp", PORT, "--ready"])
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "{name}'s server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// One TCP try from `from` to `ip` (500 ms): the report line (`NAME\tok`, `NAME\tblocked`, ...).
pub fn reach(from: &TestNetns, ip: &str, name: &str) -> String {
    let out = from.exec_ok(&[
        bin("trellis").to_str().unwrap(),
        "lab",
        "connect",
        "--protocol",
        "tcp",
        "--port",
        PORT,
        "--timeout-ms",
        "500",
        &format!("{ip}={name}"),
    ]);
    out.trim().to_string()
}
