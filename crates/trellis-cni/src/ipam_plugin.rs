//! The IPAM role (`trellis-ipam`, the same binary under another name): host-local style
//! allocation from `ranges`, usable by any main plugin.

use serde_json::Value;
use trellis_cni_types::config::{requested_ips, IpamPluginConfig};
use trellis_cni_types::{codes, CniEnv, CniError, Command};

use crate::error::Result;
use crate::ipam::{self, owner_of};
use crate::lock::container_lock;
use crate::plugin::gate_version;

/// Runs one verb of the IPAM role.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>> {
    let cfg = IpamPluginConfig::parse(stdin)?;
    gate_version(env.command, cfg.cni_version)?;
    let span = tracing::info_span!("ipam", command = env.command.as_str(), network = %cfg.name,
        container = env.container_id.as_deref().unwrap_or(""));
    let _enter = span.enter();
    match env.command {
        Command::Add => {
            let _lock = container_lock(env.container_id.as_deref().unwrap_or_default())?;
            let requested = requested_ips(&cfg.runtime, &cfg.args_ips, &env.args);
            let alloc = ipam::local_add(&cfg.ipam, &owner_of(env), &requested)?;
            Ok(Some(alloc.to_result().to_json(cfg.cni_version)))
        }
        Command::Del => {
            let _lock = container_lock(env.container_id.as_deref().unwrap_or_default())?;
            ipam::local_del(&cfg.ipam, &owner_of(env)).map(|_| None)
        }
        Command::Check => {
            let prev = cfg
                .prev_result
                .as_ref()
                .ok_or_else(|| CniError::invalid_config("prevResult", "is required for CHECK"))?;
            let ips: Vec<_> = prev.ips.iter().map(|i| i.address.addr()).collect();
            ipam::local_check(&cfg.ipam, &owner_of(env), &ips).map(|_| None)
        }
        Command::Gc => {
            let keep = cfg.valid_attachments.as_ref().ok_or_else(|| {
                CniError::invalid_config(
                    trellis_cni_types::config::VALID_ATTACHMENTS,
                    "is required for GC",
                )
            })?;
            ipam::local_gc(&cfg.ipam, keep).map(|_| None)
        }
        Command::Status => ipam::local_status(&cfg.ipam).map(|_| None),
        Command::Version => {
            Err(CniError::new(codes::INVALID_ENV, "VERSION is answered earlier").into())
        }
    }
}
