//! Random model changes over a small universe (so changes collide: the same endpoints,
//! interfaces, addresses, selectors and policies come back), decoded from a seed.

use trellis_policy::compile::Change;
use trellis_policy::model::*;

use super::*;

/// xorshift64*: deterministic, seeded per change.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability 1/n.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const SELECTORS: [&str; 8] = [
    "all()",
    "app == 'a'",
    "app == 'b'",
    "has(role)",
    "app in {'a', 'b'}",
    "!has(app)",
    "kind == 'office'",
    "profile == 'p0'",
];
const V4: [&str; 8] = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.3",
    "10.0.0.4",
    "10.0.0.5",
    "10.0.0.6",
    "10.0.1.1",
    "192.168.0.7",
];
const NETS: [&str; 7] = [
    "10.0.0.0/30",
    "10.0.0.4/31",
    "10.0.0.0/24",
    "192.168.0.0/24",
    "10.0.0.5/32",
    "172.16.0.0/16",
    "fd00::/120",
];

fn random_selector(r: &mut Rng) -> trellis_resources::Selector {
    let text: &&str = r.pick(&SELECTORS);
    sel(text)
}

fn scope(r: &mut Rng) -> Option<NamespaceScope> {
    match r.below(6) {
        0 => Some(NamespaceScope::Only(r.pick(&NAMESPACES).to_string())),
        1 => Some(NamespaceScope::Matching(sel("team == 'web'"))),
        2 => Some(NamespaceScope::Any),
        3 => Some(NamespaceScope::Matching(sel("global()"))),
        // A ClusterNetworkPolicy's `nodes` peer: only node sets.
        4 => Some(NamespaceScope::Nodes),
        _ => None,
    }
}

fn port_matches(r: &mut Rng) -> Vec<PortMatch> {
    let pool = [
        PortMatch::Range {
            first: 80,
            last: 80,
        },
        PortMatch::Range {
            first: 8000,
            last: 8080,
        },
        PortMatch::Range {
            first: 81,
            last: 81,
        },
        PortMatch::Named("http".into()),
        PortMatch::Named("dns".into()),
    ];
    (0..r.below(3)).map(|_| r.pick(&pool).clone()).collect()
}

fn entity(r: &mut Rng) -> EntityMatch {
    let mut e = EntityMatch::default();
    if r.one_in(4) {
        e.nets = (0..1 + r.below(2))
            .map(|_| r.pick(&NETS).parse().unwrap())
            .collect();
    }
    if r.one_in(6) {
        e.not_nets = vec![r.pick(&NETS).parse().unwrap()];
    }
    if r.one_in(2) {
        e.selector = Some(random_selector(r));
    }
    if r.one_in(5) {
        e.not_selector = Some(random_selector(r));
    }
    if r.one_in(3) {
        e.namespaces = scope(r);
    }
    if r.one_in(3) {
        e.ports = port_matches(r);
    }
    if r.one_in(6) {
        e.not_ports = port_matches(r);
    }
    if r.one_in(8) {
        e.service_accounts = Some(ServiceAccountMatch {
            names: if r.one_in(2) {
                vec!["sa0".into()]
            } else {
                vec![]
            },
            selector: r.one_in(2).then(|| sel("tier == 'front'")),
        });
    }
    e
}

fn random_rule(r: &mut Rng) -> Rule {
    let action = *r.pick(&[Action::Allow, Action::Deny, Action::Pass, Action::Log]);
    let mut rule = rule(action);
    rule.ip_version = *r.pick(&[None, None, None, Some(4), Some(6)]);
    rule.protocol = *r.pick(&[
        None,
        None,
        Some(Protocol::Tcp),
        Some(Protocol::Udp),
        Some(Protocol::Icmp),
        Some(Protocol::Icmpv6),
        Some(Protocol::Sctp),
        Some(Protocol::UdpLite),
        Some(Protocol::Number(47)),
        Some(Protocol::Number(6)),
    ]);
    if matches!(rule.protocol, Some(Protocol::Icmp | Protocol::Icmpv6)) {
        if r.one_in(2) {
            rule.icmp = Some(IcmpMatch {
                icmp_type: 8,
                code: r.one_in(2).then_some(0),
            });
        }
        if r.one_in(3) {
            rule.not_icmp = Some(IcmpMatch {
                icmp_type: 3,
                code: r.one_in(2).then_some(1),
            });
        }
    }
    if r.one_in(8) {
        rule.not_protocol = Some(*r.pick(&[Protocol::Udp, Protocol::Tcp, Protocol::Icmp]));
    }
    rule.source = entity(r);
    rule.destination = entity(r);
    rule
}

fn rules(r: &mut Rng) -> Option<Vec<Rule>> {
    (!r.one_in(3)).then(|| (0..r.below(4)).map(|_| random_rule(r)).collect())
}

fn random_policy(r: &mut Rng) -> Policy {
    let (kind, ns, name) = *r.pick(&[
        (PolicyKind::Kubernetes, Some("x"), "k0"),
        (PolicyKind::Namespaced, Some("y"), "n0"),
        (PolicyKind::Global, None, "g0"),
        (PolicyKind::Global, None, "g1"),
        (PolicyKind::Global, None, "g2"),
        (PolicyKind::Cluster, None, "c0"),
        (PolicyKind::Cluster, None, "c1"),
    ]);
    let t = if kind == PolicyKind::Cluster {
        *r.pick(&[ADMIN_TIER, BASELINE_TIER])
    } else {
        *r.pick(&["default", "default", "security", "late", "ghost"])
    };
    let mut p = policy(kind, ns, name, t, &random_selector(r).to_string());
    p.order = *r.pick(&[None, Some(1.0), Some(10.0), Some(1000.0)]);
    if kind == PolicyKind::Cluster {
        p.order = Some(*r.pick(&[0.0, 10.0, 1000.0]));
        let subject: &&str = r.pick(&["team == 'web'", "all()"]);
        p.namespaces = NamespaceScope::Matching(sel(subject));
    }
    if kind == PolicyKind::Global && r.one_in(3) {
        p.namespaces = NamespaceScope::Matching(sel("team == 'web'"));
    }
    if r.one_in(5) {
        p.service_account_selector = Some(sel("tier == 'front'"));
    }
    p.ingress = rules(r);
    p.egress = rules(r);
    p
}

fn random_endpoint(r: &mut Rng) -> Endpoint {
    let ns = r.pick(&NAMESPACES).to_string();
    let name = r.pick(&["e0", "e1", "e2", "e3", "e4"]).to_string();
    let node = *r.pick(&[NODE, NODE, "n2"]);
    let iface = *r.pick(&[None, Some("trl0"), Some("trl1"), Some("trl2"), Some("bad*")]);
    let mut addrs: Vec<&str> = (0..r.below(3)).map(|_| *r.pick(&V4)).collect();
    if r.one_in(10) {
        addrs.push(*r.pick(&["fd00::1", "fd00::2"]));
    }
    let mut e = endpoint(&ns, &name, node, iface, &addrs);
    if let Some(app) = r.pick(&[None, Some("a"), Some("b")]) {
        e.labels.insert("app".into(), app.to_string());
    }
    if r.one_in(2) {
        e.labels.insert("role".into(), "db".into());
    }
    e.service_account = r
        .pick(&[None, Some("sa0"), Some("sa1")])
        .map(str::to_string);
    let pool = [
        port("http", Protocol::Tcp, 80),
        port("http", Protocol::Tcp, 8080),
        port("dns", Protocol::Udp, 53),
    ];
    e.ports = (0..r.below(3)).map(|_| r.pick(&pool).clone()).collect();
    e.profiles = (0..r.below(2))
        .map(|_| r.pick(&["p0", "p1", "missing"]).to_string())
        .collect();
    e
}

/// One random change.
pub fn random_change(seed: u64) -> Change {
    let r = &mut Rng::new(seed);
    match r.below(20) {
        0..=6 => Change::EndpointUpsert(random_endpoint(r)),
        7 | 8 => Change::EndpointRemove {
            namespace: r.pick(&NAMESPACES).to_string(),
            name: r.pick(&["e0", "e1", "e2", "e3", "e4"]).to_string(),
        },
        9..=11 => Change::PolicyUpsert(random_policy(r)),
        12 => Change::PolicyRemove(random_policy(r).id),
        13 => {
            let name = *r.pick(&["security", "late"]);
            if r.one_in(3) {
                Change::TierRemove { name: name.into() }
            } else {
                let order = *r.pick(&[None, Some(5.0), Some(2_000_000.0)]);
                let def = *r.pick(&[TierDefault::Deny, TierDefault::Pass]);
                Change::TierUpsert(tier(name, order, def))
            }
        }
        14 => {
            let (namespace, name) =
                *r.pick(&[(Some("x"), "office"), (None, "global"), (None, "node/n2")]);
            if r.one_in(3) {
                Change::NetworkSetRemove {
                    namespace: namespace.map(str::to_string),
                    name: name.into(),
                }
            } else {
                let kind = *r.pick(&["office", "partner"]);
                Change::NetworkSetUpsert(NetworkSet {
                    namespace: namespace.map(str::to_string),
                    name: name.into(),
                    labels: labels(&[("kind", kind)]),
                    nets: (0..r.below(3))
                        .map(|_| r.pick(&NETS).parse().unwrap())
                        .collect(),
                    node: name.starts_with("node/"),
                })
            }
        }
        15 | 16 => {
            let name = r.pick(&["p0", "p1"]).to_string();
            if r.one_in(3) {
                Change::ProfileRemove { name }
            } else {
                let value = r.pick(&["p0", "p1"]).to_string();
                Change::ProfileUpsert(Profile {
                    labels_to_apply: labels(&[("profile", &value)]),
                    ingress: rules(r).unwrap_or_default(),
                    egress: rules(r).unwrap_or_default(),
                    name,
                })
            }
        }
        17 | 18 => {
            let name = r.pick(&NAMESPACES).to_string();
            if r.one_in(3) {
                Change::NamespaceRemove { name }
            } else {
                let team = *r.pick(&["web", "data"]);
                Change::NamespaceUpsert {
                    labels: ns_labels(&name, &[("team", team)]),
                    name,
                }
            }
        }
        _ => {
            let (namespace, name) = *r.pick(&[("x", "sa0"), ("y", "sa1"), ("z", "sa0")]);
            let (namespace, name) = (namespace.to_string(), name.to_string());
            if r.one_in(3) {
                Change::ServiceAccountRemove { namespace, name }
            } else {
                let t = *r.pick(&["front", "back"]);
                Change::ServiceAccountUpsert {
                    namespace,
                    name,
                    labels: labels(&[("tier", t)]),
                }
            }
        }
    }
}
