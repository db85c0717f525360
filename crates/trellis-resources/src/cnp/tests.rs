use crate::{parse_documents, Kind, Resource, ResourceError};

/// upstream conformance/base/admin_tier/standard-egress-tcp-rules.yaml (two rules of it).
const EGRESS_TCP: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: egress-tcp
spec:
  tier: Admin
  priority: 6
  subject:
    namespaces:
      matchLabels:
          kubernetes.io/metadata.name: network-policy-conformance-gryffindor
  egress:
  - name: "allow-to-ravenclaw-everything"
    action: "Accept"
    to:
    - namespaces:
        matchLabels:
          kubernetes.io/metadata.name: network-policy-conformance-ravenclaw
  - name: "deny-to-slytherin-at-port-80"
    action: "Deny"
    to:
    - namespaces:
        matchLabels:
          kubernetes.io/metadata.name: network-policy-conformance-slytherin
    protocols:
      - tcp:
          destinationPort:
            number: 80
      - udp:
          destinationPort:
            range: {start: 53, end: 60}
"#;

fn one(text: &str) -> Result<Resource, ResourceError> {
    parse_documents(text).map(|mut v| v.remove(0))
}

/// The upstream example with `from` replaced (a line-wise edit of the YAML).
fn edited(from: &str, to: &str) -> String {
    assert!(EGRESS_TCP.contains(from), "{from:?} not in the example");
    EGRESS_TCP.replacen(from, to, 1)
}

fn refused(text: &str, field: &str, reason: &str) {
    let e = one(text).expect_err("must be refused");
    assert_eq!(e.field, field, "{e}");
    assert!(e.reason.contains(reason), "{e}");
}

#[test]
fn upstream_example_parses_and_is_stored_as_v1beta1() {
    let r = one(EGRESS_TCP).unwrap();
    assert_eq!(r.kind(), Kind::ClusterNetworkPolicy);
    assert_eq!(r.key(), "/trellis/v1/clusternetworkpolicies/egress-tcp");
    let v = r.to_value();
    assert_eq!(v["apiVersion"], "policy.networking.k8s.io/v1beta1");
    // What is stored reads back unchanged.
    let back = Resource::from_value(&v).unwrap();
    assert_eq!(back, r);
    let beta = EGRESS_TCP.replace("v1alpha2", "v1beta1");
    assert_eq!(one(&beta).unwrap(), r);
    assert_eq!(Kind::parse("cnp"), Some(Kind::ClusterNetworkPolicy));
    assert_eq!(
        Kind::parse("clusternetworkpolicies"),
        Some(Kind::ClusterNetworkPolicy)
    );
}

#[test]
fn other_api_versions_are_refused() {
    let e = one(&EGRESS_TCP.replace("v1alpha2", "v3")).unwrap_err();
    assert_eq!(e.field, "apiVersion", "{e}");
    assert!(
        e.reason
            .contains("policy.networking.k8s.io/v1beta1 or policy.networking.k8s.io/v1alpha2"),
        "{e}"
    );
}

#[test]
fn priority_out_of_range() {
    refused(
        &edited("priority: 6", "priority: 1001"),
        "spec.priority",
        "1001 is out of range (0-1000)",
    );
    refused(
        &edited("priority: 6", "priority: -1"),
        "spec.priority",
        "out of range",
    );
    assert!(one(&edited("priority: 6", "priority: 1000")).is_ok());
    assert!(one(&edited("priority: 6", "priority: 0")).is_ok());
}

#[test]
fn subject_needs_exactly_one_of_namespaces_and_pods() {
    let both = edited(
        "  subject:\n    namespaces:",
        "  subject:\n    pods:\n      podSelector: {}\n    namespaces:",
    );
    refused(&both, "spec.subject", "not both");
    let none = edited(
        "  subject:\n    namespaces:\n      matchLabels:\n          kubernetes.io/metadata.name: network-policy-conformance-gryffindor\n",
        "  subject: {}\n",
    );
    refused(&none, "spec.subject", "must give namespaces or pods");
}

#[test]
fn pass_is_admin_only() {
    let text = edited("tier: Admin", "tier: Baseline").replacen(
        "action: \"Accept\"",
        "action: \"Pass\"",
        1,
    );
    refused(
        &text,
        "spec.egress[0].action",
        "only valid in the Admin tier",
    );
    // Baseline with Accept/Deny is fine.
    assert!(one(&edited("tier: Admin", "tier: Baseline")).is_ok());
}

fn rules(n: usize) -> String {
    let rule = "  - action: Deny\n    to:\n    - networks: [\"10.0.0.0/8\"]\n";
    format!(
        "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {{name: many}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress:\n{}",
        rule.repeat(n)
    )
}

#[test]
fn at_most_25_rules_and_25_peers() {
    assert!(one(&rules(25)).is_ok());
    refused(&rules(26), "spec.egress", "has 26 entries; at most 25");
    let peers = |n: usize| {
        format!(
            "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {{name: many}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  ingress:\n  - action: Deny\n    from:\n{}",
            "    - namespaces: {}\n".repeat(n)
        )
    };
    assert!(one(&peers(25)).is_ok());
    refused(&peers(26), "spec.ingress[0].from", "at most 25");
    let none = peers(0).replace("    from:\n", "    from: []\n");
    refused(&none, "spec.ingress[0].from", "at least one peer");
}

#[test]
fn unknown_fields_are_named() {
    refused(
        &edited("priority: 6", "priority: 6\n  prority: 7"),
        "spec.prority",
        "unknown field `prority`",
    );
    // Ingress peers have no networks.
    let text = "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: x}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  ingress:\n  - action: Deny\n    from:\n    - networks: [\"10.0.0.0/8\"]\n";
    refused(
        text,
        "spec.ingress[0].from[0].networks",
        "unknown field `networks`",
    );
}

#[test]
fn domain_names_are_refused_not_ignored() {
    let text = edited(
        "    - namespaces:\n        matchLabels:\n          kubernetes.io/metadata.name: network-policy-conformance-ravenclaw\n",
        "    - domainNames: [\"kubernetes.io\"]\n",
    );
    refused(&text, "spec.egress[0].to[0].domainNames", "not supported");
}

#[test]
fn peers_and_protocols_need_one_field() {
    let text = edited(
        "    - namespaces:\n        matchLabels:\n          kubernetes.io/metadata.name: network-policy-conformance-ravenclaw\n",
        "    - namespaces: {}\n      networks: [\"10.0.0.0/8\"]\n",
    );
    refused(&text, "spec.egress[0].to[0]", "exactly one");
    // A peer with no field is kept: it fails closed (see trellis-policy's translation).
    let empty = edited(
        "    - namespaces:\n        matchLabels:\n          kubernetes.io/metadata.name: network-policy-conformance-ravenclaw\n",
        "    - {}\n",
    );
    assert!(one(&empty).is_ok());
    refused(
        &edited(
            "      - tcp:",
            "      - sctp:\n          destinationPort: {number: 9}\n        tcp:",
        ),
        "spec.egress[1].protocols[0]",
        "exactly one of tcp, udp, sctp",
    );
    refused(
        &edited("number: 80", "number: 0"),
        "spec.egress[1].protocols[0].tcp.destinationPort.number",
        "not a port number",
    );
    refused(
        &edited("start: 53, end: 60", "start: 60, end: 53"),
        "spec.egress[1].protocols[1].udp.destinationPort.range",
        "less than end",
    );
    refused(
        &edited(
            "number: 80",
            "number: 80\n            range: {start: 1, end: 2}",
        ),
        "spec.egress[1].protocols[0].tcp.destinationPort",
        "exactly one of number and range",
    );
}

#[test]
fn networks_are_cidrs_and_named_ports_need_pods() {
    let nets = |n: &str| {
        format!("apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {{name: x}}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {{namespaces: {{}}}}\n  egress:\n  - action: Deny\n    to:\n    - networks: [{n}]\n")
    };
    assert!(one(&nets("\"10.0.0.0/8\", \"fd00::/8\"")).is_ok());
    refused(
        &nets("\"10.0.0.0/33\""),
        "spec.egress[0].to[0].networks[0]",
        "not a CIDR",
    );
    let named = format!(
        "{}    protocols:\n    - destinationNamedPort: web\n",
        nets("\"10.0.0.0/8\"")
    );
    refused(&named, "spec.egress[0].to[0]", "destinationNamedPort");
}

#[test]
fn rule_names_are_bounded() {
    let long = "n".repeat(101);
    refused(
        &edited("allow-to-ravenclaw-everything", &long),
        "spec.egress[0].name",
        "longer than 100",
    );
}

/// Upstream's `MinItems=1` on the optional lists: `[]` is refused, not read as "absent" (an
/// empty `protocols` would match every port, an empty `networks` would be a peer with no field,
/// which fails closed). Hostile review.
#[test]
fn empty_optional_lists_are_refused() {
    let f = "spec.egress[1].protocols";
    refused(
        &edited(
            "    protocols:\n      - tcp:\n          destinationPort:\n            number: 80\n      - udp:\n          destinationPort:\n            range: {start: 53, end: 60}\n",
            "    protocols: []\n",
        ),
        f,
        "empty",
    );
    let to = "    - namespaces:\n        matchLabels:\n          kubernetes.io/metadata.name: network-policy-conformance-slytherin\n";
    refused(
        &edited(to, "    - networks: []\n"),
        "spec.egress[1].to[0].networks",
        "empty",
    );
    refused(
        &edited(to, "    - domainNames: []\n"),
        "spec.egress[1].to[0].domainNames",
        "empty",
    );
    let anp = "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: a}\nspec:\n  priority: 1\n  subject: {namespaces: {}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {}}]\n    ports: []\n";
    refused(anp, "spec.ingress[0].ports", "empty");
}
