//! Applies [`trellis_routing`] plans to the kernel and reads back what Trellis owns there:
//! routes with Trellis's protocol number, permanent neighbours and FDB entries on the VTEP,
//! and the destinations other protocols' routes hold (which a plan never replaces).
//! Never touches routes of other protocols.

use std::borrow::Borrow;
use std::net::IpAddr;

use ipnet::IpNet;
use trellis_routing::{Fdb, Neighbour, Observed, Op, Route, RouteKind, BGP_METRIC, TRELLIS_PROTO};

use crate::types::{RouteKind as KKind, RouteScope, RouteSpec, TABLE_MAIN};
use crate::{DataplaneError, Netlink, Result};

fn to_kernel(r: &Route) -> RouteSpec {
    match &r.kind {
        RouteKind::Blackhole => RouteSpec {
            dst: r.dst,
            gateway: None,
            oif: None,
            scope: RouteScope::Universe,
            kind: KKind::Blackhole,
            protocol: TRELLIS_PROTO,
            table: TABLE_MAIN,
            onlink: false,
            metric: (r.metric != 0).then_some(r.metric),
        },
        RouteKind::Via {
            gateway,
            ifindex,
            onlink,
        } => RouteSpec {
            onlink: *onlink,
            protocol: TRELLIS_PROTO,
            metric: (r.metric != 0).then_some(r.metric),
            ..RouteSpec::via(r.dst, *gateway, *ifindex)
        },
    }
}

/// The metric the kernel gives an IPv6 route added without one (`IP6_RT_PRIO_USER`).
const IPV6_DEFAULT_METRIC: u32 = 1024;

/// A route's metric as planned: Trellis adds its own routes without a metric, which IPv4 keeps
/// as 0 but IPv6 reports as 1024; read as 0, so an IPv6 route reads back as it was planned
/// (otherwise every pass replaced it and then deleted it as stale — a blackhole for a local
/// IPv6 block never stayed, and each removal woke the next pass).
fn planned_metric(r: &RouteSpec) -> u32 {
    match r.metric {
        Some(IPV6_DEFAULT_METRIC) if r.dst.addr().is_ipv6() => 0,
        m => m.unwrap_or(0),
    }
}

fn from_kernel(r: &RouteSpec) -> Option<Route> {
    if r.protocol != TRELLIS_PROTO || r.table != TABLE_MAIN {
        return None;
    }
    let kind = match (r.kind, r.gateway, r.oif) {
        (KKind::Blackhole, _, _) => RouteKind::Blackhole,
        (KKind::Unicast, Some(gateway), Some(ifindex)) => RouteKind::Via {
            gateway,
            ifindex,
            onlink: r.onlink,
        },
        _ => return None,
    };
    Some(Route {
        dst: r.dst,
        kind,
        metric: planned_metric(r),
    })
}

/// The main table's destinations (with metric) held by routes of other protocols.
fn foreign(routes: &[RouteSpec]) -> std::collections::BTreeSet<(IpNet, u32)> {
    routes
        .iter()
        .filter(|r| r.protocol != TRELLIS_PROTO && r.table == TABLE_MAIN)
        .map(|r| (r.dst, planned_metric(r)))
        .collect()
}

/// What Trellis owns in the kernel now.
pub fn observe(nl: &mut Netlink, vtep: Option<u32>) -> Result<Observed> {
    let routes = nl.routes()?;
    observe_with(nl, &routes, vtep)
}

/// [`observe`] from a route dump the caller already has (and uses for more, such as
/// [`gateway_routes`]).
pub fn observe_with(nl: &mut Netlink, routes: &[RouteSpec], vtep: Option<u32>) -> Result<Observed> {
    let mut o = Observed {
        routes: routes.iter().filter_map(from_kernel).collect(),
        foreign: foreign(routes),
        ..Default::default()
    };
    if let Some(ifindex) = vtep {
        for e in nl.neighbours(ifindex, false)? {
            if let (Some(ip), Some(mac), true) = (e.ip, e.mac, e.permanent) {
                o.neighbours.insert(Neighbour { ifindex, ip, mac });
            }
        }
        for e in nl.neighbours(ifindex, true)? {
            if let (Some(dst), Some(mac), true) = (e.ip, e.mac, e.permanent) {
                if mac != [0; 6] {
                    o.fdb.insert(Fdb { ifindex, mac, dst });
                }
            }
        }
    }
    Ok(o)
}

/// [`observe`] with Trellis's routes at [`BGP_METRIC`] (the learned ones, possibly a full
/// table) handed to `learned` as the route dump decodes them instead of collected; also returns
/// the [`gateway_routes`] through `oif`. One dump serves all three.
pub fn observe_learned_apart(
    nl: &mut Netlink,
    vtep: Option<u32>,
    oif: u32,
    mut learned: impl FnMut(Route),
) -> Result<(Observed, Vec<(IpNet, IpAddr)>)> {
    let mut others = Vec::new();
    nl.each_route(|r| match from_kernel(&r) {
        Some(route) if route.metric == BGP_METRIC => learned(route),
        _ => others.push(r),
    })?;
    let observed = observe_with(nl, &others, vtep)?;
    Ok((observed, gateway_routes(&others, oif)))
}

/// The main table's routes of other protocols that leave through `oif` by a gateway
/// (destination → gateway): what BGP next hops beyond the node's subnet resolve through.
/// Trellis's own routes are left out, so a BGP route never resolves through another.
pub fn gateway_routes(routes: &[RouteSpec], oif: u32) -> Vec<(IpNet, IpAddr)> {
    routes
        .iter()
        .filter(|r| {
            r.protocol != TRELLIS_PROTO
                && r.table == TABLE_MAIN
                && r.kind == KKind::Unicast
                && r.oif == Some(oif)
        })
        .filter_map(|r| Some((r.dst, r.gateway?)))
        .collect()
}

/// Applies ops in order; returns the ones that failed (the rest still go through, and the next
/// resync retries the failures).
pub fn apply<O: Borrow<Op>>(
    nl: &mut Netlink,
    ops: impl IntoIterator<Item = O>,
) -> Vec<(Op, DataplaneError)> {
    let mut failed = Vec::new();
    for op in ops {
        let op = op.borrow();
        let r = match op {
            Op::SetFdb(e) => nl.fdb_append(e.ifindex, e.mac, e.dst).or_else(|err| {
                if err.is_exists() {
                    Ok(())
                } else {
                    Err(err)
                }
            }),
            Op::SetNeighbour(n) => nl.set_neighbour(n.ifindex, n.ip, n.mac),
            Op::ReplaceRoute(r) => nl.add_route(&to_kernel(r), true),
            Op::DelRoute(r) => nl.del_route(&to_kernel(r)).map(|_| ()),
            Op::DelNeighbour(n) => nl.del_neighbour(n.ifindex, n.ip).map(|_| ()),
            Op::DelFdb(e) => nl.fdb_del(e.ifindex, e.mac, e.dst).map(|_| ()),
        };
        if let Err(e) = r {
            failed.push((op.clone(), e));
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_round_trip_keeps_only_trellis_routes() {
        let routes = [
            Route {
                dst: "10.1.0.0/26".parse().unwrap(),
                metric: 0,
                kind: RouteKind::Blackhole,
            },
            Route {
                dst: "10.1.1.0/26".parse().unwrap(),
                metric: 0,
                kind: RouteKind::Via {
                    gateway: "10.1.1.0".parse().unwrap(),
                    ifindex: 7,
                    onlink: true,
                },
            },
        ];
        for r in &routes {
            assert_eq!(from_kernel(&to_kernel(r)).as_ref(), Some(r));
        }
        let foreign = RouteSpec::via(
            "10.9.0.0/24".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            2,
        );
        assert_eq!(
            from_kernel(&foreign),
            None,
            "routes of other protocols are not Trellis's"
        );
    }

    #[test]
    fn gateway_routes_are_other_protocols_routes_through_the_uplink() {
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let gw: IpAddr = "192.0.2.1".parse().unwrap();
        let bgp = to_kernel(&Route {
            dst: net("10.7.0.0/24"),
            metric: 32,
            kind: RouteKind::Via {
                gateway: gw,
                ifindex: 2,
                onlink: false,
            },
        });
        let routes = [
            RouteSpec::via(net("0.0.0.0/0"), gw, 2),
            RouteSpec::via(net("198.51.100.0/24"), "192.0.2.9".parse().unwrap(), 2),
            RouteSpec::via(net("203.0.113.0/24"), gw, 3),
            RouteSpec::link_scope(net("192.0.2.0/24"), 2),
            bgp,
        ];
        assert_eq!(
            gateway_routes(&routes, 2),
            vec![
                (net("0.0.0.0/0"), gw),
                (net("198.51.100.0/24"), "192.0.2.9".parse().unwrap())
            ]
        );
    }
}
