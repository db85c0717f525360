//! Policy through the CLI, on SQLite and etcd: apply, get (-n/-A, both NetworkPolicy APIs),
//! `policy trace` and `policy show` (text, JSON, exit codes), `label` with kubectl's rules
//! (refusals change nothing), `delete` of a tier in use refused, `delete -f`; `--lab` and
//! `TRELLIS_LAB` reaching a lab's datastore (an etcd lab's from inside its control namespace);
//! and a pod added by the real CNI plugin found by `label pod` through its WorkloadEndpoint.
//! Run under the integration lock (fixed namespace tags).

mod common;

use std::process::{Command, Output};

use common::{bin, Cluster};
use serde_json::Value;

const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: red}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {team: blue}}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: a-eth0, namespace: x, labels: {app: a}}
spec: {node: n1, pod: a, ipNetworks: [10.0.0.1/32], ports: [{name: web, protocol: TCP, port: 8080}]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: b-eth0, namespace: x, labels: {app: b}}
spec: {node: n1, pod: b, ipNetworks: [10.0.0.2/32]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: c-eth0, namespace: y, labels: {app: c}}
spec: {node: n2, pod: c, ipNetworks: [10.0.1.3/32]}
---
apiVersion: trellis.dev/v1
kind: Node
metadata: {name: n1}
spec: {addresses: [{address: 172.16.0.1}]}
---
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: quarantine}
spec:
  tier: security
  order: 1
  selector: all()
  ingress:
  - {action: Deny, source: {selector: quarantine == 'true'}}
  - {action: Pass}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{port: web}]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: c-egress, namespace: y}
spec:
  selector: app == 'c'
  egress: [{action: Allow, protocol: UDP, destination: {ports: [53]}}]
"#;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every policy-related object, as `get -o json` prints it.
fn dump(c: &Cluster) -> String {
    let kinds = [
        "networkpolicies",
        "globalnetworkpolicies",
        "tiers",
        "namespaces",
        "workloadendpoints",
    ];
    kinds
        .iter()
        .map(|k| c.cli_ok(&["get", k, "-A", "-o", "json"], None))
        .collect::<Vec<_>>()
        .join("")
}

fn policy_cli(etcd: bool) {
    let c = Cluster::new(if etcd { "polce" } else { "polcs" }, etcd, 0);
    let out = c.cli_ok(&["apply", "-f", "-"], Some(WORLD));
    assert!(
        out.contains("NetworkPolicy.networking.k8s.io/a-from-b created"),
        "{out}"
    );
    // get: both APIs in one list; namespace `default` unless -n/-A.
    let out = c.cli_ok(&["get", "networkpolicies", "-A"], None);
    assert!(out.contains("API"), "{out}");
    assert!(
        out.contains("a-from-b") && out.contains("networking.k8s.io/v1"),
        "{out}"
    );
    assert!(
        out.contains("c-egress") && out.contains("trellis.dev/v1"),
        "{out}"
    );
    let out = c.cli(&["get", "networkpolicies"], None);
    assert!(
        text(&out).contains("No networkpolicies found"),
        "{}",
        text(&out)
    );
    let out = c.cli_ok(&["get", "networkpolicies", "-n", "y"], None);
    assert!(
        out.contains("c-egress") && !out.contains("a-from-b"),
        "{out}"
    );
    let out = c.cli_ok(&["get", "tiers"], None);
    assert!(out.contains("security") && out.contains("default"), "{out}");

    // trace: allowed (exit 0) through a Pass in tier security and the Kubernetes policy's
    // named port; denied (exit 1) on another port, with the rule's mismatch.
    let out = c.cli(&["policy", "trace", "x/b", "x/a", "--port", "8080"], None);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("passed to the next tier by rule 1 of gnp/quarantine"),
        "{t}"
    );
    assert!(
        t.contains("allowed by ingress rule 0 (Allow) of knp/x/a-from-b"),
        "{t}"
    );
    let out = c.cli(
        &["policy", "trace", "10.0.0.2", "10.0.0.1", "--port", "80"],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("destination.ports: port 80 is none of web (named)"),
        "{t}"
    );
    assert!(t.contains("verdict: DENIED (by ingress)"), "{t}");
    // Egress of y/c: UDP 53 only; a node's own pods are always reachable from it.
    let out = c.cli(
        &[
            "policy",
            "trace",
            "y/c",
            "8.8.8.8",
            "--protocol",
            "udp",
            "--port",
            "53",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = c.cli(
        &["policy", "trace", "y/c", "8.8.8.8", "--protocol", "icmp"],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let out = c.cli(
        &["policy", "trace", "172.16.0.1", "x/a", "--port", "80"],
        None,
    );
    assert!(text(&out).contains("its own node"), "{}", text(&out));
    // JSON.
    let out = c.cli(
        &[
            "policy", "trace", "x/b", "x/a", "--port", "8080", "-o", "json",
        ],
        None,
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["trace"]["allowed"], true);
    assert_eq!(v["trace"]["ingress"]["tiers"][0]["tier"], "security");
    // Bad arguments.
    let out = c.cli(&["policy", "trace", "x/nope", "x/a", "--port", "80"], None);
    assert!(
        text(&out).contains("no endpoint of pod x/nope"),
        "{}",
        text(&out)
    );
    let out = c.cli(&["policy", "trace", "x/b", "x/a"], None);
    assert!(text(&out).contains("--port is required"), "{}", text(&out));

    // show: in evaluation order.
    let out = c.cli_ok(&["policy", "show", "x/a"], None);
    let sec = out
        .find("1. gnp/quarantine")
        .unwrap_or_else(|| panic!("{out}"));
    let knp = out
        .find("2. knp/x/a-from-b")
        .unwrap_or_else(|| panic!("{out}"));
    assert!(sec < knp, "{out}");
    let v: Value =
        serde_json::from_str(&c.cli_ok(&["policy", "show", "x/a", "-o", "json"], None)).unwrap();
    assert_eq!(v["ingress"][1]["policies"][0]["policy"]["name"], "a-from-b");

    // label: a pod's endpoints; the quarantine policy now denies x/b.
    let out = c.cli_ok(&["label", "pod", "b", "-n", "x", "quarantine=true"], None);
    assert!(out.contains("WorkloadEndpoint/b-eth0 labeled"), "{out}");
    let out = c.cli(&["policy", "trace", "x/b", "x/a", "--port", "8080"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("denied by ingress rule 0 (Deny) of gnp/quarantine"),
        "{}",
        text(&out)
    );
    // Refusals change nothing: a value without --overwrite, the namespace's own label, a tier
    // in use, a pod that does not exist.
    let before = dump(&c);
    for (args, want) in [
        (
            vec!["label", "pod", "b", "-n", "x", "quarantine=false"],
            "--overwrite is false",
        ),
        (
            vec![
                "label",
                "namespace",
                "x",
                "kubernetes.io/metadata.name=z",
                "--overwrite",
            ],
            "set by the system",
        ),
        (vec!["label", "pod", "zz", "-n", "x", "a=b"], "not found"),
        (
            vec!["label", "pod", "b", "-n", "x", "bad key=v"],
            "label key",
        ),
        (
            vec!["delete", "tier", "security"],
            "still used by GlobalNetworkPolicy quarantine",
        ),
    ] {
        let out = c.cli(&args, None);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(want), "{args:?}: {}", text(&out));
        assert_eq!(dump(&c), before, "{args:?} changed the store");
    }
    c.cli_ok(
        &[
            "label",
            "pod",
            "b",
            "-n",
            "x",
            "quarantine=false",
            "--overwrite",
        ],
        None,
    );
    let out = c.cli_ok(
        &["label", "pod", "b", "-n", "x", "quarantine-", "nothere-"],
        None,
    );
    assert!(out.contains("label \"nothere\" not found."), "{out}");
    let out = c.cli_ok(&["label", "namespace", "y", "env=prod"], None);
    assert!(out.contains("Namespace/y labeled"), "{out}");
    assert!(c.cli_ok(&["get", "namespaces"], None).contains("env=prod"));

    // delete by name (a Kubernetes NetworkPolicy through `networkpolicy`), and delete -f.
    let out = c.cli_ok(&["delete", "networkpolicy", "a-from-b", "-n", "x"], None);
    assert!(
        out.contains("NetworkPolicy.networking.k8s.io a-from-b deleted"),
        "{out}"
    );
    let out = c.cli(&["delete", "-f", "-"], Some(WORLD));
    assert_eq!(out.status.code(), Some(1), "one object was already gone");
    assert!(
        text(&out).contains("a-from-b (namespace x) not found"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("Tier/security deleted"),
        "{}",
        text(&out)
    );
    assert!(c
        .cli_ok(&["get", "workloadendpoints", "-A"], None)
        .contains("No workloadendpoints"));
}

#[test]
fn policy_cli_sqlite() {
    policy_cli(false);
}

#[test]
fn policy_cli_etcd() {
    policy_cli(true);
}

/// A lab's state file naming a datastore (and a control namespace), removed on drop.
struct FakeLab(String);

impl FakeLab {
    fn new(name: &str, datastore: &str, control: Option<&str>) -> FakeLab {
        let dir = std::path::Path::new("/run/trellis/lab").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let namespaces = match control {
            Some(ns) => serde_json::json!({"control": ns}),
            None => serde_json::json!({}),
        };
        let state = serde_json::json!({"name": name, "datastore": datastore, "namespaces": namespaces,
            "pids": [], "node_ips": {}, "pod_ips": {}, "pod_nodes": {}, "external_ips": {}, "topology": null});
        std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
        FakeLab(name.into())
    }
}

impl Drop for FakeLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(std::path::Path::new("/run/trellis/lab").join(&self.0));
    }
}

fn trellis(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin("trellis"));
    c.args(args)
        .env_remove("TRELLIS_DATASTORE")
        .env_remove("TRELLIS_LAB");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

const TIER: &str = "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: from-lab}\n";

#[test]
fn lab_flag_reaches_the_labs_datastore() {
    // SQLite: the state file's datastore.
    let c = Cluster::new("pollabs", false, 0);
    let lab = FakeLab::new("pol-lab-sqlite", &c.spec, None);
    let f = c.dir.path().join("tier.yaml");
    std::fs::write(&f, TIER).unwrap();
    let out = trellis(&["--lab", &lab.0, "apply", "-f", f.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(c.cli_ok(&["get", "tiers"], None).contains("from-lab"));
    let out = trellis(&["get", "tiers"], &[("TRELLIS_LAB", &lab.0)]);
    assert!(text(&out).contains("from-lab"), "{}", text(&out));
    // A flag beats the environment; both flags are refused.
    let other = c.dir.path().join("other.db");
    let other = format!("sqlite:{}", other.display());
    let out = trellis(
        &["--datastore", &other, "get", "tiers"],
        &[("TRELLIS_LAB", &lab.0)],
    );
    assert!(!text(&out).contains("from-lab"), "{}", text(&out));
    let out = trellis(
        &["--lab", &lab.0, "get", "tiers"],
        &[("TRELLIS_DATASTORE", &other)],
    );
    assert!(text(&out).contains("from-lab"), "{}", text(&out));
    let out = trellis(
        &["--lab", &lab.0, "--datastore", &other, "get", "tiers"],
        &[],
    );
    assert!(text(&out).contains("not both"), "{}", text(&out));
    let out = trellis(&["--lab", "pol-lab-none", "get", "tiers"], &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("pol-lab-none"), "{}", text(&out));
}

#[test]
fn lab_flag_enters_an_etcd_labs_control_namespace() {
    // etcd listens on the control namespace's bridge address only: the command must run there.
    let c = Cluster::new("pollabe", true, 0);
    let ctl = c.control.as_ref().unwrap().name().to_string();
    let lab = FakeLab::new("pol-lab-etcd", &c.spec, Some(&ctl));
    let f = c.dir.path().join("tier.yaml");
    std::fs::write(&f, TIER).unwrap();
    let out = trellis(&["--lab", &lab.0, "apply", "-f", f.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("Tier/from-lab created"),
        "{}",
        text(&out)
    );
    let out = trellis(&["get", "tiers"], &[("TRELLIS_LAB", &lab.0)]);
    assert!(text(&out).contains("from-lab"), "{}", text(&out));
    // Exit codes come back from inside.
    let out = trellis(&["--lab", &lab.0, "get", "tiers", "nope"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

/// The real plugin records the pod's namespace and name on its WorkloadEndpoint, so `label
/// pod` finds it.
#[test]
fn label_finds_a_pod_added_by_the_plugin() {
    let c = Cluster::new("pollbl", false, 1);
    let (_pod, ip) = c.add_pod(0, "pollblpod");
    let v: Value = serde_json::from_str(&c.cli_ok(
        &["get", "workloadendpoints", "-n", "default", "-o", "json"],
        None,
    ))
    .unwrap();
    let wep = &v["items"][0];
    assert_eq!(wep["metadata"]["namespace"], "default");
    assert_eq!(wep["spec"]["pod"], "pollblpod");
    let out = c.cli_ok(&["label", "pod", "pollblpod", "app=web"], None);
    assert!(out.contains("labeled"), "{out}");
    let out = c.cli_ok(&["get", "workloadendpoints"], None);
    assert!(
        out.contains("app=web") && out.contains(&ip.to_string()),
        "{out}"
    );
    let out = c.cli_ok(&["policy", "show", "default/pollblpod"], None);
    assert!(out.contains(&ip.to_string()), "{out}");
}
