//! The compiler's output for a model using every feature, against `golden/rich.nft`
//! (`TRELLIS_UPDATE_GOLDEN=1` rewrites it). Pure: no kernel.

mod common;

use trellis_policy::compile::{self, PolicyEngine};

#[test]
fn rich_model_compiles_to_the_golden_ruleset() {
    let rs = compile::compile(&common::rich_model(), common::NODE);
    let got = rs.to_string();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/rich.nft");
    if std::env::var_os("TRELLIS_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/golden")).unwrap();
        std::fs::write(path, &got).unwrap();
    }
    let want = std::fs::read_to_string(path).unwrap();
    assert!(
        got == want,
        "the ruleset changed; diff golden/rich.nft:\n{got}"
    );
}

/// The engine built from the model equals the batch compiler's output.
#[test]
fn engine_built_from_a_model_equals_compile() {
    let m = common::rich_model();
    let e = PolicyEngine::with_model(common::NODE, m.clone());
    assert_eq!(e.full(), &compile::compile(&m, common::NODE));
}

/// A model with ClusterNetworkPolicies in both tiers around a Calico tier and a Kubernetes
/// NetworkPolicy, a `nodes` peer, `networks`, ports and a range (written as an operator's
/// YAML and translated).
fn cluster_model() -> trellis_policy::model::Model {
    let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: red}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {team: blue}}
---
apiVersion: trellis.dev/v1
kind: Node
metadata: {name: n1, labels: {zone: a}}
spec: {addresses: [{address: 172.16.0.1}]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {node: n1, pod: a, interfaceName: trla, ipNetworks: [10.0.0.1/32]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: c, namespace: y, labels: {app: c}}
spec: {node: n2, pod: c, interfaceName: trlc, ipNetworks: [10.0.1.3/32]}
---
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: admin-x}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {matchLabels: {team: red}}}
  ingress:
  - name: pass-from-y-80
    action: Pass
    from: [{namespaces: {matchLabels: {team: blue}}}]
    protocols: [{tcp: {destinationPort: {number: 80}}}]
  - action: Deny
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: c}}}}]
  egress:
  - action: Deny
    to: [{nodes: {matchLabels: {zone: a}}}, {networks: [198.51.100.0/24]}]
    protocols: [{udp: {destinationPort: {range: {start: 50, end: 60}}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 80}]}]
---
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: default}
spec:
  tier: Baseline
  priority: 0
  subject: {pods: {namespaceSelector: {}, podSelector: {}}}
  egress:
  - action: Deny
    to: [{namespaces: {matchLabels: {team: blue}}}]
"#;
    let docs = trellis_resources::parse_documents(yaml).unwrap();
    let t = trellis_policy::translate::translate(&docs);
    assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    t.model
}

#[test]
fn cluster_network_policies_compile_to_the_golden_ruleset() {
    let m = cluster_model();
    let rs = compile::compile(&m, common::NODE);
    let got = rs.to_string();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/cluster.nft");
    if std::env::var_os("TRELLIS_UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &got).unwrap();
    }
    let want = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        got == want,
        "the ruleset changed; diff golden/cluster.nft:\n{got}"
    );
    let e = PolicyEngine::with_model(common::NODE, m.clone());
    assert_eq!(e.full(), &rs);
}
