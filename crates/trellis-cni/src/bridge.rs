//! Bridge mode (the reference bridge plugin's model, as Flannel uses it): a Linux bridge
//! (`cni0` by default) created on demand, the gateway address on it (`isGateway`), a veth per
//! pod enslaved to it with optional hairpin, the pod's default route via the gateway
//! (`isDefaultGateway`) and optional masquerade (`ipMasq`). A bridge that a failed ADD created is
//! removed again unless another pod uses it by then (ADDs attaching to a bridge hold its lock
//! shared; removal takes it exclusively). Does kernel I/O.

use std::net::IpAddr;

use ipnet::IpNet;
use trellis_cni_types::{
    codes, BridgeConfig, CniError, CniResult, Interface, IpConfig, PluginConfig, Route,
};
use trellis_dataplane::{Link, Netlink, Netns, RouteSpec};

use crate::error::{KernelContext, Result};
use crate::ipam::Allocation;
use crate::lock::{bridge_lock_path, FileLock};
use crate::{masq, veth};

/// Finds or creates the bridge and brings it up (two ADDs racing to create it both succeed).
/// Sets `created` when this call made it.
fn ensure_bridge(
    host: &mut Netlink,
    br: &BridgeConfig,
    mtu: Option<u32>,
    created: &mut bool,
) -> Result<Link> {
    let link = match host
        .link(&br.name)
        .kctx(|| format!("look up bridge {}", br.name))?
    {
        Some(l) => l,
        None => {
            match host.create_bridge(&br.name, mtu) {
                Ok(()) => *created = true,
                Err(e) if e.is_exists() => {}
                Err(e) => {
                    return Err(crate::error::PluginError::kernel(
                        format!("create bridge {}", br.name),
                        e,
                    ))
                }
            }
            host.link(&br.name)
                .kctx(|| format!("read back bridge {}", br.name))?
                .ok_or_else(|| {
                    CniError::new(
                        codes::KERNEL,
                        format!("bridge {} vanished after creation", br.name),
                    )
                })?
        }
    };
    if link.kind.as_deref() != Some("bridge") {
        return Err(CniError::invalid_config(
            "bridge",
            format!(
                "{} exists and is a {} device, not a bridge",
                br.name,
                link.kind.as_deref().unwrap_or("non-bridge")
            ),
        )
        .into());
    }
    if !link.up {
        host.set_up(link.index)
            .kctx(|| format!("set {} up", br.name))?;
    }
    Ok(link)
}

/// Puts each gateway address on the bridge (once; EEXIST is fine).
fn ensure_gateways(host: &mut Netlink, bridge: &Link, alloc: &Allocation) -> Result<()> {
    let present = host
        .addresses(Some(bridge.index))
        .kctx(|| "list bridge addresses".into())?;
    for ip in &alloc.ips {
        let Some(gw) = ip.gateway else { continue };
        let want = IpNet::new(gw, ip.address.prefix_len()).map_err(|_| {
            CniError::new(
                codes::DELEGATE,
                format!(
                    "IPAM gave gateway {gw} for address {}: not of the same address family",
                    ip.address
                ),
            )
        })?;
        if present.iter().any(|(_, a)| a.addr() == gw) {
            continue;
        }
        match host.add_address(bridge.index, want, gw.is_ipv6()) {
            Ok(()) => {}
            Err(e) if e.is_exists() => {}
            Err(e) => {
                return Err(crate::error::PluginError::kernel(
                    format!("add gateway {want} to {}", bridge.name),
                    e,
                ))
            }
        }
    }
    Ok(())
}

fn pod_routes(br: &BridgeConfig, index: u32, alloc: &Allocation) -> Vec<RouteSpec> {
    let mut routes = Vec::new();
    for ip in &alloc.ips {
        let Some(gw) = ip.gateway else { continue };
        if br.is_default_gateway {
            let dflt: IpNet = if gw.is_ipv4() {
                "0.0.0.0/0".parse().unwrap()
            } else {
                "::/0".parse().unwrap()
            };
            routes.push(RouteSpec::via(dflt, gw, index));
        }
    }
    for r in &alloc.routes {
        if br.is_default_gateway && r.dst.prefix_len() == 0 && r.gw.is_none() {
            continue; // already covered by the default route above
        }
        let gw = r.gw.or_else(|| {
            alloc
                .ips
                .iter()
                .find(|i| i.address.addr().is_ipv4() == r.dst.addr().is_ipv4())
                .and_then(|i| i.gateway)
        });
        if let Some(gw) = gw {
            routes.push(RouteSpec::via(r.dst, gw, index));
        }
    }
    routes.sort();
    routes.dedup();
    routes
}

/// Removes bridge `index` (which this ADD created) unless a port was attached to it meanwhile.
fn remove_if_unused(host: &mut Netlink, br: &BridgeConfig, index: u32) {
    let removed = (|| -> Result<bool> {
        let _exclusive = FileLock::acquire(&bridge_lock_path(&br.name))?;
        let links = host.links().kctx(|| "list links".into())?;
        let ours = links.iter().any(|l| l.index == index && l.name == br.name);
        if !ours || links.iter().any(|l| l.master == Some(index)) {
            return Ok(false);
        }
        host.delete_link_index(index)
            .kctx(|| format!("remove bridge {}", br.name))
    })();
    match removed {
        Ok(true) => tracing::info!(bridge = %br.name, "removed the bridge this failed ADD created"),
        Ok(false) => {}
        Err(e) => {
            tracing::error!(bridge = %br.name, error = %e, "removing the bridge this failed ADD created failed")
        }
    }
}

/// ADD in bridge mode. On failure the veth and masquerade rule are removed, and the bridge too
/// if this ADD created it and no other pod has attached to it since.
pub fn add(
    cfg: &PluginConfig,
    br: &BridgeConfig,
    container_id: &str,
    ifname: &str,
    netns: &Netns,
    alloc: &Allocation,
) -> Result<CniResult> {
    let (mut host, mut pod) = veth::open_sockets(netns)?;
    let attaching = FileLock::acquire_shared(&bridge_lock_path(&br.name))?;
    let mut created = false;
    let mut bridge_index = None;
    let attached = (|| -> Result<CniResult> {
        let bridge = ensure_bridge(&mut host, br, cfg.mtu, &mut created)?;
        bridge_index = Some(bridge.index);
        attach(
            cfg,
            br,
            container_id,
            ifname,
            netns,
            alloc,
            &mut host,
            &mut pod,
            bridge,
        )
    })();
    drop(attaching);
    if let (Err(_), true, Some(index)) = (&attached, created, bridge_index) {
        remove_if_unused(&mut host, br, index);
    }
    attached
}

/// ADD's work once the bridge exists: gateway, veth, pod side, masquerade, result.
#[allow(clippy::too_many_arguments)]
fn attach(
    cfg: &PluginConfig,
    br: &BridgeConfig,
    container_id: &str,
    ifname: &str,
    netns: &Netns,
    alloc: &Allocation,
    host: &mut Netlink,
    pod: &mut Netlink,
    bridge: Link,
) -> Result<CniResult> {
    let host_name = veth::host_veth_name(container_id, ifname);
    if br.is_gateway {
        ensure_gateways(host, &bridge, alloc)?;
        let addrs: Vec<IpNet> = alloc.ips.iter().map(|i| i.address).collect();
        veth::enable_forwarding(&addrs)?;
    }
    let pair = veth::create(
        host,
        pod,
        netns,
        &veth::PairRequest {
            host_name: &host_name,
            ifname,
            mtu: cfg.mtu.or(alloc.mtu),
            host_mac: None,
            pod_mac: cfg.runtime.mac,
            master: Some(bridge.index),
        },
    )?;
    let addrs: Vec<IpNet> = alloc.ips.iter().map(|i| i.address).collect();
    let configured = (|| -> Result<()> {
        if br.hairpin_mode {
            host.set_hairpin(pair.host.index, true)
                .kctx(|| format!("set hairpin on {host_name}"))?;
        }
        host.set_up(pair.host.index)
            .kctx(|| format!("set {host_name} up"))?;
        veth::configure_pod(
            pod,
            netns,
            &pair.pod,
            &addrs,
            &pod_routes(br, pair.pod.index, alloc),
        )?;
        if br.ip_masq {
            masq::add(&cfg.name, container_id, ifname, &addrs)?;
        }
        Ok(())
    })();
    if let Err(e) = configured {
        let _ = host.delete_link(&host_name);
        if br.ip_masq {
            let _ = masq::del(&cfg.name, container_id, ifname);
        }
        return Err(e);
    }
    // Re-read for the MAC the bridge took from its first port; the ADD has succeeded already.
    let bridge = host.link(&br.name).ok().flatten().unwrap_or(bridge);
    Ok(CniResult {
        interfaces: vec![Interface {
            name: bridge.name.clone(),
            mac: veth::mac_string(&bridge),
            mtu: Some(bridge.mtu),
            sandbox: None,
        }]
        .into_iter()
        .chain(pair.interfaces(netns))
        .collect(),
        ips: alloc
            .ips
            .iter()
            .map(|i| IpConfig {
                address: i.address,
                gateway: if br.is_gateway { i.gateway } else { None },
                interface: Some(2),
            })
            .collect(),
        routes: pod_routes(br, pair.pod.index, alloc)
            .iter()
            .map(|r| Route::new(r.dst, r.gateway))
            .collect(),
        dns: cfg.dns.clone().or(alloc.dns.clone()).unwrap_or_default(),
    })
}

/// DEL in bridge mode: masquerade rules, then the veth. Each step runs even if another failed.
pub fn del(
    cfg: &PluginConfig,
    br: &BridgeConfig,
    container_id: &str,
    ifname: &str,
    netns: Option<&Netns>,
) -> Result<()> {
    let mut first_err = None;
    if br.ip_masq {
        if let Err(e) = masq::del(&cfg.name, container_id, ifname) {
            tracing::warn!(error = %e, "removing masquerade rules failed");
            first_err.get_or_insert(e);
        }
    }
    let host_name = veth::host_veth_name(container_id, ifname);
    let res = (|| -> Result<()> {
        let mut host = Netlink::open().kctx(|| "open netlink".into())?;
        veth::delete(&mut host, &host_name, netns.map(|ns| (ns, ifname)))
    })();
    if let Err(e) = res {
        first_err.get_or_insert(e);
    }
    first_err.map_or(Ok(()), Err)
}

/// CHECK in bridge mode: pod interface and addresses, host end enslaved to the bridge.
pub fn check(
    br: &BridgeConfig,
    container_id: &str,
    ifname: &str,
    netns: &Netns,
    prev: &CniResult,
) -> Result<Vec<IpAddr>> {
    let host_name = veth::host_veth_name(container_id, ifname);
    let mut host = Netlink::open().kctx(|| "open netlink".into())?;
    let ips = veth::check_pod_side(netns, ifname, prev)?.ips;
    let bridge = host
        .link(&br.name)
        .kctx(|| format!("look up {}", br.name))?
        .ok_or_else(|| veth::mismatch(format!("bridge {} is missing", br.name)))?;
    let host_link = host
        .link(&host_name)
        .kctx(|| format!("look up {host_name}"))?
        .ok_or_else(|| veth::mismatch(format!("host interface {host_name} is missing")))?;
    if host_link.master != Some(bridge.index) {
        return Err(veth::mismatch(format!(
            "{host_name} is not attached to bridge {}",
            br.name
        )));
    }
    Ok(ips)
}
