//! Which addresses a pod may hold: one predicate shared by every place that hands out pod
//! addresses (the CNI plugin's local ranges, IPPools, results from other IPAM plugins), so they
//! all refuse the same things. Pure.
//!
//! Refused: the addresses the kernel or the IP architecture reserve for one host or for groups —
//! "this network" 0.0.0.0/8 (RFC 1122 §3.2.1.3), loopback 127.0.0.0/8, link-local 169.254.0.0/16
//! (RFC 3927; routed mode's gateway 169.254.1.1 lives there), multicast 224.0.0.0/4, the limited
//! broadcast 255.255.255.255; IPv6 unspecified `::`, loopback `::1`, IPv4-mapped
//! `::ffff:0:0/96`, link-local fe80::/10 and multicast ff00::/8 (RFC 4291 §2.4). Calico refuses
//! link-local pools for the same reason.

use std::net::IpAddr;

use ipnet::IpNet;

/// The reserved networks and why no pod may hold an address in them.
const FORBIDDEN: &[(&str, &str)] = &[
    ("0.0.0.0/8", "the IPv4 \"this network\" block 0.0.0.0/8"),
    ("127.0.0.0/8", "the IPv4 loopback block 127.0.0.0/8"),
    ("169.254.0.0/16", "the IPv4 link-local block 169.254.0.0/16"),
    ("224.0.0.0/4", "the IPv4 multicast block 224.0.0.0/4"),
    (
        "255.255.255.255/32",
        "the IPv4 broadcast address 255.255.255.255",
    ),
    ("::/128", "the IPv6 unspecified address ::"),
    ("::1/128", "the IPv6 loopback address ::1"),
    ("::ffff:0:0/96", "the IPv4-mapped IPv6 block ::ffff:0:0/96"),
    ("fe80::/10", "the IPv6 link-local block fe80::/10"),
    ("ff00::/8", "the IPv6 multicast block ff00::/8"),
];

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.addr().is_ipv4() == b.addr().is_ipv4()
        && (a.contains(&b.network()) || b.contains(&a.network()))
}

/// Why `net` may not be used for pod addresses (it overlaps a reserved block), or `None` when it
/// may. A network overlapping a reserved block is refused even if only part of it is reserved.
pub fn forbidden_reason(net: &IpNet) -> Option<&'static str> {
    FORBIDDEN.iter().find_map(|(cidr, why)| {
        let reserved: IpNet = cidr.parse().expect("constant CIDR");
        overlaps(net, &reserved).then_some(*why)
    })
}

/// Why the single address `ip` may not be a pod's, or `None` when it may.
pub fn forbidden_address_reason(ip: IpAddr) -> Option<&'static str> {
    forbidden_reason(&IpNet::from(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn reserved_blocks_and_their_supernets_are_refused() {
        for s in [
            "0.0.0.0/8",
            "0.0.0.0/0",
            "127.0.0.0/24",
            "126.0.0.0/7",
            "169.254.1.0/24",
            "224.0.0.0/24",
            "239.255.255.0/24",
            "255.255.255.255/32",
            "255.255.255.0/24",
            "::/128",
            "::/0",
            "::1/128",
            "::ffff:10.0.0.0/120",
            "fe80::/64",
            "ff02::/16",
        ] {
            assert!(forbidden_reason(&net(s)).is_some(), "{s} accepted");
        }
    }

    #[test]
    fn ordinary_pod_networks_are_fine() {
        for s in [
            "10.0.0.0/8",
            "1.0.0.0/8",
            "128.0.0.0/8",
            "169.253.0.0/16",
            "192.168.0.0/16",
            "223.255.255.0/24",
            "240.0.0.0/24",
            "fd00::/64",
            "2001:db8::/32",
            "::2/128",
        ] {
            assert_eq!(forbidden_reason(&net(s)), None, "{s} refused");
        }
        assert!(forbidden_address_reason("127.0.0.1".parse().unwrap()).is_some());
        assert!(forbidden_address_reason("10.1.2.3".parse().unwrap()).is_none());
    }
}
