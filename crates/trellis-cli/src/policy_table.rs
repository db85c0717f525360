//! `get` tables of the policy kinds (Calico's, Kubernetes' NetworkPolicy and
//! ClusterNetworkPolicy, Namespace, ServiceAccount).

use std::collections::BTreeMap;

use trellis_resources::cnp::ClusterNetworkPolicySpec;
use trellis_resources::policy::{PolicyType, DEFAULT_TIER, DEFAULT_TIER_ORDER};
use trellis_resources::{Kind, Resource};

fn labels(l: &BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return "<none>".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn types(t: &[PolicyType]) -> String {
    t.iter()
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn order(o: Option<f64>) -> String {
    o.map(|o| o.to_string()).unwrap_or_else(|| "-".into())
}

fn or_all(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "all()".into())
}

fn ns(r: &Resource) -> String {
    r.metadata().namespace.clone().unwrap_or_default()
}

/// A ClusterNetworkPolicy's row (the v1alpha1 kinds as they map onto it).
fn cluster_row(name: &str, s: &ClusterNetworkPolicySpec) -> Vec<String> {
    let subject = match (&s.subject.namespaces, &s.subject.pods) {
        (Some(n), _) => format!("namespaces {}", n.to_selector()),
        (None, Some(pods)) => format!(
            "pods {} in namespaces {}",
            pods.pod_selector.to_selector(),
            pods.namespace_selector.to_selector()
        ),
        (None, None) => "-".into(),
    };
    vec![
        name.to_string(),
        format!("{:?}", s.tier),
        s.priority.to_string(),
        subject,
        s.ingress.len().to_string(),
        s.egress.len().to_string(),
    ]
}

/// Header and rows for a policy kind (`None` for other kinds). `networkpolicies` lists
/// Calico's and Kubernetes' NetworkPolicies together, with their API.
pub fn rows(kind: Kind, items: &[Resource]) -> Option<(Vec<&'static str>, Vec<Vec<String>>)> {
    let map = |f: &dyn Fn(&Resource) -> Option<Vec<String>>| items.iter().filter_map(f).collect();
    Some(match kind {
        Kind::NetworkPolicy | Kind::KubernetesNetworkPolicy => (
            vec![
                "NAMESPACE",
                "NAME",
                "API",
                "TIER",
                "ORDER",
                "SELECTOR",
                "TYPES",
            ],
            map(&|r| match r {
                Resource::NetworkPolicy(p) => Some(vec![
                    ns(r),
                    p.metadata.name.clone(),
                    Kind::NetworkPolicy.api_version().into(),
                    p.spec.tier_name().into(),
                    order(p.spec.order),
                    or_all(&p.spec.selector),
                    types(&p.spec.types),
                ]),
                Resource::KubernetesNetworkPolicy(p) => Some(vec![
                    ns(r),
                    p.metadata.name.clone(),
                    Kind::KubernetesNetworkPolicy.api_version().into(),
                    DEFAULT_TIER.into(),
                    "1000".into(),
                    p.spec.pod_selector.to_selector().to_string(),
                    types(&p.spec.policy_types),
                ]),
                _ => None,
            }),
        ),
        Kind::GlobalNetworkPolicy => (
            vec![
                "NAME",
                "TIER",
                "ORDER",
                "SELECTOR",
                "NAMESPACESELECTOR",
                "TYPES",
            ],
            map(&|r| match r {
                Resource::GlobalNetworkPolicy(p) => Some(vec![
                    p.metadata.name.clone(),
                    p.spec.tier_name().into(),
                    order(p.spec.order),
                    or_all(&p.spec.selector),
                    or_all(&p.spec.namespace_selector),
                    types(&p.spec.types),
                ]),
                _ => None,
            }),
        ),
        Kind::ClusterNetworkPolicy
        | Kind::AdminNetworkPolicy
        | Kind::BaselineAdminNetworkPolicy => (
            vec!["NAME", "TIER", "PRIORITY", "SUBJECT", "INGRESS", "EGRESS"],
            map(&|r| match r {
                Resource::ClusterNetworkPolicy(p) => Some(cluster_row(&p.metadata.name, &p.spec)),
                Resource::AdminNetworkPolicy(p) => {
                    Some(cluster_row(&p.metadata.name, &p.spec.to_cluster()))
                }
                Resource::BaselineAdminNetworkPolicy(p) => {
                    Some(cluster_row(&p.metadata.name, &p.spec.to_cluster()))
                }
                _ => None,
            }),
        ),
        Kind::Tier => {
            let mut rows: Vec<Vec<String>> = map(&|r| match r {
                Resource::Tier(t) => Some(vec![
                    t.metadata.name.clone(),
                    order(t.spec.order),
                    format!("{:?}", t.spec.default_action.unwrap_or_default()),
                ]),
                _ => None,
            });
            // The default tier exists without an object.
            if !rows.iter().any(|r| r[0] == DEFAULT_TIER) {
                rows.push(vec![
                    DEFAULT_TIER.into(),
                    DEFAULT_TIER_ORDER.to_string(),
                    "Deny".into(),
                ]);
            }
            (vec!["NAME", "ORDER", "DEFAULTACTION"], rows)
        }
        Kind::NetworkSet | Kind::GlobalNetworkSet => {
            let namespaced = kind == Kind::NetworkSet;
            let header = if namespaced {
                vec!["NAMESPACE", "NAME", "NETS", "LABELS"]
            } else {
                vec!["NAME", "NETS", "LABELS"]
            };
            let rows = map(&|r| match r {
                Resource::NetworkSet(s) | Resource::GlobalNetworkSet(s) => {
                    let mut row = vec![
                        s.metadata.name.clone(),
                        s.spec.nets.join(","),
                        labels(&s.metadata.labels),
                    ];
                    if namespaced {
                        row.insert(0, ns(r));
                    }
                    Some(row)
                }
                _ => None,
            });
            (header, rows)
        }
        Kind::Profile => (
            vec!["NAME", "LABELSTOAPPLY", "INGRESS", "EGRESS"],
            map(&|r| match r {
                Resource::Profile(p) => Some(vec![
                    p.metadata.name.clone(),
                    labels(&p.spec.labels_to_apply),
                    format!("{} rules", p.spec.ingress.len()),
                    format!("{} rules", p.spec.egress.len()),
                ]),
                _ => None,
            }),
        ),
        Kind::Namespace => (
            vec!["NAME", "LABELS"],
            map(&|r| match r {
                Resource::Namespace(n) => {
                    Some(vec![n.metadata.name.clone(), labels(&n.metadata.labels)])
                }
                _ => None,
            }),
        ),
        Kind::ServiceAccount => (
            vec!["NAMESPACE", "NAME", "LABELS"],
            map(&|r| match r {
                Resource::ServiceAccount(s) => Some(vec![
                    ns(r),
                    s.metadata.name.clone(),
                    labels(&s.metadata.labels),
                ]),
                _ => None,
            }),
        ),
        _ => return None,
    })
}

/// The labels column of other kinds' tables.
pub fn label_column(l: &BTreeMap<String, String>) -> String {
    labels(l)
}
