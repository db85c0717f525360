//! The test double itself, through the real kube client: it answers as the API server does
//! where the controller relies on it (409 on a stale write, 410 Expired on a compacted resume,
//! 404 Status, bookmarks).

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{PostParams, WatchEvent, WatchParams};
use kube::Api;
use serde_json::json;
use trellis_kube_testapi::{TestApiServer, NAMESPACES};

async fn client(api: &TestApiServer) -> kube::Client {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, api.kubeconfig()).unwrap();
    trellis_kube::controller::client(Some(&path)).await.unwrap()
}

fn status_of(r: Result<Lease, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone()),
        other => panic!("expected a Status error, got {other:?}"),
    }
}

#[tokio::test]
async fn leases_conflict_as_the_api_server_does() {
    let api = TestApiServer::start().await;
    let leases: Api<Lease> = Api::namespaced(client(&api).await, "kube-system");
    let mut l: Lease =
        serde_json::from_value(json!({"metadata": {"name": "x"}, "spec": {"holderIdentity": "a"}}))
            .unwrap();
    let created = leases.create(&PostParams::default(), &l).await.unwrap();
    assert_eq!(
        status_of(leases.create(&PostParams::default(), &l).await),
        (409, "AlreadyExists".into())
    );
    l.metadata.resource_version = created.metadata.resource_version.clone();
    leases
        .replace("x", &PostParams::default(), &l)
        .await
        .unwrap();
    // The version read before that replace is stale now.
    assert_eq!(
        status_of(leases.replace("x", &PostParams::default(), &l).await),
        (409, "Conflict".into())
    );
    assert_eq!(
        status_of(leases.get("nope").await),
        (404, "NotFound".into())
    );
}

#[tokio::test]
async fn a_resume_from_a_compacted_version_gets_410_expired_and_watches_carry_bookmarks() {
    let api = TestApiServer::start().await;
    let nss: Api<Namespace> = Api::all(client(&api).await);
    let rv = api.put(NAMESPACES, json!({"metadata": {"name": "a"}}));
    api.put(NAMESPACES, json!({"metadata": {"name": "b"}}));
    let wp = WatchParams::default().timeout(10);
    let mut w = nss.watch(&wp, &rv.to_string()).await.unwrap().boxed();
    match w.next().await.unwrap().unwrap() {
        WatchEvent::Added(n) => assert_eq!(n.metadata.name.as_deref(), Some("b")),
        other => panic!("{other:?}"),
    }
    let WatchEvent::Bookmark(bookmark) = w.next().await.unwrap().unwrap() else {
        panic!("expected a bookmark")
    };
    assert_eq!(bookmark.metadata.resource_version, (rv + 1).to_string());
    api.compact();
    let mut w = nss.watch(&wp, &rv.to_string()).await.unwrap().boxed();
    match w.next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("{other:?}"),
    }
}
