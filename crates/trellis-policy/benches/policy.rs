//! Policy compiler speed, figures and ratios in one run:
//!
//! (a) 2 000 policies × 2 000 endpoints (20 namespaces × 100 pods, 100 of them on this node,
//!     every policy applying to one local pod): a full compile; the engine's ops for one pod's
//!     label change (local and remote); and — as root, in a test namespace holding the whole
//!     table — the time `nft` takes to apply those ops and the time the agent's path takes
//!     (the same element-only batches over one kept netlink socket, `nft_elements`), beside an
//!     empty `nft` batch (nft's own start and cache fetch) and one against an empty table.
//! (b) Full program of those 10 000 policy rules from scratch (`nft -j -f -` of the compiled
//!     table) vs `nft -f` of the same rules written linearly as text (per pod and direction,
//!     one rule per policy rule, selectors spelled out as inline address sets).
//!
//! (c) The same 2 000 NetworkPolicies plus 100 ClusterNetworkPolicies (Admin tier, namespace
//!     subjects and peers): one namespace's label change (a label the ClusterNetworkPolicies'
//!     peers read) — the engine's ops, and as root the time the agent's path (netlink) takes
//!     to put them in the kernel holding the whole table.
//!
//! Run: `cargo bench -p trellis-policy --bench policy` (root for the kernel parts).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::*;
use trellis_dataplane::nft_elements::{ElementChange, ElementSocket, NFPROTO_INET};
use trellis_dataplane::{nft, Netns};
use trellis_policy::compile::elements::SetKeys;
use trellis_policy::compile::{self, ruleset::TABLE, Change, Ops, PolicyEngine};
use trellis_policy::model::*;
use trellis_testutil::TestNetns;

const NAMESPACES: usize = 20;
const PODS_PER_NS: usize = 100;
const LOCAL_PER_NS: usize = 5;
const POLICIES_PER_NS: usize = 100;

fn pod_addr(n: usize, j: usize) -> String {
    format!("10.{}.{}.{}", 1 + n, j / 200, 1 + j % 200)
}

fn iface(n: usize, j: usize) -> String {
    format!("trl{n:03}x{j:03}")
}

/// The benchmark model: every policy has five rules (three ingress, two egress) and selects
/// the pods of one role in its namespace, exactly one of which is local.
fn model() -> Model {
    let mut m = Model::default();
    for n in 0..NAMESPACES {
        let ns = format!("ns{n}");
        m.namespaces
            .insert(ns.clone(), ns_labels(&ns, &[("team", &format!("t{n}"))]));
        for j in 0..PODS_PER_NS {
            let local = j < LOCAL_PER_NS;
            let node = if local { NODE } else { "remote" };
            let ifc = iface(n, j);
            let mut e = endpoint(&ns, &format!("p{j}"), node, Some(&ifc), &[&pod_addr(n, j)]);
            e.labels = labels(&[
                ("app", &format!("app{}", j % 50)),
                ("role", &format!("r{}", j % LOCAL_PER_NS)),
            ]);
            add_endpoint(&mut m, e);
        }
        for i in 0..POLICIES_PER_NS {
            let sel_text = format!("role == 'r{}'", i % LOCAL_PER_NS);
            let mut p = policy(
                PolicyKind::Namespaced,
                Some(&ns),
                &format!("p{i}"),
                DEFAULT_TIER,
                &sel_text,
            );
            p.order = Some(i as f64);
            let tcp = |port: u16| Rule {
                protocol: Some(Protocol::Tcp),
                destination: EntityMatch {
                    ports: ports(&[(port, port)]),
                    ..Default::default()
                },
                ..rule(Action::Allow)
            };
            let from = |s: String| EntityMatch {
                selector: Some(sel(&s)),
                ..Default::default()
            };
            p.ingress = Some(vec![
                Rule {
                    source: from(format!("app == 'app{}'", i % 50)),
                    ..tcp(80)
                },
                Rule {
                    source: EntityMatch {
                        namespaces: Some(NamespaceScope::Matching(sel(&format!(
                            "team == 't{}'",
                            (n + 1 + i % 3) % NAMESPACES
                        )))),
                        ..Default::default()
                    },
                    ..tcp(8080)
                },
                Rule {
                    source: EntityMatch {
                        nets: nets(&[&format!("10.{}.0.0/16", 200 + i % 50)]),
                        ..Default::default()
                    },
                    ..rule(Action::Deny)
                },
            ]);
            let mut dst = tcp(5432);
            dst.destination.selector = Some(sel(&format!("app == 'app{}'", (i + 7) % 50)));
            let dns = Rule {
                protocol: Some(Protocol::Udp),
                destination: EntityMatch {
                    nets: nets(&["10.96.0.10/32"]),
                    ports: ports(&[(53, 53)]),
                    ..Default::default()
                },
                ..rule(Action::Allow)
            };
            p.egress = Some(vec![dst, dns]);
            add_policy(&mut m, p);
        }
    }
    m
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Alternating label changes of one pod (so every change really changes something).
fn relabel(m: &Model, ns: &str, name: &str, i: usize) -> Change {
    let mut e = m.endpoints[&(ns.to_string(), name.to_string())].clone();
    e.labels.insert(
        "app".into(),
        format!("app{}", if i.is_multiple_of(2) { 13 } else { 3 }),
    );
    Change::EndpointUpsert(e)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let m = model();
    let rules: usize = m
        .policies
        .values()
        .map(|p| p.ingress.as_ref().map_or(0, Vec::len) + p.egress.as_ref().map_or(0, Vec::len))
        .sum();
    println!(
        "model: {} policies ({rules} rules), {} endpoints ({} on this node)",
        m.policies.len(),
        m.endpoints.len(),
        NAMESPACES * LOCAL_PER_NS
    );

    let t = Instant::now();
    let rs = compile::compile(&m, NODE);
    let compile_time = t.elapsed();
    let nft_rules: usize = rs.chains.values().map(|c| c.rules.len()).sum();
    println!(
        "(a) compile: {} ({} chains, {nft_rules} nft rules, {} sets, {} elements)",
        ms(compile_time),
        rs.chains.len(),
        rs.sets.len(),
        rs.sets.values().map(|s| s.elements.len()).sum::<usize>()
    );
    let t = Instant::now();
    let mut engine = PolicyEngine::with_model(NODE, m.clone());
    println!("    engine built from the model: {}", ms(t.elapsed()));

    let mut batches = Vec::new();
    for (what, ns, pod) in [("local", "ns3", "p2"), ("remote", "ns3", "p42")] {
        let mut times = Vec::new();
        let mut sizes = Vec::new();
        for i in 0..40 {
            let c = relabel(engine.model(), ns, pod, i);
            let t = Instant::now();
            let ops = engine.handle(c);
            times.push(t.elapsed());
            sizes.push(ops.len());
            if i < 20 {
                // The first ten go through nft, the next ten over netlink (the agent's path).
                let keys = ops.element_keys(&engine.full().sets);
                batches.push((what, ops, keys));
            }
        }
        println!(
            "    one {what} pod's label change → ops: {} median ({} ops, {} bytes of JSON)",
            ms(median(times)),
            sizes[0],
            batches.last().unwrap().1.to_nft_json().to_string().len()
        );
    }

    let cluster = cluster_case(&m);
    if !nix::unistd::Uid::effective().is_root() {
        println!("(not root: the kernel parts are skipped)");
        return;
    }
    kernel(&rs, &m, batches);
    cluster_kernel(cluster);
}

/// The model plus 100 ClusterNetworkPolicies: policy `i` applies to namespace `t{i % 20}`,
/// denies TCP 22 from the zone-a namespaces and passes egress to the zone-b ones. Every
/// namespace gets a `zone` label (a for even, b for odd).
fn with_cluster_policies(mut m: Model) -> Model {
    for (i, l) in m.namespaces.values_mut().enumerate() {
        l.insert("zone".into(), if i % 2 == 0 { "a" } else { "b" }.into());
    }
    for i in 0..100 {
        let mut p = policy(
            PolicyKind::Cluster,
            None,
            &format!("cnp{i}"),
            ADMIN_TIER,
            "projectcalico.org/orchestrator == 'k8s'",
        );
        p.order = Some(i as f64);
        p.namespaces = NamespaceScope::Matching(sel(&format!("team == 't{}'", i % NAMESPACES)));
        let peer = |zone: &str| EntityMatch {
            selector: Some(sel("projectcalico.org/orchestrator == 'k8s'")),
            namespaces: Some(NamespaceScope::Matching(sel(&format!("zone == '{zone}'")))),
            ..Default::default()
        };
        p.ingress = Some(vec![Rule {
            protocol: Some(Protocol::Tcp),
            source: peer("a"),
            destination: EntityMatch {
                ports: ports(&[(22, 22)]),
                ..Default::default()
            },
            ..rule(Action::Deny)
        }]);
        p.egress = Some(vec![Rule {
            destination: peer("b"),
            ..rule(Action::Pass)
        }]);
        add_policy(&mut m, p);
    }
    m
}

/// (c): the engine's ops for one namespace's zone flipping; returns what the kernel part needs.
fn cluster_case(m: &Model) -> (compile::Ruleset, Vec<Ops>) {
    let m = with_cluster_policies(m.clone());
    let mut engine = PolicyEngine::with_model(NODE, m.clone());
    let rs = engine.full().clone();
    let mut times = Vec::new();
    let mut batches = Vec::new();
    for i in 0..40 {
        let mut labels = m.namespaces["ns5"].clone();
        labels.insert("zone".into(), if i % 2 == 0 { "a" } else { "b" }.into());
        let t = Instant::now();
        let ops = engine.handle(Change::NamespaceUpsert {
            name: "ns5".into(),
            labels,
        });
        times.push(t.elapsed());
        batches.push(ops);
    }
    println!(
        "(c) 100 ClusterNetworkPolicies + {} NetworkPolicies: one namespace's label change → ops: {} median ({} ops)",
        m.policies.len() - 100,
        ms(median(times)),
        batches[0].len()
    );
    (rs, batches)
}

fn cluster_kernel((rs, batches): (compile::Ruleset, Vec<Ops>)) {
    let ns = TestNetns::new("polbenchc");
    let handle = Netns::open(ns.path()).unwrap();
    handle
        .run(|| nft::apply_document(&rs.to_nft_json()))
        .unwrap()
        .unwrap();
    let mut sock = handle.run(ElementSocket::open).unwrap().unwrap();
    let mut table = rs.clone();
    let mut times = Vec::new();
    for ops in &batches {
        table.apply(ops).unwrap();
        let keys = ops
            .element_keys(&table.sets)
            .expect("a namespace label change read only by peers is element-only");
        let changes: Vec<ElementChange> = keys
            .iter()
            .map(|k| ElementChange {
                add: k.add,
                set: k.set.clone(),
                keys: k.keys.clone(),
            })
            .collect();
        let t = Instant::now();
        sock.apply(NFPROTO_INET, TABLE, &changes).unwrap();
        times.push(t.elapsed());
    }
    assert!(
        !compile::drift::differs(
            handle
                .run(|| nft::list_table_numeric("inet", TABLE))
                .unwrap()
                .unwrap()
                .as_ref(),
            &table
        ),
        "the kernel holds what the batches say"
    );
    println!(
        "(c) the namespace label change applied over netlink (the agent's path): {} median (plus the ops above: target ≤ 10 ms)",
        ms(median(times))
    );
}

type Batch<'a> = (&'a str, Ops, Option<Vec<SetKeys>>);

fn kernel(rs: &compile::Ruleset, m: &Model, batches: Vec<Batch>) {
    let ns = TestNetns::new("polbench");
    let handle = Netns::open(ns.path()).unwrap();
    // Timed inside the namespace's thread: the agent runs in its node's namespace, so the
    // thread that enters it is not part of its path.
    let apply = |doc: &serde_json::Value| {
        handle
            .run(|| {
                let t = Instant::now();
                nft::apply_document(doc).unwrap();
                t.elapsed()
            })
            .unwrap()
    };
    // (b) ours: the whole table from scratch.
    let full = rs.to_nft_json();
    let ours = apply(&full);
    assert!(!compile::drift::differs(
        handle
            .run(|| nft::list_table_numeric("inet", TABLE))
            .unwrap()
            .unwrap()
            .as_ref(),
        rs
    ));

    if std::env::var_os("POL_BENCH_DUMP").is_some() {
        std::fs::write("/tmp/pol_full.json", full.to_string()).unwrap();
        std::fs::write(
            "/tmp/pol_batch.json",
            batches[0].1.to_nft_json().to_string(),
        )
        .unwrap();
    }
    // (a) the label changes against the loaded table.
    let empty = serde_json::json!({"nftables": []});
    let idle: Vec<Duration> = (0..10).map(|_| apply(&empty)).collect();
    // The agent keeps one socket, opened in its namespace.
    let mut sock = handle.run(ElementSocket::open).unwrap().unwrap();
    for what in ["local", "remote"] {
        let mine: Vec<&Batch> = batches.iter().filter(|(w, ..)| *w == what).collect();
        let times: Vec<Duration> = mine[..10]
            .iter()
            .map(|(_, ops, _)| apply(&ops.to_nft_json()))
            .collect();
        println!(
            "    {what} label change applied by nft: {} median",
            ms(median(times))
        );
        let fast: Vec<Duration> = mine[10..]
            .iter()
            .map(|(_, _, keys)| {
                let keys = keys.as_ref().expect("a label change is element-only");
                let changes: Vec<ElementChange> = keys
                    .iter()
                    .map(|k| ElementChange {
                        add: k.add,
                        set: k.set.clone(),
                        keys: k.keys.clone(),
                    })
                    .collect();
                let t = Instant::now();
                sock.apply(NFPROTO_INET, TABLE, &changes).unwrap();
                t.elapsed()
            })
            .collect();
        println!(
            "    {what} label change applied over netlink (the agent's path): {} median (plus the ops above: target ≤ 10 ms; Calico nftables ~17 ms)",
            ms(median(fast))
        );
    }
    assert!(
        !compile::drift::differs(
            handle
                .run(|| nft::list_table_numeric("inet", TABLE))
                .unwrap()
                .unwrap()
                .as_ref(),
            &{
                let mut want = rs.clone();
                for (_, ops, _) in &batches {
                    want.apply(ops).unwrap();
                }
                want
            }
        ),
        "the kernel holds what the batches say"
    );
    println!(
        "    nft with an empty batch against this table: {} median (process start + cache fetch)",
        ms(median(idle))
    );
    let small = TestNetns::new("polbenchs");
    let small_handle = Netns::open(small.path()).unwrap();
    let skeleton = PolicyEngine::new(NODE).full().to_nft_json();
    small_handle
        .run(|| nft::apply_document(&skeleton))
        .unwrap()
        .unwrap();
    let idle_small: Vec<Duration> = (0..10)
        .map(|_| {
            let t = Instant::now();
            small_handle
                .run(|| nft::apply_document(&empty))
                .unwrap()
                .unwrap();
            t.elapsed()
        })
        .collect();
    println!(
        "    nft with an empty batch against an empty table: {} median",
        ms(median(idle_small))
    );

    // (b) the reference: the same rules, linear, as text.
    let text = linear_text(m);
    let reference = TestNetns::new("polbenchl");
    let path = std::env::temp_dir().join(format!("trellis-linear-{}.nft", std::process::id()));
    std::fs::write(&path, &text).unwrap();
    let t = Instant::now();
    let out = reference.exec(&["nft", "-f", path.to_str().unwrap()]);
    let linear = t.elapsed();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "(b) full program: ours {} vs nft -f of the same {} rules written linearly {}: ratio {:.2} (target ≤ 0.5)",
        ms(ours),
        text.lines().filter(|l| l.contains("counter")).count(),
        ms(linear),
        ours.as_secs_f64() / linear.as_secs_f64()
    );
}

/// The model's rules as one linear chain: per local pod and direction, each applying policy's
/// rules with `iifname`/`oifname` and every selector spelled out as an inline address set.
fn linear_text(m: &Model) -> String {
    let mut out = String::from("table inet linear {\n chain forward {\n  type filter hook forward priority filter; policy accept;\n  ct state established,related accept\n");
    let all: Vec<(&Endpoint, Labels)> = m
        .endpoints
        .values()
        .map(|e| (e, e.effective_labels(&m.profiles)))
        .collect();
    for (ep, labels) in all.iter().filter(|(e, _)| e.node == NODE) {
        let ifc = ep.interface.as_deref().unwrap();
        for p in m
            .policies
            .values()
            .filter(|p| m.policy_applies(p, ep, labels))
        {
            for (dir, rules) in [("oifname", &p.ingress), ("iifname", &p.egress)] {
                for r in rules.iter().flatten() {
                    let mut line = format!("  {dir} \"{ifc}\"");
                    for (side, e) in [("saddr", &r.source), ("daddr", &r.destination)] {
                        if !e.nets.is_empty() {
                            let n: Vec<String> = e.nets.iter().map(|n| n.to_string()).collect();
                            let _ = write!(line, " ip {side} {{ {} }}", n.join(", "));
                        }
                        if let Some(s) = e.selection(&p.rule_scope()) {
                            let addrs: Vec<String> = all
                                .iter()
                                .filter(|(x, l)| s.matches_endpoint(m, x, l))
                                .flat_map(|(x, _)| x.addresses.iter().map(|a| a.to_string()))
                                .collect();
                            let _ = write!(line, " ip {side} {{ {} }}", addrs.join(", "));
                        }
                    }
                    let proto = match r.protocol {
                        Some(Protocol::Udp) => "udp",
                        _ => "tcp",
                    };
                    for p in &r.destination.ports {
                        if let PortMatch::Range { first, .. } = p {
                            let _ = write!(line, " {proto} dport {first}");
                        }
                    }
                    let verdict = if r.action == Action::Deny {
                        "drop"
                    } else {
                        "accept"
                    };
                    let _ = writeln!(line, " counter {verdict}");
                    out.push_str(&line);
                }
            }
        }
    }
    out.push_str(" }\n}\n");
    out
}
