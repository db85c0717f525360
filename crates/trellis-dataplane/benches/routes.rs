//! Route programming speed: 10 000 block routes (100 remote nodes × 100 blocks, direct
//! routing) planned and applied from scratch in a private namespace, then a no-op resync
//! (observe + plan), compared with `ip -batch` doing the same adds in the same run.
//! Figures only; run as root: `cargo bench -p trellis-dataplane --bench routes`.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Instant;

use ipnet::{IpNet, Ipv4Net};
use trellis_dataplane::{routing, Netlink, Netns};
use trellis_resources::Encapsulation;
use trellis_routing::{desired, plan, LocalNode, PoolRouting, RemoteNode};
use trellis_testutil::{spawn_with_input, TestNetns};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let ns = TestNetns::new("rbench");
    ns.exec_ok(&[
        "ip", "link", "add", "upl0", "type", "veth", "peer", "name", "upl1",
    ]);
    ns.exec_ok(&["ip", "addr", "add", "192.168.0.1/16", "dev", "upl0"]);
    ns.exec_ok(&["ip", "link", "set", "upl0", "up"]);
    ns.exec_ok(&["ip", "link", "set", "upl1", "up"]);
    let handle = Netns::open(ns.path()).unwrap();
    let mut nl = Netlink::open_in(&handle).unwrap();
    let uplink = nl.link("upl0").unwrap().unwrap().index;
    let local = LocalNode {
        name: "me".into(),
        address: "192.168.0.1/16".parse().unwrap(),
        uplink_ifindex: uplink,
        vtep_ifindex: None,
        bgp: false,
    };
    let remotes: Vec<RemoteNode> = (0..100u32)
        .map(|n| RemoteNode {
            name: format!("n{n}"),
            address: IpAddr::V4(Ipv4Addr::new(192, 168, 1, n as u8 + 1)),
            vtep_ip: None,
            vtep_mac: None,
        })
        .collect();
    let blocks: Vec<(IpNet, String)> = (0..10_000u32)
        .map(|i| {
            let base = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + i * 64;
            (
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base), 26).unwrap()),
                format!("n{}", i / 100),
            )
        })
        .collect();
    let pools = vec![PoolRouting {
        cidr: "10.0.0.0/8".parse().unwrap(),
        encapsulation: Encapsulation::None,
    }];

    let t = Instant::now();
    let (want, problems) = desired(&local, &remotes, &blocks, &pools);
    assert!(problems.is_empty());
    let observed = routing::observe(&mut nl, None).unwrap();
    let ops = plan(&want, &observed);
    let planned = t.elapsed();
    let failed = routing::apply(&mut nl, &ops);
    let total = t.elapsed();
    assert!(failed.is_empty(), "{:?}", failed.first());
    assert_eq!(ops.len(), 10_000);

    let t = Instant::now();
    let observed = routing::observe(&mut nl, None).unwrap();
    let noop = plan(&want, &observed);
    let resync = t.elapsed();
    assert!(noop.is_empty());

    // Reference: iproute2's batch mode adding the same routes to a fresh table in the same run.
    let mut batch = String::new();
    for (b, owner) in &blocks {
        let n: usize = owner[1..].parse().unwrap();
        batch.push_str(&format!(
            "route add {b} via 192.168.1.{} dev upl0 table 100\n",
            n + 1
        ));
    }
    let t = Instant::now();
    let child = spawn_with_input(ns.command("ip").args(["-batch", "-"]), &batch);
    assert!(child.wait_with_output().unwrap().status.success());
    let reference = t.elapsed();
    let _ = Command::new("true").status();

    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!(
        "10 000 routes from scratch: {:.1} ms (plan {:.1} ms) — target <= 300 ms: {}",
        ms(total),
        ms(planned),
        if ms(total) <= 300.0 { "met" } else { "MISSED" }
    );
    println!(
        "no-op resync (observe 10 000 + plan): {:.1} ms — target <= 50 ms: {}",
        ms(resync),
        if ms(resync) <= 50.0 { "met" } else { "MISSED" }
    );
    println!(
        "reference `ip -batch` adding the same 10 000 routes: {:.1} ms (Trellis/reference = {:.2})",
        ms(reference),
        ms(total) / ms(reference)
    );
}
