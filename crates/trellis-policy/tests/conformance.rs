//! Every conformance case against the evaluator (pure, no kernel): Kubernetes' e2e cases,
//! the Calico-model cases and sig-network's ClusterNetworkPolicy cases (`conformance/*.yaml`).
//! Each step's world — namespaces, pods as WorkloadEndpoints with the model's named ports, the
//! documents in force — goes through `translate`, and every probe's truth table is computed
//! with `eval::evaluate` for every ordered pair of the suite's pods and compared with the
//! expected one. Skipped cases (SCTP, which this kernel lacks) are checked here too: only the
//! lab's packet probe skips them.

use std::net::IpAddr;

use serde_json::{json, Value};
use trellis_policy::conformance::{
    parse, Addresses, Cell, ConformanceModel, PodRef, Probe, ProbeProtocol, Suite, TruthTable,
    World,
};
use trellis_policy::eval::{evaluate, Flow, Peer};
use trellis_policy::model::{IcmpMatch, Protocol};

fn suite(file: &str) -> Suite {
    let path = format!("{}/conformance/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Stand-in pod addresses: 10.8.<namespace index>.<pod index + 1>, two nodes.
fn addresses(m: &ConformanceModel) -> Addresses {
    let mut out = Addresses::new();
    for (i, ns) in m.namespaces.iter().enumerate() {
        for (j, p) in m.pods.iter().enumerate() {
            let a: IpAddr = format!("10.8.{i}.{}", j + 1).parse().unwrap();
            out.insert(PodRef::new(&ns.name, &p.name), a);
        }
    }
    out
}

/// The world as stored objects: Namespaces, one WorkloadEndpoint per pod, the documents.
fn objects(m: &ConformanceModel, w: &World, addrs: &Addresses) -> Vec<Value> {
    let mut docs: Vec<Value> = w
        .namespaces
        .iter()
        .map(|(name, labels)| {
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": name, "labels": labels}})
        })
        .collect();
    let ports: Vec<Value> = m
        .named_ports()
        .into_iter()
        .map(|(name, proto, port)| json!({"name": name, "protocol": proto.as_str().to_uppercase(), "port": port}))
        .collect();
    for (i, (pod, state)) in w.pods.iter().enumerate() {
        let mut spec = json!({
            "node": if i % 2 == 0 { "n1" } else { "n2" },
            "pod": pod.name,
            "interfaceName": format!("trl{i}"),
            "ipNetworks": [format!("{}/32", addrs[pod])],
            "ports": ports,
            "profiles": state.profiles,
        });
        if let Some(sa) = &state.service_account {
            spec["serviceAccountName"] = json!(sa);
        }
        docs.push(
            json!({"apiVersion": "trellis.dev/v1", "kind": "WorkloadEndpoint",
            "metadata": {"name": format!("{}-{}", pod.namespace, pod.name),
                         "namespace": pod.namespace, "labels": state.labels},
            "spec": spec}),
        );
    }
    docs.extend(w.documents().cloned());
    docs
}

fn observed(model: &trellis_policy::model::Model, pods: &[PodRef], p: &Probe) -> TruthTable {
    let names: Vec<String> = pods.iter().map(PodRef::to_string).collect();
    let mut t = TruthTable::new(names.clone(), names, Cell::Skip);
    let ep = |p: &PodRef| Peer::Endpoint {
        namespace: p.namespace.clone(),
        name: format!("{}-{}", p.namespace, p.name),
    };
    for from in pods {
        for to in pods.iter().filter(|to| *to != from) {
            let (protocol, icmp) = match p.protocol {
                ProbeProtocol::Tcp => (Protocol::Tcp, None),
                ProbeProtocol::Udp => (Protocol::Udp, None),
                ProbeProtocol::Sctp => (Protocol::Sctp, None),
                ProbeProtocol::Icmp => (
                    Protocol::Icmp,
                    Some(IcmpMatch {
                        icmp_type: 8,
                        code: Some(0),
                    }),
                ),
            };
            let flow = Flow {
                source: ep(from),
                destination: ep(to),
                protocol,
                port: p.port,
                source_port: None,
                icmp,
            };
            let allowed = evaluate(model, &flow).allowed;
            t.set(&from.to_string(), &to.to_string(), Cell::from_bool(allowed));
        }
    }
    t
}

/// Replays every case of a suite against the evaluator; returns the failures.
fn check(file: &str) -> (usize, Vec<String>) {
    let s = suite(file);
    let pods = s.model.pods();
    let addrs = addresses(&s.model);
    let mut failures = Vec::new();
    let mut probes = 0;
    for case in &s.cases {
        let mut w = World::new(&s.model);
        for (i, step) in case.steps.iter().enumerate() {
            w.step(step, &addrs).unwrap();
            let docs: Vec<trellis_resources::Resource> = objects(&s.model, &w, &addrs)
                .iter()
                .map(|d| {
                    trellis_resources::Resource::from_value(d)
                        .unwrap_or_else(|e| panic!("{}: step {}: {e}: {d}", case.name, i + 1))
                })
                .collect();
            let t = trellis_policy::translate::translate(&docs);
            assert!(t.skipped.is_empty(), "{}: {:?}", case.name, t.skipped);
            for p in &step.probes {
                probes += 1;
                let want = p.expect.table(&pods);
                let got = observed(&t.model, &pods, p);
                for d in want.differences(&got) {
                    failures.push(format!(
                        "{}: step {} {} {:?}: {d}",
                        case.name,
                        i + 1,
                        p.protocol,
                        p.port
                    ));
                }
            }
        }
    }
    (probes, failures)
}

#[test]
fn cluster_network_policy_cases_hold_in_the_evaluator() {
    let (probes, failures) = check("cluster.yaml");
    assert!(probes > 100, "only {probes} probes");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn kubernetes_cases_hold_in_the_evaluator() {
    let (_, failures) = check("kubernetes.yaml");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn calico_cases_hold_in_the_evaluator() {
    let (_, failures) = check("calico.yaml");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
