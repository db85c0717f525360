//! Releasing addresses over the datastore (I/O): an attachment's handle — found under today's
//! name or, for records written before it, under the legacy name, in both cases once the record
//! and its endpoint prove it is this attachment's (neither name is another's impossible) — is
//! freed in one compare-and-swap transaction that deletes the handle and
//! its workload endpoint and frees its addresses in every block, guarded by the revisions of
//! everything read. Also `ipam release --ip`, the CNI GC of a node's attachments, and the
//! guarded deletion of an empty block.

use std::net::IpAddr;

use ipnet::IpNet;
use trellis_ipam::cluster as alloc;
use trellis_resources::{IpamBlockSpec, IpamHandleSpec, Object, Resource, WorkloadEndpointSpec};
use trellis_store::{Datastore, KeyValue, Precondition, TxnOp, TxnOutcome};

use crate::ipam::{
    affinity_key, block_key, block_value, handle_key, node_key, Request, HANDLE_ANNOTATION,
    NETWORK_ANNOTATION,
};
use crate::objects;
use crate::snapshot::Read;
use crate::{ClusterError, Result};

const MAX_ATTEMPTS: u32 = 50;

/// An attachment's handle as found in the datastore, with what proved it is the attachment's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundHandle {
    pub id: String,
    /// The handle record as read.
    pub handle: IpamHandleSpec,
    /// Preconditions on the records that proved it the attachment's — the handle's revision and
    /// its endpoint's — so a release commits only while they are as judged.
    pub proof: Vec<Precondition>,
}

/// What the handle names of an attachment hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandleLookup {
    /// The attachment's handle.
    Ours(FoundHandle),
    /// Neither name holds a record of this attachment, and today's name is free.
    Absent,
    /// Today's name holds a record of something else (see [`holder_other_than`]).
    Taken { handle: String, holder: String },
}

/// The handle holding `req`'s addresses, if any (see [`lookup_handle`]).
pub async fn find_handle(store: &dyn Datastore, req: &Request) -> Result<Option<FoundHandle>> {
    Ok(match lookup_handle(store, req).await? {
        HandleLookup::Ours(found) => Some(found),
        HandleLookup::Absent | HandleLookup::Taken { .. } => None,
    })
}

/// Looks for `req`'s handle under today's name ([`alloc::handle_id`]) and then under the legacy
/// one (`network.container.ifname`, written before), judging each record found by
/// [`holder_other_than`]: a record under either name may be another attachment's, because a
/// legacy name is not injective and today's name of one attachment can be the legacy name of
/// another (container `a.b` is `a_2Eb` escaped), and because the agent's tunnel address has a
/// handle of the same form.
pub async fn lookup_handle(store: &dyn Datastore, req: &Request) -> Result<HandleLookup> {
    let today = req.handle();
    if let Some(read) = read_handle(store, &today).await? {
        return Ok(
            match holder_other_than(req, &today, &read.0, read.1.as_ref()) {
                None => HandleLookup::Ours(read.found(today)),
                Some(holder) => HandleLookup::Taken {
                    handle: today,
                    holder,
                },
            },
        );
    }
    let legacy = alloc::legacy_handle_id(&req.network, &req.container_id, &req.ifname);
    if legacy == today {
        return Ok(HandleLookup::Absent);
    }
    Ok(match read_handle(store, &legacy).await? {
        Some(read) if holder_other_than(req, &legacy, &read.0, read.1.as_ref()).is_none() => {
            HandleLookup::Ours(read.found(legacy))
        }
        _ => HandleLookup::Absent,
    })
}

/// A handle record with its endpoint (when it names one that exists) and the preconditions
/// covering both as read.
struct HandleRead(
    IpamHandleSpec,
    Option<Object<WorkloadEndpointSpec>>,
    Vec<Precondition>,
);

impl HandleRead {
    fn found(self, id: String) -> FoundHandle {
        FoundHandle {
            id,
            handle: self.0,
            proof: self.2,
        }
    }
}

async fn read_handle(store: &dyn Datastore, id: &str) -> Result<Option<HandleRead>> {
    let Some(hkv) = store.get(&handle_key(id)).await? else {
        return Ok(None);
    };
    let Resource::IpamHandle(h) = objects::decode(&hkv)?.resource else {
        return Ok(None);
    };
    let mut proof = vec![Precondition::ModRevision(hkv.key, hkv.mod_revision)];
    let mut endpoint = None;
    if let Some(ep) = &h.spec.endpoint {
        // An endpoint record that does not decode proves nothing either way: judged as missing
        // (reported like a listing's bad record), so DEL does not fail on it forever.
        if let Some(wkv) = store.get(ep).await? {
            match objects::decode(&wkv).map(|st| st.resource) {
                Ok(Resource::WorkloadEndpoint(w)) => {
                    proof.push(Precondition::ModRevision(wkv.key, wkv.mod_revision));
                    endpoint = Some(w);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(endpoint = %ep, error = %e, "workload endpoint record does not decode")
                }
            }
        }
    }
    Ok(Some(HandleRead(h.spec, endpoint, proof)))
}

/// Who holds the handle record `h` read under the name `id`, when it is not `req`'s attachment
/// (`None`: it is). Pure. `endpoint` is the record's workload endpoint if it exists.
///
/// - An infrastructure address (no endpoint, the agent's tunnel address) is only an
///   infrastructure request's, and an attachment with an endpoint only a workload's.
/// - An endpoint written today carries the network annotation: the record is the attachment's
///   when network, container and interface are the request's (and the name is today's).
/// - An endpoint written before has no network annotation: its record was written under the
///   writer's legacy name, so it is the attachment's when container and interface are the
///   request's and the name is the request's legacy name (the rest of it is the network).
/// - Without its endpoint, a record is the attachment's only under today's name when that name
///   cannot be another attachment's legacy name (it has no `_`, so no part of it was escaped).
pub fn holder_other_than(
    req: &Request,
    id: &str,
    h: &IpamHandleSpec,
    endpoint: Option<&Object<WorkloadEndpointSpec>>,
) -> Option<String> {
    let today = req.handle();
    let legacy = alloc::legacy_handle_id(&req.network, &req.container_id, &req.ifname);
    let Some(ep) = &h.endpoint else {
        return (!req.no_endpoint).then(|| {
            "an infrastructure address without workload endpoint (a node's tunnel address)"
                .to_string()
        });
    };
    if req.no_endpoint {
        return Some(format!("the attachment of workload endpoint {ep}"));
    }
    let Some(w) = endpoint else {
        let provable = id == today && !today.contains('_');
        return (!provable)
            .then(|| format!("an attachment whose workload endpoint {ep} is missing"));
    };
    let network = w.metadata.annotations.get(NETWORK_ANNOTATION);
    let same = w.spec.container_id.as_deref() == Some(req.container_id.as_str())
        && w.spec.endpoint.as_deref() == Some(req.ifname.as_str())
        && w.metadata
            .annotations
            .get(HANDLE_ANNOTATION)
            .map(String::as_str)
            == Some(id)
        && match network {
            Some(n) => *n == req.network && id == today,
            None => id == legacy,
        };
    (!same).then(|| {
        format!(
            "the attachment of workload endpoint {ep} (network {}, container {}, interface {})",
            network.map(String::as_str).unwrap_or("not recorded"),
            w.spec.container_id.as_deref().unwrap_or("?"),
            w.spec.endpoint.as_deref().unwrap_or("?"),
        )
    })
}

/// The addresses a handle holds (with their blocks), if the handle exists.
pub async fn held_addresses(
    store: &dyn Datastore,
    handle: &str,
) -> Result<Option<Vec<(IpAddr, IpNet)>>> {
    let Some(kv) = store.get(&handle_key(handle)).await? else {
        return Ok(None);
    };
    let Resource::IpamHandle(h) = objects::decode(&kv)?.resource else {
        return Ok(None);
    };
    held_by_read_handle(store, handle, &h.spec).await.map(Some)
}

/// The addresses the handle record `h` (read under `handle`) holds, with their blocks.
pub async fn held_by_read_handle(
    store: &dyn Datastore,
    handle: &str,
    h: &IpamHandleSpec,
) -> Result<Vec<(IpAddr, IpNet)>> {
    let mut out = Vec::new();
    for cidr in h.block.keys() {
        let cidr: IpNet = cidr.parse().map_err(|_| ClusterError::Corrupt {
            key: handle_key(handle),
            reason: format!("block {cidr:?}"),
        })?;
        if let Some((b, _)) = get_block(store, &cidr).await? {
            out.extend(alloc::held_by(&b, handle).into_iter().map(|ip| (ip, cidr)));
        }
    }
    Ok(out)
}

async fn get_block(
    store: &dyn Datastore,
    cidr: &IpNet,
) -> Result<Option<(IpamBlockSpec, KeyValue)>> {
    let Some(kv) = store.get(&block_key(cidr)).await? else {
        return Ok(None);
    };
    match objects::decode(&kv)?.resource {
        Resource::IpamBlock(b) => Ok(Some((b.spec, kv))),
        _ => Err(ClusterError::Corrupt {
            key: kv.key,
            reason: "not an IPAMBlock".into(),
        }),
    }
}

/// What one release attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Committed: these addresses were freed (empty when the handle was already gone).
    Released(Vec<IpAddr>),
    /// The handle does not hold what the caller required (`must_hold`); nothing changed.
    NotHeld,
    /// Something read changed before the commit; read again.
    Conflict,
}

/// One attempt to release `handle`: reads it and its blocks, and commits — guarded by their
/// revisions and by `proof` — the deletion of handle and endpoint and the freed blocks. With
/// `must_hold`, the release happens only if the handle holds that address in what was read.
pub async fn release_handle_once(
    store: &dyn Datastore,
    handle: &str,
    now: u64,
    proof: &[Precondition],
    must_hold: Option<IpAddr>,
) -> Result<Attempt> {
    let Some(hkv) = store.get(&handle_key(handle)).await? else {
        return Ok(if must_hold.is_some() {
            Attempt::NotHeld
        } else {
            Attempt::Released(Vec::new())
        });
    };
    let Resource::IpamHandle(h) = objects::decode(&hkv)?.resource else {
        return Ok(Attempt::NotHeld);
    };
    let mut pre = vec![Precondition::ModRevision(hkv.key, hkv.mod_revision)];
    pre.extend_from_slice(proof);
    release_read_handle(store, handle, &h.spec, pre, now, must_hold).await
}

/// The rest of [`release_handle_once`] for a handle record already read: `pre` covers it (its
/// revision as read) and whatever proved it the caller's.
async fn release_read_handle(
    store: &dyn Datastore,
    handle: &str,
    h: &IpamHandleSpec,
    mut pre: Vec<Precondition>,
    now: u64,
    must_hold: Option<IpAddr>,
) -> Result<Attempt> {
    let mut ops = vec![TxnOp::Delete(handle_key(handle))];
    let mut released = Vec::new();
    for cidr in h.block.keys() {
        let Ok(cidr) = cidr.parse::<IpNet>() else {
            continue;
        };
        if let Some((mut spec, bkv)) = get_block(store, &cidr).await? {
            let freed = alloc::release_handle(&mut spec, handle, now);
            if !freed.is_empty() {
                released.extend(freed);
                pre.push(Precondition::ModRevision(bkv.key.clone(), bkv.mod_revision));
                ops.push(TxnOp::Put(bkv.key, block_value(&spec)));
            }
        }
    }
    if must_hold.is_some_and(|ip| !released.contains(&ip)) {
        return Ok(Attempt::NotHeld);
    }
    if let Some(ep) = &h.endpoint {
        ops.push(TxnOp::Delete(ep.clone()));
    }
    Ok(match store.txn(pre, ops).await? {
        TxnOutcome::Committed { .. } => Attempt::Released(released),
        TxnOutcome::Conflict => Attempt::Conflict,
    })
}

/// Releases everything a handle holds and deletes the handle and its endpoint, atomically.
/// A missing handle is success (DEL is idempotent).
pub async fn release_handle(store: &dyn Datastore, handle: &str, now: u64) -> Result<Vec<IpAddr>> {
    for _ in 0..MAX_ATTEMPTS {
        match release_handle_once(store, handle, now, &[], None).await? {
            Attempt::Released(ips) => return Ok(ips),
            Attempt::NotHeld => return Ok(Vec::new()),
            Attempt::Conflict => {}
        }
    }
    Err(contention(format!("release of {handle}")))
}

/// Releases an attachment (today's or legacy handle, see [`find_handle`]); idempotent.
pub async fn release_attachment(
    store: &dyn Datastore,
    req: &Request,
    now: u64,
) -> Result<Vec<IpAddr>> {
    for _ in 0..MAX_ATTEMPTS {
        let Some(found) = find_handle(store, req).await? else {
            return Ok(Vec::new());
        };
        // The proof holds the handle's revision as judged: no second read of it.
        match release_read_handle(store, &found.id, &found.handle, found.proof, now, None).await? {
            Attempt::Released(ips) => return Ok(ips),
            Attempt::NotHeld => return Ok(Vec::new()),
            Attempt::Conflict => {}
        }
    }
    Err(contention(format!("release of {}", req.handle())))
}

fn contention(what: String) -> ClusterError {
    ClusterError::Contention {
        what,
        attempts: MAX_ATTEMPTS,
    }
}

/// What `ipam release --ip` freed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpRelease {
    /// The address's handle was released (with all its addresses).
    Handle(String),
    /// The address was allocated to a handle that does not exist; the address alone was freed.
    Leak(String),
}

/// Releases the attachment holding `ip` — decided and committed together: the handle is
/// released only if it still holds `ip` when its records are read for the commit, and a
/// leaked address (its handle absent) is freed only while the handle stays absent and the block
/// unchanged. `None` when the address is not allocated.
pub async fn release_ip(store: &dyn Datastore, ip: IpAddr, now: u64) -> Result<Option<IpRelease>> {
    for _ in 0..MAX_ATTEMPTS {
        let Some((b, bkv)) = block_of(store, ip).await? else {
            return Ok(None);
        };
        let Some(handle) = alloc::allocations(&b)
            .into_iter()
            .find(|(a, _)| *a == ip)
            .map(|(_, attr)| attr.handle_id.clone())
        else {
            return Ok(None);
        };
        if store.get(&handle_key(&handle)).await?.is_some() {
            match release_handle_once(store, &handle, now, &[], Some(ip)).await? {
                Attempt::Released(_) => return Ok(Some(IpRelease::Handle(handle))),
                Attempt::NotHeld | Attempt::Conflict => continue,
            }
        }
        let mut spec = b.clone();
        alloc::release_ip(&mut spec, ip, now);
        let pre = vec![
            Precondition::ModRevision(bkv.key.clone(), bkv.mod_revision),
            Precondition::Absent(handle_key(&handle)),
        ];
        if let TxnOutcome::Committed { .. } = store
            .txn(pre, vec![TxnOp::Put(bkv.key, block_value(&spec))])
            .await?
        {
            return Ok(Some(IpRelease::Leak(handle)));
        }
    }
    Err(contention(format!("release of {ip}")))
}

async fn block_of(store: &dyn Datastore, ip: IpAddr) -> Result<Option<(IpamBlockSpec, KeyValue)>> {
    for (b, _) in objects::blocks(store).await? {
        if b.spec.cidr.contains(&ip) {
            return get_block(store, &b.spec.cidr).await;
        }
    }
    Ok(None)
}

/// An attachment as its workload endpoint records it: (network, container ID, interface) and
/// its handle. Endpoints written before the network annotation existed carry the legacy handle
/// `network.container.ifname`; given the container and interface, the network is what is left.
pub fn attachment_of(w: &Object<WorkloadEndpointSpec>) -> Option<(String, String, String, String)> {
    let handle = w.metadata.annotations.get(HANDLE_ANNOTATION)?;
    let cid = w.spec.container_id.as_deref()?;
    let ifname = w.spec.endpoint.as_deref()?;
    let network = match w.metadata.annotations.get(NETWORK_ANNOTATION) {
        Some(n) => n.clone(),
        None => handle
            .strip_suffix(&format!(".{cid}.{ifname}"))?
            .to_string(),
    };
    Some((network, cid.to_string(), ifname.to_string(), handle.clone()))
}

/// CNI GC: releases `node`'s attachments of `network` that `keep` (network, container,
/// interface) does not list. Each release is guarded by the endpoint it was decided on.
pub async fn release_unlisted(
    store: &dyn Datastore,
    node: &str,
    network: &str,
    keep: &[(String, String, String)],
    now: u64,
) -> Result<Vec<IpAddr>> {
    let mut released = Vec::new();
    for (w, rev) in objects::endpoints(store).await? {
        if w.spec.node != node {
            continue;
        }
        let Some((net, cid, ifname, handle)) = attachment_of(&w) else {
            continue;
        };
        if net != network || keep.contains(&(net.clone(), cid, ifname)) {
            continue;
        }
        let key = Resource::WorkloadEndpoint(w).key();
        // The handle the endpoint names must name the endpoint back: a handle of that name
        // written for another attachment (a stale endpoint's legacy name) is not released.
        let Some(hkv) = store.get(&handle_key(&handle)).await? else {
            continue;
        };
        let Resource::IpamHandle(h) = objects::decode(&hkv)?.resource else {
            continue;
        };
        if h.spec.endpoint.as_deref() != Some(key.as_str()) {
            continue;
        }
        let proof = vec![
            Precondition::ModRevision(key, rev),
            Precondition::ModRevision(hkv.key, hkv.mod_revision),
        ];
        // A conflict means the endpoint changed (its attachment went or came back): the next
        // GC decides again.
        if let Attempt::Released(ips) =
            release_read_handle(store, &handle, &h.spec, proof, now, None).await?
        {
            released.extend(ips);
        }
    }
    Ok(released)
}

/// Releases the attachment of a workload endpoint as a decision read it (from a
/// [`crate::snapshot::Snapshot`]): the endpoint `ep` and the handle record `h` that names it
/// back, in one transaction guarded by both revisions as read and by `extra` (the
/// kube-controller's fence) — an ADD, DEL or GC that changed either since the decision makes it
/// change nothing ([`Attempt::Conflict`]: decide again from a fresh read). The blocks are read
/// now and guarded by the revisions read.
pub async fn release_decided(
    store: &dyn Datastore,
    ep: &Read<WorkloadEndpointSpec>,
    h: &Read<IpamHandleSpec>,
    extra: &[Precondition],
    now: u64,
) -> Result<Attempt> {
    if h.object.spec.endpoint.as_deref() != Some(ep.key.as_str()) {
        return Ok(Attempt::NotHeld);
    }
    let mut pre = vec![
        Precondition::ModRevision(h.key.clone(), h.rev),
        Precondition::ModRevision(ep.key.clone(), ep.rev),
    ];
    pre.extend_from_slice(extra);
    let name = &h.object.metadata.name;
    release_read_handle(store, name, &h.object.spec, pre, now, None).await
}

/// The transaction deleting an empty block and its affinity, guarded by what the decision read:
/// the block's revision (so a block that gained an allocation stays), the affinity's revision
/// when one was read (so a re-created affinity stays; none read, none deleted), and — when the
/// decision was "its node is gone" — the node's absence (so a node registering again keeps it).
pub fn delete_block_txn(
    block: &IpamBlockSpec,
    rev: i64,
    affinity_rev: Option<i64>,
    node_gone: bool,
) -> (Vec<Precondition>, Vec<TxnOp>) {
    let mut pre = vec![Precondition::ModRevision(block_key(&block.cidr), rev)];
    let mut ops = vec![TxnOp::Delete(block_key(&block.cidr))];
    if let Some(node) = alloc::block_node(block) {
        if let Some(arev) = affinity_rev {
            let key = affinity_key(node, &block.cidr);
            pre.push(Precondition::ModRevision(key.clone(), arev));
            ops.push(TxnOp::Delete(key));
        }
        if node_gone {
            pre.push(Precondition::Absent(node_key(node)));
        }
    }
    (pre, ops)
}
