//! `trellis label`: edits the labels of a pod (its WorkloadEndpoints, found by namespace and
//! `spec.pod`) or a Namespace with kubectl's rules, as one compare-and-swap transaction over
//! what was read. I/O through [`Datastore`]; the decision is the pure [`plan`].

use trellis_resources::labels::{self, LabelChange};
use trellis_resources::{key_for, Kind, Resource, LABEL_NAMESPACE_NAME};
use trellis_store::{Datastore, KeyValue, Listing, Precondition, TxnOp, TxnOutcome};

use crate::objects::{decode, encode};
use crate::{ClusterError, Result};

/// What to relabel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelTarget {
    /// Every WorkloadEndpoint of the pod (one per interface).
    Pod {
        namespace: String,
        pod: String,
    },
    Namespace(String),
}

impl LabelTarget {
    fn describe(&self) -> String {
        match self {
            LabelTarget::Pod { namespace, pod } => format!("pod {namespace}/{pod}"),
            LabelTarget::Namespace(n) => format!("namespace {n}"),
        }
    }
}

/// What a relabel did, per object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labelled {
    /// `Kind/name` of each object and whether its labels changed.
    pub objects: Vec<(String, bool)>,
    /// Keys asked to be removed that an object did not have.
    pub not_found: Vec<String>,
}

/// Attempts before reporting contention.
const ATTEMPTS: u32 = 20;

/// Applies `changes` to the target's labels in one transaction, guarded by the revision of
/// every object read and, for a pod, by "no endpoint of the namespace appeared or changed"
/// (an endpoint of the pod created meanwhile is not missed). Retries on concurrent writers.
pub async fn label(
    store: &dyn Datastore,
    target: &LabelTarget,
    changes: &[LabelChange],
    overwrite: bool,
) -> Result<Labelled> {
    for _ in 0..ATTEMPTS {
        let read = match target {
            LabelTarget::Pod { namespace, .. } => {
                let prefix = format!("{}{namespace}/", Kind::WorkloadEndpoint.prefix());
                Read::Listing(prefix.clone(), store.list(&prefix).await?)
            }
            LabelTarget::Namespace(n) => {
                Read::One(store.get(&key_for(Kind::Namespace, None, n)).await?)
            }
        };
        let (pre, ops, done) = plan(target, &read, changes, overwrite)?;
        if ops.is_empty() {
            return Ok(done);
        }
        if let TxnOutcome::Committed { .. } = store.txn(pre, ops).await? {
            return Ok(done);
        }
    }
    Err(ClusterError::Contention {
        what: target.describe(),
        attempts: ATTEMPTS,
    })
}

/// What [`label`] read.
#[derive(Debug, Clone)]
pub enum Read {
    /// The endpoints of a namespace (prefix, listing).
    Listing(String, Listing),
    One(Option<KeyValue>),
}

/// Decides the transaction (pure): the new objects, preconditions on everything read.
pub fn plan(
    target: &LabelTarget,
    read: &Read,
    changes: &[LabelChange],
    overwrite: bool,
) -> Result<(Vec<Precondition>, Vec<TxnOp>, Labelled)> {
    let not_found = || ClusterError::NotFound {
        kind: match target {
            LabelTarget::Pod { .. } => "pod".into(),
            LabelTarget::Namespace(_) => "Namespace".into(),
        },
        name: match target {
            LabelTarget::Pod { namespace, pod } => {
                format!("{namespace}/{pod} (no WorkloadEndpoint records it)")
            }
            LabelTarget::Namespace(n) => n.clone(),
        },
    };
    let (objects, mut pre): (Vec<(KeyValue, Resource)>, Vec<Precondition>) = match (target, read) {
        (LabelTarget::Pod { pod, .. }, Read::Listing(prefix, l)) => {
            let mut found = Vec::new();
            for kv in &l.items {
                // An endpoint that does not decode cannot be the pod's as far as anyone knows.
                let Ok(s) = decode(kv) else { continue };
                if let Resource::WorkloadEndpoint(w) = &s.resource {
                    if w.spec.pod.as_deref() == Some(pod.as_str()) {
                        found.push((kv.clone(), s.resource));
                    }
                }
            }
            let none_newer = Precondition::NoneNewer {
                prefix: prefix.clone(),
                revision: l.revision,
            };
            (found, vec![none_newer])
        }
        (LabelTarget::Namespace(_), Read::One(Some(kv))) => {
            (vec![(kv.clone(), decode(kv)?.resource)], Vec::new())
        }
        _ => (Vec::new(), Vec::new()),
    };
    if objects.is_empty() {
        return Err(not_found());
    }
    let mut ops = Vec::new();
    let mut done = Labelled {
        objects: Vec::new(),
        not_found: Vec::new(),
    };
    for (kv, mut r) in objects {
        let name = r.metadata().name.clone();
        let protected = match target {
            LabelTarget::Namespace(n) => vec![(LABEL_NAMESPACE_NAME, n.as_str())],
            LabelTarget::Pod { .. } => Vec::new(),
        };
        let out = labels::apply(&r.metadata().labels, changes, overwrite, &protected).map_err(
            |mut e| {
                e.object = Some(format!("{}/{name}", r.kind()));
                ClusterError::Invalid(e)
            },
        )?;
        for k in out.not_found {
            if !done.not_found.contains(&k) {
                done.not_found.push(k);
            }
        }
        let changed = out.labels != r.metadata().labels;
        r.metadata_mut().labels = out.labels;
        r.validate()?;
        pre.push(Precondition::ModRevision(kv.key.clone(), kv.mod_revision));
        if changed {
            ops.push(TxnOp::Put(kv.key.clone(), encode(&r)));
        }
        done.objects.push((format!("{}/{name}", r.kind()), changed));
    }
    Ok((pre, ops, done))
}
