//! Cluster state over the datastore (I/O through [`trellis_store::Datastore`]):
//!
//! - [`objects`]: typed reads and compare-and-swap writes of resources, with stored content
//!   validated on the way in (a bad record is reported by key, never trusted; listings skip it).
//! - [`annotations`]: what an allocation asks for once its pod's and namespace's records are
//!   read (Calico's IPAM annotations and their precedence; pure).
//! - [`label`]: `trellis label` — kubectl-style label edits of a pod's endpoints or a
//!   namespace, one guarded transaction.
//! - [`invalid`]: which stored records are currently undecodable (logged once, counted).
//! - [`ipam`]: cluster IPAM — claiming blocks, allocating and releasing addresses — as retrying
//!   compare-and-swap transactions around the pure allocator in [`trellis_ipam::cluster`];
//!   [`release`] frees an attachment's addresses.
//! - [`snapshot`], [`gc`], [`report`]: one consistent read of the IPAM records, garbage
//!   collection planned from it as guarded transactions, and the operator reports.
//! - [`view`]: an in-memory copy of some kinds, built from listings and kept current by watch
//!   events (pure; the agent does the listing and watching).
//!
//! Time comes from a [`Clock`], so tests move it instead of sleeping.

pub mod annotations;
pub mod gc;
pub mod invalid;
pub mod ipam;
pub mod label;
pub mod objects;
mod records;
pub mod release;
pub mod report;
pub mod snapshot;
pub mod view;

use std::time::Instant;

use trellis_store::StoreError;

/// Errors of cluster operations.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored object {key} is invalid: {reason}")]
    Corrupt { key: String, reason: String },
    /// Transparent, so the message appears once (not again as its own source).
    #[error(transparent)]
    Invalid(#[from] trellis_resources::ResourceError),
    #[error("{0}")]
    Ipam(#[from] trellis_ipam::cluster::ClusterIpamError),
    #[error("{kind} {name} not found")]
    NotFound { kind: String, name: String },
    #[error("{kind} {name} already exists")]
    AlreadyExists { kind: String, name: String },
    #[error("gave up after {attempts} conflicting attempts on {what}")]
    Contention { what: String, attempts: u32 },
    #[error("node {node} is not registered (deleted?): no address is allocated to it until its agent registers it again")]
    NodeNotRegistered { node: String },
    /// The attachment's handle name is already used by a record that is not the attachment's
    /// (another attachment's record written under the older names, or the agent's tunnel
    /// address): nothing is allocated, and a DEL of the attachment releases nothing.
    #[error("handle {handle} is already held by {holder}, not by this attachment; release that one first (trellis ipam release --handle {handle})")]
    HandleTaken { handle: String, holder: String },
    /// The attachment's workload endpoint name (node, container, interface) is used by another
    /// attachment of that container and interface (another network): nothing is allocated.
    #[error("workload endpoint {endpoint} already belongs to handle {handle} (the same container and interface in another network); release that one first")]
    EndpointTaken { endpoint: String, handle: String },
    /// Kubernetes mode: the pod the ADD names has no record for this node in the datastore yet
    /// (the kube-controller writes it when the pod appears in the API server), so its endpoint
    /// would be created without the pod's labels.
    #[error("pod {namespace}/{pod} has no record for node {node} in the datastore yet (written by trellis kube-controller); not creating its endpoint without the pod's labels")]
    PodNotSynced {
        namespace: String,
        pod: String,
        node: String,
    },
    /// A Calico IPAM annotation (of the pod's or its namespace's record) that cannot be
    /// honoured: nothing is allocated.
    #[error("{annotation}: {reason}")]
    Annotation {
        annotation: Box<crate::annotations::Source>,
        reason: String,
    },
    /// The pod's record says its IPAM annotations were refused by the kube-controller.
    #[error("{pod}: {reason}; nothing allocated (fix the annotation)")]
    PodIpamRefused { pod: String, reason: String },
    /// An annotation asks for a feature this agent does not enable: nothing is allocated.
    #[error(
        "{annotation} needs {feature}, which this agent does not enable (start it with {flag})"
    )]
    FeatureDisabled {
        annotation: Box<crate::annotations::Source>,
        /// Calico's `feature_control` name.
        feature: &'static str,
        flag: &'static str,
    },
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Wall-clock and monotonic time: the seam through which tests move time instead of sleeping.
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch (what `emptySince` records).
    fn now_secs(&self) -> u64;
    /// Monotonic time, for the age of cached settings.
    fn instant(&self) -> Instant;
}

/// The system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_secs(&self) -> u64 {
        now_secs()
    }
    fn instant(&self) -> Instant {
        Instant::now()
    }
}
