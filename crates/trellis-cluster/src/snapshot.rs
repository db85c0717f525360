//! One consistent read of the IPAM records (one datastore listing, so every record is as of the
//! same revision): pools, registered node names, blocks, handles, affinities and workload
//! endpoints, each with its key and revision — the input of `ipam check` and of GC's planner.
//! Reads through the datastore; a record that does not decode fails the read, naming its key,
//! because judging leaks without it could free addresses that are in use.

use std::collections::{BTreeMap, BTreeSet};

use trellis_resources::{
    BlockAffinitySpec, IpPoolSpec, IpamBlockSpec, IpamHandleSpec, Kind, Object, Resource,
    WorkloadEndpointSpec, KEY_ROOT,
};
use trellis_store::{Datastore, KeyValue, TxnOp};

use crate::objects;
use crate::Result;

/// A record as read: the object, its key and its revision (the compare-and-swap token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read<S> {
    pub object: Object<S>,
    pub key: String,
    pub rev: i64,
}

/// The IPAM records at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The store revision of the read.
    pub revision: i64,
    pub pools: Vec<Read<IpPoolSpec>>,
    /// Names of the registered nodes (a node exists when its key does).
    pub nodes: BTreeSet<String>,
    pub blocks: Vec<Read<IpamBlockSpec>>,
    /// By handle name (the name in its key).
    pub handles: BTreeMap<String, Read<IpamHandleSpec>>,
    /// By name.
    pub affinities: BTreeMap<String, Read<BlockAffinitySpec>>,
    /// By key.
    pub endpoints: BTreeMap<String, Read<WorkloadEndpointSpec>>,
}

impl Snapshot {
    /// Reads every IPAM record in one listing.
    pub async fn read(store: &dyn Datastore) -> Result<Snapshot> {
        let listing = store.list(&format!("{KEY_ROOT}/")).await?;
        let mut snap = Snapshot {
            revision: listing.revision,
            ..Default::default()
        };
        for kv in &listing.items {
            snap.insert(kv)?;
        }
        Ok(snap)
    }

    /// Takes in one record whose key is not in the snapshot yet.
    fn insert(&mut self, kv: &KeyValue) -> Result<()> {
        if let Some(name) = kv.key.strip_prefix(&Kind::Node.prefix()) {
            self.nodes.insert(name.to_string());
            return Ok(());
        }
        let wanted = [
            Kind::IpPool,
            Kind::IpamBlock,
            Kind::IpamHandle,
            Kind::BlockAffinity,
            Kind::WorkloadEndpoint,
        ];
        if !wanted.iter().any(|k| kv.key.starts_with(&k.prefix())) {
            return Ok(());
        }
        let (key, rev) = (kv.key.clone(), kv.mod_revision);
        match objects::decode(kv)?.resource {
            Resource::IpPool(object) => self.pools.push(Read { object, key, rev }),
            Resource::IpamBlock(object) => self.blocks.push(Read { object, key, rev }),
            Resource::IpamHandle(object) => {
                self.insert_read_handle(Read { object, key, rev });
            }
            Resource::BlockAffinity(object) => {
                let name = object.metadata.name.clone();
                self.affinities.insert(name, Read { object, key, rev });
            }
            Resource::WorkloadEndpoint(object) => {
                self.endpoints
                    .insert(key.clone(), Read { object, key, rev });
            }
            _ => {}
        }
        Ok(())
    }

    /// Takes in a handle record under its name — the name its key holds, which allocations
    /// refer to and preconditions check — whatever its `handleID` says.
    pub fn insert_read_handle(&mut self, h: Read<IpamHandleSpec>) {
        self.handles.insert(h.object.metadata.name.clone(), h);
    }

    fn delete(&mut self, key: &str) {
        if let Some(name) = key.strip_prefix(&Kind::Node.prefix()) {
            self.nodes.remove(name);
        }
        self.pools.retain(|r| r.key != key);
        self.blocks.retain(|r| r.key != key);
        self.handles.retain(|_, r| r.key != key);
        self.affinities.retain(|_, r| r.key != key);
        self.endpoints.remove(key);
    }

    /// The snapshot after this process committed `ops` at `revision` — what a fresh read would
    /// show if nobody else wrote (if someone did, the next guarded commit finds out).
    pub fn apply(&mut self, ops: &[TxnOp], revision: i64) -> Result<()> {
        for op in ops {
            match op {
                TxnOp::Put(key, value) => {
                    self.delete(key);
                    self.insert(&KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: revision,
                        mod_revision: revision,
                    })?
                }
                TxnOp::Delete(key) => self.delete(key),
            }
        }
        self.revision = revision;
        Ok(())
    }
}
