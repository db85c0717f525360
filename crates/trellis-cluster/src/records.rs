//! The records an allocation reads besides IPAM's own — its pod's and its namespace's, written
//! by the kube-controller — each from the agent's view first (from the store after a conflict,
//! or where the view cannot be trusted to have it), and guarded at commit by its revision as
//! read, or by its absence, so a record written meanwhile makes the commit decide again. Does
//! datastore I/O.

use trellis_resources::{Object, Resource};
use trellis_store::{Datastore, Precondition};

use crate::ipam::PodRecords;
use crate::{objects, Result};

/// What an allocation read of one record: the record (when usable) and its commit's guard.
pub(crate) struct RecordRead<S> {
    pub record: Option<Object<S>>,
    pub guard: Option<Precondition>,
}

impl<S> Default for RecordRead<S> {
    fn default() -> Self {
        RecordRead {
            record: None,
            guard: None,
        }
    }
}

/// The record at `key` — from `view` unless `fresh`; from the store when there is no view,
/// when `fresh`, or on a miss in the view with `store_on_miss` — and the guard of what was
/// read. A stored record that does not decode is logged and counts as absent, guarded by its
/// revision.
pub(crate) async fn read(
    store: &dyn Datastore,
    view: Option<&dyn PodRecords>,
    key: String,
    fresh: bool,
    store_on_miss: bool,
) -> Result<(Option<Resource>, Precondition)> {
    if let (Some(view), false) = (view, fresh) {
        if let Some(s) = view.pod_record(&key) {
            return Ok((Some(s.resource), Precondition::ModRevision(key, s.revision)));
        }
        if !store_on_miss {
            return Ok((None, Precondition::Absent(key)));
        }
    }
    let Some(kv) = store.get(&key).await? else {
        return Ok((None, Precondition::Absent(key)));
    };
    let guard = Precondition::ModRevision(key, kv.mod_revision);
    match objects::decode(&kv) {
        Ok(s) => Ok((Some(s.resource), guard)),
        Err(e) => {
            tracing::warn!(error = %e, "skipping an invalid stored record");
            Ok((None, guard))
        }
    }
}
