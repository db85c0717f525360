//! The translations on objects as Kubernetes 1.33 prints them (tests/fixtures/).

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use trellis_kube::translate::{self, CONTROLLER, MANAGED_BY};
use trellis_resources::policy::RuleProtocol;
use trellis_resources::{parse_documents, Resource};

fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn a_namespace_keeps_its_labels_and_pool_annotation_and_is_marked_as_ours() {
    let r = translate::namespace(&fixture::<Namespace>("k8s-1.33-namespace.json")).unwrap();
    let Resource::Namespace(ns) = &r else {
        panic!("{r:?}")
    };
    assert_eq!(ns.metadata.name, "payments");
    assert_eq!(ns.metadata.labels["team"], "payments");
    assert_eq!(
        ns.metadata.labels["kubernetes.io/metadata.name"],
        "payments"
    );
    assert_eq!(
        ns.metadata.annotations[translate::IPV4_POOLS],
        "[\"default-ipv4-ippool\",\"10.250.0.0/16\"]"
    );
    assert_eq!(ns.metadata.annotations[MANAGED_BY], CONTROLLER);
    // Other annotations (kubectl's last-applied copy) are not Trellis's business.
    assert_eq!(ns.metadata.annotations.len(), 2);
    assert_eq!(
        ns.metadata.uid.as_deref(),
        Some("0f3a2e0c-6a83-4b3e-9b7d-2f5f0d8b1c11")
    );
    assert!(translate::owned(&r));
}

#[test]
fn a_service_account_keeps_its_labels() {
    let r = translate::service_account(&fixture::<ServiceAccount>("k8s-1.33-serviceaccount.json"))
        .unwrap();
    let Resource::ServiceAccount(sa) = &r else {
        panic!("{r:?}")
    };
    assert_eq!(sa.metadata.namespace.as_deref(), Some("payments"));
    assert_eq!(sa.metadata.labels["role"], "frontend");
    assert_eq!(r.key(), "/trellis/v1/serviceaccounts/payments/checkout");
}

#[test]
fn a_network_policy_is_stored_as_the_cli_stores_the_same_yaml() {
    let np: NetworkPolicy = fixture("k8s-1.33-networkpolicy.json");
    let r = translate::network_policy(&np).unwrap();
    // The same spec through `trellis apply`'s parser.
    let spec = serde_json::to_value(np.spec.unwrap()).unwrap();
    let doc = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "checkout-ingress", "namespace": "payments",
                     "uid": "1d4b0c9e-77aa-4f4c-8f63-0b2f5c9a6d10",
                     "annotations": {MANAGED_BY: CONTROLLER}},
        "spec": spec,
    });
    let cli = parse_documents(&doc.to_string()).unwrap().remove(0);
    assert_eq!(r, cli);
    let Resource::KubernetesNetworkPolicy(p) = &r else {
        panic!("{r:?}")
    };
    assert_eq!(p.spec.ingress[0].ports.len(), 2);
    assert_eq!(
        p.spec.ingress[0].from[1].ip_block.as_ref().unwrap().except,
        ["192.168.50.0/24"]
    );
    assert_eq!(
        r.key(),
        "/trellis/v1/kubernetesnetworkpolicies/payments/checkout-ingress"
    );
}

#[test]
fn a_pod_gives_labels_service_account_named_ports_and_ipam_annotations() {
    let p = translate::pod(&fixture::<Pod>("k8s-1.33-pod.json")).unwrap();
    assert_eq!(
        (p.namespace.as_str(), p.name.as_str()),
        ("payments", "checkout-6d8f9c7b5d-x2k9q")
    );
    assert_eq!(p.node.as_deref(), Some("node-2"));
    assert_eq!(p.labels["app"], "checkout");
    assert_eq!(p.service_account.as_deref(), Some("checkout"));
    let ports: Vec<(&str, RuleProtocol, u16)> = p
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.protocol, p.port))
        .collect();
    // The unnamed port 7000 is not recorded; the sidecar's (an init container) is.
    assert_eq!(
        ports,
        [
            ("http", RuleProtocol::Tcp, 8080),
            ("metrics", RuleProtocol::Tcp, 9090),
            ("dns-udp", RuleProtocol::Udp, 5353),
            ("envoy-out", RuleProtocol::Tcp, 15001)
        ]
    );
    assert_eq!(p.ipam.as_ref().unwrap().ip_addrs.len(), 2);
    assert_eq!(p.ipam.as_ref().unwrap().ipv4_pools, ["10.250.0.0/16"]);
}

fn err_of<T: std::fmt::Debug>(
    r: Result<T, translate::TranslateError>,
) -> translate::TranslateError {
    r.expect_err("must be refused")
}

#[test]
fn bad_objects_are_refused_naming_the_field() {
    let e = err_of(translate::namespace(&fixture(
        "bad-k8s-1.33-namespace-label.json",
    )));
    assert_eq!(
        (e.kind, e.object.as_str(), e.field.as_str()),
        ("Namespace", "payments", "metadata.labels")
    );
    // A bad pool annotation is named, but the namespace's labels still sync (policies select
    // its pods by them); the bad annotation is not stored.
    let bad_pools: Namespace = fixture("bad-k8s-1.33-namespace-ipv4pools.json");
    let [e] = translate::namespace_annotation_errors(&bad_pools)
        .try_into()
        .expect("one bad annotation");
    assert_eq!(
        e.field,
        "metadata.annotations.cni.projectcalico.org/ipv4pools"
    );
    assert!(e.reason.contains("host bits"), "{e}");
    let Resource::Namespace(ns) = translate::namespace(&bad_pools).unwrap() else {
        panic!("not a Namespace")
    };
    assert_eq!(ns.metadata.labels["team"], "payments");
    assert!(
        !ns.metadata.annotations.contains_key(translate::IPV4_POOLS),
        "{:?}",
        ns.metadata.annotations
    );
    let good: Namespace = fixture("k8s-1.33-namespace.json");
    assert!(translate::namespace_annotation_errors(&good).is_empty());
    let e = err_of(translate::pod(&fixture("bad-k8s-1.33-pod-port.json")));
    assert_eq!(e.field, "spec.containers[0].ports[1].containerPort");
    assert!(e.reason.contains("70000"), "{e}");
    let e = err_of(translate::pod(&fixture("bad-k8s-1.33-pod-port-name.json")));
    assert_eq!(e.field, "spec.containers[0].ports[0].name");
    assert_eq!(e.object, "payments/checkout-6d8f9c7b5d-x2k9q");
    let e = err_of(translate::network_policy(&fixture(
        "bad-k8s-1.33-networkpolicy-cidr.json",
    )));
    assert_eq!(e.kind, "NetworkPolicy");
    assert!(e.field.contains("ipBlock.cidr"), "{e}");
}

#[test]
fn a_node_gives_labels_pod_cidrs_and_addresses() {
    let n = translate::node(&fixture::<Node>("k8s-1.33-node.json")).unwrap();
    assert_eq!(n.name, "node-2");
    assert_eq!(n.labels["topology.kubernetes.io/zone"], "zone-b");
    let cidrs: Vec<String> = n.pod_cidrs.iter().map(|c| c.to_string()).collect();
    assert_eq!(cidrs, ["10.244.2.0/24", "fd00:10:244:2::/64"]);
    let addrs: Vec<String> = n
        .addresses
        .iter()
        .map(|(t, a)| format!("{t} {a}"))
        .collect();
    assert_eq!(
        addrs,
        ["InternalIP 192.168.50.11", "InternalIP fd00:50::11"]
    );
}

#[test]
fn a_bad_node_is_refused_naming_the_field() {
    let e = err_of(translate::node(&fixture("bad-k8s-1.33-node-podcidr.json")));
    assert_eq!((e.kind, e.field.as_str()), ("Node", "spec.podCIDRs[1]"));
    assert!(e.reason.contains("host bits"), "{e}");
    let e = err_of(translate::node(&fixture("bad-k8s-1.33-node-address.json")));
    assert_eq!(e.field, "status.addresses[0].address");
}

#[test]
fn a_node_with_dns_addresses_still_gives_its_labels() {
    // The AWS cloud provider (EKS, kOps) lists InternalDNS and ExternalDNS names among a
    // Node's addresses; they are names, not addresses, like Hostname.
    let n = translate::node(&fixture::<Node>("k8s-1.33-node-aws.json")).unwrap();
    assert_eq!(n.labels["topology.kubernetes.io/zone"], "zone-b");
    let addrs: Vec<String> = n
        .addresses
        .iter()
        .map(|(t, a)| format!("{t} {a}"))
        .collect();
    assert_eq!(
        addrs,
        ["InternalIP 192.168.50.11", "ExternalIP 203.0.113.11"]
    );
}

#[test]
fn a_bad_ipam_annotation_does_not_keep_a_pods_labels_from_its_endpoints() {
    // The API server does not check Calico's annotations, and nothing uses them yet: a pod
    // left unlabelled is selected by no NetworkPolicy, so a policy isolating it would not.
    let p = translate::pod(&fixture("bad-k8s-1.33-pod-ipaddrs.json"))
        .expect("labels, service account and ports still translate");
    assert!(!p.labels.is_empty());
    let e = p.ipam.expect_err("the annotation is refused");
    assert_eq!(
        e.field,
        "metadata.annotations.cni.projectcalico.org/ipAddrs"
    );
    assert!(e.reason.contains("one address per IP family"), "{e}");
}

/// The pod fixture with `annotations` instead of its Calico ones.
fn pod_annotated(annotations: &[(&str, &str)]) -> Pod {
    let mut p: Pod = fixture("k8s-1.33-pod.json");
    let a = p.metadata.annotations.get_or_insert_with(Default::default);
    a.retain(|k, _| !k.starts_with("cni.projectcalico.org/"));
    for (k, v) in annotations {
        a.insert(k.to_string(), v.to_string());
    }
    p
}

#[test]
fn no_ipam_and_floating_annotations_are_carried_and_checked() {
    let p = translate::pod(&pod_annotated(&[
        (translate::IP_ADDRS_NO_IPAM, "[\"192.0.2.7\"]"),
        (translate::FLOATING_IPS, "[\"203.0.113.9\"]"),
    ]))
    .unwrap();
    let rec = p.record();
    assert_eq!(rec.spec.ip_addrs_no_ipam[0].to_string(), "192.0.2.7");
    assert_eq!(rec.spec.floating_ips[0].to_string(), "203.0.113.9");
    assert_eq!(rec.spec.ipam_error, None);

    // Both ipAddrs and ipAddrsNoIpam (as Calico: refused), and a bad floating address: the
    // record keeps the labels and carries the reason, which the ADD then fails with.
    for (annotations, field) in [
        (
            vec![
                (translate::IP_ADDRS, "[\"10.0.0.1\"]"),
                (translate::IP_ADDRS_NO_IPAM, "[\"10.0.0.2\"]"),
            ],
            translate::IP_ADDRS_NO_IPAM,
        ),
        (
            vec![(translate::FLOATING_IPS, "[\"x\"]")],
            translate::FLOATING_IPS,
        ),
    ] {
        let p = translate::pod(&pod_annotated(&annotations)).unwrap();
        let e = p.ipam.clone().expect_err(field);
        assert_eq!(e.field, format!("metadata.annotations.{field}"));
        let rec = p.record();
        assert!(!rec.metadata.labels.is_empty());
        let reason = rec.spec.ipam_error.expect("the reason is recorded");
        assert!(reason.contains(field), "{reason}");
        assert!(rec.spec.ip_addrs.is_empty() && rec.spec.ip_addrs_no_ipam.is_empty());
    }
}

/// A ClusterNetworkPolicy as `trellis apply` stores the same document: the spec through
/// Trellis's parser, the version Trellis stores, the Kubernetes labels and uid, the ownership
/// mark and nothing else of the server's (status, managedFields, kubectl's annotation).
fn cnp_as_the_cli_stores_it(file: &str, uid: &str) {
    let o: kube::api::DynamicObject = fixture(file);
    let r = translate::cluster_network_policy(&o).unwrap();
    let doc = serde_json::json!({
        "apiVersion": o.types.as_ref().unwrap().api_version, "kind": "ClusterNetworkPolicy",
        "metadata": {"name": o.metadata.name, "labels": {"owner": "platform"}, "uid": uid,
                     "annotations": {MANAGED_BY: CONTROLLER}},
        "spec": o.data["spec"],
    });
    let cli = parse_documents(&doc.to_string()).unwrap().remove(0);
    assert_eq!(r, cli);
    assert!(translate::owned(&r));
    assert_eq!(
        r.to_value()["apiVersion"],
        "policy.networking.k8s.io/v1beta1",
        "stored under the version Trellis stores"
    );
    assert!(r.to_value().get("status").is_none());
    assert_eq!(r.metadata().annotations.len(), 1, "{:?}", r.metadata());
    assert_eq!(
        r.key(),
        format!(
            "/trellis/v1/clusternetworkpolicies/{}",
            o.metadata.name.unwrap()
        )
    );
}

#[test]
fn a_cluster_network_policy_is_stored_as_the_cli_stores_the_same_yaml() {
    cnp_as_the_cli_stores_it(
        "k8s-1.33-clusternetworkpolicy-v1alpha2.json",
        "7c1e9a52-3f0b-4d7e-9e4a-5b2d8c6f1a90",
    );
    cnp_as_the_cli_stores_it(
        "k8s-1.33-clusternetworkpolicy-v1beta1.json",
        "2b8f4c61-0d3e-4a9b-8c7f-6e1d2a3b4c5d",
    );
    let o: kube::api::DynamicObject = fixture("k8s-1.33-clusternetworkpolicy-v1alpha2.json");
    let Resource::ClusterNetworkPolicy(p) = translate::cluster_network_policy(&o).unwrap() else {
        panic!()
    };
    assert_eq!(p.spec.ingress.len(), 2);
    assert_eq!(p.spec.egress.len(), 2);
}

#[test]
fn a_bad_cluster_network_policy_is_refused_naming_the_field() {
    let e = err_of(translate::cluster_network_policy(&fixture(
        "bad-k8s-1.33-clusternetworkpolicy-priority.json",
    )));
    assert_eq!(
        (e.kind, e.object.as_str()),
        ("ClusterNetworkPolicy", "platform-guardrails")
    );
    assert!(e.field.contains("priority"), "{e}");
    assert!(e.reason.contains("1001"), "{e}");
    // A version Trellis does not read (or none) is refused, not guessed.
    let mut o: kube::api::DynamicObject = fixture("k8s-1.33-clusternetworkpolicy-v1beta1.json");
    o.types.as_mut().unwrap().api_version = "policy.networking.k8s.io/v2".into();
    let e = err_of(translate::cluster_network_policy(&o));
    assert_eq!(e.field, "apiVersion");
    o.types = None;
    assert_eq!(
        err_of(translate::cluster_network_policy(&o)).field,
        "apiVersion"
    );
}

#[test]
fn a_nodes_pod_cidrs_are_stored_on_its_trellis_node() {
    use trellis_cluster::objects::{decode, encode};
    use trellis_kube::plan::{plan_nodes, NodeDesired, Op};
    // The fixture's IPv4 podCIDR alone (an IPv6 /64 is no block: see the IPAM mode's docs).
    let mut k: Node = fixture("k8s-1.33-node.json");
    k.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.2.0/24".into()]);
    let info = translate::node(&k).unwrap();
    let registered = &parse_documents(
        "apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: node-2}\nspec: {addresses: [{address: 192.168.50.11/24}]}\n",
    )
    .unwrap()[0];
    let kv = trellis_store::KeyValue {
        key: registered.key(),
        value: encode(registered),
        create_revision: 2,
        mod_revision: 2,
    };
    let nodes = [("node-2".to_string(), NodeDesired::Node(Box::new(info)))].into();
    let ops = plan_nodes(&nodes, std::slice::from_ref(&kv));
    let [Op::Put { value, .. }] = ops.as_slice() else {
        panic!("{ops:?}")
    };
    let stored = decode(&trellis_store::KeyValue {
        value: value.clone(),
        ..kv
    })
    .unwrap();
    let Resource::Node(n) = stored.resource else {
        panic!("{stored:?}")
    };
    let cidrs: Vec<String> = n.spec.pod_cidrs.iter().map(|c| c.to_string()).collect();
    assert_eq!(cidrs, ["10.244.2.0/24"]);
}
