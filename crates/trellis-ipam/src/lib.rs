//! Pure IP address allocation. No I/O: callers pass in what is in use and get a decision back;
//! the shell (the CNI plugin's on-disk store, later the datastore) records it.
//!
//! - [`range`]: validated address ranges and range sets (the host-local `ranges` schema).
//! - [`local`]: choosing addresses for one attachment from range sets, given what is used.

pub mod cluster;
pub mod local;
pub mod range;

pub use local::{plan_allocation, AllocationPlan, Assignment, Owner};
pub use range::{Range, RangeSet};

use std::net::IpAddr;

/// Everything that can go wrong while deciding an allocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("invalid range {field}: {reason} (value {value:?})")]
    InvalidRange {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("ranges {a} and {b} overlap")]
    Overlap { a: String, b: String },
    #[error("range set mixes IPv4 and IPv6 ({a} and {b})")]
    MixedFamilies { a: String, b: String },
    #[error("no free address left in range set {set}")]
    Exhausted { set: String },
    #[error("requested address {ip} is not inside any configured range")]
    RequestedOutsideRanges { ip: IpAddr },
    #[error("requested address {ip} is already allocated to container {owner}")]
    RequestedInUse { ip: IpAddr, owner: String },
    #[error("more than one address requested from range set {set} ({ips})")]
    TwoRequestsOneSet { set: String, ips: String },
}
