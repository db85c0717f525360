//! The main plugin (`trellis-cni`): ADD, DEL, CHECK, GC and STATUS for routed and bridge mode.
//! Orchestrates IPAM and the mode's interface setup; serialises calls per container. The
//! container's namespace is opened and checked (a network namespace, not the plugin's own)
//! before anything else, lock included.

use serde_json::Value;
use trellis_cni_types::config::requested_ips;
use trellis_cni_types::{codes, CniEnv, CniError, Command, IpamSection, Mode, PluginConfig};
use trellis_dataplane::Netns;

use crate::error::{PluginError, Result};
use crate::lock::container_lock;
use crate::safe_open::{self, NetnsProblem};
use crate::{bridge, ipam, logging, masq, routed};

/// Checks that the configured version has the verb.
pub fn gate_version(command: Command, version: trellis_cni_types::CniVersion) -> Result<()> {
    let ok = match command {
        Command::Check => version.has_check(),
        Command::Gc | Command::Status => version.has_gc_status(),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!(
                "{} is not part of CNI {version} (field `cniVersion`)",
                command.as_str()
            ),
        )
        .into())
    }
}

/// Opens `CNI_NETNS` for ADD and CHECK: it must exist and be a network namespace other than
/// the plugin's own (code 4 naming the variable otherwise).
pub fn open_netns(env: &CniEnv) -> Result<Netns> {
    let path = env
        .netns
        .as_ref()
        .ok_or_else(|| CniError::invalid_env("CNI_NETNS", "is required"))?;
    safe_open::open_netns(path).map_err(|e| CniError::invalid_env("CNI_NETNS", e).into())
}

/// Opens `CNI_NETNS` for DEL: a namespace that is gone (or cannot be opened) is no namespace —
/// DEL then cleans up what lives on the host — but a path that is not a network namespace, or
/// is the plugin's own, is refused before anything is touched.
fn open_netns_for_del(env: &CniEnv) -> Result<Option<Netns>> {
    let Some(path) = &env.netns else {
        return Ok(None);
    };
    match safe_open::open_netns(path) {
        Ok(ns) => Ok(Some(ns)),
        Err(e @ (NetnsProblem::Missing { .. } | NetnsProblem::Io { .. })) => {
            tracing::info!(error = %e, "container namespace unavailable; cleaning up the host side");
            Ok(None)
        }
        Err(e) => Err(CniError::invalid_env("CNI_NETNS", e).into()),
    }
}

fn ids(env: &CniEnv) -> (&str, &str) {
    (
        env.container_id.as_deref().unwrap_or_default(),
        env.ifname.as_deref().unwrap_or_default(),
    )
}

/// Runs one verb; returns the JSON to print on success (nothing for DEL and GC).
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>> {
    let cfg = PluginConfig::parse(stdin)?;
    logging::init(cfg.log_level.as_deref(), cfg.log_file.as_deref())?;
    gate_version(env.command, cfg.cni_version)?;
    let span = tracing::info_span!("cni", command = env.command.as_str(), network = %cfg.name,
        container = env.container_id.as_deref().unwrap_or(""), ifname = env.ifname.as_deref().unwrap_or(""));
    let _enter = span.enter();
    match env.command {
        Command::Add => add(&cfg, env, stdin).map(Some),
        Command::Del => del(&cfg, env, stdin).map(|_| None),
        Command::Check => check(&cfg, env, stdin).map(|_| None),
        Command::Gc => gc(&cfg, env, stdin).map(|_| None),
        Command::Status => status(&cfg, env, stdin).map(|_| None),
        Command::Version => unreachable!("VERSION is answered before config parsing"),
    }
}

fn add(cfg: &PluginConfig, env: &CniEnv, stdin: &[u8]) -> Result<Value> {
    let (cid, ifname) = ids(env);
    let netns = open_netns(env)?;
    let lock = container_lock(cid)?;
    let req = ipam::AddRequest {
        network: cfg.name.clone(),
        requested: requested_ips(&cfg.runtime, &cfg.args_ips, &env.args),
        ipv4_pools: cfg.runtime.ipv4_pools.clone(),
        ipv6_pools: cfg.runtime.ipv6_pools.clone(),
        host_interface: Some(crate::veth::host_veth_name(cid, ifname)),
    };
    let alloc = match ipam::add(&cfg.ipam, env, stdin, &req) {
        Ok(a) => a,
        Err(e) => {
            lock.release_and_remove();
            return Err(e);
        }
    };
    tracing::debug!("address allocated");
    let made = match &cfg.mode {
        // Routed: the new `trl*` interface is closed by the policy table until the agent has
        // programmed the pod's policy; ADD returns once it has.
        Mode::Routed => routed::add(cfg, cid, ifname, &netns, &alloc).and_then(|r| {
            let host = crate::veth::host_veth_name(cid, ifname);
            match ipam::endpoint_ready(&cfg.ipam, &cfg.name, env, &host) {
                Ok(()) => Ok(r),
                Err(e) => {
                    if let Err(d) = routed::del(cid, ifname, Some(&netns)) {
                        tracing::error!(error = %d, "removing the interface after a failed ADD also failed");
                    }
                    Err(e)
                }
            }
        }),
        Mode::Bridge(br) => bridge::add(cfg, br, cid, ifname, &netns, &alloc),
    };
    match made {
        Ok(result) => {
            tracing::info!(ips = ?alloc.ips.iter().map(|i| i.address.to_string()).collect::<Vec<_>>(), "attached");
            Ok(result.to_json(cfg.cni_version))
        }
        Err(e) => {
            // Nothing may be left behind by a failed ADD: give the address back.
            if let Err(rel) = ipam::del(&cfg.ipam, &cfg.name, env, stdin) {
                tracing::error!(error = %rel, "releasing the address after a failed ADD also failed");
            } else {
                lock.release_and_remove();
            }
            Err(e)
        }
    }
}

fn del(cfg: &PluginConfig, env: &CniEnv, stdin: &[u8]) -> Result<()> {
    let (cid, ifname) = ids(env);
    let netns = open_netns_for_del(env)?;
    let lock = container_lock(cid)?;
    let mut errors: Vec<PluginError> = Vec::new();
    let teardown = match &cfg.mode {
        Mode::Routed => routed::del(cid, ifname, netns.as_ref()),
        Mode::Bridge(br) => bridge::del(cfg, br, cid, ifname, netns.as_ref()),
    };
    if let Err(e) = teardown {
        tracing::warn!(error = %e, "interface teardown failed");
        errors.push(e);
    }
    if let Err(e) = ipam::del(&cfg.ipam, &cfg.name, env, stdin) {
        tracing::warn!(error = %e, "address release failed");
        errors.push(e);
    }
    if errors.is_empty() {
        lock.release_and_remove();
        Ok(())
    } else {
        Err(errors.remove(0))
    }
}

fn check(cfg: &PluginConfig, env: &CniEnv, stdin: &[u8]) -> Result<()> {
    let (cid, ifname) = ids(env);
    let prev = cfg
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::invalid_config("prevResult", "is required for CHECK"))?;
    let netns = open_netns(env)?;
    let _lock = container_lock(cid)?;
    let ips = match &cfg.mode {
        Mode::Routed => routed::check(cid, ifname, &netns, prev)?,
        Mode::Bridge(br) => bridge::check(br, cid, ifname, &netns, prev)?,
    };
    ipam::check(&cfg.ipam, &cfg.name, env, stdin, &ips)
}

fn gc(cfg: &PluginConfig, env: &CniEnv, stdin: &[u8]) -> Result<()> {
    let keep = cfg.valid_attachments.as_ref().ok_or_else(|| {
        CniError::invalid_config(
            trellis_cni_types::config::VALID_ATTACHMENTS,
            "is required for GC",
        )
    })?;
    let mut first_err = None;
    if let Err(e) = ipam::gc(&cfg.ipam, &cfg.name, env, stdin, keep) {
        first_err.get_or_insert(e);
    }
    if let Mode::Bridge(br) = &cfg.mode {
        if br.ip_masq {
            let pairs: Vec<(String, String)> = keep
                .iter()
                .map(|a| (a.container_id.clone(), a.ifname.clone()))
                .collect();
            if let Err(e) = masq::gc(&cfg.name, &pairs) {
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn status(cfg: &PluginConfig, env: &CniEnv, stdin: &[u8]) -> Result<()> {
    if let IpamSection::Delegate { plugin_type } = &cfg.ipam {
        crate::delegate::find_plugin(env, plugin_type)
            .map_err(|e| CniError::new(codes::STATUS_UNAVAILABLE, e.msg))?;
    }
    ipam::status(&cfg.ipam, env, stdin).map_err(|e| {
        let c = e.to_cni();
        if c.code == codes::STATUS_UNAVAILABLE || c.code == codes::STATUS_LIMITED {
            e
        } else {
            CniError::new(codes::STATUS_UNAVAILABLE, c.msg).into()
        }
    })
}
