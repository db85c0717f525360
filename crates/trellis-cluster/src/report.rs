//! IPAM reports for operators: usage per pool and block (`ipam show`) and a cross-check of
//! blocks, handles, affinities and endpoints (`ipam check`) made on one consistent snapshot, so
//! concurrent ADDs and DELs never show up as false problems. Reads only; garbage collection is
//! [`crate::gc`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use trellis_ipam::cluster as alloc;
use trellis_resources::validate::block_size;
use trellis_store::Datastore;

use crate::ipam::HANDLE_ANNOTATION;
use crate::objects;
use crate::snapshot::Snapshot;
use crate::Result;

pub use crate::gc::{gc, GcReport, GcScope};

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

/// `ipam check`: cross-checks everything as of one revision; an empty list means consistent.
pub async fn check(store: &dyn Datastore) -> Result<Vec<Problem>> {
    Ok(problems(&Snapshot::read(store).await?))
}

/// The problems of a snapshot (pure).
pub fn problems(snap: &Snapshot) -> Vec<Problem> {
    let mut problems = Vec::new();
    let blocks = &snap.blocks;
    for (i, a) in blocks.iter().enumerate() {
        let a = &a.object;
        for b in &blocks[i + 1..] {
            let b = &b.object;
            if a.spec.cidr.contains(&b.spec.cidr.network())
                || b.spec.cidr.contains(&a.spec.cidr.network())
            {
                problems.push(Problem::OverlappingBlocks {
                    a: a.spec.cidr,
                    b: b.spec.cidr,
                });
            }
        }
        if !snap
            .pools
            .iter()
            .any(|p| p.object.spec.cidr.contains(&a.spec.cidr.network()))
        {
            problems.push(Problem::BlockOutsidePools { cidr: a.spec.cidr });
        }
        if let Some(n) = alloc::block_node(&a.spec) {
            if !snap.nodes.contains(n) {
                problems.push(Problem::BlockOfMissingNode {
                    cidr: a.spec.cidr,
                    node: n.to_string(),
                });
            }
        }
        for (ip, attr) in alloc::allocations(&a.spec) {
            if !snap.handles.contains_key(&attr.handle_id) {
                problems.push(Problem::LeakedAddress {
                    ip,
                    handle: attr.handle_id.clone(),
                });
            }
        }
    }
    let by_cidr: BTreeMap<String, &trellis_resources::IpamBlockSpec> = blocks
        .iter()
        .map(|b| (b.object.spec.cidr.to_string(), &b.object.spec))
        .collect();
    for (id, h) in &snap.handles {
        for (cidr, count) in &h.object.spec.block {
            let held = by_cidr
                .get(cidr)
                .map(|b| alloc::held_by(b, id).len())
                .unwrap_or(0);
            if held < *count as usize {
                problems.push(Problem::OrphanHandle {
                    handle: id.clone(),
                    block: cidr.clone(),
                });
            }
        }
        if let Some(ep) = &h.object.spec.endpoint {
            if !snap.endpoints.contains_key(ep) {
                problems.push(Problem::EndpointMismatch {
                    handle: id.clone(),
                    endpoint: ep.clone(),
                });
            }
        }
    }
    for w in snap.endpoints.values() {
        if let Some(h) = w.object.metadata.annotations.get(HANDLE_ANNOTATION) {
            if !snap.handles.contains_key(h) {
                problems.push(Problem::EndpointMismatch {
                    handle: h.clone(),
                    endpoint: w.object.metadata.name.clone(),
                });
            }
        }
    }
    for (name, a) in &snap.affinities {
        if !by_cidr.contains_key(&a.object.spec.cidr.to_string()) {
            problems.push(Problem::DanglingAffinity { name: name.clone() });
        }
    }
    problems
}
