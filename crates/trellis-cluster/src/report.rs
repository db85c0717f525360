//! IPAM reports for operators: usage per pool and block (`ipam show`), a cross-check of blocks,
//! handles, affinities and endpoints (`ipam check`), and garbage collection of what belongs to
//! nodes that no longer exist or to nobody (`ipam gc`). Reads and CAS writes via the datastore.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use trellis_ipam::cluster as alloc;
use trellis_resources::validate::block_size;
use trellis_store::Datastore;

use crate::ipam::release_handle;
use crate::objects;
use crate::{now_secs, Result};

/// One block's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockUsage {
    pub cidr: IpNet,
    pub node: Option<String>,
    pub used: usize,
    pub size: u128,
    pub empty_since: Option<u64>,
}

/// One pool's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    pub name: String,
    pub cidr: IpNet,
    pub size: u128,
    pub used: usize,
    pub blocks: Vec<BlockUsage>,
}

/// `ipam show`: every pool with its blocks; blocks outside every pool are listed under `None`.
pub async fn show(store: &dyn Datastore) -> Result<(Vec<PoolUsage>, Vec<BlockUsage>)> {
    let pools = objects::pools(store).await?;
    let blocks = objects::blocks(store).await?;
    let mut out: Vec<PoolUsage> = pools
        .iter()
        .map(|(p, _)| PoolUsage {
            name: p.metadata.name.clone(),
            cidr: p.spec.cidr,
            size: block_size(&p.spec.cidr),
            used: 0,
            blocks: Vec::new(),
        })
        .collect();
    let mut stray = Vec::new();
    for (b, _) in blocks {
        let u = BlockUsage {
            cidr: b.spec.cidr,
            node: alloc::block_node(&b.spec).map(str::to_string),
            used: alloc::used(&b.spec),
            size: block_size(&b.spec.cidr),
            empty_since: b.spec.empty_since,
        };
        match out.iter_mut().find(|p| p.cidr.contains(&u.cidr.network())) {
            Some(p) => {
                p.used += u.used;
                p.blocks.push(u);
            }
            None => stray.push(u),
        }
    }
    Ok((out, stray))
}

/// A problem `ipam check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// An address allocated to a handle that does not exist.
    LeakedAddress { ip: IpAddr, handle: String },
    /// A handle whose block holds fewer addresses for it than it claims.
    OrphanHandle { handle: String, block: String },
    /// Two blocks that overlap (the same addresses could be handed out twice).
    OverlappingBlocks { a: IpNet, b: IpNet },
    /// A block outside every pool.
    BlockOutsidePools { cidr: IpNet },
    /// A block affine to a node that does not exist.
    BlockOfMissingNode { cidr: IpNet, node: String },
    /// An affinity with no block.
    DanglingAffinity { name: String },
    /// A handle whose workload endpoint is gone, or the reverse.
    EndpointMismatch { handle: String, endpoint: String },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::LeakedAddress { ip, handle } => write!(f, "leaked address {ip}: its handle {handle} does not exist (trellis ipam release --ip {ip})"),
            Problem::OrphanHandle { handle, block } => write!(f, "orphan handle {handle}: block {block} does not hold its addresses (trellis ipam release --handle {handle})"),
            Problem::OverlappingBlocks { a, b } => write!(f, "duplicate: blocks {a} and {b} overlap"),
            Problem::BlockOutsidePools { cidr } => write!(f, "block {cidr} lies outside every pool"),
            Problem::BlockOfMissingNode { cidr, node } => write!(f, "block {cidr} is affine to node {node}, which does not exist (trellis ipam gc)"),
            Problem::DanglingAffinity { name } => write!(f, "block affinity {name} has no block (trellis ipam gc)"),
            Problem::EndpointMismatch { handle, endpoint } => write!(f, "handle {handle} and workload endpoint {endpoint} disagree"),
        }
    }
}

/// `ipam check`: cross-checks everything; an empty list means consistent.
pub async fn check(store: &dyn Datastore) -> Result<Vec<Problem>> {
    let pools = objects::pools(store).await?;
    let blocks = objects::blocks(store).await?;
    let handles = objects::handles(store).await?;
    let nodes: BTreeSet<String> = objects::nodes(store)
        .await?
        .into_iter()
        .map(|(n, _)| n.metadata.name)
        .collect();
    let affinities = objects::affinities(store).await?;
    let endpoints = objects::endpoints(store).await?;
    let handle_names: BTreeSet<&str> = handles
        .iter()
        .map(|(h, _)| h.spec.handle_id.as_str())
        .collect();
    let mut problems = Vec::new();
    for (i, (a, _)) in blocks.iter().enumerate() {
        for (b, _) in &blocks[i + 1..] {
            if a.spec.cidr.contains(&b.spec.cidr.network())
                || b.spec.cidr.contains(&a.spec.cidr.network())
            {
                problems.push(Problem::OverlappingBlocks {
                    a: a.spec.cidr,
                    b: b.spec.cidr,
                });
            }
        }
        if !pools
            .iter()
            .any(|(p, _)| p.spec.cidr.contains(&a.spec.cidr.network()))
        {
            problems.push(Problem::BlockOutsidePools { cidr: a.spec.cidr });
        }
        if let Some(n) = alloc::block_node(&a.spec) {
            if !nodes.contains(n) {
                problems.push(Problem::BlockOfMissingNode {
                    cidr: a.spec.cidr,
                    node: n.to_string(),
                });
            }
        }
        for (ip, attr) in alloc::allocations(&a.spec) {
            if !handle_names.contains(attr.handle_id.as_str()) {
                problems.push(Problem::LeakedAddress {
                    ip,
                    handle: attr.handle_id.clone(),
                });
            }
        }
    }
    let by_cidr: BTreeMap<String, &trellis_resources::IpamBlockSpec> = blocks
        .iter()
        .map(|(b, _)| (b.spec.cidr.to_string(), &b.spec))
        .collect();
    let endpoint_keys: BTreeSet<String> = endpoints
        .iter()
        .map(|(w, _)| {
            trellis_resources::key_for(
                trellis_resources::Kind::WorkloadEndpoint,
                w.metadata.namespace.as_deref(),
                &w.metadata.name,
            )
        })
        .collect();
    for (h, _) in &handles {
        for (cidr, count) in &h.spec.block {
            let held = by_cidr
                .get(cidr)
                .map(|b| alloc::held_by(b, &h.spec.handle_id).len())
                .unwrap_or(0);
            if held < *count as usize {
                problems.push(Problem::OrphanHandle {
                    handle: h.spec.handle_id.clone(),
                    block: cidr.clone(),
                });
            }
        }
        if let Some(ep) = &h.spec.endpoint {
            if !endpoint_keys.contains(ep) {
                problems.push(Problem::EndpointMismatch {
                    handle: h.spec.handle_id.clone(),
                    endpoint: ep.clone(),
                });
            }
        }
    }
    for (w, _) in &endpoints {
        if let Some(h) = w.metadata.annotations.get("trellis.dev/handle") {
            if !handle_names.contains(h.as_str()) {
                problems.push(Problem::EndpointMismatch {
                    handle: h.clone(),
                    endpoint: w.metadata.name.clone(),
                });
            }
        }
    }
    for (a, _) in &affinities {
        if !by_cidr.contains_key(&a.spec.cidr.to_string()) {
            problems.push(Problem::DanglingAffinity {
                name: a.metadata.name.clone(),
            });
        }
    }
    Ok(problems)
}

/// What `ipam gc` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub released_handles: Vec<String>,
    pub released_leaks: Vec<IpAddr>,
    pub deleted_blocks: Vec<IpNet>,
    pub deleted_affinities: Vec<String>,
}

/// `ipam gc`: releases attachments of nodes that no longer exist and leaked addresses, then
/// deletes blocks of missing nodes, blocks empty for longer than `grace_secs`, and dangling
/// affinities.
pub async fn gc(store: &dyn Datastore, grace_secs: u64) -> Result<GcReport> {
    let mut report = GcReport::default();
    let nodes: BTreeSet<String> = objects::nodes(store)
        .await?
        .into_iter()
        .map(|(n, _)| n.metadata.name)
        .collect();
    let handles: BTreeSet<String> = objects::handles(store)
        .await?
        .into_iter()
        .map(|(h, _)| h.spec.handle_id)
        .collect();
    for (b, _) in objects::blocks(store).await? {
        for (ip, attr) in alloc::allocations(&b.spec) {
            let node_gone = attr
                .secondary
                .get("node")
                .is_some_and(|n| !nodes.contains(n));
            if !handles.contains(&attr.handle_id) {
                release_leak(store, ip).await?;
                report.released_leaks.push(ip);
            } else if node_gone && !report.released_handles.contains(&attr.handle_id) {
                release_handle(store, &attr.handle_id).await?;
                report.released_handles.push(attr.handle_id.clone());
            }
        }
    }
    let now = now_secs();
    for (b, rev) in objects::blocks(store).await? {
        let node_gone = alloc::block_node(&b.spec).is_some_and(|n| !nodes.contains(n));
        let empty = alloc::used(&b.spec) == 0;
        if empty && (node_gone || alloc::releasable(&b.spec, now, grace_secs)) {
            let mut ops = vec![trellis_store::TxnOp::Delete(trellis_resources::key_for(
                trellis_resources::Kind::IpamBlock,
                None,
                &b.metadata.name,
            ))];
            if let Some(n) = alloc::block_node(&b.spec) {
                ops.push(trellis_store::TxnOp::Delete(trellis_resources::key_for(
                    trellis_resources::Kind::BlockAffinity,
                    None,
                    &alloc::affinity_name(n, &b.spec.cidr),
                )));
            }
            let pre = vec![trellis_store::Precondition::ModRevision(
                trellis_resources::key_for(
                    trellis_resources::Kind::IpamBlock,
                    None,
                    &b.metadata.name,
                ),
                rev,
            )];
            if let trellis_store::TxnOutcome::Committed { .. } = store.txn(pre, ops).await? {
                report.deleted_blocks.push(b.spec.cidr);
            }
        } else if node_gone && !empty {
            // Borrowed addresses of live nodes remain; the block loses its dead owner.
            tracing::warn!(block = %b.spec.cidr, "block of a missing node still holds addresses of live nodes");
        }
    }
    let blocks: BTreeSet<IpNet> = objects::blocks(store)
        .await?
        .into_iter()
        .map(|(b, _)| b.spec.cidr)
        .collect();
    for (a, rev) in objects::affinities(store).await? {
        if !blocks.contains(&a.spec.cidr) {
            let key = trellis_resources::key_for(
                trellis_resources::Kind::BlockAffinity,
                None,
                &a.metadata.name,
            );
            let out = store
                .txn(
                    vec![trellis_store::Precondition::ModRevision(key.clone(), rev)],
                    vec![trellis_store::TxnOp::Delete(key)],
                )
                .await?;
            if let trellis_store::TxnOutcome::Committed { .. } = out {
                report.deleted_affinities.push(a.metadata.name);
            }
        }
    }
    Ok(report)
}

/// Frees one address whose handle no longer exists.
async fn release_leak(store: &dyn Datastore, ip: IpAddr) -> Result<()> {
    for _ in 0..20 {
        let Some((b, rev)) = objects::blocks(store)
            .await?
            .into_iter()
            .find(|(b, _)| b.spec.cidr.contains(&ip))
        else {
            return Ok(());
        };
        let mut spec = b.spec.clone();
        if alloc::release_ip(&mut spec, ip, now_secs()).is_none() {
            return Ok(());
        }
        let key =
            trellis_resources::key_for(trellis_resources::Kind::IpamBlock, None, &b.metadata.name);
        let value = objects::encode(&trellis_resources::Resource::IpamBlock(
            trellis_resources::Object {
                metadata: b.metadata.clone(),
                spec,
                status: None,
            },
        ));
        if let trellis_store::TxnOutcome::Committed { .. } = store
            .txn(
                vec![trellis_store::Precondition::ModRevision(key.clone(), rev)],
                vec![trellis_store::TxnOp::Put(key, value)],
            )
            .await?
        {
            return Ok(());
        }
    }
    Ok(())
}
