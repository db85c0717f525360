//! Typed resource access: decode-and-validate on read, compare-and-swap on write.

use trellis_resources::validate::check_pool_overlap;
use trellis_resources::{key_for, Kind, Object, Resource};
use trellis_store::{Datastore, KeyValue, Precondition, TxnOp, TxnOutcome};

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
/// writes by name would otherwise act on a different record than the one listed.
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
}

/// Every record of a kind, sorted into valid objects and invalid records; reports nothing.
pub async fn list_checked(store: &dyn Datastore, kind: Kind) -> Result<Listing> {
    let mut out = Listing::default();
    for kv in store.list(&kind.prefix()).await?.items {
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

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Updated,
    Unchanged,
}

/// Creates or replaces `r` (after cross-object checks such as pool overlap). `create_only`
/// refuses to replace. Retries on concurrent writers.
pub async fn apply(store: &dyn Datastore, r: &Resource, create_only: bool) -> Result<Applied> {
    r.validate()?;
    for _ in 0..20 {
        if let Resource::IpPool(p) = r {
            let others: Vec<_> = pools(store).await?.into_iter().map(|(o, _)| o).collect();
            check_pool_overlap(p, &others)?;
            if let Some(old) = others.iter().find(|o| o.metadata.name == p.metadata.name) {
                if old.spec.cidr != p.spec.cidr || old.spec.block_prefix() != p.spec.block_prefix()
                {
                    return Err(trellis_resources::ResourceError::field(
                        "spec.cidr",
                        format!("cidr and blockSize of pool {} cannot change; create a new pool and disable this one", p.metadata.name),
                    )
                    .into());
                }
            }
        }
        let key = r.key();
        let current = store.get(&key).await?;
        let (pre, applied) = match &current {
            Some(_) if create_only => {
                return Err(ClusterError::AlreadyExists {
                    kind: r.kind().to_string(),
                    name: r.metadata().name.clone(),
                })
            }
            Some(kv) if kv.value == encode(r) => return Ok(Applied::Unchanged),
            Some(kv) => (
                Precondition::ModRevision(key.clone(), kv.mod_revision),
                Applied::Updated,
            ),
            None => (Precondition::Absent(key.clone()), Applied::Created),
        };
        if let TxnOutcome::Committed { .. } = store
            .txn(vec![pre], vec![TxnOp::Put(key, encode(r))])
            .await?
        {
            return Ok(applied);
        }
    }
    Err(ClusterError::Contention {
        what: r.key(),
        attempts: 20,
    })
}

/// Deletes an object; `NotFound` when it is not there.
pub async fn delete(
    store: &dyn Datastore,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
) -> Result<()> {
    let key = key_for(kind, namespace, name);
    let Some(kv) = store.get(&key).await? else {
        return Err(ClusterError::NotFound {
            kind: kind.to_string(),
            name: name.to_string(),
        });
    };
    match store
        .txn(
            vec![Precondition::ModRevision(key.clone(), kv.mod_revision)],
            vec![TxnOp::Delete(key)],
        )
        .await?
    {
        TxnOutcome::Committed { .. } => Ok(()),
        TxnOutcome::Conflict => Err(ClusterError::Contention {
            what: format!("{kind} {name}"),
            attempts: 1,
        }),
    }
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
