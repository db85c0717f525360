//! The compiler's output against the real kernel, inside test namespaces (never the root one):
//! full loads and incremental batches list back exactly as the expected ruleset, a failing
//! batch leaves the previous ruleset in force, drift is detected. Needs root.

mod common;

use serde_json::Value;
use trellis_dataplane::nft_elements::{ElementChange, ElementSocket, NFPROTO_INET};
use trellis_dataplane::{nft, Netns};
use trellis_policy::compile::elements::SetKeys;
use trellis_policy::compile::{self, drift, ruleset::TABLE, Change, PolicyEngine, Ruleset};
use trellis_policy::model::*;
use trellis_testutil::TestNetns;

/// A namespace holding the policy table.
struct Node {
    _guard: TestNetns,
    ns: Netns,
    /// Kept like the agent keeps it (opened in the namespace on first use).
    sock: std::cell::RefCell<Option<ElementSocket>>,
}

impl Node {
    fn new(tag: &str) -> Node {
        let guard = TestNetns::new(tag);
        let ns = Netns::open(guard.path()).unwrap();
        Node {
            _guard: guard,
            ns,
            sock: Default::default(),
        }
    }

    fn apply(&self, doc: &Value) -> Result<(), trellis_dataplane::DataplaneError> {
        self.ns.run(|| nft::apply_document(doc)).unwrap()
    }

    /// Element-only batches as the agent sends them: over netlink, without `nft`.
    fn apply_keys(&self, keys: &[SetKeys]) -> Result<(), trellis_dataplane::DataplaneError> {
        let changes: Vec<ElementChange> = keys
            .iter()
            .map(|k| ElementChange {
                add: k.add,
                set: k.set.clone(),
                keys: k.keys.clone(),
            })
            .collect();
        let mut sock = self.sock.borrow_mut();
        if sock.is_none() {
            *sock = Some(self.ns.run(ElementSocket::open).unwrap()?);
        }
        sock.as_mut().unwrap().apply(NFPROTO_INET, TABLE, &changes)
    }

    fn listing(&self) -> Option<Value> {
        self.ns
            .run(|| nft::list_table_numeric("inet", TABLE))
            .unwrap()
            .unwrap()
    }

    /// Asserts the kernel's table is exactly `want`.
    fn assert_table(&self, want: &Ruleset, when: &str) {
        let diffs = drift::differences(self.listing().as_ref(), want);
        assert!(
            diffs.is_empty(),
            "{when}: the kernel's table differs:\n{}",
            diffs.join("\n")
        );
    }
}

#[test]
fn every_feature_loads_and_lists_back_as_compiled() {
    let node = Node::new("polrich");
    let rs = compile::compile(&common::rich_model(), common::NODE);
    node.apply(&rs.to_nft_json()).unwrap();
    node.assert_table(&rs, "after the full load");
    // Loading again replaces the table atomically (no duplicates, no error).
    node.apply(&rs.to_nft_json()).unwrap();
    node.assert_table(&rs, "after a second full load");
}

/// Incremental batches in the kernel: after each change (scripted ones on the rich model, then
/// random ones), the kernel's table is exactly `compile(model)`.
#[test]
fn incremental_batches_keep_the_kernel_equal_to_compile() {
    let node = Node::new("polinc");
    let mut engine = PolicyEngine::with_model(common::NODE, common::rich_model());
    node.apply(&engine.full().to_nft_json()).unwrap();
    let mut changes = scripted_changes(engine.model());
    let mut r =
        common::random::Rng::new(std::env::var("POL_SEED").map_or(42, |s| s.parse().unwrap()));
    changes.extend(
        (0..std::env::var("POL_STEPS").map_or(80, |s| s.parse().unwrap()))
            .map(|_| common::random::random_change(r.next())),
    );
    let mut fast = 0;
    for (step, change) in changes.into_iter().enumerate() {
        let ops = engine.handle(change.clone());
        if ops.is_empty() {
        } else if let Some(keys) = ops.element_keys(&engine.full().sets) {
            // The agent's fast path: element-only batches straight over netlink.
            fast += 1;
            if let Err(e) = node.apply_keys(&keys) {
                panic!("step {step}: {change:?}: the kernel refused {keys:#?}: {e}");
            }
        } else if let Err(e) = node.apply(&ops.to_nft_json()) {
            panic!("step {step}: {change:?}: nft refused {ops:#?}: {e}");
        }
        let want = compile::compile(engine.model(), common::NODE);
        node.assert_table(&want, &format!("step {step} ({change:?})"));
    }
    assert!(fast >= 5, "only {fast} batches took the netlink path");
}

/// The agent's batches (`handle_all`: a pass's changes as one transaction) in the kernel, from
/// the rich model and from an empty one: after each batch of random changes the kernel took
/// the ops (over netlink when element-only, as the agent sends them) and its table is exactly
/// `compile(model)`.
#[test]
fn batches_of_changes_keep_the_kernel_equal_to_compile() {
    let env = |k: &str, d: u64| std::env::var(k).map_or(d, |s| s.parse().unwrap());
    for (tag, model) in [
        ("polbat", common::rich_model()),
        ("polbae", Model::default()),
    ] {
        let node = Node::new(tag);
        let mut engine = PolicyEngine::with_model(common::NODE, model);
        node.apply(&engine.full().to_nft_json()).unwrap();
        let mut r = common::random::Rng::new(env("POL_SEED", 7));
        for step in 0..env("POL_BATCHES", 40) {
            let n = 1 + r.next() % 12;
            let changes: Vec<Change> = (0..n)
                .map(|_| common::random::random_change(r.next()))
                .collect();
            let ops = engine.handle_all(changes.clone());
            let refused = if ops.is_empty() {
                None
            } else if let Some(keys) = ops.element_keys(&engine.full().sets) {
                node.apply_keys(&keys).err()
            } else {
                node.apply(&ops.to_nft_json()).err()
            };
            if let Some(e) = refused {
                panic!("{tag} batch {step}: {changes:?}: the kernel refused {ops:#?}: {e}");
            }
            let want = compile::compile(engine.model(), common::NODE);
            node.assert_table(&want, &format!("{tag} batch {step} ({changes:?})"));
        }
    }
}

/// Changes that touch every kind of object, with set elements merging and splitting.
fn scripted_changes(m: &Model) -> Vec<Change> {
    let mut out = Vec::new();
    // A remote pod inside the partners' 10.0.1.0/30 joins, then leaves, the component.
    let mut h = common::endpoint("y", "h", "n2", Some("trlh"), &["10.0.1.1", "10.0.1.4"]);
    h.labels = common::labels(&[("kind", "partner"), ("app", "h")]);
    out.push(Change::EndpointUpsert(h.clone()));
    h.labels = common::labels(&[("app", "h")]);
    out.push(Change::EndpointUpsert(h));
    // A local pod relabelled, readdressed, moved to another interface, removed.
    let mut a = common::endpoint_of(m, "x", "a");
    a.labels = common::labels(&[("app", "b")]);
    out.push(Change::EndpointUpsert(a.clone()));
    a.addresses = vec!["10.0.1.5".parse().unwrap(), "fd00::1:5".parse().unwrap()];
    out.push(Change::EndpointUpsert(a.clone()));
    a.interface = Some("trlz".into());
    out.push(Change::EndpointUpsert(a));
    out.push(Change::EndpointRemove {
        namespace: "x".into(),
        name: "b".into(),
    });
    // y/f takes over trla now that x/a left it.
    let mut f = common::endpoint_of(m, "y", "f");
    f.labels.insert("role".into(), "db".into());
    out.push(Change::EndpointUpsert(f));
    out.push(Change::NamespaceUpsert {
        name: "x".into(),
        labels: common::ns_labels("x", &[("team", "data")]),
    });
    out.push(Change::TierUpsert(common::tier(
        "security",
        Some(2_000_000.0),
        TierDefault::Deny,
    )));
    out.push(Change::TierRemove {
        name: "late".into(),
    });
    out.push(Change::NetworkSetUpsert(NetworkSet {
        namespace: None,
        name: "partners".into(),
        labels: common::labels(&[("kind", "partner")]),
        nets: common::nets(&["10.0.0.0/8", "203.0.113.0/25"]),
        node: false,
    }));
    out.push(Change::ServiceAccountUpsert {
        namespace: "x".into(),
        name: "sa-web".into(),
        labels: common::labels(&[("tier", "backend")]),
    });
    out.push(Change::ProfileRemove {
        name: "kns.x".into(),
    });
    let id = common::policy_id(PolicyKind::Global, None, "security");
    out.push(Change::PolicyRemove(id));
    out
}

/// A batch nft refuses (one bad operation at its end) changes nothing: the previous ruleset
/// stays fully in force; a whole-table replace from the engine then converges.
#[test]
fn a_failing_batch_leaves_the_previous_ruleset_in_force() {
    let node = Node::new("polfail");
    let mut engine = PolicyEngine::with_model(common::NODE, common::rich_model());
    node.apply(&engine.full().to_nft_json()).unwrap();
    let before = engine.full().clone();
    let mut a = common::endpoint_of(engine.model(), "x", "a");
    a.labels = common::labels(&[("app", "q")]);
    let mut ops = engine.handle(Change::EndpointUpsert(a));
    assert!(ops.len() > 1, "{ops:#?}");
    ops.ops
        .push(compile::NftOp::DeleteChain("no-such-chain".into()));
    let err = node.apply(&ops.to_nft_json()).unwrap_err();
    assert!(err.to_string().contains("rejected"), "{err}");
    node.assert_table(&before, "after the refused batch");
    node.apply(&engine.full().to_nft_json()).unwrap();
    node.assert_table(engine.full(), "after the replace");
}

/// A rule deleted by hand, or an element added by hand, is drift; a replace repairs it.
#[test]
fn drift_is_detected_and_repaired() {
    let node = Node::new("poldrift");
    let engine = PolicyEngine::with_model(common::NODE, common::rich_model());
    let want = engine.full();
    node.apply(&want.to_nft_json()).unwrap();
    assert!(!drift::differs(node.listing().as_ref(), want));

    let listing = node.listing().unwrap();
    let (chain, handle, _) = nft::rules(&listing)
        .into_iter()
        .find(|(c, _, comment)| c.starts_with("pol_") && comment.is_some())
        .unwrap();
    node.ns
        .run(|| {
            let doc = serde_json::json!({"nftables": [{"delete": {"rule": {
                "family": "inet", "table": TABLE, "chain": chain, "handle": handle}}}]});
            nft::apply_document(&doc)
        })
        .unwrap()
        .unwrap();
    let diffs = drift::differences(node.listing().as_ref(), want);
    assert!(diffs.iter().any(|d| d.contains(&chain)), "{diffs:?}");
    node.apply(&want.to_nft_json()).unwrap();
    assert!(!drift::differs(node.listing().as_ref(), want));

    let set = want
        .sets
        .keys()
        .find(|s| s.ends_with("_v4") && s.starts_with("sel_"))
        .unwrap();
    node.ns
        .run(|| {
            let doc = serde_json::json!({"nftables": [{"add": {"element": {
                "family": "inet", "table": TABLE, "name": set, "elem": ["198.51.100.7"]}}}]});
            nft::apply_document(&doc)
        })
        .unwrap()
        .unwrap();
    assert!(drift::differs(node.listing().as_ref(), want));
    node.ns
        .run(|| {
            nft::apply_document(&serde_json::json!({"nftables": [
        {"delete": {"table": {"family": "inet", "name": TABLE}}}]}))
        })
        .unwrap()
        .unwrap();
    assert!(
        drift::differs(node.listing().as_ref(), want),
        "a missing table is drift"
    );
}

/// nft hides `meta nfproto ipv4` before `meta l4proto icmp` and `meta nfproto ipv6` before
/// `meta l4proto ipv6-icmp` when it lists a rule (the protocol implies the family), though the
/// kernel keeps both. A policy rule `protocol: ICMPv6` (or ICMP) without an ICMP type, in a
/// family variant, compiles to exactly that: the table nft took must not read as drifted, or
/// the agent replaces it whole on every resync (counters reset, a warning each time).
#[test]
fn an_icmp_protocol_rule_of_one_family_lists_back_as_compiled() {
    use trellis_policy::compile::ruleset::{Chain, Expr, Op, Rule, Stmt, Verdict};
    let node = Node::new("policmp");
    let mut rs = compile::compile(&Model::default(), common::NODE);
    let m = |key, n| Stmt::Match {
        left: Expr::Meta(key),
        op: Op::Eq,
        right: Expr::Num(n),
    };
    let rules = [(2, 1), (10, 58), (2, 6)]
        .into_iter()
        .map(|(f, p)| Rule {
            stmts: vec![
                m("nfproto", f),
                m("l4proto", p),
                Stmt::Counter,
                Stmt::Verdict(Verdict::Drop),
            ],
            comment: Some(format!("probe/{f}/{p}")),
        })
        .collect();
    rs.chains
        .insert("probe".into(), Chain { base: false, rules });
    node.apply(&rs.to_nft_json()).unwrap();
    node.assert_table(&rs, "after loading rules of one family and ICMP");
}

/// A rule with numeric ports on both sides and a named port in `notPorts` (a named-port
/// lookup between the two numeric matches as the rule reads) lists back as compiled: nft merges
/// `sport` and `dport` equality matches across such a lookup, so the compiler puts numeric port
/// matches first — otherwise the table reads as drifted and is replaced on every resync.
#[test]
fn numeric_ports_on_both_sides_with_a_named_not_port_list_back_as_compiled() {
    let node = Node::new("polports");
    let mut m = common::rich_model();
    let mut p = common::policy(PolicyKind::Global, None, "ports", "default", "all()");
    let mut r = common::rule(Action::Deny);
    r.protocol = Some(Protocol::Udp);
    r.source.ports = common::ports(&[(80, 80)]);
    r.destination.ports = common::ports(&[(80, 80)]);
    r.destination.not_ports = vec![PortMatch::Named("http".into())];
    p.ingress = Some(vec![r]);
    common::add_policy(&mut m, p);
    let rs = compile::compile(&m, common::NODE);
    let text = rs.to_string();
    assert!(
        text.lines().any(|l| l.contains("udp sport 80")
            && l.contains("udp dport 80")
            && l.contains("udp dport != @np_")),
        "the case under test is compiled:\n{text}"
    );
    node.apply(&rs.to_nft_json()).unwrap();
    node.assert_table(&rs, "after loading a rule with ports on both sides");
}

/// `sport != X` and `dport != Y` in one rule, with named-port lookups beside them (which the
/// compiler now puts after both numeric matches): nft 1.0.6 merges `!=` compares of adjacent
/// header fields wherever they stand in the rule (it sorts them by offset, skipping lookups) into
/// one wide `!=` that matches when either port differs; `avoid_ne_merges` must keep that from
/// the kernel. Read in the kernel's bytecode, since the listing splits a merged compare again.
#[test]
fn ne_port_pairs_around_named_lookups_never_reach_the_kernel_as_one_wide_compare() {
    let node = Node::new("polneq");
    let mut m = common::rich_model();
    let mut p = common::policy(PolicyKind::Global, None, "neq", "default", "all()");
    // Source: `sport != 80`; destination: `dport != 81` and a named `notPort` lookup.
    let mut a = common::rule(Action::Deny);
    a.protocol = Some(Protocol::Udp);
    a.source.not_ports = common::ports(&[(80, 80)]);
    a.destination.not_ports = common::ports(&[(81, 81)]);
    a.destination
        .not_ports
        .push(PortMatch::Named("http".into()));
    // Source ports numeric and named (one alternative reads `sport != 80` and a lookup),
    // destination `dport != 81`.
    let mut b = common::rule(Action::Deny);
    b.protocol = Some(Protocol::Udp);
    b.source.ports = common::ports(&[(80, 80)]);
    b.source.ports.push(PortMatch::Named("http".into()));
    b.destination.not_ports = common::ports(&[(81, 81)]);
    p.ingress = Some(vec![a, b]);
    common::add_policy(&mut m, p);
    let rs = compile::compile(&m, common::NODE);
    let text = rs.to_string();
    let cases = text
        .lines()
        .filter(|l| l.contains("udp sport != 80") && l.contains("@np_"))
        .count();
    assert!(cases >= 2, "the cases under test are compiled:\n{text}");
    node.apply(&rs.to_nft_json()).unwrap();
    node.assert_table(&rs, "after loading `!=` port pairs beside lookups");
    let code = node
        ._guard
        .exec_ok(&["nft", "--debug=netlink", "list", "table", "inet", TABLE]);
    let lines: Vec<&str> = code.lines().map(str::trim).collect();
    for w in lines.windows(2) {
        let wide_ports = w[0].starts_with("[ payload load 4b @ transport header + 0 ");
        assert!(
            !(wide_ports && w[1].starts_with("[ cmp neq ")),
            "a wide `!=` over both ports reached the kernel:\n{code}"
        );
    }
}

/// With flow logs on, every deciding rule (Allow, Deny, tier defaults, the endpoint's default)
/// carries the flow-log copy under its label, the kernel takes the table and lists it back as
/// compiled, and the engine's incremental path builds the same table as the batch compiler.
#[test]
fn flow_log_rules_load_and_list_back_as_compiled() {
    let node = Node::new("polflow");
    let cfg = compile::CompileConfig {
        flow_log_group: Some(11),
        ..Default::default()
    };
    let rs = compile::compile_with(&common::rich_model(), common::NODE, &cfg);
    let text = rs.to_string();
    assert!(
        text.contains("group 11 snaplen 128"),
        "no flow-log statement in:\n{text}"
    );
    for label in ["/in/default", "/out/default"] {
        assert!(text.contains(label), "no default rule labelled *{label}");
    }
    node.apply(&rs.to_nft_json()).unwrap();
    node.assert_table(&rs, "after the full load with flow logs");
    let mut engine = PolicyEngine::with_config(common::NODE, cfg);
    engine.load(common::rich_model());
    assert_eq!(engine.full(), &rs, "the engine and the compiler agree");
    // Flow logs off: no copy anywhere.
    let off = compile::compile(&common::rich_model(), common::NODE).to_string();
    assert!(!off.contains(" group "), "{off}");
}
