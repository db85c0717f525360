//! Bad input gets the spec's error JSON with the right code and names the field or variable;
//! a failed ADD leaves nothing behind.

mod common;

use common::{pod, Node};
use serde_json::json;

#[test]
fn environment_errors_name_the_variable() {
    let node = Node::new("enverr");
    let p = pod("ee");
    let conf = node.conf("1.0.0", json!({}));
    let out = node.call_as("trellis-cni", "ADD", "e-1", None, "eth0", &conf, &[]);
    assert_eq!(out.err_code(), 4);
    assert!(out.json()["msg"].as_str().unwrap().contains("CNI_NETNS"));
    assert_eq!(out.json()["cniVersion"], "1.0.0");
    let out = node.call_as(
        "trellis-cni",
        "ADD",
        "e-1",
        Some(p.path()),
        "eth0",
        &conf,
        &[("CNI_COMMAND", "FROB")],
    );
    assert!(out.json()["msg"].as_str().unwrap().contains("CNI_COMMAND"));
    let out = node.call_as(
        "trellis-cni",
        "ADD",
        "e-1",
        Some(p.path()),
        "a/b",
        &conf,
        &[],
    );
    assert!(out.json()["msg"].as_str().unwrap().contains("CNI_IFNAME"));
    let out = node.call_as(
        "trellis-cni",
        "ADD",
        "e-1",
        Some(p.path()),
        "eth0",
        &conf,
        &[("CNI_ARGS", "BOGUS=1")],
    );
    assert_eq!(out.err_code(), 4);
    assert!(out.json()["msg"].as_str().unwrap().contains("BOGUS"));
    let out = node.call_as(
        "trellis-cni",
        "ADD",
        "e-1",
        Some(std::path::Path::new("/var/run/netns/none-such")),
        "eth0",
        &conf,
        &[],
    );
    assert_eq!(out.err_code(), 4);
    assert!(
        node.allocations("testnet").is_empty(),
        "nothing held after a failed ADD"
    );
}

#[test]
fn config_errors_get_spec_codes() {
    let node = Node::new("conferr");
    let p = pod("ce");
    let cases = [
        (json!({"cniVersion": "0.2.0"}), 1, "cniVersion"),
        (json!({"colour": "blue"}), 2, "colour"),
        (json!({"mtu": "x"}), 7, "mtu"),
        (json!({"mode": "vxlan"}), 7, "mode"),
        (
            json!({"ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.1.0.0/24", "rangeEnd": "10.2.0.1"}]]}}),
            7,
            "rangeEnd",
        ),
    ];
    for (extra, code, needle) in cases {
        let conf = node.conf("1.0.0", extra.clone());
        let out = node.call("ADD", "c-1", Some(p.path()), &conf);
        assert_eq!(out.err_code(), code, "{extra}: {}", out.stdout);
        assert!(
            out.json()["msg"].as_str().unwrap().contains(needle),
            "{extra}: {}",
            out.stdout
        );
    }
    // Undecodable stdin.
    let mut child = node.spawn(
        "trellis-cni",
        "ADD",
        "c-2",
        Some(p.path()),
        "eth0",
        &json!("placeholder"),
        &[],
    );
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["code"], 6);
    // GC and STATUS need 1.1.0.
    let out = node.call("STATUS", "c-3", None, &node.conf("1.0.0", json!({})));
    assert_eq!(out.err_code(), 1);
    assert!(!p.exec_ok(&["ip", "link"]).contains("eth0"));
    assert!(node.allocations("testnet").is_empty());
}

#[test]
fn interface_already_present_is_refused_cleanly() {
    let node = Node::new("exists");
    let p = pod("ex");
    p.exec_ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    let out = node.call("ADD", "x-1", Some(p.path()), &node.conf("1.0.0", json!({})));
    assert_eq!(out.err_code(), 4);
    assert!(out.json()["msg"]
        .as_str()
        .unwrap()
        .contains("already exists"));
    assert!(node.allocations("testnet").is_empty());
    assert!(!node.ns.exec_ok(&["ip", "link"]).contains("trl"));
}

#[test]
fn version_verb() {
    let node = Node::new("version");
    let out = node
        .call("VERSION", "v", None, &json!({"cniVersion": "0.4.0"}))
        .ok()
        .json();
    assert_eq!(out["cniVersion"], "0.4.0");
    assert_eq!(out["supportedVersions"].as_array().unwrap().len(), 5);
}
