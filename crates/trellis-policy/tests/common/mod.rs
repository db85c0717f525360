//! Test fixtures shared by the compiler's tests and benches: model builders and a model that
//! uses every feature the compiler handles.
#![allow(dead_code)]

use trellis_policy::model::*;
use trellis_resources::Selector;

pub fn sel(s: &str) -> Selector {
    Selector::parse(s).unwrap()
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn ns_labels(ns: &str, pairs: &[(&str, &str)]) -> Labels {
    let mut l = labels(pairs);
    l.insert(LABEL_NAMESPACE_NAME.into(), ns.into());
    l
}

pub fn endpoint(ns: &str, name: &str, node: &str, iface: Option<&str>, addrs: &[&str]) -> Endpoint {
    Endpoint {
        namespace: ns.into(),
        name: name.into(),
        pod: Some(name.into()),
        node: node.into(),
        interface: iface.map(str::to_string),
        addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        labels: Labels::new(),
        service_account: None,
        ports: Vec::new(),
        profiles: Vec::new(),
    }
}

pub fn port(name: &str, protocol: Protocol, port: u16) -> NamedPort {
    NamedPort {
        name: name.into(),
        protocol,
        port,
    }
}

pub fn rule(action: Action) -> Rule {
    Rule {
        action,
        ip_version: None,
        protocol: None,
        not_protocol: None,
        icmp: None,
        not_icmp: None,
        source: EntityMatch::default(),
        destination: EntityMatch::default(),
    }
}

pub fn ports(p: &[(u16, u16)]) -> Vec<PortMatch> {
    p.iter()
        .map(|(first, last)| PortMatch::Range {
            first: *first,
            last: *last,
        })
        .collect()
}

pub fn nets(n: &[&str]) -> Vec<ipnet::IpNet> {
    n.iter().map(|s| s.parse().unwrap()).collect()
}

pub fn policy_id(kind: PolicyKind, ns: Option<&str>, name: &str) -> PolicyId {
    PolicyId {
        kind,
        namespace: ns.map(str::to_string),
        name: name.into(),
    }
}

/// A policy with no rules in either direction, selecting `selector` in its own namespace (or
/// everywhere for a global one).
pub fn policy(
    kind: PolicyKind,
    ns: Option<&str>,
    name: &str,
    tier: &str,
    selector: &str,
) -> Policy {
    Policy {
        id: policy_id(kind, ns, name),
        tier: tier.into(),
        order: None,
        selector: sel(selector),
        namespaces: match ns {
            Some(ns) if kind != PolicyKind::Global => NamespaceScope::Only(ns.into()),
            _ => NamespaceScope::Any,
        },
        service_account_selector: None,
        ingress: None,
        egress: None,
        ingress_origins: Vec::new(),
        egress_origins: Vec::new(),
    }
}

pub fn tier(name: &str, order: Option<f64>, default_action: TierDefault) -> Tier {
    Tier {
        name: name.into(),
        order,
        default_action,
    }
}

pub fn add_policy(m: &mut Model, p: Policy) {
    m.policies.insert(p.id.clone(), p);
}

pub fn add_endpoint(m: &mut Model, e: Endpoint) {
    m.endpoints.insert((e.namespace.clone(), e.name.clone()), e);
}

pub const NODE: &str = "n1";

/// A model using every feature: tiers (Pass default, missing tier, no order), Kubernetes,
/// namespaced and global policies, every rule field, network sets (overlapping nets), a
/// profile with labels, service accounts, endpoints local/remote/unprogrammed/invalid/
/// conflicting, IPv4 and IPv6.
pub fn rich_model() -> Model {
    let mut m = Model::default();
    m.namespaces
        .insert("x".into(), ns_labels("x", &[("team", "web")]));
    m.namespaces
        .insert("y".into(), ns_labels("y", &[("team", "data")]));
    m.service_accounts.insert(
        ("x".into(), "sa-web".into()),
        labels(&[("tier", "frontend")]),
    );
    m.tiers.insert(
        "security".into(),
        tier("security", Some(10.0), TierDefault::Pass),
    );
    m.tiers
        .insert("late".into(), tier("late", None, TierDefault::Deny));
    m.profiles.insert(
        "kns.x".into(),
        Profile {
            name: "kns.x".into(),
            labels_to_apply: labels(&[("profile", "x")]),
            ingress: vec![Rule {
                source: EntityMatch {
                    selector: Some(sel("has(app)")),
                    ..Default::default()
                },
                ..rule(Action::Allow)
            }],
            egress: vec![rule(Action::Allow)],
        },
    );

    let mut a = endpoint("x", "a", NODE, Some("trla"), &["10.0.1.2", "fd00::1:2"]);
    a.labels = labels(&[("app", "a")]);
    a.service_account = Some("sa-web".into());
    a.ports = vec![
        port("http", Protocol::Tcp, 80),
        port("dns", Protocol::Udp, 53),
    ];
    let mut b = endpoint("x", "b", NODE, Some("trlb"), &["10.0.1.3", "fd00::1:3"]);
    b.labels = labels(&[("app", "b"), ("role", "db")]);
    b.ports = vec![port("http", Protocol::Tcp, 8080)];
    b.profiles = vec!["kns.x".into()];
    let mut c = endpoint("y", "c", "n2", Some("trlc"), &["10.0.2.4"]);
    c.labels = labels(&[("app", "c")]);
    c.ports = vec![port("http", Protocol::Tcp, 80)];
    let mut d = endpoint("y", "d", NODE, None, &["10.0.1.9"]);
    d.labels = labels(&[("app", "d")]);
    let mut e = endpoint("y", "e", NODE, Some("bad*name"), &["10.0.1.10"]);
    e.labels = labels(&[("app", "e")]);
    let mut f = endpoint("y", "f", NODE, Some("trla"), &["10.0.1.11"]);
    f.labels = labels(&[("app", "f")]);
    for ep in [a, b, c, d, e, f] {
        add_endpoint(&mut m, ep);
    }

    m.network_sets.push(NetworkSet {
        namespace: Some("x".into()),
        name: "office".into(),
        labels: labels(&[("kind", "office")]),
        nets: nets(&["192.168.0.0/24", "192.168.0.128/25", "2001:db8::/64"]),
        node: false,
    });
    m.network_sets.push(NetworkSet {
        namespace: None,
        name: "partners".into(),
        labels: labels(&[("kind", "partner")]),
        nets: nets(&["203.0.113.0/24", "10.0.1.0/30"]),
        node: false,
    });

    // Kubernetes: default deny ingress in x; b admits a on its named port and y on 80/8000-8080.
    let mut deny = policy(
        PolicyKind::Kubernetes,
        Some("x"),
        "default-deny",
        DEFAULT_TIER,
        "all()",
    );
    deny.order = Some(KUBERNETES_POLICY_ORDER);
    deny.ingress = Some(vec![]);
    add_policy(&mut m, deny);
    let mut allow = policy(
        PolicyKind::Kubernetes,
        Some("x"),
        "allow-to-b",
        DEFAULT_TIER,
        "app == 'b'",
    );
    allow.order = Some(KUBERNETES_POLICY_ORDER);
    allow.ingress = Some(vec![
        Rule {
            protocol: Some(Protocol::Tcp),
            source: EntityMatch {
                selector: Some(sel("app == 'a'")),
                ..Default::default()
            },
            destination: EntityMatch {
                ports: vec![PortMatch::Named("http".into())],
                ..Default::default()
            },
            ..rule(Action::Allow)
        },
        Rule {
            protocol: Some(Protocol::Tcp),
            source: EntityMatch {
                namespaces: Some(NamespaceScope::Matching(sel("team == 'data'"))),
                ..Default::default()
            },
            destination: EntityMatch {
                ports: ports(&[(80, 80), (8000, 8080)]),
                ..Default::default()
            },
            ..rule(Action::Allow)
        },
        Rule {
            source: EntityMatch {
                nets: nets(&["172.16.0.0/16", "172.17.0.0/16"]),
                not_nets: nets(&["172.16.5.0/24"]),
                ..Default::default()
            },
            ..rule(Action::Allow)
        },
    ]);
    add_policy(&mut m, allow);

    // Security tier: passes a's traffic down, denies a net, logs, denies UDP except DNS;
    // egress to partners (a network set), ICMP echo both families, not ICMP unreachable/host.
    let mut sec = policy(PolicyKind::Global, None, "security", "security", "all()");
    sec.order = Some(1.0);
    sec.ingress = Some(vec![
        Rule {
            source: EntityMatch {
                selector: Some(sel("app == 'a'")),
                ..Default::default()
            },
            ..rule(Action::Pass)
        },
        Rule {
            source: EntityMatch {
                nets: nets(&["10.0.3.0/24"]),
                ..Default::default()
            },
            ..rule(Action::Deny)
        },
        rule(Action::Log),
        Rule {
            protocol: Some(Protocol::Udp),
            destination: EntityMatch {
                not_ports: ports(&[(53, 53)]),
                ..Default::default()
            },
            ..rule(Action::Deny)
        },
        // Two `!=` on adjacent fields (addresses, then ports): nft would merge each pair.
        Rule {
            protocol: Some(Protocol::Tcp),
            source: EntityMatch {
                not_nets: nets(&["10.9.9.9/32"]),
                not_ports: ports(&[(81, 81)]),
                ..Default::default()
            },
            destination: EntityMatch {
                not_nets: nets(&["10.9.9.8/32"]),
                not_ports: ports(&[(80, 80)]),
                ..Default::default()
            },
            ..rule(Action::Log)
        },
    ]);
    sec.egress = Some(vec![
        Rule {
            destination: EntityMatch {
                selector: Some(sel("kind == 'partner'")),
                ..Default::default()
            },
            ..rule(Action::Allow)
        },
        Rule {
            protocol: Some(Protocol::Icmp),
            icmp: Some(IcmpMatch {
                icmp_type: 8,
                code: Some(0),
            }),
            ..rule(Action::Allow)
        },
        Rule {
            protocol: Some(Protocol::Icmpv6),
            icmp: Some(IcmpMatch {
                icmp_type: 128,
                code: None,
            }),
            ..rule(Action::Allow)
        },
        Rule {
            protocol: Some(Protocol::Icmp),
            not_icmp: Some(IcmpMatch {
                icmp_type: 3,
                code: Some(1),
            }),
            ..rule(Action::Deny)
        },
        Rule {
            ip_version: Some(4),
            protocol: Some(Protocol::Sctp),
            ..rule(Action::Pass)
        },
    ]);
    add_policy(&mut m, sec);

    // A namespaced Calico policy for pods running as a frontend service account.
    let mut web = policy(
        PolicyKind::Namespaced,
        Some("x"),
        "web-sa",
        DEFAULT_TIER,
        "all()",
    );
    web.order = Some(500.0);
    web.service_account_selector = Some(sel("tier == 'frontend'"));
    web.egress = Some(vec![
        Rule {
            destination: EntityMatch {
                service_accounts: Some(ServiceAccountMatch {
                    names: vec!["sa-web".into()],
                    selector: None,
                }),
                ..Default::default()
            },
            ..rule(Action::Allow)
        },
        Rule {
            ip_version: Some(6),
            destination: EntityMatch {
                nets: nets(&["fd00::/48"]),
                ..Default::default()
            },
            ..rule(Action::Allow)
        },
        Rule {
            protocol: Some(Protocol::Tcp),
            destination: EntityMatch {
                not_selector: Some(sel("app == 'c'")),
                namespaces: Some(NamespaceScope::Any),
                ports: vec![
                    PortMatch::Range {
                        first: 443,
                        last: 443,
                    },
                    PortMatch::Named("http".into()),
                ],
                not_ports: vec![PortMatch::Named("dns".into())],
                ..Default::default()
            },
            ..rule(Action::Allow)
        },
        Rule {
            not_protocol: Some(Protocol::Tcp),
            source: EntityMatch {
                ports: ports(&[(1024, 65535)]),
                ..Default::default()
            },
            ..rule(Action::Allow)
        },
        Rule {
            ip_version: Some(4),
            ..rule(Action::Log)
        },
    ]);
    add_policy(&mut m, web);

    // A tier without an order (sorts last), a policy in a missing tier, one selecting only a
    // remote endpoint.
    let mut late = policy(PolicyKind::Global, None, "late", "late", "has(app)");
    late.egress = Some(vec![rule(Action::Allow)]);
    add_policy(&mut m, late);
    let mut ghost = policy(PolicyKind::Global, None, "ghost", "ghost", "all()");
    ghost.ingress = Some(vec![rule(Action::Deny)]);
    add_policy(&mut m, ghost);
    let mut remote = policy(
        PolicyKind::Global,
        None,
        "remote-only",
        DEFAULT_TIER,
        "app == 'c'",
    );
    remote.ingress = Some(vec![rule(Action::Allow)]);
    add_policy(&mut m, remote);
    m
}

/// Endpoints by key, for tests that edit them.
pub fn endpoint_of(m: &Model, ns: &str, name: &str) -> Endpoint {
    m.endpoints[&(ns.to_string(), name.to_string())].clone()
}

pub mod random;
