//! Addresses no pod may hold: the one predicate shared by every place that hands out pod
//! addresses (IPPool validation, the CNI plugin's local ranges, results from other IPAM
//! plugins), so "which addresses are special" is decided in one place. Pure.
//!
//! Refused (RFC 6890): "this network" 0.0.0.0/8 (RFC 1122 §3.2.1.3), loopback 127.0.0.0/8,
//! link-local 169.254.0.0/16 (RFC 3927; routed mode's gateway 169.254.1.1 lives there, and
//! Calico refuses link-local pools), multicast 224.0.0.0/4, the limited broadcast
//! 255.255.255.255; IPv6 unspecified `::`, loopback `::1`, IPv4-mapped `::ffff:0:0/96`,
//! link-local fe80::/10 and multicast ff00::/8 (RFC 4291 §2.4).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The special-purpose ranges (RFC 6890) an address of a pod must never fall in, with why.
const FORBIDDEN: [(IpNet, &str); 10] = [
    // RFC 1122 §3.2.1.3: "this host on this network"; never a valid source or destination.
    (
        IpNet::V4(v4(Ipv4Addr::new(0, 0, 0, 0), 8)),
        "unspecified (0.0.0.0/8, \"this network\")",
    ),
    (
        IpNet::V4(v4(Ipv4Addr::new(127, 0, 0, 0), 8)),
        "loopback (127.0.0.0/8)",
    ),
    (
        IpNet::V4(v4(Ipv4Addr::new(169, 254, 0, 0), 16)),
        "link-local (169.254.0.0/16)",
    ),
    (
        IpNet::V4(v4(Ipv4Addr::new(224, 0, 0, 0), 4)),
        "multicast (224.0.0.0/4)",
    ),
    (
        IpNet::V4(v4(Ipv4Addr::BROADCAST, 32)),
        "limited broadcast (255.255.255.255)",
    ),
    (
        IpNet::V6(v6(Ipv6Addr::UNSPECIFIED, 128)),
        "unspecified (::/128)",
    ),
    (
        IpNet::V6(v6(Ipv6Addr::LOCALHOST, 128)),
        "loopback (::1/128)",
    ),
    (
        IpNet::V6(v6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96)),
        "IPv4-mapped (::ffff:0:0/96)",
    ),
    (
        IpNet::V6(v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10)),
        "link-local (fe80::/10)",
    ),
    (
        IpNet::V6(v6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8)),
        "multicast (ff00::/8)",
    ),
];

const fn v4(a: Ipv4Addr, len: u8) -> Ipv4Net {
    match Ipv4Net::new(a, len) {
        Ok(n) => n,
        Err(_) => panic!("valid prefix length"),
    }
}

const fn v6(a: Ipv6Addr, len: u8) -> Ipv6Net {
    match Ipv6Net::new(a, len) {
        Ok(n) => n,
        Err(_) => panic!("valid prefix length"),
    }
}

/// Whether two networks share an address (one contains the other's first address).
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Why `net` overlaps addresses no pod may hold (see the module docs), or `None` when it does
/// not. A network overlapping a reserved block is refused even if only part of it is reserved.
pub fn forbidden_reason(net: &IpNet) -> Option<&'static str> {
    FORBIDDEN
        .iter()
        .find(|(bad, _)| overlaps(net, bad))
        .map(|(_, why)| *why)
}

/// The same for one address.
pub fn forbidden_address_reason(ip: IpAddr) -> Option<&'static str> {
    forbidden_reason(&IpNet::from(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(s: &str) -> Option<&'static str> {
        forbidden_reason(&s.parse().unwrap())
    }

    #[test]
    fn special_ranges_are_named() {
        for (net, want) in [
            ("0.0.0.0/8", "unspecified"),
            ("0.0.0.0/32", "unspecified"),
            ("0.255.0.0/16", "unspecified"),
            ("127.0.0.0/8", "loopback"),
            ("127.0.0.1/32", "loopback"),
            ("126.0.0.0/7", "loopback"),
            ("224.0.0.0/4", "multicast"),
            ("239.1.0.0/16", "multicast"),
            ("192.0.0.0/2", "multicast"),
            ("255.255.255.255/32", "broadcast"),
            ("255.255.255.0/24", "broadcast"),
            ("0.0.0.0/0", "unspecified"),
            ("::/128", "unspecified"),
            ("::/0", "unspecified"),
            ("::1/128", "loopback"),
            ("::/127", "unspecified"),
            ("ff02::/16", "multicast"),
            ("ff00::/8", "multicast"),
            ("fe00::/7", "link-local"),
            ("169.254.1.0/24", "link-local"),
            ("169.0.0.0/8", "link-local"),
            ("fe80::/64", "link-local"),
            ("::ffff:10.0.0.0/120", "IPv4-mapped"),
        ] {
            let got = reason(net).unwrap_or_else(|| panic!("{net} must be forbidden"));
            assert!(got.contains(want), "{net}: {got}");
        }
    }

    #[test]
    fn ordinary_ranges_pass() {
        for net in [
            "10.0.0.0/8",
            "192.168.0.0/16",
            "1.0.0.0/8",
            "128.0.0.0/3",
            "223.255.255.0/24",
            "240.0.0.0/5",
            "255.255.255.254/32",
            "fd00::/8",
            "2001:db8::/32",
            "::2/128",
            "169.253.0.0/16",
        ] {
            assert_eq!(reason(net), None, "{net}");
        }
        assert!(forbidden_address_reason("127.0.0.1".parse().unwrap()).is_some());
        assert!(forbidden_address_reason("10.0.0.1".parse().unwrap()).is_none());
    }
}
