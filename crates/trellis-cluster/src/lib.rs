//! Cluster state over the datastore (I/O through [`trellis_store::Datastore`]):
//!
//! - [`objects`]: typed reads and compare-and-swap writes of resources, with stored content
//!   validated on the way in (a bad record is reported by key, never trusted).
//! - [`ipam`]: cluster IPAM — claiming blocks, allocating and releasing addresses, GC and the
//!   consistency check — as retrying compare-and-swap transactions around the pure allocator in
//!   [`trellis_ipam::cluster`].
//! - [`view`]: an in-memory copy of some kinds, built from listings and kept current by watch
//!   events (pure; the agent does the listing and watching).

pub mod ipam;
pub mod objects;
pub mod report;
pub mod view;

use trellis_store::StoreError;

/// Errors of cluster operations.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored object {key} is invalid: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{0}")]
    Invalid(#[from] trellis_resources::ResourceError),
    #[error("{0}")]
    Ipam(#[from] trellis_ipam::cluster::ClusterIpamError),
    #[error("{kind} {name} not found")]
    NotFound { kind: String, name: String },
    #[error("{kind} {name} already exists")]
    AlreadyExists { kind: String, name: String },
    #[error("gave up after {attempts} conflicting attempts on {what}")]
    Contention { what: String, attempts: u32 },
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
