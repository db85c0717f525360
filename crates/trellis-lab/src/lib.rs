//! `trellis lab`: a cluster made of network namespaces on this machine. [`topology`] is the
//! pure model; the rest builds it (I/O): a fabric namespace with a bridge per subnet, a router
//! namespace joining subnets, one namespace per node running a real `trellis agent`, pods
//! created by the real `trellis-cni` with the environment a runtime gives, external hosts, and
//! optionally etcd in a control namespace. Everything made is recorded in a state file as it is
//! made, so `down` works after a crash or a half-built `up`.

pub mod daemons;
pub mod topology;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use topology::{addresses, host, Topology};

/// Where labs keep their state.
pub const LAB_ROOT: &str = "/run/trellis/lab";

/// What a lab made, recorded as it goes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub datastore: String,
    /// Member name → namespace name (nodes, pods, externals, fabric, router, control).
    pub namespaces: BTreeMap<String, String>,
    pub pids: Vec<i32>,
    pub node_ips: BTreeMap<String, String>,
    pub pod_ips: BTreeMap<String, String>,
    pub pod_nodes: BTreeMap<String, String>,
    pub external_ips: BTreeMap<String, String>,
    pub topology: Option<Topology>,
}

fn dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

impl State {
    fn save(&self) -> Result<(), String> {
        let d = dir(&self.name);
        std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        std::fs::write(
            d.join("state.json"),
            serde_json::to_vec_pretty(self).expect("state serialises"),
        )
        .map_err(|e| e.to_string())
    }

    pub fn load(name: &str) -> Result<State, String> {
        let p = dir(name).join("state.json");
        let bytes = std::fs::read(&p)
            .map_err(|e| format!("lab {name:?} is not up ({}: {e})", p.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", p.display()))
    }
}

/// The labs that are up.
pub fn labs() -> Vec<String> {
    std::fs::read_dir(LAB_ROOT)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join("state.json").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Resolves an omitted lab name when exactly one lab is up.
pub fn pick(name: Option<String>) -> Result<String, String> {
    match name {
        Some(n) => Ok(n),
        None => match labs().as_slice() {
            [one] => Ok(one.clone()),
            [] => Err("no lab is up (trellis lab up)".into()),
            many => Err(format!(
                "several labs are up ({}); name one",
                many.join(", ")
            )),
        },
    }
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, String> {
    run(Command::new("ip").args(args))
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/var/run/netns/{ns}")).args(args);
    c
}

fn ns_run(ns: &str, args: &[&str]) -> Result<String, String> {
    run(&mut in_ns(ns, args))
}

fn sibling(binary: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe.with_file_name(binary);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found next to {} (build the workspace)",
            p.display(),
            exe.display()
        ))
    }
}

struct Builder {
    state: State,
    t: Topology,
    progress: Box<dyn FnMut(&str)>,
}

impl Builder {
    fn ns(&mut self, member: &str) -> Result<String, String> {
        let name = format!("tl-{}-{member}", self.state.name);
        self.state
            .namespaces
            .insert(member.to_string(), name.clone());
        self.state.save()?;
        ip(&["netns", "add", &name])?;
        ns_run(&name, &["ip", "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Joins `ns` to subnet `subnet`'s bridge with `eth0`/`addr`.
    fn attach(
        &mut self,
        ns: &str,
        ifname: &str,
        subnet: usize,
        addr: &str,
        port: usize,
    ) -> Result<(), String> {
        let fab = self.state.namespaces["fabric"].clone();
        let peer = format!("p{port}");
        ip(&[
            "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", &peer, "netns",
            &fab,
        ])?;
        ns_run(
            &fab,
            &[
                "ip",
                "link",
                "set",
                &peer,
                "master",
                &format!("br{subnet}"),
                "up",
            ],
        )?;
        ns_run(ns, &["ip", "addr", "add", addr, "dev", ifname])?;
        ns_run(ns, &["ip", "link", "set", ifname, "up"])?;
        Ok(())
    }

    /// Creates a member's namespace and joins it to its subnet with its assigned address.
    fn member_on_subnet(
        &mut self,
        member: &str,
        subnet: &str,
        addrs: &BTreeMap<String, (ipnet::IpNet, std::net::IpAddr)>,
        port: usize,
    ) -> Result<(String, std::net::IpAddr), String> {
        let ns = self.ns(member)?;
        let (cidr, a) = addrs[member];
        let sub = self
            .t
            .subnets
            .iter()
            .position(|s| s.name == subnet)
            .expect("validated");
        self.attach(
            &ns,
            "eth0",
            sub,
            &format!("{a}/{}", cidr.prefix_len()),
            port,
        )?;
        Ok((ns, a))
    }

    fn cli(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let trellis = sibling("trellis")?;
        let mut c = match self.state.namespaces.get("control") {
            Some(ctl) => in_ns(ctl, &[trellis.to_str().unwrap()]),
            None => Command::new(&trellis),
        };
        c.args(["--datastore", &self.state.datastore])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| e.to_string())?;
        if let Some(s) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(s.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "trellis {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes a BGP daemon's configuration and starts it in `ns`.
    fn start_daemon(
        &mut self,
        member: &str,
        ns: &str,
        b: &topology::DaemonSpec,
        addrs: &Addrs,
    ) -> Result<(), String> {
        let d = dir(&self.state.name);
        let conf = daemon_config(&self.t, addrs, member, b);
        for (file, text) in daemons::files(&b.daemon, member, &conf) {
            let path = d.join(file);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::write(path, text).map_err(|e| e.to_string())?;
        }
        if b.daemon == "frr" {
            // FRR drops to its own user, which writes pid files and sockets there.
            let owner = format!("{0}:{0}", daemons::FRR_USER);
            let frr_dir = d.join(format!("{member}.frr"));
            run(Command::new("chown").args(["-R", &owner]).arg(&frr_dir))?;
        }
        let log = std::fs::File::create(d.join(format!("{member}.{}.log", b.daemon)))
            .map_err(|e| e.to_string())?;
        for argv in daemons::commands(&b.daemon, member, &d) {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let child = in_ns(ns, &argv)
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log.try_clone().map_err(|e| e.to_string())?)
                .process_group(0)
                .spawn()
                .map_err(|err| format!("{}: {err} (install bird2 / gobgpd / frr)", b.daemon))?;
            self.state.pids.push(child.id() as i32);
            self.state.save()?;
        }
        (self.progress)(&format!(
            "  {member} runs {} (AS {})",
            b.daemon, b.as_number
        ));
        if b.daemon == "gobgp" {
            let sync = in_ns(ns, &["python3", "-c", daemons::GOBGP_FIB_SYNC])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .map_err(|e| format!("gobgpd's FIB sync: {e}"))?;
            self.state.pids.push(sync.id() as i32);
            self.state.save()?;
        }
        Ok(())
    }

    fn build(&mut self) -> Result<(), String> {
        let t = self.t.clone();
        let addrs = addresses(&t);
        let name = self.state.name.clone();
        let d = dir(&name);
        (self.progress)(&format!(
            "lab {name}: {} subnet(s), {} node(s), {} pod(s)",
            t.subnets.len(),
            t.nodes.len(),
            t.pods.len()
        ));
        let fab = self.ns("fabric")?;
        for (i, s) in t.subnets.iter().enumerate() {
            // Fixed MACs: a bridge that took its ports' MACs would change address as ports join.
            ns_run(
                &fab,
                &[
                    "ip",
                    "link",
                    "add",
                    &format!("br{i}"),
                    "address",
                    &format!("02:00:00:00:{:02x}:01", i),
                    "type",
                    "bridge",
                ],
            )?;
            ns_run(&fab, &["ip", "link", "set", &format!("br{i}"), "up"])?;
            let _ = s;
        }
        let mut port = 0;
        if t.subnets.len() > 1 {
            let rtr = self.ns("router")?;
            for (i, s) in t.subnets.iter().enumerate() {
                port += 1;
                let a = format!("{}/{}", host(&s.cidr, 1), s.cidr.prefix_len());
                self.attach(&rtr, &format!("eth{i}"), i, &a, port)?;
            }
            ns_run(&rtr, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            (self.progress)("  router joins the subnets");
            if let Some(b) = t.router.as_ref().and_then(|r| r.bgp.as_ref()) {
                self.start_daemon("router", &rtr, b, &addrs)?;
            }
        }
        let gw = |sub: &str| -> Option<String> {
            (t.subnets.len() > 1).then(|| {
                host(&t.subnets.iter().find(|s| s.name == sub).unwrap().cidr, 1).to_string()
            })
        };
        if t.datastore == "etcd" {
            let ctl = self.ns("control")?;
            let s0 = &t.subnets[0];
            port += 1;
            let addr = host(&s0.cidr, 2);
            self.attach(
                &ctl,
                "eth0",
                0,
                &format!("{addr}/{}", s0.cidr.prefix_len()),
                port,
            )?;
            if let Some(g) = gw(&s0.name) {
                ns_run(&ctl, &["ip", "route", "add", "default", "via", &g])?;
            }
            let data = d.join("etcd");
            let ep = format!("http://{addr}:2379");
            let peer = format!("http://{addr}:2380");
            let log = std::fs::File::create(d.join("etcd.log")).map_err(|e| e.to_string())?;
            let child = in_ns(
                &ctl,
                &[
                    "etcd",
                    "--name",
                    "lab",
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--listen-client-urls",
                    &ep,
                    "--advertise-client-urls",
                    &ep,
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                    "--initial-cluster",
                    &format!("lab={peer}"),
                ],
            )
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("etcd: {e} (install etcd-server)"))?;
            self.state.pids.push(child.id() as i32);
            self.state.datastore = format!("etcd:{ep}");
            self.state.save()?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while ns_run(&ctl, &["etcdctl", "--endpoints", &ep, "endpoint", "health"]).is_err() {
                if Instant::now() > deadline {
                    return Err("etcd did not become healthy".into());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (self.progress)(&format!("  etcd at {ep} in the control namespace"));
        } else {
            self.state.datastore = format!("sqlite:{}", d.join("trellis.db").display());
            self.state.save()?;
        }
        let pools: Vec<String> = t
            .pools
            .iter()
            .map(|p| {
                let mut y = format!("apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: {}\nspec:\n  cidr: {}\n  encapsulation: {}\n  natOutgoing: {}\n", p.name, p.cidr, p.encapsulation, p.nat_outgoing);
                if let Some(b) = p.block_size {
                    y += &format!("  blockSize: {b}\n");
                }
                if let Some(s) = &p.node_selector {
                    y += &format!("  nodeSelector: {s:?}\n");
                }
                y
            })
            .collect();
        self.cli(&["apply", "-f", "-"], Some(&pools.join("---\n")))?;
        let bgp = bgp_resources(&t, &addrs);
        if !bgp.is_empty() {
            self.cli(&["apply", "-f", "-"], Some(&bgp))?;
        }
        let trellis = sibling("trellis")?;
        for (i, n) in t.nodes.iter().enumerate() {
            port += 1;
            let (ns, a) = self.member_on_subnet(&n.name, &n.subnet, &addrs, port)?;
            if let Some(g) = gw(&n.subnet) {
                ns_run(&ns, &["ip", "route", "add", "default", "via", &g])?;
            }
            let sock = d.join(format!("{}.sock", n.name));
            let mut args = vec![
                trellis.to_str().unwrap().to_string(),
                "--datastore".into(),
                self.state.datastore.clone(),
                "agent".into(),
                "--node".into(),
                n.name.clone(),
                "--socket".into(),
                sock.to_str().unwrap().into(),
                "--heartbeat".into(),
                "5".into(),
                "--resync".into(),
                "2".into(),
                "--metrics-listen".into(),
                format!("{a}:9091"),
            ];
            for (k, v) in &n.labels {
                args.push("--label".into());
                args.push(format!("{k}={v}"));
            }
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let log = std::fs::File::create(d.join(format!("{}.log", n.name)))
                .map_err(|e| e.to_string())?;
            let child = in_ns(&ns, &argv)
                .stdout(Stdio::null())
                .stderr(log)
                .process_group(0)
                .spawn()
                .map_err(|e| e.to_string())?;
            self.state.pids.push(child.id() as i32);
            self.state.node_ips.insert(n.name.clone(), a.to_string());
            self.state.save()?;
            let _ = i;
        }
        for n in &t.nodes {
            let sock = d.join(format!("{}.sock", n.name));
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::os::unix::net::UnixStream::connect(&sock).is_err() {
                if Instant::now() > deadline {
                    return Err(format!(
                        "agent on {} did not start; see {}",
                        n.name,
                        d.join(format!("{}.log", n.name)).display()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        (self.progress)(&format!(
            "  {} agent(s) up on {}",
            t.nodes.len(),
            self.state.datastore
        ));
        for e in &t.external {
            port += 1;
            let (ns, a) = self.member_on_subnet(&e.name, &e.subnet, &addrs, port)?;
            if let Some(g) = gw(&e.subnet) {
                ns_run(&ns, &["ip", "route", "add", "default", "via", &g])?;
            }
            // Pod addresses are reachable through `via`, else the first node of the subnet
            // (a BGP daemon learns them instead).
            let via = e
                .via
                .clone()
                .or_else(|| {
                    t.nodes
                        .iter()
                        .find(|n| n.subnet == e.subnet)
                        .map(|n| n.name.clone())
                })
                .filter(|_| e.bgp.is_none());
            if let Some(v) = via {
                for p in &t.pools {
                    ns_run(
                        &ns,
                        &[
                            "ip",
                            "route",
                            "replace",
                            &p.cidr.to_string(),
                            "via",
                            &addrs[&v].1.to_string(),
                        ],
                    )?;
                }
            }
            if let Some(b) = &e.bgp {
                ns_run(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
                self.start_daemon(&e.name, &ns, b, &addrs)?;
            }
            self.state
                .external_ips
                .insert(e.name.clone(), a.to_string());
            self.state.save()?;
        }
        let cni = sibling("trellis-cni")?;
        let link = d.join("trellis-cni");
        let _ = std::os::unix::fs::symlink(&cni, &link);
        for p in &t.pods {
            let ns = self.ns(&p.name)?;
            let node_ns = self.state.namespaces[&p.node].clone();
            let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "trellis-cni",
                "ipam": {"type": "trellis-ipam", "agentSocket": d.join(format!("{}.sock", p.node))}});
            let mut child = in_ns(&node_ns, &[cni.to_str().unwrap()])
                .env("CNI_COMMAND", "ADD")
                .env("CNI_CONTAINERID", format!("{name}-{}", p.name))
                .env("CNI_NETNS", format!("/var/run/netns/{ns}"))
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", &d)
                .env(
                    "CNI_ARGS",
                    format!(
                        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                        p.namespace, p.name
                    ),
                )
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| e.to_string())?;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(conf.to_string().as_bytes())
                .map_err(|e| e.to_string())?;
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| format!("pod {}: {e}", p.name))?;
            let addr = v["ips"][0]["address"]
                .as_str()
                .ok_or_else(|| format!("pod {}: {v}", p.name))?
                .split('/')
                .next()
                .unwrap()
                .to_string();
            (self.progress)(&format!("  pod {:<12} on {:<8} {addr}", p.name, p.node));
            self.state.pod_ips.insert(p.name.clone(), addr);
            self.state.pod_nodes.insert(p.name.clone(), p.node.clone());
            self.state.save()?;
        }
        Ok(())
    }
}

/// The AS a node uses: its own, the lab's, or Calico's default.
fn node_asn(t: &Topology, node: &str) -> u32 {
    t.nodes
        .iter()
        .find(|n| n.name == node)
        .and_then(|n| n.as_number)
        .or(t.bgp.as_ref().and_then(|b| b.as_number))
        .unwrap_or(64512)
}

type Addrs = BTreeMap<String, (ipnet::IpNet, std::net::IpAddr)>;

/// BGPConfiguration, per-node AS / reflector settings, a BGPPeer per daemon–node session, and
/// the topology's own resources.
fn bgp_resources(t: &Topology, addrs: &Addrs) -> String {
    let mut docs = Vec::new();
    if let Some(b) = &t.bgp {
        let asn = b
            .as_number
            .map(|a| format!("  asNumber: {a}\n"))
            .unwrap_or_default();
        docs.push(format!("apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec:\n{asn}  nodeToNodeMeshEnabled: {}\n", b.node_to_node_mesh));
    }
    for n in &t.nodes {
        if n.as_number.is_none() && n.route_reflector_cluster_id.is_none() {
            continue;
        }
        let mut y = format!(
            "apiVersion: trellis.dev/v1\nkind: Node\nmetadata:\n  name: {}\n",
            n.name
        );
        if !n.labels.is_empty() {
            y += "  labels:\n";
            for (k, v) in &n.labels {
                y += &format!("    {k}: {v:?}\n");
            }
        }
        y += "spec:\n  bgp:\n";
        if let Some(a) = n.as_number {
            y += &format!("    asNumber: {a}\n");
        }
        if let Some(c) = &n.route_reflector_cluster_id {
            y += &format!("    routeReflectorClusterID: {c}\n");
        }
        docs.push(y);
    }
    let speakers = t
        .external
        .iter()
        .filter_map(|e| e.bgp.as_ref().map(|b| (e.name.as_str(), b)))
        .chain(
            t.router
                .as_ref()
                .and_then(|r| r.bgp.as_ref())
                .map(|b| ("router", b)),
        );
    for (name, b) in speakers {
        let conf = daemon_config(t, addrs, name, b);
        for p in conf
            .peers
            .iter()
            .filter(|p| t.nodes.iter().any(|n| n.name == p.name))
        {
            docs.push(format!(
                "apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata:\n  name: lab-{name}-{}\nspec:\n  node: {}\n  peerIP: {}\n  asNumber: {}\n{}",
                p.name,
                p.name,
                p.local,
                b.as_number,
                b.password.as_ref().map(|pw| format!("  password: {pw:?}\n")).unwrap_or_default()
                    + &b.ttl_security.map(|h| format!("  ttlSecurity: {h}\n")).unwrap_or_default()
            ));
        }
    }
    if let Some(r) = &t.resources {
        docs.push(r.clone());
    }
    docs.join("---\n")
}

/// The subnets a member is on: the router is on all of them (as .1).
fn member_nets(t: &Topology, addrs: &Addrs, member: &str) -> Vec<(ipnet::IpNet, std::net::IpAddr)> {
    if member == "router" {
        t.subnets
            .iter()
            .map(|s| (s.cidr, host(&s.cidr, 1)))
            .collect()
    } else {
        vec![addrs[member]]
    }
}

/// What a BGP daemon on `name` (an external or the router) peers with, and from which address.
fn daemon_config(
    t: &Topology,
    addrs: &Addrs,
    name: &str,
    b: &topology::DaemonSpec,
) -> daemons::DaemonConfig {
    let mine = member_nets(t, addrs, name);
    let speaker_asn = |p: &str| {
        t.external
            .iter()
            .find(|e| e.name == p)
            .and_then(|e| e.bgp.as_ref())
            .or(t
                .router
                .as_ref()
                .and_then(|r| r.bgp.as_ref())
                .filter(|_| p == "router"))
            .map(|d| d.as_number)
    };
    let peers = b
        .peers
        .iter()
        .map(|p| {
            let theirs = member_nets(t, addrs, p);
            // A shared subnet if there is one (direct session), else first addresses (multihop).
            let shared = mine.iter().find_map(|(net, local)| {
                theirs
                    .iter()
                    .find(|(_, a)| net.contains(a))
                    .map(|(_, a)| (*local, *a))
            });
            let (local, address) = shared.unwrap_or((mine[0].1, theirs[0].1));
            daemons::DaemonPeer {
                name: p.clone(),
                address,
                local,
                asn: speaker_asn(p).unwrap_or_else(|| node_asn(t, p)),
                multihop: shared.is_none(),
            }
        })
        .collect();
    daemons::DaemonConfig {
        address: mine[0].1,
        asn: b.as_number,
        route_reflector: b.route_reflector,
        route_server: b.route_server,
        password: b.password.clone(),
        ttl_security: b.ttl_security,
        peers,
    }
}

/// Builds the lab. On failure the partial lab stays recorded for `down`.
pub fn up(t: Topology, progress: impl FnMut(&str) + 'static) -> Result<State, String> {
    if dir(&t.name).join("state.json").exists() {
        return Err(format!(
            "lab {} is already up (trellis lab down {})",
            t.name, t.name
        ));
    }
    let state = State {
        name: t.name.clone(),
        datastore: String::new(),
        topology: Some(t.clone()),
        ..Default::default()
    };
    let mut b = Builder {
        state,
        t,
        progress: Box::new(progress),
    };
    b.state.save()?;
    b.build().map_err(|e| {
        format!(
            "{e}\n(the partial lab stays until `trellis lab down {}`)",
            b.state.name
        )
    })?;
    Ok(b.state)
}

/// Removes everything the lab made; works on half-built labs and without a state file.
pub fn down(name: &str) -> Result<Vec<String>, String> {
    let mut removed = Vec::new();
    let state = State::load(name).ok();
    if let Some(s) = &state {
        for pid in &s.pids {
            kill(*pid);
            for scratch in daemons::frr_scratch_dirs(*pid) {
                let _ = std::fs::remove_dir_all(scratch); // absent unless it was FRR's
            }
        }
    }
    let prefix = format!("tl-{name}-");
    let listed = ip(&["netns", "list"]).unwrap_or_default();
    let mut all: Vec<String> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    if let Some(s) = &state {
        all.extend(s.namespaces.values().cloned());
    }
    all.sort();
    all.dedup();
    for ns in all {
        if let Ok(pids) = ip(&["netns", "pids", &ns]) {
            for p in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                kill(p);
            }
        }
        if ip(&["netns", "del", &ns]).is_ok() {
            removed.push(ns);
        }
    }
    let _ = std::fs::remove_dir_all(dir(name));
    Ok(removed)
}

fn kill(pid: i32) {
    // SAFETY: plain kill(2); a stale pid at worst gets ESRCH.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Runs a command in a member's namespace.
pub fn exec_cmd(state: &State, member: &str, argv: &[String]) -> Result<Command, String> {
    let ns = state
        .namespaces
        .get(member)
        .ok_or_else(|| format!("lab {} has no member {member:?}", state.name))?;
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/var/run/netns/{ns}")).args(argv);
    Ok(c)
}

/// One cell of the check matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub from: String,
    pub to: String,
    pub want: bool,
    pub got: bool,
    pub note: String,
}

/// Pings with a bounded retry: right after `up` the agents may still be programming routes
/// (they converge within a resync period), so a miss is retried for up to ~6 s.
fn pings(ns: &str, dst: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        if ns_run(ns, &["ping", "-c1", "-W1", dst]).is_ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn seen_source(state: &State, from: &str, to: &str) -> Option<String> {
    let ext_ns = &state.namespaces[to];
    let dst = &state.external_ips[to];
    let server = "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',7070));s.listen(1);s.settimeout(6);c,a=s.accept();print(a[0])";
    let listener = in_ns(ext_ns, &["python3", "-c", server])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let client =
        format!("import socket;socket.create_connection(('{dst}',7070),timeout=4).close()");
    let _ = ns_run(&state.namespaces[from], &["python3", "-c", &client]);
    let out = listener.wait_with_output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
}

/// Checks every expectation (default: every pod reaches every other pod).
pub fn check(state: &State) -> Vec<Outcome> {
    let t = state.topology.clone().unwrap_or_else(topology::demo);
    let expect: Vec<topology::Expectation> = if t.expect.is_empty() {
        let pods: Vec<&String> = state.pod_ips.keys().collect();
        pods.iter()
            .flat_map(|a| {
                pods.iter()
                    .filter(move |b| a != *b)
                    .map(move |b| topology::Expectation {
                        from: (*a).clone(),
                        to: (*b).clone(),
                        reach: true,
                        seen_as: None,
                    })
            })
            .collect()
    } else {
        t.expect.clone()
    };
    expect
        .iter()
        .map(|x| {
            let from_ns = state.namespaces.get(&x.from).cloned().unwrap_or_default();
            if let Some(ip) = state.pod_ips.get(&x.to) {
                let got = pings(&from_ns, ip);
                Outcome {
                    from: x.from.clone(),
                    to: x.to.clone(),
                    want: x.reach,
                    got,
                    note: String::new(),
                }
            } else {
                let seen = seen_source(state, &x.from, &x.to);
                let node_ip = state
                    .pod_nodes
                    .get(&x.from)
                    .and_then(|n| state.node_ips.get(n))
                    .cloned();
                let pod_ip = state.pod_ips.get(&x.from).cloned();
                let got = seen.is_some();
                let (ok_source, note) = match (&x.seen_as, &seen) {
                    (Some(w), Some(s)) => {
                        let want_ip = if w == "node" { &node_ip } else { &pod_ip };
                        (
                            want_ip.as_deref() == Some(s.as_str()),
                            format!("seen as {s} (want {w})"),
                        )
                    }
                    (_, Some(s)) => (true, format!("seen as {s}")),
                    _ => (true, String::new()),
                };
                Outcome {
                    from: x.from.clone(),
                    to: x.to.clone(),
                    want: x.reach,
                    got: got && ok_source,
                    note,
                }
            }
        })
        .collect()
}
