//! The compiled ruleset decides exactly as the evaluator (pure): random valid models (built by
//! the engine tests' random changes), compiled for two nodes, and every flow between their
//! addresses (endpoints with several addresses, IPv4 and IPv6, addresses only a NetworkSet or
//! nothing holds; TCP, UDP, SCTP on several ports, ICMP/ICMPv6 types and codes) run through a
//! small interpreter of the [`Ruleset`] data with nftables' semantics (implicit protocol
//! dependencies of payload matches, jump/goto/return, the packet mark, sets and verdict maps),
//! hop by hop: the source's node, then the destination's. The verdict must equal
//! `eval::evaluate`'s.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;
use trellis_policy::compile::names;
use trellis_policy::compile::{self, Element, Expr, Op, Ruleset, SetKind, Stmt, Verdict};
use trellis_policy::eval::{self, Flow, Peer};
use trellis_policy::model::*;

use common::random::random_change;

const NODES: [&str; 2] = [common::NODE, "n2"];
/// The interface between nodes (not an endpoint's).
const UPLINK: &str = "eth0";
/// What `th dport` reads in an ICMP header (the checksum): anything.
const ICMP_CHECKSUM: u64 = 0xbeef;
/// ct state new.
const CT_NEW: u64 = 8;
/// How the interpreter's trace marks a flow-log copy.
const FLOW_LOG: &str = "flowlog ";
/// The compiled table's settings: flow logs on (they must change no verdict).
fn cfg() -> compile::CompileConfig {
    compile::CompileConfig {
        flow_log_group: Some(3),
        ..Default::default()
    }
}

/// A packet as the forward hook of one node sees it.
#[derive(Debug, Clone)]
struct Packet {
    iif: String,
    oif: String,
    saddr: IpAddr,
    daddr: IpAddr,
    l4proto: u8,
    sport: Option<u16>,
    dport: Option<u16>,
    icmp: Option<(u8, u8)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Val {
    Num(u64),
    Addr(IpAddr),
    Str(String),
    Tuple(Vec<Val>),
}

/// A key's value in the packet; `None` when the key's implicit dependency (nfproto or
/// l4proto) fails, so the rule does not match whatever the operator.
fn key(p: &Packet, mark: u32, e: &Expr) -> Option<Val> {
    let v4 = p.saddr.is_ipv4();
    Some(match e {
        Expr::Meta("iifname") => Val::Str(p.iif.clone()),
        Expr::Meta("oifname") => Val::Str(p.oif.clone()),
        Expr::Meta("nfproto") => Val::Num(if v4 { 2 } else { 10 }),
        Expr::Meta("l4proto") => Val::Num(p.l4proto as u64),
        Expr::CtState => Val::Num(CT_NEW),
        Expr::MarkMasked(m) => Val::Num((mark & m) as u64),
        Expr::Concat(parts) => Val::Tuple(
            parts
                .iter()
                .map(|x| key(p, mark, x))
                .collect::<Option<Vec<_>>>()?,
        ),
        Expr::Payload(proto, field) => {
            let need = match *proto {
                "ip" => v4,
                "ip6" => !v4,
                "tcp" => p.l4proto == 6,
                "udp" => p.l4proto == 17,
                "sctp" => p.l4proto == 132,
                "udplite" => p.l4proto == 136,
                "icmp" => v4 && p.l4proto == 1,
                "icmpv6" => !v4 && p.l4proto == 58,
                "th" => true,
                other => panic!("payload {other}"),
            };
            if !need {
                return None;
            }
            match *field {
                "saddr" => Val::Addr(p.saddr),
                "daddr" => Val::Addr(p.daddr),
                "type" => Val::Num(p.icmp?.0 as u64),
                "code" => Val::Num(p.icmp?.1 as u64),
                "sport" => Val::Num(match (p.sport, p.icmp) {
                    (Some(s), _) => s as u64,
                    (None, Some((t, c))) => ((t as u64) << 8) | c as u64,
                    (None, None) => 0,
                }),
                "dport" => Val::Num(p.dport.map(u64::from).unwrap_or(ICMP_CHECKSUM)),
                other => panic!("field {other}"),
            }
        }
        other => panic!("key {other:?}"),
    })
}

fn addr_in(a: &IpAddr, first: &IpAddr, last: &IpAddr) -> bool {
    match (a, first, last) {
        (IpAddr::V4(a), IpAddr::V4(f), IpAddr::V4(l)) => f <= a && a <= l,
        (IpAddr::V6(a), IpAddr::V6(f), IpAddr::V6(l)) => f <= a && a <= l,
        _ => false,
    }
}

/// Whether `v` is (in) the value `r`.
fn member(rs: &Ruleset, v: &Val, r: &Expr) -> bool {
    match (v, r) {
        (Val::Num(n), Expr::Num(m)) => n == m,
        (Val::Num(n), Expr::Range(a, b)) => a <= n && n <= b,
        (Val::Addr(a), Expr::Addr { first, last }) => addr_in(a, first, last),
        (Val::Str(s), Expr::Str(pat)) => match pat.strip_suffix('*') {
            Some(prefix) => s.starts_with(prefix),
            None => s == pat,
        },
        (_, Expr::AnonSet(items)) => items.iter().any(|i| member(rs, v, i)),
        (_, Expr::SetRef(name)) => {
            let set = rs.sets.get(name).unwrap_or_else(|| panic!("set {name}"));
            set.elements.iter().any(|e| match (v, e, set.kind) {
                (Val::Addr(a), Element::Addr { first, last }, _) => addr_in(a, first, last),
                (
                    Val::Tuple(t),
                    Element::NamedPort { addr, proto, port },
                    SetKind::NamedPorts(_),
                ) => {
                    t == &[
                        Val::Addr(*addr),
                        Val::Num(*proto as u64),
                        Val::Num(*port as u64),
                    ]
                }
                _ => false,
            })
        }
        (v, r) => panic!("compare {v:?} with {r:?}"),
    }
}

fn stmt_matches(rs: &Ruleset, p: &Packet, mark: u32, left: &Expr, op: Op, right: &Expr) -> bool {
    let Some(v) = key(p, mark, left) else {
        return false;
    };
    match op {
        Op::Eq => member(rs, &v, right),
        Op::Ne => !member(rs, &v, right),
        Op::In => {
            let Val::Num(n) = v else {
                panic!("flag test on {v:?}")
            };
            let bits = match right {
                Expr::Num(b) => *b,
                Expr::Flags(fs) => fs.iter().fold(0, |a, b| a | b),
                other => panic!("flags {other:?}"),
            };
            n & bits != 0
        }
    }
}

/// Runs the forward hook of `rs` on `p`: accepted or not, and the rules that ended in a
/// verdict or logged (for the failure message).
fn forward(rs: &Ruleset, p: &Packet) -> (bool, Vec<String>) {
    let mut trace = Vec::new();
    let mut mark: u32 = 0;
    let mut chain = compile::ruleset::FORWARD.to_string();
    let mut idx = 0;
    let mut stack: Vec<(String, usize)> = Vec::new();
    for _ in 0..100_000 {
        let rules = &rs
            .chains
            .get(&chain)
            .unwrap_or_else(|| panic!("chain {chain}"))
            .rules;
        let Some(rule) = rules.get(idx) else {
            // The end of a regular chain returns; of the base chain: policy accept.
            match stack.pop() {
                Some((c, i)) => {
                    (chain, idx) = (c, i);
                    continue;
                }
                None => return (true, trace),
            }
        };
        idx += 1;
        let mut next: Option<Verdict> = None;
        for s in &rule.stmts {
            match s {
                Stmt::Match { left, op, right } => {
                    if !stmt_matches(rs, p, mark, left, *op, right) {
                        break;
                    }
                }
                Stmt::Counter => {}
                Stmt::Log(prefix) => trace.push(format!("log {prefix}")),
                Stmt::FlowLog { prefix, .. } => {
                    // The copy's verdict must be the one the rule then gives.
                    let (allowed, label) = names::parse_flow_log_prefix(prefix).expect("ours");
                    trace.push(format!(
                        "{FLOW_LOG}{label} {}",
                        if allowed { "allowed" } else { "denied" }
                    ));
                }
                Stmt::MarkAnd(m) => mark &= m,
                Stmt::MarkOr(m) => mark |= m,
                Stmt::Vmap { key: k, map } => {
                    let Some(Val::Str(name)) = key(p, mark, k) else {
                        break;
                    };
                    match rs.maps[map].elements.get(&name) {
                        Some(c) => next = Some(Verdict::Goto(c.clone())),
                        None => break,
                    }
                }
                Stmt::Verdict(v) => next = Some(v.clone()),
            }
        }
        let Some(v) = next else { continue };
        trace.push(format!("{chain}[{}] {:?} {v:?}", idx - 1, rule.comment));
        match v {
            Verdict::Accept => return (true, trace),
            Verdict::Drop => return (false, trace),
            Verdict::Return => match stack.pop() {
                Some((c, i)) => (chain, idx) = (c, i),
                None => return (true, trace),
            },
            Verdict::Jump(c) => {
                stack.push((std::mem::replace(&mut chain, c), idx));
                idx = 0;
            }
            Verdict::Goto(c) => {
                chain = c;
                idx = 0;
            }
        }
    }
    panic!("the ruleset loops");
}

/// Makes a random rule valid as `trellis-resources` validates it (what translate can produce):
/// port numbers need a protocol with ports, ICMP matches need ICMP, families agree.
fn valid_rule(mut r: Rule) -> Option<Rule> {
    let proto_ports = r.protocol.is_some_and(Protocol::has_ports);
    for e in [&mut r.source, &mut r.destination] {
        for ports in [&mut e.ports, &mut e.not_ports] {
            if r.protocol.is_some() && !proto_ports {
                ports.clear();
            } else if r.protocol.is_none() {
                ports.retain(|p| matches!(p, PortMatch::Named(_)));
            }
        }
    }
    let icmp_proto = matches!(r.protocol, Some(Protocol::Icmp | Protocol::Icmpv6));
    if !icmp_proto {
        r.icmp = None;
        r.not_icmp = None;
    }
    let want = |p: Option<Protocol>| match p {
        Some(Protocol::Icmp) => Some(4),
        Some(Protocol::Icmpv6) => Some(6),
        _ => None,
    };
    for p in [r.protocol, r.not_protocol] {
        if let (Some(w), Some(v)) = (want(p), r.ip_version) {
            if w != v {
                return None;
            }
        }
    }
    let nets: Vec<bool> = [&r.source, &r.destination]
        .iter()
        .flat_map(|e| e.nets.iter().chain(&e.not_nets))
        .map(|n| n.addr().is_ipv4())
        .collect();
    if nets.windows(2).any(|w| w[0] != w[1]) {
        return None;
    }
    if let (Some(v4), Some(v)) = (nets.first(), r.ip_version) {
        if *v4 != (v == 4) {
            return None;
        }
    }
    Some(r)
}

fn valid_rules(rs: &mut Vec<Rule>) {
    *rs = std::mem::take(rs)
        .into_iter()
        .filter_map(valid_rule)
        .collect();
}

fn valid_model(mut m: Model) -> Model {
    for p in m.policies.values_mut() {
        for rs in [p.ingress.as_mut(), p.egress.as_mut()]
            .into_iter()
            .flatten()
        {
            valid_rules(rs);
        }
    }
    for p in m.profiles.values_mut() {
        valid_rules(&mut p.ingress);
        valid_rules(&mut p.egress);
    }
    m
}

/// Where an address lives: an endpoint programmed on a node (its interface), or outside.
#[derive(Debug, Clone)]
enum Place {
    Endpoint {
        node: String,
        iface: String,
        key: (String, String),
    },
    Outside,
}

/// The flows to check: every ordered pair of distinct places' addresses of one family.
fn places(m: &Model) -> Vec<(IpAddr, Place)> {
    let mut holders: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for e in m.endpoints.values() {
        for a in &e.addresses {
            *holders.entry(*a).or_default() += 1;
        }
    }
    let mut out = Vec::new();
    for node in NODES {
        let owners = programmed(m, node);
        for (iface, e) in owners {
            for a in &e.addresses {
                // IPAM never gives one address to two endpoints.
                if holders[a] == 1 {
                    out.push((
                        *a,
                        Place::Endpoint {
                            node: node.into(),
                            iface: iface.clone(),
                            key: (e.namespace.clone(), e.name.clone()),
                        },
                    ));
                }
            }
        }
    }
    for a in [
        "10.0.0.9",
        "10.0.1.9",
        "192.168.0.9",
        "172.16.3.4",
        "8.8.8.8",
        "fd00::9",
        "2001:db8::1",
    ] {
        let a: IpAddr = a.parse().unwrap();
        if !holders.contains_key(&a) {
            out.push((a, Place::Outside));
        }
    }
    out
}

/// The endpoints the compiler programs on `node`, by interface (the compiler's rule, restated:
/// a valid `trl…` name; the first by (namespace, name) owns a shared interface).
fn programmed(m: &Model, node: &str) -> BTreeMap<String, Endpoint> {
    let mut out = BTreeMap::new();
    for e in m.endpoints.values().filter(|e| e.node == node) {
        if let Some(i) = e
            .interface
            .as_deref()
            .filter(|i| compile::names::valid_interface(i))
        {
            out.entry(i.to_string()).or_insert_with(|| e.clone());
        }
    }
    out
}

/// (protocol, destination port, source port, icmp type and code) of a flow.
type Shape = (Protocol, Option<u16>, Option<u16>, Option<(u8, u8)>);

/// The flows tried between two addresses.
fn shapes(v4: bool) -> Vec<Shape> {
    let mut out = Vec::new();
    for (proto, ports) in [
        (Protocol::Tcp, &[80u16, 81, 8080, 53][..]),
        (Protocol::Udp, &[53, 80][..]),
        (Protocol::Sctp, &[80][..]),
    ] {
        for dport in ports {
            out.push((proto, Some(*dport), Some(40000), None));
        }
    }
    out.push((Protocol::Tcp, Some(81), Some(80), None));
    let icmp = if v4 { Protocol::Icmp } else { Protocol::Icmpv6 };
    for (t, c) in [(8, 0), (3, 1), (3, 0), (0, 0)] {
        out.push((icmp, None, None, Some((t, c))));
    }
    out
}

/// The first flow on which the compiled rulesets and the evaluator disagree.
fn first_divergence(m: &Model) -> Option<String> {
    let rulesets: BTreeMap<&str, Ruleset> = NODES
        .iter()
        .map(|n| (*n, compile::compile_with(m, n, &cfg())))
        .collect();
    let places = places(m);
    for (sa, sp) in &places {
        for (da, dp) in &places {
            if sa.is_ipv4() != da.is_ipv4() {
                continue;
            }
            let hops: Vec<(&str, &str, &str)> = match (sp, dp) {
                (Place::Outside, Place::Outside) => continue,
                (Place::Endpoint { key: a, .. }, Place::Endpoint { key: b, .. }) if a == b => {
                    continue
                }
                (Place::Endpoint { node: n, iface, .. }, Place::Outside) => {
                    vec![(n, iface, UPLINK)]
                }
                (Place::Outside, Place::Endpoint { node: n, iface, .. }) => {
                    vec![(n, UPLINK, iface)]
                }
                (
                    Place::Endpoint {
                        node: n1,
                        iface: i1,
                        ..
                    },
                    Place::Endpoint {
                        node: n2,
                        iface: i2,
                        ..
                    },
                ) if n1 == n2 => vec![(n1, i1, i2)],
                (
                    Place::Endpoint {
                        node: n1,
                        iface: i1,
                        ..
                    },
                    Place::Endpoint {
                        node: n2,
                        iface: i2,
                        ..
                    },
                ) => vec![(n1, i1, UPLINK), (n2, UPLINK, i2)],
            };
            for (proto, dport, sport, icmp) in shapes(sa.is_ipv4()) {
                let packet = |iif: &str, oif: &str| Packet {
                    iif: iif.into(),
                    oif: oif.into(),
                    saddr: *sa,
                    daddr: *da,
                    l4proto: proto.number(),
                    sport,
                    dport,
                    icmp,
                };
                let mut kernel = true;
                let mut why = Vec::new();
                let mut logged = Vec::new();
                for (node, iif, oif) in &hops {
                    let (ok, t) = forward(&rulesets[node], &packet(iif, oif));
                    logged.extend(
                        t.iter()
                            .filter_map(|s| s.strip_prefix(FLOW_LOG))
                            .map(String::from),
                    );
                    why.push(format!("{node} {iif}->{oif}: {ok} {t:?}"));
                    kernel &= ok;
                    if !ok {
                        break;
                    }
                }
                let flow = Flow {
                    source: Peer::Address(*sa),
                    destination: Peer::Address(*da),
                    protocol: proto,
                    port: dport,
                    source_port: sport,
                    icmp: icmp.map(|(t, c)| IcmpMatch {
                        icmp_type: t,
                        code: Some(c),
                    }),
                };
                let trace = eval::evaluate(m, &flow);
                if trace.allowed != kernel {
                    return Some(format!(
                        "{sa} ({sp:?}) -> {da} ({dp:?}) {proto:?} dport {dport:?} sport {sport:?} icmp {icmp:?}:\n\
                         evaluator allowed={} egress {:#?}\ningress {:#?}\nkernel allowed={kernel}: {why:#?}",
                        trace.allowed, trace.egress, trace.ingress
                    ));
                }
                // The flow log names what the evaluator says decided, per direction.
                let verdict = |v: &eval::Verdict| if v.allows() { "allowed" } else { "denied" };
                let mut want: Vec<String> = trace
                    .egress
                    .deciding_label()
                    .map(|l| format!("{l} {}", verdict(&trace.egress.verdict)))
                    .into_iter()
                    .collect();
                if trace.egress.verdict.allows() {
                    want.extend(
                        trace
                            .ingress
                            .deciding_label()
                            .map(|l| format!("{l} {}", verdict(&trace.ingress.verdict))),
                    );
                }
                if logged != want {
                    return Some(format!(
                        "{sa} ({sp:?}) -> {da} ({dp:?}) {proto:?} dport {dport:?}: flow log {logged:?}, \
                         the evaluator's deciding rules {want:?}\negress {:#?}\ningress {:#?}\nkernel: {why:#?}",
                        trace.egress, trace.ingress
                    ));
                }
            }
        }
    }
    None
}

/// The rich model (or an empty one) after random changes, valid, and with most endpoints on
/// an interface of their own (the random changes share three, so most would not be
/// programmed).
fn model_of(rich: bool, seeds: &[u64]) -> Model {
    let start = if rich {
        common::rich_model()
    } else {
        Model::default()
    };
    let mut engine = compile::PolicyEngine::with_model(common::NODE, start);
    for s in seeds {
        engine.handle(random_change(*s));
    }
    let mut m = valid_model(engine.model().clone());
    for (i, e) in m.endpoints.values_mut().enumerate() {
        if e.interface.as_deref().is_some_and(|i| i.starts_with("trl")) && i % 4 != 0 {
            e.interface = Some(format!("trlq{i}"));
        }
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_rules_decide_as_the_evaluator(
        rich in any::<bool>(),
        seeds in prop::collection::vec(any::<u64>(), 1..60),
    ) {
        let m = model_of(rich, &seeds);
        if let Some(d) = first_divergence(&m) {
            return Err(TestCaseError::fail(format!("{d}\nmodel: {m:#?}")));
        }
    }
}

#[test]
fn compiled_rules_decide_as_the_evaluator_on_the_rich_model() {
    let m = valid_model(common::rich_model());
    assert_eq!(first_divergence(&m), None);
}

/// A namespaced policy's rule with only a notSelector still selects within the policy's
/// namespace (Calico namespaces the positive selector whenever selector or notSelector is set),
/// so an address outside the namespace does not match it.
#[test]
fn a_namespaced_not_selector_alone_still_requires_the_policys_namespace() {
    let mut m = Model::default();
    let mut a = common::endpoint("x", "a", common::NODE, Some("trla"), &["10.0.0.1"]);
    a.labels = common::labels(&[("app", "a")]);
    common::add_endpoint(&mut m, a);
    common::add_endpoint(
        &mut m,
        common::endpoint("y", "b", "n2", Some("trlb"), &["10.0.0.2"]),
    );
    let mut p = common::policy(
        PolicyKind::Namespaced,
        Some("x"),
        "p",
        DEFAULT_TIER,
        "all()",
    );
    p.ingress = Some(vec![Rule {
        source: EntityMatch {
            not_selector: Some(common::sel("app == 'z'")),
            ..Default::default()
        },
        ..common::rule(Action::Allow)
    }]);
    common::add_policy(&mut m, p);
    assert_eq!(first_divergence(&m), None);
}

/// On a dual-stack node, the IPv6 variant of a rule whose notNets are all IPv4 must still be
/// IPv6-only: its numeric-port alternative (no address match, unlike the named-port one) once
/// had no family match, so IPv4 traffic from the excluded net matched it.
#[test]
fn a_rules_ipv6_variant_never_matches_ipv4_traffic() {
    let mut m = Model::default();
    common::add_endpoint(
        &mut m,
        common::endpoint(
            "y",
            "f",
            common::NODE,
            Some("trlf"),
            &["10.0.1.11", "fd00::11"],
        ),
    );
    common::add_endpoint(
        &mut m,
        common::endpoint("y", "g", "n2", Some("trlg"), &["10.0.0.2"]),
    );
    let mut p = common::policy(
        PolicyKind::Namespaced,
        Some("y"),
        "n0",
        DEFAULT_TIER,
        "all()",
    );
    p.ingress = Some(vec![Rule {
        protocol: Some(Protocol::Tcp),
        source: EntityMatch {
            not_nets: common::nets(&["10.0.0.0/30"]),
            ..Default::default()
        },
        destination: EntityMatch {
            ports: vec![
                PortMatch::Named("http".into()),
                PortMatch::Range {
                    first: 81,
                    last: 81,
                },
            ],
            ..Default::default()
        },
        ..common::rule(Action::Allow)
    }]);
    common::add_policy(&mut m, p);
    assert_eq!(first_divergence(&m), None);
}

/// The compiler's sets and the evaluator read service accounts and namespaces through one
/// definition: `serviceAccounts: {}` (no names, no selector) restricts nothing, a service
/// account selector sees `projectcalico.org/name` and an endpoint without a service account
/// has no labels (`!has(k)` matches it), and a namespace selector sees
/// `projectcalico.org/name`.
#[test]
fn service_account_and_namespace_labels_are_read_alike() {
    let mut m = Model::default();
    let mut a = common::endpoint("x", "a", common::NODE, Some("trla"), &["10.0.0.1"]);
    a.service_account = Some("sa0".into());
    common::add_endpoint(&mut m, a);
    common::add_endpoint(
        &mut m,
        common::endpoint("x", "b", common::NODE, Some("trlb"), &["10.0.0.2"]),
    );
    common::add_endpoint(
        &mut m,
        common::endpoint("y", "c", "n2", Some("trlc"), &["10.0.0.3"]),
    );
    let allow_from = |name: &str, source: EntityMatch| {
        let mut p = common::policy(PolicyKind::Global, None, name, DEFAULT_TIER, "all()");
        p.ingress = Some(vec![Rule {
            source,
            ..common::rule(Action::Allow)
        }]);
        p
    };
    let cases = [
        EntityMatch {
            service_accounts: Some(ServiceAccountMatch {
                names: vec![],
                selector: None,
            }),
            ..Default::default()
        },
        EntityMatch {
            service_accounts: Some(ServiceAccountMatch {
                names: vec![],
                selector: Some(common::sel("projectcalico.org/name == 'sa0'")),
            }),
            ..Default::default()
        },
        EntityMatch {
            service_accounts: Some(ServiceAccountMatch {
                names: vec![],
                selector: Some(common::sel("!has(tier)")),
            }),
            ..Default::default()
        },
        EntityMatch {
            namespaces: Some(NamespaceScope::Matching(common::sel(
                "projectcalico.org/name == 'y'",
            ))),
            ..Default::default()
        },
    ];
    for (i, source) in cases.into_iter().enumerate() {
        let mut m = m.clone();
        common::add_policy(&mut m, allow_from(&format!("p{i}"), source));
        assert_eq!(first_divergence(&m), None, "case {i}");
    }
}

/// A named port resolves against the endpoints the rule's selector selects: an endpoint that
/// does not match, at an address a matching NetworkSet contains, does not lend it its named
/// ports (the evaluator once resolved them against every endpoint at the address).
#[test]
fn a_named_port_resolves_only_against_selected_endpoints() {
    let mut m = Model::default();
    let mut a = common::endpoint("x", "a", common::NODE, Some("trla"), &["10.0.1.2"]);
    a.labels = common::labels(&[("app", "a")]);
    a.ports = vec![common::port("dns", Protocol::Udp, 53)];
    common::add_endpoint(&mut m, a);
    common::add_endpoint(
        &mut m,
        common::endpoint("y", "f", common::NODE, Some("trlf"), &["10.0.1.11"]),
    );
    m.network_sets.push(NetworkSet {
        namespace: None,
        name: "office".into(),
        labels: common::labels(&[("kind", "office")]),
        nets: common::nets(&["10.0.1.0/30"]),
        node: false,
    });
    let mut p = common::policy(PolicyKind::Global, None, "g0", DEFAULT_TIER, "all()");
    p.ingress = Some(vec![Rule {
        destination: EntityMatch {
            selector: Some(common::sel("!has(app)")),
            not_ports: vec![PortMatch::Named("dns".into())],
            ..Default::default()
        },
        ..common::rule(Action::Allow)
    }]);
    common::add_policy(&mut m, p);
    assert_eq!(first_divergence(&m), None);
}

/// A rule naming TCP by number (`protocol: 6`, as Calico allows) resolves named ports of TCP
/// endpoints: a Deny of the named port once compiled to an empty set (it compared
/// `Number(6)` with `Tcp`) and denied nothing.
#[test]
fn a_protocol_given_by_number_resolves_named_ports() {
    let mut m = Model::default();
    let mut b = common::endpoint("x", "b", common::NODE, Some("trlb"), &["10.0.1.3"]);
    b.ports = vec![common::port("http", Protocol::Tcp, 8080)];
    common::add_endpoint(&mut m, b);
    common::add_endpoint(
        &mut m,
        common::endpoint("x", "a", "n2", Some("trla"), &["10.0.1.2"]),
    );
    let mut p = common::policy(PolicyKind::Global, None, "g", DEFAULT_TIER, "all()");
    p.ingress = Some(vec![
        Rule {
            protocol: Some(Protocol::Number(6)),
            destination: EntityMatch {
                ports: vec![PortMatch::Named("http".into())],
                ..Default::default()
            },
            ..common::rule(Action::Deny)
        },
        common::rule(Action::Allow),
    ]);
    common::add_policy(&mut m, p);
    assert_eq!(first_divergence(&m), None);
}

/// ClusterNetworkPolicies as an operator writes them (through `translate`), over pods that
/// label themselves like non-pods, a NetworkSet labelled like a pod, nodes, named ports and
/// fail-closed peers: the compiled table decides every flow as the evaluator (hostile review).
#[test]
fn cluster_policies_written_as_yaml_decide_alike() {
    let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: red}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {team: blue}}
---
apiVersion: trellis.dev/v1
kind: Node
metadata: {name: n2, labels: {zone: b}}
spec: {addresses: [{address: 172.16.3.4/16}]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {node: n1, pod: a, interfaceName: trla, ipNetworks: [10.0.0.1/32], ports: [{name: http, protocol: TCP, port: 80}]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: r, namespace: x, labels: {app: r, projectcalico.org/orchestrator: none}}
spec: {node: n1, pod: r, interfaceName: trlr, ipNetworks: [10.0.0.2/32]}
---
apiVersion: trellis.dev/v1
kind: WorkloadEndpoint
metadata: {name: c, namespace: y, labels: {app: c}}
spec: {node: n2, pod: c, interfaceName: trlc, ipNetworks: [10.0.1.1/32], ports: [{name: http, protocol: UDP, port: 53}]}
---
apiVersion: projectcalico.org/v3
kind: NetworkSet
metadata: {name: spoof, namespace: y, labels: {projectcalico.org/orchestrator: k8s}}
spec: {nets: [8.8.8.0/24]}
---
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: admin}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {team: red}}}
  ingress:
  - action: Pass
    from: [{namespaces: {matchLabels: {team: blue}}}, {}]
  egress:
  - action: Accept
    to: [{pods: {namespaceSelector: {matchLabels: {team: blue}}, podSelector: {}}}]
    protocols: [{destinationNamedPort: http}]
  - action: Deny
    to: [{nodes: {matchLabels: {zone: b}}}]
  - action: Accept
    to: [{namespaces: {}}, {}]
  - action: Accept
    to: [{namespaces: {matchLabels: {team: blue}}}]
  - action: Deny
    to: [{networks: [0.0.0.0/0]}]
---
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: base}
spec:
  tier: Baseline
  priority: 3
  subject: {pods: {namespaceSelector: {}, podSelector: {}}}
  ingress:
  - action: Deny
    from: [{pods: {namespaceSelector: {matchLabels: {team: red}}, podSelector: {matchLabels: {app: a}}}}]
    protocols: [{tcp: {destinationPort: {range: {start: 80, end: 81}}}}]
"#;
    let docs = trellis_resources::parse_documents(text).unwrap();
    let t = trellis_policy::translate::translate(&docs);
    assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    assert_eq!(first_divergence(&t.model), None);
}
