//! Hand-written truth tables: every rule field, every ordering rule. Policies are written as the
//! YAML an operator applies and go through [`crate::translate`], so these also check that each
//! field reaches the model.

use super::*;
use crate::translate::translate;

/// Two namespaces, four pods, two network sets, service accounts and a profile.
const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: red}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {team: blue}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: api, namespace: x, labels: {tier: backend}}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: a, namespace: x, labels: {app: a, role: web}}
spec:
  node: n1
  pod: a
  serviceAccountName: api
  ipNetworks: [10.0.0.1/32, 'fd00::1/128']
  ports: [{name: http, protocol: TCP, port: 8080}, {name: dns, protocol: UDP, port: 53}]
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {node: n1, pod: b, ipNetworks: [10.0.0.2/32], ports: [{name: http, protocol: TCP, port: 9090}]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: c, namespace: y, labels: {app: c, role: web}}
spec: {node: n2, pod: c, ipNetworks: [10.0.1.3/32]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: d, namespace: y, labels: {app: d}}
spec: {node: n2, pod: d, ipNetworks: [10.0.1.4/32], profiles: [open-web]}
---
apiVersion: projectcalico.org/v3
kind: NetworkSet
metadata: {name: partners, namespace: x, labels: {role: partner}}
spec: {nets: [192.168.0.0/24]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: internet, labels: {role: world}}
spec: {nets: [198.51.100.0/24]}
---
apiVersion: projectcalico.org/v3
kind: Profile
metadata: {name: open-web}
spec:
  labelsToApply: {profiled: 'yes', app: overridden}
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [80]}}]
  egress: [{action: Allow}]
"#;

fn model(policies: &str) -> Model {
    let docs = trellis_resources::parse_documents(&format!("{WORLD}---\n{policies}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let t = translate(&docs);
    assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    t.model
}

fn peer(s: &str) -> Peer {
    if let Some(n) = s.strip_prefix("node:") {
        let (node, a) = n.split_once('@').unwrap();
        return Peer::Node {
            node: node.into(),
            address: a.parse().unwrap(),
        };
    }
    match s.split_once('/') {
        Some((ns, n)) => Peer::Endpoint {
            namespace: ns.into(),
            name: n.into(),
        },
        None => Peer::Address(s.parse().unwrap()),
    }
}

/// `"x/a -> y/c tcp/80"`, `"x/a -> 10.9.9.9 icmp/8/0"`, `"x/a:5000 -> y/c udp/53"`.
fn flow(s: &str) -> Flow {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [src, "->", dst, what] = parts.as_slice() else {
        panic!("{s}")
    };
    let (src, sport) = match src
        .rsplit_once(':')
        .filter(|(_, p)| !p.contains(':') && p.parse::<u16>().is_ok() && src.contains('/'))
    {
        Some((a, p)) => (a, Some(p.parse().unwrap())),
        None => (*src, None),
    };
    let mut w = what.split('/');
    let proto = match w.next().unwrap() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        "icmp" => Protocol::Icmp,
        "icmpv6" => Protocol::Icmpv6,
        n => Protocol::Number(n.parse().unwrap()),
    };
    let nums: Vec<u8> = w.clone().map(|x| x.parse().unwrap_or(0)).collect();
    let (port, icmp) = if matches!(proto, Protocol::Icmp | Protocol::Icmpv6) {
        let icmp = nums.first().map(|t| IcmpMatch {
            icmp_type: *t,
            code: nums.get(1).copied(),
        });
        (None, icmp)
    } else {
        (w.next().map(|p| p.parse().unwrap()), None)
    };
    Flow {
        source: peer(src),
        destination: peer(dst),
        protocol: proto,
        port,
        source_port: sport,
        icmp,
    }
}

/// Each row: a flow and whether it is allowed.
fn table(m: &Model, rows: &[(&str, bool)]) {
    for (f, want) in rows {
        let t = evaluate(m, &flow(f));
        assert_eq!(t.allowed, *want, "{f}: {:#?}", (&t.egress, &t.ingress));
    }
}

fn gnp(name: &str, body: &str) -> String {
    format!("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{body}---\n")
}

fn np(ns: &str, name: &str, body: &str) -> String {
    format!("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}---\n")
}

fn tier(name: &str, order: &str, action: &str) -> String {
    format!("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: {name}}}\nspec: {{{order} defaultAction: {action}}}\n---\n")
}

/// Ingress to x/a with one rule; the rest denied by the tier default.
fn ingress_rule(rule: &str) -> Model {
    model(&gnp(
        "r",
        &format!("  selector: app == 'a'\n  ingress:\n  - {rule}\n"),
    ))
}

#[test]
fn no_policy_allows_and_unpoliced_cases() {
    let m = model("");
    table(
        &m,
        &[
            ("x/a -> y/c tcp/80", true),
            ("10.9.9.9 -> x/a udp/53", true),
        ],
    );
    let t = evaluate(&m, &flow("x/a -> y/c tcp/80"));
    assert_eq!(t.egress.verdict, Verdict::NoPolicy);
    // Deny everything to and from every pod.
    let m = model(&gnp(
        "deny",
        "  selector: all()\n  types: [Ingress, Egress]\n",
    ));
    table(
        &m,
        &[
            ("x/a -> y/c tcp/80", false),
            ("10.9.9.9 -> x/a tcp/80", false),
            ("x/a -> 10.9.9.9 tcp/80", false),
            // A pod and its own node, either way; a pod to itself.
            ("node:n1@172.16.0.1 -> x/a tcp/80", true),
            ("x/b -> node:n1@172.16.0.1 tcp/10250", true),
            ("x/a -> x/a tcp/80", true),
            // Another node is not exempt.
            ("node:n2@172.16.0.2 -> x/a tcp/80", false),
            // Pod addresses are the pods.
            ("10.0.0.2 -> 10.0.0.1 tcp/80", false),
        ],
    );
    let t = evaluate(&m, &flow("node:n1@172.16.0.1 -> x/a tcp/80"));
    assert_eq!(t.ingress.verdict, Verdict::OwnNode);
    let t = evaluate(&m, &flow("10.9.9.9 -> x/a tcp/80"));
    assert_eq!(t.egress.verdict, Verdict::NotAnEndpoint);
    assert_eq!(
        t.ingress.verdict,
        Verdict::TierDefault {
            tier: "default".into()
        }
    );
    // Naming a pod that does not exist.
    let t = evaluate(&m, &flow("x/a -> x/nope tcp/80"));
    assert!(!t.allowed);
    assert_eq!(t.ingress.verdict, Verdict::UnknownEndpoint);
}

#[test]
fn actions_allow_deny_log_pass() {
    let m = model(&gnp(
        "p",
        "  selector: app == 'a'\n  ingress:\n  - {action: Log}\n  - {action: Deny, protocol: UDP}\n  - {action: Allow, protocol: TCP}\n  - {action: Pass, protocol: SCTP}\n",
    ));
    table(
        &m,
        &[
            ("y/c -> x/a tcp/80", true),
            ("y/c -> x/a udp/53", false),
            // Pass: the default tier is the last one, no profile: allowed.
            ("y/c -> x/a sctp/9", true),
            // No rule: the tier's default.
            ("y/c -> x/a icmp/8", false),
        ],
    );
    let t = evaluate(&m, &flow("y/c -> x/a tcp/80"));
    let rules = &t.ingress.tiers[0].policies[0].rules;
    // Log matched and evaluation continued; the UDP rule did not match on its protocol.
    assert_eq!(
        (rules[0].action, rules[0].mismatch.is_none()),
        (Action::Log, true)
    );
    assert_eq!(rules[1].mismatch.as_ref().unwrap().field, "protocol");
    assert!(
        matches!(t.ingress.verdict, Verdict::Rule { action: Action::Allow, ref rule } if rule.index == 2)
    );
    let t = evaluate(&m, &flow("y/c -> x/a sctp/9"));
    assert_eq!(t.ingress.verdict, Verdict::EndOfTiers);
    assert!(matches!(t.ingress.tiers[0].passed, Some(PassedBy::Rule(_))));
}

#[test]
fn ip_version_protocol_and_not_protocol() {
    let m = ingress_rule("{action: Allow, ipVersion: 6}");
    table(
        &m,
        &[
            ("fd00::9 -> x/a tcp/80", true),
            ("10.9.9.9 -> x/a tcp/80", false),
        ],
    );
    let t = evaluate(&m, &flow("10.9.9.9 -> x/a tcp/80"));
    assert_eq!(
        t.ingress.tiers[0].policies[0].rules[0]
            .mismatch
            .as_ref()
            .unwrap()
            .field,
        "ipVersion"
    );
    let m = ingress_rule("{action: Allow, protocol: 17}");
    table(
        &m,
        &[("y/c -> x/a udp/53", true), ("y/c -> x/a tcp/53", false)],
    );
    let m = ingress_rule("{action: Allow, notProtocol: TCP}");
    table(
        &m,
        &[("y/c -> x/a udp/53", true), ("y/c -> x/a tcp/53", false)],
    );
}

#[test]
fn icmp_and_not_icmp() {
    let m = ingress_rule("{action: Allow, protocol: ICMP, icmp: {type: 8, code: 0}}");
    table(
        &m,
        &[
            ("y/c -> x/a icmp/8/0", true),
            ("y/c -> x/a icmp/8/1", false),
            ("y/c -> x/a icmp/0/0", false),
        ],
    );
    let m = ingress_rule("{action: Allow, protocol: ICMP, icmp: {type: 8}}");
    table(
        &m,
        &[("y/c -> x/a icmp/8/5", true), ("y/c -> x/a icmp/3", false)],
    );
    let m = ingress_rule("{action: Allow, protocol: ICMP, notICMP: {type: 8}}");
    table(
        &m,
        &[
            ("y/c -> x/a icmp/0/0", true),
            ("y/c -> x/a icmp/8/0", false),
        ],
    );
    let t = evaluate(&m, &flow("y/c -> x/a icmp/8/0"));
    assert_eq!(
        t.ingress.tiers[0].policies[0].rules[0]
            .mismatch
            .as_ref()
            .unwrap()
            .field,
        "notICMP"
    );
}

#[test]
fn nets_and_not_nets() {
    let m = ingress_rule("{action: Allow, source: {nets: [10.0.1.0/24], notNets: [10.0.1.4/32]}}");
    table(
        &m,
        &[
            ("y/c -> x/a tcp/80", true),
            ("y/d -> x/a tcp/80", false),
            ("x/b -> x/a tcp/80", false),
            ("10.0.1.200 -> x/a tcp/80", true),
        ],
    );
    let t = evaluate(&m, &flow("y/d -> x/a tcp/80"));
    assert_eq!(
        t.ingress.tiers[0].policies[0].rules[0]
            .mismatch
            .as_ref()
            .unwrap()
            .field,
        "source.notNets"
    );
    let t = evaluate(&m, &flow("x/b -> x/a tcp/80"));
    assert_eq!(
        t.ingress.tiers[0].policies[0].rules[0]
            .mismatch
            .as_ref()
            .unwrap()
            .field,
        "source.nets"
    );
    // Destination nets, on egress.
    let m = model(&gnp("e", "  selector: app == 'a'\n  egress:\n  - {action: Allow, destination: {nets: [198.51.100.0/24]}}\n"));
    table(
        &m,
        &[
            ("x/a -> 198.51.100.7 tcp/443", true),
            ("x/a -> 203.0.113.7 tcp/443", false),
        ],
    );
}

#[test]
fn selectors_and_not_selectors_match_endpoints_and_network_sets() {
    // A global policy's selectors see every namespace and global network sets.
    let m = ingress_rule(
        "{action: Allow, source: {selector: \"role in {'web', 'partner', 'world'}\"}}",
    );
    table(
        &m,
        &[
            ("y/c -> x/a tcp/80", true),
            ("y/d -> x/a tcp/80", false),
            ("192.168.0.9 -> x/a tcp/80", true),
            ("198.51.100.9 -> x/a tcp/80", true),
            ("203.0.113.9 -> x/a tcp/80", false),
        ],
    );
    let t = evaluate(&m, &flow("203.0.113.9 -> x/a tcp/80"));
    let mm = t.ingress.tiers[0].policies[0].rules[0]
        .mismatch
        .clone()
        .unwrap();
    assert_eq!(mm.field, "source.selector");
    assert!(mm.reason.contains("no endpoint or network set"), "{mm:?}");
    let m = ingress_rule("{action: Allow, source: {notSelector: role == 'partner'}}");
    table(
        &m,
        &[
            ("192.168.0.9 -> x/a tcp/80", false),
            ("203.0.113.9 -> x/a tcp/80", true),
            ("y/c -> x/a tcp/80", true),
        ],
    );
    // Implicit labels: the namespace, the service account, and a profile's labelsToApply (the
    // endpoint's own labels win).
    let m = ingress_rule("{action: Allow, source: {selector: \"projectcalico.org/namespace == 'y' && profiled == 'yes' && app == 'd'\"}}");
    table(
        &m,
        &[("y/d -> x/a tcp/80", true), ("y/c -> x/a tcp/80", false)],
    );
}

#[test]
fn namespace_scopes() {
    // A namespaced policy's selectors look in its namespace only...
    let m = model(&np("x", "p", "  selector: app == 'a'\n  ingress:\n  - {action: Allow, source: {selector: role == 'web'}}\n  - {action: Allow, source: {selector: role == 'partner'}}\n"));
    table(
        &m,
        &[
            ("y/c -> x/a tcp/80", false),
            ("192.168.0.9 -> x/a tcp/80", true),
        ],
    );
    let t = evaluate(&m, &flow("y/c -> x/a tcp/80"));
    let mm = t.ingress.tiers[0].policies[0].rules[0]
        .mismatch
        .clone()
        .unwrap();
    assert!(mm.reason.contains("outside namespace x"), "{mm:?}");
    // ...unless a namespaceSelector widens them.
    let m = model(&np("x", "p", "  selector: app == 'a'\n  ingress:\n  - {action: Allow, source: {selector: role == 'web', namespaceSelector: team == 'blue'}}\n"));
    table(
        &m,
        &[
            ("y/c -> x/a tcp/80", true),
            ("y/d -> x/a tcp/80", false),
            ("x/b -> x/a tcp/80", false),
        ],
    );
    // namespaceSelector alone: every endpoint of the matching namespaces.
    let m = model(&np("x", "p", "  selector: app == 'a'\n  ingress:\n  - {action: Allow, source: {namespaceSelector: all()}}\n"));
    table(
        &m,
        &[
            ("y/d -> x/a tcp/80", true),
            ("10.9.9.9 -> x/a tcp/80", false),
            ("198.51.100.9 -> x/a tcp/80", false),
        ],
    );
    // Namespaces by Calico's name label too.
    let m = model(&np("x", "p", "  selector: app == 'a'\n  ingress:\n  - {action: Allow, source: {namespaceSelector: projectcalico.org/name == 'y'}}\n"));
    table(
        &m,
        &[("y/d -> x/a tcp/80", true), ("x/b -> x/a tcp/80", false)],
    );
    // global(): only global network sets.
    let m = model(&np("x", "p", "  selector: app == 'a'\n  ingress:\n  - {action: Allow, source: {namespaceSelector: global(), selector: role == 'world'}}\n"));
    table(
        &m,
        &[
            ("198.51.100.9 -> x/a tcp/80", true),
            ("192.168.0.9 -> x/a tcp/80", false),
            ("y/c -> x/a tcp/80", false),
        ],
    );
    // In a namespaced policy, notSelector alone still limits the peer to the namespace (Calico).
    let m = model(&np("x", "p", "  selector: app == 'a'\n  ingress:\n  - {action: Allow, source: {notSelector: app == 'zz'}}\n"));
    table(
        &m,
        &[
            ("x/b -> x/a tcp/80", true),
            ("y/c -> x/a tcp/80", false),
            ("10.9.9.9 -> x/a tcp/80", false),
        ],
    );
    // A policy applies in its namespace only; a GNP's namespaceSelector picks namespaces.
    let m = model(&np("y", "deny", "  selector: all()\n"));
    table(
        &m,
        &[("x/b -> x/a tcp/80", true), ("x/b -> y/c tcp/80", false)],
    );
    let m = model(&gnp(
        "deny",
        "  namespaceSelector: team == 'red'\n  selector: all()\n",
    ));
    table(
        &m,
        &[("y/c -> x/a tcp/80", false), ("x/a -> y/c tcp/80", true)],
    );
}

#[test]
fn ports_ranges_named_ports_and_not_ports() {
    let m = ingress_rule("{action: Allow, protocol: TCP, destination: {ports: [80, '8000:8100', http], notPorts: [8050]}}");
    table(
        &m,
        &[
            ("y/c -> x/a tcp/80", true),
            ("y/c -> x/a tcp/8001", true),
            ("y/c -> x/a tcp/8050", false),
            ("y/c -> x/a tcp/81", false),
            // The named port resolves on the destination: x/a's http is TCP 8080 (in the range
            // anyway), x/b's is 9090.
            ("y/c -> x/a tcp/9090", false),
        ],
    );
    let t = evaluate(&m, &flow("y/c -> x/a tcp/8050"));
    assert_eq!(
        t.ingress.tiers[0].policies[0].rules[0]
            .mismatch
            .as_ref()
            .unwrap()
            .field,
        "destination.notPorts"
    );
    let m = model(&gnp(
        "p",
        "  selector: all()\n  ingress:\n  - {action: Allow, destination: {ports: [http]}}\n",
    ));
    table(
        &m,
        &[
            ("y/c -> x/a tcp/8080", true),
            ("y/c -> x/b tcp/9090", true),
            ("y/c -> x/b tcp/8080", false),
            // Protocol matters: x/a's dns is UDP 53; http is not a UDP port.
            ("y/c -> x/a udp/8080", false),
        ],
    );
    let m = model(&gnp(
        "p",
        "  selector: all()\n  ingress:\n  - {action: Allow, destination: {ports: [dns]}}\n",
    ));
    table(
        &m,
        &[("y/c -> x/a udp/53", true), ("y/c -> x/a tcp/53", false)],
    );
    // Source ports need the flow's source port.
    let m = ingress_rule("{action: Allow, protocol: UDP, source: {ports: [53]}}");
    table(
        &m,
        &[
            ("y/c:53 -> x/a udp/4000", true),
            ("y/c:54 -> x/a udp/4000", false),
            ("y/c -> x/a udp/4000", false),
        ],
    );
}

#[test]
fn service_accounts() {
    // Rule: by name, by the account's labels, both (AND).
    for (sam, a_ok) in [
        ("{names: [api]}", true),
        ("{names: [other]}", false),
        ("{selector: tier == 'backend'}", true),
        ("{names: [api], selector: tier == 'frontend'}", false),
    ] {
        let m = model(&gnp("p", &format!("  selector: app == 'c'\n  ingress:\n  - {{action: Allow, source: {{serviceAccounts: {sam}}}}}\n")));
        table(
            &m,
            &[("x/a -> y/c tcp/80", a_ok), ("x/b -> y/c tcp/80", false)],
        );
    }
    // Policy: serviceAccountSelector picks the endpoints it applies to, by the account's labels
    // or Calico's name label.
    for sel in ["tier == 'backend'", "projectcalico.org/name == 'api'"] {
        let m = model(&gnp(
            "deny",
            &format!("  serviceAccountSelector: \"{sel}\"\n"),
        ));
        table(
            &m,
            &[("y/c -> x/a tcp/80", false), ("y/c -> x/b tcp/80", true)],
        );
    }
}

/// A pod without a service account that labels itself `projectcalico.org/serviceaccount`
/// does not pass for that account's pods in selectors (Calico derives the label from the pod's
/// service account, never from its labels). Hostile review.
#[test]
fn a_pods_own_service_account_label_is_not_its_service_account() {
    let rogue = "apiVersion: trellis.dev/v1\nkind: WorkloadEndpoint\nmetadata: {name: s, namespace: x, labels: {projectcalico.org/serviceaccount: api}}\nspec: {node: n1, pod: s, ipNetworks: [10.0.0.7/32]}\n---\n";
    let m = model(&format!(
        "{rogue}{}",
        gnp(
            "p",
            "  selector: app == 'c'\n  ingress:\n  - {action: Allow, source: {selector: \"projectcalico.org/serviceaccount == 'api'\"}}\n",
        )
    ));
    table(
        &m,
        &[("x/a -> y/c tcp/80", true), ("x/s -> y/c tcp/80", false)],
    );
}

#[test]
fn tiers_order_then_name_none_last_and_pass() {
    // security (order 10) passes web traffic to the next tier and denies the rest; platform
    // (order 20) allows TCP 80; the default tier is last.
    let m = model(&(format!(
        "{}{}{}{}{}",
        tier("security", "order: 10,", "Deny"),
        tier("platform", "order: 20,", "Pass"),
        tier("late", "", "Deny"),
        gnp("sec", "  tier: security\n  selector: all()\n  ingress:\n  - {action: Pass, source: {selector: role == 'web'}}\n"),
        gnp("plat", "  tier: platform\n  selector: all()\n  ingress:\n  - {action: Allow, protocol: TCP, destination: {ports: [80]}}\n"),
    ) + &gnp("last", "  tier: late\n  selector: all()\n  ingress:\n  - {action: Deny, protocol: UDP}\n  - {action: Allow}\n")));
    table(
        &m,
        &[
            ("y/c -> x/a tcp/80", true),
            // Not web: security's default denies before anything else.
            ("y/d -> x/a tcp/80", false),
            // Passed, not allowed by platform whose default passes: late decides.
            ("y/c -> x/a udp/53", false),
            ("y/c -> x/a tcp/443", true),
        ],
    );
    let t = evaluate(&m, &flow("y/c -> x/a tcp/443"));
    let tiers: Vec<&str> = t.ingress.tiers.iter().map(|t| t.tier.as_str()).collect();
    assert_eq!(tiers, ["security", "platform", "late"]);
    assert_eq!(t.ingress.tiers[1].passed, Some(PassedBy::TierDefault));
    let t = evaluate(&m, &flow("y/d -> x/a tcp/80"));
    assert_eq!(
        t.ingress.verdict,
        Verdict::TierDefault {
            tier: "security".into()
        }
    );
    assert_eq!(
        t.ingress.tiers.len(),
        1,
        "evaluation stops at the deciding tier"
    );
}

#[test]
fn policies_order_then_name_none_last() {
    // In one tier: order 1 (deny UDP) before order 2 (allow all); ties by name (a-deny before
    // b-allow); no order sorts after every number.
    let m = model(&(format!(
        "{}{}{}{}",
        gnp("z-first", "  order: 1\n  selector: all()\n  ingress: [{action: Deny, protocol: UDP}]\n"),
        gnp("a-second", "  order: 2\n  selector: all()\n  ingress: [{action: Allow, protocol: UDP}, {action: Allow, protocol: SCTP}]\n"),
        gnp("b-allow", "  order: 5\n  selector: all()\n  ingress: [{action: Allow, protocol: TCP}]\n"),
        gnp("a-deny", "  order: 5\n  selector: all()\n  ingress: [{action: Deny, protocol: TCP}]\n"),
    ) + &gnp("unordered", "  selector: all()\n  ingress: [{action: Deny}]\n")
        + &gnp("zz-ordered", "  order: 100000\n  selector: all()\n  ingress: [{action: Allow}]\n")));
    table(
        &m,
        &[
            ("y/c -> x/a udp/53", false),
            ("y/c -> x/a sctp/1", true),
            ("y/c -> x/a tcp/80", false),
            ("y/c -> x/a icmp/8", true),
        ],
    );
    let t = evaluate(&m, &flow("y/c -> x/a icmp/8"));
    let order: Vec<&str> = t.ingress.tiers[0]
        .policies
        .iter()
        .map(|p| p.policy.name.as_str())
        .collect();
    assert_eq!(
        order,
        ["z-first", "a-second", "a-deny", "b-allow", "zz-ordered"]
    );
}

#[test]
fn kubernetes_policies_sit_at_order_1000_in_the_default_tier() {
    let allow_all = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{}]\n---\n";
    // A Calico policy ordered before it denies first; one ordered after never runs.
    let m = model(&format!(
        "{allow_all}{}",
        np(
            "x",
            "deny-udp",
            "  order: 500\n  selector: all()\n  ingress: [{action: Deny, protocol: UDP}]\n"
        )
    ));
    table(
        &m,
        &[("y/c -> x/a udp/53", false), ("y/c -> x/a tcp/80", true)],
    );
    let m = model(&format!(
        "{allow_all}{}",
        np(
            "x",
            "deny-udp",
            "  order: 2000\n  selector: all()\n  ingress: [{action: Deny, protocol: UDP}]\n"
        )
    ));
    table(&m, &[("y/c -> x/a udp/53", true)]);
}

#[test]
fn profiles_after_the_tiers() {
    // y/d lists open-web: ingress TCP 80 only, egress anything; no policy needed.
    let m = model("");
    table(
        &m,
        &[
            ("y/c -> y/d tcp/80", true),
            ("y/c -> y/d tcp/81", false),
            ("y/d -> y/c tcp/81", true),
        ],
    );
    let t = evaluate(&m, &flow("y/c -> y/d tcp/81"));
    assert_eq!(t.ingress.verdict, Verdict::ProfileDefault);
    // Passed by every tier, the profile decides.
    let m = model(&gnp(
        "pass",
        "  selector: all()\n  ingress: [{action: Pass}]\n",
    ));
    table(
        &m,
        &[
            ("y/c -> y/d tcp/80", true),
            ("y/c -> y/d tcp/81", false),
            ("y/c -> x/a tcp/81", true),
        ],
    );
    let t = evaluate(&m, &flow("y/c -> y/d tcp/80"));
    assert!(
        matches!(t.ingress.verdict, Verdict::ProfileRule { ref profile, index: 0, action: Action::Allow } if profile == "open-web")
    );
}

#[test]
fn an_endpoints_address_family_follows_the_peer() {
    let m = model(&gnp(
        "p",
        "  selector: app == 'a'\n  egress:\n  - {action: Allow, ipVersion: 6}\n",
    ));
    table(
        &m,
        &[
            ("x/a -> fd00::9 tcp/80", true),
            ("x/a -> 10.9.9.9 tcp/80", false),
        ],
    );
    let t = evaluate(&m, &flow("x/a -> fd00::9 tcp/80"));
    assert_eq!(t.source.address, Some("fd00::1".parse().unwrap()));
}

mod cluster;
