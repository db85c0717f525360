//! CNI spec types, pure: versions, the environment contract, `CNI_ARGS`, network configuration
//! validation, results in every supported version, and the spec's error JSON.
//! No I/O: the plugin's entry point reads env/stdin and hands them here.

pub mod args;
pub mod config;
pub mod env;
pub mod error;
pub mod ipam_config;
pub mod result;
pub mod version;

pub use args::CniArgs;
pub use config::{Attachment, BridgeConfig, IpamPluginConfig, Mode, PluginConfig, RuntimeConfig};
pub use env::{CniEnv, Command};
pub use error::{codes, CniError};
pub use ipam_config::{AgentIpamConfig, IpamSection, LocalIpamConfig};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use version::CniVersion;
