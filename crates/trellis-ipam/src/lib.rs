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
    /// `index` is the position of the address in the request, for naming the field.
    #[error("requested address {ip} is not inside any configured range")]
    RequestedOutsideRanges { ip: IpAddr, index: usize },
    #[error("requested address {ip} is the gateway of range {range}")]
    RequestedGateway {
        ip: IpAddr,
        index: usize,
        range: String,
    },
    #[error("requested address {ip} is inside subnet {subnet} but not allocatable: {reason}")]
    RequestedUnallocatable {
        ip: IpAddr,
        index: usize,
        subnet: String,
        reason: String,
    },
    #[error("requested address {ip} is already allocated to container {owner}")]
    RequestedInUse {
        ip: IpAddr,
        index: usize,
        owner: String,
    },
    #[error("more than one address requested from range set {set} ({ips})")]
    TwoRequestsOneSet {
        set: String,
        ips: String,
        index: usize,
    },
}

impl IpamError {
    /// For errors about one requested address: its position in the request (so the caller can
    /// name the field it came from, e.g. `runtimeConfig.ips[1]`).
    pub fn requested_index(&self) -> Option<usize> {
        match self {
            IpamError::RequestedOutsideRanges { index, .. }
            | IpamError::RequestedGateway { index, .. }
            | IpamError::RequestedUnallocatable { index, .. }
            | IpamError::RequestedInUse { index, .. }
            | IpamError::TwoRequestsOneSet { index, .. } => Some(*index),
            _ => None,
        }
    }
}
