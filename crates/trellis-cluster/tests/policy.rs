//! Policy objects in the datastore, on both backends: a policy naming a missing tier is refused
//! and nothing is written; a tier in use cannot be deleted; `label` edits a pod's endpoints or
//! a namespace with kubectl's rules in one guarded transaction, and a writer racing between
//! its reads and its commit makes it decide again.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use trellis_cluster::label::{label, LabelTarget};
use trellis_cluster::objects::{self, Target};
use trellis_cluster::ClusterError;
use trellis_resources::labels::LabelChange;
use trellis_resources::{parse_documents, Kind, Resource};
use trellis_store::{Datastore, KeyValue, TxnOp};

fn docs(yaml: &str) -> Vec<Resource> {
    parse_documents(yaml).unwrap_or_else(|e| panic!("{e}"))
}

async fn snapshot(s: &dyn Datastore) -> (Vec<KeyValue>, i64) {
    let l = s.list("").await.unwrap();
    (l.items, s.revision().await.unwrap())
}

fn tier(name: &str) -> String {
    format!("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: {name}}}\nspec: {{order: 100}}\n---\n")
}

fn policy(name: &str, tier: &str) -> String {
    format!("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  tier: {tier}\n  ingress: [{{action: Pass}}]\n---\n")
}

fn gnp(name: &str, tier: &str) -> String {
    format!("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n---\n")
}

fn invalid(e: ClusterError) -> trellis_resources::ResourceError {
    match e {
        ClusterError::Invalid(e) => e,
        other => panic!("expected an invalid document, got {other}"),
    }
}

async fn policies_need_their_tier(s: Arc<dyn Datastore>) {
    let s = &*s;
    objects::apply_all(s, &docs(&policy("in-default", "default")), false)
        .await
        .unwrap();
    let before = snapshot(s).await;
    // Missing: refused, naming the document and field; nothing written.
    for yaml in [
        policy("p", "security"),
        format!("{}{}", tier("other"), gnp("g", "security")),
    ] {
        let e = invalid(
            objects::apply_all(s, &docs(&yaml), false)
                .await
                .unwrap_err(),
        );
        assert_eq!(e.field, "spec.tier", "{e}");
        assert!(e.reason.contains("\"security\" does not exist"), "{e}");
        assert_eq!(snapshot(s).await, before, "{e}");
    }
    // In the same file, after the policy: fine.
    objects::apply_all(
        s,
        &docs(&format!("{}{}", policy("p", "security"), tier("security"))),
        false,
    )
    .await
    .unwrap();
    // Stored: fine.
    objects::apply_all(s, &docs(&gnp("g", "security")), false)
        .await
        .unwrap();
}

async fn a_tier_in_use_is_not_deleted(s: Arc<dyn Datastore>) {
    let s = &*s;
    let yaml = format!(
        "{}{}{}",
        tier("security"),
        policy("p", "security"),
        gnp("g", "security")
    );
    objects::apply_all(s, &docs(&yaml), false).await.unwrap();
    let before = snapshot(s).await;
    let t = |k, ns: Option<&str>, n: &str| Target {
        kind: k,
        namespace: ns.map(str::to_string),
        name: n.into(),
    };
    let e = invalid(
        objects::delete_all(s, &[t(Kind::Tier, None, "security")])
            .await
            .unwrap_err(),
    );
    assert!(e.reason.contains("still used by NetworkPolicy x/p"), "{e}");
    assert_eq!(snapshot(s).await, before);
    // With one of its two policies: still refused.
    let e = invalid(
        objects::delete_all(
            s,
            &[
                t(Kind::Tier, None, "security"),
                t(Kind::NetworkPolicy, Some("x"), "p"),
            ],
        )
        .await
        .unwrap_err(),
    );
    assert!(e.reason.contains("GlobalNetworkPolicy g"), "{e}");
    assert_eq!(snapshot(s).await, before);
    // With both, and a missing object reported as such: one transaction.
    let existed = objects::delete_all(
        s,
        &[
            t(Kind::Tier, None, "security"),
            t(Kind::NetworkPolicy, Some("x"), "p"),
            t(Kind::GlobalNetworkPolicy, None, "g"),
            t(Kind::GlobalNetworkPolicy, None, "nope"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(existed, [true, true, true, false]);
    assert_eq!(s.revision().await.unwrap(), before.1 + 1);
    assert!(s.list("").await.unwrap().items.is_empty());
}

/// A policy naming the tier appears between the tier deletion's reads and its commit: the
/// transaction conflicts and the retry refuses.
async fn racing_policy_keeps_its_tier(s: Arc<dyn Datastore>) {
    objects::apply_all(&*s, &docs(&tier("security")), false)
        .await
        .unwrap();
    let p = docs(&policy("late", "security")).remove(0);
    let racing = common::Racing::new(s.clone(), vec![TxnOp::Put(p.key(), objects::encode(&p))]);
    let target = Target {
        kind: Kind::Tier,
        namespace: None,
        name: "security".into(),
    };
    let e = invalid(objects::delete_all(&racing, &[target]).await.unwrap_err());
    assert!(e.reason.contains("NetworkPolicy x/late"), "{e}");
    assert_eq!(racing.txns.load(Ordering::SeqCst), 1);
    assert!(objects::get(&*s, Kind::Tier, None, "security")
        .await
        .unwrap()
        .is_some());
}

/// The tier is deleted between a policy apply's reads and its commit: the retry refuses.
async fn racing_tier_deletion_is_caught(s: Arc<dyn Datastore>) {
    objects::apply_all(&*s, &docs(&tier("security")), false)
        .await
        .unwrap();
    let key = docs(&tier("security")).remove(0).key();
    let racing = common::Racing::new(s.clone(), vec![TxnOp::Delete(key)]);
    let e = invalid(
        objects::apply_all(&racing, &docs(&policy("p", "security")), false)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.field, "spec.tier", "{e}");
    assert_eq!(racing.txns.load(Ordering::SeqCst), 1);
    assert!(s.list("").await.unwrap().items.is_empty());
}

fn wep(name: &str, pod: &str, labels: &str) -> String {
    format!("apiVersion: trellis.dev/v1\nkind: WorkloadEndpoint\nmetadata: {{name: {name}, namespace: x, labels: {{{labels}}}}}\nspec: {{node: n1, pod: {pod}}}\n---\n")
}

fn labels_of(s: &[Resource], name: &str) -> std::collections::BTreeMap<String, String> {
    s.iter()
        .find(|r| r.metadata().name == name)
        .map(|r| r.metadata().labels.clone())
        .unwrap()
}

async fn stored(s: &dyn Datastore) -> Vec<Resource> {
    s.list("")
        .await
        .unwrap()
        .items
        .iter()
        .map(|kv| objects::decode(kv).unwrap().resource)
        .collect()
}

fn ch(args: &[&str]) -> Vec<LabelChange> {
    args.iter()
        .map(|a| LabelChange::parse(a).unwrap())
        .collect()
}

async fn label_pods_and_namespaces(s: Arc<dyn Datastore>) {
    let s = &*s;
    let yaml = format!(
        "{}{}{}apiVersion: v1\nkind: Namespace\nmetadata: {{name: x, labels: {{team: a}}}}\n",
        wep("a-eth0", "a", "app: web"),
        wep("a-net1", "a", "app: web, extra: '1'"),
        wep("b-eth0", "b", "app: db")
    );
    objects::apply_all(s, &docs(&yaml), false).await.unwrap();
    let pod = LabelTarget::Pod {
        namespace: "x".into(),
        pod: "a".into(),
    };
    // Both endpoints of the pod, in one revision; the other pod untouched.
    let rev = s.revision().await.unwrap();
    let out = label(s, &pod, &ch(&["tier=front", "extra-"]), false)
        .await
        .unwrap();
    assert_eq!(out.objects.len(), 2);
    assert_eq!(out.not_found, ["extra"], "a-eth0 had no `extra`");
    assert_eq!(s.revision().await.unwrap(), rev + 1);
    let all = stored(s).await;
    for n in ["a-eth0", "a-net1"] {
        let l = labels_of(&all, n);
        assert_eq!((l["app"].as_str(), l["tier"].as_str()), ("web", "front"));
        assert!(!l.contains_key("extra"));
    }
    assert!(!labels_of(&all, "b-eth0").contains_key("tier"));
    // Changing a value needs --overwrite; the refusal changes nothing.
    let before = snapshot(s).await;
    let e = invalid(label(s, &pod, &ch(&["app=api"]), false).await.unwrap_err());
    assert!(e.reason.contains("--overwrite is false"), "{e}");
    assert_eq!(snapshot(s).await, before);
    label(s, &pod, &ch(&["app=api"]), true).await.unwrap();
    assert_eq!(labels_of(&stored(s).await, "a-eth0")["app"], "api");
    // Nothing to change: no write.
    let before = snapshot(s).await;
    let out = label(s, &pod, &ch(&["app=api"]), false).await.unwrap();
    assert!(out.objects.iter().all(|(_, changed)| !changed));
    assert_eq!(snapshot(s).await, before);
    // A pod with no endpoint, in this or another namespace.
    for (ns, p) in [("x", "zz"), ("y", "a")] {
        let t = LabelTarget::Pod {
            namespace: ns.into(),
            pod: p.into(),
        };
        assert!(matches!(
            label(s, &t, &ch(&["a=b"]), false).await,
            Err(ClusterError::NotFound { .. })
        ));
    }
    // Namespaces: labels, the protected implicit one, a missing namespace.
    let ns = LabelTarget::Namespace("x".into());
    label(s, &ns, &ch(&["env=prod"]), false).await.unwrap();
    let all = stored(s).await;
    let l = labels_of(&all, "x");
    assert_eq!((l["env"].as_str(), l["team"].as_str()), ("prod", "a"));
    let e = invalid(
        label(s, &ns, &ch(&["kubernetes.io/metadata.name=y"]), true)
            .await
            .unwrap_err(),
    );
    assert!(e.reason.contains("set by the system"), "{e}");
    assert!(matches!(
        label(
            s,
            &LabelTarget::Namespace("nope".into()),
            &ch(&["a=b"]),
            false
        )
        .await,
        Err(ClusterError::NotFound { .. })
    ));
}

/// An endpoint of the pod created between `label`'s reads and its commit is labelled too.
async fn racing_endpoint_is_not_missed(s: Arc<dyn Datastore>) {
    objects::apply_all(&*s, &docs(&wep("a-eth0", "a", "app: web")), false)
        .await
        .unwrap();
    let late = docs(&wep("a-net1", "a", "app: web")).remove(0);
    let racing = common::Racing::new(
        s.clone(),
        vec![TxnOp::Put(late.key(), objects::encode(&late))],
    );
    let pod = LabelTarget::Pod {
        namespace: "x".into(),
        pod: "a".into(),
    };
    let out = label(&racing, &pod, &ch(&["tier=front"]), false)
        .await
        .unwrap();
    assert_eq!(
        racing.txns.load(Ordering::SeqCst),
        2,
        "the first attempt conflicted"
    );
    assert_eq!(out.objects.len(), 2);
    let all = stored(&*s).await;
    assert_eq!(labels_of(&all, "a-net1")["tier"], "front");
}

both!(policies_need_their_tier);
both!(a_tier_in_use_is_not_deleted);
both!(racing_policy_keeps_its_tier);
both!(racing_tier_deletion_is_caught);
both!(label_pods_and_namespaces);
both!(racing_endpoint_is_not_missed);
