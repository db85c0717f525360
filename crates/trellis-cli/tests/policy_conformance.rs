//! The conformance suites (`crates/trellis-policy/conformance/`: Kubernetes' e2e cases, the
//! Calico-model cases and sig-network's ClusterNetworkPolicy cases) replayed with real traffic
//! in one lab: the union of their models — namespaces x, y, z (and w, which only the
//! ClusterNetworkPolicy cases use) with pods a, b, c each, spread over three nodes, every pod
//! serving 80 and 81 on TCP and UDP. Each case's tables cover its own suite's pods.
//!
//! Always: the all-reachable baseline holds on every port, protocol and ICMP (which proves the
//! servers, the clients and the truth tables), and the replay's pod changes (labels, profiles)
//! reach the WorkloadEndpoints and are undone.
//!
//! Then, once every agent's metrics say `trellis_policy_enforced 1` (required: the test fails
//! when they do not), every case is replayed: each step's changes applied, then a wait until
//! every agent's `trellis_policy_synced_revision` has reached the datastore's revision after
//! the change, then each probe against its expected table; then the case is undone the same
//! way. Last, `policy trace --kernel` must show the deciding rule's kernel counter counting a
//! connection it allowed.
//!
//! The two runs take the two paths a cluster's changes take into the datastore:
//! - **Kubernetes** (the full replay, embedded store): the lab runs on its Kubernetes path
//!   against the in-tree test API server (a test double; it serves ClusterNetworkPolicies as
//!   `v1alpha2`, the version the cases are written in): namespaces, pods, service accounts,
//!   NetworkPolicies and ClusterNetworkPolicies — and every change of them, namespace and pod
//!   labels included — are API objects that `trellis kube-controller` mirrors into the
//!   datastore; Calico's kinds go through the CLI as an operator applies them, and pod
//!   profiles onto the WorkloadEndpoint. The wait after a change first waits until the
//!   datastore holds what the controller must write for it (the stored object as the change
//!   leaves it, or its absence; the pod's endpoint with its new labels), so the revision the
//!   agents must reach is one after the controller's write.
//! - **CLI** (every sixth case, etcd): `apply -f`, `delete -f`, a Namespace document for
//!   namespace labels, pod labels and profiles written on the WorkloadEndpoint by the lab.
//!
//! `TRELLIS_CONFORMANCE_CASES=TEXT[,TEXT...]` replays only the cases whose `FILE: NAME`
//! contains one of the TEXTs (for iterating locally; the baseline and the other checks still
//! run).

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, trellis, LabGuard};
use serde_json::Value;
use trellis_kube_testapi::{TestApiServer, CLUSTER_NETWORK_POLICIES, NAMESPACES, NODES, PODS};
use trellis_lab::endpoint::{update, EndpointChange};
use trellis_lab::kube::{KubeRef, Session};
use trellis_lab::plan::kubernetes::kubernetes_kind;
use trellis_lab::topology::{
    LabKubernetes, LabNamespace, LabNode, LabPod, LabPool, LabPort, PortProtocol, Subnet, Topology,
};
use trellis_lab::State;
use trellis_policy::conformance::{
    parse, Addresses, Change, ConformanceModel, Expectation, PodRef, Probe, ProbeProtocol, Suite,
    World,
};
use trellis_resources::Resource;

/// Labs run one at a time (each is three nodes and twelve pods on a small machine).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// The whole replay, both suites.
const REPLAY_LIMIT: Duration = Duration::from_secs(30 * 60);
/// How long the agents get to program a change.
const SYNC_LIMIT: Duration = Duration::from_secs(15);
/// Per-destination timeout of the probes.
const PROBE_TIMEOUT_MS: &str = "1000";

fn suites() -> Vec<(&'static str, Suite)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../trellis-policy/conformance");
    ["kubernetes.yaml", "calico.yaml", "cluster.yaml"]
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
            (f, parse(&text).unwrap_or_else(|e| panic!("{f}: {e}")))
        })
        .collect()
}

/// The model the lab runs: every suite's namespaces and pods (a name in two suites must mean
/// the same namespace or pod), ports and protocols.
fn union(suites: &[(&str, Suite)]) -> ConformanceModel {
    let mut m = suites[0].1.model.clone();
    for (file, s) in &suites[1..] {
        for n in &s.model.namespaces {
            match m.namespaces.iter().find(|o| o.name == n.name) {
                Some(o) => assert_eq!(o, n, "{file}: namespace {} differs", n.name),
                None => m.namespaces.push(n.clone()),
            }
        }
        for p in &s.model.pods {
            match m.pods.iter().find(|o| o.name == p.name) {
                Some(o) => assert_eq!(o, p, "{file}: pod {} differs", p.name),
                None => m.pods.push(p.clone()),
            }
        }
        assert_eq!(
            s.model.ports, m.ports,
            "{file}: one lab serves one set of ports"
        );
        assert_eq!(s.model.protocols, m.protocols, "{file}: and of protocols");
    }
    m
}

/// The lab member of a model pod.
fn member(p: &PodRef) -> String {
    format!("{}-{}", p.namespace, p.name)
}

/// The model as a lab: three nodes, pods spread over them so both same-node and cross-node
/// pairs exist, each pod serving the model's named ports.
fn topology(
    m: &ConformanceModel,
    lab: &str,
    datastore: &str,
    kubernetes: Option<LabKubernetes>,
) -> Topology {
    let ports: Vec<LabPort> = m
        .named_ports()
        .into_iter()
        .map(|(name, proto, port)| LabPort {
            name: Some(name),
            port,
            protocol: match proto {
                ProbeProtocol::Udp => PortProtocol::Udp,
                _ => PortProtocol::Tcp,
            },
        })
        .collect();
    let nodes: Vec<LabNode> = (1..=3)
        .map(|i| LabNode {
            name: format!("node{i}"),
            subnet: "rack1".into(),
            labels: BTreeMap::new(),
            as_number: None,
            route_reflector_cluster_id: None,
        })
        .collect();
    let pods = m
        .pods()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let spec = m.pods.iter().find(|q| q.name == p.name).unwrap();
            LabPod {
                name: member(p),
                node: nodes[i % nodes.len()].name.clone(),
                namespace: p.namespace.clone(),
                pod_name: Some(p.name.clone()),
                labels: spec.labels.clone(),
                ports: ports.clone(),
                service_account: spec.service_account.clone(),
            }
        })
        .collect();
    Topology {
        name: lab.into(),
        datastore: datastore.into(),
        pools: vec![LabPool {
            name: "pods".into(),
            cidr: "10.247.0.0/16".parse().unwrap(),
            block_size: Some(26),
            encapsulation: "VXLAN".into(),
            nat_outgoing: false,
            node_selector: None,
        }],
        subnets: vec![Subnet {
            name: "rack1".into(),
            cidr: "192.168.61.0/24".parse().unwrap(),
        }],
        nodes,
        pods,
        external: Vec::new(),
        expect: Vec::new(),
        bgp: None,
        router: None,
        resources: None,
        namespaces: m
            .namespaces
            .iter()
            .map(|n| LabNamespace {
                name: n.name.clone(),
                labels: n.labels.clone(),
            })
            .collect(),
        policies: None,
        flow_logs: true,
        kubernetes,
    }
}

/// The lab's API server (the test double) and a client of it, on the Kubernetes path.
struct Kube {
    /// Runs the test API server (dropped last: the server stops with it).
    _rt: tokio::runtime::Runtime,
    api: TestApiServer,
    _dir: tempfile::TempDir,
    session: Session,
}

impl Kube {
    fn start() -> (Kube, LabKubernetes) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let api = rt.block_on(TestApiServer::start());
        // A cluster with sig-network's CRD at v1alpha2, the version the cases are written in.
        api.unserve(CLUSTER_NETWORK_POLICIES, true);
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig").display().to_string();
        std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
        let session = Session::open(&kubeconfig).unwrap();
        let k = Kube {
            _rt: rt,
            api,
            _dir: dir,
            session,
        };
        (k, LabKubernetes { kubeconfig })
    }
}

/// A change in words (for errors).
fn what(c: &Change) -> String {
    let named = |d: &Value| {
        let m = &d["metadata"];
        match m["namespace"].as_str() {
            Some(ns) => format!("{} {ns}/{}", d["kind"], m["name"]),
            None => format!("{} {}", d["kind"], m["name"]),
        }
    };
    match c {
        Change::Apply(d) => format!("apply {}", named(d)),
        Change::Delete(d) => format!("delete {}", named(d)),
        Change::NamespaceLabels { name, labels } => format!("namespace {name} labels {labels:?}"),
        Change::PodLabels { pod, labels } => format!("pod {pod} labels {labels:?}"),
        Change::PodProfiles { pod, profiles } => format!("pod {pod} profiles {profiles:?}"),
    }
}

/// Whether a change goes to the API server on the Kubernetes path.
fn through_kubernetes(c: &Change) -> bool {
    match c {
        Change::Apply(d) | Change::Delete(d) => {
            Resource::from_value(d).is_ok_and(|r| kubernetes_kind(r.kind()))
        }
        Change::NamespaceLabels { .. } | Change::PodLabels { .. } => true,
        Change::PodProfiles { .. } => false,
    }
}

/// The running lab and what the replay needs of it.
struct Replay {
    name: &'static str,
    state: State,
    pods: Vec<PodRef>,
    addrs: Addresses,
    /// On the Kubernetes path.
    kube: Option<Kube>,
}

impl Replay {
    fn up(
        model: &ConformanceModel,
        name: &'static str,
        datastore: &str,
        kubernetes: bool,
    ) -> Replay {
        let file = std::env::temp_dir().join(format!("trellis-test-{name}.yaml"));
        let (kube, k) = match kubernetes {
            true => {
                let (kube, k) = Kube::start();
                (Some(kube), Some(k))
            }
            false => (None, None),
        };
        let t = topology(model, name, datastore, k);
        std::fs::write(&file, serde_norway::to_string(&t).unwrap()).unwrap();
        let (ok, out) = trellis(&["lab", "up", "-f", file.to_str().unwrap()]);
        std::fs::remove_file(&file).unwrap();
        assert!(ok, "{out}");
        let state = State::load(name).unwrap();
        let pods = model.pods();
        let addrs = pods
            .iter()
            .map(|p| (p.clone(), state.pod_ips[&member(p)].parse().unwrap()))
            .collect();
        Replay {
            name,
            state,
            pods,
            addrs,
            kube,
        }
    }

    fn cli(&self, args: &[&str], input: &str) -> Result<String, String> {
        let mut c = Command::new(bin("trellis"));
        // `--lab`: an etcd lab's store is reached from its control namespace.
        c.args(["--lab", self.name])
            .args(args)
            .stderr(std::process::Stdio::piped());
        let out = common::spawn_with_input(&mut c, input)
            .wait_with_output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("trellis {args:?}: {text}"))
        }
    }

    /// Carries out a replay's changes in order: on the Kubernetes path, those of Kubernetes'
    /// kinds, namespace labels and pod labels through the API server; otherwise documents
    /// through the CLI (consecutive ones in one call), namespace labels as a Namespace document,
    /// pod labels and profiles on the pod's WorkloadEndpoint.
    fn apply(&self, changes: &[Change]) -> Result<(), String> {
        let mut i = 0;
        while i < changes.len() {
            if let Some(k) = self
                .kube
                .as_ref()
                .filter(|_| through_kubernetes(&changes[i]))
            {
                self.kube_change(&k.session, &changes[i])?;
                i += 1;
                continue;
            }
            let verb = match &changes[i] {
                Change::Apply(_) | Change::NamespaceLabels { .. } => "apply",
                Change::Delete(_) => "delete",
                Change::PodLabels { pod, labels } => {
                    update(
                        &self.state,
                        &member(pod),
                        &EndpointChange::Labels(labels.clone()),
                    )
                    .map_err(|e| e.to_string())?;
                    i += 1;
                    continue;
                }
                Change::PodProfiles { pod, profiles } => {
                    update(
                        &self.state,
                        &member(pod),
                        &EndpointChange::Profiles(profiles.clone()),
                    )
                    .map_err(|e| e.to_string())?;
                    i += 1;
                    continue;
                }
            };
            let mut docs = Vec::new();
            while let Some(c) = changes.get(i) {
                if self.kube.is_some() && through_kubernetes(c) {
                    break;
                }
                let doc = match (verb, c) {
                    ("apply", Change::Apply(d)) | ("delete", Change::Delete(d)) => d.clone(),
                    ("apply", Change::NamespaceLabels { name, labels }) => serde_json::json!({
                        "apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": name, "labels": labels}}),
                    _ => break,
                };
                docs.push(doc);
                i += 1;
            }
            self.cli(&[verb, "-f", "-"], &Value::Array(docs).to_string())?;
        }
        Ok(())
    }

    /// One change through the API server.
    fn kube_change(&self, session: &Session, c: &Change) -> Result<(), String> {
        let labelled =
            |api_version: &str, kind: &str, namespace: Option<&str>, name: &str| KubeRef {
                api_version: api_version.into(),
                kind: kind.into(),
                namespace: namespace.map(str::to_string),
                name: name.into(),
            };
        let done = match c {
            Change::Apply(d) => session.put(d).map(|_| ()),
            Change::Delete(d) => session.delete(&KubeRef::of(d)?),
            Change::NamespaceLabels { name, labels } => {
                session.set_labels(&labelled("v1", "Namespace", None, name), labels)
            }
            Change::PodLabels { pod, labels } => session.set_labels(
                &labelled("v1", "Pod", Some(&pod.namespace), &pod.name),
                labels,
            ),
            Change::PodProfiles { .. } => unreachable!("written on the endpoint"),
        };
        done.map_err(|e| e.to_string())
    }

    /// Whether the datastore holds what the kube-controller must write for `c` (on the
    /// Kubernetes path; a change through the CLI or the lab is written before it returns).
    async fn mirrored(&self, store: &dyn trellis_store::Datastore, c: &Change) -> bool {
        if self.kube.is_none() || !through_kubernetes(c) {
            return true;
        }
        let get = |r: &Resource| {
            let (kind, ns, name) = (
                r.kind(),
                r.metadata().namespace.clone(),
                r.metadata().name.clone(),
            );
            async move {
                trellis_cluster::objects::get(store, kind, ns.as_deref(), &name)
                    .await
                    .unwrap()
                    .map(|s| s.resource)
            }
        };
        let same = |a: &Resource, b: &Resource| {
            a.metadata().labels == b.metadata().labels
                && a.to_value()["spec"] == b.to_value()["spec"]
        };
        match c {
            Change::Apply(d) => {
                let want = Resource::from_value(d).unwrap();
                get(&want).await.is_some_and(|got| same(&got, &want))
            }
            Change::Delete(d) => get(&Resource::from_value(d).unwrap()).await.is_none(),
            Change::NamespaceLabels { name, labels } => {
                // As the translation stores it (with `kubernetes.io/metadata.name`).
                let want = Resource::from_value(&serde_json::json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels}}))
                .unwrap();
                get(&want).await.is_some_and(|got| same(&got, &want))
            }
            Change::PodLabels { pod, labels } => trellis_cluster::objects::endpoints(store)
                .await
                .unwrap()
                .iter()
                .any(|(w, _)| {
                    w.metadata.namespace.as_deref() == Some(pod.namespace.as_str())
                        && w.spec.pod.as_deref() == Some(pod.name.as_str())
                        && w.metadata.labels == *labels
                }),
            Change::PodProfiles { .. } => true,
        }
    }

    /// Forgets every connection the nodes' conntrack tables hold (`conntrack -F` in each node's
    /// namespace, which the lab made). The cases' tables are about new connections: a UDP
    /// probe whose random source port repeats an earlier allowed probe's within conntrack's
    /// 30 s would otherwise pass as established traffic after a policy now denies it (what
    /// existing connections do when policy changes is the implementation's choice, as in
    /// Kubernetes; Trellis, like Calico, keeps them).
    fn forget_connections(&self) -> Result<(), String> {
        for node in self.state.node_ips.keys() {
            let ns = &self.state.namespaces[node];
            let out = Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{ns}"))
                .args(["conntrack", "-F"])
                .output()
                .map_err(|e| format!("conntrack -F on {node}: {e}"))?;
            // conntrack 1.4 reports the flush on stderr and exits 0.
            if !out.status.success() {
                return Err(format!(
                    "conntrack -F on {node}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        Ok(())
    }

    /// Runs one probe against its expected table over `pods` (a suite's; the lab probes all).
    fn probe(&self, p: &Probe, pods: &[PodRef]) -> Result<(), String> {
        let expect = p.expect.table(pods).render();
        let file = std::env::temp_dir().join(format!(
            "trellis-test-{}-{}.expect",
            self.name,
            std::process::id()
        ));
        std::fs::write(&file, expect).unwrap();
        let mut args = vec![
            "lab".to_string(),
            "probe".into(),
            self.name.into(),
            "--protocol".into(),
            p.protocol.as_str().into(),
            "--timeout-ms".into(),
            PROBE_TIMEOUT_MS.into(),
            "--expect".into(),
            file.display().to_string(),
        ];
        if let Some(port) = p.port {
            args.extend(["--port".to_string(), port.to_string()]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out) = trellis(&argv);
        std::fs::remove_file(&file).unwrap();
        if ok {
            Ok(())
        } else {
            Err(format!("{} {:?}:\n{out}", p.protocol, p.port))
        }
    }

    /// A node's agent metrics.
    fn metrics(&self, node: &str) -> String {
        let url = format!("http://{}:9091/metrics", self.state.node_ips[node]);
        let fetch = format!(
            "import urllib.request;print(urllib.request.urlopen('{url}',timeout=5).read().decode())"
        );
        let out = Command::new("nsenter")
            .arg(format!(
                "--net=/var/run/netns/{}",
                self.state.namespaces[node]
            ))
            .args(["python3", "-c", &fetch])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A metric's value on a node, if it reports it (`name value` at the start of a line).
    fn metric(&self, node: &str, name: &str) -> Option<f64> {
        self.metrics(node).lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// Whether every agent reports that it enforces policy.
    fn enforced(&self) -> bool {
        self.state
            .node_ips
            .keys()
            .all(|n| self.metric(n, "trellis_policy_enforced") == Some(1.0))
    }

    /// Waits until every agent has programmed the datastore as it is after `changes`: first
    /// (on the Kubernetes path) until the datastore holds what the kube-controller writes for
    /// them, then until every agent has reached the datastore's revision.
    fn synced(&self, changes: &[Change]) -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let deadline = Instant::now() + SYNC_LIMIT;
        if self.kube.is_some() {
            rt.block_on(async {
                let store = trellis_store::open(&self.state.datastore).await.unwrap();
                for c in changes {
                    while !self.mirrored(&*store, c).await {
                        if Instant::now() > deadline {
                            return Err(format!(
                                "the kube-controller did not mirror {} within {} s",
                                what(c),
                                SYNC_LIMIT.as_secs()
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Ok(())
            })?;
        }
        let read = || {
            rt.block_on(async {
                let store = trellis_store::open(&self.state.datastore).await.unwrap();
                store.revision().await.unwrap()
            })
        };
        // An etcd lab's etcd listens in its control namespace.
        let revision = match self.state.namespaces.get("control") {
            Some(ctl) if self.state.datastore.starts_with("etcd:") => {
                let path = std::path::Path::new("/var/run/netns").join(ctl);
                trellis_dataplane::Netns::open(&path)
                    .unwrap()
                    .run(read)
                    .unwrap()
            }
            _ => read(),
        } as f64;
        for node in self.state.node_ips.keys() {
            loop {
                let got = self.metric(node, "trellis_policy_synced_revision");
                if got.is_some_and(|r| r >= revision) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{node} did not program revision {revision} within {} s (it reports {got:?})",
                        SYNC_LIMIT.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

/// Every pair reached on every port and protocol the model serves, and by ICMP; the first
/// probe is retried while routes converge after `up`.
fn baseline(lab: &Replay, model: &ConformanceModel, settle: Duration) {
    let all = Expectation {
        default: true,
        peers: vec![],
    };
    let mut probes: Vec<Probe> = model
        .named_ports()
        .into_iter()
        .map(|(_, protocol, port)| Probe {
            port: Some(port),
            protocol,
            expect: all.clone(),
        })
        .collect();
    probes.push(Probe {
        port: None,
        protocol: ProbeProtocol::Icmp,
        expect: all.clone(),
    });
    let deadline = Instant::now() + settle;
    for p in &probes {
        loop {
            match lab.probe(p, &lab.pods) {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => panic!("baseline: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }
}

/// Replays one case: each step's changes, a wait until the agents programmed them, its probes;
/// then the case undone. Returns what went wrong (empty: the case passed).
fn replay_case(
    lab: &Replay,
    model: &ConformanceModel,
    case: &trellis_policy::conformance::Case,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut world = World::new(model);
    for (i, step) in case.steps.iter().enumerate() {
        let done = world
            .step(step, &lab.addrs)
            .map_err(|e| e.to_string())
            .and_then(|changes| lab.apply(&changes).and_then(|()| lab.synced(&changes)))
            .and_then(|()| lab.forget_connections());
        if let Err(e) = done {
            failures.push(format!("{}: step {}: {e}", case.name, i + 1));
            break;
        }
        for p in &step.probes {
            if let Err(e) = lab.probe(p, &model.pods()) {
                failures.push(format!("{}: step {}: {e}", case.name, i + 1));
            }
        }
    }
    let undo = world.undo();
    if let Err(e) = lab.apply(&undo).and_then(|()| lab.synced(&undo)) {
        failures.push(format!("{}: undo: {e}", case.name));
    }
    failures
}

/// The replay's pod changes reach the WorkloadEndpoint, and its undo restores it.
fn pod_changes_reach_the_endpoint(lab: &Replay, model: &ConformanceModel) {
    let endpoint = |p: &PodRef| -> Value {
        let out = lab
            .cli(
                &["get", "workloadendpoints", "-n", &p.namespace, "-o", "json"],
                "",
            )
            .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| {
                w["metadata"]["namespace"] == p.namespace.as_str()
                    && w["spec"]["pod"] == p.name.as_str()
            })
            .cloned()
            .unwrap_or_else(|| panic!("no endpoint for {p}: {out}"))
    };
    let xb = PodRef::new("x", "b");
    let mut world = World::new(model);
    let step = trellis_policy::conformance::Step {
        delete: vec![],
        apply: vec![],
        label_namespace: None,
        label_pod: Some(trellis_policy::conformance::PodLabels {
            namespace: "x".into(),
            name: "b".into(),
            labels: [
                ("pod".to_string(), "b".to_string()),
                ("pod2".to_string(), "updated".to_string()),
            ]
            .into(),
        }),
        profile_pod: Some(trellis_policy::conformance::PodProfiles {
            namespace: "x".into(),
            name: "b".into(),
            profiles: vec!["p1".into()],
        }),
        probes: vec![],
    };
    let changes = world.step(&step, &lab.addrs).unwrap();
    lab.apply(&changes).unwrap();
    lab.synced(&changes).unwrap();
    let w = endpoint(&xb);
    assert_eq!(w["metadata"]["labels"]["pod2"], "updated", "{w}");
    assert_eq!(w["spec"]["profiles"], serde_json::json!(["p1"]), "{w}");
    let undo = world.undo();
    lab.apply(&undo).unwrap();
    lab.synced(&undo).unwrap();
    let w = endpoint(&xb);
    assert_eq!(
        w["metadata"]["labels"],
        serde_json::json!({"pod": "b"}),
        "{w}"
    );
    assert!(w["spec"].get("profiles").is_none(), "{w}");
}

/// `policy trace --kernel` reads the deciding rule's counters on the node: a connection the
/// rule allowed is counted.
fn kernel_counters_of_the_deciding_rule(lab: &Replay) {
    let policy = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "kernel-counters", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                              "ports": [{"port": 80}]}]}});
    let apply = [Change::Apply(policy.clone())];
    lab.apply(&apply).unwrap();
    lab.synced(&apply).unwrap();
    let counted = || -> u64 {
        let out = Command::new(bin("trellis"))
            .args([
                "--lab", lab.name, "policy", "trace", "x/b", "x/a", "--port", "80",
            ])
            .args(["--kernel", "-o", "json"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        let k = v["kernel"]
            .as_array()
            .unwrap_or_else(|| panic!("no kernel part: {out}"));
        let r = k
            .iter()
            .find(|r| r["direction"] == "ingress")
            .unwrap_or_else(|| panic!("no ingress rule: {out}"));
        assert_eq!(r["rule"], "knp/x/kernel-counters/in/0", "{out}");
        r["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("not in the kernel: {out}"))
    };
    let before = counted();
    let probe = Probe {
        port: Some(80),
        protocol: ProbeProtocol::Tcp,
        expect: Expectation {
            default: true,
            peers: vec![],
        },
    };
    // x/a is isolated now: only x/b reaches it (the probe's table says so), and that
    // connection is the rule's.
    let _ = lab.probe(&probe, &lab.pods);
    let after = counted();
    assert!(
        after > before,
        "the rule counted {before} then {after} packets"
    );
    let delete = [Change::Delete(policy)];
    lab.apply(&delete).unwrap();
    lab.synced(&delete).unwrap();
}

/// Every case on the embedded store, on the Kubernetes path.
#[test]
fn conformance_replay() {
    replay("tconf", "embedded", 1, true);
}

/// Every sixth case (all suites) on etcd, bounded, through the CLI: the same agents on the
/// other store, with every change written by the CLI and the lab.
#[test]
fn conformance_replay_on_etcd() {
    replay("tconfe", "etcd", 6, false);
}

/// Brings up lab `name` on `datastore` (on the Kubernetes path when `kubernetes`) and replays
/// every `every`th case of every suite.
fn replay(name: &'static str, datastore: &str, every: usize, kubernetes: bool) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let suites = suites();
    let model = union(&suites);
    let _guard = LabGuard(name.into());
    let lab = Replay::up(&model, name, datastore, kubernetes);
    baseline(&lab, &model, Duration::from_secs(30));
    pod_changes_reach_the_endpoint(&lab, &model);

    // Enforcement is required: a replay that skipped when the agents stop enforcing could not
    // fail.
    let deadline = Instant::now() + SYNC_LIMIT;
    while !lab.enforced() {
        assert!(
            Instant::now() < deadline,
            "the agents do not report trellis_policy_enforced 1 within {} s",
            SYNC_LIMIT.as_secs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + REPLAY_LIMIT;
    let mut failures = Vec::new();
    let cases = suites
        .iter()
        .flat_map(|(file, s)| s.cases.iter().map(move |c| (file, &s.model, c)))
        .filter(|(_, _, c)| c.skip.is_none())
        .enumerate()
        .filter(|(i, _)| i % every == 0)
        .filter(|(_, (file, _, c))| {
            std::env::var("TRELLIS_CONFORMANCE_CASES").map_or(true, |only| {
                let name = format!("{file}: {}", c.name);
                only.split(',').any(|o| name.contains(o))
            })
        });
    for (_, (file, model, case)) in cases {
        assert!(
            Instant::now() < deadline,
            "the replay took longer than {} min; failures so far:\n{}",
            REPLAY_LIMIT.as_secs() / 60,
            failures.join("\n")
        );
        failures.extend(
            replay_case(&lab, model, case)
                .into_iter()
                .map(|f| format!("{file}: {f}")),
        );
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // Every case undone: back to everyone reaching everyone.
    baseline(&lab, &model, Duration::ZERO);
    kernel_counters_of_the_deciding_rule(&lab);
    let (ok, out) = trellis(&["lab", "down", name]);
    assert!(ok, "{out}");
    if let Some(k) = &lab.kube {
        // `down` deleted the API objects the lab created.
        for p in &lab.pods {
            assert!(
                k.api.get(PODS, &p.namespace, &p.name).is_none(),
                "pod {p} left"
            );
        }
        assert!(k.api.get(NAMESPACES, "", "x").is_none(), "namespace x left");
        assert!(k.api.get(NODES, "", "node1").is_none(), "node node1 left");
    }
}
