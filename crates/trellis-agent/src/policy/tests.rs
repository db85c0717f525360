//! The applier's pure part: which keys it feeds, in which order, and what it reports.

use trellis_resources::parse_documents;
use trellis_store::{KeyValue, Listing};

use super::*;

/// The view of the policy kinds, relisted to hold exactly `objects` (each with its revision).
fn view<'v>(v: &'v mut ClusterView, objects: &[(Resource, i64)]) -> &'v ClusterView {
    for kind in POLICY_KINDS {
        let items = objects
            .iter()
            .filter(|(r, _)| r.kind() == kind)
            .map(|(r, rev)| KeyValue {
                key: r.key(),
                value: trellis_cluster::objects::encode(r),
                create_revision: *rev,
                mod_revision: *rev,
            })
            .collect();
        let (_, errors) = v.load(
            kind,
            &Listing {
                items,
                revision: 100,
            },
        );
        assert!(errors.is_empty(), "{errors:?}");
    }
    v
}

fn new_view() -> ClusterView {
    ClusterView::new(&POLICY_KINDS)
}

fn doc(yaml: &str) -> Resource {
    parse_documents(yaml).unwrap().remove(0)
}

fn wep(name: &str, labels: &str) -> Resource {
    doc(&format!(
        "apiVersion: trellis.dev/v1\nkind: WorkloadEndpoint\nmetadata: {{name: {name}, namespace: x, labels: {{{labels}}}}}\n\
         spec: {{node: n1, pod: {name}, interfaceName: trl{name}, ipNetworks: [10.0.0.{}/32]}}\n",
        name.len()
    ))
}

fn tier() -> Resource {
    doc("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: sec}\nspec: {order: 10}\n")
}

fn policy() -> Resource {
    doc(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\n\
         spec: {tier: sec, selector: all(), types: [Ingress], ingress: [{action: Deny}]}\n",
    )
}

#[test]
fn only_keys_whose_revision_moved_are_fed() {
    let names = ["a", "bb", "ccc", "dddd"];
    let mut objects: Vec<(Resource, i64)> = names.iter().map(|n| (wep(n, "app: x"), 1)).collect();
    let mut a = Applier::new("n1");
    let mut v = new_view();
    assert_eq!(a.deltas(view(&mut v, &objects)).len(), 4);
    // Nothing moved: nothing fed.
    assert!(a.deltas(view(&mut v, &objects)).is_empty());
    objects[2] = (wep("ccc", "app: y"), 7);
    let d = a.deltas(view(&mut v, &objects));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].revision, 7);
    let (ops, _) = a.feed(d);
    assert!(!ops.is_empty(), "a local relabel changes the table");
    // A deletion is fed as one gone key.
    objects.remove(0);
    let d = a.deltas(view(&mut v, &objects));
    assert!(
        matches!(d.as_slice(), [Delta { object: None, .. }]),
        "{d:?}"
    );
}

#[test]
fn a_tier_deleted_or_created_with_its_policies_reports_nothing() {
    let mut a = Applier::new("n1");
    let mut v = new_view();
    // Policy listed before its tier in key order: the tier is fed first anyway.
    let d = a.deltas(view(&mut v, &[(policy(), 1), (tier(), 1)]));
    let (_, reports) = a.feed(d);
    assert!(reports.is_empty(), "{reports:?}");
    assert!(a.engine().model().policies.len() == 1);
    let d = a.deltas(view(&mut v, &[]));
    let (_, reports) = a.feed(d);
    assert!(reports.is_empty(), "{reports:?}");
    assert!(a.engine().model().policies.is_empty());
}

/// Before the applier's first table is in the kernel (a fresh node has none: nothing closes
/// the interface), endpointReady does not answer "ready"; once the table holding the
/// interface is in, it does.
#[tokio::test]
async fn an_interface_is_not_ready_before_the_first_table_is_in_the_kernel() {
    let status = Status::default();
    let limit = Duration::from_millis(50);
    let r = status.wait_programmed("trla", limit).await;
    assert!(
        matches!(r, Err(PolicyError::NotProgrammed { .. })),
        "ready before any table was programmed: {r:?}"
    );
    let mut v = new_view();
    let mut applier = Applier::new("n1");
    let deltas = applier.deltas(view(&mut v, &[(wep("a", "app: a"), 1)]));
    applier.feed(deltas);
    status.publish(applier.engine().full());
    let r = status.wait_programmed("trla", limit).await;
    assert!(r.is_err(), "ready before the table was applied: {r:?}");
    status.enforced.store(true, Ordering::Release);
    status
        .wait_programmed("trla", Duration::from_secs(5))
        .await
        .expect("programmed and enforced");
}
