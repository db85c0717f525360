//! Reconcilers (pure): what Kubernetes says against what the store holds → plain-data writes,
//! each guarded by the revision of the record it was decided from.
//!
//! - [`plan_owned`] for the kinds the controller mirrors whole (Namespaces, ServiceAccounts,
//!   NetworkPolicies): create or replace what differs, delete what vanished from Kubernetes —
//!   but only records the controller wrote ([`crate::translate::owned`]); an object an
//!   operator applied with the CLI is never replaced or deleted.
//! - [`plan_pods`] for pods: each pod's record (kind `Pod`, mirrored like the kinds above),
//!   which the agent reads at the pod's CNI ADD, and [`plan_endpoints`]: a pod's WorkloadEndpoints (written by the CNI ADD, found by
//!   namespace, `spec.pod` and node) get the pod's labels, service account and named ports;
//!   nothing else of the endpoint changes, and endpoints are never created or deleted here.
//!
//! Both are level-based: the same inputs give the same ops, and an input already reflected in
//! the store gives none, so a resync, a relist or a restarted controller writes nothing twice.

use std::collections::BTreeMap;

use trellis_cluster::objects::{decode, encode};
use trellis_resources::pod::stamp_endpoint;
use trellis_resources::{key_for, Kind, Resource};
use trellis_store::{KeyValue, Precondition};

use crate::translate::{owned, NodeInfo, PodInfo, KUBE_LABELS};

/// One guarded write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write `value` at `key` if `precondition` holds (`Absent` or the revision read).
    Put {
        key: String,
        value: Vec<u8>,
        precondition: Precondition,
    },
    /// Delete `key` if it still has revision `revision`.
    Delete { key: String, revision: i64 },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// What Kubernetes says of one key of a mirrored kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    /// The object as it must be stored.
    Object(Box<Resource>),
    /// The object exists in Kubernetes but does not translate (reported elsewhere): what is
    /// stored stays as it is — neither replaced nor deleted.
    Invalid,
}

/// Plans one mirrored kind: `desired` by datastore key (the whole kind, as listed and watched
/// from Kubernetes), `observed` the store's records of that kind.
pub fn plan_owned(desired: &BTreeMap<String, Desired>, observed: &[KeyValue]) -> Vec<Op> {
    let stored: BTreeMap<&str, &KeyValue> =
        observed.iter().map(|kv| (kv.key.as_str(), kv)).collect();
    let mut ops = Vec::new();
    for (key, d) in desired {
        let Desired::Object(r) = d else { continue };
        let value = encode(r);
        match stored.get(key.as_str()) {
            None => ops.push(Op::Put {
                key: key.clone(),
                value,
                precondition: Precondition::Absent(key.clone()),
            }),
            Some(kv) if kv.value == value => {}
            // A record of this key that someone else wrote (an operator's `trellis apply`) or
            // that does not decode is not ours to replace: replacing it would also mark it
            // ours, and the Kubernetes object's deletion would then delete it.
            Some(kv) if !decode(kv).is_ok_and(|s| owned(&s.resource)) => {
                tracing::warn!(%key, "not synced from Kubernetes: a record of this key that the controller did not write (an operator's `trellis apply`) is left as it is");
            }
            Some(kv) => ops.push(Op::Put {
                key: key.clone(),
                value,
                precondition: Precondition::ModRevision(key.clone(), kv.mod_revision),
            }),
        }
    }
    for kv in observed {
        if desired.contains_key(&kv.key) {
            continue;
        }
        // Undecodable records and objects someone else wrote are not ours to delete.
        let ours = decode(kv).is_ok_and(|s| owned(&s.resource));
        if ours {
            ops.push(Op::Delete {
                key: kv.key.clone(),
                revision: kv.mod_revision,
            });
        }
    }
    ops
}

/// What Kubernetes says of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodDesired {
    Pod(Box<PodInfo>),
    /// The pod does not translate: its endpoints keep what they have.
    Invalid,
}

/// Plans the pods' endpoints: `pods` by (namespace, name), `observed` the stored
/// WorkloadEndpoints. An endpoint whose pod is unknown (not yet listed, or gone) is left alone:
/// the CNI DEL or GC removes it; one that appears later is planned when it is observed.
pub fn plan_endpoints(
    pods: &BTreeMap<(String, String), PodDesired>,
    observed: &[KeyValue],
) -> Vec<Op> {
    let mut ops = Vec::new();
    for kv in observed {
        let Ok(stored) = decode(kv) else { continue };
        let Resource::WorkloadEndpoint(mut w) = stored.resource else {
            continue;
        };
        let (Some(ns), Some(pod)) = (w.metadata.namespace.clone(), w.spec.pod.clone()) else {
            continue;
        };
        let Some(PodDesired::Pod(info)) = pods.get(&(ns, pod)) else {
            continue;
        };
        // A pod of this name on another node is a later pod (a StatefulSet's, say): this
        // endpoint is a leftover of an earlier one, not this pod's. A pod not scheduled yet
        // has no endpoint at all, so every endpoint of its name is an earlier pod's.
        if info.node.as_deref() != Some(w.spec.node.as_str()) {
            continue;
        }
        stamp_endpoint(&info.record(), &mut w.metadata.labels, &mut w.spec);
        let value = encode(&Resource::WorkloadEndpoint(w));
        if value != kv.value {
            ops.push(Op::Put {
                key: kv.key.clone(),
                value,
                precondition: Precondition::ModRevision(kv.key.clone(), kv.mod_revision),
            });
        }
    }
    ops
}

/// The pods' records (kind `Pod`) as they must be stored, by datastore key: mirrored like the
/// other owned kinds by [`plan_owned`].
pub fn desired_records(pods: &BTreeMap<(String, String), PodDesired>) -> BTreeMap<String, Desired> {
    pods.iter()
        .map(|((ns, name), p)| {
            let key = key_for(Kind::Pod, Some(ns), name);
            let d = match p {
                PodDesired::Pod(info) => Desired::Object(Box::new(Resource::Pod(info.record()))),
                PodDesired::Invalid => Desired::Invalid,
            };
            (key, d)
        })
        .collect()
}

/// Plans pods: their records first (created as soon as the pod is listed, so the agent finds
/// it at the pod's CNI ADD), then their endpoints. `records` and `endpoints` are the store's
/// listings of the same scope as `pods` (the whole cluster or one namespace).
pub fn plan_pods(
    pods: &BTreeMap<(String, String), PodDesired>,
    records: &[KeyValue],
    endpoints: &[KeyValue],
) -> Vec<Op> {
    let mut ops = plan_owned(&desired_records(pods), records);
    ops.extend(plan_endpoints(pods, endpoints));
    ops
}

/// What Kubernetes says of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeDesired {
    Node(Box<NodeInfo>),
    /// The node does not translate: its Trellis Node keeps what it has.
    Invalid,
}

/// Plans the nodes: each Trellis Node (registered by its agent) whose Kubernetes Node is known
/// gets the Kubernetes labels; the keys synced last time are recorded in [`KUBE_LABELS`], so a
/// label removed in Kubernetes is removed and the agent's own `--label`s are kept (a key the
/// agent set is neither overwritten nor removed, whatever Kubernetes says of it). Trellis
/// Nodes are never created or deleted here (their agents register them; deleting a node and its
/// addresses is IPAM garbage collection's job).
pub fn plan_nodes(nodes: &BTreeMap<String, NodeDesired>, observed: &[KeyValue]) -> Vec<Op> {
    let mut ops = Vec::new();
    for kv in observed {
        let Ok(stored) = decode(kv) else { continue };
        let Resource::Node(mut n) = stored.resource else {
            continue;
        };
        let Some(NodeDesired::Node(info)) = nodes.get(&n.metadata.name) else {
            continue;
        };
        let previous: Vec<String> = n
            .metadata
            .annotations
            .get(KUBE_LABELS)
            .map(|s| {
                s.split(',')
                    .filter(|k| !k.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        for k in previous {
            n.metadata.labels.remove(&k);
        }
        // What is left was set by someone else (the agent's `--label`): theirs, kept as is.
        let synced: BTreeMap<&String, &String> = info
            .labels
            .iter()
            .filter(|(k, _)| !n.metadata.labels.contains_key(*k))
            .collect();
        let keys: Vec<&str> = synced.keys().map(|k| k.as_str()).collect();
        n.metadata
            .labels
            .extend(synced.iter().map(|(k, v)| ((*k).clone(), (*v).clone())));
        n.metadata
            .annotations
            .insert(KUBE_LABELS.into(), keys.join(","));
        // Kubernetes owns the node's podCIDRs (set once by its node IPAM controller): the
        // agent's `--use-pod-cidr` makes each this node's block.
        n.spec.pod_cidrs = info.pod_cidrs.clone();
        let value = encode(&Resource::Node(n));
        if value != kv.value {
            ops.push(Op::Put {
                key: kv.key.clone(),
                value,
                precondition: Precondition::ModRevision(kv.key.clone(), kv.mod_revision),
            });
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_resources::parse_documents;

    fn kv(r: &Resource, rev: i64) -> KeyValue {
        KeyValue {
            key: r.key(),
            value: encode(r),
            create_revision: rev,
            mod_revision: rev,
        }
    }

    fn ns(name: &str, team: &str, ours: bool) -> Resource {
        let ann = if ours {
            format!(
                "annotations: {{\"{}\": {}}}",
                crate::translate::MANAGED_BY,
                crate::translate::CONTROLLER
            )
        } else {
            String::new()
        };
        parse_documents(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{team: {team}}}, {ann}}}\n"
        ))
        .unwrap()
        .remove(0)
    }

    #[test]
    fn owned_kinds_are_created_replaced_and_deleted_only_when_ours() {
        let desired: BTreeMap<String, Desired> = [
            (
                ns("a", "x", true).key(),
                Desired::Object(Box::new(ns("a", "x", true))),
            ),
            (
                ns("b", "y", true).key(),
                Desired::Object(Box::new(ns("b", "y", true))),
            ),
            (ns("bad", "x", true).key(), Desired::Invalid),
        ]
        .into();
        let observed = vec![
            kv(&ns("b", "old", true), 5),
            kv(&ns("gone", "x", true), 6),
            kv(&ns("cli", "x", false), 7),
            kv(&ns("bad", "x", true), 8),
        ];
        let ops = plan_owned(&desired, &observed);
        let a = ns("a", "x", true).key();
        let b = ns("b", "y", true).key();
        assert_eq!(
            ops,
            vec![
                Op::Put {
                    key: a.clone(),
                    value: encode(&ns("a", "x", true)),
                    precondition: Precondition::Absent(a)
                },
                Op::Put {
                    key: b.clone(),
                    value: encode(&ns("b", "y", true)),
                    precondition: Precondition::ModRevision(b, 5)
                },
                Op::Delete {
                    key: ns("gone", "x", true).key(),
                    revision: 6
                },
            ]
        );
    }

    #[test]
    fn what_is_already_stored_plans_nothing() {
        let r = ns("a", "x", true);
        let desired = [(r.key(), Desired::Object(Box::new(r.clone())))].into();
        assert!(plan_owned(&desired, &[kv(&r, 3)]).is_empty());
    }

    #[test]
    fn an_object_an_operator_applied_is_never_overwritten() {
        // The operator `trellis apply`d Namespace "a" (no ownership mark); Kubernetes has a
        // Namespace "a" too. Replacing it would also mark it ours, so deleting the Kubernetes
        // one later would delete the operator's object.
        let r = ns("a", "k8s", true);
        let desired = [(r.key(), Desired::Object(Box::new(r.clone())))].into();
        let ops = plan_owned(&desired, &[kv(&ns("a", "operator", false), 3)]);
        assert!(ops.is_empty(), "{ops:?}");
    }

    fn wep(ns: &str, pod: &str, node: &str, container: &str) -> Resource {
        parse_documents(&format!(
            "apiVersion: trellis.dev/v1\nkind: WorkloadEndpoint\nmetadata: {{name: {node}.{container}.eth0, namespace: {ns}, labels: {{stale: \"1\"}}}}\nspec: {{node: {node}, pod: {pod}, containerID: {container}, endpoint: eth0, ipNetworks: [10.0.0.1/32]}}\n"
        ))
        .unwrap()
        .remove(0)
    }

    fn info(node: Option<&str>) -> PodInfo {
        PodInfo {
            namespace: "x".into(),
            name: "a".into(),
            node: node.map(str::to_string),
            labels: [("app".to_string(), "web".to_string())].into(),
            service_account: Some("sa".into()),
            ports: vec![trellis_resources::EndpointPort {
                name: "http".into(),
                protocol: trellis_resources::policy::RuleProtocol::Tcp,
                port: 80,
                host_port: None,
                host_ip: None,
            }],
            ipam: Ok(Default::default()),
            uid: Some("u1".into()),
            mirror_of: None,
        }
    }

    #[test]
    fn a_pods_endpoints_on_its_node_get_its_labels_service_account_and_ports() {
        let mine = wep("x", "a", "n1", "c1");
        let elsewhere = wep("x", "a", "n2", "c0");
        let other_pod = wep("x", "b", "n1", "c2");
        let other_ns = wep("y", "a", "n1", "c3");
        let pods = [(
            ("x".to_string(), "a".to_string()),
            PodDesired::Pod(Box::new(info(Some("n1")))),
        )]
        .into();
        let observed = [
            kv(&mine, 4),
            kv(&elsewhere, 5),
            kv(&other_pod, 6),
            kv(&other_ns, 7),
        ];
        let ops = plan_endpoints(&pods, &observed);
        assert_eq!(ops.len(), 1, "{ops:?}");
        let Op::Put {
            key,
            value,
            precondition,
        } = &ops[0]
        else {
            panic!()
        };
        assert_eq!(key, &mine.key());
        assert_eq!(precondition, &Precondition::ModRevision(mine.key(), 4));
        let stored = decode(&KeyValue {
            key: key.clone(),
            value: value.clone(),
            create_revision: 4,
            mod_revision: 4,
        })
        .unwrap();
        let Resource::WorkloadEndpoint(w) = stored.resource else {
            panic!()
        };
        assert_eq!(w.metadata.labels, info(None).labels);
        assert_eq!(w.spec.service_account_name.as_deref(), Some("sa"));
        assert_eq!(w.spec.ports, info(None).ports);
        assert_eq!(
            w.spec.container_id.as_deref(),
            Some("c1"),
            "the rest is kept"
        );
        // Applied, the same pod plans nothing more.
        let again = [KeyValue {
            key: key.clone(),
            value: value.clone(),
            create_revision: 4,
            mod_revision: 9,
        }];
        assert!(plan_endpoints(&pods, &again).is_empty());
        // An invalid pod leaves its endpoints as they are.
        let invalid = [(("x".to_string(), "a".to_string()), PodDesired::Invalid)].into();
        assert!(plan_endpoints(&invalid, &observed).is_empty());
    }

    /// A pod's record is created (guarded by its absence) before anything touches its
    /// endpoints, replaced when the pod changes, deleted when the pod is gone — only records the
    /// controller wrote; an invalid pod keeps what is stored.
    #[test]
    fn pod_records_are_mirrored_before_endpoints() {
        let pods: BTreeMap<(String, String), PodDesired> = [
            (
                ("x".to_string(), "a".to_string()),
                PodDesired::Pod(Box::new(info(Some("n1")))),
            ),
            (("x".to_string(), "bad".to_string()), PodDesired::Invalid),
        ]
        .into();
        let record = Resource::Pod(info(Some("n1")).record());
        assert_eq!(record.key(), "/trellis/v1/pods/x/a");
        assert!(owned(&record));
        let mine = wep("x", "a", "n1", "c1");
        let ops = plan_pods(&pods, &[], &[kv(&mine, 4)]);
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert_eq!(
            ops[0],
            Op::Put {
                key: record.key(),
                value: encode(&record),
                precondition: Precondition::Absent(record.key()),
            }
        );
        assert_eq!(ops[1].key(), mine.key());
        // Stored already: nothing; a stored record of a pod gone is deleted if ours.
        let mut gone = info(Some("n1"));
        gone.name = "gone".into();
        let gone = Resource::Pod(gone.record());
        let mut theirs = info(Some("n1"));
        theirs.name = "cli".into();
        let mut theirs = theirs.record();
        theirs.metadata.annotations.clear();
        let theirs = Resource::Pod(theirs);
        let bad = {
            let mut b = info(None);
            b.name = "bad".into();
            Resource::Pod(b.record())
        };
        let observed = [kv(&record, 5), kv(&gone, 6), kv(&theirs, 7), kv(&bad, 8)];
        assert_eq!(
            plan_pods(&pods, &observed, &[]),
            vec![Op::Delete {
                key: gone.key(),
                revision: 6
            }]
        );
    }

    #[test]
    fn an_unscheduled_pods_labels_land_on_no_endpoint() {
        // "a" was deleted and recreated (a StatefulSet's pod); the new one is not scheduled
        // yet, so it has no endpoint: the old pod's leftover endpoint must not get its labels.
        let leftover = wep("x", "a", "n1", "c1");
        let pods = [(
            ("x".to_string(), "a".to_string()),
            PodDesired::Pod(Box::new(info(None))),
        )]
        .into();
        let ops = plan_endpoints(&pods, &[kv(&leftover, 4)]);
        assert!(ops.is_empty(), "{ops:?}");
    }

    fn trellis_node(labels: &str, synced: Option<&str>) -> Resource {
        let ann = synced
            .map(|k| format!(", annotations: {{\"{KUBE_LABELS}\": \"{k}\"}}"))
            .unwrap_or_default();
        parse_documents(&format!(
            "apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {{name: n1, labels: {{{labels}}}{ann}}}\nspec: {{addresses: [{{address: 192.0.2.1/24}}]}}\n"
        ))
        .unwrap()
        .remove(0)
    }

    #[test]
    fn a_label_key_the_agent_set_is_neither_overwritten_nor_removed() {
        // The agent was started with `--label zone=agent`; Kubernetes says zone=k8s.
        let info = |labels: &[(&str, &str)]| NodeInfo {
            name: "n1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            pod_cidrs: vec![],
            addresses: vec![],
        };
        let nodes = |i: NodeInfo| -> BTreeMap<String, NodeDesired> {
            [("n1".to_string(), NodeDesired::Node(Box::new(i)))].into()
        };
        let agent = trellis_node("zone: agent", None);
        let ops = plan_nodes(
            &nodes(info(&[("zone", "k8s"), ("os", "linux")])),
            &[kv(&agent, 3)],
        );
        let [Op::Put { value, .. }] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        let got = decode(&KeyValue {
            key: agent.key(),
            value: value.clone(),
            create_revision: 3,
            mod_revision: 3,
        })
        .unwrap()
        .resource;
        assert_eq!(got, trellis_node("zone: agent, os: linux", Some("os")));
        // Kubernetes drops the label: the agent's stays.
        let ops = plan_nodes(&nodes(info(&[])), &[kv(&got, 4)]);
        let [Op::Put { value, .. }] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        let got = decode(&KeyValue {
            key: agent.key(),
            value: value.clone(),
            create_revision: 3,
            mod_revision: 4,
        })
        .unwrap()
        .resource;
        assert_eq!(got, trellis_node("zone: agent", Some("")));
    }

    #[test]
    fn node_labels_follow_kubernetes_and_keep_the_agents_own() {
        let info = NodeInfo {
            name: "n1".into(),
            labels: [("zone".to_string(), "b".to_string())].into(),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            addresses: vec![],
        };
        let nodes = [("n1".to_string(), NodeDesired::Node(Box::new(info)))].into();
        // `rack` came from the agent's --label; `old` from Kubernetes, which dropped it.
        let stored = trellis_node("rack: r1, old: x, zone: a", Some("old,zone"));
        let ops = plan_nodes(&nodes, &[kv(&stored, 3)]);
        let [Op::Put {
            value,
            precondition,
            ..
        }] = ops.as_slice()
        else {
            panic!("{ops:?}")
        };
        assert_eq!(precondition, &Precondition::ModRevision(stored.key(), 3));
        let got = decode(&KeyValue {
            key: stored.key(),
            value: value.clone(),
            create_revision: 3,
            mod_revision: 3,
        })
        .unwrap();
        let mut want = trellis_node("rack: r1, zone: b", Some("zone"));
        if let Resource::Node(n) = &mut want {
            n.spec.pod_cidrs = vec!["10.244.1.0/24".parse().unwrap()];
        }
        assert_eq!(got.resource, want);
        assert!(
            plan_nodes(&nodes, &[kv(&want, 4)]).is_empty(),
            "in sync: nothing to write"
        );
        assert!(
            plan_nodes(&BTreeMap::new(), &[kv(&stored, 3)]).is_empty(),
            "unknown node: left alone"
        );
    }
}
