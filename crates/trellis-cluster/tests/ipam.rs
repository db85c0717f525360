//! Cluster IPAM against both datastores: concurrent allocation from several nodes, no
//! duplicates, affinity, fixed addresses (one per family), reservations, strict affinity and
//! maxBlocksPerHost, attachment identities (full container IDs, unambiguous handles, records of
//! the older format), release, check and GC. Time moves by a test clock, never by sleeping.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{apply, node_yaml, req, ManualClock};
use trellis_cluster::ipam::NodeIpam;
use trellis_cluster::report::{self, GcScope};
use trellis_cluster::{objects, Clock, ClusterError};
use trellis_ipam::cluster::ClusterIpamError;
use trellis_store::Datastore;

async fn burst_four_nodes(s: Arc<dyn Datastore>) {
    apply(&*s, "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: pool\nspec:\n  cidr: 10.50.0.0/16\n  blockSize: 26\n").await;
    let nodes: Vec<String> = (0..4).map(|i| format!("node{i}")).collect();
    for n in &nodes {
        apply(&*s, &node_yaml(n)).await;
    }
    let clock = ManualClock::new();
    let mut tasks = Vec::new();
    for n in &nodes {
        let ipam = Arc::new(NodeIpam::new(s.clone(), n, BTreeMap::new()).with_clock(clock.clone()));
        for i in 0..50 {
            let ipam = ipam.clone();
            let n = n.clone();
            tasks.push(tokio::spawn(async move {
                (n.clone(), ipam.allocate(&req(&n, i)).await.unwrap())
            }));
        }
    }
    let mut seen = HashSet::new();
    let mut given: Vec<(String, ipnet::IpNet, std::net::IpAddr)> = Vec::new();
    for t in tasks {
        let (node, ips) = t.await.unwrap();
        assert_eq!(ips.len(), 1);
        let (ip, cidr) = ips[0];
        assert!(seen.insert(ip), "{ip} handed out twice");
        assert!(cidr.contains(&ip), "{ip} reported in block {cidr}");
        given.push((node, cidr, ip));
    }
    let blocks = objects::blocks(&*s).await.unwrap();
    // Each address lies in the block reported with it, and that block is its node's.
    for (node, cidr, ip) in &given {
        let (b, _) = blocks
            .iter()
            .find(|(b, _)| b.spec.cidr == *cidr)
            .unwrap_or_else(|| panic!("{ip}: block {cidr} is not stored"));
        assert_eq!(
            trellis_ipam::cluster::block_node(&b.spec),
            Some(node.as_str())
        );
    }
    for (b, _) in &blocks {
        let node = trellis_ipam::cluster::block_node(&b.spec).unwrap();
        for (_, attr) in trellis_ipam::cluster::allocations(&b.spec) {
            assert_eq!(
                attr.secondary.get("node").map(String::as_str),
                Some(node),
                "address outside its node's blocks"
            );
        }
    }
    assert_eq!(blocks.len(), 4, "50 pods per node fit in one /26 each");
    assert!(report::check(&*s).await.unwrap().is_empty());
    // Repeating an allocation returns the same address.
    let again = NodeIpam::new(s.clone(), "node0", BTreeMap::new())
        .allocate(&req("node0", 3))
        .await
        .unwrap();
    assert!(seen.contains(&again[0].0));
    // Release everything; blocks empty, then GC after the grace period deletes them.
    for n in &nodes {
        let ipam = NodeIpam::new(s.clone(), n, BTreeMap::new()).with_clock(clock.clone());
        for i in 0..50 {
            assert_eq!(ipam.release(&req(n, i)).await.unwrap().len(), 1);
            assert!(
                ipam.release(&req(n, i)).await.unwrap().is_empty(),
                "release is idempotent"
            );
        }
    }
    let (pools, _) = report::show(&*s).await.unwrap();
    assert_eq!(pools[0].used, 0);
    assert!(objects::endpoints(&*s).await.unwrap().is_empty());
    // The blocks became empty now: within the grace period neither the agent nor GC takes
    // them; once it has passed, node0's agent gives its block back and GC the other three.
    let ipam = NodeIpam::new(s.clone(), "node0", BTreeMap::new()).with_clock(clock.clone());
    let grace = Duration::from_secs(3600);
    assert!(ipam.release_empty_blocks(grace).await.unwrap().is_empty());
    let g = report::gc(&*s, clock.now_secs(), 3600, &GcScope::All)
        .await
        .unwrap();
    assert!(g.deleted_blocks.is_empty(), "{g:?}");
    clock.advance(3599);
    assert!(ipam.release_empty_blocks(grace).await.unwrap().is_empty());
    clock.advance(1);
    assert_eq!(ipam.release_empty_blocks(grace).await.unwrap().len(), 1);
    let g = report::gc(&*s, clock.now_secs(), 3600, &GcScope::All)
        .await
        .unwrap();
    assert_eq!(g.deleted_blocks.len(), 3, "{g:?}");
    assert!(objects::blocks(&*s).await.unwrap().is_empty());
    assert!(objects::affinities(&*s).await.unwrap().is_empty());
    assert!(report::check(&*s).await.unwrap().is_empty());
}

async fn fixed_reserved_strict_and_node_removal(s: Arc<dyn Datastore>) {
    apply(&*s, "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: small\nspec:\n  cidr: 10.60.0.0/29\n  blockSize: 30\n---\napiVersion: trellis.dev/v1\nkind: IPReservation\nmetadata:\n  name: r\nspec:\n  reservedCIDRs: [10.60.0.1]\n").await;
    apply(&*s, &node_yaml("a")).await;
    apply(&*s, &node_yaml("b")).await;
    let clock = ManualClock::new();
    let a = NodeIpam::new(s.clone(), "a", BTreeMap::new()).with_clock(clock.clone());
    let b = NodeIpam::new(s.clone(), "b", BTreeMap::new()).with_clock(clock.clone());
    let mut fixed = req("a", 0);
    fixed.requested_ips = vec!["10.60.0.6".parse().unwrap()];
    assert_eq!(
        a.allocate(&fixed).await.unwrap()[0].0.to_string(),
        "10.60.0.6"
    );
    let mut clash = req("b", 0);
    clash.requested_ips = vec!["10.60.0.6".parse().unwrap()];
    assert!(b
        .allocate(&clash)
        .await
        .unwrap_err()
        .to_string()
        .contains("already allocated"));
    let mut reserved = req("b", 1);
    reserved.requested_ips = vec!["10.60.0.1".parse().unwrap()];
    assert!(b
        .allocate(&reserved)
        .await
        .unwrap_err()
        .to_string()
        .contains("reserved"));
    let mut outside = req("b", 2);
    outside.requested_ips = vec!["10.99.0.1".parse().unwrap()];
    assert!(b
        .allocate(&outside)
        .await
        .unwrap_err()
        .to_string()
        .contains("not inside any pool"));
    // Node a holds block .4/30 (fixed IP); b claims .0/30 (.1 reserved → .0, .2, .3).
    let got: Vec<_> = futures_all(&b, 3).await;
    assert_eq!(got.len(), 3);
    // b's block is full; with strict affinity b may not borrow from a's block. The agent
    // caches settings for two seconds: the clock moves past that.
    apply(&*s, &common::ipam_config_yaml(true, None)).await;
    clock.advance(3);
    let err = b.allocate(&req("b", 10)).await.unwrap_err();
    assert!(err.to_string().contains("strictAffinity"), "{err}");
    apply(&*s, &common::ipam_config_yaml(false, None)).await;
    clock.advance(3);
    let borrowed = b.allocate(&req("b", 10)).await.unwrap();
    assert!(
        "10.60.0.4/30"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&borrowed[0].0),
        "borrowed from a's block"
    );
    // Node a goes away: GC releases its attachments and its block keeps b's borrowed address.
    objects::delete(&*s, trellis_resources::Kind::Node, None, "a")
        .await
        .unwrap();
    let problems = report::check(&*s).await.unwrap();
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, report::Problem::BlockOfMissingNode { .. })),
        "{problems:?}"
    );
    let g = report::gc(&*s, clock.now_secs(), 0, &GcScope::All)
        .await
        .unwrap();
    assert_eq!(g.released_handles.len(), 1, "{g:?}");
    let held: Vec<_> = objects::handles(&*s)
        .await
        .unwrap()
        .into_iter()
        .map(|(h, _)| h.spec.handle_id)
        .collect();
    assert_eq!(held.len(), 4, "b's handles survive: {held:?}");
}

async fn futures_all(ipam: &NodeIpam, n: usize) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(ipam.allocate(&req("b", 100 + i)).await.unwrap()[0].0);
    }
    out
}

/// Issue 9 item 2: two requested addresses of one family are refused with an error naming the
/// field, and nothing is stored; one per family is recorded, both addresses.
async fn one_address_per_family(s: Arc<dyn Datastore>) {
    apply(&*s, &common::pool_yaml("v4", "10.80.0.0/24", 26)).await;
    apply(&*s, &common::pool_yaml("v6", "fd80::/120", 122)).await;
    apply(&*s, &node_yaml("n")).await;
    let ipam = NodeIpam::new(s.clone(), "n", BTreeMap::new());
    let ip = |t: &str| t.parse::<std::net::IpAddr>().unwrap();
    let mut r = req("n", 0);
    r.requested_ips = vec![ip("10.80.0.5"), ip("10.80.0.6")];
    let before = s.list("/trellis/v1/").await.unwrap().items;
    let err = ipam.allocate(&r).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClusterError::Ipam(ClusterIpamError::TooManyRequested { family: 4, .. })
        ),
        "{err}"
    );
    assert!(err.to_string().starts_with("ips "), "{err}");
    assert_eq!(s.list("/trellis/v1/").await.unwrap().items, before);
    // One of each family: both recorded under the handle, in one transaction.
    r.requested_ips = vec![ip("10.80.0.5"), ip("fd80::5")];
    let got: Vec<_> = ipam
        .allocate(&r)
        .await
        .unwrap()
        .into_iter()
        .map(|(i, _)| i)
        .collect();
    assert_eq!(got, r.requested_ips);
    let live = BTreeMap::from([(r.handle(), got)]);
    common::verify_ledger(&*s, &live).await.unwrap();
}

/// Issue 9 item 3: a requested address in another node's block does not make that block the
/// node's own — later allocations neither borrow from it under strictAffinity nor count it
/// toward maxBlocksPerHost.
async fn foreign_blocks_stay_out_of_the_cache(s: Arc<dyn Datastore>) {
    // Four blocks of four addresses; strict affinity; at most two blocks per node.
    apply(&*s, &common::pool_yaml("p", "10.81.0.0/28", 30)).await;
    apply(&*s, &common::ipam_config_yaml(true, Some(2))).await;
    apply(&*s, &node_yaml("a")).await;
    apply(&*s, &node_yaml("b")).await;
    let a = NodeIpam::new(s.clone(), "a", BTreeMap::new());
    let b = NodeIpam::new(s.clone(), "b", BTreeMap::new());
    let b_block: ipnet::IpNet = "10.81.0.0/30".parse().unwrap();
    assert_eq!(b.allocate(&req("b", 0)).await.unwrap()[0].1, b_block);
    let mut fixed = req("a", 0);
    fixed.requested_ips = vec!["10.81.0.1".parse().unwrap()];
    assert_eq!(a.allocate(&fixed).await.unwrap()[0].1, b_block);
    // a's next addresses come from blocks of its own: two of them (b's does not count).
    let mut own = BTreeMap::<ipnet::IpNet, usize>::new();
    for i in 1..=8 {
        let (ip, cidr) = a.allocate(&req("a", i)).await.unwrap()[0];
        assert!(!b_block.contains(&ip), "a took {ip} from b's block");
        *own.entry(cidr).or_default() += 1;
    }
    assert_eq!(own.len(), 2, "{own:?}");
    for cidr in own.keys() {
        let blocks = objects::blocks(&*s).await.unwrap();
        let (blk, _) = blocks.iter().find(|(x, _)| x.spec.cidr == *cidr).unwrap();
        assert_eq!(trellis_ipam::cluster::block_node(&blk.spec), Some("a"));
    }
    // The limit holds: a third block is not claimed.
    let err = a.allocate(&req("a", 9)).await.unwrap_err();
    assert!(err.to_string().contains("strictAffinity"), "{err}");
    assert!(report::check(&*s).await.unwrap().is_empty());
}

fn attachment(network: &str, cid: &str) -> trellis_cluster::ipam::Request {
    trellis_cluster::ipam::Request {
        network: network.into(),
        container_id: cid.into(),
        ifname: "eth0".into(),
        namespace: Some("default".into()),
        ..Default::default()
    }
}

/// Issue 9 item 4: full container IDs in endpoint names, unambiguous handles, CNI GC matched on
/// the attachment (network `k8s` never touches `k8s.v2`), and records of the older format still
/// found, kept apart and released by DEL and GC.
async fn attachment_identities(s: Arc<dyn Datastore>) {
    apply(&*s, &common::pool_yaml("p", "10.82.0.0/24", 26)).await;
    apply(&*s, &node_yaml("n")).await;
    let ipam = NodeIpam::new(s.clone(), "n", BTreeMap::new());
    let mut live = BTreeMap::new();
    let mut add = async |r: &trellis_cluster::ipam::Request| {
        let ips: Vec<_> = ipam
            .allocate(r)
            .await
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        live.insert(r.handle(), ips.clone());
        ips
    };
    // Two containers whose IDs share their first 12 characters, and two attachments whose old
    // handles were the same string.
    let p1 = attachment("k8s", "abcdefghijkl-1");
    let p2 = attachment("k8s", "abcdefghijkl-2");
    let dot1 = attachment("k8s", "v2.c");
    let dot2 = attachment("k8s.v2", "c");
    let long = attachment("k8s", &"f".repeat(300));
    for r in [&p1, &p2, &dot1, &dot2, &long] {
        add(r).await;
    }
    assert_ne!(live[&dot1.handle()], live[&dot2.handle()]);
    assert_eq!(objects::endpoints(&*s).await.unwrap().len(), 5);
    common::verify_ledger(&*s, &live).await.unwrap();
    assert_eq!(
        ipam.release(&p1).await.unwrap(),
        live.remove(&p1.handle()).unwrap()
    );
    let names: Vec<String> = objects::endpoints(&*s)
        .await
        .unwrap()
        .into_iter()
        .map(|(w, _)| w.metadata.name)
        .collect();
    assert!(
        names.contains(&"n.abcdefghijkl-2.eth0".to_string()),
        "{names:?}"
    );
    common::verify_ledger(&*s, &live).await.unwrap();

    // Records of the older format: network k8s.v2 / container old, and network k8s /
    // container v3.x — whose legacy handle a DEL of network k8s.v3 / container x would compute.
    let old_v2 = attachment("k8s.v2", "old");
    let old_k8s = attachment("k8s", "v3.x");
    common::write_legacy(&*s, "n", &old_v2, "10.82.0.40").await;
    common::write_legacy(&*s, "n", &old_k8s, "10.82.0.41").await;
    let legacy = |r: &trellis_cluster::ipam::Request| {
        trellis_ipam::cluster::legacy_handle_id(&r.network, &r.container_id, &r.ifname)
    };
    live.insert(legacy(&old_v2), vec!["10.82.0.40".parse().unwrap()]);
    live.insert(legacy(&old_k8s), vec!["10.82.0.41".parse().unwrap()]);
    common::verify_ledger(&*s, &live).await.unwrap();
    // A repeated ADD of a legacy attachment returns what it holds.
    assert_eq!(
        ipam.allocate(&old_v2).await.unwrap()[0].0.to_string(),
        "10.82.0.40"
    );
    // DEL of the other attachment sharing the legacy string releases nothing of it.
    let imposter = attachment("k8s.v3", "x");
    assert_eq!(legacy(&imposter), legacy(&old_k8s));
    assert!(ipam.release(&imposter).await.unwrap().is_empty());
    common::verify_ledger(&*s, &live).await.unwrap();

    // CNI GC of network k8s keeping p2: releases dot1, long and the legacy k8s attachment —
    // nothing of k8s.v2.
    let keep = [(
        "k8s".to_string(),
        p2.container_id.clone(),
        "eth0".to_string(),
    )];
    let mut released = trellis_cluster::ipam::release_unlisted(&*s, "n", "k8s", &keep, 1)
        .await
        .unwrap();
    released.sort();
    let mut want: Vec<_> = [&dot1.handle(), &long.handle(), &legacy(&old_k8s)]
        .into_iter()
        .flat_map(|h| live.remove(h).unwrap())
        .collect();
    want.sort();
    assert_eq!(released, want);
    common::verify_ledger(&*s, &live).await.unwrap();
    // GC of k8s.v2 releases both of its attachments, the legacy one included.
    let released = trellis_cluster::ipam::release_unlisted(&*s, "n", "k8s.v2", &[], 1)
        .await
        .unwrap();
    assert_eq!(released.len(), 2, "{released:?}");
    live.remove(&dot2.handle());
    live.remove(&legacy(&old_v2));
    common::verify_ledger(&*s, &live).await.unwrap();
    // DEL of the last one leaves nothing.
    assert_eq!(ipam.release(&p2).await.unwrap().len(), 1);
    assert!(objects::endpoints(&*s).await.unwrap().is_empty());
    assert!(objects::handles(&*s).await.unwrap().is_empty());
    assert!(report::check(&*s).await.unwrap().is_empty());
}

/// DEL of a legacy attachment (not through GC) releases it.
async fn legacy_records_released_by_del(s: Arc<dyn Datastore>) {
    apply(&*s, &common::pool_yaml("p", "10.83.0.0/24", 26)).await;
    apply(&*s, &node_yaml("n")).await;
    let ipam = NodeIpam::new(s.clone(), "n", BTreeMap::new());
    ipam.allocate(&attachment("k8s", "seed")).await.unwrap();
    let old = attachment("net.v1", "c.1");
    common::write_legacy(&*s, "n", &old, "10.83.0.9").await;
    assert_eq!(
        ipam.release(&old).await.unwrap(),
        vec!["10.83.0.9".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(ipam.release(&old).await.unwrap().is_empty(), "idempotent");
    assert_eq!(objects::endpoints(&*s).await.unwrap().len(), 1);
    assert!(report::check(&*s).await.unwrap().is_empty());
}

/// `delete node` of a node with 70 pods in one block: released in one run, in transactions
/// within etcd's 128-operation limit, each block written once per transaction.
async fn delete_node_with_many_pods(s: Arc<dyn Datastore>) {
    apply(&*s, &common::pool_yaml("p", "10.84.0.0/24", 25)).await;
    apply(&*s, &node_yaml("big")).await;
    apply(&*s, &node_yaml("other")).await;
    let big = NodeIpam::new(s.clone(), "big", BTreeMap::new());
    for i in 0..70 {
        big.allocate(&req("big", i)).await.unwrap();
    }
    let other = NodeIpam::new(s.clone(), "other", BTreeMap::new());
    let kept = other.allocate(&req("other", 0)).await.unwrap();
    objects::delete(&*s, trellis_resources::Kind::Node, None, "big")
        .await
        .unwrap();
    let scope = GcScope::Node("big".into());
    let g = report::gc(&*s, 1, u64::MAX, &scope).await.unwrap();
    assert_eq!(g.released_handles.len(), 70, "{g:?}");
    assert_eq!(g.deleted_blocks.len(), 1, "{g:?}");
    assert_eq!(g.conflicts, 0, "{g:?}");
    let live = BTreeMap::from([(req("other", 0).handle(), vec![kept[0].0])]);
    common::verify_ledger(&*s, &live).await.unwrap();
    assert_eq!(objects::endpoints(&*s).await.unwrap().len(), 1);
}

both!(burst_four_nodes);
both!(fixed_reserved_strict_and_node_removal);
both!(one_address_per_family);
both!(foreign_blocks_stay_out_of_the_cache);
both!(attachment_identities);
both!(legacy_records_released_by_del);
both!(delete_node_with_many_pods);

#[tokio::test]
async fn corrupt_records_are_named() {
    let (s, _b) = common::sqlite().await;
    s.txn(
        vec![],
        vec![trellis_store::TxnOp::Put(
            "/trellis/v1/ippools/bad".into(),
            b"{\"nope\":1}".to_vec(),
        )],
    )
    .await
    .unwrap();
    // One bad record does not fail the listing (issue 9.10); it is skipped and named.
    assert!(objects::pools(&*s).await.unwrap().is_empty());
    let l = objects::list_checked(&*s, trellis_resources::Kind::IpPool)
        .await
        .unwrap();
    assert_eq!(l.invalid[0].key, "/trellis/v1/ippools/bad", "{l:?}");
}
