//! Calico's IPAM annotations at allocation, on SQLite and etcd: a namespace's `ipv4pools`
//! applies to its pods that name none (the pod's own wins), and a namespace annotation naming a
//! missing or disabled pool (or not parsing) is an error naming it, with nothing allocated;
//! the commit is guarded by the namespace record as read. `ipAddrsNoIpam` and `floatingIPs`
//! only where the agent enables them: otherwise an error naming the annotation and the flag,
//! with nothing written; enabled, the addresses are given without any allocation (a release
//! frees nothing from IPAM) and the floating address is recorded on the endpoint (`ipNATs`).

mod common;

use std::net::IpAddr;
use std::sync::Arc;

use common::{apply, node_yaml, pool_yaml, Backing};
use ipnet::IpNet;
use trellis_cluster::annotations::Features;
use trellis_cluster::ipam::{endpoint_name, NodeIpam, PodRecords, Request};
use trellis_cluster::objects::{self, Stored};
use trellis_cluster::ClusterError;
use trellis_resources::{key_for, Kind, Resource};
use trellis_store::Datastore;

async fn setup(etcd: bool) -> (Arc<dyn Datastore>, Backing) {
    let (store, backing) = match etcd {
        true => common::etcd().await,
        false => common::sqlite().await,
    };
    apply(&*store, &pool_yaml("a", "10.83.0.0/16", 26)).await;
    apply(&*store, &pool_yaml("b", "10.84.0.0/16", 26)).await;
    apply(&*store, &node_yaml("n1")).await;
    (store, backing)
}

fn namespace_yaml(name: &str, pools: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  annotations:\n    cni.projectcalico.org/ipv4pools: '{pools}'\n")
}

fn pod_yaml(ns: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: trellis.dev/v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{nodeName: n1{spec}}}\n")
}

fn req(ns: &str, pod: &str) -> Request {
    Request {
        network: "k8s".into(),
        container_id: format!("c-{ns}-{pod}"),
        ifname: "eth0".into(),
        namespace: Some(ns.into()),
        pod: Some(pod.into()),
        ..Default::default()
    }
}

fn inside(cidr: &str, ip: IpAddr) -> bool {
    cidr.parse::<IpNet>().unwrap().contains(&ip)
}

/// Nothing at all of the attachment is stored: no handle, no endpoint.
async fn nothing_stored(store: &dyn Datastore, r: &Request) {
    let handle = key_for(Kind::IpamHandle, None, &r.handle());
    assert!(
        store.get(&handle).await.unwrap().is_none(),
        "a handle was written"
    );
    let ep = key_for(
        Kind::WorkloadEndpoint,
        r.namespace.as_deref(),
        &endpoint_name("n1", r),
    );
    assert!(
        store.get(&ep).await.unwrap().is_none(),
        "an endpoint was written"
    );
}

/// How many addresses the blocks hold in all.
async fn allocated(store: &dyn Datastore) -> usize {
    objects::blocks(store)
        .await
        .unwrap()
        .iter()
        .map(|(b, _)| trellis_ipam::cluster::allocations(&b.spec).len())
        .sum()
}

async fn namespace_pools(etcd: bool) {
    let (store, _b) = setup(etcd).await;
    apply(&*store, &namespace_yaml("shop", "[\"b\"]")).await;
    apply(&*store, &pod_yaml("shop", "plain", "")).await;
    apply(&*store, &pod_yaml("shop", "own", ", ipv4Pools: [a]")).await;
    let ipam = NodeIpam::new(store.clone(), "n1", Default::default());
    let got = ipam.allocate(&req("shop", "plain")).await.unwrap();
    assert!(
        inside("10.84.0.0/16", got[0].0),
        "namespace pool b: {got:?}"
    );
    let got = ipam.allocate(&req("shop", "own")).await.unwrap();
    assert!(
        inside("10.83.0.0/16", got[0].0),
        "the pod's own pool a: {got:?}"
    );

    // A namespace naming a pool that does not exist, a disabled pool, or garbage.
    apply(&*store, &pod_yaml("bad", "p", "")).await;
    apply(
        &*store,
        "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: off}\nspec: {cidr: 10.85.0.0/16, disabled: true}\n",
    )
    .await;
    let before = allocated(&*store).await;
    for (value, why) in [
        ("[\"gone\"]", "does not exist"),
        ("[\"off\"]", "no enabled IPv4 pool"),
        ("b", "not a JSON list"),
    ] {
        apply(&*store, &namespace_yaml("bad", value)).await;
        let ipam = NodeIpam::new(store.clone(), "n1", Default::default());
        let r = req("bad", "p");
        let e = ipam.allocate(&r).await.unwrap_err();
        assert!(
            matches!(e, ClusterError::Annotation { .. }),
            "{value}: {e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("namespace bad")
                && msg.contains("cni.projectcalico.org/ipv4pools")
                && msg.contains(value)
                && msg.contains(why),
            "{value}: {msg}"
        );
        nothing_stored(&*store, &r).await;
        assert_eq!(
            allocated(&*store).await,
            before,
            "{value}: something allocated"
        );
    }
}

#[tokio::test]
async fn namespace_pools_apply_unless_the_pod_names_its_own_sqlite() {
    namespace_pools(false).await;
}

#[tokio::test]
async fn namespace_pools_apply_unless_the_pod_names_its_own_etcd() {
    namespace_pools(true).await;
}

/// A view that has the pod's record but has not seen its namespace's yet (the annotation
/// arrived after the view was read): the commit's guard on the namespace's absence fails, and
/// the allocation reads again and follows the annotation.
struct PodOnly(Stored);

impl PodRecords for PodOnly {
    fn pod_record(&self, key: &str) -> Option<Stored> {
        (key == self.0.resource.key()).then(|| self.0.clone())
    }
}

#[tokio::test]
async fn a_namespace_record_the_view_missed_is_caught_by_the_guard() {
    let (store, _b) = setup(false).await;
    apply(&*store, &pod_yaml("shop", "plain", "")).await;
    let pod = objects::get(&*store, Kind::Pod, Some("shop"), "plain")
        .await
        .unwrap()
        .unwrap();
    apply(&*store, &namespace_yaml("shop", "[\"b\"]")).await;
    let ipam = NodeIpam::new(store.clone(), "n1", Default::default())
        .with_pod_records(Arc::new(PodOnly(pod)), false);
    let got = ipam.allocate(&req("shop", "plain")).await.unwrap();
    assert!(inside("10.84.0.0/16", got[0].0), "{got:?}");
}

async fn no_ipam(etcd: bool) {
    let (store, _b) = setup(etcd).await;
    apply(
        &*store,
        &pod_yaml("default", "fixed", ", ipAddrsNoIpam: [192.0.2.7]"),
    )
    .await;
    let r = req("default", "fixed");
    let off = NodeIpam::new(store.clone(), "n1", Default::default());
    let e = off.allocate(&r).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("cni.projectcalico.org/ipAddrsNoIpam")
            && msg.contains("192.0.2.7")
            && msg.contains("--allow-ip-addrs-no-ipam"),
        "{msg}"
    );
    nothing_stored(&*store, &r).await;

    let on = NodeIpam::new(store.clone(), "n1", Default::default()).with_features(Features {
        ip_addrs_no_ipam: true,
        ..Default::default()
    });
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let got = on.allocate(&r).await.unwrap();
    assert_eq!(got, vec![(ip, "192.0.2.7/32".parse().unwrap())]);
    assert_eq!(allocated(&*store).await, 0, "an address was allocated");
    assert!(
        objects::blocks(&*store).await.unwrap().is_empty(),
        "a block was claimed"
    );
    // A repeated ADD and a CHECK see the addresses the attachment holds.
    assert_eq!(on.allocate(&r).await.unwrap(), got);
    assert_eq!(on.held(&r).await.unwrap(), Some(got.clone()));
    let ep = key_for(
        Kind::WorkloadEndpoint,
        Some("default"),
        &endpoint_name("n1", &r),
    );
    let Some(Stored {
        resource: Resource::WorkloadEndpoint(w),
        ..
    }) = objects::get(
        &*store,
        Kind::WorkloadEndpoint,
        Some("default"),
        &endpoint_name("n1", &r),
    )
    .await
    .unwrap()
    else {
        panic!("no endpoint at {ep}");
    };
    assert_eq!(
        w.spec.ip_networks,
        vec!["192.0.2.7/32".parse::<IpNet>().unwrap()]
    );
    // `ipam check` sees a consistent attachment (a handle holding no block, with its endpoint).
    let problems = trellis_cluster::report::check(&*store).await.unwrap();
    assert!(problems.is_empty(), "{problems:?}");

    // An ordinary pod next to it allocates as usual; the DEL of the fixed one frees nothing.
    apply(&*store, &pod_yaml("default", "plain", "")).await;
    on.allocate(&req("default", "plain")).await.unwrap();
    assert_eq!(allocated(&*store).await, 1);
    assert_eq!(on.release(&r).await.unwrap(), Vec::<IpAddr>::new());
    assert_eq!(
        allocated(&*store).await,
        1,
        "the DEL released an IPAM address"
    );
    nothing_stored(&*store, &r).await;
}

#[tokio::test]
async fn ip_addrs_no_ipam_only_when_enabled_and_never_allocated_sqlite() {
    no_ipam(false).await;
}

#[tokio::test]
async fn ip_addrs_no_ipam_only_when_enabled_and_never_allocated_etcd() {
    no_ipam(true).await;
}

#[tokio::test]
async fn floating_ips_only_when_enabled_and_recorded_on_the_endpoint() {
    let (store, _b) = setup(false).await;
    apply(
        &*store,
        &pod_yaml("default", "f", ", floatingIPs: [203.0.113.9]"),
    )
    .await;
    apply(
        &*store,
        &pod_yaml("default", "f6", ", floatingIPs: [\"fd00::9\"]"),
    )
    .await;
    let r = req("default", "f");
    let off = NodeIpam::new(store.clone(), "n1", Default::default());
    let e = off.allocate(&r).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("cni.projectcalico.org/floatingIPs")
            && msg.contains("203.0.113.9")
            && msg.contains("--allow-floating-ips"),
        "{msg}"
    );
    nothing_stored(&*store, &r).await;
    assert_eq!(allocated(&*store).await, 0);

    let on = NodeIpam::new(store.clone(), "n1", Default::default()).with_features(Features {
        floating_ips: true,
        ..Default::default()
    });
    let got = on.allocate(&r).await.unwrap();
    let Some(Stored {
        resource: Resource::WorkloadEndpoint(w),
        ..
    }) = objects::get(
        &*store,
        Kind::WorkloadEndpoint,
        Some("default"),
        &endpoint_name("n1", &r),
    )
    .await
    .unwrap()
    else {
        panic!("no endpoint");
    };
    assert_eq!(w.spec.ip_nats.len(), 1);
    assert_eq!(w.spec.ip_nats[0].internal_ip, got[0].0);
    assert_eq!(
        w.spec.ip_nats[0].external_ip,
        "203.0.113.9".parse::<IpAddr>().unwrap()
    );

    // An IPv6 floating address for a pod with no IPv6 address (no IPv6 pool): refused whole.
    let r6 = req("default", "f6");
    let before = allocated(&*store).await;
    let e = on.allocate(&r6).await.unwrap_err();
    assert!(e.to_string().contains("no IPv6 address"), "{e}");
    nothing_stored(&*store, &r6).await;
    assert_eq!(allocated(&*store).await, before);
}

/// A pod whose annotations the kube-controller refused: its ADD fails with the reason instead
/// of allocating as if it had none.
#[tokio::test]
async fn a_refused_annotation_fails_the_add() {
    let (store, _b) = setup(false).await;
    apply(
        &*store,
        &pod_yaml("default", "p", ", ipamError: \"metadata.annotations.cni.projectcalico.org/ipAddrs: [0] \\\"x\\\" is not an IP address\""),
    )
    .await;
    let r = req("default", "p");
    let ipam = NodeIpam::new(store.clone(), "n1", Default::default());
    let e = ipam.allocate(&r).await.unwrap_err();
    assert!(
        e.to_string().contains("cni.projectcalico.org/ipAddrs"),
        "{e}"
    );
    nothing_stored(&*store, &r).await;
}

/// Hostile review: an address given without IPAM, or a floating address, that IPAM has handed
/// to another pod (or may hand out: inside a claimed block) is refused naming the annotation,
/// with nothing written — else two live attachments hold one address, and the floating
/// address's host route (a /32, more specific than the block's) takes the other pod's traffic
/// on every node.
async fn an_ipam_address_is_not_taken_without_ipam(etcd: bool) {
    let (store, _b) = setup(etcd).await;
    apply(&*store, &pod_yaml("default", "plain", "")).await;
    let on = NodeIpam::new(store.clone(), "n1", Default::default()).with_features(Features {
        ip_addrs_no_ipam: true,
        floating_ips: true,
    });
    let victim = on.allocate(&req("default", "plain")).await.unwrap()[0].0;
    let free = match victim {
        IpAddr::V4(v) => IpAddr::V4(std::net::Ipv4Addr::from(u32::from(v) + 1)),
        IpAddr::V6(_) => unreachable!(),
    };
    for (pod, annotation, ip) in [
        ("squat", "ipAddrsNoIpam", victim),
        ("hijack", "floatingIPs", victim),
        ("squatfree", "ipAddrsNoIpam", free),
        ("hijackfree", "floatingIPs", free),
    ] {
        apply(
            &*store,
            &pod_yaml("default", pod, &format!(", {annotation}: [\"{ip}\"]")),
        )
        .await;
        let r = req("default", pod);
        let before = allocated(&*store).await;
        let e = on.allocate(&r).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("cni.projectcalico.org/{annotation}"))
                && msg.contains(&ip.to_string()),
            "{pod}: {msg}"
        );
        nothing_stored(&*store, &r).await;
        assert_eq!(allocated(&*store).await, before, "{pod}");
    }
    // Outside every block both are still given.
    apply(
        &*store,
        &pod_yaml("default", "ok", ", floatingIPs: [203.0.113.9]"),
    )
    .await;
    on.allocate(&req("default", "ok")).await.unwrap();
}

#[tokio::test]
async fn an_ipam_address_is_not_taken_without_ipam_sqlite() {
    an_ipam_address_is_not_taken_without_ipam(false).await;
}

#[tokio::test]
async fn an_ipam_address_is_not_taken_without_ipam_etcd() {
    an_ipam_address_is_not_taken_without_ipam(true).await;
}

/// Hostile review: an address given without IPAM, or a floating address, that is another
/// node's address (its /32 route to the pod's node, on every other node, took the node's
/// traffic — the VXLAN underlay's too), or that another pod already holds without IPAM or as
/// its floating address, is refused naming the annotation, with nothing written.
#[tokio::test]
async fn a_node_or_pod_address_is_not_taken_without_ipam() {
    let (store, _b) = setup(false).await;
    apply(
        &*store,
        "apiVersion: trellis.dev/v1\nkind: Node\nmetadata:\n  name: n2\nspec:\n  addresses: [{address: 198.51.100.2}]\n  bgp: {ipv4Address: 198.51.100.12/24}\n  ipv4VXLANTunnelAddr: 10.83.9.1\n",
    )
    .await;
    let on = NodeIpam::new(store.clone(), "n1", Default::default()).with_features(Features {
        ip_addrs_no_ipam: true,
        floating_ips: true,
    });
    apply(
        &*store,
        &pod_yaml("default", "first", ", ipAddrsNoIpam: [192.0.2.7]"),
    )
    .await;
    on.allocate(&req("default", "first")).await.unwrap();
    apply(
        &*store,
        &pod_yaml("default", "fip", ", floatingIPs: [203.0.113.9]"),
    )
    .await;
    on.allocate(&req("default", "fip")).await.unwrap();
    for (pod, annotation, ip) in [
        ("node", "floatingIPs", "198.51.100.2"),
        ("bgp", "ipAddrsNoIpam", "198.51.100.12"),
        ("tunnel", "floatingIPs", "10.83.9.1"),
        ("twice", "ipAddrsNoIpam", "192.0.2.7"),
        ("float", "floatingIPs", "192.0.2.7"),
        ("fipagain", "floatingIPs", "203.0.113.9"),
        ("fipsquat", "ipAddrsNoIpam", "203.0.113.9"),
    ] {
        apply(
            &*store,
            &pod_yaml("default", pod, &format!(", {annotation}: [\"{ip}\"]")),
        )
        .await;
        let r = req("default", pod);
        let before = allocated(&*store).await;
        let e = on.allocate(&r).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("cni.projectcalico.org/{annotation}")) && msg.contains(ip),
            "{pod}: {msg}"
        );
        nothing_stored(&*store, &r).await;
        assert_eq!(allocated(&*store).await, before, "{pod}");
    }
}
