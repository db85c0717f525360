//! The veth pair every pod gets: deterministic host-side naming, creation straight into the
//! pod's namespace, and the pod-side addresses and routes. Does kernel I/O through
//! [`trellis_dataplane`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use trellis_cni_types::{codes, CniError};
use trellis_dataplane::netlink::VethSpec;
use trellis_dataplane::types::format_mac;
use trellis_dataplane::{sysctl, Link, Netlink, Netns, RouteSpec};

use crate::error::{KernelContext, Result};

/// Prefix of host-side interface names.
pub const HOST_PREFIX: &str = "trl";
/// MAC of every host-side veth in routed mode (as Calico's `ee:ee:ee:ee:ee:ee`).
pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// The pod's IPv4 gateway in routed mode, answered by proxy ARP on the host side.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 gateway in routed mode: the EUI-64 link-local of `HOST_MAC`.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);

/// `trl` + 12 hex digits of SHA-256(container ID, ifname): 15 characters, stable across calls.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}\0{ifname}").as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{HOST_PREFIX}{hex}")
}

/// Netlink sockets in the plugin's own namespace (the host) and in the pod's.
pub fn open_sockets(netns: &Netns) -> Result<(Netlink, Netlink)> {
    let host = Netlink::open().kctx(|| "open netlink".into())?;
    let pod =
        Netlink::open_in(netns).kctx(|| format!("open netlink in {}", netns.path().display()))?;
    Ok((host, pod))
}

/// Both ends after creation.
pub struct VethPair {
    pub host: Link,
    pub pod: Link,
}

impl VethPair {
    /// The two result interfaces: the host end, then the pod end (with its sandbox).
    pub fn interfaces(&self, netns: &Netns) -> [trellis_cni_types::Interface; 2] {
        [
            trellis_cni_types::Interface {
                name: self.host.name.clone(),
                mac: mac_string(&self.host),
                mtu: Some(self.host.mtu),
                sandbox: None,
            },
            trellis_cni_types::Interface {
                name: self.pod.name.clone(),
                mac: mac_string(&self.pod),
                mtu: Some(self.pod.mtu),
                sandbox: Some(netns.path().display().to_string()),
            },
        ]
    }
}

/// Parameters for [`create`].
pub struct PairRequest<'a> {
    pub host_name: &'a str,
    pub ifname: &'a str,
    pub mtu: Option<u32>,
    pub host_mac: Option<[u8; 6]>,
    pub pod_mac: Option<[u8; 6]>,
    pub master: Option<u32>,
}

/// Creates the pair with the pod end already inside `netns`. A stale host end with the same
/// name is this attachment's (the name hashes container ID and ifname), left by an ADD that was
/// killed: it is removed first, and its pod end with it, so a retried ADD succeeds. An existing
/// interface of that name inside the pod after that is someone else's: an error. If the pair
/// cannot be read back, it is removed again — a failed ADD leaves no veth behind.
///
/// The pair is created first and those checks run only when the kernel refuses it because a
/// name is taken (EEXIST), so the usual ADD makes one request instead of three.
pub fn create(
    host: &mut Netlink,
    pod: &mut Netlink,
    netns: &Netns,
    req: &PairRequest,
) -> Result<VethPair> {
    let spec = VethSpec {
        name: req.host_name.to_string(),
        mac: req.host_mac,
        peer_name: req.ifname.to_string(),
        peer_mac: req.pod_mac,
        peer_netns_fd: Some(netns.fd()),
        mtu: req.mtu,
        master: req.master,
        queues: Some(1),
    };
    match host.create_veth(&spec) {
        Ok(()) => {}
        Err(e) if e.is_exists() => {
            clear_names(host, pod, netns, req)?;
            host.create_veth(&spec)
                .kctx(|| format!("create veth {} <-> {}", req.host_name, req.ifname))?;
        }
        Err(e) => {
            return Err(crate::error::PluginError::kernel(
                format!("create veth {} <-> {}", req.host_name, req.ifname),
                e,
            ))
        }
    }
    read_back(host, pod, req)
}

/// After a refused creation: removes a stale host end of this attachment (and its pod end with
/// it); an interface of the pod's name that is still there is someone else's, an error.
fn clear_names(
    host: &mut Netlink,
    pod: &mut Netlink,
    netns: &Netns,
    req: &PairRequest,
) -> Result<()> {
    if host
        .delete_link(req.host_name)
        .kctx(|| format!("remove stale {}", req.host_name))?
    {
        tracing::warn!(
            host_veth = req.host_name,
            "removed a stale host interface of this attachment"
        );
    }
    if pod
        .link(req.ifname)
        .kctx(|| format!("look up {} in the pod", req.ifname))?
        .is_some()
    {
        return Err(CniError::invalid_env(
            "CNI_IFNAME",
            format!(
                "interface {} already exists in {}",
                req.ifname,
                netns.path().display()
            ),
        )
        .into());
    }
    Ok(())
}

/// Reads both ends of the new pair; removes it again if that fails.
fn read_back(host: &mut Netlink, pod: &mut Netlink, req: &PairRequest) -> Result<VethPair> {
    let read_back = (|| -> Result<VethPair> {
        let host_link = host
            .link(req.host_name)
            .kctx(|| format!("read back {}", req.host_name))?;
        let pod_link = pod
            .link(req.ifname)
            .kctx(|| format!("read back {}", req.ifname))?;
        match (host_link, pod_link) {
            (Some(host), Some(pod)) => Ok(VethPair { host, pod }),
            (h, p) => Err(CniError::new(
                codes::KERNEL,
                format!(
                    "veth {} <-> {} is not as created (host end {}, pod end {})",
                    req.host_name,
                    req.ifname,
                    if h.is_some() { "present" } else { "missing" },
                    if p.is_some() { "present" } else { "missing" },
                ),
            )
            .into()),
        }
    })();
    if read_back.is_err() {
        if let Err(e) = host.delete_link(req.host_name) {
            tracing::error!(host_veth = req.host_name, error = %e, "removing the new veth failed");
        }
    }
    read_back
}

/// Pod side: addresses (no DAD for IPv6), link up, then routes in order.
pub fn configure_pod(
    pod: &mut Netlink,
    netns: &Netns,
    link: &Link,
    addrs: &[IpNet],
    routes: &[RouteSpec],
) -> Result<()> {
    if addrs.iter().any(|a| a.addr().is_ipv6()) {
        let name = link.name.clone();
        netns
            .enter_with(move || sysctl::ensure(&format!("net/ipv6/conf/{name}/disable_ipv6"), "0"))
            .kctx(|| "enter pod namespace".into())?
            .kctx(|| "enable IPv6 on the pod interface".into())?;
    }
    for a in addrs {
        pod.add_address(link.index, *a, a.addr().is_ipv6())
            .kctx(|| format!("add {a} to {} in the pod", link.name))?;
    }
    pod.set_up(link.index)
        .kctx(|| format!("set {} up in the pod", link.name))?;
    for r in routes {
        pod.add_route(r, true)
            .kctx(|| format!("add route {} in the pod", r.dst))?;
    }
    Ok(())
}

/// Turns on forwarding for the families in use, in the calling thread's namespace.
pub fn enable_forwarding(addrs: &[IpNet]) -> Result<()> {
    if addrs.iter().any(|a| a.addr().is_ipv4()) {
        sysctl::ensure("net/ipv4/ip_forward", "1").kctx(|| "enable IPv4 forwarding".into())?;
    }
    if addrs.iter().any(|a| a.addr().is_ipv6()) {
        sysctl::ensure("net/ipv6/conf/all/forwarding", "1")
            .kctx(|| "enable IPv6 forwarding".into())?;
    }
    Ok(())
}

/// Tears down the pair. The host end is taken down at once — the kernel flushes every route
/// through it, so the pod is cut off and its address safe to reuse — and its deletion (which
/// the pod end follows) is handed to [`crate::deferred`]: unregistering a netdev waits for an
/// RCU grace period (~20 ms) that the runtime need not wait for. When the host end is already
/// gone, removes a leftover pod-side veth of this name, if any.
pub fn delete(host: &mut Netlink, host_name: &str, pod: Option<(&Netns, &str)>) -> Result<()> {
    if let Some(link) = host
        .link(host_name)
        .kctx(|| format!("look up {host_name}"))?
    {
        match host.set_down(link.index) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => {
                return Err(crate::error::PluginError::kernel(
                    format!("set {host_name} down"),
                    e,
                ))
            }
        }
        crate::deferred::delete_link(link.index);
        return Ok(());
    }
    // Only now is a socket in the pod's namespace worth its cost.
    if let Some((ns, ifname)) = pod {
        let mut pod =
            Netlink::open_in(ns).kctx(|| format!("open netlink in {}", ns.path().display()))?;
        if let Some(l) = pod
            .link(ifname)
            .kctx(|| format!("look up {ifname} in the pod"))?
        {
            if l.kind.as_deref() == Some("veth") {
                pod.delete_link(ifname)
                    .kctx(|| format!("delete {ifname} in the pod"))?;
            }
        }
    }
    Ok(())
}

/// A CHECK failure.
pub fn mismatch(msg: String) -> crate::error::PluginError {
    CniError::new(codes::CHECK_MISMATCH, msg).into()
}

/// What CHECK found inside the pod: the interface and the addresses `prevResult` gives it.
pub struct PodSide {
    pub pod: Netlink,
    pub link: Link,
    pub ips: Vec<IpAddr>,
}

/// CHECK, the part common to every mode: the pod interface exists with `prevResult`'s MAC and
/// carries each of its addresses.
pub fn check_pod_side(
    netns: &Netns,
    ifname: &str,
    prev: &trellis_cni_types::CniResult,
) -> Result<PodSide> {
    let mut pod =
        Netlink::open_in(netns).kctx(|| format!("open netlink in {}", netns.path().display()))?;
    let link = pod
        .link(ifname)
        .kctx(|| format!("look up {ifname}"))?
        .ok_or_else(|| {
            mismatch(format!(
                "interface {ifname} is missing from {}",
                netns.path().display()
            ))
        })?;
    let want_if = prev
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.is_some());
    if let Some(mac) = want_if.and_then(|i| prev.interfaces[i].mac.as_ref()) {
        if mac_string(&link).as_deref() != Some(mac.as_str()) {
            return Err(mismatch(format!(
                "{ifname} has MAC {:?}, prevResult says {mac}",
                mac_string(&link)
            )));
        }
    }
    let ips: Vec<IpAddr> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || ip.interface == want_if)
        .map(|ip| ip.address.addr())
        .collect();
    if ips.is_empty() {
        return Err(mismatch(
            "prevResult lists no addresses for the pod interface".into(),
        ));
    }
    let present = pod
        .addresses(Some(link.index))
        .kctx(|| "list pod addresses".into())?;
    for ip in &ips {
        if !present.iter().any(|(_, a)| a.addr() == *ip) {
            return Err(mismatch(format!("address {ip} is missing from {ifname}")));
        }
    }
    Ok(PodSide { pod, link, ips })
}

pub fn mac_string(link: &Link) -> Option<String> {
    link.mac.as_ref().map(format_mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_short_and_distinct() {
        let a = host_veth_name("abc123", "eth0");
        assert_eq!(a, host_veth_name("abc123", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("trl"));
        assert_ne!(a, host_veth_name("abc123", "eth1"));
        assert_ne!(a, host_veth_name("abc12", "3eth0"));
    }

    #[test]
    fn v6_gateway_is_eui64_of_host_mac() {
        assert_eq!(GATEWAY_V6.to_string(), "fe80::ecee:eeff:feee:eeee");
    }
}
