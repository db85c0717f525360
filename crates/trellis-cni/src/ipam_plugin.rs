//! The IPAM role (`trellis-ipam`, the same binary under another name): host-local style
//! allocation from `ranges`, usable by any main plugin.

use serde_json::Value;
use trellis_cni_types::config::{requested_ips, IpamPluginConfig};
use trellis_cni_types::{codes, CniEnv, CniError, Command};

use crate::error::Result;
use crate::lock::container_lock;
use crate::plugin::gate_version;
use crate::{ipam, logging};

/// Runs one verb of the IPAM role.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>> {
    let cfg = IpamPluginConfig::parse(stdin)?;
    logging::init(cfg.log_level.as_deref(), cfg.log_file.as_deref())?;
    gate_version(env.command, cfg.cni_version)?;
    let span = tracing::info_span!("ipam", command = env.command.as_str(), network = %cfg.name,
        container = env.container_id.as_deref().unwrap_or(""));
    let _enter = span.enter();
    match env.command {
        Command::Add => {
            let _lock = container_lock(env.container_id.as_deref().unwrap_or_default())?;
            let req = ipam::AddRequest {
                network: cfg.name.clone(),
                requested: requested_ips(&cfg.runtime, &cfg.args_ips, &env.args),
                ipv4_pools: cfg.runtime.ipv4_pools.clone(),
                ipv6_pools: cfg.runtime.ipv6_pools.clone(),
                host_interface: None,
            };
            let alloc = ipam::add(&cfg.ipam, env, stdin, &req)?;
            Ok(Some(alloc.to_result().to_json(cfg.cni_version)))
        }
        Command::Del => {
            let _lock = container_lock(env.container_id.as_deref().unwrap_or_default())?;
            ipam::del(&cfg.ipam, &cfg.name, env, stdin).map(|_| None)
        }
        Command::Check => {
            let prev = cfg
                .prev_result
                .as_ref()
                .ok_or_else(|| CniError::invalid_config("prevResult", "is required for CHECK"))?;
            let ips: Vec<_> = prev.ips.iter().map(|i| i.address.addr()).collect();
            ipam::check(&cfg.ipam, &cfg.name, env, stdin, &ips).map(|_| None)
        }
        Command::Gc => {
            let keep = cfg.valid_attachments.as_ref().ok_or_else(|| {
                CniError::invalid_config(
                    trellis_cni_types::config::VALID_ATTACHMENTS,
                    "is required for GC",
                )
            })?;
            ipam::gc(&cfg.ipam, &cfg.name, env, stdin, keep).map(|_| None)
        }
        Command::Status => ipam::status(&cfg.ipam, env, stdin).map(|_| None),
        Command::Version => {
            Err(CniError::new(codes::INVALID_ENV, "VERSION is answered earlier").into())
        }
    }
}
