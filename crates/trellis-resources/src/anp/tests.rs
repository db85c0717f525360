use crate::cnp::{CnpAction, CnpTier};
use crate::{parse_documents, Kind, Resource, ResourceError};

const ANP: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: sensitive}
spec:
  priority: 5
  subject: {namespaces: {matchLabels: {team: red}}}
  ingress:
  - name: pass-monitoring
    action: Pass
    from: [{namespaces: {matchLabels: {app: monitoring}}}]
    ports:
    - portNumber: {port: 9090}
    - portRange: {protocol: UDP, start: 50, end: 60}
    - namedPort: web
  egress:
  - action: Deny
    to: [{networks: [198.51.100.0/24]}]
"#;

const BANP: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  ingress:
  - action: Deny
    from: [{namespaces: {}}]
"#;

fn one(text: &str) -> Result<Resource, ResourceError> {
    parse_documents(text).map(|mut v| v.remove(0))
}

fn refused(text: &str, field: &str, reason: &str) {
    let e = one(text).expect_err("must be refused");
    assert_eq!(e.field, field, "{e}");
    assert!(e.reason.contains(reason), "{e}");
}

#[test]
fn admin_network_policy_maps_onto_the_admin_tier() {
    let r = one(ANP).unwrap();
    assert_eq!(r.kind(), Kind::AdminNetworkPolicy);
    assert_eq!(r.key(), "/trellis/v1/adminnetworkpolicies/sensitive");
    assert_eq!(
        r.to_value()["apiVersion"],
        "policy.networking.k8s.io/v1alpha1"
    );
    assert_eq!(Resource::from_value(&r.to_value()).unwrap(), r);
    let Resource::AdminNetworkPolicy(o) = r else {
        unreachable!()
    };
    let c = o.spec.to_cluster();
    assert_eq!((c.tier, c.priority), (CnpTier::Admin, 5));
    assert_eq!(c.ingress[0].action, CnpAction::Pass);
    let p = &c.ingress[0].protocols;
    // portNumber defaults to TCP; portRange keeps its protocol; namedPort as is.
    assert_eq!(
        p[0].tcp.unwrap().destination_port.unwrap().number,
        Some(9090)
    );
    let r = p[1].udp.unwrap().destination_port.unwrap().range.unwrap();
    assert_eq!((r.start, r.end), (50, 60));
    assert_eq!(p[2].destination_named_port.as_deref(), Some("web"));
    assert_eq!(Kind::parse("anp"), Some(Kind::AdminNetworkPolicy));
}

#[test]
fn baseline_admin_network_policy_is_the_singleton_default() {
    let r = one(BANP).unwrap();
    let Resource::BaselineAdminNetworkPolicy(o) = r else {
        unreachable!()
    };
    let c = o.spec.to_cluster();
    assert_eq!((c.tier, c.priority), (CnpTier::Baseline, 0));
    assert_eq!(c.ingress[0].action, CnpAction::Deny);
    refused(
        &BANP.replace("name: default", "name: other"),
        "metadata.name",
        "singleton named \"default\"",
    );
    refused(
        &BANP.replace("action: Deny", "action: Pass"),
        "spec.ingress[0].action",
        "only valid in AdminNetworkPolicy",
    );
    assert_eq!(Kind::parse("banp"), Some(Kind::BaselineAdminNetworkPolicy));
}

#[test]
fn v1alpha1_bad_input_names_the_field() {
    refused(
        &ANP.replace("priority: 5", "priority: 1001"),
        "spec.priority",
        "out of range",
    );
    refused(
        &ANP.replace(
            "- namedPort: web",
            "- namedPort: web\n      portNumber: {port: 1}",
        ),
        "spec.ingress[0].ports[2]",
        "exactly one of portNumber, namedPort and portRange",
    );
    // v1alpha1's own field names, not the mapped ClusterNetworkPolicy's.
    refused(
        &ANP.replace("start: 50", "start: 70"),
        "spec.ingress[0].ports[1].portRange",
        "less than end",
    );
    refused(
        &ANP.replace("start: 50", "start: 0"),
        "spec.ingress[0].ports[1].portRange.start",
        "not a port number",
    );
    refused(
        &ANP.replace("{port: 9090}", "{port: 0}"),
        "spec.ingress[0].ports[0].portNumber.port",
        "not a port number",
    );
    refused(
        &ANP.replace("namedPort: web", "namedPort: Not_A_Name"),
        "spec.ingress[0].ports[2].namedPort",
        "",
    );
    refused(
        &ANP.replace(
            "to: [{networks: [198.51.100.0/24]}]",
            "to: [{domainNames: [example.com]}]",
        ),
        "spec.egress[0].to[0].domainNames",
        "not supported",
    );
    // v1alpha1 allows 100 rules (ClusterNetworkPolicy 25).
    let rule = "  - action: Deny\n    to: [{networks: [10.0.0.0/8]}]\n";
    let many = |n: usize| {
        ANP.replace(
            "  egress:\n  - action: Deny\n    to: [{networks: [198.51.100.0/24]}]\n",
            &format!("  egress:\n{}", rule.repeat(n)),
        )
    };
    assert!(one(&many(100)).is_ok());
    refused(&many(101), "spec.egress", "has 101 entries; at most 100");
}
