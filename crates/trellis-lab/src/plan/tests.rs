use super::*;
use crate::topology::decode;

fn lab(file: &str) -> Lab {
    let path = format!("{}/../../examples/lab/{file}", env!("CARGO_MANIFEST_DIR"));
    crate::validate(&decode(&std::fs::read_to_string(path).unwrap()).unwrap()).unwrap()
}

/// The plan for `examples/lab/vxlan.yaml`, step by step, against
/// `golden/vxlan.plan.yaml` (`TRELLIS_UPDATE_GOLDEN=1` rewrites it).
#[test]
fn vxlan_plan_is_golden() {
    let steps = plan(&lab("vxlan.yaml"), &Observed::default()).unwrap();
    let got = serde_norway::to_string(&steps).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/vxlan.plan.yaml");
    if std::env::var_os("TRELLIS_UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &got).unwrap();
    }
    let want = std::fs::read_to_string(path).unwrap();
    assert!(
        got == want,
        "the plan changed; diff golden/vxlan.plan.yaml:\n{got}"
    );
}

#[test]
fn every_made_namespace_is_the_labs_and_every_port_unique() {
    for file in ["bgp-tor.yaml", "cross-subnet.yaml", "nat.yaml"] {
        let steps = plan(&lab(file), &Observed::default()).unwrap();
        let mut ports = std::collections::BTreeSet::new();
        for s in &steps {
            match s {
                Step::Namespace { ns, .. } => assert!(ns.starts_with("tl-"), "{ns}"),
                Step::Link { port, .. } => assert!(ports.insert(port.clone()), "{port} twice"),
                _ => {}
            }
        }
    }
}

#[test]
fn nothing_is_built_over_what_exists() {
    let l = lab("vxlan.yaml");
    let refused = |o: Observed| plan(&l, &o).unwrap_err().to_string();
    assert_eq!(
        refused(Observed {
            labs: vec!["vxlan".into()],
            ..Default::default()
        }),
        "lab vxlan: lab vxlan already exists (trellis lab down vxlan)"
    );
    assert_eq!(
        refused(Observed {
            namespaces: vec!["tl-vxlan-node1".into()],
            ..Default::default()
        }),
        "lab vxlan: namespace tl-vxlan-node1 already exists (trellis lab down vxlan)"
    );
    assert!(refused(Observed {
        labs: vec!["vxlan-2".into()],
        ..Default::default()
    })
    .contains("trellis lab down vxlan-2"));
}

/// A pod with Kubernetes metadata gets its endpoint written after ADD and a server on its
/// ports, waited for after all pods; the policies come last, after every pod serves.
#[test]
fn pods_get_endpoints_and_servers_and_policies_come_last() {
    let yaml = "name: pl\npools: [{name: p, cidr: 10.0.0.0/16}]\nsubnets: [{name: s, cidr: 192.168.0.0/24}]\nnodes: [{name: n, subnet: s}]\nnamespaces: [{name: x, labels: {ns: x}}]\npods: [{name: x-a, podName: a, namespace: x, node: n, labels: {pod: a}, ports: [{name: web, port: 80}, {port: 53, protocol: UDP}]}, {name: x-b, podName: b, namespace: x, node: n}]\npolicies: \"apiVersion: trellis.dev/v1\\nkind: BGPPeer\\nmetadata: {name: q}\\nspec: {peerIP: 192.168.0.50, asNumber: 65001}\\n\"\n";
    let lab = crate::validate(&decode(yaml).unwrap()).unwrap();
    let steps = plan(&lab, &Observed::default()).unwrap();
    let ops: Vec<String> = steps
        .iter()
        .skip_while(|s| !matches!(s, Step::Plugin { .. }))
        .map(|s| format!("{} {}", s.member(), s.describe()))
        .collect();
    assert_eq!(
        ops,
        [
            "lab link the CNI plugin as /run/trellis/lab/pl/trellis-cni",
            "x-a create namespace tl-pl-x-a",
            "x-a add the pod on n through CNI",
            "x-a write labels, ports and service account on its endpoint",
            "x-a start server",
            "x-b create namespace tl-pl-x-b",
            "x-b add the pod on n through CNI",
            "x-a wait for its server",
            "lab apply the policies",
        ]
    );
    let serve = steps
        .iter()
        .find_map(|s| match s {
            Step::Spawn { argv, what, .. } if what == "server" => Some(argv.join(" ")),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        serve,
        "trellis lab serve --name x/a --tcp 80 --udp 53 --ready /run/trellis/lab/pl/x-a.server.ready"
    );
    assert!(steps
        .iter()
        .any(|s| matches!(s, Step::Pod { pod, namespace, .. } if pod == "b" && namespace == "x")));
}

/// On the Kubernetes path: the cluster's objects go to the API server before the agents start,
/// the kube-controller runs on the host with the lab's kubeconfig and a Lease of its own, the
/// agents run with `--kubernetes`, each pod is created in the API before its ADD and nothing
/// is written on its endpoint by the lab; Kubernetes-kind policies go to the API server, the
/// others through `trellis apply`.
#[test]
fn the_kubernetes_path_writes_api_objects_and_runs_the_controller() {
    let policies = "apiVersion: networking.k8s.io/v1\\nkind: NetworkPolicy\\nmetadata: {name: deny, namespace: x}\\nspec: {podSelector: {}}\\n---\\napiVersion: trellis.dev/v1\\nkind: BGPPeer\\nmetadata: {name: q}\\nspec: {peerIP: 192.168.0.50, asNumber: 65001}\\n";
    let yaml = format!("name: pk\nkubernetes: {{kubeconfig: /etc/k.conf}}\npools: [{{name: p, cidr: 10.0.0.0/16}}]\nsubnets: [{{name: s, cidr: 192.168.0.0/24}}]\nnodes: [{{name: n, subnet: s, labels: {{zone: a}}}}]\nnamespaces: [{{name: x, labels: {{ns: x}}}}]\npods: [{{name: x-a, podName: a, namespace: x, node: n, labels: {{pod: a}}, serviceAccount: alpha, ports: [{{name: web, port: 80}}]}}]\npolicies: \"{policies}\"\n");
    let lab = crate::validate(&decode(&yaml).unwrap()).unwrap();
    let steps = plan(&lab, &Observed::default()).unwrap();
    let ops: Vec<String> = steps
        .iter()
        .filter(|s| {
            !matches!(
                s,
                Step::Namespace { .. } | Step::Link { .. } | Step::Bridge { .. }
            )
        })
        .map(|s| format!("{} {}", s.member(), s.describe()))
        .collect();
    assert_eq!(
        ops,
        [
            "lab use datastore sqlite:/run/trellis/lab/pk/trellis.db",
            "lab apply the pools and resources",
            "lab write Namespace x, Node n, ServiceAccount x/alpha to the Kubernetes API",
            "kube-controller start kube-controller",
            "n start agent",
            "n wait for the agent",
            "lab link the CNI plugin as /run/trellis/lab/pk/trellis-cni",
            "x-a write Pod x/a to the Kubernetes API",
            "x-a add the pod on n through CNI",
            "x-a start server",
            "x-a wait for its server",
            "lab write NetworkPolicy x/deny to the Kubernetes API",
            "lab apply the policies",
        ]
    );
    let spawned = |what: &str| {
        steps
            .iter()
            .find_map(|s| match s {
                Step::Spawn {
                    argv, what: w, ns, ..
                } if w == what => Some((argv.join(" "), ns.clone())),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(
        spawned("kube-controller"),
        ("trellis --datastore sqlite:/run/trellis/lab/pk/trellis.db kube-controller --kubeconfig /etc/k.conf --lease-name trellis-lab-pk --identity lab-pk".to_string(), None)
    );
    assert!(spawned("agent").0.ends_with("--label zone=a --kubernetes"));
    let Some(Step::Apply { yaml }) = steps.iter().find(|s| matches!(s, Step::Apply { .. })) else {
        panic!()
    };
    assert!(!yaml.contains("kind: Namespace"), "{yaml}");
    let pod = steps
        .iter()
        .find_map(|s| match s {
            Step::Kube {
                member, objects, ..
            } if member == "x-a" => Some(objects[0].clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        pod,
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
            "spec": {"nodeName": "n", "serviceAccountName": "alpha",
                     "containers": [{"name": "server", "image": "trellis-lab-server",
                                     "ports": [{"name": "web", "containerPort": 80, "protocol": "TCP"}]}],
                     "tolerations": [{"operator": "Exists"}]}})
    );
}

#[test]
fn the_kubernetes_path_needs_an_absolute_kubeconfig_and_the_embedded_store() {
    let base = "name: pk\npools: [{name: p, cidr: 10.0.0.0/16}]\nsubnets: [{name: s, cidr: 192.168.0.0/24}]\nnodes: [{name: n, subnet: s}]\n";
    let err = |extra: &str| {
        crate::validate(&decode(&format!("{base}{extra}")).unwrap())
            .unwrap_err()
            .to_string()
    };
    assert!(err("kubernetes: {kubeconfig: k.conf}\n")
        .starts_with("kubernetes.kubeconfig \"k.conf\": must be an absolute path"));
    assert!(err("datastore: etcd\nkubernetes: {kubeconfig: /k.conf}\n")
        .starts_with("kubernetes: needs the embedded datastore"));
}
