//! IPAM garbage collection (`trellis ipam gc`, `trellis delete node`): a pure planner turns one
//! consistent [`Snapshot`] into guarded transactions, and a thin shell commits them. Each
//! transaction's preconditions cover everything its decision read — the blocks' revisions, the
//! absence of a leaked address's handle, the absence of a "gone" node, the affinities'
//! revisions — so an allocation, a release or a node registering again between the read and the
//! commit makes the commit fail, and the decision is taken again from a fresh read. There is no
//! lock. The report lists only what was committed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use trellis_ipam::cluster as alloc;
use trellis_store::{Datastore, Precondition, TxnOp, TxnOutcome};

use crate::ipam::{block_key, block_value, handle_key, node_key};
use crate::release::delete_block_txn;
use crate::snapshot::Snapshot;
use crate::Result;

/// Fresh reads per run: a conflict (someone else wrote what a decision read) costs one.
const MAX_READS: usize = 8;
/// Plans per read: each plan's commits are applied to the snapshot and the follow-ups (the
/// next handles of a block, a block emptied by a release) planned from the result.
const MAX_PLANS_PER_READ: usize = 1000;

/// What a GC run may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcScope {
    /// Everything: leaks, every missing node, every block empty past the grace period.
    All,
    /// Only what belongs to this node (`trellis delete node`).
    Node(String),
}

impl GcScope {
    fn covers(&self, node: Option<&str>) -> bool {
        match self {
            GcScope::All => true,
            GcScope::Node(n) => node == Some(n.as_str()),
        }
    }
}

/// What one planned transaction does, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GcAction {
    /// Frees addresses of `block` whose handles do not exist.
    ReleaseLeaks { block: IpNet, ips: Vec<IpAddr> },
    /// Releases attachments of a node that does not exist.
    ReleaseHandles { handles: Vec<String>, node: String },
    /// Deletes an empty block (and its affinity).
    DeleteBlock { cidr: IpNet },
    /// Deletes an affinity whose block does not exist.
    DeleteAffinity { name: String },
}

/// One guarded transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcOp {
    pub action: GcAction,
    pub preconditions: Vec<Precondition>,
    pub ops: Vec<TxnOp>,
}

/// What a GC run committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub released_handles: Vec<String>,
    pub released_leaks: Vec<IpAddr>,
    pub deleted_blocks: Vec<IpNet>,
    pub deleted_affinities: Vec<String>,
    /// Decisions still conflicting with concurrent writers when the run stopped (run again).
    pub abandoned: usize,
    /// Commits refused because something a decision read had changed (each decided again).
    pub conflicts: usize,
}

impl GcReport {
    fn record(&mut self, action: GcAction) {
        match action {
            GcAction::ReleaseLeaks { ips, .. } => self.released_leaks.extend(ips),
            GcAction::ReleaseHandles { handles, .. } => self.released_handles.extend(handles),
            GcAction::DeleteBlock { cidr } => self.deleted_blocks.push(cidr),
            GcAction::DeleteAffinity { name } => self.deleted_affinities.push(name),
        }
    }
}

/// Plans GC from `snap` at `now`: frees leaked addresses, releases attachments of missing
/// nodes, deletes empty blocks of missing nodes and blocks empty for `grace` seconds, and
/// dangling affinities. Transactions touching one block are never planned twice in one round
/// (the second would only conflict with the first); the next round takes them.
pub fn plan(snap: &Snapshot, now: u64, grace: u64, scope: &GcScope) -> Vec<GcOp> {
    let mut out = Vec::new();
    let mut touched = BTreeSet::new();
    leaks(snap, now, scope, &mut touched, &mut out);
    dead_node_handles(snap, now, scope, &mut touched, &mut out);
    empty_blocks(snap, now, grace, scope, &touched, &mut out);
    dangling_affinities(snap, scope, &mut out);
    out
}

fn leaks(
    snap: &Snapshot,
    now: u64,
    scope: &GcScope,
    touched: &mut BTreeSet<IpNet>,
    out: &mut Vec<GcOp>,
) {
    for b in &snap.blocks {
        let mut leaked: Vec<(IpAddr, String)> = alloc::allocations(&b.object.spec)
            .into_iter()
            .filter(|(_, a)| !snap.handles.contains_key(&a.handle_id))
            .filter(|(_, a)| scope.covers(a.secondary.get("node").map(String::as_str)))
            .map(|(ip, a)| (ip, a.handle_id.clone()))
            .collect();
        if leaked.is_empty() {
            continue;
        }
        // One comparison per missing handle and one for the block: the addresses of the first
        // handles that fit in a transaction now, the rest planned from its result.
        let handles: BTreeSet<String> = leaked
            .iter()
            .map(|(_, h)| h.clone())
            .take(MAX_TXN_OPS - 1)
            .collect();
        leaked.retain(|(_, h)| handles.contains(h));
        let mut spec = b.object.spec.clone();
        let mut pre = vec![Precondition::ModRevision(b.key.clone(), b.rev)];
        pre.extend(handles.iter().map(|h| Precondition::Absent(handle_key(h))));
        for (ip, _) in &leaked {
            alloc::release_ip(&mut spec, *ip, now);
        }
        touched.insert(spec.cidr);
        out.push(GcOp {
            action: GcAction::ReleaseLeaks {
                block: spec.cidr,
                ips: leaked.iter().map(|(ip, _)| *ip).collect(),
            },
            preconditions: pre,
            ops: vec![TxnOp::Put(b.key.clone(), block_value(&spec))],
        });
    }
}

/// Each handle's allocations as (block index, node recorded on the allocation).
fn holdings(snap: &Snapshot) -> BTreeMap<&str, Vec<(usize, Option<&str>)>> {
    let mut by_handle: BTreeMap<&str, Vec<(usize, Option<&str>)>> = BTreeMap::new();
    for (i, b) in snap.blocks.iter().enumerate() {
        for (_, a) in alloc::allocations(&b.object.spec) {
            let node = a.secondary.get("node").map(String::as_str);
            by_handle.entry(&a.handle_id).or_default().push((i, node));
        }
    }
    by_handle
}

/// Most comparisons, and most operations, one transaction may have: etcd's default
/// `--max-txn-ops` (it refuses a transaction with more of either).
const MAX_TXN_OPS: usize = 128;

fn dead_node_handles(
    snap: &Snapshot,
    now: u64,
    scope: &GcScope,
    touched: &mut BTreeSet<IpNet>,
    out: &mut Vec<GcOp>,
) {
    // Handles of missing nodes, by node, with the blocks holding their addresses.
    let mut dead: BTreeMap<&str, Vec<(&str, BTreeSet<usize>)>> = BTreeMap::new();
    for (id, held) in holdings(snap) {
        if !snap.handles.contains_key(id) {
            continue; // a leak: handled above
        }
        let nodes: BTreeSet<Option<&str>> = held.iter().map(|(_, n)| *n).collect();
        let [Some(node)] = nodes.into_iter().collect::<Vec<_>>()[..] else {
            continue; // no node recorded, or several: not this rule's to judge
        };
        if snap.nodes.contains(node) || !scope.covers(Some(node)) {
            continue;
        }
        let blocks: BTreeSet<usize> = held.iter().map(|(i, _)| *i).collect();
        dead.entry(node).or_default().push((id, blocks));
    }
    for (node, handles) in dead {
        let mut chunk: Vec<(&str, BTreeSet<usize>)> = Vec::new();
        // Comparisons (the node's absence first) and operations of the chunk so far.
        let mut size = (1, 0);
        for (id, blocks) in handles {
            // A block an earlier transaction of this plan writes is planned again from that
            // transaction's result (the shell applies it to the snapshot and plans again).
            let touches = |touched: &BTreeSet<IpNet>| {
                blocks
                    .iter()
                    .any(|i| touched.contains(&snap.blocks[*i].object.spec.cidr))
            };
            if touches(touched) {
                continue;
            }
            // Each handle brings its own comparison and deletion, its endpoint's, and those
            // of its blocks no earlier handle of the chunk brought.
            let has_ep = snap.handles[id]
                .object
                .spec
                .endpoint
                .as_ref()
                .is_some_and(|k| snap.endpoints.contains_key(k));
            let grows = |chunk: &[(&str, BTreeSet<usize>)]| {
                let new_blocks = blocks
                    .iter()
                    .filter(|i| !chunk.iter().any(|(_, b)| b.contains(i)))
                    .count();
                1 + usize::from(has_ep) + new_blocks
            };
            if !chunk.is_empty() && size.0.max(size.1) + grows(&chunk) > MAX_TXN_OPS {
                out.push(release_dead(snap, now, node, &chunk, touched));
                chunk.clear();
                size = (1, 0);
                if touches(touched) {
                    continue;
                }
            }
            let grows = grows(&chunk);
            chunk.push((id, blocks));
            size = (size.0 + grows, size.1 + grows);
        }
        if !chunk.is_empty() {
            out.push(release_dead(snap, now, node, &chunk, touched));
        }
    }
}

/// One transaction releasing `handles` of the missing `node`: handles and endpoints deleted,
/// their addresses freed in each block (each block written once), on condition that none of
/// it changed and the node is still absent.
fn release_dead(
    snap: &Snapshot,
    now: u64,
    node: &str,
    handles: &[(&str, BTreeSet<usize>)],
    touched: &mut BTreeSet<IpNet>,
) -> GcOp {
    let mut pre = vec![Precondition::Absent(node_key(node))];
    let mut ops = Vec::new();
    let mut blocks: BTreeMap<usize, trellis_resources::IpamBlockSpec> = BTreeMap::new();
    for (id, held) in handles {
        let h = &snap.handles[*id];
        pre.push(Precondition::ModRevision(h.key.clone(), h.rev));
        ops.push(TxnOp::Delete(h.key.clone()));
        if let Some(ep) = h
            .object
            .spec
            .endpoint
            .as_ref()
            .and_then(|k| snap.endpoints.get(k))
        {
            pre.push(Precondition::ModRevision(ep.key.clone(), ep.rev));
            ops.push(TxnOp::Delete(ep.key.clone()));
        }
        for i in held {
            let spec = blocks
                .entry(*i)
                .or_insert_with(|| snap.blocks[*i].object.spec.clone());
            alloc::release_handle(spec, id, now);
        }
    }
    for (i, spec) in blocks {
        let b = &snap.blocks[i];
        touched.insert(spec.cidr);
        pre.push(Precondition::ModRevision(b.key.clone(), b.rev));
        ops.push(TxnOp::Put(b.key.clone(), block_value(&spec)));
    }
    GcOp {
        action: GcAction::ReleaseHandles {
            handles: handles.iter().map(|(h, _)| h.to_string()).collect(),
            node: node.to_string(),
        },
        preconditions: pre,
        ops,
    }
}

fn empty_blocks(
    snap: &Snapshot,
    now: u64,
    grace: u64,
    scope: &GcScope,
    touched: &BTreeSet<IpNet>,
    out: &mut Vec<GcOp>,
) {
    for b in &snap.blocks {
        let spec = &b.object.spec;
        let node = alloc::block_node(spec);
        let node_gone = node.is_some_and(|n| !snap.nodes.contains(n));
        if !scope.covers(node) || touched.contains(&spec.cidr) {
            continue;
        }
        if alloc::used(spec) > 0 {
            if node_gone {
                // Borrowed addresses of live nodes remain; the block keeps its dead owner.
                tracing::warn!(block = %spec.cidr, "block of a missing node still holds addresses of live nodes");
            }
            continue;
        }
        if !(node_gone || alloc::releasable(spec, now, grace)) {
            continue;
        }
        let affinity_rev = node
            .and_then(|n| snap.affinities.get(&alloc::affinity_name(n, &spec.cidr)))
            .map(|a| a.rev);
        let (preconditions, ops) = delete_block_txn(spec, b.rev, affinity_rev, node_gone);
        out.push(GcOp {
            action: GcAction::DeleteBlock { cidr: spec.cidr },
            preconditions,
            ops,
        });
    }
}

fn dangling_affinities(snap: &Snapshot, scope: &GcScope, out: &mut Vec<GcOp>) {
    let blocks: BTreeSet<IpNet> = snap.blocks.iter().map(|b| b.object.spec.cidr).collect();
    for (name, a) in &snap.affinities {
        if blocks.contains(&a.object.spec.cidr) || !scope.covers(Some(&a.object.spec.node)) {
            continue;
        }
        out.push(GcOp {
            action: GcAction::DeleteAffinity { name: name.clone() },
            preconditions: vec![
                Precondition::ModRevision(a.key.clone(), a.rev),
                Precondition::Absent(block_key(&a.object.spec.cidr)),
            ],
            ops: vec![TxnOp::Delete(a.key.clone())],
        });
    }
}

/// Runs GC at `now` (seconds since the epoch): reads a snapshot, plans, commits each planned
/// transaction and applies it to the snapshot, plans again from the result, until nothing is
/// left to do. A transaction whose preconditions no longer hold changes nothing; its decision is
/// taken again from a fresh read.
pub async fn gc(store: &dyn Datastore, now: u64, grace: u64, scope: &GcScope) -> Result<GcReport> {
    let mut report = GcReport::default();
    for _ in 0..MAX_READS {
        let mut snap = Snapshot::read(store).await?;
        report.abandoned = 0;
        for _ in 0..MAX_PLANS_PER_READ {
            let ops = plan(&snap, now, grace, scope);
            if ops.is_empty() {
                return Ok(report);
            }
            for op in ops {
                match store.txn(op.preconditions, op.ops.clone()).await? {
                    TxnOutcome::Committed { revision } => {
                        snap.apply(&op.ops, revision)?;
                        report.record(op.action);
                    }
                    TxnOutcome::Conflict => {
                        report.abandoned += 1;
                        report.conflicts += 1;
                    }
                }
            }
            if report.abandoned > 0 {
                break; // read again
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::affinity_key;
    use crate::snapshot::Read;
    use trellis_resources::{
        key_for, AffinityState, BlockAffinitySpec, IpamHandleSpec, Kind, Metadata, Object,
    };

    fn read<S>(kind: Kind, name: &str, spec: S, rev: i64) -> Read<S> {
        Read {
            object: Object {
                metadata: Metadata {
                    name: name.into(),
                    ..Default::default()
                },
                spec,
                status: None,
            },
            key: key_for(kind, None, name),
            rev,
        }
    }

    /// Node `live` holds 10.0.0.1 (handle h1) in its block; node `gone` (missing) holds
    /// 10.0.0.9 (h2) in its block; 10.0.0.2 is leaked (its handle h3 does not exist); node
    /// `gone` has a second, empty block and an affinity without a block.
    fn snapshot() -> Snapshot {
        let sec = |n: &str| BTreeMap::from([("node".to_string(), n.to_string())]);
        let mut live = alloc::new_block("10.0.0.0/29".parse().unwrap(), "live");
        alloc::allocate_specific(&mut live, "10.0.0.1".parse().unwrap(), "h1", &sec("live"))
            .unwrap();
        alloc::allocate_specific(&mut live, "10.0.0.2".parse().unwrap(), "h3", &sec("live"))
            .unwrap();
        let mut gone = alloc::new_block("10.0.0.8/29".parse().unwrap(), "gone");
        alloc::allocate_specific(&mut gone, "10.0.0.9".parse().unwrap(), "h2", &sec("gone"))
            .unwrap();
        let empty = alloc::new_block("10.0.0.16/29".parse().unwrap(), "gone");
        let handle = |id: &str, cidr: &str| IpamHandleSpec {
            handle_id: id.into(),
            block: BTreeMap::from([(cidr.to_string(), 1)]),
            endpoint: None,
        };
        let aff = |cidr: &str| BlockAffinitySpec {
            state: AffinityState::Confirmed,
            node: "gone".into(),
            cidr: cidr.parse().unwrap(),
        };
        Snapshot {
            revision: 100,
            pools: vec![],
            nodes: BTreeSet::from(["live".to_string()]),
            blocks: vec![
                read(Kind::IpamBlock, "10-0-0-0-29", live, 10),
                read(Kind::IpamBlock, "10-0-0-8-29", gone, 11),
                read(Kind::IpamBlock, "10-0-0-16-29", empty, 12),
            ],
            handles: BTreeMap::from([
                (
                    "h1".into(),
                    read(Kind::IpamHandle, "h1", handle("h1", "10.0.0.0/29"), 20),
                ),
                (
                    "h2".into(),
                    read(Kind::IpamHandle, "h2", handle("h2", "10.0.0.8/29"), 21),
                ),
            ]),
            affinities: BTreeMap::from([
                (
                    "gone-10-0-0-16-29".into(),
                    read(
                        Kind::BlockAffinity,
                        "gone-10-0-0-16-29",
                        aff("10.0.0.16/29"),
                        30,
                    ),
                ),
                (
                    "gone-10-0-0-24-29".into(),
                    read(
                        Kind::BlockAffinity,
                        "gone-10-0-0-24-29",
                        aff("10.0.0.24/29"),
                        31,
                    ),
                ),
            ]),
            endpoints: BTreeMap::new(),
        }
    }

    fn op(ops: &[GcOp], pred: impl Fn(&GcAction) -> bool) -> &GcOp {
        ops.iter().find(|o| pred(&o.action)).expect("planned")
    }

    /// Every planned transaction is guarded by everything its decision read.
    #[test]
    fn every_decision_is_guarded_by_what_it_read() {
        let ops = plan(&snapshot(), 1000, u64::MAX, &GcScope::All);
        let block = |name: &str| key_for(Kind::IpamBlock, None, name);
        let leak = op(&ops, |a| matches!(a, GcAction::ReleaseLeaks { .. }));
        assert_eq!(
            leak.preconditions,
            vec![
                Precondition::ModRevision(block("10-0-0-0-29"), 10),
                Precondition::Absent(handle_key("h3")),
            ]
        );
        let dead = op(&ops, |a| matches!(a, GcAction::ReleaseHandles { .. }));
        assert_eq!(
            dead.preconditions,
            vec![
                Precondition::Absent(node_key("gone")),
                Precondition::ModRevision(handle_key("h2"), 21),
                Precondition::ModRevision(block("10-0-0-8-29"), 11),
            ]
        );
        let cidr: IpNet = "10.0.0.16/29".parse().unwrap();
        let del = op(&ops, |a| *a == GcAction::DeleteBlock { cidr });
        assert_eq!(
            del.preconditions,
            vec![
                Precondition::ModRevision(block("10-0-0-16-29"), 12),
                Precondition::ModRevision(affinity_key("gone", &cidr), 30),
                Precondition::Absent(node_key("gone")),
            ]
        );
        let dangling = op(&ops, |a| matches!(a, GcAction::DeleteAffinity { .. }));
        assert_eq!(
            dangling.preconditions,
            vec![
                Precondition::ModRevision(
                    key_for(Kind::BlockAffinity, None, "gone-10-0-0-24-29"),
                    31
                ),
                Precondition::Absent(block("10-0-0-24-29")),
            ]
        );
        // The block of the missing node still holds h2 in this plan: not deleted yet.
        assert!(!ops.iter().any(|o| o.action
            == GcAction::DeleteBlock {
                cidr: "10.0.0.8/29".parse().unwrap()
            }));
        // The live node's handle is untouched.
        assert!(!ops.iter().any(|o| o
            .preconditions
            .contains(&Precondition::ModRevision(handle_key("h1"), 20))));
    }

    /// Handles of a missing node each holding addresses in four blocks (written before one
    /// address per family): every planned transaction stays within etcd's 128 comparisons and
    /// 128 operations, and every handle is planned.
    #[test]
    fn releases_of_a_missing_node_fit_in_transactions() {
        let sec = BTreeMap::from([("node".to_string(), "gone".to_string())]);
        let mut snap = Snapshot::default();
        for h in 0..40u32 {
            let id = format!("h{h}");
            let mut held = BTreeMap::new();
            for j in 0..4u32 {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000 + h * 4 + j);
                let cidr: IpNet = format!("{ip}/32").parse().unwrap();
                let mut b = alloc::new_block(cidr, "gone");
                alloc::allocate_specific(&mut b, ip.into(), &id, &sec).unwrap();
                snap.blocks
                    .push(read(Kind::IpamBlock, &alloc::block_name(&cidr), b, 1));
                held.insert(cidr.to_string(), 1);
            }
            let spec = IpamHandleSpec {
                handle_id: id.clone(),
                block: held,
                endpoint: None,
            };
            snap.handles
                .insert(id.clone(), read(Kind::IpamHandle, &id, spec, 2));
        }
        let ops = plan(&snap, 1, u64::MAX, &GcScope::All);
        let mut planned = 0;
        for op in &ops {
            if let GcAction::ReleaseHandles { handles, .. } = &op.action {
                planned += handles.len();
                assert!(
                    op.preconditions.len() <= MAX_TXN_OPS && op.ops.len() <= MAX_TXN_OPS,
                    "{} comparisons, {} operations",
                    op.preconditions.len(),
                    op.ops.len()
                );
            }
        }
        assert_eq!(planned, 40);
    }

    /// A handle record whose `handleID` is not its name (written by hand, or by another tool):
    /// GC judges handles by the name their key holds — what its preconditions check and what
    /// allocations refer to — so node `live`'s record `h1` (saying `h2`) is neither taken for
    /// the missing node's `h2` and deleted, nor its addresses for leaks.
    #[test]
    fn handles_are_judged_by_their_key() {
        let mut snap = snapshot();
        let mut h1 = snap.handles.remove("h1").unwrap();
        h1.object.spec.handle_id = "h2".into();
        snap.handles.remove("h2");
        snap.insert_read_handle(h1);
        let ops = plan(&snap, 1000, u64::MAX, &GcScope::All);
        for op in &ops {
            assert!(
                !op.ops.contains(&TxnOp::Delete(handle_key("h1"))),
                "{:?} deletes live's handle",
                op.action
            );
        }
        for op in &ops {
            if let GcAction::ReleaseLeaks { ips, .. } = &op.action {
                assert!(!ips.contains(&"10.0.0.1".parse().unwrap()), "{ips:?}");
            }
        }
    }

    /// `delete node gone` plans only what is the node's.
    #[test]
    fn node_scope_touches_only_that_node() {
        let ops = plan(&snapshot(), 1000, u64::MAX, &GcScope::Node("gone".into()));
        assert!(ops
            .iter()
            .all(|o| !matches!(o.action, GcAction::ReleaseLeaks { .. })));
        assert_eq!(ops.len(), 3, "{ops:?}");
    }
}
