//! The thin shell over the kernel. Every function here does I/O; decisions live in the pure
//! crates above and arrive as plain data ([`types`]).
//!
//! - [`netns`]: open network namespaces and run closures on a thread inside one.
//! - [`netlink`]: a synchronous rtnetlink socket: links, veths, bridges, addresses, routes.
//! - [`sysctl`]: `/proc/sys` reads and writes (per the calling thread's namespace).
//! - [`events`]: kernel change notifications (link, neighbour, route groups).
//! - [`features`]: side-effect-free probes of what the kernel supports (link kinds).
//! - [`ethtool`]: device offload settings (the VTEP's transmit checksum offload).
//! - [`nft`]: nftables batches through `nft -j -f -`, one atomic transaction per call.
//! - [`nft_elements`]: set element changes straight over netlink, one transaction per call
//!   (the fast path that skips `nft`'s cache fetch).

pub mod ethtool;
pub mod events;
pub mod features;
pub mod netlink;
pub mod netns;
pub mod nflog;
mod nfnl;
pub mod nft;
pub mod nft_elements;
pub mod routing;
pub mod sysctl;
pub mod types;

pub use netlink::Netlink;
pub use netns::Netns;
pub use types::{Link, RouteKind, RouteScope, RouteSpec};

use std::io;
use std::path::PathBuf;

/// Errors of the kernel shell, each naming the operation and object involved.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("netlink {op} failed: {source}")]
    Netlink {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot decode netlink reply to {op}: {reason}")]
    Decode { op: String, reason: String },
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sysctl {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("nftables: {message}")]
    Nft { message: String },
}

impl DataplaneError {
    /// The errno behind a failed kernel call, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DataplaneError::Netlink { source, .. }
            | DataplaneError::Netns { source, .. }
            | DataplaneError::Sysctl { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// ENOENT / ENODEV / ESRCH / EADDRNOTAVAIL: the thing is already gone.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ESRCH) | Some(libc::EADDRNOTAVAIL)
        )
    }

    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }
}

pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;
