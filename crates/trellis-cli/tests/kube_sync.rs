//! `trellis kube-controller` as operators run it, against the in-tree test API server (a test
//! double) and etcd: objects arrive, two controllers elect one leader, and a leader killed with
//! SIGKILL is replaced once its Lease expires. Run under the integration-test flock (BRIEF).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use trellis_kube_testapi::{TestApiServer, LEASES, NAMESPACES};
use trellis_resources::{Kind, Resource};
use trellis_testutil::EtcdServer;

const DEADLINE: Duration = Duration::from_secs(30);

/// A controller process, killed (SIGKILL) and reaped when dropped.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn controller(datastore: &str, kubeconfig: &std::path::Path, identity: &str) -> Controller {
    let child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["--datastore", datastore, "kube-controller", "--kubeconfig"])
        .arg(kubeconfig)
        .args([
            "--identity",
            identity,
            "--lease-duration",
            "2",
            "--renew-deadline",
            "1.4",
        ])
        .args(["--retry-period", "0.2"])
        .env("TRELLIS_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("trellis kube-controller starts");
    Controller(child)
}

async fn team(store: &dyn trellis_store::Datastore, ns: &str) -> Option<String> {
    let s = trellis_cluster::objects::get(store, Kind::Namespace, None, ns)
        .await
        .unwrap()?;
    match s.resource {
        Resource::Namespace(n) => n.metadata.labels.get("team").cloned(),
        _ => None,
    }
}

async fn wait_team(store: &dyn trellis_store::Datastore, ns: &str, want: &str) {
    let start = Instant::now();
    loop {
        let got = team(store, ns).await;
        if got.as_deref() == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "namespace {ns}: team {got:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn holder(api: &TestApiServer) -> Option<String> {
    api.get(LEASES, "kube-system", "trellis-kube-controller")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

async fn wait_holder(api: &TestApiServer, want: &str) {
    let start = Instant::now();
    while holder(api).as_deref() != Some(want) {
        assert!(
            start.elapsed() < DEADLINE,
            "lease holder {:?}, want {want}",
            holder(api)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_syncs_into_etcd_and_a_killed_leader_is_replaced() {
    let etcd = EtcdServer::start();
    let datastore = format!("etcd:{}", etcd.endpoint);
    let store = trellis_store::open(&datastore).await.unwrap();
    let api = TestApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();

    api.put(
        NAMESPACES,
        json!({"metadata": {"name": "shop", "labels": {"team": "a"}}}),
    );
    let mut a = controller(&datastore, &kubeconfig, "a");
    wait_holder(&api, "a").await;
    wait_team(&*store, "shop", "a").await;
    let _b = controller(&datastore, &kubeconfig, "b");

    // SIGKILL: the leader never gets to give the Lease up; b must wait for it to expire.
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    api.put(
        NAMESPACES,
        json!({"metadata": {"name": "shop", "labels": {"team": "b"}}}),
    );
    wait_team(&*store, "shop", "b").await;
    assert_eq!(holder(&api).as_deref(), Some("b"));
}

#[test]
fn bad_flags_are_refused_naming_the_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["--datastore", "sqlite:/nonexistent/x.db", "kube-controller"])
        .args(["--lease-duration", "5", "--renew-deadline", "6"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--renew-deadline"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_gives_its_lease_up() {
    let dir = tempfile::tempdir().unwrap();
    let datastore = format!("sqlite:{}", dir.path().join("t.db").display());
    let api = TestApiServer::start().await;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let mut a = controller(&datastore, &kubeconfig, "a");
    wait_holder(&api, "a").await;
    let sent = Command::new("kill")
        .args(["-TERM", &a.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = a.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // Released before it exited: no successor has to wait for the lease to expire.
    assert_eq!(holder(&api), None);
}

/// `trellis ipam check` in Kubernetes mode: an address whose pod has no Pod record is a leak,
/// printed with how long kube-controller GC has seen it gone (text and JSON); the address of a
/// live pod is not. Without Kubernetes data, nothing of the kind is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipam_check_reports_addresses_of_pods_that_are_gone() {
    use trellis_cluster::ipam::{NodeIpam, Request};
    use trellis_resources::pod::PodSpec;
    use trellis_resources::{Metadata, Object};
    let dir = tempfile::tempdir().unwrap();
    let datastore = format!("sqlite:{}", dir.path().join("t.db").display());
    let store = trellis_store::open(&datastore).await.unwrap();
    let pool = "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.71.0.0/24, blockSize: 28}\n---\napiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: n1}\nspec: {}\n";
    for r in trellis_resources::parse_documents(pool).unwrap() {
        trellis_cluster::objects::apply(&*store, &r, false)
            .await
            .unwrap();
    }
    let req = |pod: &str| Request {
        network: "k8s".into(),
        container_id: format!("c-{pod}"),
        ifname: "eth0".into(),
        namespace: Some("a".into()),
        pod: Some(pod.into()),
        pod_uid: Some(format!("uid-{pod}")),
        ..Default::default()
    };
    let ipam = NodeIpam::new(store.clone(), "n1", Default::default());
    let gone_ip = ipam.allocate(&req("gone")).await.unwrap()[0].0;
    ipam.allocate(&req("live")).await.unwrap();
    let check = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["--datastore", &datastore, "ipam", "check"])
            .args(args)
            .output()
            .unwrap()
    };
    // No Kubernetes data: the plugin was used without the controller; nothing to judge by.
    let out = check(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let live = Object {
        metadata: Metadata {
            name: "live".into(),
            namespace: Some("a".into()),
            uid: Some("uid-live".into()),
            ..Default::default()
        },
        spec: PodSpec {
            node_name: Some("n1".into()),
            ..Default::default()
        },
        status: None,
    };
    trellis_cluster::objects::apply(&*store, &Resource::Pod(live), false)
        .await
        .unwrap();
    let out = check(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!("leaked address {gone_ip} of pod a/gone"))
            && text.contains("has not seen it gone yet")
            && !text.contains("pod a/live"),
        "{text}"
    );
    // What the leading controller's GC reports: seen gone 200 s ago, grace 300 s.
    let endpoint = trellis_resources::key_for(Kind::WorkloadEndpoint, Some("a"), "n1.c-gone.eth0");
    let now = trellis_cluster::now_secs();
    let status = trellis_kube::gc::GcStatus {
        updated: now,
        grace: 300,
        seen_gone_since: [(endpoint, now - 200)].into(),
    };
    store
        .txn(
            vec![],
            vec![trellis_store::TxnOp::Put(
                trellis_kube::gc::GC_STATUS_KEY.into(),
                serde_json::to_vec(&status).unwrap(),
            )],
        )
        .await
        .unwrap();
    let out = check(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("seen it gone for 3m2"), "{text}");
    let out = check(&["-o", "json"]);
    assert!(!out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let leaks = doc["podLeaks"].as_array().unwrap();
    assert_eq!(leaks.len(), 1, "{doc}");
    assert_eq!(leaks[0]["pod"], "gone");
    assert_eq!(leaks[0]["uid"], "uid-gone");
    assert_eq!(leaks[0]["addresses"][0], gone_ip.to_string());
    assert!(leaks[0]["seenGoneSecs"].as_u64().unwrap() >= 200, "{doc}");
    assert_eq!(doc["consistent"], false);
}
