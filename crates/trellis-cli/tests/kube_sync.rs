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
