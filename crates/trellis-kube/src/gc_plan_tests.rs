//! Golden tests of the GC planner: grace, two observations, UID mismatch, the shrink guard,
//! untrusted views, node candidates.

use super::*;
use trellis_cluster::snapshot::Read;
use trellis_resources::{key_for, IpamHandleSpec, Kind, Metadata, Object, WorkloadEndpointSpec};

const MIN: Duration = Duration::from_secs(60);

fn cfg() -> GcConfig {
    GcConfig {
        grace: 5 * MIN,
        interval: MIN,
        max_shrink: 0.5,
        enabled: true,
    }
}

/// An endpoint of pod `ns/pod` on `node` (container `cid`, pod UID `uid`) and its handle.
fn add(snap: &mut Snapshot, ns: &str, pod: &str, node: &str, cid: &str, uid: Option<&str>) {
    let name = format!("{node}.{cid}.eth0");
    let key = key_for(Kind::WorkloadEndpoint, Some(ns), &name);
    let handle = format!("k8s.{cid}.eth0");
    let mut meta = Metadata {
        name: name.clone(),
        namespace: Some(ns.into()),
        ..Default::default()
    };
    meta.annotations
        .insert(HANDLE_ANNOTATION.into(), handle.clone());
    if let Some(u) = uid {
        meta.annotations.insert(POD_UID_ANNOTATION.into(), u.into());
    }
    let rev = 10 + snap.endpoints.len() as i64;
    snap.endpoints.insert(
        key.clone(),
        Read {
            object: Object {
                metadata: meta,
                spec: WorkloadEndpointSpec {
                    node: node.into(),
                    pod: Some(pod.into()),
                    container_id: Some(cid.into()),
                    ..Default::default()
                },
                status: None,
            },
            key: key.clone(),
            rev,
        },
    );
    snap.insert_read_handle(Read {
        object: Object {
            metadata: Metadata {
                name: handle.clone(),
                ..Default::default()
            },
            spec: IpamHandleSpec {
                handle_id: handle.clone(),
                block: BTreeMap::new(),
                endpoint: Some(key),
            },
            status: None,
        },
        key: key_for(Kind::IpamHandle, None, &handle),
        rev: rev + 100,
    });
}

fn pod(uid: &str, node: Option<&str>) -> Identity {
    Identity {
        uid: Some(uid.into()),
        node: node.map(str::to_string),
        mirror_of: None,
    }
}

struct World {
    pods: BTreeMap<String, Identity>,
    nodes: BTreeMap<String, Identity>,
    pods_trust: Trust,
    nodes_trust: Trust,
    snap: Snapshot,
    stored: BTreeMap<String, StoredNode>,
}

impl World {
    fn new() -> World {
        World {
            pods: BTreeMap::new(),
            nodes: [("n1".to_string(), Identity::default())].into(),
            pods_trust: Trust::Complete { epoch: 1 },
            nodes_trust: Trust::Complete { epoch: 1 },
            snap: Snapshot::default(),
            stored: BTreeMap::new(),
        }
    }

    fn pass(&self, st: &mut GcState, now: Instant) -> Decision {
        let view = View {
            pods: &self.pods,
            pods_trust: &self.pods_trust,
            nodes: &self.nodes,
            nodes_trust: &self.nodes_trust,
        };
        st.observe(&cfg(), now, view, &self.snap, &self.stored)
    }
}

fn due_pods(d: &Decision) -> Vec<&str> {
    d.pods.iter().map(|p| p.attachment.pod.as_str()).collect()
}

#[test]
fn an_address_is_due_only_after_two_observations_and_the_grace_period() {
    let mut w = World::new();
    add(&mut w.snap, "a", "gone", "n1", "c1", Some("u1"));
    add(&mut w.snap, "a", "live", "n1", "c2", Some("u2"));
    w.pods.insert("a/live".into(), pod("u2", Some("n1")));
    let t0 = Instant::now();
    let mut st = GcState::default();
    // First sighting: pending, never due — whatever the grace says.
    let d = w.pass(&mut st, t0);
    assert!(d.pods.is_empty());
    assert_eq!(d.pending.len(), 1, "{d:?}");
    // A second pass at the same moment (or less than half an interval later) is not a second
    // observation: even past the grace period it stays pending.
    let d = w.pass(&mut st, t0 + MIN / 4);
    assert_eq!(d.pending[0].observations, 1);
    // Second observation, but the grace period has not passed.
    let d = w.pass(&mut st, t0 + MIN);
    assert!(d.pods.is_empty());
    assert_eq!(d.pending[0].observations, 2);
    let d = w.pass(&mut st, t0 + 5 * MIN);
    assert_eq!(due_pods(&d), ["gone"]);
    assert_eq!(d.pods[0].absent_for, 5 * MIN);
}

#[test]
fn two_observations_a_grace_period_apart_suffice_and_a_restart_counts_again() {
    // First seen at t0, next pass an hour later (a controller that was busy): two sightings,
    // the grace period passed.
    let mut w = World::new();
    add(&mut w.snap, "a", "gone", "n1", "c1", None);
    let t0 = Instant::now();
    let mut st = GcState::default();
    assert!(w.pass(&mut st, t0).pods.is_empty());
    let d = w.pass(&mut st, t0 + 60 * MIN);
    assert_eq!(due_pods(&d), ["gone"], "two observations, grace passed");
    // A fresh state (a restarted controller) starts again.
    let mut st = GcState::default();
    assert!(w.pass(&mut st, t0 + 61 * MIN).pods.is_empty());
    assert!(w.pass(&mut st, t0 + 62 * MIN).pods.is_empty());
    assert_eq!(due_pods(&w.pass(&mut st, t0 + 66 * MIN)), ["gone"]);
}

#[test]
fn a_pod_recreated_under_the_same_name_protects_only_its_own_address() {
    let mut w = World::new();
    // The old pod's endpoint (UID u1) and the new pod's (UID u2), same name, same node.
    add(&mut w.snap, "a", "web-0", "n1", "old", Some("u1"));
    add(&mut w.snap, "a", "web-0", "n1", "new", Some("u2"));
    w.pods.insert("a/web-0".into(), pod("u2", Some("n1")));
    let t0 = Instant::now();
    let mut st = GcState::default();
    for i in 0..=5 {
        w.pass(&mut st, t0 + i * MIN);
    }
    let d = w.pass(&mut st, t0 + 6 * MIN);
    assert_eq!(d.pods.len(), 1, "{d:?}");
    assert_eq!(d.pods[0].attachment.uid.as_deref(), Some("u1"));
    // And the re-check judges the same way.
    let old = &d.pods[0].attachment;
    assert!(confirm_pod(old, &w.pods, w.pods.get("a/web-0")));
    let new = attachments(&w.snap)
        .into_iter()
        .find(|a| a.uid.as_deref() == Some("u2"))
        .unwrap();
    assert!(!confirm_pod(&new, &w.pods, None), "the fresh list has it");
    assert!(
        !confirm_pod(&new, &BTreeMap::new(), w.pods.get("a/web-0")),
        "the GET has it"
    );
}

#[test]
fn without_a_uid_the_pod_of_that_name_on_the_same_node_protects_it() {
    let mut w = World::new();
    w.nodes.insert("n2".into(), Identity::default());
    add(&mut w.snap, "a", "here", "n1", "c1", None);
    add(&mut w.snap, "a", "moved", "n1", "c2", None);
    add(&mut w.snap, "a", "pending", "n1", "c3", None);
    w.pods.insert("a/here".into(), pod("x", Some("n1")));
    w.pods.insert("a/moved".into(), pod("y", Some("n2")));
    w.pods.insert("a/pending".into(), pod("z", None));
    let t0 = Instant::now();
    let mut st = GcState::default();
    w.pass(&mut st, t0);
    w.pass(&mut st, t0 + MIN);
    let d = w.pass(&mut st, t0 + 5 * MIN);
    let mut due = due_pods(&d);
    due.sort();
    assert_eq!(due, ["moved", "pending"]);
}

#[test]
fn an_empty_list_refuses_the_pass_and_counting_starts_again() {
    let mut w = World::new();
    add(&mut w.snap, "a", "gone", "n1", "c0", Some("u0"));
    for i in 1..=10 {
        let name = format!("p{i}");
        add(
            &mut w.snap,
            "a",
            &name,
            "n1",
            &format!("c{i}"),
            Some(&format!("u{i}")),
        );
        w.pods
            .insert(format!("a/{name}"), pod(&format!("u{i}"), Some("n1")));
    }
    let t0 = Instant::now();
    let mut st = GcState::default();
    w.pass(&mut st, t0);
    w.pass(&mut st, t0 + MIN);
    // The API server briefly answers an empty list (a relist: a new epoch).
    let full = std::mem::take(&mut w.pods);
    w.pods_trust = Trust::Complete { epoch: 2 };
    let d = w.pass(&mut st, t0 + 5 * MIN);
    assert!(d.pods.is_empty(), "{d:?}");
    assert!(
        d.refused.iter().any(|r| r.contains("shrank from 10 to 0")),
        "{d:?}"
    );
    // It answers properly again: the old candidate starts from scratch.
    w.pods = full;
    w.pods_trust = Trust::Complete { epoch: 3 };
    let d = w.pass(&mut st, t0 + 6 * MIN);
    assert!(d.pods.is_empty() && d.refused.is_empty(), "{d:?}");
    assert_eq!(d.pending[0].observations, 1);
    assert!(w.pass(&mut st, t0 + 7 * MIN).pods.is_empty());
    assert_eq!(due_pods(&w.pass(&mut st, t0 + 11 * MIN)), ["gone"]);
}

#[test]
fn an_untrusted_view_observes_nothing_and_forgets() {
    let mut w = World::new();
    add(&mut w.snap, "a", "gone", "n1", "c1", Some("u1"));
    let t0 = Instant::now();
    let mut st = GcState::default();
    w.pass(&mut st, t0);
    w.pass(&mut st, t0 + MIN);
    w.pods_trust = Trust::Untrusted("relisting".into());
    let d = w.pass(&mut st, t0 + 5 * MIN);
    assert!(d.pods.is_empty() && d.pending.is_empty());
    assert!(d.refused[0].contains("relisting"), "{d:?}");
    w.pods_trust = Trust::Complete { epoch: 1 };
    assert!(w.pass(&mut st, t0 + 6 * MIN).pods.is_empty());
    // A watch error between passes (a new epoch, same size) also starts the count again.
    assert!(w.pass(&mut st, t0 + 7 * MIN).pods.is_empty());
    w.pods_trust = Trust::Complete { epoch: 2 };
    let d = w.pass(&mut st, t0 + 20 * MIN);
    assert!(d.pods.is_empty());
    assert_eq!(d.pending[0].observations, 1);
}

#[test]
fn a_small_shrink_is_trusted_and_a_large_one_only_once() {
    assert!(fresh_list_ok(10, 6, 0.5).is_ok());
    assert!(fresh_list_ok(10, 4, 0.5).is_err());
    // Losing one pod is always believable (a cluster of two pods losing one).
    assert!(fresh_list_ok(2, 1, 0.5).is_ok());
    assert!(fresh_list_ok(2, 0, 0.5).is_err());
    assert!(fresh_list_ok(0, 0, 0.5).is_ok());
}

#[test]
fn endpoints_on_nodes_kubernetes_does_not_know_are_not_judged() {
    let mut w = World::new();
    add(&mut w.snap, "a", "gone", "elsewhere", "c1", Some("u1"));
    let t0 = Instant::now();
    let mut st = GcState::default();
    for i in 0..10 {
        let d = w.pass(&mut st, t0 + i * MIN);
        assert!(d.pods.is_empty() && d.pending.is_empty(), "{d:?}");
    }
}

#[test]
fn a_node_gone_from_kubernetes_is_due_after_grace_unless_it_returns() {
    let mut w = World::new();
    let synced = |rev| StoredNode {
        rev,
        from_kubernetes: true,
    };
    w.stored.insert("n1".into(), synced(5));
    w.stored.insert("n2".into(), synced(6));
    // Registered by an agent, never synced from Kubernetes: never deleted here.
    w.stored.insert(
        "lab".into(),
        StoredNode {
            rev: 7,
            from_kubernetes: false,
        },
    );
    w.snap.nodes = ["n1", "n2", "lab"].map(String::from).into();
    // An affinity of a node with no record at all (a release interrupted after the delete).
    w.snap.affinities.insert(
        "n3-10-0-0-0-26".into(),
        Read {
            object: Object {
                metadata: Metadata {
                    name: "n3-10-0-0-0-26".into(),
                    ..Default::default()
                },
                spec: trellis_resources::BlockAffinitySpec {
                    state: trellis_resources::AffinityState::Confirmed,
                    node: "n3".into(),
                    cidr: "10.0.0.0/26".parse().unwrap(),
                },
                status: None,
            },
            key: "k".into(),
            rev: 9,
        },
    );
    let t0 = Instant::now();
    let mut st = GcState::default();
    w.pass(&mut st, t0);
    w.pass(&mut st, t0 + MIN);
    // n2 comes back before the grace period ends: forgotten.
    w.nodes.insert("n2".into(), Identity::default());
    w.pass(&mut st, t0 + 2 * MIN);
    w.nodes.remove("n2");
    let d = w.pass(&mut st, t0 + 5 * MIN);
    let due: Vec<(&str, Option<i64>)> = d
        .nodes
        .iter()
        .map(|n| (n.node.as_str(), n.record))
        .collect();
    assert_eq!(due, [("n3", None)], "{d:?}");
    let d = w.pass(&mut st, t0 + 10 * MIN);
    let due: Vec<&str> = d.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(due, ["n2", "n3"]);
    assert!(confirm_node("n2", &w.nodes, None, &w.pods));
    assert!(!confirm_node(
        "n2",
        &w.nodes,
        Some(&Identity::default()),
        &w.pods
    ));
}

#[test]
fn a_static_pod_is_its_mirror_pods_by_the_kubelets_uid() {
    // K8S_POD_UID of a static pod is the kubelet's hash of the manifest; its mirror pod in the
    // API server has another UID and names the hash in `kubernetes.io/config.mirror`.
    let mut w = World::new();
    add(&mut w.snap, "a", "web-n1", "n1", "s1", Some("hash1"));
    add(&mut w.snap, "a", "web-n1", "n1", "s0", Some("hash0"));
    let mut mirror = pod("mirror-uid", Some("n1"));
    mirror.mirror_of = Some("hash1".into());
    w.pods.insert("a/web-n1".into(), mirror.clone());
    let t0 = Instant::now();
    let mut st = GcState::default();
    let mut d = Decision::default();
    for i in 0..=6 {
        d = w.pass(&mut st, t0 + i * MIN);
    }
    // Only the earlier static pod's (another hash) is due.
    let due: Vec<&str> = d
        .pods
        .iter()
        .map(|p| p.attachment.endpoint.as_str())
        .collect();
    assert_eq!(due.len(), 1, "{d:?}");
    assert!(due[0].contains(".s0."), "{due:?}");
    let live = attachments(&w.snap)
        .into_iter()
        .find(|a| a.uid.as_deref() == Some("hash1"))
        .unwrap();
    assert!(!confirm_pod(&live, &BTreeMap::new(), Some(&mirror)));
}

#[test]
fn a_pod_uid_annotation_that_is_no_uid_is_ignored_not_compared() {
    // Written by hand or by another writer: an empty or malformed UID on an endpoint must not
    // make the live pod of that name on that node a stranger to it.
    let mut w = World::new();
    add(&mut w.snap, "a", "p", "n1", "c1", Some(""));
    add(&mut w.snap, "a", "q", "n1", "c2", Some("not a uid; really"));
    w.pods.insert("a/p".into(), pod("u-p", Some("n1")));
    w.pods.insert("a/q".into(), pod("u-q", Some("n1")));
    let t0 = Instant::now();
    let mut st = GcState::default();
    for i in 0..=10 {
        let d = w.pass(&mut st, t0 + i * MIN);
        assert!(d.pods.is_empty() && d.pending.is_empty(), "{d:?}");
    }
    assert!(pod_leaks(&w.snap, &w.pods).is_empty());
    // Gone from the API server, they are judged like endpoints without a UID.
    w.pods.clear();
    for i in 11..=20 {
        w.pass(&mut st, t0 + i * MIN);
    }
    assert_eq!(w.pass(&mut st, t0 + 21 * MIN).pods.len(), 2);
}

#[test]
fn a_node_is_not_due_while_pods_are_bound_to_it() {
    let mut w = World::new();
    w.stored.insert(
        "n2".into(),
        StoredNode {
            rev: 6,
            from_kubernetes: true,
        },
    );
    w.snap.nodes = ["n1", "n2"].map(String::from).into();
    // The Node object is gone; a pod bound to it is not (yet).
    w.pods.insert("a/on-n2".into(), pod("u2", Some("n2")));
    let t0 = Instant::now();
    let mut st = GcState::default();
    for i in 0..=10 {
        let d = w.pass(&mut st, t0 + i * MIN);
        assert!(d.nodes.is_empty(), "{d:?}");
        assert_eq!(d.pending.len(), 1, "{d:?}");
    }
    // An untrusted pod view cannot say no pod is bound to it.
    let bound = std::mem::take(&mut w.pods);
    w.pods_trust = Trust::Untrusted("relisting".into());
    assert!(w.pass(&mut st, t0 + 11 * MIN).nodes.is_empty());
    w.pods_trust = Trust::Complete { epoch: 1 };
    let d = w.pass(&mut st, t0 + 12 * MIN);
    assert_eq!(d.nodes.len(), 1, "{d:?}");
    // The re-check's fresh pod list still showing one bound to it keeps the node.
    assert!(!confirm_node("n2", &w.nodes, None, &bound));
    assert!(confirm_node("n2", &w.nodes, None, &w.pods));
}
