//! `manifests/trellis.yaml`, checked against the code it deploys: every document deserialises
//! into its k8s-openapi type with no field left over (an unknown kind or a misspelt field
//! fails); the DaemonSet's invariants (hostNetwork, the host paths each container mounts,
//! probes on the agent's metrics listener, tolerations, priority class, exactly the listed
//! capabilities, the install-cni init container); every container's flags and environment go
//! through the real `trellis` parser; the ConfigMap's IPPool is applied by running the init
//! container's own command; and the kube-controller's RBAC equals what the real controller,
//! run with the Deployment's flags against the in-tree test API server (a test double), asks
//! for — a missing grant and an unused one both fail. Each check also runs against a mutated
//! manifest and must name the fault. Run under the integration-test flock (BRIEF).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use trellis_kube_testapi::{
    Request, TestApiServer, CLUSTER_NETWORK_POLICIES, LEASES, NAMESPACES, NETWORK_POLICIES, NODES,
    PODS, SERVICE_ACCOUNTS,
};
use trellis_resources::{parse_documents, Kind, Resource};

const MANIFEST: &str = include_str!("../../../manifests/trellis.yaml");
const DEADLINE: Duration = Duration::from_secs(30);
const NS: &str = "kube-system";
const AGENT_SA: &str = "trellis-node";
const CONTROLLER_SA: &str = "trellis-kube-controller";
/// Capabilities the agent's container adds (see the manifest's comments for why each).
const AGENT_CAPS: [&str; 2] = ["NET_ADMIN", "NET_BIND_SERVICE"];
/// Where the CNI plugin looks for the agent when the conflist names no `agentSocket` (the
/// conflist `trellis install-cni` writes by default names none).
const PLUGIN_SOCKET: &str = "/run/trellis/agent.sock";

#[path = "manifests/checks.rs"]
mod checks;
use checks::*;

/// One document of the manifest, as its k8s-openapi type.
#[derive(Debug, Clone)]
enum Object {
    ConfigMap(ConfigMap),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    DaemonSet(DaemonSet),
    Deployment(Deployment),
}

/// `T` from `v`, refusing anything `T` would drop (k8s-openapi ignores unknown fields, so a
/// misspelt field would otherwise vanish silently): the typed value must serialise back to
/// exactly the document.
fn typed<T: DeserializeOwned + Serialize>(doc: usize, v: &Value) -> Result<T, String> {
    let t: T = serde_json::from_value(v.clone()).map_err(|e| format!("document {doc}: {e}"))?;
    let back = serde_json::to_value(&t).expect("serialises");
    if back != *v {
        return Err(format!(
            "document {doc}: fields the type does not have (or of the wrong form): {}",
            diff(v, &back, "")
        ));
    }
    Ok(t)
}

/// The first path at which `a` and `b` differ.
fn diff(a: &Value, b: &Value, at: &str) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                if x.get(k) != y.get(k) {
                    return diff(
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                        &format!("{at}.{k}"),
                    );
                }
            }
            at.to_string()
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                if p != q {
                    return diff(p, q, &format!("{at}[{i}]"));
                }
            }
            at.to_string()
        }
        _ => format!("{at} ({a} in the file)"),
    }
}

fn parse(text: &str) -> Result<Vec<Object>, String> {
    let mut out = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let v = Value::deserialize(de).map_err(|e| format!("document {doc}: {e}"))?;
        if v.is_null() {
            continue;
        }
        let av = v["apiVersion"].as_str().unwrap_or_default();
        let kind = v["kind"].as_str().unwrap_or_default();
        out.push(match (av, kind) {
            ("v1", "ConfigMap") => Object::ConfigMap(typed(doc, &v)?),
            ("v1", "ServiceAccount") => Object::ServiceAccount(typed(doc, &v)?),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(typed(doc, &v)?),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                Object::ClusterRoleBinding(typed(doc, &v)?)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => Object::Role(typed(doc, &v)?),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => Object::RoleBinding(typed(doc, &v)?),
            ("apps/v1", "DaemonSet") => Object::DaemonSet(typed(doc, &v)?),
            ("apps/v1", "Deployment") => Object::Deployment(typed(doc, &v)?),
            _ => return Err(format!("document {doc}: unexpected kind {av}/{kind}")),
        });
    }
    Ok(out)
}

/// The manifest's objects, looked up by what the checks need.
struct Manifest(Vec<Object>);

impl Manifest {
    fn new(text: &str) -> Manifest {
        Manifest(parse(text).expect("the manifest parses"))
    }

    fn daemonset(&self) -> &DaemonSet {
        let mut it = self.0.iter().filter_map(|o| match o {
            Object::DaemonSet(d) => Some(d),
            _ => None,
        });
        let d = it.next().expect("a DaemonSet");
        assert!(it.next().is_none(), "one DaemonSet");
        d
    }

    fn deployment(&self) -> &Deployment {
        let mut it = self.0.iter().filter_map(|o| match o {
            Object::Deployment(d) => Some(d),
            _ => None,
        });
        let d = it.next().expect("a Deployment");
        assert!(it.next().is_none(), "one Deployment");
        d
    }

    fn config(&self, name: &str) -> BTreeMap<String, String> {
        self.0
            .iter()
            .find_map(|o| match o {
                Object::ConfigMap(c) if c.metadata.name.as_deref() == Some(name) => {
                    Some(c.data.clone().unwrap_or_default())
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("ConfigMap {name}"))
    }
}

fn pod_spec_ds(d: &DaemonSet) -> &PodSpec {
    d.spec.template.spec.as_ref().expect("DaemonSet pod spec")
}

fn pod_spec_deploy(d: &Deployment) -> &PodSpec {
    d.spec.template.spec.as_ref().expect("Deployment pod spec")
}

/// The value of `--flag=V` or `--flag V` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let eq = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&eq).or_else(|| {
            (a == name)
                .then(|| args.get(i + 1).map(String::as_str))
                .flatten()
        })
    })
}

fn args(c: &Container) -> Vec<String> {
    c.args.clone().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The Deployment: its init container applies the pool, its controller is run for real.

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("container {name}"))
}

/// The container's argv and environment for running here: `$(VAR)`s expanded, the datastore
/// replaced by `datastore` and each ConfigMap volume's files written under `dir` (its mount
/// path's files there, the arguments rewritten to match).
fn runnable(
    m: &Manifest,
    spec: &PodSpec,
    c: &Container,
    datastore: &str,
    dir: &Path,
) -> (Vec<String>, BTreeMap<String, String>) {
    let mut env = environment(m, c).unwrap();
    env.insert("TRELLIS_DATASTORE".into(), datastore.into());
    let mut argv: Vec<String> = args(c).iter().map(|a| expand(a, &env).unwrap()).collect();
    for vm in c.volume_mounts.iter().flatten() {
        let vol = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == vm.name)
            .expect("mounted volume");
        let Some(cm) = &vol.config_map else { continue };
        let data = m.config(&cm.name);
        let local = dir.join(&vm.name);
        std::fs::create_dir_all(&local).unwrap();
        for item in cm.items.iter().flatten() {
            std::fs::write(local.join(&item.path), &data[&item.key]).unwrap();
        }
        for a in &mut argv {
            if let Some(rest) = a.strip_prefix(&vm.mount_path) {
                *a = format!("{}{rest}", local.display());
            }
        }
    }
    (argv, env)
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn label(
    store: &dyn trellis_store::Datastore,
    kind: Kind,
    ns: Option<&str>,
    name: &str,
    key: &str,
) -> Option<String> {
    let r = trellis_cluster::objects::get(store, kind, ns, name)
        .await
        .ok()??;
    match r.resource {
        Resource::WorkloadEndpoint(w) => w.metadata.labels.get(key).cloned(),
        other => other.metadata().labels.get(key).cloned(),
    }
}

/// A child killed and reaped when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the Deployment's init container (the pool lands in the store) and then its
/// controller, with the Deployment's own flags, against a test API server through a whole
/// life: every kind listed, synced and watched (a change after the first sync arrives), the
/// Lease created and renewed, SIGTERM and the Lease given up. Returns what it requested.
/// A ClusterNetworkPolicy labelled `v`.
fn cnp(v: &str) -> Value {
    json!({"metadata": {"name": "cnp", "labels": {"v": v}},
           "spec": {"tier": "Baseline", "priority": 1, "subject": {"namespaces": {}},
                    "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}})
}

async fn run_controller(m: &Manifest) -> Vec<Request> {
    let dir = tempfile::tempdir().unwrap();
    let datastore = format!("sqlite:{}", dir.path().join("t.db").display());
    let store = trellis_store::open(&datastore).await.unwrap();
    let spec = pod_spec_deploy(m.deployment());

    // The init container: `trellis apply -f` of the ConfigMap's pool.
    let init = container(spec, "apply-ippool");
    let (argv, env) = runnable(m, spec, init, &datastore, dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(&argv)
        .env_clear()
        .envs(&env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apply-ippool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pools = parse_documents(&m.config("trellis-config")["ippool.yaml"]).unwrap();
    for pool in &pools {
        let stored =
            trellis_cluster::objects::get(&*store, pool.kind(), None, &pool.metadata().name)
                .await
                .unwrap();
        assert_eq!(
            stored.map(|s| s.resource).as_ref(),
            Some(pool),
            "the pool as applied"
        );
    }

    let api = TestApiServer::start().await;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    api.put(
        NAMESPACES,
        json!({"metadata": {"name": "shop", "labels": {"v": "1"}}}),
    );
    api.put(
        SERVICE_ACCOUNTS,
        json!({"metadata": {"name": "web", "namespace": "shop", "labels": {"v": "1"}}}),
    );
    api.put(NETWORK_POLICIES, json!({"metadata": {"name": "np", "namespace": "shop", "labels": {"v": "1"}}, "spec": {"podSelector": {}}}));
    api.put(
        NODES,
        json!({"metadata": {"name": "n1", "labels": {"v": "1"}}}),
    );
    api.put(CLUSTER_NETWORK_POLICIES, cnp("1"));
    api.put(
        PODS,
        json!({"metadata": {"name": "web-1", "namespace": "shop", "labels": {"v": "1"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]}}),
    );
    let node = "apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: n1}\nspec: {addresses: [{address: 192.0.2.2/24}]}\n";
    let wep = "apiVersion: trellis.dev/v1\nkind: WorkloadEndpoint\nmetadata: {name: n1.c1.eth0, namespace: shop}\nspec: {node: n1, pod: web-1, containerID: c1, endpoint: eth0, orchestrator: trellis, ipNetworks: [10.244.0.1/32]}\n";
    // IPAM GC's work (its re-check GETs are part of what the controller requests): an address
    // of a pod the API server does not have, and a node synced from Kubernetes once that it no
    // longer has.
    let gone_node = "apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: n9, annotations: {trellis.dev/kube-labels: ''}}\nspec: {}\n";
    for doc in [node, wep, gone_node] {
        trellis_cluster::objects::apply(&*store, &parse_documents(doc).unwrap()[0], false)
            .await
            .unwrap();
    }
    let gone = trellis_cluster::ipam::Request {
        network: "k8s".into(),
        container_id: "gone".into(),
        ifname: "eth0".into(),
        namespace: Some("shop".into()),
        pod: Some("gone".into()),
        pod_uid: Some("uid-gone".into()),
        ..Default::default()
    };
    trellis_cluster::ipam::NodeIpam::new(store.clone(), "n1", BTreeMap::new())
        .allocate(&gone)
        .await
        .unwrap();

    let c = container(spec, "trellis-kube-controller");
    let (mut argv, mut env) = runnable(m, spec, c, &datastore, dir.path());
    env.insert("KUBECONFIG".into(), kubeconfig.display().to_string());
    // GC in seconds rather than minutes.
    argv.extend(["--ipam-gc-grace=1", "--ipam-gc-interval=0.2"].map(String::from));
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(&argv)
            .env_clear()
            .envs(&env)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let s = &*store;
    let kinds = [
        (Kind::Namespace, None, "shop"),
        (Kind::ServiceAccount, Some("shop"), "web"),
        (Kind::KubernetesNetworkPolicy, Some("shop"), "np"),
        (Kind::Node, None, "n1"),
        (Kind::WorkloadEndpoint, Some("shop"), "n1.c1.eth0"),
        (Kind::ClusterNetworkPolicy, None, "cnp"),
    ];
    for v in ["1", "2"] {
        if v == "2" {
            // Changes after the first sync arrive only through the watches.
            api.put(
                NAMESPACES,
                json!({"metadata": {"name": "shop", "labels": {"v": "2"}}}),
            );
            api.put(
                SERVICE_ACCOUNTS,
                json!({"metadata": {"name": "web", "namespace": "shop", "labels": {"v": "2"}}}),
            );
            api.put(NETWORK_POLICIES, json!({"metadata": {"name": "np", "namespace": "shop", "labels": {"v": "2"}}, "spec": {"podSelector": {}}}));
            api.put(
                NODES,
                json!({"metadata": {"name": "n1", "labels": {"v": "2"}}}),
            );
            api.put(CLUSTER_NETWORK_POLICIES, cnp("2"));
            api.put(
                PODS,
                json!({"metadata": {"name": "web-1", "namespace": "shop", "labels": {"v": "2"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]}}),
            );
        }
        for (kind, ns, name) in kinds {
            wait_until(&format!("{kind:?} {name} label v={v}"), || async move {
                label(s, kind, ns, name, "v").await.as_deref() == Some(v)
            })
            .await;
        }
    }
    wait_until(
        "IPAM GC released the gone pod's address and node n9",
        || async move {
            let ep = trellis_cluster::objects::get(
                s,
                Kind::WorkloadEndpoint,
                Some("shop"),
                "n1.gone.eth0",
            );
            let n9 = trellis_cluster::objects::get(s, Kind::Node, None, "n9");
            ep.await.unwrap().is_none() && n9.await.unwrap().is_none()
        },
    )
    .await;
    // A renewal: the Lease's renewTime moves on.
    let renew = || {
        api.get(LEASES, NS, "trellis-kube-controller")
            .map(|l| l["spec"]["renewTime"].clone())
    };
    let first = renew();
    wait_until("a lease renewal", || {
        let now = renew();
        let first = first.clone();
        async move { now.is_some() && now != first }
    })
    .await;
    // SIGTERM: the controller gives the Lease up and exits.
    // SAFETY: signalling our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the controller did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let holder = api
        .get(LEASES, NS, "trellis-kube-controller")
        .map(|l| l["spec"]["holderIdentity"].clone());
    assert_eq!(holder, Some(Value::Null), "the lease was given up");
    api.seen()
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn every_document_is_a_known_kind_with_only_its_fields() {
    let objects = parse(MANIFEST).unwrap();
    assert_eq!(objects.len(), 9, "{objects:#?}");
    let bad_kind = MANIFEST.replacen("kind: ConfigMap", "kind: Secret", 1);
    assert!(parse(&bad_kind)
        .unwrap_err()
        .contains("unexpected kind v1/Secret"));
    let typo = MANIFEST.replacen("hostNetwork: true", "hostNetwrok: true", 1);
    let e = parse(&typo).unwrap_err();
    assert!(e.contains("hostNetwrok"), "{e}");
}

/// Each check on the manifest as it is (no problem), and on a mutation of it (the fault named).
fn holds(check: impl Fn(&Manifest) -> Vec<String>, mutations: &[(&str, &str, &str)]) {
    let problems = check(&Manifest::new(MANIFEST));
    assert!(problems.is_empty(), "{problems:#?}");
    for (from, to, needle) in mutations {
        assert!(
            MANIFEST.contains(from),
            "mutation source {from:?} not in the manifest"
        );
        let problems = check(&Manifest::new(&MANIFEST.replacen(from, to, 1)));
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "mutation {from:?} → {to:?}: want a problem naming {needle:?}, got {problems:#?}"
        );
    }
}

#[test]
fn the_daemonset_runs_the_agent_on_the_host_network_with_only_what_it_needs() {
    holds(check_daemonset, &[
        ("hostNetwork: true", "hostNetwork: false", "hostNetwork"),
        ("      serviceAccountName: trellis-node\n", "      serviceAccountName: trellis-node\n      hostPID: true\n", "hostPID"),
        ("priorityClassName: system-node-critical", "priorityClassName: system-cluster-critical", "priorityClassName"),
        ("        - operator: Exists\n", "        - operator: Exists\n          key: x\n", "toleration"),
        ("    type: RollingUpdate\n    rollingUpdate:\n      maxUnavailable: 1\n", "    type: OnDelete\n", "updateStrategy"),
        ("                - NET_BIND_SERVICE\n", "                - NET_BIND_SERVICE\n                - SYS_ADMIN\n", "capabilities.add"),
        ("                - NET_ADMIN\n", "", "capabilities.add"),
        ("            privileged: false\n            allowPrivilegeEscalation: false\n            # The agent", "            privileged: true\n            allowPrivilegeEscalation: false\n            # The agent", "privileged"),
        ("              path: /healthz", "              path: /livez", "livenessProbe path"),
        ("              path: /readyz", "              path: /healthz", "readinessProbe path"),
        ("            - --metrics-listen=127.0.0.1:9091", "            - --metrics-listen=127.0.0.1:9092", "port"),
        ("              host: 127.0.0.1\n              path: /readyz", "              path: /readyz", "readinessProbe host"),
        ("            - name: trellis-run\n              mountPath: /run/trellis", "            - name: trellis-runs\n              mountPath: /run/trellis", "which is no volume"),
        ("            path: /etc/cni/net.d", "            path: /etc/cni/net.d.x", "hostPath"),
        ("              mountPath: /host/opt/cni/bin", "              mountPath: /host/opt/cni/bin2", "not mounted"),
        ("          args: [install-cni, --host-root=/host]", "          args: [install-cni, --host-root=/hostfs]", "not mounted"),
        ("      automountServiceAccountToken: false\n      priorityClassName: system-node-critical", "      priorityClassName: system-node-critical", "token"),
        ("            - --node=$(NODE_NAME)", "            - --node=$(HOSTNAME)", "--node"),
        ("            - --socket=/run/trellis/agent.sock", "            - --socket=/var/run/trellis.sock", "--socket"),
        ("            - --kubernetes\n", "", "--kubernetes"),
    ]);
}

/// The kube-controller runs on the host network: on the pod network its pod could get no
/// address before it ran (a deadlock at install, found by review).
#[test]
fn the_kube_controller_does_not_need_the_pod_network_it_sets_up() {
    holds(
        check_controller_deployment,
        &[(
            "    spec:\n      serviceAccountName: trellis-kube-controller\n      hostNetwork: true\n",
            "    spec:\n      serviceAccountName: trellis-kube-controller\n",
            "hostNetwork",
        )],
    );
}

const CONTAINERFILE: &str = include_str!("../../../manifests/Containerfile");

/// The image's build script as one line per `RUN` (continuations joined).
fn run_lines(containerfile: &str) -> Vec<String> {
    let joined = containerfile.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RUN "))
        .map(str::to_string)
        .collect()
}

/// The problems with how the image builds the plugin install-cni copies onto hosts: it must be
/// linked statically (the hosts' C library may be older than the image's: a bookworm build
/// needs glibc 2.34, RHEL 8 has 2.28), and the static build must be the one installed. The
/// static build itself (`RUSTFLAGS=-Ctarget-feature=+crt-static cargo build -p trellis-cni
/// --target x86_64-unknown-linux-gnu`) was checked by hand to link (no NSS use) and give a
/// static-pie executable.
fn check_plugin_build(containerfile: &str) -> Vec<String> {
    let lines = run_lines(containerfile);
    let Some(build) = lines.iter().find(|l| l.contains("-p trellis-cni")) else {
        return vec!["no RUN line builds trellis-cni".into()];
    };
    let mut p = Vec::new();
    let step = build
        .split("&&")
        .find(|s| s.contains("-p trellis-cni"))
        .unwrap_or_default();
    if !step.contains("+crt-static") || !step.contains("--target") {
        p.push(format!(
            "trellis-cni is not built statically (RUSTFLAGS with +crt-static and an explicit --target): {step:?}"
        ));
    }
    if !build.contains("\"target/$target/release/trellis-cni\"") {
        p.push(
            "the trellis-cni installed is not the static build's (target/$target/release)".into(),
        );
    }
    p
}

/// The plugin copied to hosts is a static executable (found by review: a dynamic one built on
/// bookworm fails to start on hosts with an older glibc, and with it every pod).
#[test]
fn the_image_builds_a_static_plugin_for_the_hosts() {
    let problems = check_plugin_build(CONTAINERFILE);
    assert!(problems.is_empty(), "{problems:#?}");
    for (from, to, needle) in [
        (
            "RUSTFLAGS=\"-C target-feature=+crt-static\" \\\n    ",
            "",
            "not built statically",
        ),
        (
            "\"target/$target/release/trellis-cni\"",
            "target/release/trellis-cni",
            "not the static build",
        ),
    ] {
        assert!(CONTAINERFILE.contains(from), "{from:?}");
        let problems = check_plugin_build(&CONTAINERFILE.replacen(from, to, 1));
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "{from:?} → {to:?}: {problems:#?}"
        );
    }
}

#[test]
fn every_container_command_line_parses_with_the_real_cli() {
    holds(
        check_all_cli,
        &[
            (
                "            - --metrics-listen=127.0.0.1:9091",
                "            - --metrics-listen=localhost",
                "does not parse",
            ),
            (
                "            - --lease-duration=15",
                "            - --lease-durration=15",
                "does not parse",
            ),
            (
                "          args: [install-cni, --host-root=/host]",
                "          args: [install-cni, --hostroot=/host]",
                "does not parse",
            ),
            (
                "            - name: TRELLIS_BGP\n",
                "            - name: TRELLIS_BGPX\n",
                "read by nothing",
            ),
            (
                "                  key: ip_autodetection_method",
                "                  key: ip_autodetect",
                "missing",
            ),
            (
                "            - --identity=$(POD_NAME)",
                "            - --identity=$(POD)",
                "no env variable",
            ),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_rbac_is_exactly_what_it_requests() {
    let seen = run_controller(&Manifest::new(MANIFEST)).await;
    let check = |m: &Manifest| check_rbac(m, &seen);
    holds(check, &[
        ("    verbs: [list, watch]\n  - apiGroups: [networking.k8s.io]", "    verbs: [list]\n  - apiGroups: [networking.k8s.io]", "not granted: watch \"\"/pods"),
        ("    resources: [networkpolicies]\n    verbs: [list, watch]", "    resources: [networkpolicies]\n    verbs: [list, watch, delete]", "granted but never used"),
        ("    resources: [clusternetworkpolicies]\n    verbs: [list, watch]", "    resources: [clusternetworkpolicies]\n    verbs: [list]", "not granted: watch \"policy.networking.k8s.io\"/clusternetworkpolicies"),
        ("    resources: [namespaces, pods, serviceaccounts, nodes]", "    resources: [namespaces, pods, serviceaccounts, nodes, secrets]", "granted but never used"),
        ("    resources: [namespaces, pods, serviceaccounts, nodes]", "    resources: [\"*\"]", "wildcard"),
        ("    verbs: [get, update]", "    verbs: [get]", "not granted: update"),
        ("    resourceNames: [trellis-kube-controller]\n", "    resourceNames: [other]\n", "not granted: get"),
        ("kind: RoleBinding\nmetadata:\n  name: trellis-kube-controller\n  namespace: kube-system", "kind: RoleBinding\nmetadata:\n  name: trellis-kube-controller\n  namespace: default", "not granted: create"),
        ("# this ServiceAccount is bound to no Role or ClusterRole, and its pods mount no token.\nautomountServiceAccountToken: false\n", "", "automountServiceAccountToken"),
        ("subjects:\n  - kind: ServiceAccount\n    name: trellis-kube-controller\n    namespace: kube-system\n---\n# Leader", "subjects:\n  - kind: ServiceAccount\n    name: trellis-node\n    namespace: kube-system\n---\n# Leader", "trellis-node is bound"),
    ]);
}

/// The agent with only the capabilities the manifest gives it (`setpriv` bounds the set, as a
/// container runtime does, and sets no_new_privs as `allowPrivilegeEscalation: false` does),
/// its flags and environment from the manifest (BGP on, so it binds port 179), in a network
/// namespace of its own: `/readyz` on the manifest's metrics address answers 200, the BGP
/// listener is bound, and the process's effective capabilities are exactly that set.
#[test]
fn the_agent_gets_ready_with_only_the_manifests_capabilities() {
    let m = Manifest::new(MANIFEST);
    let agent = &pod_spec_ds(m.daemonset()).containers[0];
    let (added, _) = capabilities(agent);
    let dir = trellis_testutil::temp_dir("kcap");
    let datastore = format!("sqlite:{}", dir.path().join("t.db").display());
    let pool = &m.config("trellis-config")["ippool.yaml"];
    let mut apply = Command::new(env!("CARGO_BIN_EXE_trellis"));
    apply.args(["--datastore", &datastore, "apply", "-f", "-"]);
    let out = trellis_testutil::spawn_with_input(&mut apply, pool)
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ns = trellis_testutil::TestNetns::new("kcap");
    ns.exec_ok(&[
        "ip", "link", "add", "upl0", "type", "veth", "peer", "name", "upl1",
    ]);
    ns.exec_ok(&["ip", "addr", "add", "192.0.2.10/24", "dev", "upl0"]);
    ns.exec_ok(&["ip", "link", "set", "upl0", "up"]);
    ns.exec_ok(&["ip", "link", "set", "upl1", "up"]);
    let mut env = environment(&m, agent).unwrap();
    env.insert("TRELLIS_DATASTORE".into(), datastore.clone());
    env.insert("TRELLIS_BGP".into(), "on".into());
    let socket = dir.path().join("agent.sock");
    let argv: Vec<String> = args(agent)
        .iter()
        .map(|a| expand(a, &env).unwrap())
        .map(|a| match a.starts_with("--socket=") {
            true => format!("--socket={}", socket.display()),
            false => a,
        })
        .collect();
    let listen = flag(&argv, "--metrics-listen").unwrap().to_string();
    let bounding: Vec<String> = added
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut agent_process = Child(
        ns.command("setpriv")
            .arg(format!("--bounding-set=-all,{}", bounding.join(",")))
            .args(["--inh-caps=-all", "--no-new-privs", "--"])
            .arg(env!("CARGO_BIN_EXE_trellis"))
            .args(&argv)
            .env_clear()
            .envs(&env)
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    loop {
        let out = ns.exec(&[
            "curl",
            "-s",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            &format!("http://{listen}/readyz"),
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // Ready, and the BGP listener bound (readiness counts sessions, and with no peer
        // configured there are none: the port shows whether it could bind 179).
        let bgp = ns.exec(&["ss", "-Hltn", "sport = :179"]).stdout;
        if text.ends_with("\n200") && text.contains("bgp") && !bgp.is_empty() {
            break;
        }
        let exited = agent_process.0.try_wait().unwrap();
        assert!(
            exited.is_none() && start.elapsed() < Duration::from_secs(60),
            "not ready (or no BGP listener) with capabilities {added:?}: {text}\nagent log:\n{}",
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The process really ran with that set and nothing else.
    // nsenter and setpriv exec what they run: the child is the agent itself.
    let pid = agent_process.0.id();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, Path::new(env!("CARGO_BIN_EXE_trellis")));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_string();
    // Bit numbers from linux/capability.h.
    let bit = |c: &str| match c {
        "NET_BIND_SERVICE" => 10,
        "NET_ADMIN" => 12,
        other => panic!("no bit number here for {other}"),
    };
    let want = added.iter().fold(0u64, |w, c| w | (1 << bit(c)));
    assert_eq!(
        u64::from_str_radix(&eff, 16).unwrap(),
        want,
        "CapEff of the agent"
    );
}
