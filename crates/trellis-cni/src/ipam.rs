//! The IPAM front end used by both roles: local allocation through [`LocalStore`] and the pure
//! planner, or delegation to another IPAM plugin. Addresses from the agent or a delegated plugin
//! are checked like local ranges are: no address a pod may not hold, no gateway of the other
//! family.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use trellis_agent_api::{Attachment, Request as AgentRequest};
use trellis_cni_types::config::{Attachment as GcAttachment, Requested};
use trellis_cni_types::{
    codes, AgentIpamConfig, CniEnv, CniError, CniResult, Command, Dns, IpamSection,
    LocalIpamConfig, Route,
};
use trellis_ipam::range::forbidden_address_reason;
use trellis_ipam::{local::free_count, plan_allocation, IpamError, Owner};

use crate::error::Result;
use crate::store::LocalStore;
use crate::{agent, delegate};

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
    /// The agent's MTU for pods (used unless the config sets `mtu`).
    pub mtu: Option<u32>,
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

/// An error about one requested address, naming the field it came from (code 100 when the
/// address is taken, else 7 — or 4 for `CNI_ARGS`).
fn requested_error(requested: &Requested, e: IpamError) -> crate::error::PluginError {
    match e.requested_index() {
        Some(i) => {
            let mut c = requested.source.error(i, &e);
            if matches!(e, IpamError::RequestedInUse { .. }) {
                c.code = codes::ADDRESS_UNAVAILABLE;
            }
            c.into()
        }
        None => e.into(),
    }
}

/// Allocates from the local store.
pub fn local_add(
    cfg: &LocalIpamConfig,
    owner: &Owner,
    requested: &Requested,
) -> Result<Allocation> {
    let store = LocalStore::open(&cfg.data_dir)?;
    let used = store.used()?;
    let last: Vec<Option<IpAddr>> = (0..cfg.sets.len())
        .map(|i| store.last_reserved(i))
        .collect();
    let plan = plan_allocation(&cfg.sets, &used, &last, owner, &requested.ips)
        .map_err(|e| requested_error(requested, e))?;
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
        mtu: None,
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
pub fn local_gc(cfg: &LocalIpamConfig, keep: &[GcAttachment]) -> Result<Vec<Owner>> {
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

/// What an ADD asks of IPAM beyond the attachment itself.
#[derive(Debug, Clone, Default)]
pub struct AddRequest {
    pub network: String,
    pub requested: Requested,
    pub ipv4_pools: Vec<String>,
    pub ipv6_pools: Vec<String>,
    /// The host-side interface, recorded on the workload endpoint.
    pub host_interface: Option<String>,
}

fn attachment(network: &str, env: &CniEnv) -> Attachment {
    let o = owner_of(env);
    Attachment {
        network: network.to_string(),
        container_id: o.container_id,
        ifname: o.ifname,
    }
}

fn agent_add(cfg: &AgentIpamConfig, env: &CniEnv, req: &AddRequest) -> Result<Allocation> {
    let pick = |a: &[String], b: &[String], c: &[String]| -> Vec<String> {
        [a, b, c]
            .into_iter()
            .find(|l| !l.is_empty())
            .map(|l| l.to_vec())
            .unwrap_or_default()
    };
    let reply = agent::call(
        &cfg.socket,
        &AgentRequest::Allocate {
            attachment: attachment(&req.network, env),
            namespace: env.args.k8s_pod_namespace.clone(),
            pod: env.args.k8s_pod_name.clone(),
            pod_uid: env.args.k8s_pod_uid.clone().filter(|u| !u.is_empty()),
            host_interface: req.host_interface.clone(),
            ips: req.requested.ips.clone(),
            ipv4_pools: pick(&req.ipv4_pools, &env.args.ipv4_pools, &cfg.ipv4_pools),
            ipv6_pools: pick(&req.ipv6_pools, &env.args.ipv6_pools, &cfg.ipv6_pools),
        },
    )?;
    let mut ips = Vec::new();
    for s in &reply.ips {
        let address: IpNet = s.parse().map_err(|_| {
            CniError::new(
                codes::DECODE,
                format!("the agent returned {s:?}, not an address"),
            )
        })?;
        ips.push(AllocatedIp {
            address,
            gateway: None,
        });
    }
    if ips.is_empty() {
        return Err(
            CniError::new(codes::ADDRESS_UNAVAILABLE, "the agent returned no address").into(),
        );
    }
    check_foreign_result("the trellis agent", codes::DECODE, &ips, &[])?;
    if let Some(mtu) = reply.mtu {
        // What the kernel takes for a veth carrying these families (IPv6 needs 1280).
        let min = if ips.iter().any(|i| i.address.addr().is_ipv6()) {
            1280
        } else {
            68
        };
        if !(min..=65535).contains(&mtu) {
            return Err(CniError::new(
                codes::DECODE,
                format!("the trellis agent result: mtu {mtu} is outside {min}..65535"),
            )
            .into());
        }
    }
    Ok(Allocation {
        ips,
        routes: Vec::new(),
        dns: None,
        mtu: reply.mtu,
    })
}

/// Waits until the agent has the endpoint's policy in the kernel (agent IPAM only; routed
/// mode). An agent that does not know the request (older than it: code 6) is not waited for.
pub fn endpoint_ready(
    section: &IpamSection,
    network: &str,
    env: &CniEnv,
    host_interface: &str,
) -> Result<()> {
    let IpamSection::Agent(cfg) = section else {
        return Ok(());
    };
    let req = AgentRequest::EndpointReady {
        attachment: attachment(network, env),
        host_interface: host_interface.to_string(),
    };
    match agent::call(&cfg.socket, &req) {
        Ok(_) => Ok(()),
        Err(e) if e.to_cni().code == codes::DECODE && e.to_string().contains("unknown variant") => {
            tracing::warn!(error = %e, "the agent does not confirm programmed policy (older agent); not waiting");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// ADD through whichever IPAM the section names.
pub fn add(
    section: &IpamSection,
    env: &CniEnv,
    stdin: &[u8],
    req: &AddRequest,
) -> Result<Allocation> {
    match section {
        IpamSection::Local(cfg) => local_add(cfg, &owner_of(env), &req.requested),
        IpamSection::Agent(cfg) => agent_add(cfg, env, req),
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
            let ips: Vec<AllocatedIp> = r
                .ips
                .iter()
                .map(|ip| AllocatedIp {
                    address: ip.address,
                    gateway: ip.gateway,
                })
                .collect();
            check_foreign_result(plugin_type, codes::DELEGATE, &ips, &r.routes)?;
            Ok(Allocation {
                ips,
                routes: r.routes.clone(),
                dns: if r.dns.is_empty() { None } else { Some(r.dns) },
                mtu: None,
            })
        }
    }
}

/// Checks addresses that another program chose (the agent, a delegated IPAM plugin) as local
/// ranges are checked: each one an address a pod may hold, each gateway of its address's family,
/// each route's gateway of its destination's family. `who` and `code` go into the error.
pub fn check_foreign_result(
    who: &str,
    code: u32,
    ips: &[AllocatedIp],
    routes: &[Route],
) -> Result<()> {
    let bad = |msg: String| -> crate::error::PluginError {
        CniError::new(code, format!("{who} result: {msg}")).into()
    };
    for (i, ip) in ips.iter().enumerate() {
        let addr = ip.address.addr();
        if let Some(why) = forbidden_address_reason(addr) {
            return Err(bad(format!(
                "ips[{i}].address {addr} is in {why}, which no pod may hold"
            )));
        }
        if let Some(gw) = ip.gateway {
            if gw.is_ipv4() != addr.is_ipv4() {
                return Err(bad(format!(
                    "ips[{i}].gateway {gw} is not of the same address family as ips[{i}].address {}",
                    ip.address
                )));
            }
        }
    }
    for (i, r) in routes.iter().enumerate() {
        if let Some(gw) = r.gw {
            if gw.is_ipv4() != r.dst.addr().is_ipv4() {
                return Err(bad(format!(
                    "routes[{i}].gw {gw} is not of the same address family as routes[{i}].dst {}",
                    r.dst
                )));
            }
        }
    }
    Ok(())
}

/// Runs a verb other than ADD on the delegated plugin, or the local equivalent.
pub fn del(section: &IpamSection, network: &str, env: &CniEnv, stdin: &[u8]) -> Result<()> {
    match section {
        IpamSection::Local(cfg) => local_del(cfg, &owner_of(env)),
        IpamSection::Agent(cfg) => agent::call(
            &cfg.socket,
            &AgentRequest::Release {
                attachment: attachment(network, env),
            },
        )
        .map(|_| ()),
        IpamSection::Delegate { plugin_type } => {
            delegate::exec(env, plugin_type, Command::Del, stdin).map(|_| ())
        }
    }
}

pub fn check(
    section: &IpamSection,
    network: &str,
    env: &CniEnv,
    stdin: &[u8],
    expected: &[IpAddr],
) -> Result<()> {
    match section {
        IpamSection::Local(cfg) => local_check(cfg, &owner_of(env), expected),
        IpamSection::Agent(cfg) => agent::call(
            &cfg.socket,
            &AgentRequest::Check {
                attachment: attachment(network, env),
                ips: expected.to_vec(),
            },
        )
        .map(|_| ()),
        IpamSection::Delegate { plugin_type } => {
            delegate::exec(env, plugin_type, Command::Check, stdin).map(|_| ())
        }
    }
}

pub fn gc(
    section: &IpamSection,
    network: &str,
    env: &CniEnv,
    stdin: &[u8],
    keep: &[GcAttachment],
) -> Result<()> {
    match section {
        IpamSection::Local(cfg) => {
            for o in local_gc(cfg, keep)? {
                tracing::info!(container = %o.container_id, ifname = %o.ifname, "GC released address");
            }
            Ok(())
        }
        IpamSection::Agent(cfg) => {
            let keep = keep
                .iter()
                .map(|a| Attachment {
                    network: network.to_string(),
                    container_id: a.container_id.clone(),
                    ifname: a.ifname.clone(),
                })
                .collect();
            agent::call(
                &cfg.socket,
                &AgentRequest::Gc {
                    network: network.to_string(),
                    keep,
                },
            )
            .map(|_| ())
        }
        IpamSection::Delegate { plugin_type } => {
            delegate::exec(env, plugin_type, Command::Gc, stdin).map(|_| ())
        }
    }
}

pub fn status(section: &IpamSection, env: &CniEnv, stdin: &[u8]) -> Result<()> {
    match section {
        IpamSection::Local(cfg) => local_status(cfg),
        IpamSection::Agent(cfg) => agent::call(&cfg.socket, &AgentRequest::Status {})
            .map(|_| ())
            .map_err(|e| {
                let c = e.to_cni();
                if c.code == codes::STATUS_UNAVAILABLE {
                    e
                } else {
                    CniError::new(codes::STATUS_UNAVAILABLE, c.msg).into()
                }
            }),
        IpamSection::Delegate { plugin_type } => {
            delegate::exec(env, plugin_type, Command::Status, stdin).map(|_| ())
        }
    }
}
