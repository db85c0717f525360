//! Plain data describing kernel objects, shared by the shell and the pure planners.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// A network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub up: bool,
    /// Index of the bridge (or other controller) this link is enslaved to.
    pub master: Option<u32>,
    /// `IFLA_INFO_KIND` (veth, bridge, vxlan, ...).
    pub kind: Option<String>,
}

/// `rtm_scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteScope {
    Universe,
    Link,
    Host,
}

/// `rtm_type` values Trellis programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    Unicast,
    Blackhole,
}

/// Main routing table.
pub const TABLE_MAIN: u32 = 254;
/// `RTPROT_BOOT`, what `ip route add` uses.
pub const PROTO_BOOT: u8 = 3;
/// `RTPROT_KERNEL`.
pub const PROTO_KERNEL: u8 = 2;

/// A route to program or one read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub scope: RouteScope,
    pub kind: RouteKind,
    pub protocol: u8,
    pub table: u32,
    pub onlink: bool,
    pub metric: Option<u32>,
}

impl RouteSpec {
    /// `DST dev OIF scope link`.
    pub fn link_scope(dst: IpNet, oif: u32) -> RouteSpec {
        RouteSpec {
            dst,
            gateway: None,
            oif: Some(oif),
            scope: RouteScope::Link,
            kind: RouteKind::Unicast,
            protocol: PROTO_BOOT,
            table: TABLE_MAIN,
            onlink: false,
            metric: None,
        }
    }

    /// `DST via GW dev OIF`.
    pub fn via(dst: IpNet, gw: IpAddr, oif: u32) -> RouteSpec {
        RouteSpec {
            gateway: Some(gw),
            scope: RouteScope::Universe,
            ..RouteSpec::link_scope(dst, oif)
        }
    }

    /// Whether this kernel route matches the intent of `want` (ignores protocol/metric defaults
    /// that the kernel may fill in).
    pub fn same_path(&self, want: &RouteSpec) -> bool {
        self.dst == want.dst
            && self.gateway == want.gateway
            && (want.oif.is_none() || self.oif == want.oif)
            && self.kind == want.kind
            && self.table == want.table
    }
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == RouteKind::Blackhole {
            write!(f, "blackhole ")?;
        }
        write!(f, "{}", self.dst)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(oif) = self.oif {
            write!(f, " dev #{oif}")?;
        }
        if self.scope == RouteScope::Link {
            write!(f, " scope link")?;
        }
        if self.onlink {
            write!(f, " onlink")?;
        }
        if self.table != TABLE_MAIN {
            write!(f, " table {}", self.table)?;
        }
        Ok(())
    }
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
