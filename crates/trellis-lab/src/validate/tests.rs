use super::*;
use crate::topology::decode;

fn err(yaml: &str) -> String {
    validate(&decode(yaml).unwrap()).unwrap_err().to_string()
}

const POOL: &str = "pools: [{name: p, cidr: 10.0.0.0/16}]\n";
const SUBNET: &str = "subnets: [{name: s, cidr: 192.168.0.0/24}]\n";

/// Whether `trellis_resources` knows the policy kinds (issue 10's resources work adds them).
/// Until it does, an example's `policies:` cannot validate, and the examples are checked
/// without them; once it does, every example is checked whole.
pub fn policy_kinds_known() -> bool {
    trellis_resources::parse_documents(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}}\n",
    )
    .is_ok()
}

#[test]
fn every_example_is_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/lab");
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let mut t = decode(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if t.policies.is_some() && !policy_kinds_known() {
            eprintln!(
                "{}: checked without its policies (no NetworkPolicy kind yet)",
                path.display()
            );
            t.policies = None;
        }
        if let Err(e) = validate(&t) {
            panic!("{}: {e}", path.display());
        }
    }
}

#[test]
fn errors_name_member_and_field() {
    let cases = [
        (
            format!("name: x\n{POOL}{SUBNET}nodes: [{{name: n, subnet: s}}]\npods: [{{name: a, node: n}}, {{name: b, node: n}}, {{name: c, node: n}}, {{name: router, node: n}}]\n"),
            "pods[3].name \"router\": reserved (the lab itself uses fabric, router, control, etcd)",
        ),
        (
            format!("name: x\n{POOL}subnets: [{{name: s, cidr: 192.168.0.1/24}}]\nnodes: []\n"),
            "subnets[0].cidr 192.168.0.1/24: has host bits set; the network is 192.168.0.0/24",
        ),
        (
            format!("name: x\n{POOL}subnets: [{{name: s, cidr: 192.168.0.0/24}}, {{name: s, cidr: 192.168.1.0/24}}]\nnodes: []\n"),
            "subnets[1].name \"s\": already used by subnets[0]",
        ),
        (
            format!("name: x\n{POOL}subnets: [{{name: s, cidr: 192.168.0.0/26}}]\nnodes: []\nexternal: [{{name: out, subnet: s}}]\n"),
            "external[0] \"out\": subnet s (192.168.0.0/26) has no address .100 for it",
        ),
        (
            format!("name: x\npools: [{{name: p, cidr: 10.0.0.0/16, encapsulation: GRE}}]\n{SUBNET}nodes: []\n"),
            "pools[0].encapsulation \"GRE\": must be None, VXLAN",
        ),
        (
            format!("name: x\npools: [{{name: p, cidr: 10.0.0.0/16, blockSize: 40}}]\n{SUBNET}nodes: []\n"),
            "pools[0].blockSize: 40 is outside 20–32",
        ),
        (
            format!("name: x\npools: [{{name: \"a\\nb\", cidr: 10.0.0.0/16}}]\n{SUBNET}nodes: []\n"),
            "pools[0].name: \"a\\nb\" may hold only",
        ),
        (
            format!("name: x\npools: [{{name: p, cidr: 192.168.0.0/25}}]\n{SUBNET}nodes: []\n"),
            "pools[0].cidr 192.168.0.0/25: overlaps subnets[0] (s, 192.168.0.0/24)",
        ),
        (
            format!("name: x\npools: [{{name: p, cidr: 10.0.0.0/30, blockSize: 30}}]\n{SUBNET}nodes: [{{name: n, subnet: s}}]\npods: [{{name: a, node: n}}, {{name: b, node: n}}, {{name: c, node: n}}, {{name: d, node: n}}]\n"),
            "pools: 5 pod and VXLAN tunnel addresses are needed, but the pools the nodes use hold 4",
        ),
        (
            format!("name: x\npools: [{{name: p, cidr: 10.0.0.0/16, nodeSelector: \"rack == 'a'\"}}]\n{SUBNET}nodes: [{{name: n, subnet: s}}]\npods: [{{name: a, node: n}}]\n"),
            "nodes[0] \"n\": has pods, but no pool's nodeSelector selects it",
        ),
        (
            format!("name: x\n{POOL}{SUBNET}nodes: [{{name: n, subnet: s}}]\nexternal: [{{name: e, subnet: s, via: p1}}]\npods: [{{name: p1, node: n}}]\n"),
            "external[0].via \"p1\": must be a node or another external host on subnet s",
        ),
        (
            format!("name: x\n{POOL}{SUBNET}nodes: [{{name: n, subnet: s}}]\npods: [{{name: a, node: n, namespace: \"x;K8S_POD_NAME=y\"}}]\n"),
            "pods[0].namespace \"x;K8S_POD_NAME=y\": may hold only",
        ),
        (
            format!("name: x\n{POOL}{SUBNET}nodes: [{{name: n, subnet: s, labels: {{\"a=b\": c}}}}]\n"),
            "nodes[0].labels \"a=b\": not a label key",
        ),
        (
            format!("name: x\n{POOL}{SUBNET}nodes: [{{name: n, subnet: s}}]\npods: [{{name: a, node: n}}]\nexpect: [{{from: a, to: n}}]\n"),
            "expect[0].to \"n\": not a pod or external host other than from",
        ),
        (
            format!("name: x\n{POOL}{SUBNET}nodes: [{{name: n, subnet: s}}]\nresources: \"apiVersion: trellis.dev/v1\\nkind: BGPPeer\\nmetadata: {{name: q}}\\nspec: {{peerIP: nope, asNumber: 1}}\\n\"\n"),
            "resources: document 1 (BGPPeer/q): spec.peerIP:",
        ),
    ];
    for (yaml, want) in cases {
        let e = err(&yaml);
        assert!(e.starts_with(want), "{yaml}\n→ {e}\n(want {want})");
    }
}

#[test]
fn limits_have_a_clear_error() {
    let pods: Vec<String> = (0..=MAX_PODS)
        .map(|i| format!("{{name: p{i}, node: n}}"))
        .collect();
    let yaml = format!(
        "name: x\n{POOL}{SUBNET}nodes: [{{name: n, subnet: s}}]\npods: [{}]\n",
        pods.join(", ")
    );
    assert_eq!(err(&yaml), "pods: 251 entries; a lab has at most 250");
    let long = "n".repeat(MAX_NAME + 1);
    assert!(err(&format!(
        "name: x\n{POOL}{SUBNET}nodes: [{{name: {long}, subnet: s}}]\n"
    ))
    .starts_with(&format!(
        "nodes[0].name \"{long}\": must be 1-20 characters"
    )));
}

#[test]
fn subnet_room_counts_nodes_and_externals_separately() {
    // A /28: nodes at .10-.14 (below the broadcast .15); no room for externals.
    let nodes: Vec<String> = (0..6)
        .map(|i| format!("{{name: n{i}, subnet: s}}"))
        .collect();
    let yaml = |n: usize| {
        format!(
            "name: x\n{POOL}subnets: [{{name: s, cidr: 192.168.0.0/28}}]\nnodes: [{}]\n",
            nodes[..n].join(", ")
        )
    };
    assert!(validate(&decode(&yaml(5)).unwrap()).is_ok());
    assert!(
        err(&yaml(6)).starts_with("nodes[5] \"n5\": subnet s (192.168.0.0/28) has no address .15")
    );
}

/// Namespaces, pods' Kubernetes names, ports, service accounts and policies: each mistake is
/// refused naming the member and field.
#[test]
fn workload_errors_name_member_and_field() {
    let base = format!("name: x\n{POOL}{SUBNET}nodes: [{{name: n, subnet: s}}]\n");
    let peer = "apiVersion: trellis.dev/v1\\nkind: BGPPeer\\nmetadata: {name: q}\\nspec: {peerIP: 192.168.0.50, asNumber: 65001}\\n";
    let cases = [
        (
            "namespaces: [{name: x}, {name: x}]\n".to_string(),
            "namespaces[1].name \"x\": already listed as namespaces[0]",
        ),
        (
            "namespaces: [{name: X}]\n".to_string(),
            "namespaces[0].name \"X\": may hold only",
        ),
        (
            "namespaces: [{name: x, labels: {\"a b\": c}}]\n".to_string(),
            "namespaces[0].labels \"a b\": not a label key",
        ),
        (
            "namespaces: [{name: x}]\npods: [{name: a, node: n, namespace: y}]\n".to_string(),
            "pods[0].namespace \"y\": not one of the topology's namespaces",
        ),
        (
            "pods: [{name: x-a, podName: a, node: n}, {name: y-a, podName: a, node: n}]\n"
                .to_string(),
            "pods[1].podName \"a\": pods[0] has that name in namespace default already",
        ),
        (
            "pods: [{name: x-a, podName: A, node: n}]\n".to_string(),
            "pods[0].podName \"A\": may hold only",
        ),
        (
            "pods: [{name: a, node: n, ports: [{port: 0}]}]\n".to_string(),
            "pods[0].ports[0].port 0: ports are 1-65535",
        ),
        (
            "pods: [{name: a, node: n, ports: [{name: Serve_80, port: 80}]}]\n".to_string(),
            "pods[0].ports[0].name \"Serve_80\": must be 1-15",
        ),
        (
            "pods: [{name: a, node: n, ports: [{name: \"80\", port: 80}]}]\n".to_string(),
            "pods[0].ports[0].name \"80\": must be 1-15",
        ),
        (
            "pods: [{name: a, node: n, ports: [{port: 80}, {port: 80, protocol: TCP}]}]\n"
                .to_string(),
            "pods[0].ports[1].port 80: TCP is declared twice",
        ),
        (
            "pods: [{name: a, node: n, ports: [{name: web, port: 80}, {name: web, port: 81}]}]\n"
                .to_string(),
            "pods[0].ports[1].name \"web\": declared twice",
        ),
        (
            "pods: [{name: a, node: n, serviceAccount: \"sa;x\"}]\n".to_string(),
            "pods[0].serviceAccount \"sa;x\": may hold only",
        ),
        (
            format!("policies: \"{}\"\n", peer.replace("192.168.0.50", "nope")),
            "policies: document 1 (BGPPeer/q): spec.peerIP:",
        ),
        (
            format!("resources: \"{peer}\"\npolicies: \"{peer}\"\n"),
            "policies document 1: BGPPeer/q is already made by the lab's resources",
        ),
    ];
    for (rest, want) in cases {
        let yaml = format!("{base}{rest}");
        let e = err(&yaml);
        assert!(e.starts_with(want), "{yaml}\n→ {e}\n(want {want})");
    }
    let sctp = decode(&format!(
        "{base}pods: [{{name: a, node: n, ports: [{{port: 80, protocol: SCTP}}]}}]\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        sctp.contains("pods[0].ports[0].protocol") && sctp.contains("unknown variant `SCTP`"),
        "{sctp}"
    );
    // Two pods of one name in different namespaces, ports of one number on both protocols.
    validate(&decode(&format!("{base}namespaces: [{{name: x}}, {{name: y}}]\npods: [{{name: x-a, podName: a, namespace: x, node: n, ports: [{{port: 80}}, {{port: 80, protocol: UDP}}]}}, {{name: y-a, podName: a, namespace: y, node: n, serviceAccount: sa.one}}]\npolicies: \"{peer}\"\n")).unwrap()).unwrap();
}
