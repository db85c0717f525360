//! The plugin's error type and its mapping onto the spec's error codes.

use std::io;
use std::path::PathBuf;

use trellis_cni_types::{codes, CniError};
use trellis_dataplane::DataplaneError;
use trellis_ipam::IpamError;

/// Anything that makes a verb fail.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{0}")]
    Cni(#[from] CniError),
    #[error("{context}: {source}")]
    Kernel {
        context: String,
        #[source]
        source: DataplaneError,
    },
    #[error("IPAM state in {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Ipam(#[from] IpamError),
}

impl PluginError {
    pub fn kernel(context: impl Into<String>, source: DataplaneError) -> PluginError {
        PluginError::Kernel {
            context: context.into(),
            source,
        }
    }

    pub fn store(path: impl Into<PathBuf>, source: io::Error) -> PluginError {
        PluginError::Store {
            path: path.into(),
            source,
        }
    }

    /// The spec-shaped error for stdout.
    pub fn to_cni(&self) -> CniError {
        match self {
            PluginError::Cni(e) => e.clone(),
            PluginError::Kernel { .. } => CniError::new(codes::KERNEL, self.to_string()),
            PluginError::Store { .. } => CniError::new(codes::IO_FAILURE, self.to_string()),
            PluginError::Ipam(e) => {
                let code = match e {
                    IpamError::Exhausted { .. } | IpamError::RequestedInUse { .. } => {
                        codes::ADDRESS_UNAVAILABLE
                    }
                    _ => codes::INVALID_CONFIG,
                };
                CniError::new(code, e.to_string())
            }
        }
    }
}

pub type Result<T, E = PluginError> = std::result::Result<T, E>;

/// Attaches context to kernel errors.
pub trait KernelContext<T> {
    fn kctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> KernelContext<T> for std::result::Result<T, DataplaneError> {
    fn kctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| PluginError::kernel(context(), e))
    }
}
