//! Parallel ADDs for different containers, and `kill -9` in the middle of ADDs: no address is
//! ever handed to two containers and the store stays readable.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{pod, Node};
use serde_json::json;

#[test]
fn parallel_adds_get_distinct_addresses() {
    let node = Node::new("par");
    let pods: Vec<_> = (0..24).map(|i| pod(&format!("pa{i}"))).collect();
    let conf = node.conf("1.0.0", json!({}));
    let children: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            node.spawn(
                "trellis-cni",
                "ADD",
                &format!("par-{i}"),
                Some(p.path()),
                "eth0",
                &conf,
                &[],
            )
        })
        .collect();
    let mut ips = HashSet::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            ips.insert(v["ips"][0]["address"].as_str().unwrap().to_string()),
            "duplicate address"
        );
    }
    assert_eq!(node.allocations("testnet").len(), 24);
    for (i, p) in pods.iter().enumerate() {
        node.call("DEL", &format!("par-{i}"), Some(p.path()), &conf)
            .ok();
    }
    assert!(node.allocations("testnet").is_empty());
}

#[test]
fn kill_nine_mid_add_never_double_allocates() {
    let node = Node::new("kill");
    let conf = node.conf("1.0.0", json!({}));
    let pods: Vec<_> = (0..16).map(|i| pod(&format!("k{i}"))).collect();
    let mut survivors = Vec::new();
    for round in 0..2u64 {
        let children: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    i,
                    node.spawn(
                        "trellis-cni",
                        "ADD",
                        &format!("kill-{round}-{i}"),
                        Some(p.path()),
                        &format!("e{round}"),
                        &conf,
                        &[],
                    ),
                )
            })
            .collect();
        // Kill every other one at staggered moments inside its ADD.
        for (i, mut c) in children {
            if i % 2 == 0 {
                std::thread::sleep(Duration::from_micros(300 * (i as u64 % 7)));
                let _ = c.kill();
                let _ = c.wait();
            } else {
                let out = c.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stdout)
                );
                survivors.push(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap());
            }
        }
    }
    // Every recorded address has one complete owner; no owner holds two addresses.
    let allocs = node.allocations("testnet");
    let mut owners = HashSet::new();
    for (ip, owner) in &allocs {
        let parts: Vec<&str> = owner.split('/').collect();
        assert!(
            parts.len() == 2 && parts.iter().all(|p| !p.is_empty()),
            "incomplete record for {ip}: {owner:?}"
        );
        assert!(
            owners.insert(owner.clone()),
            "{owner:?} holds two addresses"
        );
    }
    let survivor_ips: HashSet<String> = survivors
        .iter()
        .map(|r| {
            r["ips"][0]["address"]
                .as_str()
                .unwrap()
                .trim_end_matches("/32")
                .to_string()
        })
        .collect();
    assert_eq!(
        survivor_ips.len(),
        survivors.len(),
        "two survivors got the same address"
    );
    for ip in &survivor_ips {
        assert!(
            allocs.iter().any(|(a, _)| a == ip),
            "survivor address {ip} not recorded"
        );
    }
    // The runtime's DEL after a failed ADD cleans up the killed ones.
    for round in 0..2 {
        for (i, p) in pods.iter().enumerate() {
            node.call_as(
                "trellis-cni",
                "DEL",
                &format!("kill-{round}-{i}"),
                Some(p.path()),
                &format!("e{round}"),
                &conf,
                &[],
            )
            .ok();
        }
    }
    assert!(node.allocations("testnet").is_empty());
}
