//! Real packets through the compiled table: two "pods" (namespaces behind veths whose node-side
//! ends are `trl…`) routed through a "node" namespace that holds the table, which the engine's
//! batches program change by change. TCP connects, bounded in time, show what the policy
//! allows. Needs root; never touches the root namespace.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use trellis_dataplane::{nft, Netns};
use trellis_policy::compile::{drift, ruleset::TABLE, Change, Ops, PolicyEngine};
use trellis_policy::model::*;
use trellis_testutil::{veth_between, TestNetns};

use common::*;

/// How long an allowed connect may take (a loaded machine), and how long a blocked one is
/// given before it counts as blocked (the table is in force before the probe starts: nft
/// returns after the commit).
const ALLOWED_WITHIN: Duration = Duration::from_secs(5);
const BLOCKED_AFTER: Duration = Duration::from_millis(400);

struct Lab {
    node: Netns,
    a: Netns,
    _listeners: Vec<TcpListener>,
    _guards: [TestNetns; 3],
    engine: PolicyEngine,
}

impl Lab {
    fn new() -> Lab {
        let node = TestNetns::new("polpktnode");
        let a = TestNetns::new("polpkta");
        let b = TestNetns::new("polpktb");
        veth_between(&node, "trlpkta", "10.70.1.1/24", &a, "eth0", "10.70.1.2/24");
        veth_between(&node, "trlpktb", "10.70.2.1/24", &b, "eth0", "10.70.2.2/24");
        a.exec_ok(&["ip", "route", "add", "default", "via", "10.70.1.1"]);
        b.exec_ok(&["ip", "route", "add", "default", "via", "10.70.2.1"]);
        node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let b_ns = Netns::open(b.path()).unwrap();
        let listeners = [80, 81]
            .map(|p| {
                b_ns.run(|| TcpListener::bind(("10.70.2.2", p)))
                    .unwrap()
                    .unwrap()
            })
            .into();
        let lab = Lab {
            node: Netns::open(node.path()).unwrap(),
            a: Netns::open(a.path()).unwrap(),
            _listeners: listeners,
            _guards: [node, a, b],
            engine: PolicyEngine::new(NODE),
        };
        lab.apply_doc(&lab.engine.full().to_nft_json());
        lab
    }

    fn apply_doc(&self, doc: &serde_json::Value) {
        self.node.run(|| nft::apply_document(doc)).unwrap().unwrap();
    }

    fn change(&mut self, c: Change) {
        let ops: Ops = self.engine.handle(c);
        if !ops.is_empty() {
            self.apply_doc(&ops.to_nft_json());
        }
    }

    /// Connects from pod a to pod b's `port`.
    fn connects(&self, port: u16, expect: bool) -> bool {
        let to = SocketAddr::from(([10, 70, 2, 2], port));
        let wait = if expect {
            ALLOWED_WITHIN
        } else {
            BLOCKED_AFTER
        };
        self.a
            .run(|| TcpStream::connect_timeout(&to, wait).is_ok())
            .unwrap()
    }

    fn expect(&self, when: &str, port80: bool, port81: bool) {
        let got = (self.connects(80, port80), self.connects(81, port81));
        assert_eq!(got, (port80, port81), "{when}: a → b on (80, 81)");
    }
}

fn pod(name: &str, iface: &str, addr: &str, app: &str) -> Endpoint {
    let mut e = endpoint("x", name, NODE, Some(iface), &[addr]);
    e.labels = labels(&[("app", app)]);
    e
}

fn deny_ingress_to_b() -> Policy {
    let mut p = policy(
        PolicyKind::Kubernetes,
        Some("x"),
        "deny-b",
        DEFAULT_TIER,
        "app == 'b'",
    );
    p.order = Some(KUBERNETES_POLICY_ORDER);
    p.ingress = Some(vec![]);
    p
}

fn allow_from_a(name: &str, tier: &str, action: Action, dst_ports: Vec<PortMatch>) -> Policy {
    let kind = if tier == DEFAULT_TIER {
        PolicyKind::Kubernetes
    } else {
        PolicyKind::Namespaced
    };
    let mut p = policy(kind, Some("x"), name, tier, "app == 'b'");
    p.order = Some(100.0);
    p.ingress = Some(vec![Rule {
        protocol: Some(Protocol::Tcp),
        source: EntityMatch {
            selector: Some(sel("app == 'a'")),
            ..Default::default()
        },
        destination: EntityMatch {
            ports: dst_ports,
            ..Default::default()
        },
        ..rule(action)
    }]);
    p
}

#[test]
fn default_deny_selector_allow_pass_and_named_ports_hold_for_real_packets() {
    let mut lab = Lab::new();
    lab.expect(
        "nothing programmed: trl* interfaces are closed",
        false,
        false,
    );

    let a = pod("a", "trlpkta", "10.70.1.2", "a");
    let mut b = pod("b", "trlpktb", "10.70.2.2", "b");
    b.ports = vec![port("http", Protocol::Tcp, 80)];
    lab.change(Change::EndpointUpsert(a.clone()));
    lab.expect(
        "only a programmed: b's interface is still closed",
        false,
        false,
    );
    lab.change(Change::EndpointUpsert(b));
    lab.expect("both programmed, no policy: allowed", true, true);

    lab.change(Change::PolicyUpsert(deny_ingress_to_b()));
    lab.expect("default deny on b", false, false);

    let by_selector = allow_from_a("allow-a", DEFAULT_TIER, Action::Allow, ports(&[(80, 80)]));
    lab.change(Change::PolicyUpsert(by_selector.clone()));
    lab.expect("allow from app == 'a' to 80", true, false);
    // The allowing rule counted the connection's first packet (the rest is established).
    let listing = lab
        .node
        .run(|| nft::list_table_numeric("inet", TABLE))
        .unwrap()
        .unwrap();
    let counters = drift::rule_counters(&listing.unwrap());
    assert!(counters["knp/x/allow-a/in/0"].packets >= 1, "{counters:?}");
    lab.change(Change::PolicyRemove(by_selector.id));
    lab.expect("the allow removed", false, false);

    // A security tier (before default) that denies by default; a Pass sends a's traffic on to
    // the default tier, which allows the named port `http` (80) and denies the rest.
    lab.change(Change::TierUpsert(tier(
        "security",
        Some(10.0),
        TierDefault::Deny,
    )));
    let pass = allow_from_a("pass-a", "security", Action::Pass, vec![]);
    lab.change(Change::PolicyUpsert(pass));
    let named = allow_from_a(
        "allow-http",
        DEFAULT_TIER,
        Action::Allow,
        vec![PortMatch::Named("http".into())],
    );
    lab.change(Change::PolicyUpsert(named));
    lab.expect(
        "Pass to the default tier, which allows the named port",
        true,
        false,
    );

    // a's label changes: the Pass no longer matches it, so the security tier's default denies
    // (set elements only).
    let mut relabelled = a;
    relabelled.labels = labels(&[("app", "z")]);
    lab.change(Change::EndpointUpsert(relabelled));
    lab.expect(
        "a relabelled: no Pass, the security tier denies",
        false,
        false,
    );
}

/// On a dual-stack node (b has an IPv6 address too) a rule whose notNets are all IPv4 and whose
/// ports mix a named port with a number compiles to IPv4 and IPv6 variants; the IPv6 one must
/// not match IPv4 packets (its numeric alternative once had no family match, so a in the
/// excluded net reached port 81).
#[test]
fn an_ipv6_rule_variant_does_not_match_ipv4_packets() {
    let mut lab = Lab::new();
    let a = pod("a", "trlpkta", "10.70.1.2", "a");
    let mut b = pod("b", "trlpktb", "10.70.2.2", "b");
    b.addresses.push("fd00:70:2::2".parse().unwrap());
    b.ports = vec![port("http", Protocol::Tcp, 80)];
    lab.change(Change::EndpointUpsert(a));
    lab.change(Change::EndpointUpsert(b));
    let mut p = policy(
        PolicyKind::Namespaced,
        Some("x"),
        "not-from-a",
        DEFAULT_TIER,
        "app == 'b'",
    );
    p.ingress = Some(vec![Rule {
        protocol: Some(Protocol::Tcp),
        source: EntityMatch {
            not_nets: nets(&["10.70.1.0/24"]),
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
        ..rule(Action::Allow)
    }]);
    lab.change(Change::PolicyUpsert(p));
    lab.expect(
        "a is in the excluded net: blocked on 80 and 81",
        false,
        false,
    );
}

/// A namespaced policy's rule with only a notSelector allows from its own namespace only
/// (Calico namespaces the rule's selector): a in namespace y stays blocked (the compiled rule
/// once had no namespace match at all).
#[test]
fn a_not_selector_rule_does_not_open_other_namespaces() {
    let mut lab = Lab::new();
    let mut a = endpoint("y", "a", NODE, Some("trlpkta"), &["10.70.1.2"]);
    a.labels = labels(&[("app", "a")]);
    lab.change(Change::EndpointUpsert(a));
    lab.change(Change::EndpointUpsert(pod(
        "b",
        "trlpktb",
        "10.70.2.2",
        "b",
    )));
    let mut p = policy(
        PolicyKind::Namespaced,
        Some("x"),
        "not-z",
        DEFAULT_TIER,
        "app == 'b'",
    );
    p.ingress = Some(vec![Rule {
        source: EntityMatch {
            not_selector: Some(sel("app == 'z'")),
            ..Default::default()
        },
        ..rule(Action::Allow)
    }]);
    lab.change(Change::PolicyUpsert(p));
    lab.expect("a is in another namespace: blocked", false, false);
}

/// A pod cannot borrow another pod's address: a's datagram with c's source address (c may
/// reach b, a may not) is dropped on a's interface; from its own address, once allowed, it
/// arrives (the socket and the path work).
#[test]
fn a_pod_sending_with_another_pods_address_is_dropped() {
    let mut lab = Lab::new();
    let b_ns = Netns::open(lab._guards[2].path()).unwrap();
    let rx = b_ns
        .run(|| std::net::UdpSocket::bind(("10.70.2.2", 5353)))
        .unwrap()
        .unwrap();
    rx.set_read_timeout(Some(BLOCKED_AFTER)).unwrap();
    lab._guards[1].exec_ok(&["ip", "addr", "add", "10.70.3.2/32", "dev", "eth0"]);
    lab.change(Change::EndpointUpsert(pod(
        "a",
        "trlpkta",
        "10.70.1.2",
        "a",
    )));
    lab.change(Change::EndpointUpsert(pod(
        "b",
        "trlpktb",
        "10.70.2.2",
        "b",
    )));
    // c runs on another node; only its address matters here.
    let mut c = endpoint("x", "c", "n2", None, &["10.70.3.2"]);
    c.labels = labels(&[("app", "c")]);
    lab.change(Change::EndpointUpsert(c));
    let mut only_c = policy(
        PolicyKind::Kubernetes,
        Some("x"),
        "only-c",
        DEFAULT_TIER,
        "app == 'b'",
    );
    only_c.ingress = Some(vec![Rule {
        source: EntityMatch {
            selector: Some(sel("app in {'c', 'a2'}")),
            ..Default::default()
        },
        ..rule(Action::Allow)
    }]);
    lab.change(Change::PolicyUpsert(only_c));
    let mut buf = [0u8; 16];
    send(&lab.a, "10.70.3.2", b"spoofed");
    let got = rx.recv_from(&mut buf).map(|(n, _)| buf[..n].to_vec());
    assert!(
        got.is_err(),
        "a's datagram with c's address arrived: {got:?}"
    );

    // a is allowed now (labelled a2): from its own address it arrives, within a deadline.
    let mut a2 = pod("a", "trlpkta", "10.70.1.2", "a2");
    a2.labels = labels(&[("app", "a2")]);
    lab.change(Change::EndpointUpsert(a2));
    rx.set_read_timeout(Some(ALLOWED_WITHIN)).unwrap();
    send(&lab.a, "10.70.1.2", b"own");
    let (n, from) = rx.recv_from(&mut buf).expect("a's own datagram arrives");
    assert_eq!(
        (&buf[..n], from.ip().to_string().as_str()),
        (&b"own"[..], "10.70.1.2")
    );
    // The guards (`ip saddr != …`, `meta nfproto 10` for a pod without IPv6) list back as
    // compiled.
    let listing = lab
        .node
        .run(|| nft::list_table_numeric("inet", TABLE))
        .unwrap()
        .unwrap();
    let diff = drift::differences(listing.as_ref(), lab.engine.full());
    assert!(diff.is_empty(), "{diff:?}");
}

/// Sends one datagram from `from` (an address of pod a) to b's port 5353.
fn send(a: &Netns, from: &str, what: &[u8]) {
    a.run(|| {
        let s = std::net::UdpSocket::bind((from, 0)).unwrap();
        s.send_to(what, ("10.70.2.2", 5353)).unwrap();
    })
    .unwrap()
}
