//! The Kubernetes API objects of a lab on the Kubernetes path (pure): its Namespaces, Nodes,
//! the ServiceAccounts its pods run as, and its Pods — what a cluster would hold for the same
//! workloads — and which of the lab's documents are Kubernetes' to hold.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use trellis_resources::{Kind, Resource};

use crate::topology::{LabPod, Topology};

/// Whether documents of this kind go to the API server (the kube-controller mirrors them into
/// the datastore) rather than through `trellis apply`.
pub fn kubernetes_kind(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Namespace
            | Kind::ServiceAccount
            | Kind::KubernetesNetworkPolicy
            | Kind::ClusterNetworkPolicy
    )
}

/// A document as the API server takes it.
pub fn object(r: &Resource) -> Value {
    r.to_value()
}

/// The lab's Namespaces (the listed ones with their labels, then any other a pod is in), its
/// Nodes (with the labels their agents get: the kube-controller syncs a Node's labels onto
/// the Trellis Node, and pods bound to a Node that does not exist are removed by a real
/// cluster's pod garbage collector) and its pods' ServiceAccounts.
pub fn cluster_objects(t: &Topology) -> Vec<Value> {
    let mut out = Vec::new();
    let mut namespaces: BTreeSet<&str> = BTreeSet::new();
    for n in &t.namespaces {
        namespaces.insert(&n.name);
        out.push(json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": n.name, "labels": n.labels}}));
    }
    for p in &t.pods {
        if namespaces.insert(&p.namespace) {
            out.push(json!({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": p.namespace}}));
        }
    }
    for n in &t.nodes {
        out.push(json!({"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": n.name, "labels": n.labels}}));
    }
    let accounts: BTreeSet<(&str, &str)> = t
        .pods
        .iter()
        .filter_map(|p| Some((p.namespace.as_str(), p.service_account.as_deref()?)))
        .collect();
    for (ns, name) in accounts {
        out.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": {"name": name, "namespace": ns}}));
    }
    out
}

/// A lab pod as a Pod bound to its node: its labels, service account and named ports (one
/// container, the lab's server). It tolerates every taint, so a real cluster's node lifecycle
/// controller does not evict it from a Node no kubelet reports for.
pub fn pod(p: &LabPod) -> Value {
    let ports: Vec<Value> = p
        .ports
        .iter()
        .map(|port| {
            let mut v = json!({"containerPort": port.port, "protocol": port.protocol.as_str()});
            if let Some(name) = &port.name {
                v["name"] = json!(name);
            }
            v
        })
        .collect();
    let mut spec = json!({
        "nodeName": p.node,
        "containers": [{"name": "server", "image": "trellis-lab-server", "ports": ports}],
        "tolerations": [{"operator": "Exists"}],
    });
    if let Some(sa) = &p.service_account {
        spec["serviceAccountName"] = json!(sa);
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": p.pod_name(), "namespace": p.namespace, "labels": p.labels},
           "spec": spec})
}
