use super::*;
use crate::eval::{evaluate, Flow, Peer};

fn docs(yaml: &str) -> Vec<Resource> {
    trellis_resources::parse_documents(yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn sel(s: &str) -> Selector {
    Selector::parse(s).unwrap()
}

fn knp_id(ns: &str, name: &str) -> PolicyId {
    PolicyId {
        kind: PolicyKind::Kubernetes,
        namespace: Some(ns.into()),
        name: name.into(),
    }
}

fn allow(source: EntityMatch, destination: EntityMatch, protocol: Option<Protocol>) -> Rule {
    Rule {
        action: Action::Allow,
        ip_version: None,
        protocol,
        not_protocol: None,
        icmp: None,
        not_icmp: None,
        source,
        destination,
    }
}

fn ports(ps: &[PortMatch]) -> EntityMatch {
    EntityMatch {
        ports: ps.to_vec(),
        ..Default::default()
    }
}

fn single(p: u16) -> PortMatch {
    PortMatch::Range { first: p, last: p }
}

/// The example of Kubernetes' documentation, field by field.
#[test]
fn kubernetes_documentation_example() {
    let t = translate(&docs(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: test-network-policy, namespace: default}
spec:
  podSelector: {matchLabels: {role: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - ipBlock: {cidr: 172.17.0.0/16, except: [172.17.1.0/24]}
    - namespaceSelector: {matchLabels: {project: myproject}}
    - podSelector: {matchLabels: {role: frontend}}
    ports: [{protocol: TCP, port: 6379}]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/24}}]
    ports: [{protocol: TCP, port: 5978}]
"#,
    ));
    assert!(t.skipped.is_empty());
    let p = &t.model.policies[&knp_id("default", "test-network-policy")];
    let k8s = "projectcalico.org/orchestrator == 'k8s'";
    let expected = Policy {
        id: knp_id("default", "test-network-policy"),
        tier: "default".into(),
        order: Some(1000.0),
        selector: sel(&format!("{k8s} && role == 'db'")),
        namespaces: NamespaceScope::Only("default".into()),
        service_account_selector: None,
        ingress: Some(vec![
            allow(
                EntityMatch {
                    nets: vec!["172.17.0.0/16".parse().unwrap()],
                    not_nets: vec!["172.17.1.0/24".parse().unwrap()],
                    ..Default::default()
                },
                ports(&[single(6379)]),
                Some(Protocol::Tcp),
            ),
            allow(
                EntityMatch {
                    selector: Some(sel(k8s)),
                    namespaces: Some(NamespaceScope::Matching(sel("project == 'myproject'"))),
                    ..Default::default()
                },
                ports(&[single(6379)]),
                Some(Protocol::Tcp),
            ),
            allow(
                EntityMatch {
                    selector: Some(sel(&format!("{k8s} && role == 'frontend'"))),
                    ..Default::default()
                },
                ports(&[single(6379)]),
                Some(Protocol::Tcp),
            ),
        ]),
        egress: Some(vec![allow(
            EntityMatch::default(),
            EntityMatch {
                nets: vec!["10.0.0.0/24".parse().unwrap()],
                ports: vec![single(5978)],
                ..Default::default()
            },
            Some(Protocol::Tcp),
        )]),
        ingress_origins: Vec::new(),
        egress_origins: Vec::new(),
    };
    assert_eq!(p, &expected);
    // Its namespace has the implicit label though no Namespace object exists.
    assert_eq!(
        t.model.namespaces["default"][LABEL_NAMESPACE_NAME],
        "default"
    );
}

/// The default policies of Kubernetes' documentation.
#[test]
fn kubernetes_default_policies() {
    let head = |name: &str| {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  podSelector: {{}}\n")
    };
    let t = translate(&docs(
        &[
            head("default-deny-ingress") + "  policyTypes: [Ingress]\n",
            head("allow-all-ingress") + "  ingress: [{}]\n",
            head("default-deny-egress") + "  policyTypes: [Egress]\n",
            head("allow-all-egress") + "  egress: [{}]\n  policyTypes: [Egress]\n",
            head("default-deny-all") + "  policyTypes: [Ingress, Egress]\n",
        ]
        .join("---\n"),
    ));
    let p = |n: &str| &t.model.policies[&knp_id("x", n)];
    let any = allow(EntityMatch::default(), EntityMatch::default(), None);
    assert_eq!(
        (
            p("default-deny-ingress").ingress.clone(),
            p("default-deny-ingress").egress.clone()
        ),
        (Some(vec![]), None)
    );
    assert_eq!(p("allow-all-ingress").ingress, Some(vec![any.clone()]));
    assert_eq!(p("allow-all-ingress").egress, None);
    assert_eq!(
        (
            p("default-deny-egress").ingress.clone(),
            p("default-deny-egress").egress.clone()
        ),
        (None, Some(vec![]))
    );
    assert_eq!(p("allow-all-egress").egress, Some(vec![any]));
    assert_eq!(p("default-deny-all").ingress, Some(vec![]));
    assert_eq!(p("default-deny-all").egress, Some(vec![]));
    assert_eq!(
        p("default-deny-all").selector,
        sel("projectcalico.org/orchestrator == 'k8s'")
    );
}

#[test]
fn kubernetes_ports_group_by_protocol() {
    let t = translate(&docs(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - podSelector: {matchLabels: {a: b}}
      namespaceSelector: {}
    - ipBlock: {cidr: 10.0.0.0/8}
    ports:
    - {port: 80}
    - {port: 8000, endPort: 8080}
    - {port: http, protocol: TCP}
    - {port: 53, protocol: UDP}
    - {protocol: SCTP, port: 9}
    - {protocol: SCTP}
"#,
    ));
    let rules = t.model.policies[&knp_id("x", "p")].ingress.clone().unwrap();
    // Protocols (in order) × peers.
    let got: Vec<(Option<Protocol>, Vec<PortMatch>, bool)> = rules
        .iter()
        .map(|r| {
            (
                r.protocol,
                r.destination.ports.clone(),
                r.source.nets.is_empty(),
            )
        })
        .collect();
    let tcp = vec![
        single(80),
        PortMatch::Range {
            first: 8000,
            last: 8080,
        },
        PortMatch::Named("http".into()),
    ];
    assert_eq!(
        got,
        vec![
            (Some(Protocol::Tcp), tcp.clone(), true),
            (Some(Protocol::Tcp), tcp, false),
            (Some(Protocol::Udp), vec![single(53)], true),
            (Some(Protocol::Udp), vec![single(53)], false),
            // A protocol listed without a port: all its ports.
            (Some(Protocol::Sctp), vec![], true),
            (Some(Protocol::Sctp), vec![], false),
        ]
    );
    // Both selectors in one peer: the matching pods of the matching namespaces (AND).
    assert_eq!(
        rules[0].source.namespaces,
        Some(NamespaceScope::Matching(Selector::All))
    );
    assert_eq!(
        rules[0].source.selector,
        Some(sel("projectcalico.org/orchestrator == 'k8s' && a == 'b'"))
    );
}

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {ns: y}}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {node: n1, ipNetworks: [10.0.0.1/32], ports: [{name: serve-80-tcp, protocol: TCP, port: 80}]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: b, namespace: x, labels: {pod: b}}
spec: {node: n1, ipNetworks: [10.0.0.2/32]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: a, namespace: y, labels: {pod: a}}
spec: {node: n2, ipNetworks: [10.0.1.1/32]}
---
apiVersion: projectcalico.org/v3
kind: NetworkSet
metadata: {name: s, namespace: x, labels: {pod: a}}
spec: {nets: [192.168.0.0/16]}
"#;

fn reach(m: &Model, from: &str, to: &str, port: u16) -> bool {
    let ep = |s: &str| {
        let (ns, n) = s.split_once('/').unwrap();
        Peer::Endpoint {
            namespace: ns.into(),
            name: n.into(),
        }
    };
    let src = if from.contains('/') {
        ep(from)
    } else {
        Peer::Address(from.parse().unwrap())
    };
    evaluate(
        m,
        &Flow {
            source: src,
            destination: ep(to),
            protocol: Protocol::Tcp,
            port: Some(port),
            source_port: None,
            icmp: None,
        },
    )
    .allowed
}

/// Upstream's rules, end to end: isolation per direction once a policy selects the pod, the
/// union of policies, selectors scoped as Kubernetes scopes them.
#[test]
fn kubernetes_semantics_through_the_evaluator() {
    let knp = |name: &str, spec: &str| {
        format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n{spec}")
    };
    // Only x/a is selected; from pods labelled pod=b of x (not y), on the named port.
    let m = translate(&docs(&(PODS.to_string()
        + &knp("p", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n    ports: [{port: serve-80-tcp}]\n"))))
    .model;
    assert!(reach(&m, "x/b", "x/a", 80));
    assert!(
        !reach(&m, "x/b", "x/a", 81),
        "isolated: only the named port"
    );
    assert!(
        !reach(&m, "y/a", "x/a", 80),
        "podSelector alone: the policy's namespace"
    );
    assert!(reach(&m, "x/a", "x/b", 81), "x/b is selected by no policy");
    // The pod selector does not match the NetworkSet labelled pod=a (not a pod).
    let m2 = translate(&docs(&(PODS.to_string()
        + &knp("p", "  podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: a}}}]\n"))))
    .model;
    assert!(reach(&m2, "x/a", "x/b", 80));
    assert!(!reach(&m2, "192.168.0.1", "x/b", 80));
    // A second policy adds to the first (union).
    let m = translate(&docs(&(PODS.to_string()
        + &knp("p", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n")
        + &knp("q", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n"))))
    .model;
    assert!(reach(&m, "x/b", "x/a", 80));
    assert!(reach(&m, "y/a", "x/a", 80));
    // Egress only: ingress stays open.
    let m = translate(&docs(
        &(PODS.to_string() + &knp("e", "  podSelector: {}\n  policyTypes: [Egress]\n")),
    ))
    .model;
    assert!(!reach(&m, "x/a", "x/b", 80));
    assert!(reach(&m, "y/a", "x/a", 80));
    // ipBlock with except, including pod addresses.
    let m = translate(&docs(&(PODS.to_string()
        + &knp("i", "  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24]}}]\n"))))
    .model;
    assert!(reach(&m, "x/b", "x/a", 80));
    assert!(!reach(&m, "y/a", "x/a", 80));
}

#[test]
fn calico_kinds_map_field_for_field() {
    let t = translate(&docs(
        r#"
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100, defaultAction: Pass}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: g}
spec:
  tier: security
  order: 5
  selector: has(app)
  namespaceSelector: ns == 'x'
  serviceAccountSelector: team == 'a'
  egress:
  - action: Deny
    ipVersion: 4
    protocol: ICMP
    notProtocol: UDP
    icmp: {type: 8, code: 0}
    notICMP: {type: 3}
    source: {nets: [10.0.0.0/8], notNets: [10.1.0.0/16], selector: a == 'b', notSelector: has(c), namespaceSelector: global()}
    destination: {serviceAccounts: {names: [api], selector: x == 'y'}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: n, namespace: y}
spec:
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [80, '90:99', web], notPorts: [95]}}]
"#,
    ));
    assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    let m = &t.model;
    assert_eq!(m.tiers["security"].default_action, TierDefault::Pass);
    let g = &m.policies[&PolicyId {
        kind: PolicyKind::Global,
        namespace: None,
        name: "g".into(),
    }];
    assert_eq!(g.namespaces, NamespaceScope::Matching(sel("ns == 'x'")));
    assert_eq!(g.service_account_selector, Some(sel("team == 'a'")));
    assert!(g.ingress.is_none(), "types default to Egress");
    let r = &g.egress.as_ref().unwrap()[0];
    assert_eq!(
        (r.action, r.ip_version, r.protocol, r.not_protocol),
        (
            Action::Deny,
            Some(4),
            Some(Protocol::Icmp),
            Some(Protocol::Udp)
        )
    );
    assert_eq!(
        r.icmp,
        Some(IcmpMatch {
            icmp_type: 8,
            code: Some(0)
        })
    );
    assert_eq!(
        r.not_icmp,
        Some(IcmpMatch {
            icmp_type: 3,
            code: None
        })
    );
    assert_eq!(r.source.not_selector, Some(sel("has(c)")));
    assert_eq!(
        r.source.namespaces,
        Some(NamespaceScope::Matching(Selector::Global))
    );
    assert_eq!(
        r.source.not_nets,
        vec!["10.1.0.0/16".parse::<ipnet::IpNet>().unwrap()]
    );
    let sa = r.destination.service_accounts.as_ref().unwrap();
    assert_eq!(
        (sa.names.clone(), sa.selector.clone()),
        (vec!["api".to_string()], Some(sel("x == 'y'")))
    );
    let n = m.policies.values().find(|p| p.id.name == "n").unwrap();
    assert_eq!(n.namespaces, NamespaceScope::Only("y".into()));
    assert_eq!(n.tier, "default");
    assert_eq!(
        n.ingress.as_ref().unwrap()[0].destination.not_ports,
        vec![single(95)]
    );
}

#[test]
fn a_policy_in_a_missing_tier_is_skipped_and_reported() {
    // Stored straight into the datastore (apply refuses it): left out, named.
    let t = translate(&docs(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: g}\nspec: {tier: gone}\n",
    ));
    assert!(t.model.policies.is_empty());
    assert_eq!(t.skipped.len(), 1);
    assert_eq!(t.skipped[0].object, "GlobalNetworkPolicy/g");
    assert_eq!(
        t.skipped[0].reason,
        TranslateError::MissingTier {
            tier: "gone".into()
        }
    );
}

/// A Kubernetes NetworkPolicy bounds neither its rules nor their ports (only the object's
/// size does): 100 000 ports in one rule (well within the 4 MiB a document may have)
/// translate without looking through the list per port (that took 9 s in a release build).
/// Bounded by a deadline, not timed: a linear translation takes well under a second.
#[test]
fn a_kubernetes_rule_with_100000_ports_translates_in_bounded_time() {
    let mut r = docs(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: big, namespace: x}\n\
         spec: {podSelector: {}, ingress: [{ports: [{port: 1}]}]}\n",
    );
    let Resource::KubernetesNetworkPolicy(o) = &mut r[0] else {
        panic!("not a NetworkPolicy")
    };
    let ports = &mut o.spec.ingress[0].ports;
    let template = ports[0].clone();
    ports.clear();
    for i in 0..100_000u32 {
        let mut p = template.clone();
        p.port = Some(trellis_resources::k8s::IntOrString::String(format!("p{i}")));
        ports.push(p);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(translate(&r));
    });
    let t = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("translated within 60 s");
    let p = &t.model.policies[&knp_id("x", "big")];
    let rules = p.ingress.as_ref().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].destination.ports.len(), 100_000);
}
