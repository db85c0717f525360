//! Routed mode (Calico's model): the pod has its address as /32 (/128), a link-scope route to
//! 169.254.1.1 and a default route through it; the host end (MAC ee:ee:ee:ee:ee:ee) answers
//! ARP for it by proxy and holds `POD_IP dev trlXXXX scope link`. IPv6 pods route through the
//! host end's link-local fe80::ecee:eeff:feee:eeee, answered by proxy NDP. Does kernel I/O.

use std::net::IpAddr;

use ipnet::IpNet;
use trellis_cni_types::{CniResult, IpConfig, PluginConfig, Route};
use trellis_dataplane::{sysctl, Netlink, Netns, RouteSpec};

use crate::error::{KernelContext, Result};
use crate::ipam::Allocation;
use crate::veth::{self, GATEWAY_V4, GATEWAY_V6, HOST_MAC};

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::new(ip, if ip.is_ipv4() { 32 } else { 128 }).expect("host prefix")
}

/// Routes inside the pod: the gateway's link route, the default route, and any IPAM routes,
/// all through the fixed gateway of the family.
fn pod_routes(pod_index: u32, addrs: &[IpNet], ipam_routes: &[Route]) -> Vec<RouteSpec> {
    let mut routes = Vec::new();
    if addrs.iter().any(|a| a.addr().is_ipv4()) {
        routes.push(RouteSpec::link_scope(
            host_prefix(GATEWAY_V4.into()),
            pod_index,
        ));
        routes.push(RouteSpec::via(
            "0.0.0.0/0".parse().unwrap(),
            GATEWAY_V4.into(),
            pod_index,
        ));
    }
    if addrs.iter().any(|a| a.addr().is_ipv6()) {
        routes.push(RouteSpec::via(
            "::/0".parse().unwrap(),
            GATEWAY_V6.into(),
            pod_index,
        ));
    }
    for r in ipam_routes.iter().filter(|r| r.dst.prefix_len() != 0) {
        let gw: IpAddr = if r.dst.addr().is_ipv4() {
            GATEWAY_V4.into()
        } else {
            GATEWAY_V6.into()
        };
        if addrs.iter().any(|a| a.addr().is_ipv4() == gw.is_ipv4()) {
            routes.push(RouteSpec::via(r.dst, gw, pod_index));
        }
    }
    routes
}

/// Host-side sysctls for the new interface: proxy ARP without delay; for IPv6, no DAD on the
/// link-local gateway address and proxy NDP.
fn host_sysctls(host_name: &str, addrs: &[IpNet]) -> Result<()> {
    let set = |path: String, v: &str| sysctl::write(&path, v).kctx(|| format!("set {path}={v}"));
    if addrs.iter().any(|a| a.addr().is_ipv4()) {
        set(format!("net/ipv4/conf/{host_name}/proxy_arp"), "1")?;
        set(format!("net/ipv4/neigh/{host_name}/proxy_delay"), "0")?;
    }
    if addrs.iter().any(|a| a.addr().is_ipv6()) {
        set(format!("net/ipv6/conf/{host_name}/disable_ipv6"), "0")?;
        set(format!("net/ipv6/conf/{host_name}/accept_dad"), "0")?;
        set(format!("net/ipv6/conf/{host_name}/proxy_ndp"), "1")?;
    }
    veth::enable_forwarding(addrs)
}

/// ADD in routed mode. On failure the host end (and with it the pod end) is removed.
pub fn add(
    cfg: &PluginConfig,
    container_id: &str,
    ifname: &str,
    netns: &Netns,
    alloc: &Allocation,
) -> Result<CniResult> {
    let host_name = veth::host_veth_name(container_id, ifname);
    let (mut host, mut pod) = veth::open_sockets(netns)?;
    let pair = veth::create(
        &mut host,
        &mut pod,
        netns,
        &veth::PairRequest {
            host_name: &host_name,
            ifname,
            mtu: cfg.mtu.or(alloc.mtu),
            host_mac: Some(HOST_MAC),
            pod_mac: cfg.runtime.mac,
            master: None,
        },
    )?;
    let addrs: Vec<IpNet> = alloc
        .ips
        .iter()
        .map(|ip| host_prefix(ip.address.addr()))
        .collect();
    let configured = (|| -> Result<()> {
        host_sysctls(&host_name, &addrs)?;
        host.set_up(pair.host.index)
            .kctx(|| format!("set {host_name} up"))?;
        veth::configure_pod(
            &mut pod,
            netns,
            &pair.pod,
            &addrs,
            &pod_routes(pair.pod.index, &addrs, &alloc.routes),
        )?;
        if addrs.iter().any(|a| a.addr().is_ipv4()) {
            // Proxy ARP answers only when the host has a route to 169.254.1.1 via another
            // interface (a default route, usually); a permanent entry makes the gateway
            // reachable regardless and saves the first ARP round trip.
            pod.set_neighbour(pair.pod.index, GATEWAY_V4.into(), HOST_MAC)
                .kctx(|| "add the gateway's neighbour entry in the pod".into())?;
        }
        for a in &addrs {
            host.add_route(&RouteSpec::link_scope(*a, pair.host.index), true)
                .kctx(|| format!("add host route {a} dev {host_name}"))?;
        }
        Ok(())
    })();
    if let Err(e) = configured {
        let _ = host.delete_link(&host_name);
        return Err(e);
    }
    let mut result = CniResult {
        interfaces: pair.interfaces(netns).to_vec(),
        ips: addrs
            .iter()
            .map(|a| IpConfig {
                address: *a,
                gateway: None,
                interface: Some(1),
            })
            .collect(),
        routes: Vec::new(),
        dns: cfg.dns.clone().or(alloc.dns.clone()).unwrap_or_default(),
    };
    for r in pod_routes(pair.pod.index, &addrs, &alloc.routes)
        .iter()
        .filter(|r| r.gateway.is_some())
    {
        result.routes.push(Route::new(r.dst, r.gateway));
    }
    Ok(result)
}

/// DEL in routed mode: remove the veth (routes go with it). Missing pieces are fine.
pub fn del(container_id: &str, ifname: &str, netns: Option<&Netns>) -> Result<()> {
    let host_name = veth::host_veth_name(container_id, ifname);
    let mut host = Netlink::open().kctx(|| "open netlink".into())?;
    veth::delete(&mut host, &host_name, netns.map(|ns| (ns, ifname)))
}

/// CHECK in routed mode: the pod interface, its addresses and default route, the host end, and
/// the host routes all match `prev`.
pub fn check(
    container_id: &str,
    ifname: &str,
    netns: &Netns,
    prev: &CniResult,
) -> Result<Vec<IpAddr>> {
    let host_name = veth::host_veth_name(container_id, ifname);
    let mut host = Netlink::open().kctx(|| "open netlink".into())?;
    let veth::PodSide {
        mut pod,
        link: pod_link,
        ips,
    } = veth::check_pod_side(netns, ifname, prev)?;
    let pod_routes = pod.routes().kctx(|| "list pod routes".into())?;
    for want in pod_routes_for(&ips, pod_link.index) {
        if !pod_routes.iter().any(|r| r.same_path(&want)) {
            return Err(veth::mismatch(format!("pod route {want} is missing")));
        }
    }
    let host_link = host
        .link(&host_name)
        .kctx(|| format!("look up {host_name}"))?
        .ok_or_else(|| veth::mismatch(format!("host interface {host_name} is missing")))?;
    let host_routes = host.routes().kctx(|| "list host routes".into())?;
    for ip in &ips {
        let want = RouteSpec::link_scope(host_prefix(*ip), host_link.index);
        if !host_routes.iter().any(|r| r.same_path(&want)) {
            return Err(veth::mismatch(format!(
                "host route {ip} dev {host_name} is missing"
            )));
        }
    }
    Ok(ips)
}

fn pod_routes_for(ips: &[IpAddr], index: u32) -> Vec<RouteSpec> {
    let addrs: Vec<IpNet> = ips.iter().map(|ip| host_prefix(*ip)).collect();
    pod_routes(index, &addrs, &[])
}
