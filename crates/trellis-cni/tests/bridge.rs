//! Bridge mode against the real kernel: bridge creation, gateway, hairpin, default route,
//! ipMasq rules in Trellis's own nftables table (removed with the last user), and DEL.

mod common;

use common::{ip_of, link_gone, ping, pod, Node};
use serde_json::json;

fn bridge_conf(node: &Node, masq: bool) -> serde_json::Value {
    node.conf("1.1.0", json!({"mode": "bridge", "bridge": "trlbr0", "isGateway": true,
        "isDefaultGateway": true, "hairpinMode": true, "ipMasq": masq,
        "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.88.0.0/24"}]], "dataDir": node.data_dir()}}))
}

#[test]
fn bridge_add_traffic_masq_del() {
    let node = Node::new("bridge");
    let p1 = pod("bp1");
    let p2 = pod("bp2");
    let conf = bridge_conf(&node, true);
    let r1 = node.call("ADD", "br-1", Some(p1.path()), &conf).ok().json();
    let r2 = node.call("ADD", "br-2", Some(p2.path()), &conf).ok().json();
    assert_eq!(r1["interfaces"][0]["name"], "trlbr0");
    assert_eq!(r1["ips"][0]["gateway"], "10.88.0.1");
    assert_eq!(r1["ips"][0]["interface"], 2);
    assert!(r1["ips"][0]["address"].as_str().unwrap().ends_with("/24"));
    let host_if = r1["interfaces"][1]["name"].as_str().unwrap().to_string();

    let br = node
        .ns
        .exec_ok(&["ip", "-4", "addr", "show", "dev", "trlbr0"]);
    assert!(br.contains("10.88.0.1/24"), "{br}");
    let port = node.ns.exec_ok(&["ip", "-d", "link", "show", &host_if]);
    assert!(port.contains("master trlbr0"), "{port}");
    assert!(port.contains("hairpin on"), "{port}");
    let routes = p1.exec_ok(&["ip", "-4", "route"]);
    assert!(
        routes.contains("default via 10.88.0.1 dev eth0"),
        "{routes}"
    );

    assert!(ping(&p1, &ip_of(&r2, 0)), "pod to pod over the bridge");
    assert!(ping(&p1, "10.88.0.1"), "pod to gateway");

    let nft = node
        .ns
        .exec_ok(&["nft", "list", "table", "inet", "trellis_cni_masq"]);
    assert!(
        nft.contains(&format!("ip saddr {}", ip_of(&r1, 0))),
        "{nft}"
    );
    assert!(nft.contains("masquerade"), "{nft}");
    assert_eq!(nft.matches("masquerade").count(), 2, "{nft}");

    let mut check = conf.clone();
    check["prevResult"] = r1.clone();
    node.call("CHECK", "br-1", Some(p1.path()), &check).ok();

    node.call("DEL", "br-1", Some(p1.path()), &conf).ok();
    let nft = node
        .ns
        .exec_ok(&["nft", "list", "table", "inet", "trellis_cni_masq"]);
    assert_eq!(nft.matches("masquerade").count(), 1, "{nft}");
    assert!(link_gone(&node.ns, &host_if), "{host_if} still there");
    node.call("DEL", "br-2", Some(p2.path()), &conf).ok();
    assert!(
        !node
            .ns
            .exec(&["nft", "list", "table", "inet", "trellis_cni_masq"])
            .status
            .success(),
        "the table goes with its last user"
    );
    node.call("DEL", "br-2", Some(p2.path()), &conf).ok();
    assert!(node.allocations("testnet").is_empty());
}

#[test]
fn bridge_that_is_not_a_bridge_is_refused() {
    let node = Node::new("notbr");
    node.ns.exec_ok(&[
        "ip", "link", "add", "trlbr0", "type", "veth", "peer", "name", "trlbr0p",
    ]);
    let p = pod("nb");
    let out = node.call("ADD", "nb-1", Some(p.path()), &bridge_conf(&node, false));
    assert_eq!(out.err_code(), 7);
    assert!(
        out.json()["msg"].as_str().unwrap().contains("not a bridge"),
        "{}",
        out.stdout
    );
    assert!(
        node.allocations("testnet").is_empty(),
        "failed ADD must release its address"
    );
}

/// trellis-ipam serves another main plugin: Debian's reference `bridge`.
#[test]
fn ipam_role_under_reference_bridge() {
    if !std::path::Path::new("/usr/lib/cni/bridge").exists() {
        panic!("containernetworking-plugins is not installed (/usr/lib/cni/bridge missing); run scripts/setup.sh");
    }
    let node = Node::new("refbr");
    let p = pod("rb");
    let conf = json!({"cniVersion": "1.0.0", "name": "refnet", "type": "bridge", "bridge": "trlref0",
        "isGateway": true, "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.99.0.0/24"}]],
        "dataDir": node.data_dir()}});
    let bridge_bin = node.dir.path().join("bin").join("bridge");
    std::os::unix::fs::symlink("/usr/lib/cni/bridge", &bridge_bin).unwrap();
    let r = node
        .call_as("bridge", "ADD", "ref-1", Some(p.path()), "eth0", &conf, &[])
        .ok()
        .json();
    assert_eq!(ip_of(&r, 0), "10.99.0.2");
    assert_eq!(node.allocations("refnet").len(), 1);
    node.call_as("bridge", "DEL", "ref-1", Some(p.path()), "eth0", &conf, &[])
        .ok();
    assert!(node.allocations("refnet").is_empty());
}
