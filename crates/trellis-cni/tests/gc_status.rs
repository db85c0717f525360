//! GC (both attachment-list spellings) and STATUS (exhaustion gives code 50).

mod common;

use common::{pod, Node};
use serde_json::json;

#[test]
fn gc_releases_everything_not_listed() {
    let node = Node::new("gc");
    let pods: Vec<_> = (0..3).map(|i| pod(&format!("gc{i}"))).collect();
    let conf = node.conf("1.1.0", json!({}));
    for (i, p) in pods.iter().enumerate() {
        node.call("ADD", &format!("gc-{i}"), Some(p.path()), &conf)
            .ok();
    }
    assert_eq!(node.allocations("testnet").len(), 3);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "gc-1", "ifname": "eth0"}]);
    node.call_as(
        "trellis-cni",
        "GC",
        "",
        None,
        "",
        &gc,
        &[("CNI_CONTAINERID", ""), ("CNI_IFNAME", "")],
    )
    .ok();
    let left = node.allocations("testnet");
    assert_eq!(left.len(), 1);
    assert!(left[0].1 == "gc-1/eth0", "{left:?}");
    // The older key, through the IPAM role.
    let mut gc = conf.clone();
    gc["cni.dev/attachments"] = json!([]);
    node.call_as("trellis-ipam", "GC", "", None, "", &gc, &[])
        .ok();
    assert!(node.allocations("testnet").is_empty());
    // GC without a list is refused rather than releasing everything.
    let out = node.call_as("trellis-cni", "GC", "", None, "", &conf, &[]);
    assert_eq!(out.err_code(), 7);
    for (i, p) in pods.iter().enumerate() {
        node.call("DEL", &format!("gc-{i}"), Some(p.path()), &conf)
            .ok();
    }
}

#[test]
fn status_reports_exhaustion() {
    let node = Node::new("status");
    let conf = node.conf(
        "1.1.0",
        json!({"ipam": {"type": "trellis-ipam",
        "ranges": [[{"subnet": "10.66.0.0/30"}]], "dataDir": node.data_dir()}}),
    );
    node.call("STATUS", "", None, &conf).ok();
    let p = pod("st");
    node.call("ADD", "st-1", Some(p.path()), &conf).ok();
    let out = node.call("STATUS", "", None, &conf);
    assert_eq!(out.err_code(), 50);
    assert!(out.json()["msg"].as_str().unwrap().contains("exhausted"));
    let p2 = pod("st2");
    assert_eq!(
        node.call("ADD", "st-2", Some(p2.path()), &conf).err_code(),
        100
    );
    node.call("DEL", "st-1", Some(p.path()), &conf).ok();
    node.call("STATUS", "", None, &conf).ok();
}
