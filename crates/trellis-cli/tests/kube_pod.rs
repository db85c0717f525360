//! A Kubernetes pod's endpoint is born with its labels: `trellis kube-controller` stores each
//! pod's record when the pod appears in the API server (here the in-tree test API server, a
//! test double), and the agent's ADD copies the record's labels into the endpoint it creates,
//! so a NetworkPolicy isolating the pod by label holds from the moment ADD returns — checked
//! with packets, and in the store's history of the endpoint. Agents run with `--kubernetes`:
//! an ADD whose pod has no record waits for it and fails naming the pod, and succeeds with the
//! pod's labels when the record arrives during the wait — also when the record there is an
//! earlier pod's of the same name (another UID). Run under the integration-test flock
//! (fixed namespace tags).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ip_of, reach, serve, Cluster};
use serde_json::{json, Value};
use trellis_kube_testapi::{TestApiServer, NAMESPACES, NETWORK_POLICIES, PODS};
use trellis_resources::{Kind, Resource};
use trellis_testutil::TestNetns;

const DEADLINE: Duration = Duration::from_secs(30);

/// A controller process, killed and reaped when dropped.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pod(name: &str, app: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": "node0", "containers": [{"name": "c", "image": "busybox"}]}
    })
}

/// Whether the store holds the record of pod `name` and the policy `name` (when given).
fn stored(rt: &tokio::runtime::Runtime, spec: &str, kind: Kind, name: &str) -> bool {
    rt.block_on(async {
        let store = trellis_store::open(spec).await.unwrap();
        trellis_cluster::objects::get(&*store, kind, Some("default"), name)
            .await
            .unwrap()
            .is_some()
    })
}

/// The labels pod `name`'s endpoint was created with: the first value of its key in the
/// store's history.
fn labels_at_birth(
    rt: &tokio::runtime::Runtime,
    spec: &str,
    name: &str,
) -> std::collections::BTreeMap<String, String> {
    rt.block_on(async {
        let store = trellis_store::open(spec).await.unwrap();
        let prefix = format!("{}default/", Kind::WorkloadEndpoint.prefix());
        let mut w = store.watch(&prefix, 1).await.unwrap();
        loop {
            let ev = tokio::time::timeout(DEADLINE, w.next())
                .await
                .expect("the endpoint's creation in the store's history")
                .unwrap()
                .unwrap();
            let Ok(v) = serde_json::from_slice::<Value>(&ev.value) else {
                continue; // a deletion
            };
            if v["spec"]["pod"] == name {
                match Resource::from_value(&v).unwrap() {
                    Resource::WorkloadEndpoint(w) => return w.metadata.labels,
                    other => panic!("{other:?}"),
                }
            }
        }
    })
}

/// A NetworkPolicy isolating `app=db` pods (no ingress allowed), synced from the API server;
/// the controller then stops, so whatever labels the db pod's endpoint has came with its ADD.
/// Probed at once and again right after ADD returns, the db pod is never reachable; a pod the
/// policy does not select is (the probe works).
#[test]
fn a_pod_isolated_by_label_is_never_reachable_after_its_add() {
    trellis_testutil::require_root();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApiServer::start());
    let c = Cluster::new_with("kpa", false, 1, &["--kubernetes"]);
    let kubeconfig = c.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    api.put(NAMESPACES, json!({"metadata": {"name": "default"}}));
    api.put(
        NETWORK_POLICIES,
        json!({"metadata": {"name": "isolate-db", "namespace": "default"},
               "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}}),
    );
    for (name, app) in [("kpaclient", "client"), ("kpadb", "db"), ("kpaweb", "web")] {
        api.put(PODS, pod(name, app));
    }
    let controller = Controller(
        Command::new(common::bin("trellis"))
            .args(["--datastore", &c.spec, "kube-controller", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--lease-duration", "2", "--renew-deadline", "1.4"])
            .args(["--retry-period", "0.2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("trellis kube-controller starts"),
    );
    let start = Instant::now();
    while !(stored(&rt, &c.spec, Kind::KubernetesNetworkPolicy, "isolate-db")
        && ["kpaclient", "kpadb", "kpaweb"]
            .iter()
            .all(|p| stored(&rt, &c.spec, Kind::Pod, p)))
    {
        assert!(start.elapsed() < DEADLINE, "the controller did not sync");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(controller);

    let (client, _) = c.add_pod(0, "kpaclient");
    let web = TestNetns::new("kpaweb");
    let _web_srv = serve(&web, "web", c.dir.path());
    let out = c.spawn_add(0, "kpaweb", &web).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ADD web: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let web_ip = ip_of(&out).unwrap().to_string();
    assert_eq!(reach(&client, &web_ip, "web"), "web\tok", "the probe works");

    let db = TestNetns::new("kpadb");
    let _db_srv = serve(&db, "db", c.dir.path());
    let out = c.spawn_add(0, "kpadb", &db).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ADD db: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let db_ip = ip_of(&out).unwrap().to_string();
    for i in 0..5 {
        assert_eq!(
            reach(&client, &db_ip, "db"),
            "db\tblocked",
            "probe {i} after ADD returned reached a pod its policy isolates"
        );
    }
    let labels = labels_at_birth(&rt, &c.spec, "kpadb");
    assert_eq!(
        labels.get("app").map(String::as_str),
        Some("db"),
        "{labels:?}"
    );
}

/// The labels of pod `name`'s endpoint now, if it has one.
fn endpoint_labels(c: &Cluster, name: &str) -> Option<Value> {
    let out = c.cli_ok(&["get", "workloadendpoints", "-A", "-o", "json"], None);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["items"]
        .as_array()?
        .iter()
        .find(|w| w["spec"]["pod"] == name)
        .map(|w| w["metadata"]["labels"].clone())
}

#[test]
fn kubernetes_mode_waits_for_the_pods_record() {
    trellis_testutil::require_root();
    let c = Cluster::new_with("kpb", false, 1, &["--kubernetes"]);

    // No record: ADD waits its 10 s, then fails naming the pod; nothing is left.
    let none = TestNetns::new("kpbnone");
    let started = Instant::now();
    let out = c.spawn_add(0, "kpbnone", &none).wait_with_output().unwrap();
    let waited = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "ADD without a record succeeded: {text}"
    );
    let err: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(err["code"], 11, "{text}");
    let msg = err["msg"].as_str().unwrap();
    assert!(msg.contains("pod default/kpbnone has no record"), "{msg}");
    assert!(waited >= Duration::from_secs(9), "gave up after {waited:?}");
    assert_eq!(endpoint_labels(&c, "kpbnone"), None, "an endpoint was left");

    // The record arrives while ADD waits: ADD succeeds, the endpoint born with its labels.
    let late = TestNetns::new("kpblate");
    let add = c.spawn_add(0, "kpblate", &late);
    let start = Instant::now();
    while !c
        .agent_log_all(0)
        .lines()
        .any(|l| l.contains("waiting for the pod's record") && l.contains("default/kpblate"))
    {
        assert!(
            start.elapsed() < DEADLINE,
            "ADD is not waiting: {}",
            c.agent_log(0)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.cli_ok(
        &["apply", "-f", "-"],
        Some("apiVersion: trellis.dev/v1\nkind: Pod\nmetadata: {name: kpblate, namespace: default, labels: {app: late}}\nspec: {nodeName: node0}\n"),
    );
    let out = add.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ADD: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(endpoint_labels(&c, "kpblate"), Some(json!({"app": "late"})));
}

/// A pod created again under its name on the same node (a new UID, CNI_ARGS `K8S_POD_UID`)
/// while the record is still the earlier pod's: ADD waits for the new pod's record instead of
/// giving the new pod the earlier one's labels, and its endpoint is born with the new labels.
#[test]
fn an_earlier_pods_record_is_not_taken_for_a_pod_of_the_same_name() {
    trellis_testutil::require_root();
    let c = Cluster::new_with("kpu", false, 1, &["--kubernetes"]);
    let record = |uid: &str, app: &str| {
        format!("apiVersion: trellis.dev/v1\nkind: Pod\nmetadata: {{name: kpure, namespace: default, uid: {uid}, labels: {{app: {app}}}}}\nspec: {{nodeName: node0}}\n")
    };
    c.cli_ok(&["apply", "-f", "-"], Some(&record("uid-old", "old")));
    let pod = TestNetns::new("kpure");
    let add = c.spawn_add_uid(0, "kpure", &pod, "uid-new");
    let start = Instant::now();
    while !c
        .agent_log_all(0)
        .lines()
        .any(|l| l.contains("waiting for the pod's record") && l.contains("default/kpure"))
    {
        assert!(
            start.elapsed() < DEADLINE,
            "ADD is not waiting for the new pod's record: {}",
            c.agent_log(0)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.cli_ok(&["apply", "-f", "-"], Some(&record("uid-new", "new")));
    let out = add.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ADD: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(endpoint_labels(&c, "kpure"), Some(json!({"app": "new"})));
}
