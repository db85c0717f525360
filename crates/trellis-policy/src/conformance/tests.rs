use super::*;

fn model() -> ConformanceModel {
    let ns = |n: &str| ModelNamespace {
        name: n.into(),
        labels: [("ns".to_string(), n.to_string())].into(),
    };
    let pod = |n: &str| ModelPod {
        name: n.into(),
        labels: [("pod".to_string(), n.to_string())].into(),
        service_account: None,
    };
    ConformanceModel {
        namespaces: vec![ns("x"), ns("y"), ns("z")],
        pods: vec![pod("a"), pod("b"), pod("c")],
        ports: vec![80, 81],
        protocols: tcp_udp(),
    }
}

fn peer(ns: Option<&str>, pod: Option<&str>) -> Peer {
    Peer {
        namespace: ns.map(str::to_string),
        pod: pod.map(str::to_string),
    }
}

fn rule(from: Peer, to: Peer, reach: bool) -> PeerRule {
    PeerRule { from, to, reach }
}

/// A table written the way the e2e suite prints one (`.` connected, `X` blocked), with the
/// diagonal as `-` in ours.
fn e2e_table(text: &str) -> TruthTable {
    let pods = model().pods();
    let names: Vec<String> = pods.iter().map(PodRef::to_string).collect();
    let mut t = TruthTable::new(names.clone(), names.clone(), Cell::Skip);
    for (r, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        for (c, mark) in line.split_whitespace().skip(1).enumerate() {
            let cell = if r == c {
                Cell::Skip
            } else {
                Cell::from_bool(mark.trim_matches('*') == ".")
            };
            t.set(&names[r], &names[c], cell);
        }
    }
    t
}

/// The e2e case "should support denying of egress traffic on the client side" prints its
/// expected table in a comment; the same four ExpectPeer calls, in the same order, give it.
#[test]
fn ordered_overrides_match_the_e2e_reachability() {
    let e = Expectation {
        default: true,
        peers: vec![
            rule(peer(Some("x"), Some("a")), peer(None, None), false),
            rule(peer(None, None), peer(Some("y"), Some("a")), false),
            rule(peer(Some("x"), Some("a")), peer(Some("y"), Some("a")), true),
            rule(peer(None, None), peer(Some("y"), Some("b")), false),
        ],
    };
    let want = e2e_table(
        "
        xa	X	X	X	.	*X*	X	X	X	X
        xb	.	.	.	X	X	.	.	.	.
        xc	.	.	.	X	X	.	.	.	.
        ya	.	.	.	X	X	.	.	.	.
        yb	.	.	.	X	X	.	.	.	.
        yc	.	.	.	X	X	.	.	.	.
        za	.	.	.	X	X	.	.	.	.
        zb	.	.	.	X	X	.	.	.	.
        zc	.	.	.	X	X	.	.	.	.",
    );
    let got = e.table(&model().pods());
    assert_eq!(got, want, "\n{}", got.render());
}

#[test]
fn a_later_override_wins_and_expect_all_ingress_egress_are_peer_rules() {
    let pods = model().pods();
    // ExpectAllIngress(x/a, false); Expect(x/b, x/a, true) — the PodSelector case.
    let e = Expectation {
        default: true,
        peers: vec![
            rule(peer(None, None), peer(Some("x"), Some("a")), false),
            rule(peer(Some("x"), Some("b")), peer(Some("x"), Some("a")), true),
        ],
    };
    let t = e.table(&pods);
    assert_eq!(t.get("x/b", "x/a"), Some(Cell::Reach));
    assert_eq!(t.get("x/c", "x/a"), Some(Cell::Blocked));
    assert_eq!(t.get("y/a", "x/a"), Some(Cell::Blocked));
    assert_eq!(t.get("x/a", "y/a"), Some(Cell::Reach));
    assert_eq!(
        t.get("x/a", "x/a"),
        Some(Cell::Skip),
        "a pod to itself is never compared"
    );
    // The same overrides the other way round: the blanket one, last, wins everywhere.
    let e = Expectation {
        default: true,
        peers: e.peers.into_iter().rev().collect(),
    };
    assert_eq!(e.table(&pods).get("x/b", "x/a"), Some(Cell::Blocked));
    // A pod-only peer matches that pod in every namespace (ExpectAllEgress by name).
    let e = Expectation {
        default: false,
        peers: vec![rule(peer(None, Some("c")), peer(None, None), true)],
    };
    let t = e.table(&pods);
    assert_eq!(t.get("y/c", "x/a"), Some(Cell::Reach));
    assert_eq!(t.get("y/b", "x/a"), Some(Cell::Blocked));
}

#[test]
fn tables_render_parse_and_compare_without_the_diagonal() {
    let pods = model().pods();
    let want = Expectation {
        default: true,
        peers: vec![rule(peer(None, None), peer(Some("x"), None), false)],
    }
    .table(&pods);
    let text = want.render();
    assert!(text.starts_with("FROM \\ TO   x/a   x/b"), "{text}");
    assert!(
        text.contains("\ny/a         .     .     .     -     ok"),
        "{text}"
    );
    assert_eq!(TruthTable::parse(&text).unwrap(), want);
    // A saved probe output: notes after a blank line are not part of the table.
    assert_eq!(
        TruthTable::parse(&format!("# expected\n\n{text}\nx/a -> y/b: refused\n")).unwrap(),
        want
    );
    let mut got = want.clone();
    got.set("x/a", "x/a", Cell::Reach); // loopback: ignored
    assert!(want.differences(&got).is_empty());
    // Also when a hand-written expectation says something about a pod to itself.
    let mut hand = want.clone();
    hand.set("y/b", "y/b", Cell::Blocked);
    assert!(hand.differences(&want).is_empty());
    got.set("y/a", "x/b", Cell::Reach);
    got.set("z/c", "y/a", Cell::Error);
    let diffs: Vec<String> = want
        .differences(&got)
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert_eq!(
        diffs,
        [
            "y/a -> x/b: expected ., got ok",
            "z/c -> y/a: expected ok, got ERR"
        ]
    );
    let smaller = TruthTable::new(vec!["x/a".into()], vec!["x/b".into()], Cell::Blocked);
    assert_eq!(want.differences(&smaller).len(), 9 * 8 - 1);
    for (text, line, why) in [
        ("", 1, "no table"),
        ("x/a ok\n", 1, "must start with"),
        ("FROM \\ TO a b\na ok\n", 2, "1 cells for 2 columns"),
        ("FROM \\ TO a b\na ok maybe\n", 2, "\"maybe\" is not a cell"),
        ("FROM \\ TO a\na ok\na ok\n", 3, "row a twice"),
    ] {
        match TruthTable::parse(text) {
            Err(ConformanceError::Table { line: l, reason }) => {
                assert_eq!(l, line, "{text:?}: {reason}");
                assert!(reason.contains(why), "{text:?}: {reason}");
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
}

fn addrs() -> Addresses {
    model()
        .pods()
        .into_iter()
        .enumerate()
        .map(|(i, p)| (p, IpAddr::from([10, 244, 1, 10 + i as u8])))
        .collect()
}

#[test]
fn placeholders_become_addresses_and_cidrs() {
    let docs = vec![
        serde_json::json!({"apiVersion": "v1", "kind": "K", "metadata": {"name": "n"},
        "spec": {"a": "$(ip x/b)", "b": ["$(cidr y/a)", "$(cidr x/b/4)", "$(cidr z/c/24)"],
                 "c": "from $(ip x/a) to $(ip x/c)!"}}),
    ];
    let got = resolve(&docs, &addrs()).unwrap();
    let s = &got[0]["spec"];
    assert_eq!(s["a"], "10.244.1.11");
    assert_eq!(s["b"][0], "10.244.1.13/32");
    assert_eq!(
        s["b"][1], "0.0.0.0/4",
        "host bits cleared, as makeLargeCIDRForIP does"
    );
    assert_eq!(s["b"][2], "10.244.1.0/24");
    assert_eq!(s["c"], "from 10.244.1.10 to 10.244.1.12!");
    let mut v6 = addrs();
    v6.insert(PodRef::new("x", "b"), "fd00::b".parse().unwrap());
    let got = resolve(
        &[serde_json::json!({"x": ["$(cidr x/b)", "$(cidr x/b/4)"]})],
        &v6,
    )
    .unwrap();
    assert_eq!(got[0]["x"], serde_json::json!(["fd00::b/128", "f000::/4"]));
    let mut missing = addrs();
    missing.remove(&PodRef::new("x", "b"));
    assert_eq!(
        resolve(&docs, &missing).unwrap_err(),
        ConformanceError::NoAddress { pod: "x/b".into() }
    );
    assert!(resolve(&[serde_json::json!({"a": "$(cidr x/a/33)"})], &addrs()).is_err());
}

const HEAD: &str = "model:\n  namespaces: [{name: x, labels: {ns: x}}, {name: y}]\n  pods: [{name: a, labels: {pod: a}}, {name: b}]\n  ports: [80]\ncases:\n";

fn case(body: &str) -> Result<Suite, ConformanceError> {
    parse(&format!("{HEAD}{body}"))
}

#[test]
fn suites_parse_and_errors_name_the_field() {
    let ok = case(
        "- name: one\n  steps:\n  - apply: |\n      apiVersion: v1\n      kind: K\n      metadata: {name: n, namespace: x}\n      spec: {cidr: \"$(cidr y/b)\"}\n    probes:\n    - port: 80\n      protocol: UDP\n      expect: {default: false, peers: [{from: {namespace: y}, to: {pod: a}, reach: true}]}\n    - protocol: ICMP\n      expect: {default: true}\n- name: two\n  skip: \"SCTP: this kernel has no SCTP\"\n",
    )
    .unwrap();
    assert_eq!(ok.cases.len(), 2);
    assert_eq!(ok.cases[0].steps[0].apply.len(), 1);
    assert_eq!(ok.model.pods().len(), 4);
    assert_eq!(
        ok.model.named_ports(),
        [
            ("serve-80-tcp".to_string(), ProbeProtocol::Tcp, 80),
            ("serve-80-udp".to_string(), ProbeProtocol::Udp, 80)
        ]
    );
    let err = |body: &str| case(body).unwrap_err().to_string();
    let probe = |p: &str| format!("- name: c\n  steps:\n  - probes: [{p}]\n");
    for (body, want) in [
        ("- name: c\n  steps: []\n  bogus: 1\n".to_string(), "cases[0].bogus: unknown field `bogus`"),
        ("- name: c\n  steps: []\n".to_string(), "cases[0].steps 0: a case that is not skipped has steps"),
        ("- name: c\n  skip: s\n- name: c\n  skip: s\n".to_string(), "cases[1].name \"c\": used by an earlier case"),
        (probe("{port: 81, protocol: TCP, expect: {default: true}}"), "cases[0].steps[0].probes[0].port 81: the model's pods serve [80]"),
        (probe("{port: 80, protocol: ICMP, expect: {default: true}}"), "cases[0].steps[0].probes[0].port 80: an ICMP probe has no port"),
        (probe("{protocol: TCP, expect: {default: true}}"), "probes[0].port \"\": a tcp probe needs a port"),
        (probe("{port: 80, protocol: TCP, expect: {default: true, peers: [{from: {namespace: q}, to: {}, reach: true}]}}"), "probes[0].expect.peers[0].from.namespace \"q\": not a model namespace"),
        (probe("{port: 80, protocol: TCP, expect: {default: true, peers: [{from: {}, to: {pod: c}, reach: true}]}}"), "peers[0].to.pod \"c\": not a model pod"),
        ("- name: c\n  steps:\n  - labelPod: {namespace: x, name: c, labels: {}}\n".to_string(), "cases[0].steps[0].labelPod \"x/c\": not a model pod"),
        ("- name: c\n  steps:\n  - labelNamespace: {name: q}\n".to_string(), "labelNamespace.name \"q\": not a model namespace"),
        ("- name: c\n  steps:\n  - apply: \"kind: K\\n\"\n".to_string(), "cases[0].steps[0].apply document 1 \"\": a document needs apiVersion, kind and metadata.name"),
        ("- name: c\n  steps:\n  - delete: \"apiVersion: v\\nkind: K\\nmetadata: {name: n}\\nspec: {c: '$(cidr x/c)'}\\n\"\n".to_string(), "x/c is not a model pod"),
        ("- name: c\n  steps:\n  - apply: \"apiVersion: v\\nkind: K\\nmetadata: {name: n}\\nspec: {c: '$(ip x/a'}\\n\"\n".to_string(), "unclosed placeholder"),
        ("- name: c\n  steps:\n  - apply: \"apiVersion: v\\nkind: K\\nmetadata: {name: n}\\nspec: {c: '$(host x/a)'}\\n\"\n".to_string(), "expected $(ip NS/POD) or $(cidr NS/POD[/LEN])"),
        ("- name: c\n  steps:\n  - apply: \"a: [\\n\"\n".to_string(), "cases[0].steps[0].apply: "),
    ] {
        let e = err(&body);
        assert!(e.contains(want), "{body}\n→ {e}\n(want {want})");
    }
    assert!(
        parse("model: {namespaces: [], pods: [{name: a}], ports: [80]}\ncases: []\n")
            .unwrap_err()
            .to_string()
            .starts_with("model.namespaces 0: ")
    );
}

#[test]
fn a_world_tracks_documents_and_labels_and_undo_restores_the_model() {
    let suite = case(
        "- name: c\n  steps:\n  - apply: |\n      apiVersion: v1\n      kind: K\n      metadata: {name: p, namespace: x}\n      spec: {n: 1}\n      ---\n      apiVersion: v1\n      kind: K\n      metadata: {name: q, namespace: x}\n      spec: {ip: $(ip y/a)}\n  - apply: |\n      apiVersion: v1\n      kind: K\n      metadata: {name: p, namespace: x}\n      spec: {n: 2}\n    labelPod: {namespace: y, name: b, labels: {new: \"1\"}}\n    profilePod: {namespace: x, name: a, profiles: [pr]}\n  - delete: |\n      apiVersion: v1\n      kind: K\n      metadata: {name: q, namespace: x}\n    labelNamespace: {name: y, labels: {extra: \"1\"}}\n",
    )
    .unwrap();
    let addrs: Addresses = [(PodRef::new("y", "a"), "10.0.0.7".parse().unwrap())].into();
    let mut w = World::new(&suite.model);
    let steps = &suite.cases[0].steps;
    let changes = w.step(&steps[0], &addrs).unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(w.documents().nth(1).unwrap()["spec"]["ip"], "10.0.0.7");
    w.step(&steps[1], &addrs).unwrap();
    let docs: Vec<&Value> = w.documents().collect();
    assert_eq!(docs.len(), 2, "the same key replaces");
    assert_eq!(docs[0]["spec"]["n"], 2);
    assert_eq!(w.pods[&PodRef::new("y", "b")].labels["new"], "1");
    assert_eq!(w.pods[&PodRef::new("x", "a")].profiles, ["pr"]);
    let changes = w.step(&steps[2], &addrs).unwrap();
    assert_eq!(w.documents().count(), 1);
    assert_eq!(
        changes[0],
        Change::Delete(
            serde_json::json!({"apiVersion": "v1", "kind": "K", "metadata": {"name": "q", "namespace": "x"}, "spec": {"ip": "10.0.0.7"}})
        ),
        "a delete carries the document as applied"
    );
    assert_eq!(w.namespaces["y"]["extra"], "1");
    let undo = w.undo();
    assert_eq!(
        undo,
        vec![
            Change::Delete(
                serde_json::json!({"apiVersion": "v1", "kind": "K", "metadata": {"name": "p", "namespace": "x"}, "spec": {"n": 2}})
            ),
            Change::NamespaceLabels {
                name: "y".into(),
                labels: Labels::new()
            },
            Change::PodProfiles {
                pod: PodRef::new("x", "a"),
                profiles: vec![]
            },
            Change::PodLabels {
                pod: PodRef::new("y", "b"),
                labels: Labels::new()
            },
        ]
    );
    assert_eq!(w, World::new(&suite.model));
}

/// The suites in `conformance/`: they parse, every case is unique, the Kubernetes suite holds
/// every `ginkgo.It` of `network_policy.go` (48, the three SCTP ones skipped with the reason)
/// and the Calico suite as many cases; every document resolves against addresses for the
/// model's pods.
#[test]
fn the_shipped_suites_parse_and_resolve() {
    let k8s = parse(include_str!("../../conformance/kubernetes.yaml")).unwrap();
    let calico = parse(include_str!("../../conformance/calico.yaml")).unwrap();
    assert_eq!(k8s.cases.len(), 48);
    assert_eq!(calico.cases.len(), k8s.cases.len());
    let skipped: Vec<&str> = k8s.cases.iter().filter_map(|c| c.skip.as_deref()).collect();
    assert_eq!(skipped.len(), 3);
    assert!(skipped.iter().all(|s| s.contains("SCTP")));
    assert!(calico.cases.iter().all(|c| c.skip.is_none()));
    assert_eq!(k8s.model, calico.model, "one lab replays both suites");
    assert_eq!(k8s.model.pods().len(), 9);
    for suite in [&k8s, &calico] {
        let addrs: Addresses = suite
            .model
            .pods()
            .into_iter()
            .enumerate()
            .map(|(i, p)| (p, IpAddr::from([10, 244, 1, 10 + i as u8])))
            .collect();
        for c in &suite.cases {
            assert!(c.source.is_some(), "{}: no source", c.name);
            let mut w = World::new(&suite.model);
            for s in &c.steps {
                w.step(s, &addrs)
                    .unwrap_or_else(|e| panic!("{}: {e}", c.name));
                for p in &s.probes {
                    p.expect.table(&suite.model.pods());
                }
            }
            assert!(
                c.skip.is_some() || c.steps.iter().any(|s| !s.probes.is_empty()),
                "{}: probes nothing",
                c.name
            );
        }
    }
}

/// The transcription of the one e2e case that prints its expected table reproduces that table.
#[test]
fn the_transcribed_client_side_egress_case_gives_the_e2e_table() {
    let k8s = parse(include_str!("../../conformance/kubernetes.yaml")).unwrap();
    let case = k8s
        .cases
        .iter()
        .find(|c| {
            c.name
                .starts_with("should support denying of egress traffic on the client side")
        })
        .unwrap();
    let got = case.steps[0].probes[0].expect.table(&k8s.model.pods());
    let want = e2e_table(
        "
        xa	X	X	X	.	*X*	X	X	X	X
        xb	.	.	.	X	X	.	.	.	.
        xc	.	.	.	X	X	.	.	.	.
        ya	.	.	.	X	X	.	.	.	.
        yb	.	.	.	X	X	.	.	.	.
        yc	.	.	.	X	X	.	.	.	.
        za	.	.	.	X	X	.	.	.	.
        zb	.	.	.	X	X	.	.	.	.
        zc	.	.	.	X	X	.	.	.	.",
    );
    assert_eq!(got, want, "\n{}", got.render());
}
