use proptest::prelude::*;

use super::*;
use crate::compile::{compile, PolicyEngine};
use crate::translate::translate;

const NODE: &str = "node-1";

fn doc(yaml: &str) -> Resource {
    let mut d = trellis_resources::parse_documents(yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.len(), 1);
    d.remove(0)
}

/// The objects a sequence draws from: several versions per key (index 0: deleted).
fn versions() -> Vec<Vec<Option<Resource>>> {
    let wep = |name: &str, ns: &str, ip: &str, iface: &str, labels: &str| {
        Some(doc(&format!(
            "apiVersion: trellis.dev/v1\nkind: WorkloadEndpoint\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
             spec: {{node: {NODE}, pod: {name}, interfaceName: {iface}, ipNetworks: [{ip}/32]}}\n"
        )))
    };
    let gnp = |name: &str, tier: &str, sel: &str| {
        Some(doc(&format!(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\n\
             spec: {{tier: {tier}, order: 10, selector: \"{sel}\", types: [Ingress], ingress: [{{action: Allow, source: {{selector: \"role == 'web'\"}}}}]}}\n"
        )))
    };
    let tier = |name: &str, action: &str| {
        Some(doc(&format!(
            "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: {name}}}\nspec: {{order: 100, defaultAction: {action}}}\n"
        )))
    };
    let knp = |sel: &str| {
        Some(doc(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np, namespace: x}}\n\
             spec: {{podSelector: {{matchLabels: {{{sel}}}}}, ingress: [{{from: [{{namespaceSelector: {{matchLabels: {{team: a}}}}}}]}}]}}\n"
        )))
    };
    let ns = |labels: &str| {
        Some(doc(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: y, labels: {{{labels}}}}}\n"
        )))
    };
    let gns = |net: &str| {
        Some(doc(&format!(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {{name: ext, labels: {{role: web}}}}\nspec: {{nets: [{net}]}}\n"
        )))
    };
    vec![
        vec![None, tier("t1", "Deny"), tier("t1", "Pass")],
        vec![
            None,
            gnp("p1", "t1", "all()"),
            gnp("p1", "default", "app == 'db'"),
            gnp("p1", "t1", "has(app)"),
        ],
        vec![
            None,
            gnp("p2", "t1", "role == 'web'"),
            gnp("p2", "t2", "all()"),
        ],
        vec![None, tier("t2", "Deny")],
        vec![None, knp("app: db"), knp("")],
        vec![
            None,
            wep("a", "x", "10.0.0.1", "trla", "app: db"),
            wep("a", "x", "10.0.0.1", "trla", "role: web"),
        ],
        vec![
            None,
            wep("b", "y", "10.0.0.2", "trlb", "role: web"),
            wep("b", "y", "10.0.0.2", "trlb", "app: db"),
        ],
        vec![None, ns("team: a"), ns("team: b")],
        vec![None, gns("192.0.2.0/24"), gns("198.51.100.0/24")],
    ]
}

fn key_of(versions: &[Option<Resource>]) -> String {
    versions.iter().flatten().next().unwrap().key()
}

/// Feeds `steps` (key index, version index) through the sync into an engine and checks the
/// engine's table against a translation of the current objects from scratch after each.
fn check(steps: &[(usize, usize)]) -> Result<(), TestCaseError> {
    let all = versions();
    let mut current: Vec<Option<Resource>> = vec![None; all.len()];
    let mut sync = ModelSync::new();
    let mut engine = PolicyEngine::new(NODE);
    for (i, &(k, v)) in steps.iter().enumerate() {
        let (k, v) = (k % all.len(), v % all[k % all.len()].len());
        current[k] = all[k][v].clone();
        let up = sync.update(&key_of(&all[k]), current[k].as_ref());
        for c in up.changes {
            engine.handle(c);
        }
        let objects: Vec<Resource> = current.iter().flatten().cloned().collect();
        let t = translate(&objects);
        let want = compile(&t.model, NODE);
        prop_assert!(
            engine.full() == &want,
            "step {i} ({k}, {v}): the engine differs from compile(translate(objects))"
        );
        let skipped: BTreeSet<String> = t.skipped.iter().map(|s| s.object.clone()).collect();
        let bad: BTreeSet<String> = sync
            .bad()
            .keys()
            .map(|key| {
                let r = objects.iter().find(|r| &r.key() == key).unwrap();
                crate::translate::object_name(r)
            })
            .collect();
        prop_assert_eq!(bad, skipped, "step {}: reported objects", i);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn key_by_key_updates_reach_the_translation_of_the_whole(
        steps in prop::collection::vec((0usize..9, 0usize..4), 1..40)
    ) {
        check(&steps)?;
    }
}

#[test]
fn a_policy_waits_for_its_tier_and_leaves_with_it() {
    let all = versions();
    let (tier_key, pol_key) = (key_of(&all[0]), key_of(&all[1]));
    let mut sync = ModelSync::new();
    let up = sync.update(&pol_key, all[1][1].as_ref());
    assert!(up.changes.is_empty(), "{up:?}");
    assert!(matches!(
        up.reports.as_slice(),
        [(k, Some(TranslateError::MissingTier { tier }))] if k == &pol_key && tier == "t1"
    ));
    let up = sync.update(&tier_key, all[0][1].as_ref());
    assert!(matches!(
        up.changes.as_slice(),
        [Change::TierUpsert(_), Change::PolicyUpsert(_)]
    ));
    assert_eq!(up.reports, vec![(pol_key.clone(), None)]);
    let up = sync.update(&tier_key, None);
    assert!(matches!(
        up.changes.as_slice(),
        [Change::PolicyRemove(_), Change::TierRemove { .. }]
    ));
    assert_eq!(sync.bad().len(), 1);
    // Deleting the waiting policy clears its report and changes nothing in the model.
    let up = sync.update(&pol_key, None);
    assert!(up.changes.is_empty());
    assert_eq!(up.reports, vec![(pol_key, None)]);
}

#[test]
fn an_object_that_does_not_translate_is_reported_and_its_old_version_removed() {
    let all = versions();
    let key = key_of(&all[8]);
    let mut sync = ModelSync::new();
    sync.update(&key, all[8][1].as_ref());
    // A stored set whose net does not parse (written around the validating edge).
    let mut bad = all[8][1].clone().unwrap();
    if let Resource::GlobalNetworkSet(o) = &mut bad {
        o.spec.nets = vec!["300.1.2.3/8".into()];
    }
    let up = sync.update(&key, Some(&bad));
    assert!(
        matches!(up.changes.as_slice(), [Change::NetworkSetRemove { .. }]),
        "{up:?}"
    );
    assert!(matches!(
        up.reports.as_slice(),
        [(_, Some(TranslateError::Net { .. }))]
    ));
    let up = sync.update(&key, all[8][2].as_ref());
    assert!(matches!(
        up.changes.as_slice(),
        [Change::NetworkSetUpsert(_)]
    ));
    assert_eq!(up.reports, vec![(key, None)]);
}

/// A Calico policy naming the `admin` tier (written around the edge, with a Tier object of
/// that name too) stays out, reported; a ClusterNetworkPolicy in it comes in without a Tier.
#[test]
fn the_cluster_tiers_hold_only_cluster_network_policies() {
    let docs = trellis_resources::parse_documents(
        "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: c}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}]}]}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: g}\nspec: {selector: all(), ingress: [{action: Allow}]}\n",
    )
    .unwrap();
    let mut gnp = docs[1].clone();
    if let trellis_resources::Resource::GlobalNetworkPolicy(o) = &mut gnp {
        o.spec.tier = Some("admin".into());
    }
    let mut tier_obj = trellis_resources::parse_documents(
        "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: other}\n",
    )
    .unwrap()
    .remove(0);
    tier_obj.metadata_mut().name = "admin".into();
    let mut s = ModelSync::new();
    let up = s.update(&docs[0].key(), Some(&docs[0]));
    assert!(matches!(up.changes.as_slice(), [Change::PolicyUpsert(p)] if p.tier == "admin"));
    s.update(&tier_obj.key(), Some(&tier_obj));
    let up = s.update(&gnp.key(), Some(&gnp));
    assert!(up.changes.is_empty(), "{:?}", up.changes);
    assert!(matches!(
        s.bad().get(&gnp.key()),
        Some(TranslateError::ClusterTier { tier }) if tier == "admin"
    ));
    // The Tier object going away does not take the ClusterNetworkPolicy out.
    let up = s.update(&tier_obj.key(), None);
    assert!(
        !up.changes
            .iter()
            .any(|c| matches!(c, Change::PolicyRemove(_))),
        "{:?}",
        up.changes
    );
}
