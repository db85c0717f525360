//! Kernel change notifications: a netlink socket subscribed to the link, neighbour and route
//! multicast groups of the calling thread's namespace. The agent wakes its reconcile loop on the
//! events that concern Trellis ([`KernelEvent::concerns_trellis`]), so a route or FDB entry
//! removed by hand is put back at once rather than at the next periodic resync. Blocking I/O:
//! run it on a dedicated thread.

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::{DataplaneError, Result};

// rtnetlink multicast groups (linux/rtnetlink.h, `enum rtnetlink_groups`).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// What kind of object changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEvent {
    Link,
    /// A neighbour (ARP/ND) or FDB entry of the device `ifindex`.
    Neighbour {
        ifindex: u32,
    },
    Route,
}

impl KernelEvent {
    /// Whether the change can touch what Trellis programs, given its VTEP's ifindex (`None`
    /// without one): any link or route change (one of its routes removed, a foreign route at a
    /// block's destination, the uplink's MTU), but a neighbour change only on the VTEP, the one
    /// device where Trellis keeps neighbour and FDB entries. Elsewhere neighbours change state
    /// all the time (ARP/ND of every pod and peer going reachable, stale, probed), and each such
    /// change woke a full pass: route and neighbour dumps several times a second on a busy node.
    pub fn concerns_trellis(&self, vtep: Option<u32>) -> bool {
        match self {
            KernelEvent::Neighbour { ifindex } => vtep == Some(*ifindex),
            KernelEvent::Link | KernelEvent::Route => true,
        }
    }
}

/// A subscription to kernel changes.
pub struct KernelEvents {
    socket: Socket,
    buf: Vec<u8>,
}

impl KernelEvents {
    /// Subscribes in the calling thread's namespace.
    pub fn subscribe() -> Result<KernelEvents> {
        let err = |op: &str, source| DataplaneError::Netlink {
            op: op.into(),
            source,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| err("socket", e))?;
        socket
            .bind(&SocketAddr::new(0, 0))
            .map_err(|e| err("bind", e))?;
        for g in [
            RTNLGRP_LINK,
            RTNLGRP_NEIGH,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_ROUTE,
        ] {
            socket
                .add_membership(g)
                .map_err(|e| err("join multicast group", e))?;
        }
        // Losing events under a flood is fine (a resync follows); an error is not.
        let _ = socket.set_no_enobufs(true);
        Ok(KernelEvents {
            socket,
            buf: Vec::with_capacity(1 << 16),
        })
    }

    /// Blocks until the kernel reports changes; returns what kinds changed.
    pub fn wait(&mut self) -> Result<Vec<KernelEvent>> {
        self.buf.clear();
        self.buf.reserve(1 << 16);
        let n = self
            .socket
            .recv(&mut self.buf, 0)
            .map_err(|source| DataplaneError::Netlink {
                op: "receive events".into(),
                source,
            })?;
        let n = n.min(self.buf.len());
        let mut out = Vec::new();
        let mut off = 0;
        while off < n {
            let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..n])
            else {
                break;
            };
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
            if let NetlinkPayload::InnerMessage(m) = msg.payload {
                let kind = match m {
                    RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_) => {
                        KernelEvent::Link
                    }
                    RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
                        KernelEvent::Neighbour {
                            ifindex: n.header.ifindex,
                        }
                    }
                    RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_) => {
                        KernelEvent::Route
                    }
                    _ => continue,
                };
                out.push(kind);
            }
        }
        Ok(out)
    }
}
