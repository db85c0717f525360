//! Address ranges as the host-local IPAM schema describes them: a subnet with an optional
//! first/last address and gateway, grouped into range sets (one address per set per attachment).
//! A subnet overlapping addresses no pod may hold (loopback, multicast, ...; see
//! [`trellis_resources::addr`]) is refused. Pure: validation and arithmetic only.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
/// The one predicate for addresses a pod may not hold, shared with IPPool validation.
pub use trellis_resources::addr::{forbidden_address_reason, forbidden_reason};

use crate::IpamError;

/// One validated range: every address in `start..=end` is allocatable except the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: Option<IpAddr>,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(v4: bool, n: u128) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

fn invalid(field: &'static str, value: impl fmt::Display, reason: impl Into<String>) -> IpamError {
    IpamError::InvalidRange {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

impl Range {
    /// Validates a range. Defaults follow host-local: the first usable address is the one after
    /// the network address, the last is the one before broadcast (IPv4) or the last one (IPv6),
    /// and the gateway defaults to the first usable address.
    pub fn new(
        subnet: IpNet,
        start: Option<IpAddr>,
        end: Option<IpAddr>,
        gateway: Option<IpAddr>,
    ) -> Result<Range, IpamError> {
        if subnet.network() != subnet.addr() {
            return Err(invalid(
                "subnet",
                subnet,
                format!("host bits set; the network is {}", subnet.trunc()),
            ));
        }
        if let Some(why) = forbidden_reason(&subnet) {
            return Err(invalid(
                "subnet",
                subnet,
                format!("overlaps {why}, which no pod may hold"),
            ));
        }
        let v4 = subnet.addr().is_ipv4();
        let net = to_u128(subnet.network());
        let last = to_u128(subnet.broadcast());
        let (first_usable, last_usable) = if v4 && subnet.prefix_len() >= 31 {
            (net, last)
        } else if v4 {
            (net + 1, last - 1)
        } else if subnet.prefix_len() == 128 {
            (net, last)
        } else {
            (net + 1, last)
        };
        let inside = |field: &'static str, ip: IpAddr| -> Result<u128, IpamError> {
            if ip.is_ipv4() != v4 || !subnet.contains(&ip) {
                return Err(invalid(field, ip, format!("not inside subnet {subnet}")));
            }
            let n = to_u128(ip);
            if n < first_usable || n > last_usable {
                return Err(invalid(
                    field,
                    ip,
                    format!("is the network or broadcast address of {subnet}"),
                ));
            }
            Ok(n)
        };
        let s = match start {
            Some(ip) => inside("rangeStart", ip)?,
            None => first_usable,
        };
        let e = match end {
            Some(ip) => inside("rangeEnd", ip)?,
            None => last_usable,
        };
        if s > e {
            return Err(invalid(
                "rangeStart",
                from_u128(v4, s),
                format!("is after rangeEnd {}", from_u128(v4, e)),
            ));
        }
        let gateway = match gateway {
            Some(gw) => {
                if gw.is_ipv4() != v4 || !subnet.contains(&gw) {
                    return Err(invalid(
                        "gateway",
                        gw,
                        format!("not inside subnet {subnet}"),
                    ));
                }
                Some(gw)
            }
            None if first_usable < last_usable => Some(from_u128(v4, first_usable)),
            None => None,
        };
        let mut range = Range {
            subnet,
            start: from_u128(v4, s),
            end: from_u128(v4, e),
            gateway,
        };
        // host-local: with the default start, never hand out the gateway as the first address.
        if start.is_none() && range.gateway == Some(range.start) && s < e {
            range.start = from_u128(v4, s + 1);
        }
        Ok(range)
    }

    pub fn is_ipv4(&self) -> bool {
        self.subnet.addr().is_ipv4()
    }

    /// Whether `ip` is allocatable from this range (inside start..=end and not the gateway).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_ipv4()
            && to_u128(ip) >= to_u128(self.start)
            && to_u128(ip) <= to_u128(self.end)
            && Some(ip) != self.gateway
    }

    /// How many addresses this range can hand out.
    pub fn size(&self) -> u128 {
        let n = to_u128(self.end) - to_u128(self.start) + 1;
        match self.gateway {
            Some(gw) if to_u128(gw) >= to_u128(self.start) && to_u128(gw) <= to_u128(self.end) => {
                n - 1
            }
            _ => n,
        }
    }

    /// The first allocatable address of this range.
    pub(crate) fn first(&self) -> Option<IpAddr> {
        if self.contains(self.start) {
            Some(self.start)
        } else {
            self.after(self.start)
        }
    }

    /// The next allocatable address after `ip` inside this range, if any.
    pub(crate) fn after(&self, ip: IpAddr) -> Option<IpAddr> {
        let v4 = self.is_ipv4();
        let mut n = to_u128(ip).max(to_u128(self.start).saturating_sub(1));
        loop {
            if n >= to_u128(self.end) {
                return None;
            }
            n += 1;
            let cand = from_u128(v4, n);
            if Some(cand) != self.gateway {
                return Some(cand);
            }
        }
    }

    /// Whether `ip` lies within start..=end (gateway included): a valid cursor position.
    pub(crate) fn spans(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_ipv4()
            && to_u128(ip) >= to_u128(self.start)
            && to_u128(ip) <= to_u128(self.end)
    }

    /// Why `ip`, which lies in this range's subnet, cannot be handed out from it; `None` when it
    /// can (or when it lies outside the subnet).
    pub fn unallocatable_reason(&self, ip: IpAddr) -> Option<String> {
        if ip.is_ipv4() != self.is_ipv4() || !self.subnet.contains(&ip) || self.contains(ip) {
            return None;
        }
        if Some(ip) == self.gateway {
            return Some(format!("it is the gateway of {self}"));
        }
        if self.is_ipv4() && self.subnet.prefix_len() < 31 {
            if ip == self.subnet.network() {
                return Some(format!("it is the network address of {}", self.subnet));
            }
            if ip == self.subnet.broadcast() {
                return Some(format!("it is the broadcast address of {}", self.subnet));
            }
        }
        Some(format!(
            "it is outside rangeStart..rangeEnd ({}-{})",
            self.start, self.end
        ))
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.is_ipv4() == other.is_ipv4()
            && to_u128(self.start) <= to_u128(other.end)
            && to_u128(other.start) <= to_u128(self.end)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}-{})", self.subnet, self.start, self.end)
    }
}

/// Ranges of one address family from which an attachment gets exactly one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<Range>,
}

impl RangeSet {
    /// Validates that the set is non-empty, of one family and free of overlaps.
    pub fn new(ranges: Vec<Range>) -> Result<RangeSet, IpamError> {
        let Some(first) = ranges.first() else {
            return Err(invalid(
                "ranges",
                "[]",
                "a range set needs at least one range",
            ));
        };
        for (i, a) in ranges.iter().enumerate() {
            if a.is_ipv4() != first.is_ipv4() {
                return Err(IpamError::MixedFamilies {
                    a: first.to_string(),
                    b: a.to_string(),
                });
            }
            for b in &ranges[i + 1..] {
                if a.overlaps(b) {
                    return Err(IpamError::Overlap {
                        a: a.to_string(),
                        b: b.to_string(),
                    });
                }
            }
        }
        Ok(RangeSet { ranges })
    }

    pub fn ranges(&self) -> &[Range] {
        &self.ranges
    }

    pub fn is_ipv4(&self) -> bool {
        self.ranges[0].is_ipv4()
    }

    /// The range an address belongs to, if any.
    pub fn range_of(&self, ip: IpAddr) -> Option<&Range> {
        self.ranges.iter().find(|r| r.contains(ip))
    }

    /// A range whose subnet holds `ip` though `ip` is not allocatable from it, and why.
    pub fn unallocatable(&self, ip: IpAddr) -> Option<(&Range, String)> {
        self.ranges
            .iter()
            .find_map(|r| r.unallocatable_reason(ip).map(|why| (r, why)))
    }

    pub fn overlaps(&self, other: &RangeSet) -> Option<(String, String)> {
        for a in &self.ranges {
            for b in &other.ranges {
                if a.overlaps(b) {
                    return Some((a.to_string(), b.to_string()));
                }
            }
        }
        None
    }

    /// Total number of allocatable addresses.
    pub fn size(&self) -> u128 {
        self.ranges.iter().map(Range::size).sum()
    }
}

impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.ranges.iter().map(|r| r.subnet.to_string()).collect();
        write!(f, "[{}]", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_follow_host_local() {
        let r = Range::new("10.1.2.0/24".parse().unwrap(), None, None, None).unwrap();
        assert_eq!(r.gateway, Some(ip("10.1.2.1")));
        assert_eq!(r.start, ip("10.1.2.2"));
        assert_eq!(r.end, ip("10.1.2.254"));
        assert_eq!(r.size(), 253);
        let r6 = Range::new("fd00::/120".parse().unwrap(), None, None, None).unwrap();
        assert_eq!(r6.start, ip("fd00::2"));
        assert_eq!(r6.end, ip("fd00::ff"));
    }

    #[test]
    fn explicit_start_end_and_gateway_checked() {
        let net: IpNet = "10.0.0.0/24".parse().unwrap();
        let err = Range::new(net, Some(ip("10.0.1.5")), None, None).unwrap_err();
        assert!(err.to_string().contains("rangeStart"), "{err}");
        let err = Range::new(net, Some(ip("10.0.0.9")), Some(ip("10.0.0.5")), None).unwrap_err();
        assert!(err.to_string().contains("after rangeEnd"), "{err}");
        let err = Range::new(net, None, Some(ip("10.0.0.255")), None).unwrap_err();
        assert!(err.to_string().contains("broadcast"), "{err}");
        let err = Range::new("10.0.0.1/24".parse().unwrap(), None, None, None).unwrap_err();
        assert!(err.to_string().contains("host bits"), "{err}");
        let r = Range::new(
            net,
            Some(ip("10.0.0.10")),
            Some(ip("10.0.0.20")),
            Some(ip("10.0.0.15")),
        )
        .unwrap();
        assert_eq!(r.size(), 10);
        assert!(!r.contains(ip("10.0.0.15")));
    }

    #[test]
    fn range_set_rejects_overlap_and_mixed() {
        let a = Range::new("10.0.0.0/24".parse().unwrap(), None, None, None).unwrap();
        let b = Range::new("10.0.0.0/25".parse().unwrap(), None, None, None).unwrap();
        let c = Range::new("fd00::/64".parse().unwrap(), None, None, None).unwrap();
        assert!(matches!(
            RangeSet::new(vec![a.clone(), b]),
            Err(IpamError::Overlap { .. })
        ));
        assert!(matches!(
            RangeSet::new(vec![a, c]),
            Err(IpamError::MixedFamilies { .. })
        ));
        assert!(RangeSet::new(vec![]).is_err());
    }

    #[test]
    fn reserved_subnets_are_refused() {
        for s in [
            "0.0.0.0/8",
            "0.0.0.0/0",
            "127.0.0.0/8",
            "224.0.0.0/4",
            "255.255.255.255/32",
            "::/128",
            "::1/128",
            "ff00::/8",
            "::/0",
        ] {
            let err = Range::new(s.parse().unwrap(), None, None, None).unwrap_err();
            assert!(
                matches!(&err, IpamError::InvalidRange { field: "subnet", reason, .. }
                    if reason.contains("no pod may hold")),
                "{s}: {err}"
            );
        }
    }

    #[test]
    fn unallocatable_addresses_say_why() {
        let net: IpNet = "10.0.0.0/24".parse().unwrap();
        let r = Range::new(net, None, Some(ip("10.0.0.100")), None).unwrap();
        assert!(r
            .unallocatable_reason(ip("10.0.0.1"))
            .unwrap()
            .contains("gateway"));
        assert!(r
            .unallocatable_reason(ip("10.0.0.0"))
            .unwrap()
            .contains("network address"));
        assert!(r
            .unallocatable_reason(ip("10.0.0.255"))
            .unwrap()
            .contains("broadcast"));
        assert!(r
            .unallocatable_reason(ip("10.0.0.150"))
            .unwrap()
            .contains("rangeEnd"));
        assert_eq!(r.unallocatable_reason(ip("10.0.0.50")), None);
        assert_eq!(r.unallocatable_reason(ip("10.0.1.50")), None);
    }

    #[test]
    fn stepping_skips_gateway_and_stops_at_end() {
        let net: IpNet = "10.0.0.0/29".parse().unwrap();
        let r = Range::new(net, Some(ip("10.0.0.1")), None, Some(ip("10.0.0.2"))).unwrap();
        assert_eq!(r.first(), Some(ip("10.0.0.1")));
        assert_eq!(r.after(ip("10.0.0.1")), Some(ip("10.0.0.3")));
        assert_eq!(r.after(ip("10.0.0.6")), None);
    }
}
