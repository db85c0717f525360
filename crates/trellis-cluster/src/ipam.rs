//! Cluster IPAM over the datastore (I/O). Every write is one compare-and-swap transaction that
//! moves block, handle (and workload endpoint) together, retried on conflict; there is no global
//! lock. [`NodeIpam`] is the agent's allocator: it keeps its node's own (affine) blocks and the
//! pool settings in memory, so an ADD normally costs one transaction. With
//! [`NodeIpam::with_pod_cidr_blocks`] (`--use-pod-cidr`) each of the node's podCIDRs is its only
//! block of that family ([`alloc::pod_cidr_pool`] checks it). Releases live in
//! [`crate::release`]; GC in [`crate::gc`].
//!
//! Names: an attachment (network, container ID, interface) has the handle
//! [`alloc::handle_id`] and, on node N, the workload endpoint [`endpoint_name`]`(N, …)` — both
//! [`alloc::attachment_name`]s, injective and bounded, built from the full container ID.
//! Records written under the older names are still found and released
//! ([`crate::release::find_handle`], [`crate::release::attachment_of`]).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use trellis_ipam::cluster::{self as alloc, ClusterIpamError, Pool};
use trellis_resources::pod::{stamp_endpoint, PodSpec};
use trellis_resources::validate::parse_cidr_or_ip;
use trellis_resources::{
    key_for, AffinityState, BlockAffinitySpec, IpNat, IpamBlockSpec, IpamConfigurationSpec,
    IpamHandleSpec, Kind, Metadata, NamespaceSpec, Object, Resource, WorkloadEndpointSpec,
};
use trellis_store::{Datastore, Precondition, TxnOp, TxnOutcome};

use crate::annotations::{self, Asked, Features};
use crate::objects::{self, encode};
use crate::records::{self, RecordRead};
use crate::release::{
    delete_block_txn, find_handle, lookup_handle, release_attachment, HandleLookup,
};
use crate::{Clock, ClusterError, Result, SystemClock};

use crate::release::held_by_read_handle;
pub use crate::release::{held_addresses, release_handle, release_ip, release_unlisted};

/// Workload endpoint annotation naming the attachment's handle.
pub const HANDLE_ANNOTATION: &str = "trellis.dev/handle";
/// Workload endpoint annotation naming the attachment's network (with the endpoint's container
/// ID and interface, the attachment's identity).
pub const NETWORK_ANNOTATION: &str = "trellis.dev/network";
/// Workload endpoint annotation holding its pod's `metadata.uid` (from `K8S_POD_UID`): IPAM GC
/// keeps the address only while a pod of that UID exists, so a pod recreated under the same
/// name does not protect the old pod's address.
pub const POD_UID_ANNOTATION: &str = "trellis.dev/pod-uid";

/// Whether `uid` can be a Kubernetes `metadata.uid` (the API server's are RFC 4122 UUIDs; any
/// short run of letters, digits and dashes is taken): `Err` says why not.
pub fn check_pod_uid(uid: &str) -> std::result::Result<(), String> {
    if uid.is_empty() || uid.len() > 128 {
        return Err(format!("{} characters (1-128 expected)", uid.len()));
    }
    if !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err("only letters, digits and '-' are allowed".into());
    }
    Ok(())
}

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
    /// The pod's `metadata.uid` when the runtime passed it (`K8S_POD_UID`), recorded on the
    /// endpoint ([`POD_UID_ANNOTATION`]; checked by [`check_pod_uid`] at the edge): a pod
    /// record of another UID is an earlier pod of the same name, never this one's.
    pub pod_uid: Option<String>,
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
    /// Each pool's revision as read, by name: a new block is claimed on condition that its pool
    /// is unchanged (not deleted, nor created again with another block size).
    pub pool_revisions: BTreeMap<String, i64>,
    pub reservations: Vec<(String, Vec<IpNet>)>,
    /// No reservation created or changed since they were read: every address choice read them.
    pub reservations_read: Option<Precondition>,
    pub config: IpamConfigurationSpec,
    /// The IPAM configuration as read (its revision, or its absence): claiming a block
    /// (`autoAllocateBlocks`, `maxBlocksPerHost`) and borrowing (`strictAffinity`) read it.
    pub config_read: Option<Precondition>,
}

/// Reads pools, reservations and the IPAM configuration.
pub async fn load_settings(store: &dyn Datastore) -> Result<Settings> {
    let stored = objects::pools(store).await?;
    let pool_revisions = stored
        .iter()
        .map(|(o, rev)| (o.metadata.name.clone(), *rev))
        .collect();
    let pools = stored
        .into_iter()
        .map(|(o, _)| Pool {
            name: o.metadata.name,
            spec: o.spec,
        })
        .collect();
    let listing = objects::list_checked(store, Kind::IpReservation).await?;
    crate::invalid::observe_listing(Kind::IpReservation, &listing.invalid);
    let reservations_read = Some(Precondition::NoneNewer {
        prefix: Kind::IpReservation.prefix(),
        revision: listing.revision,
    });
    let reservations = listing
        .items
        .into_iter()
        .filter_map(|st| match st.resource {
            Resource::IpReservation(o) => Some(o),
            _ => None,
        })
        .map(|o| {
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
    let config_key = key_for(Kind::IpamConfiguration, None, "default");
    let (config, config_read) =
        match objects::get(store, Kind::IpamConfiguration, None, "default").await? {
            Some(s) => match s.resource {
                Resource::IpamConfiguration(o) => {
                    (o.spec, Precondition::ModRevision(config_key, s.revision))
                }
                _ => (
                    IpamConfigurationSpec::default(),
                    Precondition::ModRevision(config_key, s.revision),
                ),
            },
            None => (
                IpamConfigurationSpec {
                    auto_allocate_blocks: true,
                    ..Default::default()
                },
                Precondition::Absent(config_key),
            ),
        };
    Ok(Settings {
        pools,
        pool_revisions,
        reservations,
        reservations_read,
        config,
        config_read: Some(config_read),
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

pub(crate) fn block_key(cidr: &IpNet) -> String {
    key_for(Kind::IpamBlock, None, &alloc::block_name(cidr))
}

pub(crate) fn handle_key(handle: &str) -> String {
    key_for(Kind::IpamHandle, None, handle)
}

fn pool_key(pool: &str) -> String {
    key_for(Kind::IpPool, None, pool)
}

pub(crate) fn node_key(node: &str) -> String {
    key_for(Kind::Node, None, node)
}

pub(crate) fn affinity_key(node: &str, cidr: &IpNet) -> String {
    key_for(Kind::BlockAffinity, None, &alloc::affinity_name(node, cidr))
}

pub(crate) fn block_value(spec: &IpamBlockSpec) -> Vec<u8> {
    encode(&Resource::IpamBlock(obj(
        alloc::block_name(&spec.cidr),
        spec.clone(),
    )))
}

/// Every block that decodes, with its revision, and the CIDRs every record at a block key claims
/// — those that do not decode too (named by their key), so that no block is claimed over
/// addresses an unreadable record may hold. Undecodable records are reported as listings do.
pub(crate) async fn claimed_blocks(
    store: &dyn Datastore,
) -> Result<(Vec<(Object<IpamBlockSpec>, i64)>, HashSet<IpNet>)> {
    let listing = objects::list_checked(store, Kind::IpamBlock).await?;
    crate::invalid::observe_listing(Kind::IpamBlock, &listing.invalid);
    let prefix = Kind::IpamBlock.prefix();
    let mut claimed: HashSet<IpNet> = listing
        .invalid
        .iter()
        .filter_map(|i| i.key.strip_prefix(&prefix))
        .filter_map(alloc::block_cidr_of_name)
        .collect();
    let mut blocks = Vec::with_capacity(listing.items.len());
    for st in listing.items {
        if let Resource::IpamBlock(b) = st.resource {
            claimed.insert(b.spec.cidr);
            blocks.push((b, st.revision));
        }
    }
    Ok((blocks, claimed))
}

/// The name of an attachment's workload endpoint: [`alloc::attachment_name`] of node, the full
/// container ID and interface (`node1.0af3…e9.eth0`) — two containers whose IDs share a prefix
/// get different endpoints; an over-long name becomes `node.SHA256`.
pub fn endpoint_name(node: &str, req: &Request) -> String {
    alloc::attachment_name(&[node, &req.container_id, &req.ifname])
}

/// The namespace of an attachment's workload endpoint (`default` when the request names none).
fn endpoint_namespace(req: &Request) -> String {
    req.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// The agent's allocator for one node.
pub struct NodeIpam {
    store: Arc<dyn Datastore>,
    node: String,
    labels: BTreeMap<String, String>,
    clock: Arc<dyn Clock>,
    state: tokio::sync::Mutex<State>,
    observer: Option<Arc<dyn CommitObserver>>,
    pods: Option<Arc<dyn PodRecords>>,
    /// Kubernetes mode: an endpoint of a named pod is created only from the pod's record.
    require_pods: bool,
    /// `ipAddrsNoIpam` / `floatingIPs` honoured.
    features: Features,
    /// `--use-pod-cidr`: each of the node's podCIDRs is its only block of that family.
    use_pod_cidr: bool,
}

/// What an allocation read of its node's record: labels for pools' `nodeSelector`s, the
/// podCIDRs (`--use-pod-cidr`) and the record's revision as a guard when either was read.
struct NodeRead {
    labels: BTreeMap<String, String>,
    guard: Option<Precondition>,
    pod_cidrs: Vec<IpNet>,
}

/// Where the allocator looks up pods' and namespaces' records — and its node's own record,
/// whose labels pools' `nodeSelector`s match — first (the agent's view, kept current by its
/// watch) before reading the store.
pub trait PodRecords: Send + Sync {
    /// The record stored at `key` (any kind), with its revision, as the reader last saw it.
    fn pod_record(&self, key: &str) -> Option<objects::Stored>;
}

type PodRead = RecordRead<PodSpec>;

/// Told of each allocation transaction as it commits, with its writes: the agent applies
/// them to its view at once, so its policy applier programs a new pod without waiting for the
/// datastore's watch to bring the pod's endpoint back (SQLite's change log is polled).
pub trait CommitObserver: Send + Sync {
    fn committed(&self, revision: i64, writes: &[TxnOp]);
}

#[derive(Default)]
struct State {
    settings: Option<(std::time::Instant, Settings)>,
    /// The node's own blocks (affinity `host:NODE`) with their revisions — never a borrowed
    /// block or another node's block that held a requested address.
    affine: Option<BTreeMap<IpNet, (IpamBlockSpec, i64)>>,
}

/// One block's planned write: the block after allocation, and how to guard it.
struct BlockPlan {
    block: IpamBlockSpec,
    guard: Precondition,
    new_affinity: bool,
}

/// An allocation's planned writes, keyed by block: a block planned twice is allocated from its
/// planned state, never from a second read, so one transaction never writes a block twice (nor
/// loses the first of two addresses in it).
#[derive(Default)]
struct Plans {
    blocks: BTreeMap<IpNet, BlockPlan>,
    /// The addresses, in the order planned, with their block.
    ips: Vec<(IpAddr, IpNet)>,
    /// Guards on what else the plan read: the pools whose new blocks it claims.
    guards: Vec<Precondition>,
}

impl Plans {
    /// `ipAddrsNoIpam`: the addresses as given, in no block — nothing is allocated, so the
    /// commit writes only the handle (holding no block, so a release frees nothing) and the
    /// endpoint.
    fn without_ipam(ips: &[IpAddr]) -> Plans {
        Plans {
            ips: ips
                .iter()
                .map(|ip| (*ip, annotations::host_net(*ip)))
                .collect(),
            ..Default::default()
        }
    }

    /// The state to allocate from in block `cidr`: planned if planned, else `read`.
    fn base(&self, cidr: &IpNet, read: &IpamBlockSpec) -> IpamBlockSpec {
        self.blocks
            .get(cidr)
            .map(|p| p.block.clone())
            .unwrap_or_else(|| read.clone())
    }

    /// Records `ip` allocated in `block`; the guard of the block's first read is kept.
    fn add(&mut self, ip: IpAddr, block: IpamBlockSpec, guard: Precondition, new_affinity: bool) {
        let cidr = block.cidr;
        match self.blocks.entry(cidr) {
            std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().block = block,
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(BlockPlan {
                    block,
                    guard,
                    new_affinity,
                });
            }
        }
        self.ips.push((ip, cidr));
    }

    /// Requires what `guard` says at commit (once, however often the plan relied on it).
    fn guard(&mut self, guard: Precondition) {
        if !self.guards.contains(&guard) {
            self.guards.push(guard);
        }
    }
}

/// The guard of a decision that read pool `name` from `s`.
fn pool_guard(s: &Settings, name: &str) -> Result<Precondition> {
    let rev = s
        .pool_revisions
        .get(name)
        .ok_or_else(|| ClusterError::NotFound {
            kind: Kind::IpPool.to_string(),
            name: name.to_string(),
        })?;
    Ok(Precondition::ModRevision(pool_key(name), *rev))
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
            clock: Arc::new(SystemClock),
            state: tokio::sync::Mutex::new(State::default()),
            observer: None,
            pods: None,
            require_pods: false,
            features: Features::default(),
            use_pod_cidr: false,
        }
    }

    /// The same allocator in Flannel-style podCIDR mode (`--use-pod-cidr`, Calico's
    /// `USE_POD_CIDR`): each of the node's `spec.podCIDRs` is its only block of that family,
    /// created affine to it when absent; no other block is claimed or borrowed.
    pub fn with_pod_cidr_blocks(mut self, on: bool) -> NodeIpam {
        self.use_pod_cidr = on;
        self
    }

    /// The same allocator honouring the annotations `features` enables.
    pub fn with_features(mut self, features: Features) -> NodeIpam {
        self.features = features;
        self
    }

    /// The same allocator reading pods' records from `pods` first; with `required`
    /// (Kubernetes mode) an attachment naming a pod that has no record for this node is refused
    /// ([`ClusterError::PodNotSynced`]) instead of getting an endpoint without the pod's labels.
    pub fn with_pod_records(mut self, pods: Arc<dyn PodRecords>, required: bool) -> NodeIpam {
        self.pods = Some(pods);
        self.require_pods = required;
        self
    }

    /// The same allocator telling `observer` of each allocation it commits.
    pub fn with_observer(mut self, observer: Arc<dyn CommitObserver>) -> NodeIpam {
        self.observer = Some(observer);
        self
    }

    /// The same allocator reading time from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> NodeIpam {
        self.clock = clock;
        self
    }

    async fn settings(&self, st: &mut State, fresh: bool) -> Result<Settings> {
        let now = self.clock.instant();
        match &st.settings {
            Some((at, s)) if !fresh && now.saturating_duration_since(*at) < SETTINGS_TTL => {
                Ok(s.clone())
            }
            _ => {
                let s = load_settings(&*self.store).await?;
                st.settings = Some((now, s.clone()));
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

    /// Allocates one address per family that has an eligible pool (or the requested addresses,
    /// at most one per family). Repeating a request for the same attachment returns what it
    /// already holds. The commit requires this node to be registered, so nothing is allocated
    /// to a node that GC may be releasing as gone.
    pub async fn allocate(&self, req: &Request) -> Result<Vec<(IpAddr, IpNet)>> {
        alloc::one_per_family(&req.requested_ips)?;
        if !req.no_endpoint {
            // The endpoint is built from the request (namespace, pod: the runtime's free text):
            // what would not decode when read back is refused before anything is stored.
            self.endpoint(req, &Plans::default(), None, Vec::new())
                .validate()?;
        }
        let mut st = self.state.lock().await;
        if let Some(held) = self.held_or_taken(req).await? {
            return Ok(held);
        }
        let mut fresh = false;
        let mut transient_left = 3;
        for _ in 0..MAX_ATTEMPTS {
            let settings = self.settings(&mut st, fresh).await?;
            let affine = self.affine(&mut st, fresh).await?;
            let pod = self.read_pod(req, fresh).await?;
            let namespace = self.read_namespace(req, fresh).await?;
            let node = self.node_labels(&settings, fresh).await?;
            let node_guard = node.guard.clone();
            let planned = async {
                let asked = annotations::asked(
                    req,
                    pod.record.as_ref(),
                    namespace.record.as_ref(),
                    self.features,
                )?;
                let plans = match asked.no_ipam.is_empty() {
                    true => self.plan(&asked, &settings, &affine, &node).await?,
                    false => Plans::without_ipam(&asked.no_ipam),
                };
                let nats = annotations::ip_nats(&asked, &plans.ips)?;
                let mut plans = plans;
                if !asked.no_ipam.is_empty() || asked.floating.is_some() {
                    let (_, claimed) = claimed_blocks(&*self.store).await?;
                    for g in annotations::outside_ipam(&asked, &claimed, &settings.pools)? {
                        plans.guard(g);
                    }
                    self.not_held_elsewhere(&asked).await?;
                }
                Ok::<_, ClusterError>((plans, nats))
            };
            let (mut plans, nats) = match planned.await {
                Ok(p) => p,
                Err(e) if !fresh => {
                    tracing::debug!(error = %e, "allocation failed on cached state; retrying fresh");
                    fresh = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            for g in self.endpoint_guards(req, fresh).await? {
                plans.guard(g);
            }
            for g in [&pod.guard, &namespace.guard].into_iter().flatten() {
                plans.guard(g.clone());
            }
            if let Some(g) = node_guard {
                plans.guard(g);
            }
            let committed = match self.commit(req, &plans, pod.record.as_ref(), nats).await {
                Ok(c) => c,
                // A slow or briefly unavailable store: try again with fresh state, like a conflict
                // (the held/node checks below tell whether the write landed after all).
                Err(ClusterError::Store(e)) if transient_left > 0 => {
                    tracing::warn!(error = %e, "datastore write failed; retrying");
                    transient_left -= 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    None
                }
                Err(e) => return Err(e),
            };
            if let Some(rev) = committed {
                let own = st.affine.get_or_insert_with(BTreeMap::new);
                for (cidr, p) in &plans.blocks {
                    if alloc::block_node(&p.block) == Some(self.node.as_str()) {
                        own.insert(*cidr, (p.block.clone(), rev));
                    }
                }
                return Ok(plans.ips);
            }
            fresh = true;
            if let Some(held) = self.held_or_taken(req).await? {
                return Ok(held);
            }
            if self.store.get(&node_key(&self.node)).await?.is_none() {
                return Err(ClusterError::NodeNotRegistered {
                    node: self.node.clone(),
                });
            }
        }
        Err(ClusterError::Contention {
            what: format!("allocation for {}", req.handle()),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// [`annotations::not_held_elsewhere`] against every node and every endpoint but the
    /// attachment's own (read here: only a pod asking for addresses outside IPAM pays for it).
    async fn not_held_elsewhere(&self, asked: &Asked) -> Result<()> {
        let nodes: Vec<_> = objects::nodes(&*self.store)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let own = endpoint_name(&self.node, &asked.req);
        let own_ns = endpoint_namespace(&asked.req);
        let others: Vec<_> = objects::list(&*self.store, Kind::WorkloadEndpoint)
            .await?
            .into_iter()
            .filter_map(|st| match st.resource {
                Resource::WorkloadEndpoint(w) => Some(w),
                _ => None,
            })
            .filter(|w| {
                !(w.metadata.name == own && w.metadata.namespace.as_deref() == Some(&own_ns))
            })
            .collect();
        annotations::not_held_elsewhere(asked, &nodes, &others)
    }

    /// The addresses `req`'s attachment holds, if it has a handle (today's or legacy).
    pub async fn held(&self, req: &Request) -> Result<Option<Vec<(IpAddr, IpNet)>>> {
        match find_handle(&*self.store, req).await? {
            Some(found) => self.held_by(&found.id, &found.handle).await.map(Some),
            None => Ok(None),
        }
    }

    /// What handle `id` holds: its blocks' addresses; for a handle holding no block (an
    /// attachment given its addresses without IPAM, `ipAddrsNoIpam`), its endpoint's.
    async fn held_by(&self, id: &str, h: &IpamHandleSpec) -> Result<Vec<(IpAddr, IpNet)>> {
        if !h.block.is_empty() {
            return held_by_read_handle(&*self.store, id, h).await;
        }
        let Some(key) = &h.endpoint else {
            return Ok(Vec::new());
        };
        let Some(kv) = self.store.get(key).await? else {
            return Ok(Vec::new());
        };
        Ok(match objects::decode(&kv)?.resource {
            Resource::WorkloadEndpoint(w) => w
                .spec
                .ip_networks
                .iter()
                .map(|n| (n.addr(), annotations::host_net(n.addr())))
                .collect(),
            _ => Vec::new(),
        })
    }

    /// Like [`NodeIpam::held`], but an error when the attachment's handle name is held by
    /// something else: its commit could never succeed, and it must not adopt that record.
    async fn held_or_taken(&self, req: &Request) -> Result<Option<Vec<(IpAddr, IpNet)>>> {
        match lookup_handle(&*self.store, req).await? {
            HandleLookup::Ours(found) => self.held_by(&found.id, &found.handle).await.map(Some),
            HandleLookup::Absent => Ok(None),
            HandleLookup::Taken { handle, holder } => {
                Err(ClusterError::HandleTaken { handle, holder })
            }
        }
    }

    /// What the commit requires of the attachment's endpoint name: that nothing is there — or,
    /// after a conflict (`fresh`), that the record found there stays as read when it was left
    /// by a handle that is gone or names another endpoint (it is replaced). An endpoint of
    /// another attachment (same node, container and interface, another network) is an error:
    /// writing over it would make its DEL delete this one's.
    async fn endpoint_guards(&self, req: &Request, fresh: bool) -> Result<Vec<Precondition>> {
        if req.no_endpoint {
            return Ok(Vec::new());
        }
        let key = key_for(
            Kind::WorkloadEndpoint,
            Some(&endpoint_namespace(req)),
            &endpoint_name(&self.node, req),
        );
        let found = match fresh {
            true => self.store.get(&key).await?,
            false => None,
        };
        let Some(kv) = found else {
            return Ok(vec![Precondition::Absent(key)]);
        };
        let mut pre = vec![Precondition::ModRevision(key.clone(), kv.mod_revision)];
        let holder = match objects::decode(&kv).map(|st| st.resource) {
            Ok(Resource::WorkloadEndpoint(w)) => {
                w.metadata.annotations.get(HANDLE_ANNOTATION).cloned()
            }
            _ => None,
        };
        let Some(h) = holder else {
            return Ok(pre);
        };
        match self.store.get(&handle_key(&h)).await? {
            None => pre.push(Precondition::Absent(handle_key(&h))),
            Some(hkv) => {
                let names_it = matches!(
                    objects::decode(&hkv).map(|st| st.resource),
                    Ok(Resource::IpamHandle(o)) if o.spec.endpoint.as_deref() == Some(key.as_str())
                );
                if names_it && h == req.handle() {
                    // This attachment's own, committed meanwhile: the next look finds it held.
                    return Ok(vec![Precondition::Absent(key)]);
                }
                if names_it {
                    return Err(ClusterError::EndpointTaken {
                        endpoint: key,
                        handle: h,
                    });
                }
                pre.push(Precondition::ModRevision(hkv.key, hkv.mod_revision));
            }
        }
        Ok(pre)
    }

    /// The labels pools' `nodeSelector`s are matched against: the node's stored labels (the
    /// ones the kube-controller mirrors from the Kubernetes Node, as Calico matches them),
    /// with this agent's `--label`s over them (as registration writes them). When a pool has
    /// a selector the decision read the record, so its revision is returned as a guard; a
    /// node without a readable record gets the agent's labels (the commit requires the
    /// node to exist anyway).
    async fn node_labels(&self, s: &Settings, fresh: bool) -> Result<NodeRead> {
        let unread = NodeRead {
            labels: self.labels.clone(),
            guard: None,
            pod_cidrs: Vec::new(),
        };
        if !self.use_pod_cidr && s.pools.iter().all(|p| p.spec.node_selector.is_none()) {
            return Ok(unread);
        }
        let key = node_key(&self.node);
        let seen = match (&self.pods, fresh) {
            (Some(view), false) => view.pod_record(&key),
            _ => None,
        };
        let stored = match seen {
            Some(s) => Some((s.revision, Ok(s.resource))),
            None => self
                .store
                .get(&key)
                .await?
                .map(|kv| (kv.mod_revision, objects::decode(&kv).map(|s| s.resource))),
        };
        let Some((revision, decoded)) = stored else {
            return Ok(unread);
        };
        let (mut labels, pod_cidrs) = match decoded {
            Ok(Resource::Node(n)) => (n.metadata.labels, n.spec.pod_cidrs),
            _ => (BTreeMap::new(), Vec::new()),
        };
        labels.extend(self.labels.clone());
        Ok(NodeRead {
            labels,
            guard: Some(Precondition::ModRevision(key, revision)),
            pod_cidrs,
        })
    }

    async fn plan(
        &self,
        asked: &Asked,
        s: &Settings,
        affine: &BTreeMap<IpNet, (IpamBlockSpec, i64)>,
        node: &NodeRead,
    ) -> Result<Plans> {
        let req = &asked.req;
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
        let mut plans = Plans::default();
        // Every address choice read the reservations.
        if let Some(g) = &s.reservations_read {
            plans.guard(g.clone());
        }
        if !req.requested_ips.is_empty() {
            for ip in &req.requested_ips {
                self.plan_fixed(&mut plans, *ip, &handle, &secondary, s)
                    .await?;
            }
            return Ok(plans);
        }
        if self.use_pod_cidr && node.pod_cidrs.is_empty() {
            return Err(ClusterIpamError::NoPodCidr {
                node: self.node.clone(),
            }
            .into());
        }
        // In podCIDR mode the families are the podCIDRs' (each must lie in a pool).
        let families: Vec<bool> = [true, false]
            .into_iter()
            .filter(|v4| match self.use_pod_cidr {
                true => node.pod_cidrs.iter().any(|c| c.addr().is_ipv4() == *v4),
                false => s
                    .pools
                    .iter()
                    .any(|p| p.spec.cidr.addr().is_ipv4() == *v4 && !p.spec.disabled),
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
                match alloc::eligible_pools(&s.pools, &self.node, &node.labels, requested, v4) {
                    Ok(p) => p,
                    Err(e) if requested.is_empty() && !v4 && !self.use_pod_cidr => {
                        tracing::debug!(error = %e, "no IPv6 pool for this node");
                        continue;
                    }
                    // A pool named by an annotation: the error names the annotation.
                    Err(e) => match &asked.pools_from[usize::from(!v4)] {
                        Some(source) => return Err(source.error(e.to_string())),
                        None => return Err(e.into()),
                    },
                };
            let pod_cidr = node.pod_cidrs.iter().find(|c| c.addr().is_ipv4() == v4);
            match pod_cidr.filter(|_| self.use_pod_cidr) {
                Some(c) => {
                    self.plan_pod_cidr(&mut plans, *c, &pools, &handle, &secondary, s, affine)
                        .await?
                }
                None => {
                    self.plan_family(&mut plans, &pools, &handle, &secondary, s, affine)
                        .await?
                }
            }
        }
        Ok(plans)
    }

    /// `--use-pod-cidr`: an address in the node's podCIDR `cidr`, the block being created
    /// (affine to the node, guarded by its absence and the pool) when absent. Nothing else is
    /// claimed or borrowed, so a full podCIDR fails the allocation.
    #[allow(clippy::too_many_arguments)]
    async fn plan_pod_cidr(
        &self,
        plans: &mut Plans,
        cidr: IpNet,
        pools: &[&Pool],
        handle: &str,
        secondary: &BTreeMap<String, String>,
        s: &Settings,
        affine: &BTreeMap<IpNet, (IpamBlockSpec, i64)>,
    ) -> Result<()> {
        let (read, guard, new_affinity) = match affine.get(&cidr) {
            // Its own block: checked against the others when it was created.
            Some((spec, rev)) => (
                spec.clone(),
                Precondition::ModRevision(block_key(&cidr), *rev),
                false,
            ),
            None => {
                let (all, claimed) = claimed_blocks(&*self.store).await?;
                let owners: Vec<(IpNet, Option<&str>)> = claimed
                    .iter()
                    .map(|c| {
                        let b = all.iter().find(|(b, _)| b.spec.cidr == *c);
                        (*c, b.and_then(|(b, _)| alloc::block_node(&b.spec)))
                    })
                    .collect();
                let pool = alloc::pod_cidr_pool(&self.node, &cidr, pools, &owners)?;
                match all.iter().find(|(b, _)| b.spec.cidr == cidr) {
                    // Affine to this node (else refused above) but not in the cached view.
                    Some((b, rev)) => (
                        b.spec.clone(),
                        Precondition::ModRevision(block_key(&cidr), *rev),
                        false,
                    ),
                    None => {
                        plans.guard(pool_guard(s, &pool.name)?);
                        (
                            alloc::new_block(cidr, &self.node),
                            Precondition::Absent(block_key(&cidr)),
                            true,
                        )
                    }
                }
            }
        };
        let mut b = plans.base(&cidr, &read);
        let ip = alloc::allocate_in_block(&mut b, handle, secondary, &s.reservations).ok_or_else(
            || ClusterIpamError::PodCidrExhausted {
                node: self.node.clone(),
                pod_cidr: cidr,
            },
        )?;
        plans.add(ip, b, guard, new_affinity);
        Ok(())
    }

    async fn plan_family(
        &self,
        plans: &mut Plans,
        pools: &[&Pool],
        handle: &str,
        secondary: &BTreeMap<String, String>,
        s: &Settings,
        affine: &BTreeMap<IpNet, (IpamBlockSpec, i64)>,
    ) -> Result<()> {
        let in_pools = |c: &IpNet| pools.iter().any(|p| p.spec.cidr.contains(&c.network()));
        // 1. The node's own blocks, in pool order.
        for p in pools {
            for (cidr, (spec, rev)) in affine
                .iter()
                .filter(|(c, _)| p.spec.cidr.contains(&c.network()))
            {
                let mut b = plans.base(cidr, spec);
                if let Some(ip) =
                    alloc::allocate_in_block(&mut b, handle, secondary, &s.reservations)
                {
                    plans.add(
                        ip,
                        b,
                        Precondition::ModRevision(block_key(cidr), *rev),
                        false,
                    );
                    return Ok(());
                }
            }
        }
        // 2. A new block, unless the node has reached its limit.
        let mine = affine.keys().filter(|c| in_pools(c)).count() as u32;
        let (all, mut claimed) = claimed_blocks(&*self.store).await?;
        if s.config.auto_allocate_blocks
            && s.config
                .max_blocks_per_host
                .is_none_or(|m| m == 0 || mine < m)
        {
            // Blocks this plan claims already (the other family's) are claimed too.
            claimed.extend(plans.blocks.keys().copied());
            let reserved: Vec<IpNet> = s.reservations.iter().flat_map(|(_, n)| n.clone()).collect();
            for p in pools {
                if let Some(cidr) = alloc::next_unclaimed_block(&p.spec, &claimed, &reserved) {
                    let mut b = alloc::new_block(cidr, &self.node);
                    if let Some(ip) =
                        alloc::allocate_in_block(&mut b, handle, secondary, &s.reservations)
                    {
                        // The key guards the block; the pool guards its size and range.
                        plans.guard(pool_guard(s, &p.name)?);
                        if let Some(g) = &s.config_read {
                            plans.guard(g.clone());
                        }
                        plans.add(ip, b, Precondition::Absent(block_key(&cidr)), true);
                        return Ok(());
                    }
                }
            }
        }
        // 3. Borrow from another node's block, unless strict affinity forbids it.
        if !s.config.strict_affinity {
            for (b, rev) in all.iter().filter(|(b, _)| {
                in_pools(&b.spec.cidr) && alloc::block_node(&b.spec) != Some(self.node.as_str())
            }) {
                let mut spec = plans.base(&b.spec.cidr, &b.spec);
                if let Some(ip) =
                    alloc::allocate_in_block(&mut spec, handle, secondary, &s.reservations)
                {
                    let guard = Precondition::ModRevision(block_key(&b.spec.cidr), *rev);
                    // Borrowing read strictAffinity (and, to get here, the block limits).
                    if let Some(g) = &s.config_read {
                        plans.guard(g.clone());
                    }
                    plans.add(ip, spec, guard, false);
                    return Ok(());
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
        plans: &mut Plans,
        ip: IpAddr,
        handle: &str,
        secondary: &BTreeMap<String, String>,
        s: &Settings,
    ) -> Result<()> {
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
        // The block holding the address may be of another size than the pool's (left by a pool
        // created again with another blockSize): look among all of them.
        let (all, mut claimed) = claimed_blocks(&*self.store).await?;
        claimed.extend(plans.blocks.keys().copied());
        let (cidr, exists) = alloc::block_for_ip(&pool.spec, ip, &claimed)?;
        let (read, guard, new_affinity) = if plans.blocks.contains_key(&cidr) {
            let p = &plans.blocks[&cidr];
            (p.block.clone(), p.guard.clone(), p.new_affinity)
        } else if exists {
            let Some((b, rev)) = all.into_iter().find(|(b, _)| b.spec.cidr == cidr) else {
                return Err(ClusterError::Corrupt {
                    key: block_key(&cidr),
                    reason: format!("holds {ip}'s block but does not decode"),
                });
            };
            (
                b.spec,
                Precondition::ModRevision(block_key(&cidr), rev),
                false,
            )
        } else {
            plans.guard(pool_guard(s, &pool.name)?);
            (
                alloc::new_block(cidr, &self.node),
                Precondition::Absent(block_key(&cidr)),
                true,
            )
        };
        let mut spec = plans.base(&cidr, &read);
        alloc::allocate_specific(&mut spec, ip, handle, secondary)?;
        plans.add(ip, spec, guard, new_affinity);
        Ok(())
    }

    /// One transaction: blocks (guarded, each written once), affinities for new blocks, the
    /// handle, the endpoint — on condition that the handle is new and the node registered.
    async fn commit(
        &self,
        req: &Request,
        plans: &Plans,
        pod: Option<&Object<PodSpec>>,
        nats: Vec<IpNat>,
    ) -> Result<Option<i64>> {
        let handle = req.handle();
        let mut pre = vec![
            Precondition::Absent(handle_key(&handle)),
            Precondition::Exists(node_key(&self.node)),
        ];
        pre.extend(plans.guards.iter().cloned());
        let mut ops = Vec::new();
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for (cidr, p) in &plans.blocks {
            pre.push(p.guard.clone());
            ops.push(TxnOp::Put(block_key(cidr), block_value(&p.block)));
            if p.new_affinity {
                let name = alloc::affinity_name(&self.node, cidr);
                let aff = BlockAffinitySpec {
                    state: AffinityState::Confirmed,
                    node: self.node.clone(),
                    cidr: *cidr,
                };
                pre.push(Precondition::Absent(affinity_key(&self.node, cidr)));
                ops.push(TxnOp::Put(
                    affinity_key(&self.node, cidr),
                    encode(&Resource::BlockAffinity(obj(name, aff))),
                ));
            }
        }
        // Addresses given without IPAM are in no block: the handle records none of them.
        for (_, cidr) in plans
            .ips
            .iter()
            .filter(|(_, c)| plans.blocks.contains_key(c))
        {
            *counts.entry(cidr.to_string()).or_default() += 1;
        }
        let wep = (!req.no_endpoint).then(|| self.endpoint(req, plans, pod, nats));
        if let Some(w) = &wep {
            // Floating addresses come from outside: checked before anything is written.
            w.validate()?;
        }
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
        let writes = self.observer.as_ref().map(|_| ops.clone());
        match self.store.txn(pre, ops).await? {
            TxnOutcome::Committed { revision } => {
                if let (Some(o), Some(w)) = (&self.observer, writes) {
                    o.committed(revision, &w);
                }
                Ok(Some(revision))
            }
            TxnOutcome::Conflict => Ok(None),
        }
    }

    /// The attachment's endpoint; with its pod's record, born with the pod's labels, service
    /// account and named ports (so a policy selecting the pod applies from the start).
    fn endpoint(
        &self,
        req: &Request,
        plans: &Plans,
        pod: Option<&Object<PodSpec>>,
        ip_nats: Vec<IpNat>,
    ) -> Resource {
        let mut o = obj(
            endpoint_name(&self.node, req),
            WorkloadEndpointSpec {
                orchestrator: Some("trellis".into()),
                node: self.node.clone(),
                container_id: Some(req.container_id.clone()),
                pod: req.pod.clone(),
                endpoint: Some(req.ifname.clone()),
                interface_name: req.host_interface.clone(),
                ip_networks: plans.ips.iter().map(|(ip, _)| IpNet::from(*ip)).collect(),
                ip_nats,
                ..Default::default()
            },
        );
        o.metadata.namespace = Some(endpoint_namespace(req));
        o.metadata
            .annotations
            .insert(HANDLE_ANNOTATION.into(), req.handle());
        o.metadata
            .annotations
            .insert(NETWORK_ANNOTATION.into(), req.network.clone());
        if let Some(uid) = req.pod_uid.as_ref().filter(|u| !u.is_empty()) {
            o.metadata
                .annotations
                .insert(POD_UID_ANNOTATION.into(), uid.clone());
        }
        if let Some(p) = pod {
            stamp_endpoint(p, &mut o.metadata.labels, &mut o.spec);
        }
        Resource::WorkloadEndpoint(o)
    }

    /// Reads the record of the pod `req` names (from the reader given, or after a conflict from
    /// the store) and decides whether it is this attachment's pod: a record scheduled on
    /// another node is an earlier pod of that name. Whatever was read is guarded: the record's
    /// revision, or its absence — a record written meanwhile makes the commit decide again.
    async fn read_pod(&self, req: &Request, fresh: bool) -> Result<PodRead> {
        let Some(pod) = req.pod.as_deref().filter(|_| !req.no_endpoint) else {
            return Ok(PodRead::default());
        };
        let namespace = endpoint_namespace(req);
        let key = key_for(Kind::Pod, Some(&namespace), pod);
        // A miss in the view is final only outside Kubernetes mode (the Absent guard then
        // catches a record the view has not seen yet).
        let view = self.pods.as_deref();
        let (found, guard) =
            records::read(&*self.store, view, key, fresh, self.require_pods).await?;
        let record = match found {
            Some(Resource::Pod(p)) if p.is_for(&self.node, req.pod_uid.as_deref()) => Some(p),
            _ => None,
        };
        if record.is_none() && self.require_pods {
            return Err(ClusterError::PodNotSynced {
                namespace,
                pod: pod.to_string(),
                node: self.node.clone(),
            });
        }
        Ok(PodRead {
            record,
            guard: Some(guard),
        })
    }

    /// Reads the record of the namespace `req` names (as [`NodeIpam::read_pod`] does: from
    /// the reader, or after a conflict from the store), for its pool annotations; guarded like
    /// the pod's. A request naming no namespace reads none.
    async fn read_namespace(
        &self,
        req: &Request,
        fresh: bool,
    ) -> Result<RecordRead<NamespaceSpec>> {
        let Some(ns) = req
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty() && !req.no_endpoint)
        else {
            return Ok(RecordRead::default());
        };
        let key = key_for(Kind::Namespace, None, ns);
        // The view's miss is guarded by the Absent it gives.
        let view = self.pods.as_deref();
        let (found, guard) = records::read(&*self.store, view, key, fresh, false).await?;
        Ok(RecordRead {
            record: match found {
                Some(Resource::Namespace(n)) => Some(n),
                _ => None,
            },
            guard: Some(guard),
        })
    }

    /// Releases an attachment's addresses (idempotent) and forgets cached copies.
    pub async fn release(&self, req: &Request) -> Result<Vec<IpAddr>> {
        let mut st = self.state.lock().await;
        let released = release_attachment(&*self.store, req, self.clock.now_secs()).await?;
        if !released.is_empty() {
            st.affine = None;
        }
        Ok(released)
    }

    /// Deletes this node's blocks that have been empty for `grace`; returns their CIDRs. Each
    /// deletion is guarded by the block's and its affinity's revisions as read.
    pub async fn release_empty_blocks(&self, grace: Duration) -> Result<Vec<IpNet>> {
        let mut st = self.state.lock().await;
        let now = self.clock.now_secs();
        let mut released = Vec::new();
        for (b, rev) in objects::blocks(&*self.store).await? {
            if alloc::block_node(&b.spec) != Some(self.node.as_str())
                || !alloc::releasable(&b.spec, now, grace.as_secs())
            {
                continue;
            }
            let aff = self
                .store
                .get(&affinity_key(&self.node, &b.spec.cidr))
                .await?;
            let (pre, ops) = delete_block_txn(&b.spec, rev, aff.map(|kv| kv.mod_revision), false);
            if let TxnOutcome::Committed { .. } = self.store.txn(pre, ops).await? {
                released.push(b.spec.cidr);
            }
        }
        if !released.is_empty() {
            st.affine = None;
        }
        Ok(released)
    }
}
