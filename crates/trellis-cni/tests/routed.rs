//! Routed mode against the real kernel: the pod's view and the host's view as the seeds show
//! for Calico, pod-to-pod traffic on one node, CHECK, DEL idempotence and versions.

mod common;

use common::{ip_of, link_gone, ping, pod, Node};
use serde_json::json;

#[test]
fn routed_add_check_del() {
    let node = Node::new("routed");
    let p1 = pod("rp1");
    let p2 = pod("rp2");
    let conf = node.conf("1.0.0", json!({"mtu": 1400}));
    let r1 = node
        .call("ADD", "ctr-one", Some(p1.path()), &conf)
        .ok()
        .json();
    let r2 = node
        .call("ADD", "ctr-two", Some(p2.path()), &conf)
        .ok()
        .json();
    assert_eq!(r1["cniVersion"], "1.0.0");
    let host_if = r1["interfaces"][0]["name"].as_str().unwrap().to_string();
    assert!(
        host_if.starts_with("trl") && host_if.len() <= 15,
        "{host_if}"
    );
    assert_eq!(r1["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    assert_eq!(r1["interfaces"][1]["name"], "eth0");
    assert_eq!(
        r1["interfaces"][1]["sandbox"],
        p1.path().display().to_string()
    );
    assert!(
        r1["ips"][0].get("version").is_none(),
        "1.0.0 results carry no ips[].version"
    );
    assert!(r1["ips"][0]["address"].as_str().unwrap().ends_with("/32"));
    let ip1 = ip_of(&r1, 0);
    let ip2 = ip_of(&r2, 0);
    assert_ne!(ip1, ip2);

    // The pod's view.
    let addr = p1.exec_ok(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains(&format!("{ip1}/32")), "{addr}");
    let routes = p1.exec_ok(&["ip", "-4", "route"]);
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.1.1 dev eth0 scope link"),
        "{routes}"
    );
    assert!(p1
        .exec_ok(&["ip", "link", "show", "eth0"])
        .contains("mtu 1400"));

    // The host's view.
    let link = node.ns.exec_ok(&["ip", "link", "show", &host_if]);
    assert!(
        link.contains("ee:ee:ee:ee:ee:ee") && link.contains("mtu 1400") && link.contains("UP"),
        "{link}"
    );
    let host_routes = node.ns.exec_ok(&["ip", "-4", "route"]);
    assert!(
        host_routes.contains(&format!("{ip1} dev {host_if} scope link")),
        "{host_routes}"
    );
    let sys = |p: &str| {
        node.ns
            .exec_ok(&["cat", &format!("/proc/sys/{p}")])
            .trim()
            .to_string()
    };
    assert_eq!(sys(&format!("net/ipv4/conf/{host_if}/proxy_arp")), "1");
    assert_eq!(sys(&format!("net/ipv4/neigh/{host_if}/proxy_delay")), "0");

    // Traffic: pod to pod through the host, and host to pod.
    assert!(ping(&p1, &ip2), "pod 1 cannot reach pod 2");
    // A node has an address of its own (its uplink's); the test node gets one on lo.
    node.ns
        .exec_ok(&["ip", "addr", "add", "192.0.2.10/32", "dev", "lo"]);
    assert!(ping(&node.ns, &ip1), "host cannot reach pod 1");

    // CHECK passes, then fails once the host route is gone.
    let mut check = conf.clone();
    check["prevResult"] = r1.clone();
    node.call("CHECK", "ctr-one", Some(p1.path()), &check).ok();
    node.ns
        .exec_ok(&["ip", "route", "del", &format!("{ip1}/32"), "dev", &host_if]);
    let bad = node.call("CHECK", "ctr-one", Some(p1.path()), &check);
    assert_eq!(bad.err_code(), 103);
    assert!(
        bad.json()["msg"].as_str().unwrap().contains("host route"),
        "{}",
        bad.stdout
    );
    // CHECK also fails when the address is missing from the pod.
    p2.exec_ok(&["ip", "addr", "flush", "dev", "eth0"]);
    let mut check2 = conf.clone();
    check2["prevResult"] = r2.clone();
    assert_eq!(
        node.call("CHECK", "ctr-two", Some(p2.path()), &check2)
            .err_code(),
        103
    );

    // DEL removes the interface and releases the address; twice is fine; netns gone is fine.
    assert_eq!(node.allocations("testnet").len(), 2);
    node.call("DEL", "ctr-one", Some(p1.path()), &conf).ok();
    assert!(link_gone(&node.ns, &host_if), "{host_if} still there");
    assert_eq!(node.allocations("testnet").len(), 1);
    node.call("DEL", "ctr-one", Some(p1.path()), &conf).ok();
    let p2_path = p2.path().to_path_buf();
    drop(p2);
    node.call("DEL", "ctr-two", Some(&p2_path), &conf).ok();
    node.call("DEL", "never-added", None, &conf).ok();
    assert!(node.allocations("testnet").is_empty());
}

#[test]
fn results_in_every_version() {
    let node = Node::new("versions");
    for (i, v) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let p = pod("ver");
        let conf = node.conf(v, json!({}));
        let cid = format!("ver-{i}");
        let r = node.call("ADD", &cid, Some(p.path()), &conf).ok().json();
        assert_eq!(r["cniVersion"], *v);
        let has_version = r["ips"][0].get("version").is_some();
        assert_eq!(has_version, v.starts_with("0."), "{v}: {r}");
        let mut check = conf.clone();
        check["prevResult"] = r.clone();
        let c = node.call("CHECK", &cid, Some(p.path()), &check);
        if v.starts_with("0.3") {
            assert_eq!(c.err_code(), 1, "CHECK does not exist before 0.4.0");
        } else {
            assert_eq!(c.code, 0, "{v}: {}", c.stdout);
        }
        node.call("DEL", &cid, Some(p.path()), &conf).ok();
    }
}

#[test]
fn dual_stack_routed() {
    let node = Node::new("dual");
    let p1 = pod("d1");
    let p2 = pod("d2");
    let conf = node.conf(
        "1.1.0",
        json!({"ipam": {"type": "trellis-ipam",
        "ranges": [[{"subnet": "10.78.0.0/24"}], [{"subnet": "fd00:78::/120"}]],
        "dataDir": node.data_dir()}}),
    );
    let r1 = node.call("ADD", "ds-1", Some(p1.path()), &conf).ok().json();
    let r2 = node.call("ADD", "ds-2", Some(p2.path()), &conf).ok().json();
    assert_eq!(r1["ips"].as_array().unwrap().len(), 2);
    assert!(r1["ips"][1]["address"].as_str().unwrap().ends_with("/128"));
    let routes6 = p1.exec_ok(&["ip", "-6", "route"]);
    assert!(
        routes6.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{routes6}"
    );
    let v6_2 = ip_of(&r2, 1);
    assert!(ping(&p1, &v6_2), "IPv6 pod to pod failed");
    assert!(ping(&p1, &ip_of(&r2, 0)), "IPv4 pod to pod failed");
    node.call("DEL", "ds-1", Some(p1.path()), &conf).ok();
    node.call("DEL", "ds-2", Some(p2.path()), &conf).ok();
    assert!(node.allocations("testnet").is_empty());
}

#[test]
fn requested_ip_and_mac() {
    let node = Node::new("reqip");
    let p = pod("rq");
    let conf = node.conf(
        "1.0.0",
        json!({"runtimeConfig": {"mac": "02:aa:bb:cc:dd:ee"}}),
    );
    let r = node
        .call_as(
            "trellis-cni",
            "ADD",
            "req-1",
            Some(p.path()),
            "eth0",
            &conf,
            &[("CNI_ARGS", "IgnoreUnknown=1;IP=10.77.0.50")],
        )
        .ok()
        .json();
    assert_eq!(ip_of(&r, 0), "10.77.0.50");
    assert_eq!(r["interfaces"][1]["mac"], "02:aa:bb:cc:dd:ee");
    let p2 = pod("rq2");
    let clash = node.call_as(
        "trellis-cni",
        "ADD",
        "req-2",
        Some(p2.path()),
        "eth0",
        &conf,
        &[("CNI_ARGS", "IP=10.77.0.50")],
    );
    assert_eq!(clash.err_code(), 100);
    // The failed ADD left nothing behind.
    assert!(!p2.exec_ok(&["ip", "link"]).contains("eth0"));
    assert_eq!(node.allocations("testnet").len(), 1);
    node.call("DEL", "req-1", Some(p.path()), &conf).ok();
}

/// A host end left by an ADD that was killed after creating the pair (same container ID and
/// ifname, so the same `trl` name, its peer `eth0` still in the pod) is replaced by the retried
/// ADD: the pair is created first and the stale one removed only when the kernel refuses the
/// names, so this path is the one that must still work.
#[test]
fn stale_pair_of_the_same_attachment_is_replaced() {
    let node = Node::new("stale");
    let p = pod("stl");
    let host_if = trellis_cni::veth::host_veth_name("stale-1", "eth0");
    let pod_ns = p.path().display().to_string();
    node.ns.exec_ok(&[
        "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod_ns,
    ]);
    let conf = node.conf("1.0.0", json!({}));
    let r = node
        .call("ADD", "stale-1", Some(p.path()), &conf)
        .ok()
        .json();
    assert_eq!(r["interfaces"][0]["name"], host_if.as_str());
    let ip = ip_of(&r, 0);
    let addr = p.exec_ok(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains(&format!("{ip}/32")), "{addr}");
    let host_routes = node.ns.exec_ok(&["ip", "-4", "route"]);
    assert!(
        host_routes.contains(&format!("{ip} dev {host_if} scope link")),
        "{host_routes}"
    );
    node.call("DEL", "stale-1", Some(p.path()), &conf).ok();
    assert!(link_gone(&node.ns, &host_if), "{host_if} still there");
}

/// Both ends are created with one transmit and one receive queue (what veth uses anyway):
/// left to the kernel they get one per CPU and are trimmed after registration, which costs an
/// RCU grace period per end and per ADD.
#[test]
fn veth_ends_have_one_queue() {
    let node = Node::new("queues");
    let p = pod("que");
    let conf = node.conf("1.0.0", json!({}));
    let r = node.call("ADD", "que-1", Some(p.path()), &conf).ok().json();
    let host_if = r["interfaces"][0]["name"].as_str().unwrap().to_string();
    for detail in [
        node.ns.exec_ok(&["ip", "-d", "link", "show", &host_if]),
        p.exec_ok(&["ip", "-d", "link", "show", "eth0"]),
    ] {
        assert!(detail.contains("numtxqueues 1 numrxqueues 1"), "{detail}");
    }
    node.call("DEL", "que-1", Some(p.path()), &conf).ok();
}
