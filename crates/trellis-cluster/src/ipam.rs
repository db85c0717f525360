//! Cluster IPAM over the datastore. Every write is one compare-and-swap transaction that moves
//! block, handle (and workload endpoint) together, retried on conflict; there is no global lock.
//! [`NodeIpam`] is the agent's allocator: it keeps its node's affine blocks and the pool
//! settings in memory, so an ADD normally costs one transaction. The free functions serve the
//! CLI (release, show, check, gc).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use trellis_ipam::cluster::{self as alloc, ClusterIpamError, Pool};
use trellis_resources::validate::parse_cidr_or_ip;
use trellis_resources::{
    key_for, AffinityState, BlockAffinitySpec, IpamBlockSpec, IpamConfigurationSpec,
    IpamHandleSpec, Kind, Metadata, Object, Resource, WorkloadEndpointSpec,
};
use trellis_store::{Datastore, Precondition, TxnOp, TxnOutcome};

use crate::objects::{self, encode};
use crate::{now_secs, ClusterError, Result};

/// How long pool/reservation/config settings are cached by the agent.
const SETTINGS_TTL: Duration = Duration::from_secs(2);
const MAX_ATTEMPTS: u32 = 50;

/// One attachment's request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// Host-side interface (recorded on the workload endpoint).
    pub host_interface: Option<String>,
    /// Fixed addresses (`IP=` / `ips`).
    pub requested_ips: Vec<IpAddr>,
    /// Pools by name or CIDR (`ipv4pools`/`ipv6pools`).
    pub ipv4_pools: Vec<String>,
    pub ipv6_pools: Vec<String>,
    /// Infrastructure addresses (the VTEP's) get no workload endpoint.
    pub no_endpoint: bool,
}

impl Request {
    pub fn handle(&self) -> String {
        alloc::handle_id(&self.network, &self.container_id, &self.ifname)
    }
}

/// Cluster-wide IPAM settings as read from the datastore.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub pools: Vec<Pool>,
    pub reservations: Vec<(String, Vec<IpNet>)>,
    pub config: IpamConfigurationSpec,
}

/// Reads pools, reservations and the IPAM configuration.
pub async fn load_settings(store: &dyn Datastore) -> Result<Settings> {
    let pools = objects::pools(store)
        .await?
        .into_iter()
        .map(|(o, _)| Pool {
            name: o.metadata.name,
            spec: o.spec,
        })
        .collect();
    let reservations = objects::reservations(store)
        .await?
        .into_iter()
        .map(|(o, _)| {
            (
                o.metadata.name,
                o.spec
                    .reserved_cidrs
                    .iter()
                    .filter_map(|c| parse_cidr_or_ip(c).ok())
                    .collect(),
            )
        })
        .collect();
    let config = match objects::get(store, Kind::IpamConfiguration, None, "default").await? {
        Some(s) => match s.resource {
            Resource::IpamConfiguration(o) => o.spec,
            _ => IpamConfigurationSpec::default(),
        },
        None => IpamConfigurationSpec {
            auto_allocate_blocks: true,
            ..Default::default()
        },
    };
    Ok(Settings {
        pools,
        reservations,
        config,
    })
}

fn obj<S>(name: String, spec: S) -> Object<S> {
    Object {
        metadata: Metadata {
            name,
            ..Default::default()
        },
        spec,
        status: None,
    }
}

fn block_key(cidr: &IpNet) -> String {
    key_for(Kind::IpamBlock, None, &alloc::block_name(cidr))
}

fn handle_key(handle: &str) -> String {
    key_for(Kind::IpamHandle, None, handle)
}

fn block_value(spec: &IpamBlockSpec) -> Vec<u8> {
    encode(&Resource::IpamBlock(obj(
        alloc::block_name(&spec.cidr),
        spec.clone(),
    )))
}

/// The name of an attachment's workload endpoint.
pub fn endpoint_name(node: &str, req: &Request) -> String {
    let id: String = req.container_id.chars().take(12).collect();
    format!("{node}-{id}-{}", req.ifname).replace(['/', ':'], "-")
}

/// The agent's allocator for one node.
pub struct NodeIpam {
    store: Arc<dyn Datastore>,
    node: String,
    labels: BTreeMap<String, String>,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    settings: Option<(Instant, Settings)>,
    /// The node's affine blocks with their revisions.
    affine: Option<BTreeMap<IpNet, (IpamBlockSpec, i64)>>,
}

/// A planned write: the block after allocation, and how to guard it.
struct Plan {
    block: IpamBlockSpec,
    guard: Precondition,
    new_affinity: bool,
    ip: IpAddr,
}

impl NodeIpam {
    pub fn new(
        store: Arc<dyn Datastore>,
        node: &str,
        labels: BTreeMap<String, String>,
    ) -> NodeIpam {
        NodeIpam {
            store,
            node: node.to_string(),
            labels,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    async fn settings(&self, st: &mut State, fresh: bool) -> Result<Settings> {
        match &st.settings {
            Some((at, s)) if !fresh && at.elapsed() < SETTINGS_TTL => Ok(s.clone()),
            _ => {
                let s = load_settings(&*self.store).await?;
                st.settings = Some((Instant::now(), s.clone()));
                Ok(s)
            }
        }
    }

    async fn affine(
        &self,
        st: &mut State,
        fresh: bool,
    ) -> Result<BTreeMap<IpNet, (IpamBlockSpec, i64)>> {
        if fresh || st.affine.is_none() {
            let blocks = objects::blocks(&*self.store).await?;
            st.affine = Some(
                blocks
                    .into_iter()
                    .filter(|(b, _)| alloc::block_node(&b.spec) == Some(self.node.as_str()))
                    .map(|(b, rev)| (b.spec.cidr, (b.spec, rev)))
                    .collect(),
            );
        }
        Ok(st.affine.clone().unwrap_or_default())
    }

    /// Allocates one address per family that has an eligible pool (or the requested addresses).
    /// Repeating a request for the same attachment returns what it already holds.
    pub async fn allocate(&self, req: &Request) -> Result<Vec<(IpAddr, IpNet)>> {
        let mut st = self.state.lock().await;
        let handle = req.handle();
        if let Some(held) = held_addresses(&*self.store, &handle).await? {
            return Ok(held);
        }
        let mut fresh = false;
        let mut transient_left = 3;
        for _ in 0..MAX_ATTEMPTS {
            let settings = self.settings(&mut st, fresh).await?;
            let affine = self.affine(&mut st, fresh).await?;
            let plans = match self.plan(req, &settings, &affine).await {
                Ok(p) => p,
                Err(e) if !fresh => {
                    tracing::debug!(error = %e, "allocation failed on cached state; retrying fresh");
                    fresh = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let committed = match self.commit(req, &plans).await {
                Ok(c) => c,
                // A slow or briefly unavailable store: try again with fresh state, like a conflict.
                Err(ClusterError::Store(e)) if transient_left > 0 => {
                    tracing::warn!(error = %e, "datastore write failed; retrying");
                    transient_left -= 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    None
                }
                Err(e) => return Err(e),
            };
            match committed {
                Some(rev) => {
                    let affine = st.affine.get_or_insert_with(BTreeMap::new);
                    for p in &plans {
                        affine.insert(p.block.cidr, (p.block.clone(), rev));
                    }
                    return Ok(plans.iter().map(|p| (p.ip, p.block.cidr)).collect());
                }
                None => fresh = true,
            }
        }
        Err(ClusterError::Contention {
            what: format!("allocation for {handle}"),
            attempts: MAX_ATTEMPTS,
        })
    }

    async fn plan(
        &self,
        req: &Request,
        s: &Settings,
        affine: &BTreeMap<IpNet, (IpamBlockSpec, i64)>,
    ) -> Result<Vec<Plan>> {
        let handle = req.handle();
        let secondary: BTreeMap<String, String> = [
            ("node".to_string(), self.node.clone()),
            (
                "namespace".to_string(),
                req.namespace.clone().unwrap_or_default(),
            ),
            ("pod".to_string(), req.pod.clone().unwrap_or_default()),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
        let mut plans = Vec::new();
        if !req.requested_ips.is_empty() {
            for ip in &req.requested_ips {
                plans.push(self.plan_fixed(*ip, &handle, &secondary, s).await?);
            }
            return Ok(plans);
        }
        let families: Vec<bool> = [true, false]
            .into_iter()
            .filter(|v4| {
                s.pools
                    .iter()
                    .any(|p| p.spec.cidr.addr().is_ipv4() == *v4 && !p.spec.disabled)
            })
            .collect();
        if families.is_empty() {
            return Err(ClusterIpamError::NoPool {
                family: 4,
                node: self.node.clone(),
                requested: req.ipv4_pools.clone(),
            }
            .into());
        }
        for v4 in families {
            let requested = if v4 { &req.ipv4_pools } else { &req.ipv6_pools };
            let pools =
                match alloc::eligible_pools(&s.pools, &self.node, &self.labels, requested, v4) {
                    Ok(p) => p,
                    Err(e) if requested.is_empty() && !v4 => {
                        tracing::debug!(error = %e, "no IPv6 pool for this node");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
            plans.push(
                self.plan_family(&pools, &handle, &secondary, s, affine)
                    .await?,
            );
        }
        Ok(plans)
    }

    async fn plan_family(
        &self,
        pools: &[&Pool],
        handle: &str,
        secondary: &BTreeMap<String, String>,
        s: &Settings,
        affine: &BTreeMap<IpNet, (IpamBlockSpec, i64)>,
    ) -> Result<Plan> {
        let in_pools = |c: &IpNet| pools.iter().any(|p| p.spec.cidr.contains(&c.network()));
        // 1. The node's own blocks, in pool order.
        for p in pools {
            for (cidr, (spec, rev)) in affine
                .iter()
                .filter(|(c, _)| p.spec.cidr.contains(&c.network()))
            {
                let mut b = spec.clone();
                if let Some(ip) =
                    alloc::allocate_in_block(&mut b, handle, secondary, &s.reservations)
                {
                    return Ok(Plan {
                        block: b,
                        guard: Precondition::ModRevision(block_key(cidr), *rev),
                        new_affinity: false,
                        ip,
                    });
                }
            }
        }
        // 2. A new block, unless the node has reached its limit.
        let mine = affine.keys().filter(|c| in_pools(c)).count() as u32;
        let all = objects::blocks(&*self.store).await?;
        if s.config.auto_allocate_blocks
            && s.config
                .max_blocks_per_host
                .is_none_or(|m| m == 0 || mine < m)
        {
            let claimed: HashSet<IpNet> = all.iter().map(|(b, _)| b.spec.cidr).collect();
            let reserved: Vec<IpNet> = s.reservations.iter().flat_map(|(_, n)| n.clone()).collect();
            for p in pools {
                if let Some(cidr) = alloc::next_unclaimed_block(&p.spec, &claimed, &reserved) {
                    let mut b = alloc::new_block(cidr, &self.node);
                    if let Some(ip) =
                        alloc::allocate_in_block(&mut b, handle, secondary, &s.reservations)
                    {
                        return Ok(Plan {
                            block: b,
                            guard: Precondition::Absent(block_key(&cidr)),
                            new_affinity: true,
                            ip,
                        });
                    }
                }
            }
        }
        // 3. Borrow from another node's block, unless strict affinity forbids it.
        if !s.config.strict_affinity {
            for (b, rev) in all.iter().filter(|(b, _)| {
                in_pools(&b.spec.cidr) && alloc::block_node(&b.spec) != Some(self.node.as_str())
            }) {
                let mut spec = b.spec.clone();
                if let Some(ip) =
                    alloc::allocate_in_block(&mut spec, handle, secondary, &s.reservations)
                {
                    return Ok(Plan {
                        block: spec,
                        guard: Precondition::ModRevision(block_key(&b.spec.cidr), *rev),
                        new_affinity: false,
                        ip,
                    });
                }
            }
        }
        Err(ClusterIpamError::Exhausted {
            pools: pools
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            node: self.node.clone(),
            strict: s.config.strict_affinity,
        }
        .into())
    }

    async fn plan_fixed(
        &self,
        ip: IpAddr,
        handle: &str,
        secondary: &BTreeMap<String, String>,
        s: &Settings,
    ) -> Result<Plan> {
        if let Some(r) = alloc::reserved_by(ip, &s.reservations) {
            return Err(ClusterIpamError::Reserved {
                ip,
                reservation: r.to_string(),
            }
            .into());
        }
        let pool = s
            .pools
            .iter()
            .find(|p| p.spec.cidr.contains(&ip))
            .ok_or(ClusterIpamError::OutsidePools { ip })?;
        let cidr = IpNet::new(ip, pool.spec.block_prefix())
            .map(|n| n.trunc())
            .map_err(|_| ClusterIpamError::OutsidePools { ip })?;
        match self.store.get(&block_key(&cidr)).await? {
            Some(kv) => {
                let Resource::IpamBlock(b) = objects::decode(&kv)?.resource else {
                    return Err(ClusterError::Corrupt {
                        key: kv.key,
                        reason: "not an IPAMBlock".into(),
                    });
                };
                let mut spec = b.spec;
                alloc::allocate_specific(&mut spec, ip, handle, secondary)?;
                Ok(Plan {
                    block: spec,
                    guard: Precondition::ModRevision(kv.key, kv.mod_revision),
                    new_affinity: false,
                    ip,
                })
            }
            None => {
                let mut spec = alloc::new_block(cidr, &self.node);
                alloc::allocate_specific(&mut spec, ip, handle, secondary)?;
                Ok(Plan {
                    block: spec,
                    guard: Precondition::Absent(block_key(&cidr)),
                    new_affinity: true,
                    ip,
                })
            }
        }
    }

    /// One transaction: blocks (guarded), affinities for new blocks, the handle, the endpoint.
    async fn commit(&self, req: &Request, plans: &[Plan]) -> Result<Option<i64>> {
        let handle = req.handle();
        let mut pre = vec![Precondition::Absent(handle_key(&handle))];
        let mut ops = Vec::new();
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for p in plans {
            pre.push(p.guard.clone());
            ops.push(TxnOp::Put(block_key(&p.block.cidr), block_value(&p.block)));
            if p.new_affinity {
                let name = alloc::affinity_name(&self.node, &p.block.cidr);
                let aff = BlockAffinitySpec {
                    state: AffinityState::Confirmed,
                    node: self.node.clone(),
                    cidr: p.block.cidr,
                };
                pre.push(Precondition::Absent(key_for(
                    Kind::BlockAffinity,
                    None,
                    &name,
                )));
                ops.push(TxnOp::Put(
                    key_for(Kind::BlockAffinity, None, &name),
                    encode(&Resource::BlockAffinity(obj(name, aff))),
                ));
            }
            *counts.entry(p.block.cidr.to_string()).or_default() += 1;
        }
        let wep = (!req.no_endpoint).then(|| self.endpoint(req, plans));
        let h = IpamHandleSpec {
            handle_id: handle.clone(),
            block: counts,
            endpoint: wep.as_ref().map(Resource::key),
        };
        ops.push(TxnOp::Put(
            handle_key(&handle),
            encode(&Resource::IpamHandle(obj(handle.clone(), h))),
        ));
        if let Some(wep) = wep {
            ops.push(TxnOp::Put(wep.key(), encode(&wep)));
        }
        match self.store.txn(pre, ops).await? {
            TxnOutcome::Committed { revision } => Ok(Some(revision)),
            TxnOutcome::Conflict => Ok(None),
        }
    }

    fn endpoint(&self, req: &Request, plans: &[Plan]) -> Resource {
        let mut o = obj(
            endpoint_name(&self.node, req),
            WorkloadEndpointSpec {
                orchestrator: Some("trellis".into()),
                node: self.node.clone(),
                container_id: Some(req.container_id.clone()),
                pod: req.pod.clone(),
                endpoint: Some(req.ifname.clone()),
                interface_name: req.host_interface.clone(),
                ip_networks: plans.iter().map(|p| IpNet::from(p.ip)).collect(),
                ..Default::default()
            },
        );
        o.metadata.namespace = Some(
            req.namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".into()),
        );
        o.metadata
            .annotations
            .insert("trellis.dev/handle".into(), req.handle());
        Resource::WorkloadEndpoint(o)
    }

    /// Releases an attachment's addresses (idempotent) and forgets cached copies.
    pub async fn release(&self, req: &Request) -> Result<Vec<IpAddr>> {
        let mut st = self.state.lock().await;
        let released = release_handle(&*self.store, &req.handle()).await?;
        if !released.is_empty() {
            st.affine = None;
        }
        Ok(released)
    }

    /// Deletes this node's blocks that have been empty for `grace`; returns their CIDRs.
    pub async fn release_empty_blocks(&self, grace: Duration) -> Result<Vec<IpNet>> {
        let mut st = self.state.lock().await;
        let now = now_secs();
        let mut released = Vec::new();
        for (b, rev) in objects::blocks(&*self.store).await? {
            if alloc::block_node(&b.spec) == Some(self.node.as_str())
                && alloc::releasable(&b.spec, now, grace.as_secs())
                && delete_block(&*self.store, &b.spec, rev).await?
            {
                released.push(b.spec.cidr);
            }
        }
        if !released.is_empty() {
            st.affine = None;
        }
        Ok(released)
    }
}

/// The addresses a handle already holds, if it exists.
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
    let mut out = Vec::new();
    for cidr in h.spec.block.keys() {
        let cidr: IpNet = cidr.parse().map_err(|_| ClusterError::Corrupt {
            key: kv.key.clone(),
            reason: format!("block {cidr:?}"),
        })?;
        if let Some(bkv) = store.get(&block_key(&cidr)).await? {
            if let Resource::IpamBlock(b) = objects::decode(&bkv)?.resource {
                out.extend(
                    alloc::held_by(&b.spec, handle)
                        .into_iter()
                        .map(|ip| (ip, cidr)),
                );
            }
        }
    }
    Ok(Some(out))
}

async fn delete_block(store: &dyn Datastore, b: &IpamBlockSpec, rev: i64) -> Result<bool> {
    let mut ops = vec![TxnOp::Delete(block_key(&b.cidr))];
    if let Some(node) = alloc::block_node(b) {
        ops.push(TxnOp::Delete(key_for(
            Kind::BlockAffinity,
            None,
            &alloc::affinity_name(node, &b.cidr),
        )));
    }
    Ok(matches!(
        store
            .txn(
                vec![Precondition::ModRevision(block_key(&b.cidr), rev)],
                ops
            )
            .await?,
        TxnOutcome::Committed { .. }
    ))
}

/// Releases everything a handle holds and deletes the handle and its endpoint, atomically.
/// A missing handle is success (DEL is idempotent).
pub async fn release_handle(store: &dyn Datastore, handle: &str) -> Result<Vec<IpAddr>> {
    for _ in 0..MAX_ATTEMPTS {
        let Some(hkv) = store.get(&handle_key(handle)).await? else {
            return Ok(Vec::new());
        };
        let Resource::IpamHandle(h) = objects::decode(&hkv)?.resource else {
            return Ok(Vec::new());
        };
        let mut pre = vec![Precondition::ModRevision(hkv.key.clone(), hkv.mod_revision)];
        let mut ops = vec![TxnOp::Delete(hkv.key.clone())];
        let mut released = Vec::new();
        for cidr in h.spec.block.keys() {
            let Ok(cidr) = cidr.parse::<IpNet>() else {
                continue;
            };
            if let Some(bkv) = store.get(&block_key(&cidr)).await? {
                if let Resource::IpamBlock(b) = objects::decode(&bkv)?.resource {
                    let mut spec = b.spec;
                    released.extend(alloc::release_handle(&mut spec, handle, now_secs()));
                    pre.push(Precondition::ModRevision(bkv.key.clone(), bkv.mod_revision));
                    ops.push(TxnOp::Put(bkv.key, block_value(&spec)));
                }
            }
        }
        if let Some(ep) = &h.spec.endpoint {
            ops.push(TxnOp::Delete(ep.clone()));
        }
        if let TxnOutcome::Committed { .. } = store.txn(pre, ops).await? {
            return Ok(released);
        }
    }
    Err(ClusterError::Contention {
        what: format!("release of {handle}"),
        attempts: MAX_ATTEMPTS,
    })
}

/// Releases the handle that holds `ip`; `None` when the address is not allocated.
pub async fn release_ip(store: &dyn Datastore, ip: IpAddr) -> Result<Option<String>> {
    for (b, _) in objects::blocks(store).await? {
        if b.spec.cidr.contains(&ip) {
            let handle = alloc::allocations(&b.spec)
                .into_iter()
                .find(|(a, _)| *a == ip)
                .map(|(_, attr)| attr.handle_id.clone());
            if let Some(h) = &handle {
                release_handle(store, h).await?;
            }
            return Ok(handle);
        }
    }
    Ok(None)
}
