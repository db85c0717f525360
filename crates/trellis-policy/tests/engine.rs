//! The incremental engine against the batch compiler (pure): for random sequences of changes,
//! carrying out each change's ops on the previous ruleset (with the kernel's strictness: see
//! `Ruleset::apply`) yields exactly `compile(model_after)`; and the ops of a pod's label change
//! are set elements and that pod's chains, not a rebuild.

mod common;

use proptest::prelude::*;
use trellis_policy::compile::{self, Change, NftOp, PolicyEngine};
use trellis_policy::model::*;

use common::random::random_change;

fn check_sequence(engine: PolicyEngine, seeds: &[u64]) -> Result<(), TestCaseError> {
    let batches: Vec<Vec<u64>> = seeds.iter().map(|s| vec![*s]).collect();
    check_batches(engine, &batches)
}

/// Each batch through `handle_all` (one transaction, as the agent feeds a pass's changes).
fn check_batches(mut engine: PolicyEngine, batches: &[Vec<u64>]) -> Result<(), TestCaseError> {
    let mut applied = engine.full().clone();
    for (step, seeds) in batches.iter().enumerate() {
        let changes: Vec<Change> = seeds.iter().map(|s| random_change(*s)).collect();
        let ops = engine.handle_all(changes.clone());
        if let Err(e) = applied.apply(&ops) {
            return Err(TestCaseError::fail(format!(
                "step {step}: {changes:?}\nops {ops:#?}\ncannot be applied: {e}"
            )));
        }
        let want = compile::compile(engine.model(), common::NODE);
        prop_assert!(
            engine.full() == &want,
            "step {step}: the engine's state differs from compile after {changes:?}\n{}",
            diff(engine.full(), &want)
        );
        prop_assert!(
            applied == want,
            "step {step}: the ops of {changes:?} did not carry the ruleset to compile's:\nops {ops:#?}\n{}",
            diff(&applied, &want)
        );
    }
    Ok(())
}

/// What differs between two rulesets, by object.
fn diff(got: &compile::Ruleset, want: &compile::Ruleset) -> String {
    let mut out = String::new();
    let keys = |a: Vec<&String>, b: Vec<&String>| -> std::collections::BTreeSet<String> {
        a.into_iter().chain(b).cloned().collect()
    };
    for k in keys(got.sets.keys().collect(), want.sets.keys().collect()) {
        if got.sets.get(&k) != want.sets.get(&k) {
            out += &format!(
                "set {k}: got {:?}\nwant {:?}\n",
                got.sets.get(&k),
                want.sets.get(&k)
            );
        }
    }
    for k in keys(got.maps.keys().collect(), want.maps.keys().collect()) {
        if got.maps.get(&k) != want.maps.get(&k) {
            out += &format!(
                "map {k}: got {:?}\nwant {:?}\n",
                got.maps.get(&k),
                want.maps.get(&k)
            );
        }
    }
    for k in keys(got.chains.keys().collect(), want.chains.keys().collect()) {
        if got.chains.get(&k) != want.chains.get(&k) {
            out += &format!(
                "chain {k}: got {:?}\nwant {:?}\n",
                got.chains.get(&k),
                want.chains.get(&k)
            );
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn incremental_ops_reach_the_compiled_ruleset_from_empty(
        seeds in prop::collection::vec(any::<u64>(), 1..40)
    ) {
        check_sequence(PolicyEngine::new(common::NODE), &seeds)?;
    }

    #[test]
    fn incremental_ops_reach_the_compiled_ruleset_from_a_rich_model(
        seeds in prop::collection::vec(any::<u64>(), 1..25)
    ) {
        check_sequence(PolicyEngine::with_model(common::NODE, common::rich_model()), &seeds)?;
    }

    #[test]
    fn batches_of_changes_reach_the_compiled_ruleset_from_empty(
        batches in prop::collection::vec(prop::collection::vec(any::<u64>(), 1..12), 1..10)
    ) {
        check_batches(PolicyEngine::new(common::NODE), &batches)?;
    }

    #[test]
    fn batches_of_changes_reach_the_compiled_ruleset_from_a_rich_model(
        batches in prop::collection::vec(prop::collection::vec(any::<u64>(), 1..12), 1..8)
    ) {
        check_batches(PolicyEngine::with_model(common::NODE, common::rich_model()), &batches)?;
    }
}

fn is_element_op(op: &NftOp) -> bool {
    matches!(op, NftOp::AddElements { .. } | NftOp::DeleteElements { .. })
}

/// A remote pod changing labels changes set elements only; a local one also rewrites its own
/// chains (nothing shared, no set or chain created or deleted).
#[test]
fn a_label_change_yields_set_elements_and_the_pods_own_chains() {
    let mut engine = PolicyEngine::with_model(common::NODE, common::rich_model());
    // y/c is remote: relabel it so the profile's has(app) and the y selectors lose it.
    let mut c = common::endpoint_of(engine.model(), "y", "c");
    c.labels = common::labels(&[("role", "x")]);
    let ops = engine.handle(Change::EndpointUpsert(c));
    assert!(!ops.is_empty());
    assert!(ops.ops.iter().all(is_element_op), "{ops:#?}");

    // x/a is local: app=a → app=z drops it from the `app == 'a'` sets, and security's Pass
    // no longer sees it; web-sa still applies (its service account did not change).
    let mut a = common::endpoint_of(engine.model(), "x", "a");
    a.labels = common::labels(&[("app", "z")]);
    let ops = engine.handle(Change::EndpointUpsert(a.clone()));
    let id = compile::names::endpoint_id("x", "a");
    for op in &ops.ops {
        let own = |chain: &str| chain.contains(&id);
        let ok = is_element_op(op)
            || matches!(op, NftOp::FlushChain(c) if own(c))
            || matches!(op, NftOp::AddRule { chain, .. } if own(chain));
        assert!(ok, "unexpected op for a label change: {op:?}");
    }
    assert!(ops.ops.iter().any(is_element_op));

    // The same upsert again changes nothing.
    assert!(engine.handle(Change::EndpointUpsert(a)).is_empty());
}

/// A new pod selected by nothing new: its chains and map entries, plus its address in the sets
/// that select it — the shared policy chains are reused.
#[test]
fn a_new_pod_adds_its_chains_map_entries_and_set_elements() {
    let mut engine = PolicyEngine::with_model(common::NODE, common::rich_model());
    let mut g = common::endpoint("x", "g", common::NODE, Some("trlg"), &["10.0.1.20"]);
    g.labels = common::labels(&[("app", "a")]);
    let ops = engine.handle(Change::EndpointUpsert(g));
    for op in &ops.ops {
        let ok = matches!(
            op,
            NftOp::AddElements { .. }
                | NftOp::AddChain(_)
                | NftOp::AddRule { .. }
                | NftOp::AddMapElements { .. }
        );
        assert!(ok, "unexpected op for a new pod: {op:?}");
        if let NftOp::AddChain(c) | NftOp::AddRule { chain: c, .. } = op {
            assert!(c.starts_with("ep_"), "a shared chain was touched: {op:?}");
        }
    }
}

/// Changing a policy rebuilds its chain and nothing else when who it applies to is unchanged.
#[test]
fn a_policy_rule_change_rebuilds_only_that_policys_chain() {
    let mut engine = PolicyEngine::with_model(common::NODE, common::rich_model());
    let id = common::policy_id(PolicyKind::Global, None, "late");
    let mut p = engine.model().policies[&id].clone();
    p.egress = Some(vec![common::rule(Action::Deny)]);
    let ops = engine.handle(Change::PolicyUpsert(p));
    let chain = compile::names::policy_chain(&id, Direction::Egress);
    for op in &ops.ops {
        let ok =
            matches!(op, NftOp::FlushChain(c) | NftOp::AddRule { chain: c, .. } if *c == chain);
        assert!(ok, "unexpected op: {op:?}");
    }
}

/// A batch of many policies that all apply to the node's pods compiles each pod's chains once
/// and fills each chain once: work and batch are as large as what they leave, not policies ×
/// endpoints (the quadratic work that made 1 000 policies applied at once program at two a
/// second).
#[test]
fn a_batch_of_policies_fills_each_endpoint_chain_once() {
    let mut engine = PolicyEngine::with_model(common::NODE, common::rich_model());
    let n = 200;
    let changes: Vec<Change> = (0..n)
        .map(|i| {
            let mut p = common::policy(
                PolicyKind::Global,
                None,
                &format!("bulk{i:03}"),
                "default",
                "all()",
            );
            p.order = Some(i as f64);
            p.ingress = Some(vec![common::rule(Action::Deny)]);
            Change::PolicyUpsert(p)
        })
        .collect();
    let before = engine.endpoint_programs();
    let ops = engine.handle_all(changes);
    let local = engine
        .model()
        .endpoints
        .values()
        .filter(|e| e.node == common::NODE && e.interface.is_some())
        .count() as u64;
    assert!(
        engine.endpoint_programs() - before <= local,
        "{} endpoint compilations for {local} local endpoints",
        engine.endpoint_programs() - before
    );
    let want = compile::compile(engine.model(), common::NODE);
    let mut applied = PolicyEngine::with_model(common::NODE, common::rich_model())
        .full()
        .clone();
    applied.apply(&ops).unwrap();
    assert!(applied == want, "the batch reaches compile's table");
    let mut filled: std::collections::BTreeMap<&str, usize> = Default::default();
    for op in &ops.ops {
        if let NftOp::AddRule { chain, .. } = op {
            *filled.entry(chain.as_str()).or_default() += 1;
        }
    }
    for (chain, rules) in filled {
        assert_eq!(
            rules,
            want.chains[chain].rules.len(),
            "chain {chain} was filled more than once in the batch"
        );
    }
}

/// ClusterNetworkPolicy churn is incremental too: a namespace leaving a peer's namespace
/// selector, or a node leaving a `nodes` peer's selector (while another still matches: the
/// last one leaving turns the interval set into a hash set, as for NetworkSets), changes set
/// elements only; a Node written again unchanged but for its heartbeat changes nothing.
#[test]
fn cluster_policy_peers_follow_namespace_and_node_labels_by_set_elements() {
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
metadata: {name: n9, labels: {zone: a}}
spec: {addresses: [{address: 172.16.0.9}]}
---
apiVersion: trellis.dev/v1
kind: Node
metadata: {name: n8, labels: {zone: a}}
spec: {addresses: [{address: 172.16.0.8}]}
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
  - action: Deny
    from: [{namespaces: {matchLabels: {team: blue}}}]
  egress:
  - action: Deny
    to: [{nodes: {matchLabels: {zone: a}}}]
"#;
    let docs = trellis_resources::parse_documents(yaml).unwrap();
    let mut sync = trellis_policy::sync::ModelSync::new();
    let mut engine = PolicyEngine::new(common::NODE);
    for d in &docs {
        for c in sync.update(&d.key(), Some(d)).changes {
            engine.handle(c);
        }
    }
    let relabel = |yaml: &str| trellis_resources::parse_documents(yaml).unwrap().remove(0);
    // Namespace y leaves team=blue: y/c's address leaves the peer's set.
    let y =
        relabel("apiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {team: green}}\n");
    let changes = sync.update(&y.key(), Some(&y)).changes;
    let mut ops = Vec::new();
    for c in changes {
        ops.extend(engine.handle(c).ops);
    }
    assert!(!ops.is_empty() && ops.iter().all(is_element_op), "{ops:#?}");
    // Node n9 leaves zone=a: its address leaves the nodes peer's set.
    let n9 = relabel("apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: n9, labels: {zone: b}}\nspec: {addresses: [{address: 172.16.0.9}]}\n");
    let mut ops = Vec::new();
    for c in sync.update(&n9.key(), Some(&n9)).changes {
        ops.extend(engine.handle(c).ops);
    }
    assert!(!ops.is_empty() && ops.iter().all(is_element_op), "{ops:#?}");
    // The same Node again with a new heartbeat: nothing to do.
    let mut beat = n9.clone();
    if let trellis_resources::Resource::Node(o) = &mut beat {
        o.status = Some(trellis_resources::NodeStatus {
            last_heartbeat: Some(42),
        });
    }
    let mut ops = Vec::new();
    for c in sync.update(&beat.key(), Some(&beat)).changes {
        ops.extend(engine.handle(c).ops);
    }
    assert!(ops.is_empty(), "{ops:#?}");
    // And the engine holds what the compiler makes of the current objects.
    let now: Vec<trellis_resources::Resource> = docs
        .iter()
        .map(|d| match d.key() {
            k if k == y.key() => y.clone(),
            k if k == n9.key() => beat.clone(),
            _ => d.clone(),
        })
        .collect();
    let m = trellis_policy::translate::translate(&now).model;
    assert_eq!(engine.full(), &compile::compile(&m, common::NODE));
}

/// ClusterNetworkPolicy churn through the datastore's path (`sync::ModelSync` → engine) ends
/// where translating and compiling the current objects from scratch does, step by step: a
/// Calico Tier named `admin` (written around the validating edge) arriving and leaving after a
/// CNP exists, an AdminNetworkPolicy with the CNP's name, the CNP's priority and tier moving,
/// a namespace its subject selects deleted, a node's address changing and the node deleted
/// (hostile review).
#[test]
fn cluster_policy_churn_through_sync_equals_compiling_from_scratch() {
    let base = r#"
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
metadata: {name: n2, labels: {zone: a}}
spec: {addresses: [{address: 172.16.0.9}]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {node: n1, pod: a, interfaceName: trla, ipNetworks: [10.0.0.1/32]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: b, namespace: y, labels: {app: b}}
spec: {node: n1, pod: b, interfaceName: trlb, ipNetworks: [10.0.0.2/32]}
---
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: p}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {matchLabels: {team: red}}}
  ingress:
  - action: Pass
    from: [{namespaces: {matchLabels: {team: blue}}}]
  egress:
  - action: Deny
    to: [{nodes: {matchLabels: {zone: a}}}]
"#;
    let parse = |y: &str| trellis_resources::parse_documents(y).unwrap();
    let mut objects = std::collections::BTreeMap::new();
    let mut sync = trellis_policy::sync::ModelSync::new();
    let mut engine = PolicyEngine::new(common::NODE);
    let mut applied = engine.full().clone();
    let mut step =
        |sync: &mut trellis_policy::sync::ModelSync,
         objects: &mut std::collections::BTreeMap<String, trellis_resources::Resource>,
         key: String,
         new: Option<trellis_resources::Resource>,
         what: &str| {
            match &new {
                Some(r) => objects.insert(key.clone(), r.clone()),
                None => objects.remove(&key),
            };
            let ops = engine.handle_all(sync.update(&key, new.as_ref()).changes);
            applied
                .apply(&ops)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let all: Vec<_> = objects.values().cloned().collect();
            let want = compile::compile(
                &trellis_policy::translate::translate(&all).model,
                common::NODE,
            );
            assert!(
                engine.full() == &want,
                "{what}: the engine differs from compile"
            );
            assert!(
                applied == want,
                "{what}: the ops did not reach compile's table"
            );
        };
    for r in parse(base) {
        step(&mut sync, &mut objects, r.key(), Some(r), "initial");
    }
    // A Tier named `admin`, written around the edge (validation refuses the name).
    let mut tier = parse("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: adminx}\nspec: {order: 0, defaultAction: Deny}\n").remove(0);
    if let trellis_resources::Resource::Tier(o) = &mut tier {
        o.metadata.name = "admin".into();
    }
    step(
        &mut sync,
        &mut objects,
        tier.key(),
        Some(tier.clone()),
        "tier admin arrives",
    );
    let anp = parse("apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: p}\nspec:\n  priority: 1\n  subject: {namespaces: {}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {matchLabels: {team: red}}}]\n").remove(0);
    step(
        &mut sync,
        &mut objects,
        anp.key(),
        Some(anp.clone()),
        "anp with the cnp's name",
    );
    let cnp_key = "/trellis/v1/clusternetworkpolicies/p".to_string();
    let moved = base
        .split("---")
        .last()
        .unwrap()
        .replace("priority: 5", "priority: 0");
    step(
        &mut sync,
        &mut objects,
        cnp_key.clone(),
        Some(parse(&moved).remove(0)),
        "cnp priority 5 -> 0",
    );
    let baseline = moved
        .replace("tier: Admin", "tier: Baseline")
        .replace("action: Pass", "action: Deny");
    step(
        &mut sync,
        &mut objects,
        cnp_key.clone(),
        Some(parse(&baseline).remove(0)),
        "cnp admin -> baseline",
    );
    step(
        &mut sync,
        &mut objects,
        tier.key(),
        None,
        "tier admin leaves",
    );
    let x = parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: red}}\n")
        .remove(0);
    step(
        &mut sync,
        &mut objects,
        x.key(),
        None,
        "namespace x (the subject) deleted",
    );
    let n2 = parse("apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: n2, labels: {zone: a}}\nspec: {addresses: [{address: 172.16.0.10}, {address: 'fd00::10'}]}\n").remove(0);
    step(
        &mut sync,
        &mut objects,
        n2.key(),
        Some(n2.clone()),
        "node address change",
    );
    step(&mut sync, &mut objects, n2.key(), None, "node deleted");
    step(&mut sync, &mut objects, anp.key(), None, "anp deleted");
    step(&mut sync, &mut objects, cnp_key, None, "cnp deleted");
}
