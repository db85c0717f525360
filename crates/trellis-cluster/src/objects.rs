//! Typed resource access: decode-and-validate on read, compare-and-swap on write.

use trellis_resources::validate::PoolIndex;
use trellis_resources::{key_for, Kind, Object, Resource, ResourceError};
use trellis_store::{Datastore, KeyValue, Precondition, StoreError, TxnOp, TxnOutcome};

use crate::invalid::Invalid;
use crate::{ClusterError, Result};

/// A resource with the revision it was read at (the compare-and-swap token).
#[derive(Debug, Clone)]
pub struct Stored {
    pub resource: Resource,
    pub revision: i64,
}

/// Decodes a stored value; anything invalid is reported with its key. A valid resource stored
/// under another object's key (another kind, name or namespace) is invalid too: reads and
/// writes by name would otherwise act on a different record than the one listed — and so is a
/// block whose name is not the one its CIDR gives.
pub fn decode(kv: &KeyValue) -> Result<Stored> {
    let corrupt = |reason: String| ClusterError::Corrupt {
        key: kv.key.clone(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_slice(&kv.value).map_err(|e| corrupt(e.to_string()))?;
    let resource = Resource::from_value(&v).map_err(|e| corrupt(e.to_string()))?;
    if resource.key() != kv.key {
        return Err(corrupt(format!(
            "it holds {} {}, whose key is {}",
            resource.kind(),
            resource.metadata().name,
            resource.key()
        )));
    }
    // IPAM writes a block only at the key its CIDR names. One at another block's key (written
    // by hand) read as a second copy of that block: allocations planned on it were committed
    // against the real block's key and never succeeded, stopping the node's ADDs.
    if let Resource::IpamBlock(b) = &resource {
        let named = trellis_ipam::cluster::block_name(&b.spec.cidr);
        if b.metadata.name != named {
            return Err(corrupt(format!(
                "it holds block {}, whose name is {named}",
                b.spec.cidr
            )));
        }
    }
    Ok(Stored {
        resource,
        revision: kv.mod_revision,
    })
}

/// The stored bytes of a resource.
pub fn encode(r: &Resource) -> Vec<u8> {
    let mut r = r.clone();
    r.metadata_mut().resource_version = None;
    serde_json::to_vec(&r.to_value()).expect("resources serialise")
}

pub async fn get(
    store: &dyn Datastore,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
) -> Result<Option<Stored>> {
    match store.get(&key_for(kind, namespace, name)).await? {
        Some(kv) => Ok(Some(decode(&kv)?)),
        None => Ok(None),
    }
}

/// A listing: the objects that decode, and the records that do not.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub items: Vec<Stored>,
    pub invalid: Vec<Invalid>,
    /// The store revision the listing reflects.
    pub revision: i64,
}

/// Every record of a kind, sorted into valid objects and invalid records; reports nothing.
pub async fn list_checked(store: &dyn Datastore, kind: Kind) -> Result<Listing> {
    let listing = store.list(&kind.prefix()).await?;
    let mut out = Listing {
        revision: listing.revision,
        ..Default::default()
    };
    for kv in listing.items {
        match decode(&kv) {
            Ok(s) => out.items.push(s),
            Err(e) => out.invalid.push(Invalid {
                reason: match e {
                    ClusterError::Corrupt { reason, .. } => reason,
                    other => other.to_string(),
                },
                key: kv.key,
                revision: kv.mod_revision,
            }),
        }
    }
    Ok(out)
}

/// Every valid object of a kind. A record that does not decode is skipped — one bad record
/// must not stop every reader — and reported through [`crate::invalid`] (logged once per key
/// and revision, counted for metrics).
pub async fn list(store: &dyn Datastore, kind: Kind) -> Result<Vec<Stored>> {
    let l = list_checked(store, kind).await?;
    crate::invalid::observe_listing(kind, &l.invalid);
    Ok(l.items)
}

macro_rules! typed_list {
    ($fn:ident, $variant:ident, $spec:ty) => {
        /// Every object of this kind, typed, with revisions.
        pub async fn $fn(store: &dyn Datastore) -> Result<Vec<(Object<$spec>, i64)>> {
            Ok(list(store, Kind::$variant)
                .await?
                .into_iter()
                .filter_map(|s| match s.resource {
                    Resource::$variant(o) => Some((o, s.revision)),
                    _ => None,
                })
                .collect())
        }
    };
}

typed_list!(pools, IpPool, trellis_resources::IpPoolSpec);
typed_list!(bgp_peers, BgpPeer, trellis_resources::BgpPeerSpec);
typed_list!(bgp_filters, BgpFilter, trellis_resources::BgpFilterSpec);
typed_list!(
    bgp_configurations,
    BgpConfiguration,
    trellis_resources::BgpConfigurationSpec
);
typed_list!(bgp_statuses, BgpStatus, trellis_resources::BgpStatusSpec);
typed_list!(nodes, Node, trellis_resources::NodeSpec);
typed_list!(blocks, IpamBlock, trellis_resources::IpamBlockSpec);
typed_list!(handles, IpamHandle, trellis_resources::IpamHandleSpec);
typed_list!(
    affinities,
    BlockAffinity,
    trellis_resources::BlockAffinitySpec
);
typed_list!(
    reservations,
    IpReservation,
    trellis_resources::IpReservationSpec
);
typed_list!(
    endpoints,
    WorkloadEndpoint,
    trellis_resources::WorkloadEndpointSpec
);

/// Whether only IPAM writes records of `kind`: blocks, handles and affinities change only
/// through ADD/DEL, `ipam release`, `ipam gc` and node deletion, whose transactions keep an
/// address recorded for at most one attachment. A generic write or deletion bypasses that: a
/// deleted handle makes its live addresses leaks that GC frees for the next ADD, a deleted block
/// is claimed again and its addresses handed out again, an applied block read earlier drops the
/// allocations made since.
pub fn ipam_managed(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::IpamBlock | Kind::IpamHandle | Kind::BlockAffinity
    )
}

fn managed_reason(kind: Kind) -> String {
    format!(
        "{kind} records are written only by IPAM (ADD/DEL, trellis ipam release, trellis ipam gc, deleting a node); writing or deleting one by hand could give an address to two pods"
    )
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Updated,
    Unchanged,
}

/// Creates or replaces `r` (after cross-object checks such as pool overlap). `create_only`
/// refuses to replace. Retries on concurrent writers. One document of [`apply_all`].
pub async fn apply(store: &dyn Datastore, r: &Resource, create_only: bool) -> Result<Applied> {
    let applied = apply_all(store, std::slice::from_ref(r), create_only)
        .await
        .map_err(|e| match e {
            ClusterError::Invalid(mut e) => {
                e.doc = None;
                ClusterError::Invalid(e)
            }
            other => other,
        })?;
    Ok(applied[0])
}

/// Attempts of [`apply_all`] before it reports contention.
const APPLY_ATTEMPTS: u32 = 20;

/// Writes every resource or none: validates all of them against each other and against what
/// is stored (duplicates, `create` on existing objects, pool overlap, pool CIDR/blockSize
/// immutability), then commits them in one transaction whose preconditions cover every key
/// read — each document's key and, when pools are written, the whole pool listing — so a
/// concurrent writer makes it conflict, and validation runs again on fresh reads. Errors name
/// the document (1-based position in `resources`). The outcomes, in input order, hold once the
/// transaction committed.
pub async fn apply_all(
    store: &dyn Datastore,
    resources: &[Resource],
    create_only: bool,
) -> Result<Vec<Applied>> {
    for _ in 0..APPLY_ATTEMPTS {
        let observed = observe(store, resources).await?;
        let plan = plan_all(resources, &observed, create_only)?;
        if plan.puts.is_empty() {
            // Nothing to write: every document equals what was read.
            return Ok(plan.applied);
        }
        match store.txn(plan.preconditions, plan.puts).await {
            Ok(TxnOutcome::Committed { .. }) => return Ok(plan.applied),
            Ok(TxnOutcome::Conflict) => {}
            Err(StoreError::TxnTooLarge { reason, .. }) => {
                return Err(ClusterError::Invalid(ResourceError {
                    doc: None,
                    object: None,
                    field: "document".into(),
                    reason: format!(
                        "{} documents do not fit in one datastore transaction ({reason}); \
                         nothing was applied — split the input",
                        resources.len()
                    ),
                }))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ClusterError::Contention {
        what: match resources {
            [one] => one.key(),
            _ => format!("{} documents", resources.len()),
        },
        attempts: APPLY_ATTEMPTS,
    })
}

/// What [`apply_all`] reads before deciding.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The stored value at each resource's key, in input order.
    pub current: Vec<Option<KeyValue>>,
    /// Every stored pool, when the input holds a pool.
    pub pools: Option<trellis_store::Listing>,
    /// The stored Tier of each tier the input's policies name (other than `default` and the
    /// tiers the input writes itself).
    pub tiers: std::collections::BTreeMap<String, Option<KeyValue>>,
}

async fn observe(store: &dyn Datastore, resources: &[Resource]) -> Result<Observed> {
    let mut current = Vec::with_capacity(resources.len());
    for r in resources {
        current.push(store.get(&r.key()).await?);
    }
    let pools = if resources.iter().any(|r| r.kind() == Kind::IpPool) {
        Some(store.list(&Kind::IpPool.prefix()).await?)
    } else {
        None
    };
    let mut tiers = std::collections::BTreeMap::new();
    for t in tiers_needed(resources) {
        let kv = store.get(&key_for(Kind::Tier, None, &t)).await?;
        tiers.insert(t, kv);
    }
    Ok(Observed {
        current,
        pools,
        tiers,
    })
}

/// The tier a Calico policy belongs to (`None` for other kinds).
fn policy_tier(r: &Resource) -> Option<&str> {
    match r {
        Resource::NetworkPolicy(p) => Some(p.spec.tier_name()),
        Resource::GlobalNetworkPolicy(p) => Some(p.spec.tier_name()),
        _ => None,
    }
}

/// Tiers the input's policies name that must already be stored: not `default` (implicit) and
/// not written by the input itself.
fn tiers_needed(resources: &[Resource]) -> std::collections::BTreeSet<String> {
    let written: std::collections::BTreeSet<&str> = resources
        .iter()
        .filter(|r| r.kind() == Kind::Tier)
        .map(|r| r.metadata().name.as_str())
        .collect();
    resources
        .iter()
        .filter_map(policy_tier)
        .filter(|t| *t != trellis_resources::policy::DEFAULT_TIER && !written.contains(t))
        .map(str::to_string)
        .collect()
}

/// The decided write: outcomes in input order, and the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub applied: Vec<Applied>,
    pub preconditions: Vec<Precondition>,
    pub puts: Vec<TxnOp>,
}

/// Decides an all-or-nothing write of `resources` from what was read (pure). The first
/// document that cannot be written fails the whole plan, named by its 1-based number.
pub fn plan_all(resources: &[Resource], observed: &Observed, create_only: bool) -> Result<Plan> {
    let mut plan = Plan {
        applied: Vec::with_capacity(resources.len()),
        preconditions: Vec::new(),
        puts: Vec::new(),
    };
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    let keys: std::collections::HashSet<String> = resources.iter().map(Resource::key).collect();
    let stored_pools = stored_pools(observed, &keys)?;
    // Indexed, so that a file of many pools is checked in O(n log n), not O(n²).
    let stored_index = PoolIndex::new(&stored_pools);
    let mut earlier_pools = PoolIndex::default();
    let needed_tiers = tiers_needed(resources);
    for (i, r) in resources.iter().enumerate() {
        let doc = i + 1;
        let key = r.key();
        let at = |field: &str, reason: String| {
            ClusterError::Invalid(ResourceError {
                doc: Some(doc),
                object: Some(format!("{}/{}", r.kind(), r.metadata().name)),
                field: field.into(),
                reason,
            })
        };
        r.validate().map_err(|mut e| {
            e.doc = Some(doc);
            ClusterError::Invalid(e)
        })?;
        if ipam_managed(r.kind()) {
            return Err(at("kind", managed_reason(r.kind())));
        }
        if let Some(first) = seen.insert(key.clone(), doc) {
            return Err(at(
                "metadata.name",
                format!("is also document {first}; give each object once"),
            ));
        }
        let current = observed.current.get(i).cloned().flatten();
        if create_only && current.is_some() {
            return Err(at(
                "metadata.name",
                "already exists (create does not replace; use apply)".into(),
            ));
        }
        if let Resource::IpPool(p) = r {
            check_pool(p, current.as_ref(), &stored_index, &earlier_pools).map_err(|mut e| {
                e.doc = Some(doc);
                ClusterError::Invalid(e)
            })?;
            earlier_pools.insert(p);
        }
        if let Some(tier) = policy_tier(r).filter(|t| needed_tiers.contains(*t)) {
            // Calico refuses a policy in a tier that does not exist; the tier must stay until
            // the write commits.
            let stored = observed.tiers.get(tier).and_then(Option::as_ref);
            let Some(kv) = stored else {
                return Err(at(
                    "spec.tier",
                    format!(
                        "tier {tier:?} does not exist; create the Tier first (or in the same file)"
                    ),
                ));
            };
            decode(kv)?;
            let pre = Precondition::ModRevision(kv.key.clone(), kv.mod_revision);
            if !plan.preconditions.contains(&pre) {
                plan.preconditions.push(pre);
            }
        }
        let bytes = encode(r);
        let (pre, applied) = match &current {
            Some(kv) if kv.value == bytes => (
                Precondition::ModRevision(key.clone(), kv.mod_revision),
                Applied::Unchanged,
            ),
            Some(kv) => (
                Precondition::ModRevision(key.clone(), kv.mod_revision),
                Applied::Updated,
            ),
            None => (Precondition::Absent(key.clone()), Applied::Created),
        };
        plan.preconditions.push(pre);
        if applied != Applied::Unchanged {
            plan.puts.push(TxnOp::Put(key, bytes));
        }
        plan.applied.push(applied);
    }
    if let Some(listing) = &observed.pools {
        // The overlap checks read every stored pool: none may change or appear before commit.
        // One condition over the prefix says so; a pool deleted meanwhile only removes a
        // possible overlap, so per-pool conditions would add nothing but size (etcd refuses a
        // transaction of more than 128 conditions: with that many pools stored, no pool could
        // be applied).
        plan.preconditions.push(Precondition::NoneNewer {
            prefix: Kind::IpPool.prefix(),
            revision: listing.revision,
        });
    }
    Ok(plan)
}

/// The stored pools the overlap check compares with. A stored pool that does not decode is an
/// error naming its key (its range is unknown), unless this write replaces it.
fn stored_pools(
    observed: &Observed,
    written: &std::collections::HashSet<String>,
) -> Result<Vec<Object<trellis_resources::IpPoolSpec>>> {
    let Some(listing) = &observed.pools else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for kv in &listing.items {
        match decode(kv) {
            Ok(Stored {
                resource: Resource::IpPool(p),
                ..
            }) => out.push(p),
            Ok(_) => {}
            Err(_) if written.contains(&kv.key) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// A pool against the stored one it replaces (CIDR and block size are immutable), every other
/// stored pool and the pools written before it in the same input (no overlap).
fn check_pool(
    p: &Object<trellis_resources::IpPoolSpec>,
    current: Option<&KeyValue>,
    stored: &PoolIndex<'_>,
    earlier: &PoolIndex<'_>,
) -> std::result::Result<(), ResourceError> {
    let object = || Some(format!("IPPool/{}", p.metadata.name));
    let immutable = |field: &str, what: String| ResourceError {
        doc: None,
        object: object(),
        field: field.into(),
        reason: format!("{what} cannot change; create a new pool and disable this one"),
    };
    if let Some(Ok(Stored {
        resource: Resource::IpPool(old),
        ..
    })) = current.map(decode)
    {
        if old.spec.cidr != p.spec.cidr {
            return Err(immutable(
                "spec.cidr",
                format!("the cidr of pool {} ({})", p.metadata.name, old.spec.cidr),
            ));
        }
        if old.spec.block_prefix() != p.spec.block_prefix() {
            return Err(immutable(
                "spec.blockSize",
                format!(
                    "the blockSize of pool {} ({})",
                    p.metadata.name,
                    old.spec.block_prefix()
                ),
            ));
        }
    }
    stored.check(p)?;
    earlier.check(p)
}

/// Deletes an object; `NotFound` when it is not there. Records only IPAM writes
/// ([`ipam_managed`]) are refused.
pub async fn delete(
    store: &dyn Datastore,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
) -> Result<()> {
    if ipam_managed(kind) {
        return Err(ClusterError::Invalid(ResourceError {
            doc: None,
            object: Some(format!("{kind}/{name}")),
            field: "kind".into(),
            reason: managed_reason(kind),
        }));
    }
    let target = Target {
        kind,
        namespace: namespace.map(str::to_string),
        name: name.to_string(),
    };
    match delete_all(store, std::slice::from_ref(&target)).await?[0] {
        true => Ok(()),
        false => Err(ClusterError::NotFound {
            kind: kind.to_string(),
            name: name.to_string(),
        }),
    }
}

/// An object to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
}

impl Target {
    pub fn of(r: &Resource) -> Target {
        Target {
            kind: r.kind(),
            namespace: r.metadata().namespace.clone(),
            name: r.metadata().name.clone(),
        }
    }

    pub fn key(&self) -> String {
        key_for(self.kind, self.namespace.as_deref(), &self.name)
    }
}

/// What [`delete_all`] reads before deciding.
#[derive(Debug, Clone, Default)]
pub struct DeleteObserved {
    /// The stored value at each target's key, in input order.
    pub current: Vec<Option<KeyValue>>,
    /// Every stored Calico policy, namespaced and global (in [`TIER_USERS`] order), when a
    /// Tier is deleted.
    pub policies: Vec<trellis_store::Listing>,
}

/// The kinds whose objects name a tier.
pub const TIER_USERS: [Kind; 2] = [Kind::NetworkPolicy, Kind::GlobalNetworkPolicy];

/// Deletes every target that exists, in one transaction; returns, in input order, whether
/// each existed. A Tier that a policy not deleted with it still names is refused (as Calico
/// does), on condition that no policy appears or changes before the commit. Retries on
/// concurrent writers.
pub async fn delete_all(store: &dyn Datastore, targets: &[Target]) -> Result<Vec<bool>> {
    if let Some(t) = targets.iter().find(|t| ipam_managed(t.kind)) {
        return Err(ClusterError::Invalid(ResourceError {
            doc: None,
            object: Some(format!("{}/{}", t.kind, t.name)),
            field: "kind".into(),
            reason: managed_reason(t.kind),
        }));
    }
    for _ in 0..APPLY_ATTEMPTS {
        let mut observed = DeleteObserved::default();
        for t in targets {
            observed.current.push(store.get(&t.key()).await?);
        }
        if targets.iter().any(|t| t.kind == Kind::Tier) {
            for k in TIER_USERS {
                observed.policies.push(store.list(&k.prefix()).await?);
            }
        }
        let (pre, ops, existed) = plan_delete(targets, &observed)?;
        if ops.is_empty() {
            return Ok(existed);
        }
        if let TxnOutcome::Committed { .. } = store.txn(pre, ops).await? {
            return Ok(existed);
        }
    }
    Err(ClusterError::Contention {
        what: match targets {
            [one] => one.key(),
            _ => format!("{} objects", targets.len()),
        },
        attempts: APPLY_ATTEMPTS,
    })
}

/// Decides [`delete_all`]'s transaction from what was read (pure).
pub fn plan_delete(
    targets: &[Target],
    observed: &DeleteObserved,
) -> Result<(Vec<Precondition>, Vec<TxnOp>, Vec<bool>)> {
    let mut pre = Vec::new();
    let mut ops = Vec::new();
    let mut existed = Vec::with_capacity(targets.len());
    let deleted: std::collections::HashSet<String> = targets.iter().map(Target::key).collect();
    for (i, t) in targets.iter().enumerate() {
        let Some(kv) = observed.current.get(i).cloned().flatten() else {
            existed.push(false);
            continue;
        };
        if t.kind == Kind::Tier {
            if let Some(user) = tier_user(&t.name, &observed.policies, &deleted) {
                return Err(ClusterError::Invalid(ResourceError {
                    doc: None,
                    object: Some(format!("Tier/{}", t.name)),
                    field: "metadata.name".into(),
                    reason: format!("is still used by {user}; delete its policies first"),
                }));
            }
        }
        let p = Precondition::ModRevision(kv.key.clone(), kv.mod_revision);
        if !pre.contains(&p) {
            pre.push(p);
            ops.push(TxnOp::Delete(kv.key));
        }
        existed.push(true);
    }
    if !ops.is_empty() {
        // The "no policy uses this tier" decision read these listings.
        for (k, l) in TIER_USERS.iter().zip(&observed.policies) {
            pre.push(Precondition::NoneNewer {
                prefix: k.prefix(),
                revision: l.revision,
            });
        }
    }
    Ok((pre, ops, existed))
}

/// The first stored policy (not being deleted) in `tier`; policies that do not decode are
/// skipped (they are reported wherever they are read).
fn tier_user(
    tier: &str,
    listings: &[trellis_store::Listing],
    deleted: &std::collections::HashSet<String>,
) -> Option<String> {
    listings
        .iter()
        .flat_map(|l| &l.items)
        .filter(|kv| !deleted.contains(&kv.key))
        .filter_map(|kv| decode(kv).ok())
        .find(|s| policy_tier(&s.resource) == Some(tier))
        .map(|s| {
            let r = &s.resource;
            match &r.metadata().namespace {
                Some(ns) => format!("{} {ns}/{}", r.kind(), r.metadata().name),
                None => format!("{} {}", r.kind(), r.metadata().name),
            }
        })
}

/// Read-modify-write with compare-and-swap on the revision that was read: `f` gets the current
/// object (if any) and returns the new one; retried when someone else wrote in between, so no
/// update is lost.
pub async fn update(
    store: &dyn Datastore,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
    mut f: impl FnMut(Option<Resource>) -> Resource,
) -> Result<Applied> {
    let key = key_for(kind, namespace, name);
    for _ in 0..20 {
        let current = store.get(&key).await?;
        let (pre, old, applied) = match &current {
            Some(kv) => (
                Precondition::ModRevision(key.clone(), kv.mod_revision),
                Some(decode(kv)?.resource),
                Applied::Updated,
            ),
            None => (Precondition::Absent(key.clone()), None, Applied::Created),
        };
        let new = f(old);
        new.validate()?;
        let bytes = encode(&new);
        if current.as_ref().is_some_and(|kv| kv.value == bytes) {
            return Ok(Applied::Unchanged);
        }
        if let TxnOutcome::Committed { .. } = store
            .txn(vec![pre], vec![TxnOp::Put(key.clone(), bytes)])
            .await?
        {
            return Ok(applied);
        }
    }
    Err(ClusterError::Contention {
        what: key,
        attempts: 20,
    })
}
