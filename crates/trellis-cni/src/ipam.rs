//! The IPAM front end used by both roles: local allocation through [`LocalStore`] and the pure
//! planner, or delegation to another IPAM plugin.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use trellis_cni_types::config::Attachment;
use trellis_cni_types::{
    codes, CniEnv, CniError, CniResult, Command, Dns, IpamSection, LocalIpamConfig, Route,
};
use trellis_ipam::{local::free_count, plan_allocation, Owner};

use crate::delegate;
use crate::error::Result;
use crate::store::LocalStore;

/// An address handed to the attachment, with the range's prefix length and gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedIp {
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
}

/// What IPAM gave one attachment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    pub ips: Vec<AllocatedIp>,
    pub routes: Vec<Route>,
    pub dns: Option<Dns>,
}

impl Allocation {
    /// The result the IPAM role prints.
    pub fn to_result(&self) -> CniResult {
        CniResult {
            interfaces: Vec::new(),
            ips: self
                .ips
                .iter()
                .map(|ip| trellis_cni_types::IpConfig {
                    address: ip.address,
                    gateway: ip.gateway,
                    interface: None,
                })
                .collect(),
            routes: self.routes.clone(),
            dns: self.dns.clone().unwrap_or_default(),
        }
    }
}

/// Allocates from the local store.
pub fn local_add(cfg: &LocalIpamConfig, owner: &Owner, requested: &[IpAddr]) -> Result<Allocation> {
    let store = LocalStore::open(&cfg.data_dir)?;
    let used = store.used()?;
    let last: Vec<Option<IpAddr>> = (0..cfg.sets.len())
        .map(|i| store.last_reserved(i))
        .collect();
    let plan = plan_allocation(&cfg.sets, &used, &last, owner, requested)?;
    for a in plan.assignments.iter().filter(|a| !a.existing) {
        let recorded = store
            .record(a.ip, owner)
            .and_then(|_| store.set_last_reserved(a.set, a.ip));
        if let Err(e) = recorded {
            let _ = store.release_owner(owner);
            return Err(e);
        }
    }
    Ok(Allocation {
        ips: plan
            .assignments
            .iter()
            .map(|a| AllocatedIp {
                address: IpNet::new(a.ip, a.range.subnet.prefix_len())
                    .expect("prefix from a valid subnet"),
                gateway: a.range.gateway,
            })
            .collect(),
        routes: cfg.routes.clone(),
        dns: cfg.dns.clone(),
    })
}

pub fn local_del(cfg: &LocalIpamConfig, owner: &Owner) -> Result<()> {
    if !cfg.data_dir.exists() {
        return Ok(());
    }
    LocalStore::open(&cfg.data_dir)?.release_owner(owner)?;
    Ok(())
}

/// CHECK: every expected address is recorded for `owner`.
pub fn local_check(cfg: &LocalIpamConfig, owner: &Owner, expected: &[IpAddr]) -> Result<()> {
    let used = LocalStore::open(&cfg.data_dir)?.used()?;
    for ip in expected {
        match used.get(ip) {
            Some(o) if o == owner => {}
            Some(o) => {
                return Err(CniError::new(
                    codes::CHECK_MISMATCH,
                    format!("address {ip} is recorded for {o}, not {owner}"),
                )
                .into())
            }
            None => {
                return Err(CniError::new(
                    codes::CHECK_MISMATCH,
                    format!("address {ip} is not allocated to {owner}"),
                )
                .into())
            }
        }
    }
    Ok(())
}

/// GC: releases every allocation not in `keep`; returns the released owners.
pub fn local_gc(cfg: &LocalIpamConfig, keep: &[Attachment]) -> Result<Vec<Owner>> {
    if !cfg.data_dir.exists() {
        return Ok(Vec::new());
    }
    let keep: HashSet<(&str, &str)> = keep
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    let released = LocalStore::open(&cfg.data_dir)?
        .release_unless(|o| keep.contains(&(o.container_id.as_str(), o.ifname.as_str())))?;
    Ok(released.into_iter().map(|(_, o)| o).collect())
}

/// STATUS: the store is writable and no range set is exhausted (else code 50).
pub fn local_status(cfg: &LocalIpamConfig) -> Result<()> {
    let store = LocalStore::open(&cfg.data_dir).map_err(|e| {
        CniError::new(
            codes::STATUS_UNAVAILABLE,
            format!("IPAM store unusable: {e}"),
        )
    })?;
    store.writable().map_err(|e| {
        CniError::new(
            codes::STATUS_UNAVAILABLE,
            format!("IPAM store unusable: {e}"),
        )
    })?;
    let used = store.used()?;
    for set in &cfg.sets {
        if free_count(set, &used) == 0 {
            return Err(CniError::new(
                codes::STATUS_UNAVAILABLE,
                format!("range set {set} is exhausted: no address left for new containers"),
            )
            .into());
        }
    }
    Ok(())
}

/// The attachment key of this call.
pub fn owner_of(env: &CniEnv) -> Owner {
    Owner {
        container_id: env.container_id.clone().unwrap_or_default(),
        ifname: env.ifname.clone().unwrap_or_default(),
    }
}

/// ADD through whichever IPAM the section names.
pub fn add(
    section: &IpamSection,
    env: &CniEnv,
    stdin: &[u8],
    requested: &[IpAddr],
) -> Result<Allocation> {
    match section {
        IpamSection::Local(cfg) => local_add(cfg, &owner_of(env), requested),
        IpamSection::Delegate { plugin_type } => {
            let out = delegate::exec(env, plugin_type, Command::Add, stdin)?;
            let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| {
                CniError::new(
                    codes::DECODE,
                    format!("cannot decode {plugin_type} result: {e}"),
                )
            })?;
            let r = CniResult::from_json(&v, &format!("{plugin_type} result"))?;
            if r.ips.is_empty() {
                return Err(CniError::new(
                    codes::DELEGATE,
                    format!("{plugin_type} returned no addresses"),
                )
                .into());
            }
            Ok(Allocation {
                ips: r
                    .ips
                    .iter()
                    .map(|ip| AllocatedIp {
                        address: ip.address,
                        gateway: ip.gateway,
                    })
                    .collect(),
                routes: r.routes.clone(),
                dns: if r.dns.is_empty() { None } else { Some(r.dns) },
            })
        }
    }
}

/// Runs a verb other than ADD on the delegated plugin, or the local equivalent.
pub fn del(section: &IpamSection, env: &CniEnv, stdin: &[u8]) -> Result<()> {
    match section {
        IpamSection::Local(cfg) => local_del(cfg, &owner_of(env)),
        IpamSection::Delegate { plugin_type } => {
            delegate::exec(env, plugin_type, Command::Del, stdin).map(|_| ())
        }
    }
}

pub fn check(section: &IpamSection, env: &CniEnv, stdin: &[u8], expected: &[IpAddr]) -> Result<()> {
    match section {
        IpamSection::Local(cfg) => local_check(cfg, &owner_of(env), expected),
        IpamSection::Delegate { plugin_type } => {
            delegate::exec(env, plugin_type, Command::Check, stdin).map(|_| ())
        }
    }
}

pub fn gc(section: &IpamSection, env: &CniEnv, stdin: &[u8], keep: &[Attachment]) -> Result<()> {
    match section {
        IpamSection::Local(cfg) => {
            for o in local_gc(cfg, keep)? {
                tracing::info!(container = %o.container_id, ifname = %o.ifname, "GC released address");
            }
            Ok(())
        }
        IpamSection::Delegate { plugin_type } => {
            delegate::exec(env, plugin_type, Command::Gc, stdin).map(|_| ())
        }
    }
}

pub fn status(section: &IpamSection, env: &CniEnv, stdin: &[u8]) -> Result<()> {
    match section {
        IpamSection::Local(cfg) => local_status(cfg),
        IpamSection::Delegate { plugin_type } => {
            delegate::exec(env, plugin_type, Command::Status, stdin).map(|_| ())
        }
    }
}
