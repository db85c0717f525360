//! Choosing the node's address, as Calico's `IP_AUTODETECTION_METHOD` does: `first-found`,
//! `interface=REGEX`, `can-reach=DEST`, or a literal address (its prefix, when not given, is
//! the one of the interface holding it). The choice is pure ([`choose`]); [`detect`] reads the
//! kernel's interfaces and routes.

use std::net::{IpAddr, UdpSocket};

use ipnet::IpNet;
use regex::Regex;

/// How to find the node address.
#[derive(Debug, Clone)]
pub enum Method {
    FirstFound,
    Interface(Regex),
    CanReach(IpAddr),
    /// `ADDR/PREFIX`: taken as given.
    Given(IpNet),
    /// `ADDR`: the interface holding it gives the prefix (a /32 would put every other node
    /// off-subnet).
    Address(IpAddr),
}

impl Method {
    /// Parses `first-found`, `interface=REGEX`, `can-reach=IP` or `ADDR[/PREFIX]`.
    pub fn parse(s: &str) -> Result<Method, String> {
        if s == "first-found" || s == "autodetect" {
            return Ok(Method::FirstFound);
        }
        if let Some(re) = s.strip_prefix("interface=") {
            return Regex::new(&format!("^(?:{re})$"))
                .map(Method::Interface)
                .map_err(|e| format!("interface={re}: {e}"));
        }
        if let Some(dest) = s.strip_prefix("can-reach=") {
            return dest
                .parse()
                .map(Method::CanReach)
                .map_err(|_| format!("can-reach={dest}: not an IP address"));
        }
        if let Ok(n) = s.parse::<IpNet>() {
            return Ok(Method::Given(n));
        }
        s.parse::<IpAddr>().map(Method::Address).map_err(|_| {
            format!("{s:?} is not first-found, interface=REGEX, can-reach=IP or an address")
        })
    }
}

/// Interfaces never chosen by first-found (Calico's default exclusions plus Trellis's own).
fn excluded(name: &str) -> bool {
    [
        "lo",
        "docker",
        "cbr",
        "kube-ipvs",
        "veth",
        "cali",
        "trl",
        "vxlan",
        "flannel",
        "cni",
        "tunl",
        "virbr",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// Picks the address from `(interface, address)` pairs in kernel order. `reach_src` is the source
/// address the kernel would use towards the can-reach destination.
pub fn choose(
    method: &Method,
    addrs: &[(String, IpNet)],
    reach_src: Option<IpAddr>,
) -> Option<IpNet> {
    let usable = |a: &&(String, IpNet)| {
        let ip = a.1.addr();
        ip.is_ipv4() && !ip.is_loopback() && !matches!(ip, IpAddr::V4(v) if v.is_link_local())
    };
    match method {
        Method::Given(n) => Some(*n),
        Method::Address(ip) => addrs.iter().find(|a| a.1.addr() == *ip).map(|a| a.1),
        Method::FirstFound => addrs
            .iter()
            .filter(usable)
            .find(|a| !excluded(&a.0))
            .map(|a| a.1),
        Method::Interface(re) => addrs
            .iter()
            .filter(usable)
            .find(|a| re.is_match(&a.0))
            .map(|a| a.1),
        Method::CanReach(_) => {
            let src = reach_src?;
            addrs.iter().find(|a| a.1.addr() == src).map(|a| a.1)
        }
    }
}

/// Detects the address in the calling thread's namespace.
pub fn detect(method: &Method) -> Result<IpNet, String> {
    let mut nl = trellis_dataplane::Netlink::open().map_err(|e| e.to_string())?;
    let links = nl.links().map_err(|e| e.to_string())?;
    let addrs: Vec<(String, IpNet)> = nl
        .addresses(None)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|(idx, a)| {
            links
                .iter()
                .find(|l| l.index == idx)
                .map(|l| (l.name.clone(), a))
        })
        .collect();
    let reach_src = match method {
        Method::CanReach(dest) => {
            let bind = if dest.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
            // connect() on UDP sends nothing; it only asks the kernel for a route and source.
            sock.connect((*dest, 9))
                .map_err(|e| format!("can-reach={dest}: no route ({e})"))?;
            Some(sock.local_addr().map_err(|e| e.to_string())?.ip())
        }
        _ => None,
    };
    choose(method, &addrs, reach_src).ok_or_else(|| match method {
        Method::Address(ip) => format!(
            "--ip {ip}: no interface of this node holds this address (give ADDRESS/PREFIX to use it anyway)"
        ),
        _ => format!("no address matches {method:?} among {addrs:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> Vec<(String, IpNet)> {
        vec![
            ("lo".into(), "127.0.0.1/8".parse().unwrap()),
            ("docker0".into(), "172.17.0.1/16".parse().unwrap()),
            ("eth0".into(), "192.0.2.10/24".parse().unwrap()),
            ("eth1".into(), "198.51.100.7/24".parse().unwrap()),
        ]
    }

    #[test]
    fn methods() {
        assert_eq!(
            choose(&Method::parse("first-found").unwrap(), &addrs(), None)
                .unwrap()
                .to_string(),
            "192.0.2.10/24"
        );
        assert_eq!(
            choose(&Method::parse("interface=eth1").unwrap(), &addrs(), None)
                .unwrap()
                .to_string(),
            "198.51.100.7/24"
        );
        assert_eq!(
            choose(&Method::parse("interface=eth").unwrap(), &addrs(), None),
            None,
            "the regex matches whole names"
        );
        let m = Method::parse("can-reach=198.51.100.1").unwrap();
        assert_eq!(
            choose(&m, &addrs(), Some("198.51.100.7".parse().unwrap()))
                .unwrap()
                .to_string(),
            "198.51.100.7/24"
        );
        assert_eq!(
            choose(&Method::parse("10.0.0.5/24").unwrap(), &[], None)
                .unwrap()
                .to_string(),
            "10.0.0.5/24"
        );
        // A bare address takes its prefix from the interface that holds it.
        assert_eq!(
            choose(&Method::parse("198.51.100.7").unwrap(), &addrs(), None)
                .unwrap()
                .to_string(),
            "198.51.100.7/24"
        );
        assert_eq!(
            choose(&Method::parse("203.0.113.1").unwrap(), &addrs(), None),
            None,
            "an address no interface holds is not made up"
        );
        assert!(Method::parse("interface=(").is_err());
        assert!(Method::parse("bogus").is_err());
    }
}
