//! Hostile review of the IPAM invariant ("an address is recorded for at most one live
//! attachment"), on both stores: each test is a reproduction of a way it broke.
//!
//! - Blocks of another size: a pool deleted and created again with another `blockSize` (Calico's
//!   documented way to change it) while its blocks still hold addresses; an undecodable block
//!   record; an allocator whose cached pool settings are stale while another node claims a block
//!   of the new pool — at every datastore call of the allocation.
//! - Names: a new handle equal to another attachment's legacy handle, a legacy lookup matching
//!   an endpoint of another network, a pod whose handle is the agent's VTEP handle.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use common::{apply, node_yaml, pool_yaml, req, verify_ledger, Armed, Hook, ManualClock};
use ipnet::IpNet;
use trellis_cluster::ipam::{NodeIpam, Request};
use trellis_cluster::{objects, ClusterError};
use trellis_ipam::cluster::ClusterIpamError;
use trellis_resources::Kind;
use trellis_store::{Datastore, TxnOp};

type Ledger = BTreeMap<String, Vec<IpAddr>>;

fn ips(got: Vec<(IpAddr, IpNet)>) -> Vec<IpAddr> {
    got.into_iter().map(|(ip, _)| ip).collect()
}

async fn add(ipam: &NodeIpam, r: &Request, live: &mut Ledger) -> Vec<IpAddr> {
    let got = ips(ipam.allocate(r).await.unwrap());
    live.insert(r.handle(), got.clone());
    got
}

fn attachment(network: &str, cid: &str) -> Request {
    Request {
        network: network.into(),
        container_id: cid.into(),
        ifname: "eth0".into(),
        namespace: Some("default".into()),
        ..Default::default()
    }
}

/// A pool deleted while its blocks hold addresses, then created again over the same range with
/// another block size: neither a new block nor a requested address may overlap the old blocks.
async fn pool_recreated_with_another_block_size(s: Arc<dyn Datastore>) {
    apply(&*s, &pool_yaml("p1", "10.93.0.0/24", 26)).await;
    apply(&*s, &node_yaml("a")).await;
    apply(&*s, &node_yaml("b")).await;
    let mut live = Ledger::new();
    let a = NodeIpam::new(s.clone(), "a", BTreeMap::new());
    add(&a, &req("a", 0), &mut live).await;
    add(&a, &req("a", 1), &mut live).await;
    objects::delete(&*s, Kind::IpPool, None, "p1")
        .await
        .unwrap();
    apply(&*s, &pool_yaml("p2", "10.93.0.0/24", 28)).await;
    let b = NodeIpam::new(s.clone(), "b", BTreeMap::new());
    let got = add(&b, &req("b", 0), &mut live).await;
    let old: IpNet = "10.93.0.0/26".parse().unwrap();
    assert!(
        !old.contains(&got[0]),
        "b was given {got:?} inside a's block {old}"
    );
    verify_ledger(&*s, &live).await.unwrap();
    // A requested address held in the old block is in use, whatever the new block size.
    let mut fixed = req("b", 1);
    fixed.requested_ips = vec![live[&req("a", 1).handle()][0]];
    match b.allocate(&fixed).await {
        Err(ClusterError::Ipam(ClusterIpamError::InUse { .. })) => {}
        other => panic!("requested address held by a: {other:?}"),
    }
    // A free address of the old block is taken in the old block.
    let mut free = req("b", 2);
    free.requested_ips = vec!["10.93.0.9".parse().unwrap()];
    let got = b.allocate(&free).await.unwrap();
    assert_eq!(got[0].1, old, "{got:?}");
    live.insert(free.handle(), ips(got));
    verify_ledger(&*s, &live).await.unwrap();
}

/// An undecodable record at a block's key stands for that block: the allocator claims around
/// it (no block of another size over it, and no retrying the same key until it gives up).
async fn undecodable_block_is_claimed_around(s: Arc<dyn Datastore>) {
    let bad = trellis_resources::key_for(Kind::IpamBlock, None, "10-96-0-0-26");
    s.txn(
        vec![],
        vec![TxnOp::Put(bad, b"{\"written by\": 0}".to_vec())],
    )
    .await
    .unwrap();
    apply(&*s, &node_yaml("a")).await;
    apply(&*s, &pool_yaml("p", "10.96.0.0/24", 26)).await;
    let a = NodeIpam::new(s.clone(), "a", BTreeMap::new());
    let got = a.allocate(&req("a", 0)).await.unwrap();
    assert_eq!(got[0].1.to_string(), "10.96.0.64/26", "{got:?}");
    objects::delete(&*s, Kind::IpPool, None, "p").await.unwrap();
    apply(&*s, &pool_yaml("p2", "10.96.0.0/24", 28)).await;
    let b = NodeIpam::new(s.clone(), "b", BTreeMap::new());
    apply(&*s, &node_yaml("b")).await;
    let got = b.allocate(&req("b", 0)).await.unwrap();
    let bad: IpNet = "10.96.0.0/26".parse().unwrap();
    assert!(
        !bad.contains(&got[0].0),
        "{got:?} inside the unreadable block {bad}"
    );
}

/// Node `a` has cached pool `p1` (blockSize 29) and filled its block; `p1` is deleted and `p2`
/// (blockSize 30) created over the range. Before each of `a`'s datastore calls while it claims
/// a new block from its stale settings, node `b` claims a block of `p2`: the two must never
/// overlap, whichever call the claim lands before.
async fn stale_pool_settings_against_a_new_pool(s: Arc<dyn Datastore>) {
    let clock = ManualClock::new();
    for k in 0.. {
        common::wipe(&*s).await;
        apply(&*s, &pool_yaml("p1", "10.94.0.0/24", 29)).await;
        apply(&*s, &node_yaml("a")).await;
        apply(&*s, &node_yaml("b")).await;
        let armed = Armed::new(s.clone());
        let a = NodeIpam::new(armed.clone(), "a", BTreeMap::new()).with_clock(clock.clone());
        let mut live = Ledger::new();
        for i in 0..8 {
            add(&a, &req("a", i), &mut live).await;
        }
        objects::delete(&*s, Kind::IpPool, None, "p1")
            .await
            .unwrap();
        apply(&*s, &pool_yaml("p2", "10.94.0.0/24", 30)).await;
        let live = Arc::new(tokio::sync::Mutex::new(live));
        let (s2, live2) = (s.clone(), live.clone());
        let hook: Hook = Box::new(move || {
            Box::pin(async move {
                let b = NodeIpam::new(s2, "b", BTreeMap::new());
                add(&b, &req("b", 0), &mut *live2.lock().await).await;
            })
        });
        let start = armed.calls();
        armed.arm(k, hook).await;
        let got = a.allocate(&req("a", 8)).await.unwrap();
        if !armed.fired().await {
            assert!(k > 3, "a made only {k} calls");
            break; // every position was tried
        }
        let landed = armed.call(start + k);
        eprintln!("  b's claim before a's call {k} ({landed}): a got {got:?}");
        let mut live = live.lock().await;
        live.insert(req("a", 8).handle(), ips(got));
        if let Err(e) = verify_ledger(&*s, &live).await {
            panic!("b's claim before a's call {k} ({landed}): {e}");
        }
    }
}

/// A new-format handle that is another attachment's legacy handle: network `k8s`, container
/// `a.b` is `k8s.a_2Eb.eth0` today — the legacy handle of container `a_2Eb`; and network
/// `k8s.v2`, container `c` is `k8s_2Ev2.c.eth0` — the legacy handle of network `k8s_2Ev2` with
/// the same container and interface.
async fn new_handle_equal_to_a_legacy_one(s: Arc<dyn Datastore>) {
    apply(&*s, &pool_yaml("p", "10.97.0.0/24", 26)).await;
    apply(&*s, &node_yaml("n")).await;
    let ipam = NodeIpam::new(s.clone(), "n", BTreeMap::new());
    let mut live = Ledger::new();
    add(&ipam, &attachment("k8s", "seed"), &mut live).await;
    let cases = [
        (
            attachment("k8s", "a_2Eb"),
            attachment("k8s", "a.b"),
            "10.97.0.40",
        ),
        (
            attachment("k8s_2Ev2", "c"),
            attachment("k8s.v2", "c"),
            "10.97.0.41",
        ),
    ];
    for (old, _, ip) in &cases {
        common::write_legacy(&*s, "n", old, ip).await;
        let legacy =
            trellis_ipam::cluster::legacy_handle_id(&old.network, &old.container_id, "eth0");
        live.insert(legacy, vec![ip.parse().unwrap()]);
    }
    for (old, new, _) in &cases {
        let legacy =
            trellis_ipam::cluster::legacy_handle_id(&old.network, &old.container_id, "eth0");
        assert_eq!(new.handle(), legacy, "the names collide");
        match ipam.allocate(new).await {
            Err(ClusterError::HandleTaken { handle, .. }) => assert_eq!(handle, legacy),
            other => panic!("ADD of {} over the legacy handle: {other:?}", new.handle()),
        }
        assert_eq!(ipam.release(new).await.unwrap(), Vec::<IpAddr>::new());
        verify_ledger(&*s, &live).await.unwrap();
    }
    // The legacy attachments themselves are still found and released.
    for (old, _, _) in &cases {
        let legacy =
            trellis_ipam::cluster::legacy_handle_id(&old.network, &old.container_id, "eth0");
        assert_eq!(ipam.allocate(old).await.unwrap()[0].0, live[&legacy][0]);
        assert_eq!(
            ipam.release(old).await.unwrap(),
            live.remove(&legacy).unwrap()
        );
        verify_ledger(&*s, &live).await.unwrap();
    }
}

/// A legacy lookup must not match a new-format record of another network: network `k8s_2Ev2`'s
/// legacy handle is network `k8s.v2`'s handle today, with the same container and interface.
async fn legacy_lookup_checks_the_network(s: Arc<dyn Datastore>) {
    apply(&*s, &pool_yaml("p", "10.98.0.0/24", 26)).await;
    apply(&*s, &node_yaml("n")).await;
    let ipam = NodeIpam::new(s.clone(), "n", BTreeMap::new());
    let mut live = Ledger::new();
    let w = attachment("k8s.v2", "c");
    add(&ipam, &w, &mut live).await;
    // In another namespace, so that the endpoint names differ.
    let r = Request {
        namespace: Some("other".into()),
        ..attachment("k8s_2Ev2", "c")
    };
    assert_eq!(
        trellis_ipam::cluster::legacy_handle_id(&r.network, &r.container_id, &r.ifname),
        w.handle()
    );
    assert_eq!(ipam.release(&r).await.unwrap(), Vec::<IpAddr>::new());
    verify_ledger(&*s, &live).await.unwrap();
    let got = add(&ipam, &r, &mut live).await;
    assert_ne!(got, live[&w.handle()]);
    verify_ledger(&*s, &live).await.unwrap();
}

/// A pod whose attachment names the agent's tunnel address (network `trellis-tunnel`, the node
/// name as container, interface `vxlan`) gets neither the VTEP's address nor frees it.
async fn pod_named_like_the_vtep(s: Arc<dyn Datastore>) {
    apply(&*s, &pool_yaml("p", "10.99.0.0/24", 26)).await;
    apply(&*s, &node_yaml("n")).await;
    let ipam = NodeIpam::new(s.clone(), "n", BTreeMap::new());
    let vtep = Request {
        network: "trellis-tunnel".into(),
        container_id: "n".into(),
        ifname: "vxlan".into(),
        no_endpoint: true,
        ..Default::default()
    };
    let mut live = Ledger::new();
    add(&ipam, &vtep, &mut live).await;
    let pod = Request {
        no_endpoint: false,
        namespace: Some("default".into()),
        ..vtep.clone()
    };
    assert_eq!(ipam.release(&pod).await.unwrap(), Vec::<IpAddr>::new());
    verify_ledger(&*s, &live).await.unwrap();
    match ipam.allocate(&pod).await {
        Err(ClusterError::HandleTaken { .. }) => {}
        other => panic!("the pod's ADD: {other:?}"),
    }
    verify_ledger(&*s, &live).await.unwrap();
}

/// Two attachments of one container and interface on one node, in two networks, share the
/// endpoint name (node, container, interface — as Calico's): the second ADD must not overwrite
/// the first's endpoint (the first's DEL would then delete the second's, and the first's handle
/// would no longer be provably its own). An endpoint left behind by a handle that is gone is
/// replaced.
async fn one_endpoint_name_two_networks(s: Arc<dyn Datastore>) {
    apply(&*s, &pool_yaml("p", "10.100.0.0/24", 26)).await;
    apply(&*s, &node_yaml("n")).await;
    let ipam = NodeIpam::new(s.clone(), "n", BTreeMap::new());
    let mut live = Ledger::new();
    let first = attachment("net1", "c");
    let second = attachment("net2", "c");
    add(&ipam, &first, &mut live).await;
    match ipam.allocate(&second).await {
        Err(ClusterError::EndpointTaken { handle, .. }) => assert_eq!(handle, first.handle()),
        other => panic!("ADD of the second network: {other:?}"),
    }
    verify_ledger(&*s, &live).await.unwrap();
    assert_eq!(
        ipam.release(&first).await.unwrap(),
        live.remove(&first.handle()).unwrap()
    );
    assert!(objects::endpoints(&*s).await.unwrap().is_empty());
    verify_ledger(&*s, &live).await.unwrap();
    // An endpoint whose handle an operator deleted, its address freed as leaked.
    let ip = add(&ipam, &second, &mut live).await[0];
    let hkey = trellis_resources::key_for(Kind::IpamHandle, None, &second.handle());
    s.txn(vec![], vec![TxnOp::Delete(hkey)]).await.unwrap();
    live.remove(&second.handle());
    trellis_cluster::ipam::release_ip(&*s, ip, 1)
        .await
        .unwrap()
        .unwrap();
    add(&ipam, &first, &mut live).await;
    let eps = objects::endpoints(&*s).await.unwrap();
    assert_eq!(eps.len(), 1);
    assert_eq!(
        eps[0]
            .0
            .metadata
            .annotations
            .get(trellis_cluster::ipam::NETWORK_ANNOTATION),
        Some(&"net1".to_string())
    );
    verify_ledger(&*s, &live).await.unwrap();
    // The same attachment's own endpoint left behind by its handle: its ADD replaces it.
    let ip = live.remove(&first.handle()).unwrap()[0];
    let hkey = trellis_resources::key_for(Kind::IpamHandle, None, &first.handle());
    s.txn(vec![], vec![TxnOp::Delete(hkey)]).await.unwrap();
    trellis_cluster::ipam::release_ip(&*s, ip, 1)
        .await
        .unwrap()
        .unwrap();
    add(&ipam, &first, &mut live).await;
    assert_eq!(objects::endpoints(&*s).await.unwrap().len(), 1);
    verify_ledger(&*s, &live).await.unwrap();
}

/// `ipam gc` of a block (blockSize 24) holding 140 leaked addresses, each of its own missing
/// handle: each release is guarded by the absence of every handle it judged missing, and etcd
/// takes at most 128 comparisons per transaction — GC must split the work, not fail forever.
async fn gc_of_many_leaks_in_one_block(s: Arc<dyn Datastore>) {
    apply(&*s, &pool_yaml("p", "10.101.0.0/24", 24)).await;
    apply(&*s, &node_yaml("n")).await;
    let ipam = NodeIpam::new(s.clone(), "n", BTreeMap::new());
    for i in 0..140 {
        ipam.allocate(&req("n", i)).await.unwrap();
    }
    let mut doomed = Vec::new();
    for kind in [Kind::IpamHandle, Kind::WorkloadEndpoint] {
        let listing = s.list(&kind.prefix()).await.unwrap();
        doomed.extend(listing.items.into_iter().map(|kv| kv.key));
    }
    assert_eq!(doomed.len(), 280);
    for chunk in doomed.chunks(100) {
        let ops = chunk.iter().map(|k| TxnOp::Delete(k.clone())).collect();
        s.txn(vec![], ops).await.unwrap();
    }
    let scope = trellis_cluster::report::GcScope::All;
    let g = trellis_cluster::report::gc(&*s, 1, u64::MAX, &scope)
        .await
        .unwrap();
    assert_eq!(g.released_leaks.len(), 140, "{g:?}");
    assert_eq!(g.conflicts, 0, "{g:?}");
    verify_ledger(&*s, &Ledger::new()).await.unwrap();
}

/// IPAM's own records are written only by IPAM: a generic `delete ipamhandle` of a live pod's
/// handle made `ipam gc` free its address for the next ADD; `delete ipamblock` let the next ADD
/// create the block again and hand out its first address twice; `apply` of a block read earlier
/// (`get -o yaml`, edited, applied back) dropped the allocations made since.
async fn ipam_records_are_not_written_by_hand(s: Arc<dyn Datastore>) {
    apply(&*s, &pool_yaml("p", "10.102.0.0/24", 26)).await;
    apply(&*s, &node_yaml("n")).await;
    let ipam = NodeIpam::new(s.clone(), "n", BTreeMap::new());
    let mut live = Ledger::new();
    add(&ipam, &req("n", 0), &mut live).await;
    let (block, _) = objects::blocks(&*s).await.unwrap().remove(0);
    let handle = req("n", 0).handle();
    let affinity = objects::affinities(&*s).await.unwrap().remove(0).0;
    for (kind, name) in [
        (Kind::IpamHandle, handle.as_str()),
        (Kind::IpamBlock, block.metadata.name.as_str()),
        (Kind::BlockAffinity, affinity.metadata.name.as_str()),
    ] {
        match objects::delete(&*s, kind, None, name).await {
            Err(ClusterError::Invalid(e)) => assert_eq!(e.field, "kind", "{e}"),
            other => panic!("delete {kind} {name}: {other:?}"),
        }
    }
    add(&ipam, &req("n", 1), &mut live).await;
    let stale = trellis_resources::Resource::IpamBlock(block);
    match objects::apply(&*s, &stale, false).await {
        Err(ClusterError::Invalid(e)) => assert_eq!(e.field, "kind", "{e}"),
        other => panic!("apply of a stale block: {other:?}"),
    }
    let scope = trellis_cluster::report::GcScope::All;
    trellis_cluster::report::gc(&*s, 1, u64::MAX, &scope)
        .await
        .unwrap();
    add(&ipam, &req("n", 2), &mut live).await;
    verify_ledger(&*s, &live).await.unwrap();
}

/// Settings changing while an allocation decides from them (cached up to two seconds): before
/// each of node `b`'s datastore calls, an IPReservation of the address it would take is
/// created — or `strictAffinity` turned on while `b` can only borrow. The commit must not take
/// the reserved address, nor borrow once borrowing is forbidden.
async fn settings_change_during_allocation(s: Arc<dyn Datastore>) {
    let clock = ManualClock::new();
    let reserve = "apiVersion: trellis.dev/v1\nkind: IPReservation\nmetadata:\n  name: r\nspec:\n  reservedCIDRs: [10.103.0.1]\n";
    for strict in [false, true] {
        for k in 0.. {
            common::wipe(&*s).await;
            // One block of four addresses: `a` claims it, `b` can only borrow.
            apply(&*s, &pool_yaml("p", "10.103.0.0/30", 30)).await;
            apply(&*s, &node_yaml("a")).await;
            apply(&*s, &node_yaml("b")).await;
            let a = NodeIpam::new(s.clone(), "a", BTreeMap::new());
            let mut live = Ledger::new();
            add(&a, &req("a", 0), &mut live).await;
            let armed = Armed::new(s.clone());
            let b = NodeIpam::new(armed.clone(), "b", BTreeMap::new()).with_clock(clock.clone());
            // b's settings are read (and cached) before the change.
            add(&b, &req("b", 0), &mut live).await;
            b.release(&req("b", 0)).await.unwrap();
            live.remove(&req("b", 0).handle());
            let s2 = s.clone();
            let hook: Hook = Box::new(move || {
                Box::pin(async move {
                    let doc = if strict {
                        common::ipam_config_yaml(true, None)
                    } else {
                        reserve.to_string()
                    };
                    apply(&*s2, &doc).await;
                })
            });
            let start = armed.calls();
            armed.arm(k, hook).await;
            let got = b.allocate(&req("b", 1)).await;
            if !armed.fired().await {
                assert!(k > 2, "b made only {k} calls");
                break;
            }
            let landed = armed.call(start + k);
            eprintln!("  strict {strict}: change before b's call {k} ({landed}): {got:?}");
            match (strict, got) {
                (
                    true,
                    Err(ClusterError::Ipam(ClusterIpamError::Exhausted { strict: true, .. })),
                ) => {}
                (true, other) => panic!(
                    "borrowed after strictAffinity, change before call {k} ({landed}): {other:?}"
                ),
                (false, Ok(got)) => {
                    let ip: IpAddr = "10.103.0.1".parse().unwrap();
                    assert!(
                        !ips(got.clone()).contains(&ip),
                        "reserved {ip} taken, change before call {k} ({landed}): {got:?}"
                    );
                    live.insert(req("b", 1).handle(), ips(got));
                }
                (false, Err(e)) => panic!("change before call {k} ({landed}): {e}"),
            }
            verify_ledger(&*s, &live).await.unwrap();
        }
    }
}

/// A namespace the workload endpoint cannot have (CNI_ARGS K8S_POD_NAMESPACE is the runtime's
/// free text) is refused before anything is stored — it was written, and the record then did
/// not decode. And an endpoint record that does not decode does not make DEL fail forever.
async fn endpoint_records_that_do_not_decode(s: Arc<dyn Datastore>) {
    apply(&*s, &pool_yaml("p", "10.104.0.0/24", 26)).await;
    apply(&*s, &node_yaml("n")).await;
    let ipam = NodeIpam::new(s.clone(), "n", BTreeMap::new());
    let mut live = Ledger::new();
    add(&ipam, &req("n", 0), &mut live).await;
    let bad = Request {
        namespace: Some("Bad_NS/x".into()),
        ..req("n", 1)
    };
    match ipam.allocate(&bad).await {
        Err(ClusterError::Invalid(e)) => assert_eq!(e.field, "metadata.namespace", "{e}"),
        other => panic!("ADD with namespace Bad_NS/x: {other:?}"),
    }
    verify_ledger(&*s, &live).await.unwrap();
    assert_eq!(
        s.list("/trellis/v1/workloadendpoints/")
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    // The endpoint of n/0 is overwritten with garbage: its DEL still releases it.
    let ep = objects::endpoints(&*s).await.unwrap().remove(0).0;
    let key = trellis_resources::Resource::WorkloadEndpoint(ep).key();
    s.txn(vec![], vec![TxnOp::Put(key, b"garbage".to_vec())])
        .await
        .unwrap();
    assert_eq!(
        ipam.release(&req("n", 0)).await.unwrap(),
        live.remove(&req("n", 0).handle()).unwrap()
    );
    verify_ledger(&*s, &live).await.unwrap();
}

both!(pool_recreated_with_another_block_size);
both!(block_record_at_another_blocks_key);
both!(endpoint_records_that_do_not_decode);
both!(settings_change_during_allocation);
both!(ipam_records_are_not_written_by_hand);
both!(gc_of_many_leaks_in_one_block);
both!(one_endpoint_name_two_networks);
both!(undecodable_block_is_claimed_around);
both!(stale_pool_settings_against_a_new_pool);
both!(new_handle_equal_to_a_legacy_one);
both!(legacy_lookup_checks_the_network);
both!(pod_named_like_the_vtep);

/// A block record whose CIDR is not the one its key names (written directly, never by IPAM:
/// `10-97-0-64-26` holding 10.97.0.0/26, affine to `b`, empty) is as bad as one that does not
/// decode: it is skipped and named, and it stands for the block its key names. Read as a block
/// it was a second, empty copy of `a`'s block: `b` allocated from it against the real block's
/// key and could never commit (or, on a matching revision, overwrote `a`'s allocations).
async fn block_record_at_another_blocks_key(s: Arc<dyn Datastore>) {
    apply(&*s, &pool_yaml("p", "10.97.0.0/24", 26)).await;
    apply(&*s, &node_yaml("a")).await;
    apply(&*s, &node_yaml("b")).await;
    let mut live = Ledger::new();
    let a = NodeIpam::new(s.clone(), "a", BTreeMap::new());
    add(&a, &req("a", 0), &mut live).await;
    let (mut copy, _) = objects::blocks(&*s).await.unwrap().remove(0);
    assert_eq!(copy.metadata.name, "10-97-0-0-26");
    copy.metadata.name = "10-97-0-64-26".into();
    copy.spec.affinity = Some("host:b".into());
    copy.spec.allocations.iter_mut().for_each(|a| *a = None);
    copy.spec.attributes.clear();
    let copy = trellis_resources::Resource::IpamBlock(copy);
    s.txn(vec![], vec![TxnOp::Put(copy.key(), objects::encode(&copy))])
        .await
        .unwrap();
    let b = NodeIpam::new(s.clone(), "b", BTreeMap::new());
    let got = add(&b, &req("b", 0), &mut live).await;
    for taken in ["10.97.0.0/26", "10.97.0.64/26"] {
        let net: IpNet = taken.parse().unwrap();
        assert!(!net.contains(&got[0]), "b was given {got:?} inside {net}");
    }
    match objects::list_checked(&*s, Kind::IpamBlock).await {
        Ok(l) => assert!(
            l.invalid.iter().any(|i| i.key == copy.key()),
            "the record is not reported: {:?}",
            l.invalid
        ),
        Err(e) => panic!("{e}"),
    }
    add(&a, &req("a", 1), &mut live).await;
    // The ledger check refuses any unreadable block record: with the bad one gone, every live
    // attachment holds exactly its addresses.
    s.txn(vec![], vec![TxnOp::Delete(copy.key())])
        .await
        .unwrap();
    verify_ledger(&*s, &live).await.unwrap();
}
