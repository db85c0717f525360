//! A pod's record (kind `Pod`, written by the kube-controller) and the allocator: the endpoint
//! an ADD creates is born with the pod's labels, service account and named ports — in the
//! revision that creates it, read back from the store's history — the commit is guarded by the
//! record's revision (a stale copy of the record is never what the endpoint carries), a record
//! of the same name on another node is not this pod's, and in Kubernetes mode an ADD without
//! a record creates nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{apply, node_yaml, pool_yaml, req};
use trellis_cluster::ipam::{NodeIpam, PodRecords};
use trellis_cluster::objects::{self, decode, Stored};
use trellis_cluster::ClusterError;
use trellis_resources::{key_for, Kind, Resource};
use trellis_store::{Datastore, KeyValue};

fn pod_yaml(name: &str, node: &str, app: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\nspec: {{nodeName: {node}, serviceAccountName: db, ports: [{{name: pg, protocol: TCP, port: 5432}}]}}\n"
    )
}

/// The first value the store ever held at `key` (its creating revision), from its history.
async fn first_value(store: &dyn Datastore, key: &str) -> Resource {
    let mut w = store.watch(key, 1).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("the key's history")
        .unwrap()
        .unwrap();
    assert_eq!(ev.key, key);
    decode(&KeyValue {
        key: ev.key.clone(),
        value: ev.value,
        create_revision: ev.revision,
        mod_revision: ev.revision,
    })
    .unwrap()
    .resource
}

async fn setup() -> (Arc<dyn Datastore>, common::Backing) {
    let (store, backing) = common::sqlite().await;
    apply(&*store, &pool_yaml("pool", "10.83.0.0/16", 26)).await;
    apply(&*store, &node_yaml("n1")).await;
    (store, backing)
}

fn endpoint_key(r: &trellis_cluster::ipam::Request) -> String {
    key_for(
        Kind::WorkloadEndpoint,
        Some("default"),
        &trellis_cluster::ipam::endpoint_name("n1", r),
    )
}

#[tokio::test]
async fn the_endpoint_is_born_with_its_pods_labels() {
    let (store, _b) = setup().await;
    let r = req("n1", 1);
    apply(&*store, &pod_yaml("p1", "n1", "db")).await;
    let ipam = NodeIpam::new(store.clone(), "n1", Default::default());
    ipam.allocate(&r).await.unwrap();
    let Resource::WorkloadEndpoint(w) = first_value(&*store, &endpoint_key(&r)).await else {
        panic!("not an endpoint")
    };
    assert_eq!(w.metadata.labels.get("app").map(String::as_str), Some("db"));
    assert_eq!(w.spec.service_account_name.as_deref(), Some("db"));
    assert_eq!(w.spec.ports[0].name, "pg");

    // A record of that name on another node is an earlier pod's: not copied.
    let r2 = req("n1", 2);
    apply(&*store, &pod_yaml("p2", "n9", "db")).await;
    ipam.allocate(&r2).await.unwrap();
    let Resource::WorkloadEndpoint(w) = first_value(&*store, &endpoint_key(&r2)).await else {
        panic!("not an endpoint")
    };
    assert!(w.metadata.labels.is_empty(), "{:?}", w.metadata.labels);
}

/// A reader whose copy of the record is stale (the agent's view lagging behind an update).
struct Stale(Stored);

impl PodRecords for Stale {
    fn pod_record(&self, _key: &str) -> Option<Stored> {
        Some(self.0.clone())
    }
}

#[tokio::test]
async fn a_stale_copy_of_the_record_is_never_what_the_endpoint_carries() {
    let (store, _b) = setup().await;
    apply(&*store, &pod_yaml("p1", "n1", "web")).await;
    let old = objects::get(&*store, Kind::Pod, Some("default"), "p1")
        .await
        .unwrap()
        .unwrap();
    // The pod's labels changed after the reader's copy.
    apply(&*store, &pod_yaml("p1", "n1", "db")).await;
    let ipam = NodeIpam::new(store.clone(), "n1", Default::default())
        .with_pod_records(Arc::new(Stale(old)), false);
    let r = req("n1", 1);
    ipam.allocate(&r).await.unwrap();
    let Resource::WorkloadEndpoint(w) = first_value(&*store, &endpoint_key(&r)).await else {
        panic!("not an endpoint")
    };
    assert_eq!(
        w.metadata.labels.get("app").map(String::as_str),
        Some("db"),
        "the commit took the stale record's labels"
    );
}

/// Nothing seen by the reader (the agent's view has not heard of the record yet).
struct Blind;

impl PodRecords for Blind {
    fn pod_record(&self, _key: &str) -> Option<Stored> {
        None
    }
}

#[tokio::test]
async fn kubernetes_mode_creates_no_endpoint_without_the_pods_record() {
    let (store, _b) = setup().await;
    let ipam = NodeIpam::new(store.clone(), "n1", Default::default())
        .with_pod_records(Arc::new(Blind), true);
    let r = req("n1", 1);
    let e = ipam
        .allocate(&r)
        .await
        .expect_err("allocated without a record");
    assert!(
        matches!(&e, ClusterError::PodNotSynced { namespace, pod, .. } if namespace == "default" && pod == "p1"),
        "{e}"
    );
    assert!(e.to_string().contains("default/p1"), "{e}");
    assert!(store.get(&endpoint_key(&r)).await.unwrap().is_none());
    assert!(
        ipam.held(&r).await.unwrap().is_none(),
        "an address was kept"
    );
    // The reader has not seen the record, the store has: it is read there.
    apply(&*store, &pod_yaml("p1", "n1", "db")).await;
    ipam.allocate(&r).await.unwrap();
    let Resource::WorkloadEndpoint(w) = first_value(&*store, &endpoint_key(&r)).await else {
        panic!("not an endpoint")
    };
    assert_eq!(w.metadata.labels.get("app").map(String::as_str), Some("db"));
    // Outside Kubernetes mode an attachment without a record gets today's endpoint.
    let plain = NodeIpam::new(store.clone(), "n1", Default::default())
        .with_pod_records(Arc::new(Blind), false);
    let r3 = req("n1", 3);
    plain.allocate(&r3).await.unwrap();
    assert!(store.get(&endpoint_key(&r3)).await.unwrap().is_some());
}

/// The pod's IPAM annotations, carried by its record: `ipv4pools` picks the pool, `ipAddrs` the
/// address.
#[tokio::test]
async fn the_pods_ipam_annotations_choose_pool_and_address() {
    let (store, _b) = setup().await;
    apply(&*store, &pool_yaml("other", "10.84.0.0/16", 26)).await;
    apply(
        &*store,
        "apiVersion: trellis.dev/v1\nkind: Pod\nmetadata: {name: p1, namespace: default}\nspec: {nodeName: n1, ipv4Pools: [other]}\n",
    )
    .await;
    apply(
        &*store,
        "apiVersion: trellis.dev/v1\nkind: Pod\nmetadata: {name: p2, namespace: default}\nspec: {nodeName: n1, ipAddrs: [10.83.7.9]}\n",
    )
    .await;
    let ipam = NodeIpam::new(store.clone(), "n1", Default::default());
    let got = ipam.allocate(&req("n1", 1)).await.unwrap();
    assert!(
        "10.84.0.0/16"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&got[0].0),
        "{got:?}"
    );
    let got = ipam.allocate(&req("n1", 2)).await.unwrap();
    assert_eq!(got[0].0, "10.83.7.9".parse::<std::net::IpAddr>().unwrap());
}

fn labelled_node(rack: &str) -> String {
    format!("apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {{name: n1, labels: {{rack: {rack}}}}}\nspec: {{}}\n")
}

/// Two pools, each selecting one rack by node label: `rack-a` 10.84.0.0/16, `rack-b`
/// 10.85.0.0/16 (no pool without a selector).
async fn rack_setup() -> (Arc<dyn Datastore>, common::Backing) {
    let (store, backing) = common::sqlite().await;
    for (name, cidr, rack) in [
        ("rack-a", "10.84.0.0/16", "a"),
        ("rack-b", "10.85.0.0/16", "b"),
    ] {
        apply(
            &*store,
            &format!("apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{cidr: {cidr}, blockSize: 26, nodeSelector: \"rack == '{rack}'\"}}\n"),
        )
        .await;
    }
    (store, backing)
}

/// A pool's nodeSelector matches the node's stored labels (the ones the kube-controller
/// mirrors from the Kubernetes Node, as Calico does), not only the agent's `--label`s; the
/// agent's own label for a key wins over the stored one.
#[tokio::test]
async fn pool_node_selectors_match_the_nodes_stored_labels() {
    let (store, _b) = rack_setup().await;
    apply(&*store, &labelled_node("a")).await;
    let ipam = NodeIpam::new(store.clone(), "n1", Default::default())
        .with_pod_records(Arc::new(Blind), false);
    let got = ipam
        .allocate(&req("n1", 1))
        .await
        .expect("a pool selects the node");
    assert!(
        "10.84.0.0/16"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&got[0].0),
        "{got:?}"
    );
    // The label changes (the Kubernetes Node was relabelled): the next ADD follows it.
    apply(&*store, &labelled_node("b")).await;
    let got = ipam.allocate(&req("n1", 2)).await.unwrap();
    assert!(
        "10.85.0.0/16"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&got[0].0),
        "{got:?}"
    );
    // An agent started with --label rack=a keeps rack a, whatever the record says.
    let agent_set = [("rack".to_string(), "a".to_string())].into();
    let ipam = NodeIpam::new(store.clone(), "n1", agent_set);
    let got = ipam.allocate(&req("n1", 3)).await.unwrap();
    assert!(
        "10.84.0.0/16"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&got[0].0),
        "{got:?}"
    );
}

/// A reader whose copy of the node's record is stale; it has seen no pod.
struct StaleNode(Stored);

impl PodRecords for StaleNode {
    fn pod_record(&self, key: &str) -> Option<Stored> {
        (key == self.0.resource.key()).then(|| self.0.clone())
    }
}

/// The pool choice read the node's labels, so the commit is guarded by the node's record: a
/// stale copy (rack a) of a node relabelled meanwhile (rack b) never places the pod in rack a's
/// pool.
#[tokio::test]
async fn a_stale_copy_of_the_nodes_labels_never_chooses_the_pool() {
    let (store, _b) = rack_setup().await;
    apply(&*store, &labelled_node("a")).await;
    let old = objects::get(&*store, Kind::Node, None, "n1")
        .await
        .unwrap()
        .unwrap();
    apply(&*store, &labelled_node("b")).await;
    let ipam = NodeIpam::new(store.clone(), "n1", Default::default())
        .with_pod_records(Arc::new(StaleNode(old)), false);
    let got = ipam.allocate(&req("n1", 1)).await.unwrap();
    assert!(
        "10.85.0.0/16"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&got[0].0),
        "allocated from the stale labels' pool: {got:?}"
    );
}

fn pod_with_uid(uid: &str, app: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1\nkind: Pod\nmetadata: {{name: p1, namespace: default, uid: {uid}, labels: {{app: {app}}}}}\nspec: {{nodeName: n1}}\n"
    )
}

/// A pod deleted and created again under its name on the same node (a StatefulSet's) has a new
/// UID; while the record is still the old pod's, its labels are not the new pod's: in
/// Kubernetes mode the ADD waits (error 11) rather than give the new pod the old one's labels,
/// outside it the endpoint gets none. A runtime that gives no UID, or a record without one,
/// matches by name as before.
#[tokio::test]
async fn a_record_of_an_earlier_pod_with_the_same_name_is_not_the_new_pods() {
    let (store, _b) = setup().await;
    apply(&*store, &pod_with_uid("uid-old", "open")).await;
    let with_uid = |i: usize, uid: Option<&str>| trellis_cluster::ipam::Request {
        pod: Some("p1".into()),
        pod_uid: uid.map(str::to_string),
        ..req("n1", i)
    };
    let kube = NodeIpam::new(store.clone(), "n1", Default::default())
        .with_pod_records(Arc::new(Blind), true);
    let e = kube
        .allocate(&with_uid(1, Some("uid-new")))
        .await
        .expect_err("the old pod's record was taken for the new pod");
    assert!(matches!(e, ClusterError::PodNotSynced { .. }), "{e}");

    let plain = NodeIpam::new(store.clone(), "n1", Default::default());
    let r = with_uid(2, Some("uid-new"));
    plain.allocate(&r).await.unwrap();
    let Resource::WorkloadEndpoint(w) = first_value(&*store, &endpoint_key(&r)).await else {
        panic!("not an endpoint")
    };
    assert!(w.metadata.labels.is_empty(), "{:?}", w.metadata.labels);

    // The new pod's record arrives: its labels are the endpoint's.
    apply(&*store, &pod_with_uid("uid-new", "locked")).await;
    let r = with_uid(3, Some("uid-new"));
    kube.allocate(&r).await.unwrap();
    let Resource::WorkloadEndpoint(w) = first_value(&*store, &endpoint_key(&r)).await else {
        panic!("not an endpoint")
    };
    assert_eq!(w.metadata.labels["app"], "locked");
    // No UID from the runtime: matched by name.
    let r = with_uid(4, None);
    kube.allocate(&r).await.unwrap();
    let Resource::WorkloadEndpoint(w) = first_value(&*store, &endpoint_key(&r)).await else {
        panic!("not an endpoint")
    };
    assert_eq!(w.metadata.labels["app"], "locked");
}
