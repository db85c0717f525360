//! ClusterNetworkPolicy through the CLI (SQLite): apply (v1alpha2 and v1beta1), `get cnp`,
//! `policy trace` and `policy show` naming the admin and baseline tiers around a Kubernetes
//! NetworkPolicy, bad documents refused with the field named and nothing stored, `delete -f`.
//! Run under the integration lock (fixed namespace tags).

mod common;

use std::process::Output;

use common::Cluster;

const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: red}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {team: blue}}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: a-eth0, namespace: x, labels: {app: a}}
spec: {node: n1, pod: a, ipNetworks: [10.0.0.1/32]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: c-eth0, namespace: y, labels: {app: c}}
spec: {node: n2, pod: c, ipNetworks: [10.0.1.3/32]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all, namespace: x}
spec:
  podSelector: {}
  ingress: [{}]
"#;

const POLICIES: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: deny-y-80}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {team: red}}}
  ingress:
  - name: pass-y-81
    action: Pass
    from: [{namespaces: {matchLabels: {team: blue}}}]
    protocols: [{tcp: {destinationPort: {number: 81}}}, {udp: {destinationPort: {number: 81}}}]
  - name: deny-y
    action: Deny
    from: [{namespaces: {matchLabels: {team: blue}}}]
---
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: default}
spec:
  tier: Baseline
  priority: 0
  subject: {namespaces: {}}
  egress:
  - action: Deny
    to: [{networks: [198.51.100.0/24]}]
"#;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn cluster_network_policy_cli() {
    let c = Cluster::new("cnpcli", false, 0);
    c.cli_ok(&["apply", "-f", "-"], Some(WORLD));
    let out = c.cli_ok(&["apply", "-f", "-"], Some(POLICIES));
    assert!(
        out.contains("ClusterNetworkPolicy/deny-y-80 created")
            && out.contains("ClusterNetworkPolicy/default created"),
        "{out}"
    );
    let out = c.cli_ok(&["get", "cnp"], None);
    assert!(out.contains("PRIORITY") && out.contains("SUBJECT"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("deny-y-80") && l.contains("Admin") && l.contains("10")),
        "{out}"
    );
    let out = c.cli_ok(
        &["get", "clusternetworkpolicies", "default", "-o", "yaml"],
        None,
    );
    assert!(
        out.contains("apiVersion: policy.networking.k8s.io/v1beta1"),
        "{out}"
    );

    // The Admin deny wins over the NetworkPolicy's allow; the tier is named.
    let out = c.cli(&["policy", "trace", "y/c", "x/a", "--port", "80"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("tier admin (ClusterNetworkPolicy Admin tier"),
        "{t}"
    );
    assert!(t.contains("policy cnp/deny-y-80 (priority 10)"), "{t}");
    // Model rules 0 and 1 are the Pass rule's two protocols; 2 is the written rule 1.
    assert!(
        t.contains("rule 1 Pass (from rule 0 \"pass-y-81\"): no match: protocol"),
        "{t}"
    );
    assert!(
        t.contains("denied by ingress rule 2 (Deny) of cnp/deny-y-80 (from rule 1 \"deny-y\")"),
        "{t}"
    );
    // Pass: on to the NetworkPolicy, which allows.
    let out = c.cli(&["policy", "trace", "y/c", "x/a", "--port", "81"], None);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("passed to the next tier by rule 0 of cnp/deny-y-80"),
        "{t}"
    );
    assert!(
        t.contains("allowed by ingress rule 0 (Allow) of knp/x/allow-all"),
        "{t}"
    );
    // The Baseline tier decides egress to the network no NetworkPolicy isolates for.
    let out = c.cli(
        &["policy", "trace", "x/a", "198.51.100.9", "--port", "443"],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("tier baseline (ClusterNetworkPolicy Baseline tier"),
        "{t}"
    );
    assert!(
        t.contains("denied by egress rule 0 (Deny) of cnp/default"),
        "{t}"
    );
    // show: admin, then the NetworkPolicy's tier; egress: baseline.
    let out = c.cli_ok(&["policy", "show", "x/a"], None);
    let admin = out
        .find("1. cnp/deny-y-80 (priority 10)")
        .unwrap_or_else(|| panic!("{out}"));
    let knp = out
        .find("2. knp/x/allow-all")
        .unwrap_or_else(|| panic!("{out}"));
    assert!(admin < knp, "{out}");
    assert!(
        out.contains("tier baseline") && out.contains("cnp/default (priority 0)"),
        "{out}"
    );

    // Bad input: the field named, nothing stored.
    let before = c.cli_ok(&["get", "cnp", "-o", "json"], None);
    for (from, to, want) in [
        ("priority: 10", "priority: 1001", "spec.priority: 1001 is out of range (0-1000)"),
        (
            "subject: {namespaces: {matchLabels: {team: red}}}",
            "subject: {namespaces: {}, pods: {podSelector: {}}}",
            "spec.subject: give namespaces or pods, not both",
        ),
        (
            "from: [{namespaces: {matchLabels: {team: blue}}}]\n---",
            "from: [{namespaces: {matchLabels: {team: blue}}}]\n  - action: Deny\n    from: [{pods: {podSelector: {}}, nodes: {}}]\n---",
            "unknown field `nodes`",
        ),
        (
            "to: [{networks: [198.51.100.0/24]}]",
            "to: [{domainNames: [example.com]}]",
            "spec.egress[0].to[0].domainNames: is not supported",
        ),
    ] {
        assert!(POLICIES.contains(from), "{from}");
        let bad = POLICIES.replacen(from, to, 1);
        let out = c.cli(&["apply", "-f", "-"], Some(&bad));
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains(want), "{want}: {}", text(&out));
        assert_eq!(c.cli_ok(&["get", "cnp", "-o", "json"], None), before);
    }
    let many: String = "  - action: Deny\n    to: [{networks: [10.0.0.0/8]}]\n".repeat(26);
    let bad = POLICIES.replacen(
        "  egress:\n  - action: Deny\n    to: [{networks: [198.51.100.0/24]}]\n",
        &format!("  egress:\n{many}"),
        1,
    );
    let out = c.cli(&["apply", "-f", "-"], Some(&bad));
    assert!(
        text(&out).contains("spec.egress: has 26 entries; at most 25"),
        "{}",
        text(&out)
    );
    assert_eq!(c.cli_ok(&["get", "cnp", "-o", "json"], None), before);

    // The v1alpha1 kinds: an AdminNetworkPolicy before the ClusterNetworkPolicy (priority 5 <
    // 10) and the BaselineAdminNetworkPolicy, listed and traced under their own names.
    let v1alpha1 = r#"
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {name: allow-y-80}
spec:
  priority: 5
  subject: {namespaces: {matchLabels: {team: red}}}
  ingress:
  - action: Allow
    from: [{namespaces: {matchLabels: {team: blue}}}]
    ports: [{portNumber: {port: 80}}]
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  egress:
  - action: Deny
    to: [{networks: [203.0.113.0/24]}]
"#;
    c.cli_ok(&["apply", "-f", "-"], Some(v1alpha1));
    let out = c.cli_ok(&["get", "anp"], None);
    assert!(
        out.lines()
            .any(|l| l.starts_with("allow-y-80") && l.contains("Admin") && l.contains(" 5 ")),
        "{out}"
    );
    let out = c.cli_ok(&["get", "banp"], None);
    assert!(
        out.lines()
            .any(|l| l.starts_with("default") && l.contains("Baseline")),
        "{out}"
    );
    let out = c.cli(&["policy", "trace", "y/c", "x/a", "--port", "80"], None);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("policy anp/allow-y-80 (priority 5)"), "{t}");
    assert!(
        t.contains("allowed by ingress rule 0 (Allow) of anp/allow-y-80"),
        "{t}"
    );
    let out = c.cli(
        &["policy", "trace", "x/a", "203.0.113.9", "--port", "443"],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("denied by egress rule 0 (Deny) of banp/default"),
        "{}",
        text(&out)
    );
    let out = c.cli(
        &["apply", "-f", "-"],
        Some(&v1alpha1.replace("name: default", "name: other")),
    );
    assert!(
        text(&out)
            .contains("metadata.name: \"other\": the BaselineAdminNetworkPolicy is a singleton"),
        "{}",
        text(&out)
    );
    c.cli_ok(&["delete", "-f", "-"], Some(v1alpha1));

    // delete -f: gone, and the trace no longer names them.
    c.cli_ok(&["delete", "-f", "-"], Some(POLICIES));
    let out = c.cli(&["get", "cnp"], None);
    assert!(
        text(&out).contains("No clusternetworkpolicies found"),
        "{}",
        text(&out)
    );
    let out = c.cli(&["policy", "trace", "y/c", "x/a", "--port", "80"], None);
    assert!(out.status.success(), "{}", text(&out));
}
