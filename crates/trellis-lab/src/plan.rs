//! The build plan: a validated topology (and what already exists under the lab's name) in, the
//! ordered list of plain-data steps that build it out — namespaces, bridges, veths with their
//! addresses, routes, files, processes, the resources to apply, pods through CNI, what the lab
//! writes on their WorkloadEndpoints, their servers, and the policies. On the Kubernetes path
//! ([`crate::topology::LabKubernetes`]) the kube-controller runs beside the agents, and the
//! namespaces, nodes, pods and Kubernetes-kind documents become API objects ([`kubernetes`])
//! instead. Pure; the steps are golden-tested, and [`crate::apply`] carries them out.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use trellis_resources::Resource;

use crate::daemons;
use crate::resources::daemon_config;
use crate::state::lab_dir;
use crate::topology::{host, DaemonSpec, LabPod, LabPort, PortProtocol, CONTROL_HOST, ROUTER_HOST};
use crate::validate::Lab;
use crate::LabError;

/// What a namespace is for (the state file keeps node and external addresses apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    Fabric,
    Router,
    Control,
    Node,
    External,
    Pod,
}

/// One step of a build. `trellis` as a program is the binary next to the running one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Step {
    /// A network namespace for `member`, with `lo` up.
    Namespace {
        member: String,
        role: Role,
        ns: String,
    },
    /// A bridge for a subnet in the fabric namespace. Fixed MAC: a bridge that took its ports'
    /// MACs would change address as ports join.
    Bridge {
        subnet: String,
        ns: String,
        bridge: String,
        mac: String,
    },
    /// A veth from `member`'s namespace (`ifname`, up, with `address`) to `port` on `bridge`
    /// in the fabric namespace.
    Link {
        member: String,
        role: Role,
        ns: String,
        ifname: String,
        address: String,
        fabric: String,
        port: String,
        bridge: String,
    },
    /// A route in `member`'s namespace.
    Route {
        member: String,
        ns: String,
        to: String,
        via: String,
    },
    /// IPv4 forwarding on in `member`'s namespace.
    Forward { member: String, ns: String },
    /// A file in the lab directory (a daemon's configuration).
    File {
        member: String,
        path: String,
        text: String,
    },
    /// A directory in the lab directory handed (recursively) to a daemon's `user`.
    Own {
        member: String,
        path: String,
        user: String,
    },
    /// A long-running process in `member`'s namespace (`None`: on the host), stderr (and
    /// stdout) to `log`.
    Spawn {
        member: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        ns: Option<String>,
        what: String,
        argv: Vec<String>,
        log: Option<String>,
    },
    /// Waits until etcd answers on `endpoint`.
    WaitEtcd {
        member: String,
        ns: String,
        endpoint: String,
    },
    /// The datastore the agents and the lab's CLI calls use.
    Datastore { spec: String },
    /// `trellis apply` of these YAML documents (run from the control namespace with etcd).
    Apply { yaml: String },
    /// Waits until a node's agent answers on its socket.
    WaitAgent {
        member: String,
        socket: String,
        log: String,
    },
    /// The CNI plugin under its own name in the lab directory (the pods' `CNI_PATH`).
    Plugin { link: String },
    /// CNI ADD for a pod, run in its node's namespace as a runtime would (`namespace` and
    /// `pod` go to K8S_POD_NAMESPACE and K8S_POD_NAME).
    Pod {
        member: String,
        node: String,
        node_ns: String,
        ns: String,
        namespace: String,
        pod: String,
        container_id: String,
        socket: String,
        cni_path: String,
    },
    /// Writes what a runtime does not pass onto the pod's WorkloadEndpoint (after ADD): its
    /// labels, named ports and service account.
    Endpoint {
        member: String,
        namespace: String,
        container_id: String,
        labels: BTreeMap<String, String>,
        ports: Vec<LabPort>,
        service_account: Option<String>,
    },
    /// Waits until a pod's server has bound its ports (it writes `ready` then).
    WaitServer {
        member: String,
        ready: String,
        log: String,
    },
    /// `trellis apply` of the policy documents, once every pod serves.
    Policies { yaml: String },
    /// Creates (or replaces) these objects in the Kubernetes API, in order.
    Kube {
        member: String,
        kubeconfig: String,
        objects: Vec<Value>,
    },
}

impl Step {
    /// The topology member the step is for (`lab` for lab-wide steps).
    pub fn member(&self) -> &str {
        match self {
            Step::Namespace { member, .. }
            | Step::Link { member, .. }
            | Step::Route { member, .. }
            | Step::Forward { member, .. }
            | Step::File { member, .. }
            | Step::Own { member, .. }
            | Step::Spawn { member, .. }
            | Step::WaitEtcd { member, .. }
            | Step::WaitAgent { member, .. }
            | Step::Pod { member, .. }
            | Step::Endpoint { member, .. }
            | Step::WaitServer { member, .. }
            | Step::Kube { member, .. } => member,
            Step::Bridge { .. } => "fabric",
            Step::Datastore { .. }
            | Step::Apply { .. }
            | Step::Plugin { .. }
            | Step::Policies { .. } => "lab",
        }
    }

    /// What the step does, in words (for errors and progress).
    pub fn describe(&self) -> String {
        match self {
            Step::Namespace { ns, .. } => format!("create namespace {ns}"),
            Step::Bridge { subnet, bridge, .. } => {
                format!("create bridge {bridge} for subnet {subnet}")
            }
            Step::Link {
                ifname,
                address,
                bridge,
                ..
            } => format!("join {bridge} as {ifname} {address}"),
            Step::Route { to, via, .. } => format!("route {to} via {via}"),
            Step::Forward { .. } => "turn IPv4 forwarding on".into(),
            Step::File { path, .. } => format!("write {path}"),
            Step::Own { path, user, .. } => format!("hand {path} to user {user}"),
            Step::Spawn { what, .. } => format!("start {what}"),
            Step::WaitEtcd { endpoint, .. } => format!("wait for etcd at {endpoint}"),
            Step::Datastore { spec } => format!("use datastore {spec}"),
            Step::Apply { .. } => "apply the pools and resources".into(),
            Step::WaitAgent { .. } => "wait for the agent".into(),
            Step::Plugin { link } => format!("link the CNI plugin as {link}"),
            Step::Pod { node, .. } => format!("add the pod on {node} through CNI"),
            Step::Endpoint { .. } => {
                "write labels, ports and service account on its endpoint".into()
            }
            Step::WaitServer { .. } => "wait for its server".into(),
            Step::Policies { .. } => "apply the policies".into(),
            Step::Kube { objects, .. } => {
                let names: Vec<String> = objects
                    .iter()
                    .map(|o| {
                        crate::kube::KubeRef::of(o)
                            .map(|r| r.to_string())
                            .unwrap_or_default()
                    })
                    .collect();
                format!("write {} to the Kubernetes API", names.join(", "))
            }
        }
    }
}

/// What exists already under the lab's name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Namespaces named `tl-LAB-...`.
    pub namespaces: Vec<String>,
    /// Labs with a state file.
    pub labs: Vec<String>,
}

/// Namespace of a lab member.
pub fn ns_name(lab: &str, member: &str) -> String {
    format!("tl-{lab}-{member}")
}

/// The container ID a lab pod is added with.
pub fn container_id(lab: &str, member: &str) -> String {
    format!("{lab}-{member}")
}

/// Whether lab `a`'s namespace prefix (`tl-a-`) also matches lab `b`'s namespaces.
pub fn shadows(a: &str, b: &str) -> bool {
    a != b && b.starts_with(&format!("{a}-"))
}

/// Refuses to build over anything of the lab's name: its state, its namespaces, or a lab whose
/// namespaces share its prefix (`down` of one would take the other's).
fn preflight(name: &str, observed: &Observed) -> Result<(), LabError> {
    let exists = |what: String, owner: &str| LabError::Exists {
        lab: name.to_string(),
        what,
        owner: owner.to_string(),
    };
    if observed.labs.iter().any(|l| l == name) {
        return Err(exists(format!("lab {name}"), name));
    }
    if let Some(other) = observed
        .labs
        .iter()
        .find(|l| shadows(name, l) || shadows(l, name))
    {
        return Err(exists(
            format!("lab {other}, whose namespace names overlap with this lab's"),
            other,
        ));
    }
    if let Some(ns) = observed.namespaces.first() {
        return Err(exists(format!("namespace {ns}"), name));
    }
    Ok(())
}

/// Builds the steps for a lab; refuses when something of its name exists.
pub fn plan(lab: &Lab, observed: &Observed) -> Result<Vec<Step>, LabError> {
    preflight(&lab.topology().name, observed)?;
    let mut p = Planner {
        lab,
        dir: lab_dir(&lab.topology().name).display().to_string(),
        steps: Vec::new(),
        ports: 0,
    };
    p.fabric();
    p.router();
    p.datastore();
    let (kube, resources) = p.split(lab.resources());
    p.steps.push(Step::Apply {
        yaml: trellis_resources::to_yaml(&resources),
    });
    p.kube_controller(kube);
    p.nodes();
    p.externals();
    p.pods();
    let (kube, policies) = p.split(lab.policies());
    if !kube.is_empty() {
        p.kube("lab", kube);
    }
    if !policies.is_empty() {
        p.steps.push(Step::Policies {
            yaml: trellis_resources::to_yaml(&policies),
        });
    }
    Ok(p.steps)
}

pub mod kubernetes;

struct Planner<'a> {
    lab: &'a Lab,
    dir: String,
    steps: Vec<Step>,
    /// Fabric ports handed out (`p1`, `p2`, ...).
    ports: usize,
}

impl Planner<'_> {
    fn kubeconfig(&self) -> Option<&str> {
        let k = self.lab.topology().kubernetes.as_ref()?;
        Some(&k.kubeconfig)
    }

    /// Documents for the API server (on the Kubernetes path: the Kubernetes kinds), and the
    /// rest, for `trellis apply`.
    fn split(&self, docs: &[Resource]) -> (Vec<Value>, Vec<Resource>) {
        let k8s = self.kubeconfig().is_some();
        let (kube, rest): (Vec<&Resource>, Vec<&Resource>) = docs
            .iter()
            .partition(|r| k8s && kubernetes::kubernetes_kind(r.kind()));
        (
            kube.into_iter().map(kubernetes::object).collect(),
            rest.into_iter().cloned().collect(),
        )
    }

    fn kube(&mut self, member: &str, objects: Vec<Value>) {
        let kubeconfig = self
            .kubeconfig()
            .expect("on the Kubernetes path")
            .to_string();
        self.steps.push(Step::Kube {
            member: member.into(),
            kubeconfig,
            objects,
        });
    }

    /// On the Kubernetes path: the cluster's objects and `documents` (the Kubernetes kinds of
    /// the lab's resources) written to the API server, and the kube-controller started on the
    /// host (where the API server is reachable), with a Lease of the lab's own.
    fn kube_controller(&mut self, documents: Vec<Value>) {
        let Some(kubeconfig) = self.kubeconfig().map(str::to_string) else {
            return;
        };
        let t = self.lab.topology();
        let mut objects = kubernetes::cluster_objects(t);
        objects.extend(documents);
        self.kube("lab", objects);
        let argv = [
            "trellis",
            "--datastore",
            &self.datastore_spec(),
            "kube-controller",
            "--kubeconfig",
            &kubeconfig,
            "--lease-name",
            &format!("trellis-lab-{}", t.name),
            "--identity",
            &format!("lab-{}", t.name),
        ];
        self.steps.push(Step::Spawn {
            member: "kube-controller".into(),
            ns: None,
            what: "kube-controller".into(),
            argv: argv.iter().map(|a| a.to_string()).collect(),
            log: Some(self.path("kube-controller.log")),
        });
    }

    fn ns(&self, member: &str) -> String {
        ns_name(&self.lab.topology().name, member)
    }

    fn path(&self, file: &str) -> String {
        Path::new(&self.dir).join(file).display().to_string()
    }

    fn namespace(&mut self, member: &str, role: Role) -> String {
        let ns = self.ns(member);
        self.steps.push(Step::Namespace {
            member: member.into(),
            role,
            ns: ns.clone(),
        });
        ns
    }

    /// Joins `member` to subnet `subnet` (an index) as `ifname` with address `a`.
    fn link(&mut self, member: &str, role: Role, ifname: &str, subnet: usize, a: IpAddr) {
        let cidr = self.lab.topology().subnets[subnet].cidr;
        self.ports += 1;
        self.steps.push(Step::Link {
            member: member.into(),
            role,
            ns: self.ns(member),
            ifname: ifname.into(),
            address: format!("{a}/{}", cidr.prefix_len()),
            fabric: self.ns("fabric"),
            port: format!("p{}", self.ports),
            bridge: format!("br{subnet}"),
        });
    }

    /// With several subnets, members reach the others through the router (.1).
    fn default_route(&mut self, member: &str, subnet: usize) {
        let t = self.lab.topology();
        if t.subnets.len() > 1 {
            self.steps.push(Step::Route {
                member: member.into(),
                ns: self.ns(member),
                to: "default".into(),
                via: host(&t.subnets[subnet].cidr, ROUTER_HOST).to_string(),
            });
        }
    }

    fn subnet_of(&self, name: &str) -> usize {
        self.lab
            .topology()
            .subnets
            .iter()
            .position(|s| s.name == name)
            .expect("validated")
    }

    fn fabric(&mut self) {
        let ns = self.namespace("fabric", Role::Fabric);
        for (i, s) in self.lab.topology().subnets.iter().enumerate() {
            self.steps.push(Step::Bridge {
                subnet: s.name.clone(),
                ns: ns.clone(),
                bridge: format!("br{i}"),
                mac: format!("02:00:00:00:{i:02x}:01"),
            });
        }
    }

    fn router(&mut self) {
        let t = self.lab.topology();
        if t.subnets.len() < 2 {
            return;
        }
        let ns = self.namespace("router", Role::Router);
        for i in 0..t.subnets.len() {
            let a = host(&t.subnets[i].cidr, ROUTER_HOST);
            self.link("router", Role::Router, &format!("eth{i}"), i, a);
        }
        self.steps.push(Step::Forward {
            member: "router".into(),
            ns,
        });
        if let Some(b) = t.router.as_ref().and_then(|r| r.bgp.as_ref()) {
            self.daemon("router", b);
        }
    }

    fn datastore(&mut self) {
        let t = self.lab.topology();
        if t.datastore != "etcd" {
            let spec = format!("sqlite:{}", self.path("trellis.db"));
            self.steps.push(Step::Datastore { spec });
            return;
        }
        let ns = self.namespace("control", Role::Control);
        let addr = host(&t.subnets[0].cidr, CONTROL_HOST);
        self.link("control", Role::Control, "eth0", 0, addr);
        self.default_route("control", 0);
        let endpoint = format!("http://{addr}:2379");
        let peer = format!("http://{addr}:2380");
        let argv = [
            "etcd",
            "--name",
            "lab",
            "--data-dir",
            &self.path("etcd"),
            "--listen-client-urls",
            &endpoint,
            "--advertise-client-urls",
            &endpoint,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("lab={peer}"),
            // Bounded history, as the README asks of any etcd Trellis uses (agents relist when
            // a watch falls behind the compaction).
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "5m",
        ];
        self.steps.push(Step::Spawn {
            member: "control".into(),
            ns: Some(ns.clone()),
            what: "etcd".into(),
            argv: argv.iter().map(|a| a.to_string()).collect(),
            log: Some(self.path("etcd.log")),
        });
        self.steps.push(Step::WaitEtcd {
            member: "control".into(),
            ns,
            endpoint: endpoint.clone(),
        });
        self.steps.push(Step::Datastore {
            spec: format!("etcd:{endpoint}"),
        });
    }

    fn datastore_spec(&self) -> String {
        self.steps
            .iter()
            .find_map(|s| match s {
                Step::Datastore { spec } => Some(spec.clone()),
                _ => None,
            })
            .expect("planned before the nodes")
    }

    fn nodes(&mut self) {
        let t = self.lab.topology();
        let datastore = self.datastore_spec();
        for n in &t.nodes {
            let ns = self.namespace(&n.name, Role::Node);
            let sub = self.subnet_of(&n.subnet);
            let a = self.lab.addresses()[&n.name].1;
            self.link(&n.name, Role::Node, "eth0", sub, a);
            self.default_route(&n.name, sub);
            let mut argv = vec![
                "trellis".to_string(),
                "--datastore".into(),
                datastore.clone(),
                "agent".into(),
                "--node".into(),
                n.name.clone(),
                "--socket".into(),
                self.path(&format!("{}.sock", n.name)),
                "--heartbeat".into(),
                "5".into(),
                "--resync".into(),
                "2".into(),
                "--metrics-listen".into(),
                format!("{a}:9091"),
            ];
            for (k, v) in &n.labels {
                argv.push("--label".into());
                argv.push(format!("{k}={v}"));
            }
            if t.flow_logs {
                argv.push("--flow-logs".into());
            }
            if self.kubeconfig().is_some() {
                // An ADD naming a pod waits for the pod's record (its labels) from the
                // kube-controller: no pod starts unlabelled, outside its policies.
                argv.push("--kubernetes".into());
            }
            self.steps.push(Step::Spawn {
                member: n.name.clone(),
                ns: Some(ns),
                what: "agent".into(),
                argv,
                log: Some(self.path(&format!("{}.log", n.name))),
            });
        }
        for n in &t.nodes {
            self.steps.push(Step::WaitAgent {
                member: n.name.clone(),
                socket: self.path(&format!("{}.sock", n.name)),
                log: self.path(&format!("{}.log", n.name)),
            });
        }
    }

    fn externals(&mut self) {
        let t = self.lab.topology();
        for e in &t.external {
            let ns = self.namespace(&e.name, Role::External);
            let sub = self.subnet_of(&e.subnet);
            let a = self.lab.addresses()[&e.name].1;
            self.link(&e.name, Role::External, "eth0", sub, a);
            self.default_route(&e.name, sub);
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
                    self.steps.push(Step::Route {
                        member: e.name.clone(),
                        ns: ns.clone(),
                        to: p.cidr.to_string(),
                        via: self.lab.addresses()[&v].1.to_string(),
                    });
                }
            }
            if let Some(b) = &e.bgp {
                self.steps.push(Step::Forward {
                    member: e.name.clone(),
                    ns,
                });
                self.daemon(&e.name, b);
            }
        }
    }

    /// A BGP daemon: its configuration file and process (and, for gobgpd, which does not
    /// program the kernel, the loop that installs its routes).
    fn daemon(&mut self, member: &str, b: &DaemonSpec) {
        let t = self.lab.topology();
        let conf = daemon_config(t, self.lab.addresses(), member, b);
        let ns = self.ns(member);
        for (file, text) in daemons::files(&b.daemon, member, &conf) {
            self.steps.push(Step::File {
                member: member.into(),
                path: self.path(&file),
                text,
            });
        }
        if b.daemon == "frr" {
            // FRR drops to its own user, which writes pid files and sockets there.
            self.steps.push(Step::Own {
                member: member.into(),
                path: self.path(&format!("{member}.frr")),
                user: daemons::FRR_USER.into(),
            });
        }
        let commands = daemons::commands(&b.daemon, member, Path::new(&self.dir));
        let several = commands.len() > 1;
        for argv in commands {
            // One log per process: two processes appending to one file would interleave.
            let log = match argv[0].rsplit('/').next() {
                Some(p) if several => format!("{member}.{}.{p}.log", b.daemon),
                _ => format!("{member}.{}.log", b.daemon),
            };
            self.steps.push(Step::Spawn {
                member: member.into(),
                ns: Some(ns.clone()),
                what: format!("{} (AS {})", b.daemon, b.as_number),
                argv,
                log: Some(self.path(&log)),
            });
        }
        if b.daemon == "gobgp" {
            self.steps.push(Step::Spawn {
                member: member.into(),
                ns: Some(ns),
                what: "gobgpd's FIB sync".into(),
                argv: vec![
                    "python3".into(),
                    "-c".into(),
                    daemons::GOBGP_FIB_SYNC.into(),
                ],
                log: None,
            });
        }
    }

    fn pods(&mut self) {
        let t = self.lab.topology();
        if t.pods.is_empty() {
            return;
        }
        let link = self.path("trellis-cni");
        self.steps.push(Step::Plugin { link });
        for p in &t.pods {
            let ns = self.namespace(&p.name, Role::Pod);
            if self.kubeconfig().is_some() {
                // The Pod first, as a cluster schedules it before the runtime's ADD; its
                // labels, account and ports reach the endpoint through the kube-controller.
                self.kube(&p.name, vec![kubernetes::pod(p)]);
            }
            self.steps.push(Step::Pod {
                member: p.name.clone(),
                node: p.node.clone(),
                node_ns: self.ns(&p.node),
                ns: ns.clone(),
                namespace: p.namespace.clone(),
                pod: p.pod_name().to_string(),
                container_id: container_id(&t.name, &p.name),
                socket: self.path(&format!("{}.sock", p.node)),
                cni_path: self.dir.clone(),
            });
            let written =
                !p.labels.is_empty() || !p.ports.is_empty() || p.service_account.is_some();
            if written && self.kubeconfig().is_none() {
                self.steps.push(Step::Endpoint {
                    member: p.name.clone(),
                    namespace: p.namespace.clone(),
                    container_id: container_id(&t.name, &p.name),
                    labels: p.labels.clone(),
                    ports: p.ports.clone(),
                    service_account: p.service_account.clone(),
                });
            }
            self.server(p, ns);
        }
        for p in t.pods.iter().filter(|p| !p.ports.is_empty()) {
            self.steps.push(Step::WaitServer {
                member: p.name.clone(),
                ready: self.path(&format!("{}.server.ready", p.name)),
                log: self.path(&format!("{}.server.log", p.name)),
            });
        }
    }

    /// The pod's server for its declared ports, answering with `namespace/pod`.
    fn server(&mut self, p: &LabPod, ns: String) {
        if p.ports.is_empty() {
            return;
        }
        let mut argv: Vec<String> = ["trellis", "lab", "serve", "--name"]
            .map(String::from)
            .to_vec();
        argv.push(p.qualified());
        for port in &p.ports {
            let flag = match port.protocol {
                PortProtocol::Tcp => "--tcp",
                PortProtocol::Udp => "--udp",
            };
            argv.extend([flag.to_string(), port.port.to_string()]);
        }
        argv.extend([
            "--ready".to_string(),
            self.path(&format!("{}.server.ready", p.name)),
        ]);
        self.steps.push(Step::Spawn {
            member: p.name.clone(),
            ns: Some(ns),
            what: "server".into(),
            argv,
            log: Some(self.path(&format!("{}.server.log", p.name))),
        });
    }
}

#[cfg(test)]
mod tests;
