//! ClusterNetworkPolicy through the evaluator: the Admin tier before every tier, the Baseline
//! tier after them, Pass, priorities, subjects, peers, and the fail-closed peer.

use super::*;

fn cnp(name: &str, tier: &str, priority: u32, body: &str) -> String {
    format!("apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n{body}---\n")
}

/// Subject: every pod of namespace x.
const SUBJECT_X: &str = "  subject: {namespaces: {matchLabels: {team: red}}}\n";

fn knp_allow_all_ingress(ns: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-all, namespace: {ns}}}\nspec:\n  podSelector: {{}}\n  ingress: [{{}}]\n---\n")
}

fn knp_deny_ingress(ns: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: {ns}}}\nspec:\n  podSelector: {{}}\n---\n")
}

fn from_y(action: &str) -> String {
    format!("  ingress:\n  - action: {action}\n    from: [{{namespaces: {{matchLabels: {{team: blue}}}}}}]\n")
}

#[test]
fn admin_deny_cannot_be_overridden_by_networkpolicy_or_a_calico_tier() {
    let admin = cnp(
        "deny-y",
        "Admin",
        10,
        &format!("{SUBJECT_X}{}", from_y("Deny")),
    );
    // A Calico tier ordered before everything, allowing all.
    let calico = tier("first", "order: 0,", "Deny")
        + &gnp(
            "allow",
            "  tier: first\n  selector: all()\n  ingress: [{action: Allow}]\n",
        );
    let m = model(&format!("{admin}{}{calico}", knp_allow_all_ingress("x")));
    table(
        &m,
        &[
            ("y/c -> x/a tcp/80", false),
            ("y/d -> x/b udp/53", false),
            // Not from y: the Admin tier does not decide; the Calico tier allows.
            ("x/b -> x/a tcp/80", true),
        ],
    );
    let t = evaluate(&m, &flow("y/c -> x/a tcp/80"));
    assert_eq!(t.ingress.tiers[0].tier, ADMIN_TIER);
    assert_eq!(t.ingress.tiers.len(), 1, "the Admin tier decided alone");
    assert!(matches!(
        &t.ingress.verdict,
        Verdict::Rule { rule, action: Action::Deny } if rule.policy.kind == PolicyKind::Cluster
    ));
}

#[test]
fn admin_accept_beats_an_isolating_networkpolicy() {
    let admin = cnp(
        "allow-y",
        "Admin",
        10,
        &format!("{SUBJECT_X}{}", from_y("Accept")),
    );
    let m = model(&format!("{admin}{}", knp_deny_ingress("x")));
    table(
        &m,
        &[("y/c -> x/a tcp/80", true), ("x/b -> x/a tcp/80", false)],
    );
}

#[test]
fn pass_skips_the_admin_tier_to_networkpolicy_then_baseline() {
    let admin = cnp(
        "pass-y",
        "Admin",
        5,
        &format!("{SUBJECT_X}{}", from_y("Pass")),
    ) + &cnp(
        "deny-y",
        "Admin",
        10,
        &format!("{SUBJECT_X}{}", from_y("Deny")),
    );
    let baseline_deny = cnp(
        "default",
        "Baseline",
        1,
        &format!("{SUBJECT_X}{}", from_y("Deny")),
    );
    // Pass, no NetworkPolicy: the Baseline decides (deny); the later Admin deny is skipped.
    let m = model(&format!("{admin}{baseline_deny}"));
    table(&m, &[("y/c -> x/a tcp/80", false)]);
    let t = evaluate(&m, &flow("y/c -> x/a tcp/80"));
    let tiers: Vec<&str> = t.ingress.tiers.iter().map(|t| t.tier.as_str()).collect();
    assert_eq!(tiers, [ADMIN_TIER, BASELINE_TIER]);
    assert_eq!(t.ingress.tiers[0].policies.len(), 1, "deny-y was skipped");
    // Pass, a NetworkPolicy allows: allowed, the Baseline never consulted.
    let m = model(&format!(
        "{admin}{baseline_deny}{}",
        knp_allow_all_ingress("x")
    ));
    table(&m, &[("y/c -> x/a tcp/80", true)]);
    // Pass, a NetworkPolicy isolates: denied by the default tier.
    let m = model(&format!("{admin}{}", knp_deny_ingress("x")));
    table(&m, &[("y/c -> x/a tcp/80", false)]);
    // Pass, nothing else: default allow.
    let m = model(&admin);
    table(&m, &[("y/c -> x/a tcp/80", true)]);
}

#[test]
fn baseline_only_for_pods_no_networkpolicy_isolates() {
    let base = cnp(
        "default",
        "Baseline",
        1,
        &format!("{SUBJECT_X}{}", from_y("Deny")),
    );
    let m = model(&base);
    table(
        &m,
        &[("y/c -> x/a tcp/80", false), ("x/b -> x/a tcp/80", true)],
    );
    let m = model(&format!("{base}{}", knp_allow_all_ingress("x")));
    table(&m, &[("y/c -> x/a tcp/80", true)]);
    let t = evaluate(&model(&base), &flow("y/c -> x/a tcp/80"));
    assert_eq!(t.ingress.tiers[0].tier, BASELINE_TIER);
    // Baseline Accept over nothing else: allowed, and it ends evaluation before profiles.
    let subject_d =
        "  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: d}}}}\n";
    let accept = cnp(
        "default",
        "Baseline",
        1,
        &format!("{subject_d}  ingress:\n  - action: Accept\n    from: [{{namespaces: {{}}}}]\n"),
    );
    // y/d's profile allows only TCP 80; the Baseline Accept decides first.
    table(&model(&accept), &[("x/a -> y/d udp/53", true)]);
    table(&model(""), &[("x/a -> y/d udp/53", false)]);
}

#[test]
fn priority_lower_first_then_name() {
    let deny =
        |name: &str, p: u32| cnp(name, "Admin", p, &format!("{SUBJECT_X}{}", from_y("Deny")));
    let allow = |name: &str, p: u32| {
        cnp(
            name,
            "Admin",
            p,
            &format!("{SUBJECT_X}{}", from_y("Accept")),
        )
    };
    table(
        &model(&(deny("d", 50) + &allow("a", 40))),
        &[("y/c -> x/a tcp/80", true)],
    );
    table(
        &model(&(deny("d", 30) + &allow("a", 40))),
        &[("y/c -> x/a tcp/80", false)],
    );
    // Equal priority: by name (a before d).
    table(
        &model(&(deny("d", 40) + &allow("a", 40))),
        &[("y/c -> x/a tcp/80", true)],
    );
    table(
        &model(&(deny("a", 40) + &allow("d", 40))),
        &[("y/c -> x/a tcp/80", false)],
    );
}

#[test]
fn subjects_namespaces_and_pods() {
    let pods = "  subject: {pods: {namespaceSelector: {matchLabels: {team: red}}, podSelector: {matchLabels: {app: b}}}}\n";
    let m = model(&cnp("p", "Admin", 1, &format!("{pods}{}", from_y("Deny"))));
    table(
        &m,
        &[("y/c -> x/b tcp/80", false), ("y/c -> x/a tcp/80", true)],
    );
    // Egress from x to pods app=c in namespaces team=blue.
    let egress = format!("{SUBJECT_X}  egress:\n  - action: Deny\n    to: [{{pods: {{namespaceSelector: {{matchLabels: {{team: blue}}}}, podSelector: {{matchLabels: {{app: c}}}}}}}}]\n");
    let m = model(&cnp("e", "Admin", 1, &egress));
    table(
        &m,
        &[
            ("x/a -> y/c tcp/80", false),
            ("x/a -> y/d tcp/80", true),
            ("y/d -> y/c tcp/80", true),
        ],
    );
}

#[test]
fn protocols_ports_and_ranges() {
    let body = format!("{SUBJECT_X}  ingress:\n  - action: Deny\n    from: [{{namespaces: {{}}}}]\n    protocols:\n    - tcp: {{destinationPort: {{number: 80}}}}\n    - udp: {{destinationPort: {{range: {{start: 50, end: 60}}}}}}\n    - destinationNamedPort: http\n");
    let m = model(&cnp("p", "Admin", 1, &body));
    table(
        &m,
        &[
            ("y/c -> x/a tcp/80", false),
            ("y/c -> x/a tcp/81", true),
            ("y/c -> x/a udp/53", false),
            ("y/c -> x/a udp/61", true),
            ("y/c -> x/a sctp/80", true),
            // x/a declares http = TCP 8080; x/b http = TCP 9090.
            ("y/c -> x/a tcp/8080", false),
            ("y/c -> x/b tcp/9090", false),
            ("y/c -> x/b tcp/8080", true),
        ],
    );
    // One written rule, three model rules: the trace names the written one.
    let t = evaluate(&m, &flow("y/c -> x/a tcp/8080"));
    let rules = &t.ingress.tiers[0].policies[0].rules;
    assert_eq!(rules.len(), 3);
    let origin = RuleOrigin {
        index: 0,
        name: None,
    };
    assert!(rules.iter().all(|r| r.origin.as_ref() == Some(&origin)));
}

#[test]
fn networks_and_nodes_peers() {
    let body = format!("{SUBJECT_X}  egress:\n  - action: Deny\n    to: [{{networks: [198.51.100.0/24, '10.0.1.3']}}]\n  - action: Deny\n    to: [{{nodes: {{matchLabels: {{zone: a}}}}}}]\n");
    let nodes = "apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: n9, labels: {zone: a}}\nspec: {addresses: [{address: 172.16.0.9}]}\n---\napiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: n8, labels: {zone: b}}\nspec: {addresses: [{address: 172.16.0.8}]}\n---\n";
    let m = model(&format!("{nodes}{}", cnp("p", "Admin", 1, &body)));
    table(
        &m,
        &[
            ("x/a -> 198.51.100.7 tcp/443", false),
            ("x/a -> y/c tcp/80", false),
            ("x/a -> y/d tcp/80", true),
            ("x/a -> node:n9@172.16.0.9 tcp/22", false),
            ("x/a -> node:n8@172.16.0.8 tcp/22", true),
        ],
    );
    // A Calico selector never matches a node's set, even all().
    let g = gnp(
        "g",
        "  selector: app == 'a'\n  egress: [{action: Allow, destination: {selector: all()}}]\n",
    );
    let m = model(&format!("{nodes}{g}"));
    table(&m, &[("x/a -> node:n9@172.16.0.9 tcp/22", false)]);
    // Nor a notSelector: the node's labels do not exempt its address from this Allow.
    let g = gnp(
        "g",
        "  selector: app == 'a'\n  egress: [{action: Allow, destination: {notSelector: zone == 'a'}}]\n",
    );
    let m = model(&format!("{nodes}{g}"));
    table(&m, &[("x/a -> node:n9@172.16.0.9 tcp/22", true)]);
}

#[test]
fn a_peer_with_no_known_field_fails_closed() {
    // Accept: matches nothing (so the Baseline deny below still applies).
    let accept = cnp(
        "a",
        "Admin",
        1,
        &format!("{SUBJECT_X}  ingress:\n  - action: Accept\n    from: [{{}}]\n"),
    );
    let base = cnp(
        "default",
        "Baseline",
        1,
        &format!("{SUBJECT_X}{}", from_y("Deny")),
    );
    table(
        &model(&format!("{accept}{base}")),
        &[("y/c -> x/a tcp/80", false), ("x/b -> x/a tcp/80", true)],
    );
    // Deny and Pass: deny all.
    for action in ["Deny", "Pass"] {
        let p = cnp(
            "p",
            "Admin",
            1,
            &format!("{SUBJECT_X}  ingress:\n  - action: {action}\n    from: [{{}}]\n    protocols: [{{tcp: {{destinationPort: {{number: 80}}}}}}]\n"),
        );
        table(
            &model(&p),
            &[("x/b -> x/a tcp/80", false), ("y/c -> x/a udp/53", false)],
        );
    }
}

#[test]
fn policy_show_orders_admin_calico_baseline() {
    let m = model(&format!(
        "{}{}{}{}",
        cnp(
            "late",
            "Baseline",
            0,
            &format!("{SUBJECT_X}{}", from_y("Deny"))
        ),
        knp_allow_all_ingress("x"),
        tier("last", "", "Pass")
            + &gnp(
                "g",
                "  tier: last\n  selector: all()\n  ingress: [{action: Pass}]\n"
            ),
        cnp(
            "early",
            "Admin",
            1000,
            &format!("{SUBJECT_X}{}", from_y("Pass"))
        ),
    ));
    let ep = &m.endpoints[&("x".to_string(), "a".to_string())];
    let tiers: Vec<String> = applying(&m, ep, Direction::Ingress)
        .into_iter()
        .map(|(t, _)| t.name)
        .collect();
    assert_eq!(tiers, [ADMIN_TIER, "default", "last", BASELINE_TIER]);
}

#[test]
fn v1alpha1_admin_and_baseline_policies_share_the_tiers() {
    let anp = |name: &str, priority: u32, action: &str| {
        format!("apiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  priority: {priority}\n{SUBJECT_X}  ingress:\n  - action: {action}\n    from: [{{namespaces: {{matchLabels: {{team: blue}}}}}}]\n    ports: [{{portNumber: {{port: 80}}}}]\n---\n")
    };
    let banp = format!("apiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {{name: default}}\nspec:\n{SUBJECT_X}  ingress:\n  - action: Deny\n    from: [{{namespaces: {{}}}}]\n---\n");
    let accept = cnp(
        "allow-y",
        "Admin",
        10,
        &format!("{SUBJECT_X}{}", from_y("Accept")),
    );
    // An AdminNetworkPolicy at priority 5 comes before the ClusterNetworkPolicy at 10.
    let m = model(&format!("{}{accept}", anp("deny-y", 5, "Deny")));
    table(
        &m,
        &[("y/c -> x/a tcp/80", false), ("y/c -> x/a tcp/81", true)],
    );
    let t = evaluate(&m, &flow("y/c -> x/a tcp/80"));
    assert!(matches!(
        &t.ingress.verdict,
        Verdict::Rule { rule, .. } if rule.policy.kind == PolicyKind::AdminV1alpha1
    ));
    // After it (priority 20), the Accept decides.
    table(
        &model(&format!("{}{accept}", anp("deny-y", 20, "Deny"))),
        &[("y/c -> x/a tcp/80", true)],
    );
    // Pass, then the BaselineAdminNetworkPolicy denies.
    let m = model(&format!("{}{banp}", anp("pass-y", 1, "Pass")));
    table(
        &m,
        &[("y/c -> x/a tcp/80", false), ("x/b -> x/a tcp/80", false)],
    );
    let t = evaluate(&m, &flow("y/c -> x/a tcp/80"));
    assert_eq!(t.ingress.tiers[1].tier, BASELINE_TIER);
    // A NetworkPolicy isolating x keeps the Baseline out.
    table(
        &model(&format!("{banp}{}", knp_allow_all_ingress("x"))),
        &[("y/c -> x/a tcp/80", true)],
    );
}

// ---- hostile review (revcnp) -----------------------------------------------------------------

/// A pod in namespace x that labels itself `projectcalico.org/orchestrator` (any pod may carry
/// any label; the kube-controller copies them verbatim) is still a pod of x: an Admin Deny whose
/// subject is every pod of x applies to it, and a `namespaces` peer still covers it. Calico sets
/// that label on every pod's endpoint over the pod's own labels.
#[test]
fn a_pods_own_orchestrator_label_does_not_take_it_out_of_a_subject_or_peer() {
    let rogue = "apiVersion: trellis.dev/v1\nkind: WorkloadEndpoint\nmetadata: {name: r, namespace: x, labels: {app: r, projectcalico.org/orchestrator: none}}\nspec: {node: n1, pod: r, ipNetworks: [10.0.0.9/32]}\n---\n";
    let admin = cnp(
        "deny-y",
        "Admin",
        10,
        &format!("{SUBJECT_X}{}", from_y("Deny")),
    );
    let m = model(&format!("{rogue}{admin}"));
    table(
        &m,
        &[("y/c -> x/a tcp/80", false), ("y/c -> x/r tcp/80", false)],
    );
    // As a peer: an Admin Deny of egress to namespace x covers the rogue pod too.
    let egress = cnp(
        "no-x",
        "Admin",
        10,
        "  subject: {namespaces: {matchLabels: {team: blue}}}\n  egress:\n  - action: Deny\n    to: [{namespaces: {matchLabels: {team: red}}}]\n",
    );
    let m = model(&format!("{rogue}{egress}"));
    table(
        &m,
        &[("y/c -> x/a tcp/80", false), ("y/c -> x/r tcp/80", false)],
    );
}

/// `namespaces` and `pods` peers are pods only: a NetworkSet in a selected namespace that
/// carries `projectcalico.org/orchestrator: k8s` (nothing refuses the label) must not turn an
/// Admin Accept for "pods of y" into an Accept for the set's addresses.
#[test]
fn a_network_set_labelled_like_a_pod_is_not_a_pod_peer() {
    let spoof = "apiVersion: projectcalico.org/v3\nkind: NetworkSet\nmetadata: {name: spoof, namespace: y, labels: {projectcalico.org/orchestrator: k8s}}\nspec: {nets: [8.8.8.0/24]}\n---\n";
    let admin = cnp(
        "only-y",
        "Admin",
        10,
        &format!("{SUBJECT_X}  egress:\n  - action: Accept\n    to: [{{namespaces: {{matchLabels: {{team: blue}}}}}}]\n  - action: Deny\n    to: [{{networks: [0.0.0.0/0]}}]\n"),
    );
    let m = model(&format!("{spoof}{admin}"));
    table(
        &m,
        &[
            ("x/a -> y/c tcp/80", true),
            ("x/a -> 8.8.8.8 tcp/80", false),
        ],
    );
    let pods = cnp(
        "only-y-pods",
        "Admin",
        10,
        &format!("{SUBJECT_X}  egress:\n  - action: Accept\n    to: [{{pods: {{namespaceSelector: {{matchLabels: {{team: blue}}}}, podSelector: {{}}}}}}]\n  - action: Deny\n    to: [{{networks: [0.0.0.0/0]}}]\n"),
    );
    let m = model(&format!("{spoof}{pods}"));
    table(
        &m,
        &[
            ("x/a -> y/c tcp/80", true),
            ("x/a -> 8.8.8.8 tcp/80", false),
        ],
    );
}

/// The API: "For Deny and Pass rules, fail closed means: treat the rule as a 'Deny all' rule";
/// "For Accept rules ... treat the rule as matching no traffic". The whole rule, whatever the
/// other peers and the order they are written in.
#[test]
fn a_fail_closed_peer_decides_the_whole_rule() {
    for peers in [
        "[{namespaces: {matchLabels: {team: blue}}}, {}]",
        "[{}, {namespaces: {matchLabels: {team: blue}}}]",
    ] {
        // Pass with an unknown peer: Deny all, also for the traffic the known peer matches.
        let pass = cnp(
            "p",
            "Admin",
            1,
            &format!("{SUBJECT_X}  ingress:\n  - action: Pass\n    from: {peers}\n"),
        );
        let m = model(&format!("{pass}{}", knp_allow_all_ingress("x")));
        table(
            &m,
            &[("y/c -> x/a tcp/80", false), ("x/b -> x/a tcp/80", false)],
        );
        // Accept with an unknown peer matches nothing: the next rule (Deny from y) decides.
        let accept = cnp(
            "a",
            "Admin",
            1,
            &format!("{SUBJECT_X}  ingress:\n  - action: Accept\n    from: {peers}\n  - action: Deny\n    from: [{{namespaces: {{matchLabels: {{team: blue}}}}}}]\n"),
        );
        let m = model(&accept);
        table(
            &m,
            &[("y/c -> x/a tcp/80", false), ("x/b -> x/a tcp/80", true)],
        );
    }
}
